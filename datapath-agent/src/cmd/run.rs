//! `datapath-agent run`: load and pin the datapath, reconcile, serve the CNI plugin.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use datapath_api::{EndpointRef, EndpointSpec, Request, Response};
use datapath_common::{MonitorConfig, NODE_FLAG_SERVICES, NodeConfig, RoutingMode, program_names};

use crate::{
    bpf::{
        Datapath, LinkFailure, LinkRetry, LoadOptions, LocalEndpoint, PinLayout, PinnedConntrack,
        ProgramBuild, RemoteRoute, SweepReport,
    },
    host::node_lock::{NetnsLock, NodeLock},
    host::node_net::{self, RouteVia},
    host::state::EndpointStore,
    observe::health::{ConfigRejection, Health},
    observe::metrics::{AgentErrors, ConntrackStats},
    observe::monitor_lock::{MonitorLock, MonitorLockError},
    reconcile::conntrack::{self, ConntrackLimits},
    reconcile::service_sync::{ServiceRef, ServiceSync},
    source::config::{AgentConfig, ConfigError, EbpfLog, Mode, ServiceConfig, Source, SourceSettings},
    source::kubernetes_services::{self, ServiceUpdate},
};

/// How often the agent removes idle and closed Service connections from
/// the connection-tracking map.
const CONNTRACK_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a failed Service sync is tried again.
const SERVICE_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the event loop beats for the liveness probe.
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a link that could not be switched to the loaded program is
/// tried again, live pods are checked for their map entries and program
/// link (put back if missing), and forward tracing left on by a killed
/// monitor is switched off.
const LINK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the node's own routes to other nodes' pods are checked (one
/// deleted by someone else is put back).
const ROUTE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often map entries of interfaces that no longer exist are swept (also
/// after each DEL and at start).
const INTERFACE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

struct Agent {
    errors: Arc<AgentErrors>,
    config: AgentConfig,
    datapath: Datapath,
    store: EndpointStore,
    pod_mtu: u32,
    route_via: RouteVia,
    services: ServiceSync,
    health: Arc<Health>,
    /// Live links that could not be switched to the loaded program: they
    /// keep forwarding with the one they have, and are retried.
    pending_links: Vec<PendingLink>,
    /// Peer pod CIDRs whose node route is someone else's (already said).
    routes_taken: Vec<ipnet::Ipv4Net>,
}

/// A pinned link to switch to the loaded program again.
struct PendingLink {
    program: &'static str,
    ifname: String,
    pin: PathBuf,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config_file = ConfigFile::read(&args.config)?;
    // One agent per node, settled before anything is touched: the network
    // namespace's lock and the CNI socket (neither makes anything), then the
    // locks on the pinned state and the records (their directories are
    // removed again if the start fails before the datapath is pinned).
    let settings = &config_file.settings;
    let netns_lock = NetnsLock::acquire()?;
    netns_lock.answer_holder_queries().context("serving the network namespace's lock")?;
    refuse_a_socket_that_answers(&settings.api_socket)?;
    let mut node_lock = NodeLock::acquire(&settings.bpffs_dir, &settings.state_dir)?;
    let health = Arc::new(Health::default());
    let errors = Arc::new(AgentErrors::default());
    let conntrack_stats = Arc::new(ConntrackStats::default());
    // Served from now on, also while waiting for the API server below (live,
    // not ready). An address that cannot be bound is fatal: the probes
    // would fail, and the node would never see this agent ready.
    if let Some(address) = settings.health_address {
        let listener = crate::observe::health::bind(address).await?;
        let health = Arc::clone(&health);
        let registry = crate::observe::metrics::registry(
            PinLayout::new(&settings.bpffs_dir),
            Arc::clone(&errors),
            Arc::clone(&conntrack_stats),
            Arc::clone(&health),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::observe::health::serve(listener, health, registry).await {
                tracing::error!(error = format!("{e:#}"), "health endpoints failed");
            }
        });
    }
    let (config, kube_client) = config_file.resolve().await?;
    config.check_host()?;
    let (connection, netlink, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);

    // Node networking first: the programs need the ifindexes.
    let uplink = node_net::uplink(&netlink, &config.uplink_interface).await?;
    // The uplink's program runs in both modes: it delivers to local pods
    // what arrives for them unencapsulated (after the kernel's forwarding
    // checks) and notices peers that send in the other mode.
    let uplink_program = (program_names::FROM_UPLINK, config.uplink_interface.clone());
    let (vxlan_ifindex, route_via, node_programs) = match config.mode {
        Mode::Native => {
            node_net::remove_vxlan_if_present(&netlink, &config.vxlan.device).await?;
            (0, RouteVia::Native { uplink_index: uplink.index }, vec![uplink_program])
        }
        Mode::Vxlan => {
            let vxlan = node_net::ensure_vxlan(&netlink, &config, uplink.mtu).await?;
            (
                vxlan.index,
                RouteVia::Overlay { vxlan_index: vxlan.index, vni: config.vxlan.vni },
                vec![uplink_program, (program_names::FROM_OVERLAY, config.vxlan.device.clone())],
            )
        }
    };
    node_net::enable_ip_forwarding()?;

    let build = match config.ebpf_log {
        EbpfLog::Off => ProgramBuild::Normal,
        EbpfLog::Debug => ProgramBuild::Debug,
    };
    let load_options = LoadOptions { conntrack_entries: config.conntrack_max_entries };
    node_lock.keep_created();
    let mut datapath = Datapath::load_pinned_with(PinLayout::new(&config.bpffs_dir), build, load_options)
        .with_context(|| format!("loading the datapath under {}", config.bpffs_dir.display()))?;
    if build == ProgramBuild::Debug {
        crate::bpf::ebpf::forward_log_to_tracing(datapath.ebpf_mut())
            .context("reading the debug build's aya-log ring buffer")?;
    }
    // The monitor's forward tracing belongs to a running `monitor`: kept,
    // unless no monitor runs (one was killed and left it on).
    let monitor = datapath.monitor_config().context("reading the monitor config map")?;
    datapath
        .set_monitor_config(MonitorConfig { events_per_second: config.monitor_events_per_second, ..monitor })
        .context("writing the monitor config map")?;
    switch_off_abandoned_forward_tracing(&mut datapath)?;
    // Service translation stays as the last agent left it until the Services
    // are synced below: tracked connections must keep their translation.
    let node_config_before = datapath.node_config().context("reading the node config map")?;
    let services_flag = node_config_before.flags & NODE_FLAG_SERVICES;
    // The mode the notes of peers in the other mode were made under.
    let mode_before =
        [Mode::Native, Mode::Vxlan].into_iter().find(|mode| node_config_before.mode == routing_mode(*mode));
    datapath
        .set_node_config(NodeConfig {
            node_ipv4: config.node_ip.octets(),
            mode: routing_mode(config.mode),
            uplink_ifindex: uplink.index,
            vxlan_ifindex,
            vni: config.vxlan.vni,
            flags: services_flag,
            vxlan_port: config.vxlan.port.to_be_bytes(),
            pod_prefix_len: config.pod_cidr.prefix_len(),
            _pad: 0,
            pod_cidr: config.pod_cidr.network().octets(),
            pod_mtu: node_net::pod_mtu(&config, uplink.mtu),
        })
        .context("writing the node config map")?;
    let pod_mtu = node_net::pod_mtu(&config, uplink.mtu);
    let store = EndpointStore::open(&config.state_dir)?;
    let services = ServiceSync::new(config.state_dir.clone());
    let mut agent = Agent {
        config,
        datapath,
        store,
        pod_mtu,
        route_via,
        errors,
        services,
        health: Arc::clone(&health),
        pending_links: Vec::new(),
        routes_taken: Vec::new(),
    };
    let mut report = agent.datapath.reconcile().context("reconciling pinned state")?;
    let RecordsReport { stale: stale_records, restored: endpoints_restored } = agent.reconcile_records()?;
    // Pods' veths taken down (or up again) while no agent ran; then every
    // change as it happens.
    let mut link_changes = crate::host::link_state::watch()?;
    crate::host::link_state::sync_all(&mut agent.datapath, &netlink)
        .await
        .context("reading the pods' veth states")?;
    let node_links_failed =
        agent.datapath.sync_node_links(&node_programs).context("attaching the node programs")?;
    let links_failed = report.links_failed.len() + node_links_failed.len();
    for failure in std::mem::take(&mut report.links_failed).into_iter().chain(node_links_failed) {
        agent.keep_failed_link(failure);
    }
    // In kubernetes mode the peers are not known until the first Node list:
    // what is pinned stays routed until then (a restart must not cut
    // cross-node traffic, and an API server that fails its lists must not
    // either); the list is then applied by diff.
    if agent.config.source == Source::Static {
        agent.apply_peers(&netlink).await.context("programming the peer nodes")?;
    }
    // Static Services are all known now. In kubernetes mode the file has
    // none: the maps stay as the last agent left them (no connection to a
    // Service is refused across a restart) until a Service list arrives.
    if agent.config.source == Source::Static {
        let list = agent.config.services.clone();
        agent.apply_services(list).context("programming the Services")?;
    }
    crate::host::masquerade::apply(
        agent
            .config
            .masquerade
            .then_some((agent.config.cluster_cidr, agent.config.uplink_interface.as_str())),
    )?;
    tracing::info!(
        node = agent.config.node_name,
        pod_cidr = %agent.config.pod_cidr,
        mode = ?agent.config.mode,
        pod_mtu,
        links_updated = report.links_updated,
        stale_links_removed = report.stale_links_removed,
        stale_endpoints_removed = report.stale_endpoints_removed,
        stale_interfaces_removed = report.stale_interfaces_removed,
        links_failed,
        stale_records,
        endpoints_restored,
        "datapath loaded and reconciled"
    );

    // Readiness also needs the pins it made to stay in place.
    health.configure(
        agent.datapath.pins().clone(),
        node_programs
            .iter()
            .map(|(program, ifname)| agent.datapath.pins().node_link(program, ifname))
            .collect(),
        std::time::Duration::from_secs(agent.config.event_loop_stall_seconds.into()),
        std::time::Duration::from_secs(agent.config.kubernetes.watch_failure_seconds.into()),
    );
    let socket_path = agent.config.api_socket.clone();
    let (listener, socket_identity) = bind_private_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), "serving the CNI plugin");
    // Peers come from the file (static) or from Node objects (Kubernetes).
    let mut config_changes = match kube_client {
        None => watch_config(args.config.clone(), agent.config.clone(), Arc::clone(&health)),
        Some(_) => tokio::sync::mpsc::channel(1).1,
    };
    // Services come from the file (static) or from Services and EndpointSlices.
    let mut kube_services = kube_client
        .clone()
        .map(|client| crate::source::kubernetes_services::watch_services(client, Arc::clone(&health)));
    let programmed = agent.datapath.remote_routes().context("reading the programmed peers")?;
    let mut node_peers = kube_client.map(|client| {
        crate::source::kubernetes::watch_peers(
            client,
            agent.config.node_name.clone(),
            agent.config.pod_cidr,
            agent.config.cluster_cidr,
            programmed,
            Arc::clone(&health),
        )
    });
    if node_peers.is_none() {
        become_ready(&agent.config, &health)?;
    }
    let (config_bpffs_dir, config_mode) = (agent.config.bpffs_dir.clone(), agent.config.mode);
    let pinned_conntrack = PinnedConntrack::open(agent.datapath.pins())
        .context("opening the connection-tracking map for its collector")?;
    let gc_errors = Arc::clone(&agent.errors);
    // An async mutex: peer updates hold it across netlink calls.
    let agent = Arc::new(Mutex::new(agent));
    spawn_conntrack_gc(Arc::clone(&agent), pinned_conntrack, conntrack_stats, gc_errors);
    crate::observe::mode_mismatch::spawn_watch(PinLayout::new(&config_bpffs_dir), mode_before, config_mode);

    // A Service sync that failed (e.g. a full map) is tried again, whole.
    let mut service_retry = tokio::time::interval(SERVICE_RETRY_INTERVAL);
    service_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link_retry = tokio::time::interval(LINK_RETRY_INTERVAL);
    link_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    link_retry.reset();
    let mut route_check = tokio::time::interval(ROUTE_CHECK_INTERVAL);
    route_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    route_check.reset();
    let mut interface_sweep = tokio::time::interval(INTERFACE_SWEEP_INTERVAL);
    interface_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interface_sweep.reset();
    // The loop's pulse for /healthz: taken with the agent's lock, so a lock
    // that stays held stops it too.
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let _agent = agent.lock().await;
                health.beat();
            }
            Some(change) = link_changes.recv() => {
                let mut agent = agent.lock().await;
                if let Err(e) = crate::host::link_state::apply(&mut agent.datapath, &netlink, change).await {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "following a pod veth's state failed");
                }
            }
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        let agent = Arc::clone(&agent);
                        tokio::spawn(async move {
                            if let Err(e) = serve_connection(stream, agent).await {
                                tracing::warn!(error = format!("{e:#}"), "API connection failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
            Some(first) = next_update(&mut kube_services) => {
                // Whatever else has queued up meanwhile goes in the same sync.
                let mut updates = vec![first];
                while let Some(update) = kube_services.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    updates.push(update);
                }
                let mut agent = agent.lock().await;
                if let Err(e) = tokio::task::block_in_place(|| agent.apply_service_updates(updates)) {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the Service list failed");
                }
            }
            Some(peers) = next_from_watch(&mut node_peers) => {
                let mut agent = agent.lock().await;
                agent.config.peers = peers;
                match agent.apply_peers(&netlink).await {
                    Ok(()) if !health.is_started() => become_ready(&agent.config, &health)?,
                    Ok(()) => {}
                    Err(e) => {
                        agent.errors.inc();
                        tracing::error!(error = format!("{e:#}"), "applying the Node list failed");
                    }
                }
            }
            Some(new_config) = config_changes.recv() => {
                let mut agent = agent.lock().await;
                match agent.config.restart_only_fields_differ(&new_config) {
                    Some(field) => {
                        tracing::warn!(
                            field,
                            "this config change needs an agent restart; only peers, services and the \
                             conntrack timeouts are applied live"
                        );
                        health.config_rejected(
                            ConfigRejection::NeedsRestart,
                            format!("`{field}` changed: not applied until the agent restarts"),
                        );
                    }
                    None => health.config_accepted(),
                }
                agent.config.peers = new_config.peers;
                // The collector reads the timeouts at each sweep.
                agent.config.conntrack_tcp_idle_seconds = new_config.conntrack_tcp_idle_seconds;
                agent.config.conntrack_udp_idle_seconds = new_config.conntrack_udp_idle_seconds;
                agent.config.conntrack_closing_seconds = new_config.conntrack_closing_seconds;
                if let Err(e) = agent.apply_peers(&netlink).await {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the new peer list failed");
                }
                // Also when they did not change: a sync of what already
                // matches writes nothing, and one that failed before is retried.
                agent.config.services = new_config.services;
                let list = agent.config.services.clone();
                if let Err(e) = tokio::task::block_in_place(|| agent.apply_services(list)) {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the new Services failed");
                }
            }
            _ = service_retry.tick() => {
                let mut agent = agent.lock().await;
                let agent = &mut *agent;
                if !agent.services.in_sync() {
                    match tokio::task::block_in_place(|| agent.services.retry(&mut agent.datapath)) {
                        Ok(Some(report)) => tracing::info!(
                            added = report.added,
                            updated = report.updated,
                            removed = report.removed,
                            "Services programmed on retry"
                        ),
                        Ok(None) => {}
                        Err(e) => {
                            agent.errors.inc();
                            tracing::error!(
                                error = format!("{:#}", anyhow::Error::from(e)),
                                "programming the Services failed again"
                            );
                        }
                    }
                }
            }
            _ = link_retry.tick() => {
                let mut agent = agent.lock().await;
                tokio::task::block_in_place(|| {
                    if !agent.pending_links.is_empty() {
                        agent.retry_pending_links();
                    }
                    agent.check_live_endpoints();
                    if let Err(e) = switch_off_abandoned_forward_tracing(&mut agent.datapath) {
                        agent.errors.inc();
                        tracing::warn!(error = format!("{e:#}"), "checking the monitor's forward tracing failed");
                    }
                });
            }
            _ = route_check.tick() => {
                let mut agent = agent.lock().await;
                agent.check_node_routes(&netlink).await;
            }
            _ = interface_sweep.tick() => {
                let mut agent = agent.lock().await;
                tokio::task::block_in_place(|| agent.sweep_gone_interfaces());
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Pinned maps and links stay: forwarding goes on while the agent is away.
    remove_own_socket(&socket_path, socket_identity);
    tracing::info!("agent stopped; datapath left running");
    Ok(())
}

/// Every [`CONNTRACK_GC_INTERVAL`], remove idle and closed Service
/// connections. The sweep works on its own handle of the pinned map, so
/// the agent's lock is held only to read the timeouts and to switch the
/// programs' Service lookups off once nothing is left.
fn spawn_conntrack_gc(
    agent: Arc<Mutex<Agent>>,
    mut pinned_conntrack: PinnedConntrack,
    stats: Arc<ConntrackStats>,
    errors: Arc<AgentErrors>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONNTRACK_GC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let limits = {
                let config = &agent.lock().await.config;
                ConntrackLimits::from_seconds(
                    config.conntrack_tcp_idle_seconds,
                    config.conntrack_udp_idle_seconds,
                    config.conntrack_closing_seconds,
                )
            };
            let swept =
                crate::bpf::ebpf::monotonic_now_ns().context("reading CLOCK_MONOTONIC").and_then(|now| {
                    tokio::task::block_in_place(|| conntrack::sweep(&mut pinned_conntrack, now, &limits))
                        .context("sweeping the connection-tracking map")
                });
            let report = match swept {
                Ok(report) => report,
                Err(e) => {
                    errors.inc();
                    tracing::error!(error = format!("{e:#}"), "connection-tracking collection failed");
                    continue;
                }
            };
            stats.record_sweep(&report);
            if report.removed > 0 {
                tracing::debug!(
                    removed = report.removed,
                    remaining = report.remaining,
                    "idle Service connections removed"
                );
            }
            // The last connection of a removed Service may just have gone.
            let mut agent = agent.lock().await;
            if let Err(e) = agent.datapath.update_services_flag() {
                errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "switching Service translation failed"
                );
            }
        }
    });
}

/// Refuse to start while `path` answers: another agent (with other pinned
/// state) serves it, and taking it over would send its CNI calls here.
fn refuse_a_socket_that_answers(path: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "{} is served by another process (another datapath-agent?); refusing to take it over: \
             stop that process first, or give this agent another api_socket",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// Device and inode of the socket file this agent bound.
type SocketIdentity = (u64, u64);

/// Bind the API socket so that only root can connect: the directory is 0700
/// and the socket 0600 (a pod must never be able to register endpoints).
/// What is at the path already is removed only if it is a socket that
/// nobody answers on (left by an agent that was killed).
fn bind_private_socket(path: &Path) -> anyhow::Result<(UnixListener, SocketIdentity)> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let dir = path.parent().context("api_socket has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
            "api_socket {} exists and is not a socket; refusing to remove it: move it away or choose \
             another api_socket",
            path.display()
        ),
        Ok(_) => {
            refuse_a_socket_that_answers(path)?;
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Remove the API socket on the way out, unless it is no longer the one we
/// bound (someone removed it and another process bound the path since).
fn remove_own_socket(path: &Path, ours: SocketIdentity) {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == ours => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove the API socket");
            }
        }
        Ok(_) => tracing::warn!(
            socket = %path.display(),
            "the API socket is no longer the one this agent bound; leaving it"
        ),
        Err(_) => {}
    }
}

async fn serve_connection(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let mut agent = agent.lock().await;
                // Map updates and one TCX attach: milliseconds, fine inline.
                tokio::task::block_in_place(|| agent.handle(request))
            }
            Err(e) => Response::Error { message: format!("malformed request: {e}") },
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// A parse error of the config text, with the file's path.
fn in_file(path: &Path, e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
        other => other,
    }
}

/// The config file, read, with what is needed before it can be resolved.
struct ConfigFile {
    path: PathBuf,
    text: String,
    settings: SourceSettings,
}

impl ConfigFile {
    /// Read and check what can be checked without the Node object: a static
    /// file whole, a kubernetes one as far as [`SourceSettings`] goes.
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let file = |e| in_file(path, e);
        let settings = AgentConfig::source_settings(&text).map_err(file)?;
        match settings.source {
            Source::Static => AgentConfig::parse(&text).map_err(file)?.check_host()?,
            Source::Kubernetes => settings.check()?,
        }
        Ok(Self { path: path.to_owned(), text, settings })
    }

    /// The config, resolved: from the file alone (static source), or with
    /// this node's facts from its Node object (Kubernetes source, which also
    /// returns the client for the Node watch).
    async fn resolve(&self) -> anyhow::Result<(AgentConfig, Option<kube::Client>)> {
        match self.settings.source {
            Source::Static => Ok((AgentConfig::parse(&self.text).map_err(|e| in_file(&self.path, e))?, None)),
            Source::Kubernetes => {
                let node_name = self
                    .settings
                    .node_name
                    .clone()
                    .or_else(|| std::env::var("NODE_NAME").ok())
                    .filter(|n| !n.is_empty())
                    .context("kubernetes mode needs node_name in the config or $NODE_NAME (downward API: spec.nodeName)")?;
                let client = crate::source::kubernetes::client(&self.settings.kubernetes).await?;
                let identity = crate::source::kubernetes::own_identity(&client, &node_name).await?;
                tracing::info!(node = node_name, pod_cidr = %identity.pod_cidr, node_ip = %identity.node_ip, "node facts from its Node object");
                let config = AgentConfig::parse_with(&self.text, Some(&identity))
                    .map_err(|e| in_file(&self.path, e))?;
                Ok((config, Some(client)))
            }
        }
    }
}

/// The next peer list from the Node watch (never, in static mode).
/// The next complete list from a Kubernetes watch (peers, Services); never
/// resolves without one (static source).
/// The next update from `rx`; never, without one.
async fn next_update<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_from_watch<T: Clone>(rx: &mut Option<tokio::sync::watch::Receiver<Option<T>>>) -> Option<T> {
    let Some(rx) = rx else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(list) = rx.borrow_and_update().clone() {
            return Some(list);
        }
    }
}

/// Ready: tell the probes, and give the runtime our CNI config (only now, so
/// kubelet never sends a pod to a node whose datapath is not in place).
fn become_ready(config: &AgentConfig, health: &Health) -> anyhow::Result<()> {
    if let Some(path) = &config.cni_config_file {
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "datapath",
            "plugins": [{
                "type": "datapath-cni",
                "agentSocket": config.api_socket,
                "ipam": { "type": "host-local", "ranges": [[{ "subnet": config.pod_cidr.to_string() }]] },
            }],
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&conflist)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
        tracing::info!(file = %path.display(), "CNI config written");
    }
    health.set_ready();
    tracing::info!("ready");
    Ok(())
}

/// Poll the config file; send each new valid version. An invalid edit is
/// logged, counted and shown by /readyz, and otherwise ignored: the running
/// state stays as it is.
fn watch_config(
    path: PathBuf,
    initial: AgentConfig,
    health: Arc<Health>,
) -> tokio::sync::mpsc::Receiver<AgentConfig> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut current = initial;
        let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            let Ok(text) = tokio::fs::read_to_string(&path).await else { continue };
            if text == last_text {
                continue;
            }
            last_text = text;
            match AgentConfig::load(&path) {
                Ok(new) if new != current => {
                    tracing::info!(config = %path.display(), "config file changed");
                    current = new.clone();
                    if tx.send(new).await.is_err() {
                        return;
                    }
                }
                // Back to what runs.
                Ok(_) => health.config_accepted(),
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!(error, "ignoring invalid config change");
                    health.config_rejected(ConfigRejection::Invalid, error);
                }
            }
        }
    });
    rx
}

impl Agent {
    /// Records whose veth is gone (DEL happened while we were down) go too;
    /// the endpoints of the others get back what they lost with the pins
    /// ([`Self::check_live_endpoints`]).
    fn reconcile_records(&mut self) -> anyhow::Result<RecordsReport> {
        let mut report = RecordsReport::default();
        for record in self.store.list()? {
            if !veth_alive(&record) {
                self.store.remove(&record.host_ifname)?;
                report.stale += 1;
            }
        }
        report.restored = self.check_live_endpoints();
        Ok(report)
    }

    /// Give each live endpoint (a record whose veth exists) back what ADD
    /// made and it lost (its map entries, its program link: pins removed
    /// or never shared into this container), with a log line each. One that
    /// cannot get them is logged, counted, keeps the node not ready and is
    /// tried again at the next check. Returns how many were restored.
    fn check_live_endpoints(&mut self) -> usize {
        let records = match self.store.list() {
            Ok(records) => records,
            Err(e) => {
                self.errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "reading the endpoint records failed"
                );
                return 0;
            }
        };
        let mut restored = 0;
        let mut unprogrammed = Vec::new();
        for record in records.iter().filter(|record| veth_alive(record)) {
            let pod = format!(
                "{}/{}",
                record.pod_namespace.as_deref().unwrap_or("-"),
                record.pod_name.as_deref().unwrap_or("-")
            );
            let endpoint = LocalEndpoint {
                pod_ipv4: record.pod_ipv4,
                pod_mac: record.pod_mac,
                host_ifname: record.host_ifname.clone(),
                host_ifindex: record.host_ifindex,
                host_mac: record.host_mac,
            };
            match self.datapath.restore_endpoint(&endpoint) {
                Ok(done) => {
                    if done.anything() {
                        restored += 1;
                        tracing::warn!(
                            pod,
                            ip = %record.pod_ipv4,
                            veth = record.host_ifname,
                            map_entries = done.entries,
                            program_link = done.link,
                            "endpoint restored from its record: its program link was missing (pin removed or \
                             bpffs lost?) or its map entries were"
                        );
                    }
                    if let Some(other) = done.address_taken_by {
                        tracing::warn!(
                            pod,
                            ip = %record.pod_ipv4,
                            veth = record.host_ifname,
                            other_ifindex = other,
                            "this endpoint's address is delivered to another interface; leaving that one's entry"
                        );
                    }
                }
                Err(e) => {
                    self.errors.inc();
                    let attached = self.datapath.pins().link(&record.host_ifname).exists();
                    let what = if attached { "map entries missing" } else { "no program attached" };
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!(
                        pod,
                        ip = %record.pod_ipv4,
                        veth = record.host_ifname,
                        error,
                        "this live pod has {what} and restoring it failed: it cannot send or receive \
                         through the datapath; retrying"
                    );
                    unprogrammed.push(format!("pod {pod} (veth {}): {what}: {error}", record.host_ifname));
                }
            }
        }
        self.health.set_unprogrammed_pods(unprogrammed);
        restored
    }

    /// Put back the node routes of ours that someone else deleted (the
    /// peers are those the maps hold); never touch a route that is not ours.
    async fn check_node_routes(&mut self, netlink: &rtnetlink::Handle) {
        let desired = match self.datapath.remote_routes() {
            Ok(desired) => desired,
            Err(e) => {
                self.errors.inc();
                tracing::error!(error = format!("{:#}", anyhow::Error::from(e)), "reading the peers failed");
                return;
            }
        };
        let check =
            match node_net::restore_missing_routes(netlink, &desired, self.route_via, self.config.node_ip)
                .await
            {
                Ok(check) => check,
                Err(e) => {
                    self.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "checking the node routes failed");
                    return;
                }
            };
        for route in &check.restored {
            tracing::warn!(
                pod_cidr = %route.pod_cidr,
                peer = %route.node_ip,
                "node route was missing or changed (by someone else?): put back"
            );
        }
        let taken: Vec<ipnet::Ipv4Net> = check.taken.iter().map(|route| route.pod_cidr).collect();
        for route in check.taken.iter().filter(|route| !self.routes_taken.contains(&route.pod_cidr)) {
            tracing::warn!(
                pod_cidr = %route.pod_cidr,
                peer = %route.node_ip,
                "a route to this peer's pods that is not ours holds the place of ours: leaving it (this \
                 node's own traffic to those pods follows it); remove it to get ours back"
            );
        }
        self.routes_taken = taken;
    }

    /// A live link whose switch to the loaded program failed: say why, count
    /// it, keep it (it forwards with the program it has) and retry later.
    fn keep_failed_link(&mut self, failure: LinkFailure) {
        self.errors.inc();
        tracing::error!(
            ifname = failure.ifname,
            pin = %failure.pin.display(),
            error = format!("{:#}", anyhow::Error::from(failure.error)),
            "cannot switch this link to the loaded program; keeping it (it forwards with the program it \
             has) and retrying"
        );
        self.pending_links.push(PendingLink {
            program: failure.program,
            ifname: failure.ifname,
            pin: failure.pin,
        });
    }

    fn retry_pending_links(&mut self) {
        for link in std::mem::take(&mut self.pending_links) {
            match self.datapath.retry_link(link.program, &link.ifname, &link.pin) {
                Ok(LinkRetry::Updated) => {
                    tracing::info!(ifname = link.ifname, "link switched to the loaded program on retry")
                }
                Ok(LinkRetry::StaleRemoved) => {
                    tracing::info!(ifname = link.ifname, "removing the link pin of a gone interface")
                }
                Ok(LinkRetry::Gone) => {}
                Err(error) => {
                    self.errors.inc();
                    tracing::warn!(
                        ifname = link.ifname,
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "switching this link to the loaded program failed again; keeping it"
                    );
                    self.pending_links.push(link);
                }
            }
        }
    }

    /// [`Datapath::sweep_gone_interfaces`], logged; a failure is counted and
    /// left for the next sweep (the entries only waste space meanwhile).
    fn sweep_gone_interfaces(&mut self) {
        match self.datapath.sweep_gone_interfaces() {
            Ok(report) if report != SweepReport::default() => tracing::info!(
                interfaces = report.interfaces,
                endpoints = report.endpoints,
                "map entries of interfaces that no longer exist removed"
            ),
            Ok(_) => {}
            Err(e) => {
                self.errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "sweeping entries of interfaces that no longer exist failed"
                );
            }
        }
    }

    /// Program maps and routes from the peer list: only what differs changes.
    async fn apply_peers(&mut self, netlink: &rtnetlink::Handle) -> anyhow::Result<()> {
        let desired: Vec<RemoteRoute> = self
            .config
            .peers
            .iter()
            .map(|p| RemoteRoute { pod_cidr: p.pod_cidr, node_ip: p.node_ip })
            .collect();
        let maps = self.datapath.sync_remote_nodes(&desired)?;
        let routes_removed =
            node_net::sync_routes(netlink, &desired, self.route_via, self.config.node_ip).await?;
        tracing::info!(
            peers = desired.len(),
            added = maps.added,
            updated = maps.updated,
            removed = maps.removed,
            routes_removed,
            "peer nodes programmed"
        );
        Ok(())
    }

    /// Serve exactly the Services in `list` (only what differs is written).
    fn apply_services(&mut self, list: Vec<ServiceConfig>) -> anyhow::Result<()> {
        let count = list.len();
        let report = self.services.replace_all(&mut self.datapath, list)?;
        tracing::info!(
            services = count,
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            "Services programmed"
        );
        Ok(())
    }

    /// Apply what the Kubernetes watch sent, in order, as one sync: a whole
    /// list (a first sync or a relist) replaces everything, single changes
    /// touch only their own Service. Services not backed by pods only are
    /// left to kube-proxy ([`kubernetes_services::is_pod_backed`]).
    fn apply_service_updates(&mut self, updates: Vec<ServiceUpdate>) -> anyhow::Result<()> {
        let cluster_cidr = self.config.cluster_cidr;
        let ours =
            |c: Option<ServiceConfig>| c.filter(|c| kubernetes_services::is_pod_backed(c, cluster_cidr));
        let mut all: Option<BTreeMap<ServiceRef, ServiceConfig>> = None;
        let mut changed = BTreeMap::new();
        for update in updates {
            match update {
                ServiceUpdate::All(list) => {
                    all = Some(list.into_iter().map(|s| (ServiceRef::of(&s), s)).collect());
                    changed.clear();
                }
                ServiceUpdate::One(service, config) => {
                    changed.insert(service, ours(config));
                }
            }
        }
        let Some(mut all) = all else {
            let report = self.services.change(&mut self.datapath, changed)?;
            tracing::debug!(
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                "Service change programmed"
            );
            return Ok(());
        };
        for (service, config) in changed {
            match config {
                Some(config) => all.insert(service, config),
                None => all.remove(&service),
            };
        }
        self.apply_services(all.into_values().filter_map(|c| ours(Some(c))).collect())
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => {
                return match self.datapath.endpoints() {
                    Ok(endpoints) => Response::Status {
                        node_name: self.config.node_name.clone(),
                        pod_cidr: self.config.pod_cidr.to_string(),
                        endpoints: endpoints.len(),
                        pod_mtu: self.pod_mtu,
                        last_config_error: self.health.last_config_error(),
                    },
                    Err(e) => Response::Error { message: format!("{:#}", anyhow::Error::from(e)) },
                };
            }
            Request::AddEndpoint(spec) => self.add_endpoint(spec),
            Request::DelEndpoint(reference) => self.del_endpoint(reference),
            Request::CheckEndpoint(reference) => {
                return match self.check_endpoint(&reference) {
                    Ok(problems) => Response::Check { problems },
                    Err(e) => Response::Error { message: format!("{e:#}") },
                };
            }
            Request::ListEndpoints => {
                return match self.store.list() {
                    Ok(endpoints) => Response::Endpoints { endpoints },
                    Err(e) => Response::Error { message: format!("{:#}", anyhow::Error::from(e)) },
                };
            }
        };
        match result {
            Ok(()) => Response::Done,
            Err(e) => {
                self.errors.inc();
                tracing::warn!(error = format!("{e:#}"), "request refused");
                Response::Error { message: format!("{e:#}") }
            }
        }
    }

    fn add_endpoint(&mut self, spec: EndpointSpec) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.config.owns_pod_ip(spec.pod_ipv4),
            "pod address {} is outside this node's pod CIDR {}",
            spec.pod_ipv4,
            self.config.pod_cidr
        );
        let ifindex = nix::net::if_::if_nametoindex(spec.host_ifname.as_str())
            .with_context(|| format!("host veth {} not found", spec.host_ifname))?;
        anyhow::ensure!(
            ifindex == spec.host_ifindex,
            "host veth {} has ifindex {ifindex}, not {}",
            spec.host_ifname,
            spec.host_ifindex
        );
        let endpoint = LocalEndpoint {
            pod_ipv4: spec.pod_ipv4,
            pod_mac: spec.pod_mac,
            host_ifname: spec.host_ifname.clone(),
            host_ifindex: spec.host_ifindex,
            host_mac: spec.host_mac,
        };
        if let Err(e) = self.datapath.add_endpoint(&endpoint) {
            // Leave nothing half-made behind.
            let _ = self.datapath.remove_endpoint(
                &spec.host_ifname,
                Some(spec.host_ifindex),
                Some(spec.pod_ipv4),
            );
            return Err(e).context("programming the endpoint");
        }
        if let Err(e) = self.store.save(&spec) {
            let _ = self.datapath.remove_endpoint(
                &spec.host_ifname,
                Some(spec.host_ifindex),
                Some(spec.pod_ipv4),
            );
            return Err(e).context("recording the endpoint");
        }
        tracing::info!(
            container = spec.container_id,
            pod = format!("{}/{}", spec.pod_namespace.as_deref().unwrap_or("-"), spec.pod_name.as_deref().unwrap_or("-")),
            ip = %spec.pod_ipv4,
            veth = spec.host_ifname,
            "endpoint added"
        );
        Ok(())
    }

    /// Compare the datapath with the record: map entries, link, veth.
    fn check_endpoint(&self, reference: &EndpointRef) -> anyhow::Result<Vec<String>> {
        let mut problems = Vec::new();
        let Some(record) = self.store.get(&reference.host_ifname)? else {
            return Ok(vec![format!("the agent has no endpoint for veth {}", reference.host_ifname)]);
        };
        if record.container_id != reference.container_id {
            problems
                .push(format!("veth {} belongs to container {}", record.container_id, reference.host_ifname));
        }
        if let Some(ip) = reference.pod_ipv4
            && ip != record.pod_ipv4
        {
            problems.push(format!("prevResult says {ip}, the agent has {}", record.pod_ipv4));
        }
        match nix::net::if_::if_nametoindex(record.host_ifname.as_str()) {
            Ok(ifindex) if ifindex == record.host_ifindex => {}
            Ok(ifindex) => problems.push(format!(
                "veth {} is ifindex {ifindex}, recorded {}",
                record.host_ifname, record.host_ifindex
            )),
            Err(_) => problems.push(format!("host veth {} is missing", record.host_ifname)),
        }
        match self.datapath.endpoints()?.into_iter().find(|(ip, _)| *ip == record.pod_ipv4) {
            Some((_, ep)) if ep.host_ifindex == record.host_ifindex && ep.pod_mac == record.pod_mac.0 => {}
            Some(_) => problems.push(format!("endpoint map entry for {} points elsewhere", record.pod_ipv4)),
            None => problems.push(format!("no endpoint map entry for {}", record.pod_ipv4)),
        }
        if !self.datapath.pins().link(&record.host_ifname).exists() {
            problems.push(format!("no program link pinned for {}", record.host_ifname));
        }
        Ok(problems)
    }

    fn del_endpoint(&mut self, reference: EndpointRef) -> anyhow::Result<()> {
        // The record knows the IP and the veth's index even when the plugin
        // no longer does (the pod's namespace, and with it the veth, went
        // first). The recorded index counts only while no other interface
        // has taken it.
        let recorded = self.store.get(&reference.host_ifname)?;
        let pod_ipv4 = reference.pod_ipv4.or(recorded.as_ref().map(|r| r.pod_ipv4));
        let recorded_ifindex = match recorded.as_ref().map(|r| r.host_ifindex) {
            Some(ifindex) => match crate::bpf::interface_name(ifindex)? {
                Some(name) if name != reference.host_ifname => None,
                _ => Some(ifindex),
            },
            None => None,
        };
        let host_ifindex = reference.host_ifindex.or(recorded_ifindex);
        let mut removed = self
            .datapath
            .remove_endpoint(&reference.host_ifname, host_ifindex, pod_ipv4)
            .context("removing the endpoint")?;
        if self.store.remove(&reference.host_ifname)? {
            removed += 1;
        }
        tracing::info!(
            container = reference.container_id,
            veth = reference.host_ifname,
            removed,
            "endpoint deleted"
        );
        // A DEL is when a pod's veth may have gone without one (a runtime
        // that lost the container): forget whatever such a veth left.
        self.sweep_gone_interfaces();
        Ok(())
    }
}

/// What [`Agent::reconcile_records`] did.
#[derive(Debug, Default)]
struct RecordsReport {
    /// Records whose veth is gone, removed.
    stale: usize,
    /// Live endpoints that got back map entries or a link.
    restored: usize,
}

/// The record's veth exists, with the recorded index.
fn veth_alive(record: &EndpointSpec) -> bool {
    nix::net::if_::if_nametoindex(record.host_ifname.as_str()).ok() == Some(record.host_ifindex)
}

fn routing_mode(mode: Mode) -> u32 {
    match mode {
        Mode::Native => RoutingMode::Native as u32,
        Mode::Vxlan => RoutingMode::Vxlan as u32,
    }
}

/// Forward tracing is on only while a `monitor` runs: when no monitor
/// holds its lock, a `trace_forwards` still set was left by one that was
/// killed; switch it off (the programs would otherwise pay for it forever).
/// Returns whether it did.
fn switch_off_abandoned_forward_tracing(datapath: &mut Datapath) -> anyhow::Result<bool> {
    let _no_monitor = match MonitorLock::try_acquire(datapath.pins()) {
        Ok(lock) => lock,
        Err(MonitorLockError::Held { .. }) => return Ok(false),
        Err(e) => return Err(e).context("looking for a running monitor"),
    };
    let config = datapath.monitor_config().context("reading the monitor config map")?;
    if config.trace_forwards == 0 {
        return Ok(false);
    }
    datapath
        .set_monitor_config(MonitorConfig { trace_forwards: 0, ..config })
        .context("writing the monitor config map")?;
    tracing::warn!("forward tracing was left on by a monitor that is gone (killed?); switched off");
    Ok(true)
}
