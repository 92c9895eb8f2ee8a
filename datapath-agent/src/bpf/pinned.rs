//! The one read-only view of the pinned maps, for `inspect`, `monitor`
//! and the metrics (works with the agent down).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData, MapInfo};
use datapath_common::{
    ConntrackEntry, ConntrackKey, Endpoint, EndpointTraffic, ModeMismatch, NodeConfig, NodeKey,
    POLICY_EGRESS, POLICY_INGRESS, Service, ServiceKey, map_names, policy_verdict_slot,
};

use crate::{
    bpf::{
        Counters, DatapathError, PinLayout, ProgrammedService,
        conntrack::read_conntrack,
        endpoints::{read_endpoints, read_traffic},
        node_config::read_entry,
        open_pinned,
        peers::read_remote_routes,
        services::read_services,
    },
    model::RemoteRoute,
};

/// Read-only view of the pinned maps, for `inspect` (works with the agent down).
pub struct PinnedMaps {
    pins: PinLayout,
    node_config: Map,
    remote_nodes: Map,
    endpoints: Map,
    drops: Map,
    forwards: Map,
    traffic: Map,
    monitor_counters: Map,
}

impl PinnedMaps {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let open = |name| open_pinned(pins, name);
        Ok(Self {
            pins: pins.clone(),
            node_config: open(map_names::NODE_CONFIG)?,
            remote_nodes: open(map_names::REMOTE_NODES)?,
            endpoints: open(map_names::ENDPOINTS)?,
            drops: open(map_names::DROP_COUNTERS)?,
            forwards: open(map_names::FORWARD_COUNTERS)?,
            traffic: open(map_names::ENDPOINT_TRAFFIC)?,
            monitor_counters: open(map_names::MONITOR_COUNTERS)?,
        })
    }

    // The Service maps are opened when asked for, so that the other views
    // keep working on maps pinned by an agent that predates them.

    /// Every Service port with its backends, by key.
    pub fn services(&self) -> Result<Vec<ProgrammedService>, DatapathError> {
        read_services(
            &open_pinned(&self.pins, map_names::SERVICES)?,
            &open_pinned(&self.pins, map_names::SERVICE_BACKENDS)?,
        )
    }

    /// Service ports programmed (entries of SERVICES).
    pub fn service_count(&self) -> Result<usize, DatapathError> {
        let name = map_names::SERVICES;
        let map = open_pinned(&self.pins, name)?;
        let services: HashMap<&MapData, ServiceKey, Service> =
            HashMap::try_from(&map).map_err(DatapathError::map(name))?;
        services.keys().try_fold(0, |n, key| key.map(|_| n + 1)).map_err(DatapathError::map(name))
    }

    /// Every connection-tracking entry, by key.
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, DatapathError> {
        read_conntrack(&open_pinned(&self.pins, map_names::CONNTRACK)?)
    }

    /// The NetworkPolicy maps' content.
    pub fn policy(&self) -> Result<crate::bpf::policy::PolicyMaps, DatapathError> {
        crate::bpf::policy::read_policy_maps(
            &open_pinned(&self.pins, map_names::POLICY_ENDPOINTS)?,
            &open_pinned(&self.pins, map_names::POLICY_PEERS)?,
            &open_pinned(&self.pins, map_names::POLICY_RULES)?,
        )
    }

    /// New connections judged by policy, summed over CPUs: (direction,
    /// verdict, count), direction "ingress" or "egress", verdict "allowed"
    /// or "denied".
    pub fn policy_verdicts(&self) -> Result<Vec<(&'static str, &'static str, u64)>, DatapathError> {
        let name = map_names::POLICY_VERDICTS;
        let map = open_pinned(&self.pins, name)?;
        let array: aya::maps::PerCpuArray<&MapData, u64> =
            aya::maps::PerCpuArray::try_from(&map).map_err(DatapathError::map(name))?;
        let mut out = Vec::new();
        for (direction, bit) in [("ingress", POLICY_INGRESS), ("egress", POLICY_EGRESS)] {
            for (verdict, allowed) in [("allowed", true), ("denied", false)] {
                let values =
                    array.get(&policy_verdict_slot(bit, allowed), 0).map_err(DatapathError::map(name))?;
                out.push((direction, verdict, values.iter().sum()));
            }
        }
        Ok(out)
    }

    /// Peer nodes caught sending in the other routing mode, with their count.
    pub fn peer_mode_mismatches(&self) -> Result<Vec<(Ipv4Addr, ModeMismatch)>, DatapathError> {
        let name = map_names::PEER_MODE_MISMATCHES;
        let map = open_pinned(&self.pins, name)?;
        let peers: HashMap<&MapData, NodeKey, ModeMismatch> =
            HashMap::try_from(&map).map_err(DatapathError::map(name))?;
        peers
            .iter()
            .map(|entry| entry.map(|(key, value)| (Ipv4Addr::from(key.ipv4), value)))
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(name))
    }

    /// Capacity of the pinned connection-tracking map, in entries.
    pub fn conntrack_capacity(&self) -> Result<u32, DatapathError> {
        let name = map_names::CONNTRACK;
        MapInfo::from_pin(self.pins.map(name))
            .map(|info| info.max_entries())
            .map_err(DatapathError::map(name))
    }

    /// An endpoint's packets and bytes, summed over CPUs (zero without a slot).
    pub fn endpoint_traffic(&self, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
        read_traffic(&self.traffic, traffic_slot)
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        read_endpoints(&self.endpoints)
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Counters::read(&self.drops, &self.forwards, &self.monitor_counters)
    }

    pub fn remote_routes(&self) -> Result<Vec<RemoteRoute>, DatapathError> {
        read_remote_routes(&self.remote_nodes)
    }

    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        read_entry(&self.node_config, map_names::NODE_CONFIG)
    }
}
