//! Prometheus metrics (`prometheus-client`), read from the pinned maps at
//! scrape time: the maps are the counters, so nothing is copied or lost
//! across agent restarts, and a scrape costs a handful of map reads.
//!
//! datapath_drops_total{direction,reason}  packets dropped, by program and named reason
//! datapath_forwards_total{direction,path} packets forwarded, by program and path
//! datapath_monitor_events_total{outcome}  monitor events emitted, rate limited, lost
//! datapath_endpoints                local pod endpoints
//! datapath_remote_nodes             peer pod CIDRs programmed
//! datapath_map_entries{map}         fill level of the sized maps ...
//! datapath_map_capacity{map}        ... and their capacity
//! datapath_agent_errors_total       failed reconciliations and refused requests

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use datapath_common::{MAX_LOCAL_ENDPOINTS, MAX_REMOTE_NODES};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::datapath::{PinLayout, PinnedMaps};

/// Errors the agent hit (peer sync, refused CNI requests), for alerting.
#[derive(Debug, Default)]
pub struct AgentErrors(AtomicU64);

impl AgentErrors {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct DatapathCollector {
    pins: PinLayout,
    errors: Arc<AgentErrors>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let errors = self.errors.0.load(Ordering::Relaxed);
        let mut metric = encoder.encode_descriptor(
            "datapath_agent_errors",
            "Failed reconciliations and refused requests",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(errors).encode(metric.encode_family(&Vec::<(String, String)>::new())?)?;

        // The maps may be unreadable for a moment at start; then say nothing.
        let Ok(maps) = PinnedMaps::open(&self.pins) else { return Ok(()) };
        if let Ok(counters) = maps.counters() {
            let mut metric = encoder.encode_descriptor(
                "datapath_drops",
                "Packets dropped by the datapath, by reason (see docs/why-dropped.md)",
                None,
                MetricType::Counter,
            )?;
            for (direction, drops) in &counters.drops_by_direction {
                for (reason, n) in drops {
                    let labels = vec![("direction", *direction), ("reason", *reason)];
                    ConstCounter::new(*n).encode(metric.encode_family(&labels)?)?;
                }
            }
            let mut metric = encoder.encode_descriptor(
                "datapath_forwards",
                "Packets forwarded, by path",
                None,
                MetricType::Counter,
            )?;
            for (direction, forwards) in &counters.forwards_by_direction {
                for (path, n) in forwards {
                    let labels = vec![("direction", *direction), ("path", *path)];
                    ConstCounter::new(*n).encode(metric.encode_family(&labels)?)?;
                }
            }
            let mut metric = encoder.encode_descriptor(
                "datapath_monitor_events",
                "Monitor events: emitted, rate_limited (over the per-CPU budget), ring_full (lost)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in &counters.monitor_events {
                ConstCounter::new(*n).encode(metric.encode_family(&vec![("outcome", *outcome)])?)?;
            }
        }
        let endpoints = maps.endpoints().map(|e| e.len() as i64).unwrap_or(0);
        let remote = maps.remote_routes().map(|r| r.len() as i64).unwrap_or(0);
        let metric = encoder.encode_descriptor(
            "datapath_endpoints",
            "Local pod endpoints",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(endpoints).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "datapath_remote_nodes",
            "Peer pod CIDRs programmed",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(remote).encode(metric)?;
        let mut metric = encoder.encode_descriptor(
            "datapath_map_entries",
            "Entries in the sized maps",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(endpoints).encode(metric.encode_family(&vec![("map", "endpoints")])?)?;
        ConstGauge::new(remote).encode(metric.encode_family(&vec![("map", "remote_nodes")])?)?;
        let mut metric = encoder.encode_descriptor(
            "datapath_map_capacity",
            "Capacity of the sized maps",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(MAX_LOCAL_ENDPOINTS))
            .encode(metric.encode_family(&vec![("map", "endpoints")])?)?;
        ConstGauge::new(i64::from(MAX_REMOTE_NODES))
            .encode(metric.encode_family(&vec![("map", "remote_nodes")])?)?;
        Ok(())
    }
}

/// The registry the /metrics endpoint serves.
pub fn registry(pins: PinLayout, errors: Arc<AgentErrors>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DatapathCollector { pins, errors }));
    registry
}
