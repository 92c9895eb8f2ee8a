//! "From pod": TC ingress of every pod's host-side veth.
//!
//! One loaded program serves every pod; it finds out which pod is sending from
//! the ingress ifindex (`POD_INTERFACES`). It answers the pod's ARP for its
//! gateway, enforces the pod's source address, delivers to pods on this node
//! with `bpf_redirect_peer`, sends traffic for other nodes' pods (and for the
//! peer nodes themselves) straight to the peer, natively or through VXLAN, and
//! hands everything else to the host stack.

use aya_ebpf::programs::TcContext;
use datapath_common::{Direction, DropReason, ETH_P_ARP, ETH_P_IP, NODE_FLAG_SERVICES};

use crate::{
    counters::count_sent,
    forward::{deliver, forwarded_by_us, to_remote_node, too_big_for_pod, ttl_expires},
    icmp::IcmpError,
    lookup::{local_endpoint, node_config, pod_interface},
    packet::{
        ARP_REPLY, ARP_REQUEST, ArpEthIpv4, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, EthHdr, ethertype,
        ipv4_headers, ptr_at, pull_headers, same_ipv4,
    },
    services::{Translation, translate},
    strict,
    verdict::{Back, Verdict, apply},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let verdict = classify(&ctx);
    apply::<LOG>(&ctx, Direction::FromPod, verdict)
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Verdict, DropReason> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(iface) = pod_interface(ifindex) else {
        return Err(DropReason::UnknownInterface);
    };
    count_sent(iface.traffic_slot, ctx.len());
    // veth's VLAN offload moves an 802.1Q tag out of the frame into skb
    // metadata before TC runs, so a tagged frame looks untagged here.
    // SAFETY: as above.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(DropReason::VlanTagged);
    }
    pull_headers(ctx);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    match ethertype(eth) {
        ETH_P_IP => ipv4(ctx, ifindex, iface.pod_ipv4),
        ETH_P_ARP => arp(ctx, ifindex, iface.pod_ipv4, iface.host_mac),
        ETH_P_8021Q | ETH_P_8021AD => Err(DropReason::VlanTagged),
        // IPv6 and everything else: the host stack decides (no IPv6 datapath yet).
        _ => Ok(Verdict::HostStack),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, ifindex: u32, pod_ipv4: [u8; 4]) -> Result<Verdict, DropReason> {
    let (mut eth, mut ip) = ipv4_headers(ctx)?;
    // SAFETY (derefs): bounds-checked by ipv4_headers.
    if !same_ipv4(unsafe { (*ip).saddr }, pod_ipv4) {
        return Err(DropReason::SpoofedSource);
    }
    let config = node_config();
    // The kernel's checks before it forwards (wrong MAC, options, header
    // checksum, TTL), made before any translation so that an error quotes
    // what the pod sent. A packet that fails one is ours to refuse only if
    // we would forward it; the host stack judges the rest itself.
    if let Err(reason) = strict::frame_ok(ctx, ip) {
        return if forwarded_by_us(ctx, ip, &config) { Err(reason) } else { Ok(Verdict::HostStack) };
    }
    if ttl_expires(ip) {
        if !forwarded_by_us(ctx, ip, &config) {
            return Ok(Verdict::HostStack);
        }
        return Ok(Verdict::Answer {
            reason: DropReason::TtlExceeded,
            error: IcmpError::TimeExceeded,
            source: config.node_ipv4,
            back: Back::Out { ifindex },
        });
    }
    if config.flags & NODE_FLAG_SERVICES != 0 {
        match translate(ctx, ip, true)? {
            Translation::None => {}
            // The helpers that rewrote it invalidated every packet pointer.
            Translation::Rewritten => (eth, ip) = ipv4_headers(ctx)?,
            Translation::Refuse(reason) => {
                // From the Service address the client asked for.
                let service = unsafe { (*ip).daddr };
                let back = Back::Out { ifindex };
                return Ok(Verdict::Answer {
                    reason,
                    error: IcmpError::PortUnreachable,
                    source: service,
                    back,
                });
            }
        }
    }
    let daddr = unsafe { (*ip).daddr };
    if let Some(endpoint) = local_endpoint(daddr) {
        // Pods of one node share an MTU unless one was given a smaller one.
        let back = Back::Out { ifindex };
        if let Some(verdict) = too_big_for_pod(ctx, ip, &endpoint, &config, back, Verdict::HostStack) {
            return Ok(verdict);
        }
        return deliver(eth, ip, &endpoint);
    }
    if let Some(verdict) = to_remote_node(ctx, eth, ip, daddr, &config) {
        return verdict;
    }
    // This node, or outside the cluster (masqueraded by the node).
    Ok(Verdict::HostStack)
}

#[inline(always)]
fn arp(ctx: &TcContext, ifindex: u32, pod_ipv4: [u8; 4], host_mac: [u8; 6]) -> Result<Verdict, DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    let arp: *mut ArpEthIpv4 = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedArp)?;

    // SAFETY (all derefs below): bounds-checked by ptr_at.
    let (htype, ptype, hlen, plen) = unsafe {
        (u16::from_be_bytes((*arp).htype), u16::from_be_bytes((*arp).ptype), (*arp).hlen, (*arp).plen)
    };
    if htype != 1 || ptype != ETH_P_IP || hlen != 6 || plen != 4 {
        return Err(DropReason::MalformedArp);
    }
    let sender_ip = unsafe { (*arp).spa };
    let sender_is_pod = same_ipv4(sender_ip, pod_ipv4);
    // 0.0.0.0 is a duplicate-address probe (RFC 5227): harmless, let it pass.
    if !sender_is_pod && u32::from_ne_bytes(sender_ip) != 0 {
        return Err(DropReason::SpoofedArp);
    }
    let oper = u16::from_be_bytes(unsafe { (*arp).oper });
    let target_ip = unsafe { (*arp).tpa };
    if oper != ARP_REQUEST || !sender_is_pod || same_ipv4(target_ip, pod_ipv4) {
        // Replies to the node's own ARP (node -> pod traffic needs them),
        // probes and gratuitous ARP: the host stack handles them.
        return Ok(Verdict::HostStack);
    }

    // Answer every other address with the host veth's MAC: the pod has a /32
    // and a default route via a link-local gateway, so all its traffic comes
    // to us without proxy_arp, a bridge or static neighbours.
    unsafe {
        let requester_mac = (*arp).sha;
        (*eth).dst = requester_mac;
        (*eth).src = host_mac;
        (*arp).oper = ARP_REPLY.to_be_bytes();
        (*arp).tha = requester_mac;
        (*arp).tpa = sender_ip;
        (*arp).sha = host_mac;
        (*arp).spa = target_ip;
    }
    Ok(Verdict::ArpReply { ifindex })
}
