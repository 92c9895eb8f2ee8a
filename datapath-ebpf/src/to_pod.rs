//! "To pod": TC egress of every pod's host-side veth.
//!
//! The programs deliver into pods with `bpf_redirect_peer`, which skips
//! this hook, so what reaches it was routed into the pod by the node's own
//! stack: replies to connections the node masqueraded, the node's own
//! traffic (kubelet probes), and whatever the node forwards from elsewhere
//! (a second network, hostPort or NodePort DNAT without SNAT, packets our
//! programs handed to the stack). NetworkPolicy judges the pod's ingress
//! here too, so that no path into a pod escapes it; everything else goes
//! on untouched.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use datapath_common::{Direction, DropReason, ETH_P_IP, NODE_FLAG_POLICY};

use crate::{
    lookup::node_config,
    packet::Packet,
    policy::{self, Flow},
    strict::{RoutedSource, routed_source},
    verdict::{Verdict, apply},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let mut packet = Packet::new(ctx);
    // Our own answers to the pod (ARP replies, ICMP errors), sent back out
    // of the veth it sent on: accounted for where they were made.
    if packet.ingress_ifindex() == packet.ifindex() {
        return TC_ACT_OK;
    }
    let verdict = classify(&mut packet);
    apply::<LOG>(&mut packet, Direction::ToPod, verdict)
}

#[inline(always)]
fn classify(packet: &mut Packet) -> Result<Verdict, DropReason> {
    let config = node_config();
    if config.flags & NODE_FLAG_POLICY == 0 {
        return Ok(Verdict::RoutedIntoPod);
    }
    packet.pull_headers();
    // No IPv4 datapath but IPv4: the rest is the stack's (ARP above all).
    if packet.ethertype() != Some(ETH_P_IP) {
        return Ok(Verdict::RoutedIntoPod);
    }
    // The stack checked the header before it routed the packet here.
    let Ok(headers) = packet.ipv4() else {
        return Ok(Verdict::RoutedIntoPod);
    };
    // A later fragment follows its first, which was judged.
    let Some(flow) = Flow::of(&headers) else {
        return Ok(Verdict::RoutedIntoPod);
    };
    let isolation = policy::isolation(flow.daddr);
    if isolation == 0 {
        return Ok(Verdict::RoutedIntoPod);
    }
    // Made by the node itself: no interface it came in on. Otherwise:
    // policy knows a peer by its address, and one the node's stack let in
    // from the wrong side (its rp_filter loose or off) is not that peer.
    let came_in = headers.packet().ingress_ifindex();
    let from_node = came_in == 0
        || match routed_source(headers.packet(), flow.saddr, came_in, &config) {
            RoutedSource::Node => true,
            RoutedSource::Peer => false,
            RoutedSource::Forged => return Err(DropReason::ReversePath),
        };
    policy::enforce_routed(&flow, isolation, from_node, &config)?;
    Ok(Verdict::RoutedIntoPod)
}
