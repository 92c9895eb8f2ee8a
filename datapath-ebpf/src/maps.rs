//! The maps, declared as BTF maps so `bpftool map dump` shows field names.
//! Names and sizes come from `datapath-common`, shared with the agent.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use datapath_common::{
    DROP_COUNTER_SLOTS, DropReason, Endpoint, EndpointKey, FORWARD_COUNTER_SLOTS, ForwardPath,
    MAX_KNOWN_NODES, MAX_LOCAL_ENDPOINTS, MAX_REMOTE_NODES, NodeConfig, NodeKey, PodInterface, RemoteNode,
};

#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_LOCAL_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
pub static POD_INTERFACES: HashMap<u32, PodInterface, { MAX_LOCAL_ENDPOINTS as usize }> = HashMap::new();

#[btf_map]
pub static DROP_COUNTERS: PerCpuArray<u64, { DROP_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FORWARD_COUNTERS: PerCpuArray<u64, { FORWARD_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(slot) = DROP_COUNTERS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer, a plain add is race-free.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_forward(path: ForwardPath) {
    if let Some(slot) = FORWARD_COUNTERS.get_ptr_mut(path as u32) {
        unsafe { *slot += 1 };
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
