//! `datapath-agent monitor`: stream the programs' verdicts from the pinned
//! ring buffer. Drops are always reported; `--forwards` also asks the programs
//! for every forwarding decision while the monitor runs. Each CPU emits at
//! most `monitor_events_per_second` events (agent config); what was rate
//! limited or lost to a full ring buffer is counted and shown at the end.
//! Works with the agent down. One monitor at a time (a ring buffer has one
//! reader): a second is refused ([`crate::observe::monitor_lock`]). Forward tracing
//! is switched off again however the monitor ends (count, time, SIGINT,
//! SIGTERM, SIGHUP, a reader that went away); after a SIGKILL, by the next
//! monitor or the agent. `--pod` and `--reason` keep the events of one pod
//! (by name or address) and one drop reason or forward path; each event
//! names the local pod it concerns (from the agent's endpoint records).

use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datapath_common::{
    Direction, DropReason, ETH_P_ARP, ETH_P_IP, EVENT_DROP, EVENT_FORWARD, ForwardPath, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP, MonitorEvent,
};

use crate::{
    bpf::{PinLayout, PinnedMaps, PinnedMonitor},
    host::state::EndpointStore,
    observe::monitor_lock::MonitorLock,
};

#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// Also show every forwarding decision, not only drops (costs a ring
    /// buffer write per packet while the monitor runs, within the rate limit).
    #[arg(long)]
    pub forwards: bool,
    /// Also show events queued before the monitor started.
    #[arg(long)]
    pub backlog: bool,
    /// Print one JSON object per event.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Only the events of this local pod: its name (`name` or
    /// `namespace/name`) or its address; what it sends, what is sent to it.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only the events of this drop reason (docs/why-dropped.md) or, with
    /// `--forwards`, forward path.
    #[arg(long)]
    pub reason: Option<String>,
    /// The agent's configuration file: its `bpffs_dir` and `state_dir` are
    /// read from it (the flags below win).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// bpffs directory the agent pins under [default: from --config, else /sys/fs/bpf/datapath].
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// The agent's state directory, for pod names [default: from --config,
    /// else /var/lib/datapath].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// The local pods, from the agent's endpoint records: to name the pod an
/// event concerns, and to keep one pod's events.
#[derive(Debug, Default)]
struct LocalPods {
    /// Host veth index -> pod name.
    by_ifindex: HashMap<u32, String>,
    by_ip: HashMap<Ipv4Addr, String>,
}

impl LocalPods {
    fn load(state_dir: &std::path::Path) -> Self {
        let mut pods = Self::default();
        for record in EndpointStore::open(state_dir).and_then(|s| s.list()).unwrap_or_default() {
            let name = match (&record.pod_namespace, &record.pod_name) {
                (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
                (None, Some(name)) => name.clone(),
                _ => format!("container {}", &record.container_id[..record.container_id.len().min(12)]),
            };
            pods.by_ifindex.insert(record.host_ifindex, name.clone());
            pods.by_ip.insert(record.pod_ipv4, name);
        }
        pods
    }

    /// The pod an event concerns: the one whose veth it passed, else the
    /// local pod it was sent to, else the one that sent it.
    fn of(&self, event: &MonitorEvent) -> Option<&String> {
        self.by_ifindex
            .get(&event.ifindex)
            .or_else(|| self.by_ip.get(&Ipv4Addr::from(event.daddr)))
            .or_else(|| self.by_ip.get(&Ipv4Addr::from(event.saddr)))
    }

    /// The addresses and veths of the pods `--pod` names.
    fn select(&self, pod: &str) -> anyhow::Result<PodFilter> {
        if let Ok(ip) = pod.parse::<Ipv4Addr>() {
            let ifindexes = self.by_ifindex.iter().filter(|(_, n)| self.by_ip.get(&ip) == Some(*n));
            return Ok(PodFilter {
                ips: BTreeSet::from([ip]),
                ifindexes: ifindexes.map(|(i, _)| *i).collect(),
            });
        }
        let named = |name: &String| name == pod || name.rsplit_once('/').is_some_and(|(_, n)| n == pod);
        let filter = PodFilter {
            ips: self.by_ip.iter().filter(|(_, n)| named(n)).map(|(ip, _)| *ip).collect(),
            ifindexes: self.by_ifindex.iter().filter(|(_, n)| named(n)).map(|(i, _)| *i).collect(),
        };
        anyhow::ensure!(
            !filter.ips.is_empty(),
            "no pod {pod:?} on this node (`datapath-agent inspect endpoints` lists them; --state-dir or \
             --config says where the agent keeps their names)"
        );
        Ok(filter)
    }
}

/// The events `--pod` keeps: to or from these addresses, or through these veths.
#[derive(Debug)]
struct PodFilter {
    ips: BTreeSet<Ipv4Addr>,
    ifindexes: BTreeSet<u32>,
}

impl PodFilter {
    fn keeps(&self, event: &MonitorEvent) -> bool {
        self.ifindexes.contains(&event.ifindex)
            || self.ips.contains(&Ipv4Addr::from(event.saddr))
            || self.ips.contains(&Ipv4Addr::from(event.daddr))
    }
}

/// `--reason` checked against the names the programs count under.
fn check_reason(reason: &str, forwards: bool) -> anyhow::Result<()> {
    if DropReason::ALL.iter().any(|r| r.name() == reason) {
        return Ok(());
    }
    if ForwardPath::ALL.iter().any(|p| p.name() == reason) {
        anyhow::ensure!(forwards, "{reason:?} is a forward path: add --forwards to see forwarding decisions");
        return Ok(());
    }
    let drops: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
    let paths: Vec<&str> = ForwardPath::ALL.iter().map(|p| p.name()).collect();
    anyhow::bail!(
        "no drop reason or forward path {reason:?}; drop reasons: {}; forward paths: {}",
        drops.join(", "),
        paths.join(", ")
    )
}

/// One event as the monitor prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventView {
    pub time: String,
    pub interface: String,
    pub direction: &'static str,
    pub verdict: &'static str,
    /// The drop reason or the forward path.
    pub reason: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub length: u32,
    /// The local pod the event concerns ("namespace/name"), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    let settings = super::agent_settings(args.config.as_deref())?;
    let bpffs_dir = args.bpffs_dir.clone().unwrap_or(settings.bpffs_dir);
    let state_dir = args.state_dir.clone().unwrap_or(settings.state_dir);
    if let Some(reason) = &args.reason {
        check_reason(reason, args.forwards)?;
    }
    let mut pods = LocalPods::load(&state_dir);
    let pod_filter = args.pod.as_deref().map(|pod| pods.select(pod)).transpose()?;
    let pins = PinLayout::new(&bpffs_dir);
    let mut maps = PinnedMonitor::open(&pins).with_context(|| {
        format!("opening the monitor's maps under {} (has the agent ever run?)", bpffs_dir.display())
    })?;
    let counters_at_start = PinnedMaps::open(&pins)?.counters()?.monitor_events;
    let _one_monitor = MonitorLock::acquire(&pins)?;

    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
    // No other monitor runs (we hold the lock): forward tracing on now was
    // left on by one that was killed. Without a monitor it is off.
    let leftover = maps.set_trace_forwards(args.forwards)?;
    let started = Instant::now();
    let start_ns = monotonic_ns();
    eprintln!(
        "monitoring {} ({}); Ctrl-C to stop",
        bpffs_dir.display(),
        if args.forwards { "drops and forwards" } else { "drops" }
    );
    if leftover && !args.forwards {
        eprintln!("forward tracing was left on by a monitor that was killed; switched off");
    }
    let clock = Clock::now();
    let mut shown = 0u64;
    let mut skipped = 0u64;
    let mut out = std::io::stdout().lock();
    let mut pods_reloaded = Instant::now();
    let result = (|| -> anyhow::Result<()> {
        let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
        loop {
            while let Some(event) = maps.next_event() {
                let event = event?;
                if !args.backlog && event.timestamp_ns < start_ns {
                    skipped += 1;
                    continue;
                }
                if pod_filter.as_ref().is_some_and(|f| !f.keeps(&event)) {
                    continue;
                }
                // A pod added since the monitor started: read the records again.
                if pods.of(&event).is_none() && pods_reloaded.elapsed() >= Duration::from_secs(1) {
                    pods = LocalPods::load(&state_dir);
                    pods_reloaded = Instant::now();
                }
                let mut view = view(&event, &clock);
                if args.reason.as_deref().is_some_and(|r| r != view.reason) {
                    continue;
                }
                view.pod = pods.of(&event).cloned();
                let written = if args.json {
                    writeln!(out, "{}", serde_json::to_string(&view)?)
                } else {
                    writeln!(out, "{}", view.line())
                };
                match written {
                    Ok(()) => {}
                    // The reader went away (`monitor | head -1`): done.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(e).context("writing an event"),
                }
                shown += 1;
                if args.count.is_some_and(|n| shown >= n) {
                    return Ok(());
                }
            }
            if STOP.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            maps.wait(Duration::from_millis(100));
        }
    })();
    // Off again, so the datapath stops paying for it (with the lock held
    // nobody else switched it on meanwhile).
    maps.set_trace_forwards(false)?;
    let counters_now = PinnedMaps::open(&pins)?.counters()?.monitor_events;
    let delta = |name: &str| {
        counters_now.get(name).copied().unwrap_or(0) - counters_at_start.get(name).copied().unwrap_or(0)
    };
    eprintln!(
        "{shown} events shown in {:.1}s; meanwhile {} rate limited, {} lost to a full ring buffer{}",
        started.elapsed().as_secs_f64(),
        delta("rate_limited"),
        delta("ring_full"),
        if skipped > 0 {
            format!(", {skipped} queued from before skipped (--backlog shows them)")
        } else {
            String::new()
        }
    );
    result
}

fn monotonic_ns() -> u64 {
    crate::bpf::ebpf::monotonic_now_ns().unwrap_or(0)
}

/// Converts the programs' monotonic timestamps to wall-clock time.
struct Clock {
    wall: jiff::Timestamp,
    monotonic_ns: u64,
}

impl Clock {
    fn now() -> Self {
        Self { wall: jiff::Timestamp::now(), monotonic_ns: monotonic_ns() }
    }

    fn wall_time(&self, monotonic_ns: u64) -> jiff::Timestamp {
        let offset = monotonic_ns as i128 - self.monotonic_ns as i128;
        let offset =
            jiff::SignedDuration::from_nanos(offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
        self.wall.checked_add(offset).unwrap_or(self.wall)
    }
}

fn view(event: &MonitorEvent, clock: &Clock) -> EventView {
    let direction = Direction::from_u32(u32::from(event.direction)).map_or("unknown", Direction::name);
    let (verdict, reason) = match event.kind {
        EVENT_DROP => {
            ("dropped", DropReason::from_u32(u32::from(event.code)).map_or("unknown", DropReason::name))
        }
        EVENT_FORWARD => {
            ("forwarded", ForwardPath::from_u32(u32::from(event.code)).map_or("unknown", ForwardPath::name))
        }
        _ => ("unknown", "unknown"),
    };
    let ethertype = u16::from_be_bytes(event.ethertype);
    let ports = matches!(event.protocol, IPPROTO_TCP | IPPROTO_UDP);
    let endpoint = |addr: [u8; 4], port: [u8; 2]| {
        let addr = Ipv4Addr::from(addr);
        if ports { format!("{addr}:{}", u16::from_be_bytes(port)) } else { addr.to_string() }
    };
    let (protocol, source, destination) = match ethertype {
        ETH_P_IP => (
            match event.protocol {
                IPPROTO_ICMP => "icmp".to_owned(),
                IPPROTO_TCP => "tcp".to_owned(),
                IPPROTO_UDP => "udp".to_owned(),
                n => format!("ip-proto-{n}"),
            },
            endpoint(event.saddr, event.sport),
            endpoint(event.daddr, event.dport),
        ),
        ETH_P_ARP => ("arp".to_owned(), "-".to_owned(), "-".to_owned()),
        0 => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        other => (format!("ethertype-0x{other:04x}"), "-".to_owned(), "-".to_owned()),
    };
    EventView {
        time: format!("{:.6}", clock.wall_time(event.timestamp_ns)),
        interface: nix::net::if_::if_indextoname(event.ifindex)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("if{}", event.ifindex)),
        direction,
        verdict,
        reason,
        protocol,
        source,
        destination,
        length: event.packet_len,
        pod: None,
    }
}

impl EventView {
    pub fn line(&self) -> String {
        format!(
            "{} {:<16} {:<12} {:<5} {:>21} -> {:<21} {:<9} {} ({} bytes){}",
            self.time,
            self.interface,
            self.direction,
            self.protocol,
            self.source,
            self.destination,
            self.verdict,
            self.reason,
            self.length,
            self.pod.as_ref().map(|pod| format!(" pod {pod}")).unwrap_or_default()
        )
    }
}
