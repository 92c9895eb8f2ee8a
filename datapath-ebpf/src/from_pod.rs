//! "From pod": TC ingress of every pod's host-side veth.
//!
//! One loaded program serves every pod; it finds out which pod is sending from
//! the ingress ifindex (`POD_INTERFACES`). It answers the pod's ARP for its
//! gateway, enforces the pod's source address, delivers to pods on this node
//! with `bpf_redirect_peer`, and hands everything else to the host stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use datapath_common::{DropReason, EndpointKey, ForwardPath};

use crate::{
    maps::{ENDPOINTS, POD_INTERFACES, count_drop, count_forward},
    packet::{
        ARP_REPLY, ARP_REQUEST, ArpEthIpv4, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP,
        ETH_P_IP, EthHdr, IPV4_MIN_HLEN, Ipv4Hdr, csum_replace16, ptr_at, pull_headers,
    },
};

/// What to do with a packet that is not dropped.
#[derive(Clone, Copy)]
enum Verdict {
    /// Into the pod behind this host veth (`bpf_redirect_peer`).
    Deliver { host_ifindex: u32 },
    /// The frame was rewritten into an ARP reply: send it back out of the veth
    /// it came in on, i.e. to the pod that asked.
    ArpReply { ifindex: u32 },
    /// Let the node's stack have it.
    HostStack,
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match classify(&ctx) {
        Ok(Verdict::Deliver { host_ifindex }) => {
            count_forward(ForwardPath::LocalDelivery);
            // SAFETY: plain helper call; returns TC_ACT_REDIRECT for flags 0.
            unsafe { bpf_redirect_peer(host_ifindex, 0) as i32 }
        }
        Ok(Verdict::ArpReply { ifindex }) => {
            count_forward(ForwardPath::ArpReply);
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Ok(Verdict::HostStack) => {
            count_forward(ForwardPath::ToHostStack);
            TC_ACT_OK as i32
        }
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the context pointer the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn vlan_present(ctx: &TcContext) -> bool {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

#[inline(always)]
fn same_ipv4(a: [u8; 4], b: [u8; 4]) -> bool {
    u32::from_ne_bytes(a) == u32::from_ne_bytes(b)
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let ifindex = ingress_ifindex(ctx);
    // SAFETY: the value is copied out at once; hash entries may be replaced later.
    let iface = match unsafe { POD_INTERFACES.get(ifindex) } {
        Some(iface) => *iface,
        None => return Err(DropReason::UnknownInterface),
    };

    // veth's VLAN offload moves an 802.1Q tag out of the frame into skb
    // metadata before TC runs, so a tagged frame looks untagged here.
    if vlan_present(ctx) {
        return Err(DropReason::VlanTagged);
    }
    pull_headers(ctx);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at checked the bounds.
    let proto = u16::from_be_bytes(unsafe { (*eth).proto });
    match proto {
        ETH_P_IP => ipv4(ctx, iface.pod_ipv4),
        ETH_P_ARP => arp(ctx, ifindex, iface.pod_ipv4, iface.host_mac),
        ETH_P_8021Q | ETH_P_8021AD => Err(DropReason::VlanTagged),
        // IPv6 and everything else: the host stack decides (no IPv6 datapath yet).
        _ => Ok(Verdict::HostStack),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, pod_ipv4: [u8; 4]) -> Result<Verdict, DropReason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;

    // SAFETY (this block and below): both pointers were bounds-checked by ptr_at.
    let version_ihl = unsafe { (*ip).version_ihl };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(DropReason::MalformedIpv4);
    }
    let total_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let frame_l3_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if total_len < header_len || total_len > frame_l3_len {
        return Err(DropReason::MalformedIpv4);
    }

    if !same_ipv4(unsafe { (*ip).saddr }, pod_ipv4) {
        return Err(DropReason::SpoofedSource);
    }

    let key = EndpointKey {
        ipv4: unsafe { (*ip).daddr },
    };
    // SAFETY: copied out at once.
    let endpoint = match unsafe { ENDPOINTS.get(key) } {
        Some(endpoint) => *endpoint,
        None => return Ok(Verdict::HostStack),
    };

    // We route, so we own the TTL: nothing downstream decrements it for us.
    let ttl = unsafe { (*ip).ttl };
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    let protocol = unsafe { (*ip).protocol };
    let old_word = u16::from_be_bytes([ttl, protocol]);
    let new_word = u16::from_be_bytes([ttl - 1, protocol]);
    unsafe {
        let check = u16::from_be_bytes((*ip).check);
        (*ip).ttl = ttl - 1;
        (*ip).check = csum_replace16(check, old_word, new_word).to_be_bytes();
        (*eth).dst = endpoint.pod_mac;
        (*eth).src = endpoint.host_mac;
    }
    Ok(Verdict::Deliver {
        host_ifindex: endpoint.host_ifindex,
    })
}

#[inline(always)]
fn arp(
    ctx: &TcContext,
    ifindex: u32,
    pod_ipv4: [u8; 4],
    host_mac: [u8; 6],
) -> Result<Verdict, DropReason> {
    let arp: *mut ArpEthIpv4 = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedArp)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;

    // SAFETY (all derefs below): bounds-checked by ptr_at.
    let (htype, ptype, hlen, plen) = unsafe {
        (
            u16::from_be_bytes((*arp).htype),
            u16::from_be_bytes((*arp).ptype),
            (*arp).hlen,
            (*arp).plen,
        )
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
