//! The maps, declared as BTF maps so `bpftool map dump` shows field names.
//! Names and sizes come from `datapath-common`, shared with the agent.
//! Declarations only: reading them is [`crate::lookup`]'s, counting
//! [`crate::counters`]', and each feature's own state its module's.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ConntrackClient, ConntrackClientKey, ConntrackEntry,
    ConntrackKey, DEFAULT_CONNTRACK_ENTRIES, DROP_COUNTER_SLOTS, Endpoint, EndpointKey, EndpointTraffic,
    FORWARD_COUNTER_SLOTS, FragmentKey, FragmentTranslation, MAX_AFFINITY_ENTRIES, MAX_CONNTRACK_CLIENTS,
    MAX_FRAGMENTED_DATAGRAMS, MAX_KNOWN_NODES, MAX_LOCAL_ENDPOINTS, MAX_OUTSIDE_OPENING, MAX_POLICY_PEERS,
    MAX_POLICY_RULES, MAX_REMOTE_NODES, MAX_SERVICE_BACKENDS, MAX_SERVICES, MAX_SOCK_REVNAT,
    MAX_TRAFFIC_SLOTS, MONITOR_RING_BYTES, ModeMismatch, MonitorBudget, MonitorConfig, MonitorEvent,
    MonitorOutcome, NodeConfig, NodeKey, POLICY_VERDICT_SLOTS, PacketCount, PodInterface, PolicyAllow,
    PolicyEndpoint, PolicyPeer, PolicyRuleKey, RPF_CACHE_SLOTS, RateBudget, RemoteNode, RpfCacheEntry,
    Service, ServiceKey, SockRevNat, SockRevNatKey,
};

use crate::icmp::AnswerScratch;

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

/// Each client's tracked connections (`conntrack_max_per_client`).
#[btf_map]
pub static CONNTRACK_CLIENTS: HashMap<
    ConntrackClientKey,
    ConntrackClient,
    { MAX_CONNTRACK_CLIENTS as usize },
    ON_DEMAND,
> = HashMap::new();

/// The forward keys of the TCP connections clients outside opened lately,
/// each in a slot drawn at random (it replaces what the slot held): where
/// a full outside share finds an unanswered connection to give up for a
/// new one (early drop, `services::outside_early_drop`).
#[btf_map]
pub static CONNTRACK_OUTSIDE_OPENING: Array<ConntrackKey, { MAX_OUTSIDE_OPENING as usize }> = Array::new();

/// What early drop keeps on this CPU (no room for it on the stack): the
/// key it looks at and its pair, and the ring slot of the connection it
/// gave up, where the new connection goes (so the ring keeps as many
/// connections to give up as it had).
#[repr(C)]
pub struct EarlyDropScratch {
    pub key: ConntrackKey,
    pub pair: ConntrackKey,
    pub victim_slot: u32,
    pub _pad: u32,
}

#[btf_map]
pub static EARLY_DROP_SCRATCH: PerCpuArray<EarlyDropScratch, 1> = PerCpuArray::new();

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
pub static DROP_COUNTERS: PerCpuArray<PacketCount, { DROP_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FORWARD_COUNTERS: PerCpuArray<PacketCount, { FORWARD_COUNTER_SLOTS as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static ENDPOINT_TRAFFIC: PerCpuArray<EndpointTraffic, { MAX_TRAFFIC_SLOTS as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static MONITOR_EVENTS: RingBuf<MonitorEvent, { MONITOR_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
pub static MONITOR_CONFIG: Array<MonitorConfig, 1> = Array::new();

#[btf_map]
pub static MONITOR_BUDGET: PerCpuArray<MonitorBudget, 1> = PerCpuArray::new();

/// The Service address each of the node's own sockets asked for, by the
/// backend it was sent to (socket load balancing).
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNat, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// Where this CPU makes an ICMP answer (too big for the stack).
#[btf_map]
pub static ANSWER_SCRATCH: PerCpuArray<AnswerScratch, 1> = PerCpuArray::new();

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

#[btf_map]
pub static REMOTE_NODES: LpmTrie<[u8; 4], RemoteNode, { MAX_REMOTE_NODES as usize }> = LpmTrie::new();

#[btf_map]
pub static KNOWN_NODES: HashMap<NodeKey, RemoteNode, { MAX_KNOWN_NODES as usize }> = HashMap::new();

#[btf_map]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Local pods NetworkPolicy isolates, and in which directions.
#[btf_map]
pub static POLICY_ENDPOINTS: HashMap<
    EndpointKey,
    PolicyEndpoint,
    { MAX_LOCAL_ENDPOINTS as usize },
    ON_DEMAND,
> = HashMap::new();

/// Peer address prefix -> identity (pods as /32, ipBlock prefixes).
#[btf_map]
pub static POLICY_PEERS: LpmTrie<[u8; 4], PolicyPeer, { MAX_POLICY_PEERS as usize }> = LpmTrie::new();

/// (endpoint, identity, direction, protocol, port prefix) -> allowed.
#[btf_map]
pub static POLICY_RULES: LpmTrie<PolicyRuleKey, PolicyAllow, { MAX_POLICY_RULES as usize }> = LpmTrie::new();

#[btf_map]
pub static POLICY_VERDICTS: PerCpuArray<u64, { POLICY_VERDICT_SLOTS as usize }> = PerCpuArray::new();
