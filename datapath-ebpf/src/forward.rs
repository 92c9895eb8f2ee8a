//! The forwarding steps the programs share: the TTL, delivery to a local
//! pod, the MTU check on the way in, and the way out to a peer node. What
//! becomes of the verdict they reach is [`crate::verdict`]'s.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use datapath_common::{DropReason, ENDPOINT_FLAG_HOST_DOWN, Endpoint, NodeConfig, RoutingMode};

use crate::{
    icmp::IcmpError,
    lookup::{local_endpoint, remote_node_for},
    packet::{AF_INET, EthHdr, Ipv4Hdr, csum_replace16, set_tunnel_key},
    verdict::{Back, Verdict},
};

/// We route, so we own the TTL: nothing downstream decrements it for us.
#[inline(always)]
pub fn decrement_ttl(ip: *mut Ipv4Hdr) -> Result<(), DropReason> {
    // SAFETY: callers pass a bounds-checked header.
    unsafe {
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        let protocol = (*ip).protocol;
        let check = u16::from_be_bytes((*ip).check);
        let old_word = u16::from_be_bytes([ttl, protocol]);
        let new_word = u16::from_be_bytes([ttl - 1, protocol]);
        (*ip).ttl = ttl - 1;
        (*ip).check = csum_replace16(check, old_word, new_word).to_be_bytes();
    }
    Ok(())
}

/// Does the TTL run out here? Such a packet is answered with time exceeded
/// (checked before any translation, so the quote is what the sender sent).
#[inline(always)]
pub fn ttl_expires(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: callers pass a bounds-checked header.
    unsafe { (*ip).ttl <= 1 }
}

/// Deliver to a local pod: TTL, MACs, and the verdict. A pod whose host
/// veth is down gets nothing, as from the kernel (its route is gone).
#[inline(always)]
pub fn deliver(eth: *mut EthHdr, ip: *mut Ipv4Hdr, endpoint: &Endpoint) -> Result<Verdict, DropReason> {
    if endpoint.flags & ENDPOINT_FLAG_HOST_DOWN != 0 {
        return Err(DropReason::EndpointDown);
    }
    decrement_ttl(ip)?;
    // SAFETY: bounds-checked by the caller.
    unsafe {
        (*eth).dst = endpoint.pod_mac;
        (*eth).src = endpoint.host_mac;
    }
    Ok(Verdict::Deliver { host_ifindex: endpoint.host_ifindex, traffic_slot: endpoint.traffic_slot })
}

/// The MTU check on the way into a pod: `None` to go on; else the verdict,
/// with an ICMP fragmentation needed from `source` the way it came for a
/// DF packet, and the host stack (which fragments it) for the others.
#[inline(always)]
pub fn too_big_for_pod(
    ctx: &TcContext,
    ip: *const Ipv4Hdr,
    endpoint: &Endpoint,
    config: &NodeConfig,
    back: Back,
    fragmenter: Verdict,
) -> Option<Verdict> {
    match crate::strict::fits_pod(ctx, ip, endpoint.host_ifindex, config) {
        crate::strict::Fit::Fits => None,
        crate::strict::Fit::TooBig { mtu, df: true } => Some(Verdict::Answer {
            reason: DropReason::PacketTooBig,
            error: IcmpError::FragmentationNeeded { mtu: mtu as u16 },
            source: config.node_ipv4,
            back,
        }),
        crate::strict::Fit::TooBig { df: false, .. } => Some(fragmenter),
    }
}

/// Would this packet be forwarded by us rather than handed to the host
/// stack? Asked only of packets the forwarding checks refused: we refuse
/// them only if we would otherwise have forwarded them.
#[inline(always)]
pub fn forwarded_by_us(ctx: &TcContext, ip: *const Ipv4Hdr, config: &NodeConfig) -> bool {
    // SAFETY: callers pass a bounds-checked header.
    let daddr = unsafe { (*ip).daddr };
    if local_endpoint(daddr).is_some() {
        return true;
    }
    if config.mode != RoutingMode::Unset as u32 && remote_node_for(daddr).is_some() {
        return true;
    }
    config.flags & datapath_common::NODE_FLAG_SERVICES != 0 && crate::services::is_service(ctx, ip)
}

/// If `daddr` is on a peer node (its pod CIDR or its address): the way there
/// in this node's mode.
#[inline(always)]
pub fn to_remote_node(
    ctx: &TcContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    daddr: [u8; 4],
    config: &NodeConfig,
) -> Option<Result<Verdict, DropReason>> {
    let node = remote_node_for(daddr)?;
    let mode = config.mode;
    if mode != RoutingMode::Native as u32 && mode != RoutingMode::Vxlan as u32 {
        return None;
    }
    if let Err(reason) = decrement_ttl(ip) {
        return Some(Err(reason));
    }
    if mode == RoutingMode::Vxlan as u32 {
        if let Err(reason) = set_tunnel_key(ctx, node.node_ipv4, config.vni) {
            return Some(Err(reason));
        }
        return Some(Ok(Verdict::OutOverlay { vxlan_ifindex: config.vxlan_ifindex }));
    }
    // Native: ask the FIB first (kernel route to the peer's pod CIDR, MACs
    // from the neighbour cache); use it only if it agrees with our map.
    // SAFETY: all-zero is a valid bpf_fib_lookup; ip is bounds-checked.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    unsafe {
        params.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).saddr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
        params.ifindex = (*ctx.skb.skb).ifindex;
    }
    let rc = unsafe {
        fib_lookup(ctx.skb.skb.cast(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    // After a successful lookup ipv4_dst holds the next hop.
    let next_hop = unsafe { params.__bindgen_anon_4.ipv4_dst };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64
        && params.ifindex == config.uplink_ifindex
        && next_hop == u32::from_ne_bytes(node.node_ipv4)
    {
        // SAFETY: bounds-checked by the caller.
        unsafe {
            (*eth).src = params.smac;
            (*eth).dst = params.dmac;
        }
        return Some(Ok(Verdict::OutUplink { ifindex: params.ifindex }));
    }
    // No neighbour entry yet (or no route): let the helper resolve it.
    Some(Ok(Verdict::OutUplinkNeigh { ifindex: config.uplink_ifindex, node_ipv4: node.node_ipv4 }))
}
