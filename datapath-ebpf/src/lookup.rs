//! Reads of the maps the agent writes: the node's settings, the pod behind
//! a veth, and where an address lives (a local pod, a peer node). Values
//! are copied out at once: the agent may replace an entry at any time.

use aya_ebpf::btf_maps::lpm_trie::Key;
use datapath_common::{Endpoint, EndpointKey, NodeConfig, NodeKey, PodInterface, RemoteNode};

use crate::maps::{ENDPOINTS, KNOWN_NODES, NODE_CONFIG, POD_INTERFACES, REMOTE_NODES};

/// The node-wide settings; all zero (mode unset) until the agent writes them.
#[inline(always)]
pub fn node_config() -> NodeConfig {
    match NODE_CONFIG.get(0) {
        Some(config) => *config,
        None => NodeConfig::default(),
    }
}

/// The node's address alone (no copy of the whole config on the stack).
#[inline(always)]
pub fn node_ipv4() -> [u8; 4] {
    NODE_CONFIG.get(0).map_or([0; 4], |config| config.node_ipv4)
}

/// The pod whose host veth is `ifindex`.
#[inline(always)]
pub fn pod_interface(ifindex: u32) -> Option<PodInterface> {
    // SAFETY: copied out at once.
    unsafe { POD_INTERFACES.get(ifindex) }.copied()
}

/// The pod on this node with address `daddr`, if any.
#[inline(always)]
pub fn local_endpoint(daddr: [u8; 4]) -> Option<Endpoint> {
    // SAFETY: copied out at once.
    unsafe { ENDPOINTS.get(EndpointKey { ipv4: daddr }) }.copied()
}

/// Is `ipv4` a peer node's own address?
#[inline(always)]
pub fn is_known_node(ipv4: [u8; 4]) -> bool {
    // SAFETY: only checked for presence.
    unsafe { KNOWN_NODES.get(NodeKey { ipv4 }) }.is_some()
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
