//! The maps, declared as BTF maps so `bpftool map dump` shows field names.
//! Names and sizes come from `datapath-common`, shared with the agent.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    macros::btf_map,
};
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ConntrackEntry, ConntrackKey, DEFAULT_CONNTRACK_ENTRIES,
    DROP_COUNTER_SLOTS, Direction, DropReason, Endpoint, EndpointKey, EndpointTraffic, FORWARD_COUNTER_SLOTS,
    ForwardPath, FragmentKey, FragmentTranslation, MAX_AFFINITY_ENTRIES, MAX_FRAGMENTED_DATAGRAMS,
    MAX_KNOWN_NODES, MAX_LOCAL_ENDPOINTS, MAX_REMOTE_NODES, MAX_SERVICE_BACKENDS, MAX_SERVICES,
    MAX_TRAFFIC_SLOTS, MONITOR_RING_BYTES, ModeMismatch, MonitorBudget, MonitorConfig, MonitorEvent,
    MonitorOutcome, NodeConfig, NodeKey, PodInterface, RPF_CACHE_SLOTS, RateBudget, RemoteNode,
    RpfCacheEntry, Service, ServiceKey, drop_slot, forward_slot,
};

/// Allocated as Services come: most clusters have far fewer than the maximum.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize }, ON_DEMAND> = HashMap::new();

#[btf_map]
pub static SERVICE_BACKENDS: HashMap<BackendKey, Backend, { MAX_SERVICE_BACKENDS as usize }, ON_DEMAND> =
    HashMap::new();

/// Preallocated (the agent sets the size from `conntrack_max_entries`): a
/// new connection never waits for an allocation, and a full map refuses new
/// connections instead of evicting live ones.
#[btf_map]
pub static CONNTRACK: HashMap<ConntrackKey, ConntrackEntry, { DEFAULT_CONNTRACK_ENTRIES as usize }> =
    HashMap::new();

#[btf_map]
pub static SERVICE_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { MAX_AFFINITY_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SERVICE_FRAGMENTS: LruHashMap<
    FragmentKey,
    FragmentTranslation,
    { MAX_FRAGMENTED_DATAGRAMS as usize },
> = LruHashMap::new();

#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_LOCAL_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
pub static POD_INTERFACES: HashMap<u32, PodInterface, { MAX_LOCAL_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
pub static DROP_COUNTERS: PerCpuArray<u64, { DROP_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FORWARD_COUNTERS: PerCpuArray<u64, { FORWARD_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static ENDPOINT_TRAFFIC: PerCpuArray<EndpointTraffic, { MAX_TRAFFIC_SLOTS as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static MONITOR_EVENTS: RingBuf<MonitorEvent, { MONITOR_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
pub static MONITOR_CONFIG: Array<MonitorConfig, 1> = Array::new();

#[btf_map]
pub static MONITOR_BUDGET: PerCpuArray<MonitorBudget, 1> = PerCpuArray::new();

/// ICMP errors sent by this CPU in the current second (rate limit).
#[btf_map]
pub static ICMP_BUDGET: PerCpuArray<RateBudget, 1> = PerCpuArray::new();

/// Sources whose reverse path was confirmed lately (per CPU, direct-mapped).
#[btf_map]
pub static RPF_CACHE: PerCpuArray<RpfCacheEntry, { RPF_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// Peers caught sending in the other routing mode; only known nodes get an
/// entry, so it cannot grow past them.
#[btf_map]
pub static PEER_MODE_MISMATCHES: HashMap<NodeKey, ModeMismatch, { MAX_KNOWN_NODES as usize }> =
    HashMap::new();

#[btf_map]
pub static MONITOR_COUNTERS: PerCpuArray<u64, { MonitorOutcome::SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count_drop(direction: Direction, reason: DropReason) {
    if let Some(slot) = DROP_COUNTERS.get_ptr_mut(drop_slot(direction, reason)) {
        // Per-CPU slot: no other writer, a plain add is race-free.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_forward(direction: Direction, path: ForwardPath) {
    if let Some(slot) = FORWARD_COUNTERS.get_ptr_mut(forward_slot(direction, path)) {
        unsafe { *slot += 1 };
    }
}

/// A packet the pod put on its veth. Slots beyond the array (the endpoint
/// has none) are simply not counted.
#[inline(always)]
pub fn count_sent(traffic_slot: u32, bytes: u32) {
    if let Some(traffic) = ENDPOINT_TRAFFIC.get_ptr_mut(traffic_slot) {
        // SAFETY: per-CPU slot, no other writer.
        unsafe {
            (*traffic).sent_packets += 1;
            (*traffic).sent_bytes += bytes as u64;
        }
    }
}

/// A packet the datapath redirected into the pod.
#[inline(always)]
pub fn count_delivered(traffic_slot: u32, bytes: u32) {
    if let Some(traffic) = ENDPOINT_TRAFFIC.get_ptr_mut(traffic_slot) {
        // SAFETY: per-CPU slot, no other writer.
        unsafe {
            (*traffic).delivered_packets += 1;
            (*traffic).delivered_bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn count_monitor(outcome: MonitorOutcome) {
    if let Some(slot) = MONITOR_COUNTERS.get_ptr_mut(outcome as u32) {
        unsafe { *slot += 1 };
    }
}

/// The monitor settings; all zero (drops only, default rate) until set.
#[inline(always)]
pub fn monitor_config() -> MonitorConfig {
    match MONITOR_CONFIG.get(0) {
        Some(config) => *config,
        None => MonitorConfig::default(),
    }
}

#[btf_map]
pub static REMOTE_NODES: LpmTrie<[u8; 4], RemoteNode, { MAX_REMOTE_NODES as usize }> = LpmTrie::new();

#[btf_map]
pub static KNOWN_NODES: HashMap<NodeKey, RemoteNode, { MAX_KNOWN_NODES as usize }> = HashMap::new();

#[btf_map]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// The node-wide settings; all zero (mode unset) until the agent writes them.
#[inline(always)]
pub fn node_config() -> NodeConfig {
    match NODE_CONFIG.get(0) {
        Some(config) => *config,
        None => NodeConfig::default(),
    }
}

/// The peer node whose pod CIDR holds `addr`.
#[inline(always)]
pub fn remote_pod_cidr_owner(addr: [u8; 4]) -> Option<RemoteNode> {
    REMOTE_NODES.get(&Key { prefix_len: 32, data: addr }).copied()
}

/// The peer node behind a destination: a remote pod CIDR or a peer's address.
#[inline(always)]
pub fn remote_node_for(daddr: [u8; 4]) -> Option<RemoteNode> {
    let key = Key { prefix_len: 32, data: daddr };
    if let Some(node) = REMOTE_NODES.get(&key) {
        return Some(*node);
    }
    // SAFETY: the value is copied out at once.
    unsafe { KNOWN_NODES.get(NodeKey { ipv4: daddr }) }.copied()
}
