//! Prometheus metrics (`prometheus-client`), read from the pinned maps at
//! scrape time: the maps are the counters, so nothing is copied or lost
//! across agent restarts, and a scrape costs a handful of map reads.
//!
//! Every series of ours starts with `pod_datapath_` (the project's name,
//! "eBPF pod datapath"; plain `datapath_` is taken by too many exporters).
//! The names are a stable interface: dashboards and alerts are built on
//! them; renaming one is a breaking change, noted in docs/upgrade.md.
//!
//! pod_datapath_build_info{version,commit,profile}  1, naming the agent's build
//! pod_datapath_drops_total{direction,reason}  packets dropped, by program and named reason
//!                                   (the pairs a program may drop for, from 0; any other once counted)
//! pod_datapath_policy_verdicts_total{direction,verdict}  new connections NetworkPolicy allowed or denied
//! pod_datapath_drop_bytes_total{direction,reason}  their bytes (frames as they came), same series
//! pod_datapath_forwards_total{direction,path} packets forwarded, by program and path
//! pod_datapath_forward_bytes_total{direction,path}  their bytes
//! pod_datapath_monitor_events_total{outcome}  monitor events emitted, rate limited, lost
//! pod_datapath_endpoints                local pod endpoints
//! pod_datapath_remote_nodes             peer pod CIDRs programmed
//! pod_datapath_services                 Service ports programmed
//! pod_datapath_conntrack_entries        connection-tracking entries (two per connection), at the last sweep
//! pod_datapath_conntrack_gc_removed_total  entries the agent's collector removed
//! pod_datapath_map_entries{map}         fill level of the sized maps ...
//! pod_datapath_map_capacity{map}        ... and their capacity
//! pod_datapath_agent_errors_total       failed reconciliations and refused requests
//! pod_datapath_config_edits_rejected_total{reason}  config file edits not applied (invalid, needs_restart)
//! pod_datapath_kubernetes_watch_errors_total{watch}  errors of each Kubernetes watch (each one restarts it
//!                                   after a backoff), from 0 once the watch ran
//! process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
//! process_open_fds, process_max_fds, process_start_time_seconds  the agent process, as every
//!                                   Prometheus client library names them (unprefixed, so the
//!                                   usual dashboards and alerts work)
//!
//! Served as OpenMetrics to a scraper that asks for it (Prometheus does),
//! else in the Prometheus text format (`exposition.rs`).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use datapath_common::{Direction, DropReason, MAX_LOCAL_ENDPOINTS, MAX_REMOTE_NODES, MAX_SERVICES};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use crate::{
    bpf::{GcReport, PinLayout, PinnedMaps},
    observe::health::Health,
};

/// Errors the agent hit (peer sync, refused CNI requests), for alerting.
#[derive(Debug, Default)]
pub struct AgentErrors(AtomicU64);

impl AgentErrors {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the agent's connection-tracking collector saw. Counting a large
/// map at every scrape would cost a syscall per entry; the collector walks
/// it every few seconds anyway.
#[derive(Debug, Default)]
pub struct ConntrackStats {
    /// Entries at the last sweep; absent before the first one.
    entries: std::sync::Mutex<Option<u64>>,
    gc_removed: AtomicU64,
    /// When the last sweep ended, and its error if it failed.
    last_sweep: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl ConntrackStats {
    pub fn record_sweep(&self, report: &GcReport) {
        self.gc_removed.fetch_add(report.removed as u64, Ordering::Relaxed);
        if let Ok(mut entries) = self.entries.lock() {
            *entries = Some(report.remaining as u64);
        }
        if let Ok(mut last) = self.last_sweep.lock() {
            *last = Some((std::time::Instant::now(), None));
        }
    }

    pub fn record_failed_sweep(&self, error: String) {
        if let Ok(mut last) = self.last_sweep.lock() {
            *last = Some((std::time::Instant::now(), Some(error)));
        }
    }

    /// Entries at the last sweep (none before the first).
    pub fn entries(&self) -> Option<u64> {
        self.entries.lock().ok().and_then(|e| *e)
    }

    /// How long ago the last sweep ended, and its error if it failed.
    pub fn last_sweep(&self) -> Option<(std::time::Duration, Option<String>)> {
        let last = self.last_sweep.lock().ok()?.clone()?;
        Some((last.0.elapsed(), last.1))
    }
}

#[derive(Debug)]
struct DatapathCollector {
    pins: PinLayout,
    errors: Arc<AgentErrors>,
    conntrack: Arc<ConntrackStats>,
    health: Arc<Health>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(
            "pod_datapath_build",
            "The agent's build: version, git commit, profile",
            None,
            MetricType::Info,
        )?;
        use datapath_api::build_info::{GIT_COMMIT, PROFILE, VERSION};
        Info::new(vec![("version", VERSION), ("commit", GIT_COMMIT), ("profile", PROFILE)]).encode(metric)?;
        let mut metric = encoder.encode_descriptor(
            "pod_datapath_config_edits_rejected",
            "Edits of the config file not applied: invalid (nothing applied) or needs_restart (a \
             restart-only field changed)",
            None,
            MetricType::Counter,
        )?;
        for (why, n) in self.health.config_rejections() {
            ConstCounter::new(n).encode(metric.encode_family(&vec![("reason", why.name())])?)?;
        }
        let watch_errors = self.health.watch_errors();
        if !watch_errors.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "pod_datapath_kubernetes_watch_errors",
                "Errors of each Kubernetes watch (Node, Service, EndpointSlice, NetworkPolicy, Namespace, \
                 Pod); each restarts the watch after a backoff",
                None,
                MetricType::Counter,
            )?;
            for (watch, n) in watch_errors {
                ConstCounter::new(n).encode(metric.encode_family(&vec![("watch", watch)])?)?;
            }
        }
        encode_process(&mut encoder)?;
        let errors = self.errors.0.load(Ordering::Relaxed);
        let metric = encoder.encode_descriptor(
            "pod_datapath_agent_errors",
            "Failed reconciliations and refused requests",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(errors).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "pod_datapath_conntrack_gc_removed",
            "Connection-tracking entries the agent removed (idle or closed connections; two per connection)",
            None,
            MetricType::Counter,
        )?;
        let removed = self.conntrack.gc_removed.load(Ordering::Relaxed);
        ConstCounter::new(removed).encode(metric)?;
        let conntrack_entries = self.conntrack.entries();
        if let Some(entries) = conntrack_entries {
            let metric = encoder.encode_descriptor(
                "pod_datapath_conntrack_entries",
                "Connection-tracking entries (two per Service connection), at the agent's last sweep",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(entries as i64).encode(metric)?;
        }

        // The maps may be unreadable for a moment at start; then say nothing.
        let Ok(maps) = PinnedMaps::open(&self.pins) else { return Ok(()) };
        if let Ok(counters) = maps.counters() {
            // Packets and bytes: the same series (labels) each.
            let drops = [
                (
                    "pod_datapath_drops",
                    "Packets dropped by the datapath, by reason (see docs/why-dropped.md)",
                    &counters.drops_by_direction,
                ),
                (
                    "pod_datapath_drop_bytes",
                    "Bytes of the packets dropped by the datapath (frames as they came), by reason",
                    &counters.drop_bytes_by_direction,
                ),
            ];
            for (name, help, by_direction) in drops {
                let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for direction in Direction::ALL {
                    let drops = by_direction.get(direction.name());
                    for reason in DropReason::ALL {
                        let n = drops.and_then(|d| d.get(reason.name())).copied().unwrap_or(0);
                        // A pair no program drops for stays out until counted.
                        let packets = counters
                            .drops_by_direction
                            .get(direction.name())
                            .and_then(|d| d.get(reason.name()));
                        if packets.is_none_or(|p| *p == 0) && !reason.directions().contains(&direction) {
                            continue;
                        }
                        let labels = vec![("direction", direction.name()), ("reason", reason.name())];
                        ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
            let forwards = [
                ("pod_datapath_forwards", "Packets forwarded, by path", &counters.forwards_by_direction),
                (
                    "pod_datapath_forward_bytes",
                    "Bytes of the packets forwarded (frames as they came), by path",
                    &counters.forward_bytes_by_direction,
                ),
            ];
            for (name, help, by_direction) in forwards {
                let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (direction, forwards) in by_direction {
                    for (path, n) in forwards {
                        let labels = vec![("direction", *direction), ("path", *path)];
                        ConstCounter::new(*n).encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
            let mut metric = encoder.encode_descriptor(
                "pod_datapath_monitor_events",
                "Monitor events: emitted, rate_limited (over the per-CPU budget), ring_full (lost)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in &counters.monitor_events {
                ConstCounter::new(*n).encode(metric.encode_family(&vec![("outcome", *outcome)])?)?;
            }
        }
        if let Ok(verdicts) = maps.policy_verdicts() {
            let mut metric = encoder.encode_descriptor(
                "pod_datapath_policy_verdicts",
                "New connections of isolated pods judged by NetworkPolicy, by direction and verdict",
                None,
                MetricType::Counter,
            )?;
            for (direction, verdict, n) in verdicts {
                let labels = vec![("direction", direction), ("verdict", verdict)];
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        let endpoints = maps.endpoints().map(|e| e.len() as i64).unwrap_or(0);
        let remote = maps.remote_routes().map(|r| r.len() as i64).unwrap_or(0);
        let metric = encoder.encode_descriptor(
            "pod_datapath_endpoints",
            "Local pod endpoints",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(endpoints).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "pod_datapath_remote_nodes",
            "Peer pod CIDRs programmed",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(remote).encode(metric)?;
        // Absent on maps pinned by an agent without Services: say nothing.
        let services = maps.service_count().ok().map(|n| n as i64);
        if let Some(services) = services {
            let metric = encoder.encode_descriptor(
                "pod_datapath_services",
                "Service ports programmed (cluster IP, port, protocol)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(services).encode(metric)?;
        }
        let mut metric = encoder.encode_descriptor(
            "pod_datapath_map_entries",
            "Entries in the sized maps",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(endpoints).encode(metric.encode_family(&vec![("map", "endpoints")])?)?;
        ConstGauge::new(remote).encode(metric.encode_family(&vec![("map", "remote_nodes")])?)?;
        if let Some(services) = services {
            ConstGauge::new(services).encode(metric.encode_family(&vec![("map", "services")])?)?;
        }
        if let Some(entries) = conntrack_entries {
            ConstGauge::new(entries as i64).encode(metric.encode_family(&vec![("map", "conntrack")])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "pod_datapath_map_capacity",
            "Capacity of the sized maps",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(MAX_LOCAL_ENDPOINTS))
            .encode(metric.encode_family(&vec![("map", "endpoints")])?)?;
        ConstGauge::new(i64::from(MAX_REMOTE_NODES))
            .encode(metric.encode_family(&vec![("map", "remote_nodes")])?)?;
        if services.is_some() {
            ConstGauge::new(i64::from(MAX_SERVICES))
                .encode(metric.encode_family(&vec![("map", "services")])?)?;
        }
        if let Ok(capacity) = maps.conntrack_capacity() {
            ConstGauge::new(i64::from(capacity))
                .encode(metric.encode_family(&vec![("map", "conntrack")])?)?;
        }
        Ok(())
    }
}

/// The agent process's own metrics, under the names every Prometheus
/// client library gives them. A /proc read that fails leaves its series
/// out (nothing is made up).
fn encode_process(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: N,
    ) -> Result<(), std::fmt::Error>
    where
        ConstGauge<N>: prometheus_client::encoding::EncodeMetric,
    {
        ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
    }
    let Ok(me) = procfs::process::Process::myself() else { return Ok(()) };
    let ticks = procfs::ticks_per_second().max(1) as f64;
    if let Ok(stat) = me.stat() {
        let rss = stat.rss.saturating_mul(procfs::page_size());
        gauge(encoder, "process_resident_memory_bytes", "Resident memory size in bytes", rss as i64)?;
        gauge(encoder, "process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize as i64)?;
        if let Ok(boot) = procfs::boot_time_secs() {
            let start = boot as f64 + stat.starttime as f64 / ticks;
            let help = "Start time of the process since the Unix epoch in seconds";
            gauge(encoder, "process_start_time_seconds", help, start)?;
        }
        let metric = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new((stat.utime + stat.stime) as f64 / ticks).encode(metric)?;
    }
    if let Ok(open) = me.fd_count() {
        gauge(encoder, "process_open_fds", "Number of open file descriptors", open as i64)?;
    }
    if let Ok(limits) = me.limits()
        && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
    {
        gauge(encoder, "process_max_fds", "Maximum number of open file descriptors", max as i64)?;
    }
    Ok(())
}

/// The registry the /metrics endpoint serves.
pub fn registry(
    pins: PinLayout,
    errors: Arc<AgentErrors>,
    conntrack: Arc<ConntrackStats>,
    health: Arc<Health>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DatapathCollector { pins, errors, conntrack, health }));
    registry
}
