//! What becomes of a verdict, the same for every program and every path:
//! it is carried out as a TC action and accounted for (counted, reported
//! to the monitor: drops always, forwards while a monitor asks; logged in
//! the debug build). An ICMP answer is one verdict among the others. The
//! forwarding steps that reach a verdict are in [`crate::forward`] and the
//! programs.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_redir_neigh},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
};
use aya_log_ebpf::debug;
use datapath_common::{
    Direction, DropReason, EVENT_DROP, EVENT_FORWARD, ForwardPath, ICMP_ERRORS_PER_SECOND,
};

use crate::{
    counters::{count_delivered, count_drop, count_forward},
    headers::{ETH_HLEN, Ipv4Hdr},
    icmp::{IcmpError, IcmpReply, may_answer},
    maps::{ANSWER_SCRATCH, ICMP_BUDGET},
    monitor,
    packet::{AF_INET, PACKET_HOST, Packet},
    rate_limit,
};

/// Which way an ICMP error goes back to the sender of the packet it is about.
#[derive(Clone, Copy)]
pub enum Back {
    /// Out of this interface (the veth or uplink the packet came in on).
    Out { ifindex: u32 },
    /// Encapsulated back to the peer node that tunnelled the packet to us.
    Tunnel { vxlan_ifindex: u32, node_ipv4: [u8; 4], vni: u32 },
}

/// What to do with a packet that is not simply dropped.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Into the pod behind this host veth (`bpf_redirect_peer`).
    Deliver { host_ifindex: u32, traffic_slot: u32 },
    /// The frame was rewritten into an ARP reply: send it back out of the
    /// veth it came in on, to the pod that asked.
    ArpReply { ifindex: u32 },
    /// Let the node's stack have it.
    HostStack,
    /// Routed into a pod by the node's own stack ("to pod"): let it go on
    /// into the pod.
    RoutedIntoPod,
    /// For this node itself, arrived by tunnel: mark it PACKET_HOST first
    /// (its inner destination MAC is not ours).
    HostStackFromTunnel,
    /// Native routing, next hop resolved by the FIB: MACs already written.
    OutUplink { ifindex: u32 },
    /// Native routing, the neighbour subsystem resolves the peer's MAC.
    OutUplinkNeigh { ifindex: u32, node_ipv4: [u8; 4] },
    /// Out of the uplink to a host outside the cluster (a NodePort
    /// connection's reply, from the node's address): the kernel's routes
    /// give the next hop, the neighbour subsystem its MAC.
    OutRouted { ifindex: u32 },
    /// Overlay: the tunnel key (peer, VNI) is set; into the VXLAN device,
    /// which encapsulates it.
    OutOverlay { vxlan_ifindex: u32 },
    /// Dropped for `reason` (counted and reported as such), and answered
    /// with `error` from `source` the way it came (`back`), as a router
    /// answers: time exceeded for an expiring TTL, port unreachable for a
    /// Service connection nobody can take (the client fails at once),
    /// fragmentation needed for a DF packet too big for the pod.
    Answer { reason: DropReason, error: IcmpError, source: [u8; 4], back: Back },
}

/// What a verdict counts as: the counter it adds to, the monitor event it
/// makes.
#[derive(Clone, Copy)]
enum Counted {
    Forward(ForwardPath),
    Drop(DropReason),
}

impl Verdict {
    #[inline(always)]
    fn counted_as(&self) -> Counted {
        match self {
            Verdict::Deliver { .. } => Counted::Forward(ForwardPath::LocalDelivery),
            Verdict::ArpReply { .. } => Counted::Forward(ForwardPath::ArpReply),
            Verdict::HostStack | Verdict::HostStackFromTunnel => Counted::Forward(ForwardPath::ToHostStack),
            Verdict::RoutedIntoPod => Counted::Forward(ForwardPath::RoutedIntoPod),
            Verdict::OutUplink { .. } | Verdict::OutUplinkNeigh { .. } => {
                Counted::Forward(ForwardPath::ToRemoteNative)
            }
            Verdict::OutOverlay { .. } => Counted::Forward(ForwardPath::ToRemoteOverlay),
            Verdict::OutRouted { .. } => Counted::Forward(ForwardPath::ToOutside),
            // The reply is ours; the packet itself is dropped.
            Verdict::Answer { reason, .. } => Counted::Drop(*reason),
        }
    }
}

/// The part of carrying out a verdict that comes after the accounting:
/// writing the packet, which must wait, as the monitor event describes the
/// packet as it came.
enum Rest<'a> {
    /// Nothing: the TC action.
    Done(i32),
    /// Replace the packet with this ICMP error and send it back.
    Reply(&'a IcmpReply, Back),
}

/// Carry out the verdict and account for it (count, report to the monitor,
/// and in the debug build (`LOG`) log it); returns the TC action. The
/// accounting comes after everything but writing the packet, which only an
/// answer does: the monitor event describes the packet as it came.
#[inline(always)]
pub fn apply<const LOG: bool>(
    packet: &mut Packet,
    direction: Direction,
    verdict: Result<Verdict, DropReason>,
) -> i32 {
    let (counted, rest) = match verdict {
        Ok(verdict) => (verdict.counted_as(), act(packet, verdict)),
        Err(reason) => (Counted::Drop(reason), Rest::Done(TC_ACT_SHOT)),
    };
    account::<LOG>(packet, direction, counted);
    match rest {
        Rest::Done(action) => action,
        Rest::Reply(reply, back) => send_back(packet, reply, back),
    }
}

/// Count, report to the monitor, log.
#[inline(always)]
fn account<const LOG: bool>(packet: &Packet, direction: Direction, counted: Counted) {
    let monitor = monitor::config();
    match counted {
        Counted::Forward(path) => {
            count_forward(direction, path, packet.frame_len());
            if monitor.trace_forwards != 0 {
                monitor::report(packet, direction, EVENT_FORWARD, path as u8, monitor.events_per_second);
            }
            if LOG {
                log_verdict(packet, direction, path.name());
            }
        }
        Counted::Drop(reason) => {
            count_drop(direction, reason, packet.frame_len());
            monitor::report(packet, direction, EVENT_DROP, reason as u8, monitor.events_per_second);
            if LOG {
                log_verdict(packet, direction, reason.name());
            }
        }
    }
}

/// The TC action of a verdict, but for writing the packet (an answer's
/// reply is made in this CPU's scratch, from the packet, and written later).
#[inline(always)]
fn act(packet: &Packet, verdict: Verdict) -> Rest<'static> {
    // The redirect helpers below take plain values and return the TC action
    // to use (TC_ACT_REDIRECT, or TC_ACT_SHOT on bad flags); none of them
    // changes the packet data.
    let action = match verdict {
        Verdict::Deliver { host_ifindex, traffic_slot } => {
            count_delivered(traffic_slot, packet.frame_len());
            // The pod's stack must see the frame as addressed to it. The
            // forwarding checks only let PACKET_HOST frames this far, but
            // a decapsulated frame's type comes from its inner MAC.
            if packet.pkt_type() != PACKET_HOST {
                packet.set_pkt_type_host();
            }
            // SAFETY: a helper taking plain values (see above).
            unsafe { bpf_redirect_peer(host_ifindex, 0) as i32 }
        }
        // SAFETY: a helper taking plain values (see above).
        Verdict::ArpReply { ifindex } => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Verdict::HostStack | Verdict::RoutedIntoPod => TC_ACT_OK,
        Verdict::HostStackFromTunnel => {
            packet.set_pkt_type_host();
            TC_ACT_OK
        }
        // SAFETY: a helper taking plain values (see above).
        Verdict::OutUplink { ifindex } => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Verdict::OutUplinkNeigh { ifindex, node_ipv4 } => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET as u32,
                // SAFETY: a union of plain integers: all zeroes is valid.
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            // Network byte order, as the bytes sit in the header.
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(node_ipv4);
            // SAFETY: `nh` is a valid bpf_redir_neigh of the size passed,
            // alive for the call.
            unsafe {
                bpf_redirect_neigh(ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) as i32
            }
        }
        // SAFETY: a helper taking plain values (see above); no next hop
        // given: the helper looks the route up itself.
        Verdict::OutRouted { ifindex } => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        // SAFETY: a helper taking plain values (see above).
        Verdict::OutOverlay { vxlan_ifindex } => unsafe { bpf_redirect(vxlan_ifindex, 0) as i32 },
        Verdict::Answer { error, source, back, .. } => {
            return match make_reply(packet, error, source) {
                Some(reply) => Rest::Reply(reply, back),
                // Nothing to send: dropped, as counted.
                None => Rest::Done(TC_ACT_SHOT),
            };
        }
    };
    Rest::Done(action)
}

/// The reply `error` from `source` to the sender of this packet, made in
/// this CPU's [`ANSWER_SCRATCH`]. `None`: nothing to send, where the kernel sends nothing either
/// ([`may_answer`]) or this CPU used its budget for this second (the
/// kernel's `icmp_msgs_per_sec`). Reads the packet, leaves it alone.
#[inline(always)]
fn make_reply(packet: &Packet, error: IcmpError, source: [u8; 4]) -> Option<&'static IcmpReply> {
    // SAFETY: a per-CPU slot, and a program runs to its end on its CPU:
    // no other writer, no other reference while this one lives.
    let scratch = unsafe { &mut *ANSWER_SCRATCH.get_ptr_mut(0)? };
    // Shorter than a header and 8 bytes: nothing worth quoting.
    packet.load_into(0, &mut scratch.original)?;
    if !may_answer(&scratch.original) {
        return None;
    }
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a per-CPU slot: no other writer, no other reference.
    let budget = unsafe { &mut *ICMP_BUDGET.get_ptr_mut(0)? };
    if !rate_limit::take(budget, now, ICMP_ERRORS_PER_SECOND) {
        return None;
    }
    // SAFETY: MaybeUninit<T> has T's layout; `make` writes all of it.
    let space = unsafe { &mut *(&raw mut scratch.reply).cast::<MaybeUninit<IcmpReply>>() };
    Some(IcmpReply::make(space, &scratch.original, error, source))
}

/// Replace the packet with the ICMP error and send it back the way the
/// packet came. A helper failing: dropped, as counted.
#[inline(always)]
fn send_back(packet: &mut Packet, reply: &IcmpReply, back: Back) -> i32 {
    if packet.replace_with(reply).is_err() {
        return TC_ACT_SHOT;
    }
    match back {
        // SAFETY: a helper taking plain values; it returns TC_ACT_REDIRECT.
        Back::Out { ifindex } => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Back::Tunnel { vxlan_ifindex, node_ipv4, vni } => match packet.set_tunnel_key(node_ipv4, vni) {
            // SAFETY: a helper taking plain values; it returns TC_ACT_REDIRECT.
            Ok(()) => unsafe { bpf_redirect(vxlan_ifindex, 0) as i32 },
            Err(_) => TC_ACT_SHOT,
        },
    }
}

/// The debug build's line for a verdict: "<direction> <source> -> <destination>: <what>".
/// One call site for every verdict, so the program carries aya-log's code
/// (and its stack) once.
#[inline(never)]
fn log_verdict(packet: &Packet, direction: Direction, what: &'static str) {
    let (saddr, daddr) = addresses(packet);
    debug!(packet, "{} {:i} -> {:i}: {}", direction.name(), saddr, daddr, what);
}

/// IPv4 source and destination for the debug log (zero if not IPv4).
#[inline(always)]
fn addresses(packet: &Packet) -> ([u8; 4], [u8; 4]) {
    const SADDR: usize = ETH_HLEN + core::mem::offset_of!(Ipv4Hdr, saddr);
    match packet.load::<[[u8; 4]; 2]>(SADDR) {
        Some([saddr, daddr]) => (saddr, daddr),
        None => ([0; 4], [0; 4]),
    }
}
