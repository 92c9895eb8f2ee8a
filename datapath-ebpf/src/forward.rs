//! The forwarding steps the programs share: delivery to a local pod, the
//! MTU check on the way in, and the way out to a peer node. What becomes
//! of the verdict they reach is [`crate::verdict`]'s.

use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup};
use datapath_common::{
    DropReason, ENDPOINT_FLAG_HOST_DOWN, Endpoint, NODE_FLAG_SERVICES, NodeConfig, RoutingMode,
};

use crate::{
    icmp::IcmpError,
    lookup::{local_endpoint, remote_node_for},
    packet::{AF_INET, Ipv4Headers},
    services,
    strict::{self, Fit},
    verdict::{Back, Verdict},
};

/// Deliver to a local pod: TTL, MACs, and the verdict. A pod whose host
/// veth is down gets nothing, as from the kernel (its route is gone).
#[inline(always)]
pub fn deliver(mut headers: Ipv4Headers<'_>, endpoint: &Endpoint) -> Result<Verdict, DropReason> {
    if endpoint.flags & ENDPOINT_FLAG_HOST_DOWN != 0 {
        return Err(DropReason::EndpointDown);
    }
    headers.ip_mut().decrement_ttl()?;
    let eth = headers.eth_mut();
    eth.dst = endpoint.pod_mac;
    eth.src = endpoint.host_mac;
    Ok(Verdict::Deliver { host_ifindex: endpoint.host_ifindex, traffic_slot: endpoint.traffic_slot })
}

/// The MTU check on the way into a pod: `None` to go on; else the verdict,
/// with an ICMP fragmentation needed from `source` the way it came for a
/// DF packet, and the host stack (which fragments it) for the others.
#[inline(always)]
pub fn too_big_for_pod(
    headers: &Ipv4Headers<'_>,
    endpoint: &Endpoint,
    config: &NodeConfig,
    back: Back,
    fragmenter: Verdict,
) -> Option<Verdict> {
    match strict::fits_pod(headers, endpoint.host_ifindex, config) {
        Fit::Fits => None,
        Fit::TooBig { mtu, df: true } => Some(Verdict::Answer {
            reason: DropReason::PacketTooBig,
            error: IcmpError::fragmentation_needed(mtu as u16),
            source: config.node_ipv4,
            back,
        }),
        Fit::TooBig { df: false, .. } => Some(fragmenter),
    }
}

/// Would this packet be forwarded by us rather than handed to the host
/// stack? Asked only of packets the forwarding checks refused: we refuse
/// them only if we would otherwise have forwarded them.
#[inline(always)]
pub fn forwarded_by_us(headers: &Ipv4Headers<'_>, config: &NodeConfig) -> bool {
    let daddr = headers.ip().daddr;
    if local_endpoint(daddr).is_some() {
        return true;
    }
    if config.mode != RoutingMode::Unset as u32 && remote_node_for(daddr).is_some() {
        return true;
    }
    config.flags & NODE_FLAG_SERVICES != 0 && services::is_service(headers)
}

/// If `daddr` is on a peer node (its pod CIDR or its address): the way there
/// in this node's mode.
#[inline(always)]
pub fn to_remote_node(
    mut headers: Ipv4Headers<'_>,
    daddr: [u8; 4],
    config: &NodeConfig,
) -> Option<Result<Verdict, DropReason>> {
    let node = remote_node_for(daddr)?;
    let mode = config.mode;
    if mode != RoutingMode::Native as u32 && mode != RoutingMode::Vxlan as u32 {
        return None;
    }
    if let Err(reason) = headers.ip_mut().decrement_ttl() {
        return Some(Err(reason));
    }
    let packet = headers.packet();
    if mode == RoutingMode::Vxlan as u32 {
        if let Err(reason) = packet.set_tunnel_key(node.node_ipv4, config.vni) {
            return Some(Err(reason));
        }
        return Some(Ok(Verdict::OutOverlay { vxlan_ifindex: config.vxlan_ifindex }));
    }
    // Native: ask the FIB first (kernel route to the peer's pod CIDR, MACs
    // from the neighbour cache); use it only if it agrees with our map.
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes(headers.ip().tot_len);
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(headers.ip().saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    params.ifindex = packet.ifindex();
    let rc = packet.fib_lookup(&mut params, 0);
    // SAFETY: after a successful lookup ipv4_dst holds the next hop (any
    // bits are a valid u32).
    let next_hop = unsafe { params.__bindgen_anon_4.ipv4_dst };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64
        && params.ifindex == config.uplink_ifindex
        && next_hop == u32::from_ne_bytes(node.node_ipv4)
    {
        let eth = headers.eth_mut();
        eth.src = params.smac;
        eth.dst = params.dmac;
        return Some(Ok(Verdict::OutUplink { ifindex: params.ifindex }));
    }
    // No neighbour entry yet (or no route): let the helper resolve it.
    Some(Ok(Verdict::OutUplinkNeigh { ifindex: config.uplink_ifindex, node_ipv4: node.node_ipv4 }))
}
