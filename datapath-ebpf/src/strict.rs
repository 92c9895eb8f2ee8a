//! The kernel's own checks on a packet it receives and forwards, for the
//! packets we forward in its place (docs/why-dropped.md, "never more
//! permissive than the kernel"). A redirect skips `ip_rcv`, the route
//! input and `ip_forward`, so whatever those would refuse we refuse here,
//! each with its own drop reason. Packets we hand to the host stack are
//! left to the kernel: it checks them itself. The checks of the header
//! alone are [`crate::headers::Ipv4Hdr::check_forwardable`].

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
    BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
    bpf_fib_lookup,
};
use datapath_common::{
    DropReason, HAIRPIN_IPV4, IP_DF, NodeConfig, RPF_CACHE_SLOTS, RPF_CACHE_USES, RoutingMode, RpfCacheEntry,
    is_martian_source,
};

use crate::{
    headers::ETH_HLEN,
    headers::IPV4_MIN_HLEN,
    lookup::{local_endpoint, remote_pod_cidr_owner},
    maps::RPF_CACHE,
    packet::{AF_INET, Ipv4Headers, PACKET_HOST, Packet},
};

/// `ip_rcv_core` and `ip_forward` on the frame itself: addressed to us
/// (not another host's MAC, not broadcast or multicast), header checksum
/// right, no options. The caller checks the TTL (it is answered, not only
/// dropped) and, for traffic from outside, the source ([`source_ok`]).
#[inline(always)]
pub fn frame_ok(headers: &Ipv4Headers<'_>) -> Result<(), DropReason> {
    if headers.packet().pkt_type() != PACKET_HOST {
        return Err(DropReason::WrongDestinationMac);
    }
    headers.ip().check_forwardable()
}

/// The route input's source checks for a packet from outside the node that
/// we would deliver into a local pod: not a martian, not this node's own
/// pod CIDR or address (a reflection or a land attack), and reachable back
/// through the interface it came in on (strict reverse path, as
/// `rp_filter=1`; the kernel's FIB decides, so the node's own routes count).
#[inline(always)]
pub fn source_ok(packet: &Packet, saddr: [u8; 4], config: &NodeConfig) -> Result<(), DropReason> {
    if is_martian_source(saddr) {
        return Err(DropReason::MartianSource);
    }
    if config.in_pod_cidr(saddr) || saddr == config.node_ipv4 {
        return Err(DropReason::ReversePath);
    }
    reverse_path_ok(packet, saddr)
}

/// `fib_validate_source` with `rp_filter=1`: the route back to `saddr` must
/// leave through the interface the packet arrived on. A FIB lookup costs
/// more than the rest of the path, so a confirmed source is remembered per
/// CPU (direct-mapped by a hash of it) for [`RPF_CACHE_USES`] packets; only
/// confirmations are remembered, so a refused source asks every time.
#[inline(always)]
fn reverse_path_ok(packet: &Packet, saddr: [u8; 4]) -> Result<(), DropReason> {
    let ingress = packet.ifindex();
    let slot = u32::from_ne_bytes(saddr).wrapping_mul(0x9e37_79b1) >> 24 & (RPF_CACHE_SLOTS - 1);
    let cached = RPF_CACHE.get_ptr_mut(slot);
    if let Some(entry) = cached {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe {
            if (*entry).saddr == saddr && (*entry).ifindex == ingress && (*entry).uses < RPF_CACHE_USES {
                (*entry).uses += 1;
                return Ok(());
            }
        }
    }
    fib_reverse_path(packet, saddr, ingress)?;
    if let Some(entry) = cached {
        // SAFETY: as above.
        unsafe { *entry = RpfCacheEntry { saddr, ifindex: ingress, uses: 0, _pad: 0 } };
    }
    Ok(())
}

/// The FIB's answer: the route to `saddr` (the neighbour table skipped, no
/// MTU check) must leave through `ingress`.
#[inline(always)]
fn fib_reverse_path(packet: &Packet, saddr: [u8; 4], ingress: u32) -> Result<(), DropReason> {
    match route_back(packet, saddr, ingress) {
        (BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH, out) if out == ingress => Ok(()),
        (BPF_FIB_LKUP_RET_FWD_DISABLED, _) => Err(DropReason::ForwardingDisabled),
        // Another interface, a local address, no route, blackhole, prohibit.
        _ => Err(DropReason::ReversePath),
    }
}

/// The FIB's route to `saddr` for a packet that came in on `ingress`: the
/// helper's result and the interface the route leaves by.
#[inline(always)]
fn route_back(packet: &Packet, saddr: [u8; 4], ingress: u32) -> (u32, u32) {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ingress;
    // A length, or the helper checks this skb against the route's MTU and
    // refuses a large one (FRAG_NEEDED): the reverse path has no MTU.
    params.__bindgen_anon_1.tot_len = IPV4_MIN_HLEN as u16;
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(saddr);
    let rc = packet.fib_lookup(&mut params, BPF_FIB_LOOKUP_SKIP_NEIGH);
    (rc as u32, params.ifindex)
}

/// Whose a source is, for a packet the node's own stack routed into a pod
/// after it came in on `came_in` ("to pod").
pub enum RoutedSource {
    /// One of the node's own addresses: the node sent it, or translated
    /// it to its own address (SNAT, masquerade). (The kernel refuses its
    /// addresses as sources from outside, unless `accept_local` is set.)
    Node,
    /// A peer that may send from where the packet came in.
    Peer,
    /// An address the packet cannot have come from where it did: a pod's
    /// from anywhere but that pod's own way in, another source not routed
    /// back the way it came (strict reverse path, as `rp_filter=1`,
    /// whatever the node's own setting).
    Forged,
}

/// See [`RoutedSource`]: a pod of this node comes in on its own veth, a
/// peer node's pod through the uplink (native) or the VXLAN device
/// (overlay), an address of this node's pod CIDR that no pod has from
/// nowhere; the node's FIB judges the rest.
#[inline(always)]
pub fn routed_source(packet: &Packet, saddr: [u8; 4], came_in: u32, config: &NodeConfig) -> RoutedSource {
    let came_right = |right: bool| if right { RoutedSource::Peer } else { RoutedSource::Forged };
    if let Some(endpoint) = local_endpoint(saddr) {
        return came_right(endpoint.host_ifindex == came_in);
    }
    if config.in_pod_cidr(saddr) {
        return RoutedSource::Forged;
    }
    if remote_pod_cidr_owner(saddr).is_some() {
        let way_in = if config.mode == RoutingMode::Vxlan as u32 {
            config.vxlan_ifindex
        } else {
            config.uplink_ifindex
        };
        return came_right(came_in == way_in);
    }
    // The hairpin address is the Service translation's, in "from pod"
    // only: whatever the node does with it, no one else sends from it.
    if is_martian_source(saddr) || saddr == HAIRPIN_IPV4 {
        return RoutedSource::Forged;
    }
    match route_back(packet, saddr, came_in) {
        (BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH, out) => came_right(out == came_in),
        // Not forwarded: a local address (broadcast and multicast are martians).
        (BPF_FIB_LKUP_RET_NOT_FWDED, _) => RoutedSource::Node,
        _ => RoutedSource::Forged,
    }
}

/// What `ip_forward`'s MTU check says of delivering a packet into a pod.
pub enum Fit {
    Fits,
    /// Larger than the pod's MTU (`mtu`); `df`: the sender forbade
    /// fragmenting it.
    TooBig {
        mtu: u32,
        df: bool,
    },
}

/// The packet against the MTU of the pod behind `host_ifindex` (its veth
/// pair has one MTU). A packet no larger than the node's pod MTU costs one
/// comparison; a larger one (or a GRO aggregate, checked segment by
/// segment) asks the device.
#[inline(always)]
pub fn fits_pod(headers: &Ipv4Headers<'_>, host_ifindex: u32, config: &NodeConfig) -> Fit {
    let packet = headers.packet();
    let l3_len = packet.frame_len().saturating_sub(ETH_HLEN as u32);
    if config.pod_mtu == 0 || l3_len <= config.pod_mtu {
        return Fit::Fits;
    }
    let mut mtu: u32 = 0;
    let rc = packet.check_mtu(host_ifindex, &mut mtu, BPF_MTU_CHK_SEGS as u64);
    // 0: it fits (a GRO aggregate whose segments do); below 0: no such
    // device, which the redirect then reports.
    if rc <= 0 {
        return Fit::Fits;
    }
    Fit::TooBig { mtu, df: headers.ip().frag_off() & IP_DF != 0 }
}
