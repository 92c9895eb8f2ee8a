//! `datapath-agent monitor`: stream the programs' verdicts from the pinned
//! ring buffer. Drops are always reported; `--forwards` also asks the programs
//! for every forwarding decision while the monitor runs. Each CPU emits at
//! most `monitor_events_per_second` events (agent config); what was rate
//! limited or lost to a full ring buffer is counted and shown at the end.
//! Works with the agent down. One monitor at a time (a ring buffer has one
//! reader): a second is refused ([`crate::observe::monitor_lock`]). Forward tracing
//! is switched off again however the monitor ends (count, time, SIGINT,
//! SIGTERM, SIGHUP, a reader that went away); after a SIGKILL, by the next
//! monitor or the agent.

use std::{
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
    observe::monitor_lock::MonitorLock,
    source::config::DEFAULT_BPFFS_DIR,
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
    /// bpffs directory the agent pins under.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
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
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    let pins = PinLayout::new(&args.bpffs_dir);
    let mut maps = PinnedMonitor::open(&pins).with_context(|| {
        format!("opening the monitor's maps under {} (has the agent ever run?)", args.bpffs_dir.display())
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
        args.bpffs_dir.display(),
        if args.forwards { "drops and forwards" } else { "drops" }
    );
    if leftover && !args.forwards {
        eprintln!("forward tracing was left on by a monitor that was killed; switched off");
    }
    let clock = Clock::now();
    let mut shown = 0u64;
    let mut skipped = 0u64;
    let mut out = std::io::stdout().lock();
    let result = (|| -> anyhow::Result<()> {
        let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
        loop {
            while let Some(event) = maps.next_event() {
                let event = event?;
                if !args.backlog && event.timestamp_ns < start_ns {
                    skipped += 1;
                    continue;
                }
                let view = view(&event, &clock);
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
    }
}

impl EventView {
    pub fn line(&self) -> String {
        format!(
            "{} {:<16} {:<12} {:<5} {:>21} -> {:<21} {:<9} {} ({} bytes)",
            self.time,
            self.interface,
            self.direction,
            self.protocol,
            self.source,
            self.destination,
            self.verdict,
            self.reason,
            self.length
        )
    }
}
