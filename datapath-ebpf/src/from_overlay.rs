//! "From overlay": TC ingress of the collect_md VXLAN device. The kernel has
//! already removed the outer headers; the tunnel metadata says who sent it.
//! Only known peer nodes, with this cluster's VNI, may send; the inner source
//! must belong to the sender (its pod CIDR or its own address). Packets for a
//! local pod go straight into it; packets for this node go to its stack.

use aya_ebpf::{bindings::bpf_tunnel_key, helpers::bpf_skb_get_tunnel_key, programs::TcContext};
use datapath_common::{Direction, DropReason, ETH_P_IP, NODE_FLAG_SERVICES};

use crate::{
    forward::{deliver, too_big_for_pod, ttl_expires},
    icmp::IcmpError,
    lookup::{is_known_node, local_endpoint, node_config, remote_node_for},
    packet::{EthHdr, ethertype, ipv4_headers, ptr_at, pull_headers, same_ipv4},
    services::{Translation, translate},
    strict,
    verdict::{Back, Verdict, apply},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let verdict = classify(&ctx);
    apply::<LOG>(&ctx, Direction::FromOverlay, verdict)
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Verdict, DropReason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key; the helper fills it.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let rc = unsafe {
        bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        return Err(DropReason::NoTunnelKey);
    }
    // The helper gives the outer source in host byte order.
    let outer_source = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    if !is_known_node(outer_source) {
        return Err(DropReason::UnknownTunnelSource);
    }
    let config = node_config();
    if key.tunnel_id != config.vni {
        return Err(DropReason::WrongVni);
    }

    // The inner frame's VLAN tag, as the device's receive put it into the
    // metadata: peers never tunnel VLANs.
    // SAFETY: ctx.skb.skb is the context pointer the kernel handed us.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(DropReason::VlanTagged);
    }
    pull_headers(ctx);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    if ethertype(eth) != ETH_P_IP {
        // Peers only tunnel IPv4 today.
        return Err(DropReason::OverlayUnknownDestination);
    }
    let (mut eth, mut ip) = ipv4_headers(ctx)?;
    // SAFETY: bounds-checked by ipv4_headers.
    let saddr = unsafe { (*ip).saddr };
    let from_sender = same_ipv4(saddr, outer_source)
        || remote_node_for(saddr).is_some_and(|n| same_ipv4(n.node_ipv4, outer_source));
    if !from_sender {
        return Err(DropReason::OverlaySpoofedSource);
    }
    let daddr = unsafe { (*ip).daddr };
    if let Some(endpoint) = local_endpoint(daddr) {
        // What the kernel checks before it forwards, but the MAC: the inner
        // one is the sending node's choice (the sender was checked above).
        strict::header_ok(ip)?;
        let back =
            Back::Tunnel { vxlan_ifindex: config.vxlan_ifindex, node_ipv4: outer_source, vni: config.vni };
        if ttl_expires(ip) {
            return Ok(Verdict::Answer {
                reason: DropReason::TtlExceeded,
                error: IcmpError::TimeExceeded,
                source: config.node_ipv4,
                back,
            });
        }
        if let Some(verdict) =
            too_big_for_pod(ctx, ip, &endpoint, &config, back, Verdict::HostStackFromTunnel)
        {
            return Ok(verdict);
        }
        // Replies of Service connections opened by pods on this node
        // (checked above with the backend's address, which the sender
        // owns): the source becomes the Service; the destination stays.
        if config.flags & NODE_FLAG_SERVICES != 0 {
            if let Translation::Rewritten = translate(ctx, ip, false)? {
                (eth, ip) = ipv4_headers(ctx)?;
            }
        }
        return deliver(eth, ip, &endpoint);
    }
    if same_ipv4(daddr, config.node_ipv4) {
        return Ok(Verdict::HostStackFromTunnel);
    }
    Err(DropReason::OverlayUnknownDestination)
}
