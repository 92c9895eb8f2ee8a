//! Verdicts shared by all programs, and the forwarding steps they share:
//! delivery to a local pod, and the way out to a peer node.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_change_type, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use aya_log_ebpf::debug;
use datapath_common::{
    Direction, DropReason, ENDPOINT_FLAG_HOST_DOWN, EVENT_DROP, EVENT_FORWARD, Endpoint, ForwardPath,
    NodeConfig, RoutingMode,
};

use crate::{
    counters::{count_delivered, count_drop, count_forward},
    icmp::{IcmpError, into_icmp_error},
    lookup::{local_endpoint, remote_node_for},
    monitor,
    packet::{ETH_HLEN, EthHdr, Ipv4Hdr, csum_replace16},
    strict::PACKET_HOST,
};

const AF_INET: u8 = 2;

/// Which way an ICMP error goes back to the sender of the packet it is about.
#[derive(Clone, Copy)]
pub enum Back {
    /// Out of this interface (the veth or uplink the packet came in on).
    Out { ifindex: u32 },
    /// Encapsulated back to the peer node that tunnelled the packet to us.
    Tunnel { vxlan_ifindex: u32, node_ipv4: [u8; 4], vni: u32 },
}

/// What to do with a packet that is not dropped.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Into the pod behind this host veth (`bpf_redirect_peer`).
    Deliver { host_ifindex: u32, traffic_slot: u32 },
    /// The frame was rewritten into an ARP reply: send it back out of the
    /// veth it came in on, to the pod that asked.
    ArpReply { ifindex: u32 },
    /// Let the node's stack have it.
    HostStack,
    /// For this node itself, arrived by tunnel: mark it PACKET_HOST first
    /// (its inner destination MAC is not ours).
    HostStackFromTunnel,
    /// Native routing, next hop resolved by the FIB: MACs already written.
    OutUplink { ifindex: u32 },
    /// Native routing, the neighbour subsystem resolves the peer's MAC.
    OutUplinkNeigh { ifindex: u32, node_ipv4: [u8; 4] },
    /// Overlay: encapsulate towards the peer through the VXLAN device.
    OutOverlay { vxlan_ifindex: u32, node_ipv4: [u8; 4], vni: u32 },
    /// Dropped for `reason` (counted and reported as such), and answered
    /// with `error` from `source` the way it came (`back`), as a router
    /// answers: time exceeded for an expiring TTL, port unreachable for a
    /// Service connection nobody can take (the client fails at once).
    Answer { reason: DropReason, error: IcmpError, source: [u8; 4], back: Back },
}

/// Count the verdict, report it to the monitor (drops always, forwards when
/// asked) and turn it into the TC action. `LOG`: the debug build also logs it.
#[inline(always)]
pub fn apply<const LOG: bool>(
    ctx: &TcContext,
    direction: Direction,
    verdict: Result<Verdict, DropReason>,
) -> i32 {
    let monitor = monitor::config();
    if let Ok(Verdict::Answer { reason, error, source, back }) = verdict {
        // Reported first: the event describes the packet, not the reply.
        drop::<LOG>(ctx, direction, reason, monitor.events_per_second);
        return match into_icmp_error(ctx, error, source) {
            Ok(true) => send_back(ctx, back).unwrap_or(TC_ACT_SHOT as i32),
            Ok(false) | Err(_) => TC_ACT_SHOT as i32,
        };
    }
    let (action, path) = match verdict {
        Ok(verdict) => match act(ctx, verdict) {
            Ok(done) => done,
            Err(reason) => return drop::<LOG>(ctx, direction, reason, monitor.events_per_second),
        },
        Err(reason) => return drop::<LOG>(ctx, direction, reason, monitor.events_per_second),
    };
    count_forward(direction, path);
    if monitor.trace_forwards != 0 {
        monitor::report(ctx, direction, EVENT_FORWARD, path as u8, monitor.events_per_second);
    }
    if LOG {
        let (saddr, daddr) = addresses(ctx);
        debug!(ctx, "{} {:i} -> {:i}: {}", direction.name(), saddr, daddr, path.name());
    }
    action
}

/// The TC action of a verdict, and the path it counts as.
#[inline(always)]
fn act(ctx: &TcContext, verdict: Verdict) -> Result<(i32, ForwardPath), DropReason> {
    // SAFETY (helper calls): plain helpers with valid arguments; each returns
    // the TC action to use (TC_ACT_REDIRECT, or TC_ACT_SHOT on bad flags).
    Ok(match verdict {
        Verdict::Deliver { host_ifindex, traffic_slot } => {
            count_delivered(traffic_slot, ctx.len());
            // The pod's stack must see the frame as addressed to it. The
            // forwarding checks only let PACKET_HOST frames this far, but
            // a decapsulated frame's type comes from its inner MAC.
            if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
                unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
            }
            (unsafe { bpf_redirect_peer(host_ifindex, 0) as i32 }, ForwardPath::LocalDelivery)
        }
        Verdict::ArpReply { ifindex } => (unsafe { bpf_redirect(ifindex, 0) as i32 }, ForwardPath::ArpReply),
        Verdict::HostStack => (TC_ACT_OK as i32, ForwardPath::ToHostStack),
        Verdict::HostStackFromTunnel => {
            unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
            (TC_ACT_OK as i32, ForwardPath::ToHostStack)
        }
        Verdict::OutUplink { ifindex } => {
            (unsafe { bpf_redirect(ifindex, 0) as i32 }, ForwardPath::ToRemoteNative)
        }
        Verdict::OutUplinkNeigh { ifindex, node_ipv4 } => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET as u32,
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            // Network byte order, as the bytes sit in the header.
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(node_ipv4);
            let action = unsafe {
                bpf_redirect_neigh(ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) as i32
            };
            (action, ForwardPath::ToRemoteNative)
        }
        Verdict::OutOverlay { vxlan_ifindex, node_ipv4, vni } => {
            (encapsulate(ctx, vxlan_ifindex, node_ipv4, vni)?, ForwardPath::ToRemoteOverlay)
        }
        // Handled by `apply` before it gets here.
        Verdict::Answer { reason, .. } => return Err(reason),
    })
}

/// Towards `node_ipv4` through the collect_md VXLAN device.
#[inline(always)]
fn encapsulate(ctx: &TcContext, vxlan_ifindex: u32, node_ipv4: [u8; 4], vni: u32) -> Result<i32, DropReason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the outer destination in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ipv4);
    key.tunnel_ttl = 64;
    // SAFETY: plain helper with a valid key of its size.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        return Err(DropReason::TunnelEncapFailed);
    }
    // SAFETY: plain helper; returns TC_ACT_REDIRECT.
    Ok(unsafe { bpf_redirect(vxlan_ifindex, 0) as i32 })
}

/// Send an ICMP error (already written over the packet) back to its sender.
#[inline(always)]
fn send_back(ctx: &TcContext, back: Back) -> Result<i32, DropReason> {
    match back {
        // SAFETY: plain helper; returns TC_ACT_REDIRECT.
        Back::Out { ifindex } => Ok(unsafe { bpf_redirect(ifindex, 0) as i32 }),
        Back::Tunnel { vxlan_ifindex, node_ipv4, vni } => encapsulate(ctx, vxlan_ifindex, node_ipv4, vni),
    }
}

#[inline(always)]
fn drop<const LOG: bool>(
    ctx: &TcContext,
    direction: Direction,
    reason: DropReason,
    events_per_second: u32,
) -> i32 {
    count_drop(direction, reason);
    monitor::report(ctx, direction, EVENT_DROP, reason as u8, events_per_second);
    if LOG {
        let (saddr, daddr) = addresses(ctx);
        debug!(ctx, "{} {:i} -> {:i}: dropped, {}", direction.name(), saddr, daddr, reason.name());
    }
    TC_ACT_SHOT as i32
}

/// IPv4 source and destination for the debug log (zero if not IPv4).
#[inline(always)]
fn addresses(ctx: &TcContext) -> ([u8; 4], [u8; 4]) {
    match ctx.load::<[u8; 8]>(ETH_HLEN + 12) {
        Ok(a) => ([a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]]),
        Err(_) => ([0; 4], [0; 4]),
    }
}

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
        return Some(Ok(Verdict::OutOverlay {
            vxlan_ifindex: config.vxlan_ifindex,
            node_ipv4: node.node_ipv4,
            vni: config.vni,
        }));
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
