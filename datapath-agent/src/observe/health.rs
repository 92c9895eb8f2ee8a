//! Liveness and readiness endpoints for the DaemonSet's probes, and the
//! Prometheus metrics (`/metrics`, see `metrics.rs`), on `health_address`.
//! They are served from the agent's first moments (bound before anything
//! else; a bind failure is fatal), also while it waits for the API server.
//!
//! `/healthz` (live): the agent's event loop turns: it beats at least every
//! second, holding the agent's lock for a moment, and the probe fails once
//! no beat came for `event_loop_stall_seconds` (a stuck lock, a blocked
//! call). Before the loop runs (waiting for the Node object) it is live.
//!
//! `/readyz` (ready): the datapath is loaded and reconciled, the CNI API
//! served and (Kubernetes source) the first complete Node list applied; the
//! pinned maps and node-level links are in place; every live pod has its
//! program attached and its map entries (as the agent's last check, every
//! few seconds, found them: it puts back what is missing, so this fails
//! only while it cannot); and no watch has kept failing for longer than
//! `kubernetes.watch_failure_seconds`. Its body says why not, and shows the
//! last rejected config edit.
//!
//! Anyone who reaches `health_address` (a DaemonSet binds 0.0.0.0 on the
//! host network: every pod) can connect, so connections are bounded: a
//! request's head must arrive within [`REQUEST_HEAD_TIMEOUT`] of the
//! connection's start or of the previous response (idle and half-sent
//! requests are closed), no connection lives longer than
//! [`CONNECTION_TIME_LIMIT`], and at most [`MAX_CONNECTIONS`] are open: a
//! new one beyond pushes out the oldest that is not in a request, so the
//! probes are answered and the agent keeps file descriptors for CNI calls.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;

use crate::bpf::{PinLayout, PinnedMaps};

/// A watch's retry fails (with a refusal or an HTTP error) within this long
/// of its start: no new error by then means the retry worked. (A watch that
/// restarts well yields no event to tell.)
const WATCH_RETRY_ALLOWANCE: Duration = Duration::from_secs(10);

/// Why an edit of the config file was not applied (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigRejection {
    /// The new file does not parse or validate: nothing of it applied.
    Invalid,
    /// A field only a restart can change differs: that field not applied.
    NeedsRestart,
}

impl ConfigRejection {
    pub const ALL: [ConfigRejection; 2] = [ConfigRejection::Invalid, ConfigRejection::NeedsRestart];
    pub const fn name(self) -> &'static str {
        match self {
            ConfigRejection::Invalid => "invalid",
            ConfigRejection::NeedsRestart => "needs_restart",
        }
    }
}

#[derive(Debug, Clone)]
struct WatchFailure {
    since: Instant,
    last: Instant,
    /// When the last error came, its retry was due this much later.
    retry_delay: Duration,
    error: String,
}

impl WatchFailure {
    /// Errors still come: the last one's retry has not had time to succeed.
    fn ongoing(&self) -> bool {
        self.last.elapsed() <= self.retry_delay + WATCH_RETRY_ALLOWANCE
    }
}

#[derive(Debug, Default)]
pub struct Health {
    /// The datapath is loaded and reconciled, the CNI API served and the
    /// first Node list applied (Kubernetes source).
    started: AtomicBool,
    /// Pins that must exist while the datapath is loaded (node-level links).
    required_pins: Mutex<Vec<PathBuf>>,
    pins: Mutex<Option<PinLayout>>,
    /// Last beat of the event loop; `None` until the loop runs.
    heartbeat: Mutex<Option<Instant>>,
    stall_limit_ms: AtomicU64,
    watch_grace_ms: AtomicU64,
    /// Failing watches by name, since when, and their last error.
    watches: Mutex<BTreeMap<&'static str, WatchFailure>>,
    /// Errors of each watch that has run (from 0 at its first event).
    watch_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// The delay before each watch's next retry, as its backoff last said.
    watch_retry_delays: Mutex<BTreeMap<&'static str, Duration>>,
    /// Live pods the agent could not give their program link or map
    /// entries at its last check, and why.
    unprogrammed_pods: Mutex<Vec<String>>,
    /// The last rejected config edit (cleared by an accepted one).
    last_config_error: Mutex<Option<String>>,
    config_rejected: [AtomicU64; 2],
    /// Drop totals by reason, sampled every [`DROP_SAMPLE_INTERVAL`] for the
    /// last minute's drops in `status` (oldest first).
    drop_samples: Mutex<std::collections::VecDeque<(Instant, BTreeMap<&'static str, u64>)>>,
}

/// How often the event loop samples the drop counters for `status`.
pub const DROP_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// The window `status` reports drops over.
const RECENT_DROPS_WINDOW: Duration = Duration::from_secs(60);

impl Health {
    /// Readiness will also need the pinned maps under `pins` and the
    /// node-level link pins `required` in place; liveness allows the event
    /// loop `stall_limit` between beats; a watch may fail for `watch_grace`.
    pub fn configure(
        &self,
        pins: PinLayout,
        required: Vec<PathBuf>,
        stall_limit: Duration,
        watch_grace: Duration,
    ) {
        *lock(&self.pins) = Some(pins);
        *lock(&self.required_pins) = required;
        self.stall_limit_ms.store(stall_limit.as_millis() as u64, Ordering::Relaxed);
        self.watch_grace_ms.store(watch_grace.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Whether the start-up steps are done (not whether `/readyz` answers 200).
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// The event loop turned.
    pub fn beat(&self) {
        *lock(&self.heartbeat) = Some(Instant::now());
    }

    /// The backoff of watch `name` scheduled its next retry `delay` from now
    /// (it does so for each error, before the error reaches the agent).
    pub fn watch_retry_scheduled(&self, name: &'static str, delay: Duration) {
        lock(&self.watch_retry_delays).insert(name, delay);
    }

    /// A watch (`name`: "Node", "Service", "EndpointSlice") failed with `error`.
    pub fn watch_failed(&self, name: &'static str, error: &dyn std::error::Error) {
        *lock(&self.watch_errors).entry(name).or_insert(0) += 1;
        let now = Instant::now();
        let retry_delay = lock(&self.watch_retry_delays).get(name).copied().unwrap_or_default();
        let mut watches = lock(&self.watches);
        let failure = watches.entry(name).or_insert(WatchFailure {
            since: now,
            last: now,
            retry_delay,
            error: String::new(),
        });
        if !failure.ongoing() {
            // The last streak ended (a retry worked); this is a new one.
            failure.since = now;
        }
        failure.last = now;
        failure.retry_delay = retry_delay;
        failure.error = error.to_string();
    }

    /// A watch delivered an event: it works.
    pub fn watch_ok(&self, name: &'static str) {
        lock(&self.watch_errors).entry(name).or_insert(0);
        lock(&self.watches).remove(name);
    }

    /// Each watch that has run, with its errors so far.
    pub fn watch_errors(&self) -> Vec<(&'static str, u64)> {
        lock(&self.watch_errors).iter().map(|(name, n)| (*name, *n)).collect()
    }

    /// The watches failing now: "name: last error".
    pub fn failing_watches(&self) -> Vec<String> {
        lock(&self.watches)
            .iter()
            .filter(|(_, failure)| failure.ongoing())
            .map(|(name, failure)| format!("{name}: {}", failure.error))
            .collect()
    }

    /// Keep the drop totals now (by reason) for [`Self::recent_drops`].
    pub fn sample_drops(&self, totals: BTreeMap<&'static str, u64>) {
        let mut samples = lock(&self.drop_samples);
        samples.push_back((Instant::now(), totals));
        // One sample older than the window is enough to measure it.
        while samples.len() > 2 && samples[1].0.elapsed() >= RECENT_DROPS_WINDOW {
            samples.pop_front();
        }
    }

    /// Drops by reason since the newest sample at least a minute old (or
    /// the oldest there is, after a start), from the totals `now`: (what
    /// was dropped, by reason, those with any; over how many seconds).
    pub fn recent_drops(&self, now: &BTreeMap<&'static str, u64>) -> (BTreeMap<String, u64>, u64) {
        let samples = lock(&self.drop_samples);
        let Some((at, then)) = samples
            .iter()
            .rev()
            .find(|(at, _)| at.elapsed() >= RECENT_DROPS_WINDOW)
            .or_else(|| samples.front())
        else {
            return (BTreeMap::new(), 0);
        };
        let drops = now
            .iter()
            .filter_map(|(reason, n)| {
                let delta = n.saturating_sub(then.get(reason).copied().unwrap_or(0));
                (delta > 0).then(|| ((*reason).to_owned(), delta))
            })
            .collect();
        (drops, at.elapsed().as_secs())
    }

    /// The live pods the last check could not program fully (empty: all are).
    pub fn set_unprogrammed_pods(&self, pods: Vec<String>) {
        *lock(&self.unprogrammed_pods) = pods;
    }

    pub fn config_rejected(&self, why: ConfigRejection, error: String) {
        self.config_rejected[why as usize].fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_config_error) = Some(error);
    }

    pub fn config_accepted(&self) {
        *lock(&self.last_config_error) = None;
    }

    pub fn last_config_error(&self) -> Option<String> {
        lock(&self.last_config_error).clone()
    }

    /// Rejected config edits so far, by reason.
    pub fn config_rejections(&self) -> [(ConfigRejection, u64); 2] {
        ConfigRejection::ALL.map(|why| (why, self.config_rejected[why as usize].load(Ordering::Relaxed)))
    }

    /// `Err(why)` when the event loop has not turned for too long.
    pub fn live(&self) -> Result<(), String> {
        let Some(beat) = *lock(&self.heartbeat) else { return Ok(()) };
        let limit = Duration::from_millis(self.stall_limit_ms.load(Ordering::Relaxed));
        let quiet = beat.elapsed();
        if quiet > limit {
            return Err(format!("the agent's event loop has not turned for {:.0?}", quiet));
        }
        Ok(())
    }

    /// `Err(why)` when the node should get no new pod from this agent.
    pub fn ready(&self) -> Result<(), String> {
        if !self.is_started() {
            return Err("the datapath or the Node list is not in place yet".into());
        }
        for pin in lock(&self.required_pins).iter() {
            if !pin.exists() {
                return Err(format!("the datapath is not loaded: {} is missing", pin.display()));
            }
        }
        if let Some(pins) = lock(&self.pins).as_ref()
            && let Err(e) = PinnedMaps::open(pins)
        {
            return Err(format!("the datapath is not loaded: {:#}", anyhow::Error::from(e)));
        }
        let unprogrammed = lock(&self.unprogrammed_pods);
        if !unprogrammed.is_empty() {
            return Err(format!("live pods without their datapath: {}", unprogrammed.join("; ")));
        }
        let grace = Duration::from_millis(self.watch_grace_ms.load(Ordering::Relaxed));
        for (name, failure) in lock(&self.watches).iter() {
            let failing = failure.since.elapsed();
            if failure.ongoing() && failing > grace {
                return Err(format!(
                    "the {name} watch has been failing for {failing:.0?}: {}",
                    failure.error
                ));
            }
        }
        Ok(())
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bind `address` (an error if it cannot be: the probes would fail).
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding health_address {address} (is another agent or program using it?)"))
}

/// A request's head must arrive within this long of the connection's start
/// or of the previous response (hyper's header read timeout): idle and
/// half-sent requests are closed. The probes send theirs at once.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, whatever it does (a client that reads its
/// response very slowly, say).
pub const CONNECTION_TIME_LIMIT: Duration = Duration::from_secs(60);
/// Connections open at once, at most (kubelet and a scraper need a few).
pub const MAX_CONNECTIONS: usize = 64;

pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Registry,
) -> anyhow::Result<()> {
    serve_router(listener, router(health, Arc::new(metrics))).await
}

/// Serve `app` on `listener` with the limits above (head timeout,
/// connection time limit, connection cap).
pub async fn serve_router(listener: tokio::net::TcpListener, app: Router) -> anyhow::Result<()> {
    let connections = Arc::new(Connections::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(REQUEST_HEAD_TIMEOUT);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: those open are still served
                // (and time out); try again shortly, without spinning.
                tracing::debug!(error = %e, "health endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap with every connection in a request: closed at once.
        let Some(Slot { id, state }) = connections.admit() else { continue };
        let service = TowerToHyperService::new(app.clone());
        let requests_of = Arc::clone(&state);
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let in_request = InRequest::new(&requests_of);
                let response = hyper::service::Service::call(&service, request);
                async move {
                    let _in_request = in_request;
                    response.await
                }
            }),
        );
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIME_LIMIT, connection) => {}
                _ = state.pushed_out.notified() => {}
            }
            connections.leave(id);
        });
    }
}

fn router(health: Arc<Health>, metrics: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let metrics = Arc::clone(&metrics);
                async move {
                    use crate::observe::exposition;
                    let mut body = String::new();
                    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
                    match prometheus_client::encoding::text::encode(&mut body, &metrics) {
                        Ok(()) if exposition::wants_openmetrics(accept) => {
                            (StatusCode::OK, [("content-type", exposition::OPENMETRICS)], body)
                        }
                        Ok(()) => (
                            StatusCode::OK,
                            [("content-type", exposition::PROMETHEUS_TEXT)],
                            exposition::to_prometheus_text(&body),
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [("content-type", "text/plain")],
                            String::new(),
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(|State(health): State<Arc<Health>>| async move {
                match health.live() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not live: {why}\n")),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(health): State<Arc<Health>>| async move {
                // Map reads and stats: off the async workers.
                let checked = Arc::clone(&health);
                let ready = tokio::task::spawn_blocking(move || checked.ready())
                    .await
                    .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
                let (status, mut body) = match ready {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                };
                if let Some(error) = health.last_config_error() {
                    body.push_str(&format!("last rejected config edit: {error}\n"));
                }
                (status, body)
            }),
        )
        .with_state(health)
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnectionState>>>,
}

#[derive(Default)]
struct ConnectionState {
    /// Requests being handled now (a keep-alive connection has one at a time).
    in_request: std::sync::atomic::AtomicUsize,
    /// Told to close: a newer connection needed its place.
    pushed_out: tokio::sync::Notify,
}

/// A connection's place among the open ones.
struct Slot {
    id: u64,
    state: Arc<ConnectionState>,
}

impl Connections {
    /// A place for a new connection: at the cap, the oldest connection not
    /// in a request is told to close and gives its place; `None` if all are
    /// in one.
    fn admit(&self) -> Option<Slot> {
        let mut open = lock(&self.open);
        if open.len() >= MAX_CONNECTIONS {
            let oldest_idle =
                open.iter().find(|(_, c)| c.in_request.load(Ordering::SeqCst) == 0).map(|(id, _)| *id)?;
            if let Some(pushed_out) = open.remove(&oldest_idle) {
                // Stored if its task does not wait yet: it ends at its first look.
                pushed_out.pushed_out.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState::default());
        open.insert(id, Arc::clone(&state));
        Some(Slot { id, state })
    }

    fn leave(&self, id: u64) {
        lock(&self.open).remove(&id);
    }
}

/// Counts a request in progress on its connection while it lives.
struct InRequest(Arc<ConnectionState>);

impl InRequest {
    fn new(state: &Arc<ConnectionState>) -> Self {
        state.in_request.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(state))
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.in_request.fetch_sub(1, Ordering::SeqCst);
    }
}
