//! "From uplink": TC ingress of the node's uplink, in both modes. Packets
//! for a pod on this node go straight into it (`bpf_redirect_peer`) once
//! they pass the checks the kernel would make to forward them (MAC,
//! header, martian and reverse-path source, TTL); everything else (the
//! node's own traffic, ARP, VLANs, replies to masqueraded connections) is
//! the host stack's business, untouched. It also notices peers that send
//! in the other routing mode.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use datapath_common::{
    Direction, DropReason, ETH_P_IP, IP_OFFSET_MASK, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, ModeMismatch,
    NODE_FLAG_POLICY, NODE_FLAG_SERVICES, NodeConfig, NodeKey, RoutingMode, SERVICE_SCOPE_CLUSTER,
    SERVICE_SCOPE_OUTSIDE, ServiceKey,
};

use crate::{
    forward::{deliver, to_remote_node, too_big_for_pod},
    headers::{ETH_HLEN, IPV4_MIN_HLEN, IPV4_NO_OPTIONS, same_ipv4},
    icmp::IcmpError,
    lookup::{is_known_node, local_endpoint, node_config, remote_node_for, remote_pod_cidr_owner},
    maps::{PEER_MODE_MISMATCHES, SERVICES},
    packet::{Ipv4Headers, Packet},
    policy::{self, Flow},
    services::{Translation, translate},
    strict,
    verdict::{Back, Verdict, apply},
};

/// The VLAN id bits of a tag control information field.
const VLAN_VID_MASK: u32 = 0x0fff;

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let mut packet = Packet::new(ctx);
    let verdict = classify(&mut packet);
    apply::<LOG>(&mut packet, Direction::FromUplink, verdict)
}

#[inline(always)]
fn classify(packet: &mut Packet) -> Result<Verdict, DropReason> {
    packet.pull_headers();
    let uplink = packet.ifindex();
    if packet.ethertype() != Some(ETH_P_IP) {
        return Ok(Verdict::HostStack);
    }
    // A header we cannot read is not for a pod of ours: the stack decides.
    let Ok(mut headers) = packet.ipv4() else {
        return Ok(Verdict::HostStack);
    };
    let saddr = headers.ip().saddr;
    let mut daddr = headers.ip().daddr;
    let config = node_config();
    let to_node = same_ipv4(daddr, config.node_ipv4);
    // The node's own traffic (VXLAN too, in overlay mode).
    if to_node && config.mode == RoutingMode::Native as u32 && vxlan_from_peer(&headers, &config) {
        record_mode_mismatch(saddr);
        return Err(DropReason::PeerModeMismatch);
    }
    let mut endpoint = if to_node { None } else { local_endpoint(daddr) };
    // A connection from outside to a Service continues below as its local
    // backend's packet: at a node port of the node's address, or at an
    // external or load balancer address (looked up only for packets no
    // local pod is addressed by). Both are entries for clients outside
    // (the node's address at a node port also has entries for pods and
    // the node's sockets, which reach every backend).
    let mut from_outside = false;
    if endpoint.is_none() {
        if !to_node && (config.flags & NODE_FLAG_SERVICES == 0 || !outside_service(&headers)) {
            return Ok(Verdict::HostStack);
        }
        if let Some(verdict) = enter_service(headers, &config, uplink) {
            return verdict;
        }
        // Translated to a backend on this node: judged and delivered below
        // as a packet for that pod.
        headers = packet.ipv4()?;
        daddr = headers.ip().daddr;
        from_outside = true;
        endpoint = local_endpoint(daddr);
    }
    let Some(endpoint) = endpoint else {
        return Ok(Verdict::HostStack);
    };
    // For a local pod: what the kernel checks before it forwards. A frame
    // of a VLAN goes to the stack, which gives it to its VLAN device if the
    // node has one and drops it otherwise. A priority tag (VLAN 0) is no
    // VLAN: the kernel forwards it as untagged, so it gets every check
    // here (handed to the stack, it would meet only the node's own
    // rp_filter, often off).
    let (vlan_present, vlan_tci) = headers.packet().vlan();
    if vlan_present != 0 && vlan_tci & VLAN_VID_MASK != 0 {
        return Ok(Verdict::HostStack);
    }
    strict::frame_ok(&headers)?;
    if config.mode == RoutingMode::Vxlan as u32 {
        // Pod traffic of a peer must come through the tunnel.
        if let Some(peer) = remote_pod_cidr_owner(saddr) {
            record_mode_mismatch(peer.node_ipv4);
            return Err(DropReason::PeerModeMismatch);
        }
    }
    // (A packet from outside to a Service had its source checked above.)
    if !from_outside {
        strict::source_ok(headers.packet(), saddr, &config)?;
    }
    let back = Back::Out { ifindex: uplink };
    if headers.ip().ttl_expires() {
        return Ok(Verdict::Answer {
            reason: DropReason::TtlExceeded,
            error: IcmpError::TIME_EXCEEDED,
            source: config.node_ipv4,
            back,
        });
    }
    // Ingress of the local pod (each node judges for its own pods), before
    // anything may hand the packet to the host stack: the kernel's own
    // forwarding into the pod knows no policy. Judged as it arrived: a
    // Service reply is translated below, after the judgement.
    if config.flags & NODE_FLAG_POLICY != 0
        && let Some(flow) = Flow::of(&headers)
        && let Err(refusal) = policy::enforce(&flow, None, 0, endpoint.isolation(), &config)
    {
        return refusal.verdict(daddr, back);
    }
    if let Some(verdict) = too_big_for_pod(&headers, &endpoint, &config, back, Verdict::HostStack) {
        return Ok(verdict);
    }
    // Replies of Service connections opened by pods on this node: the
    // source becomes the Service again; the destination stays the pod.
    if config.flags & NODE_FLAG_SERVICES != 0 && !from_outside {
        headers =
            match translate::<false>(headers, false, config.conntrack_max_per_client, SERVICE_SCOPE_CLUSTER)?
            {
                Translation::Forward(headers, _) => headers,
                // Only new connections are refused, and only "from pod" opens them.
                Translation::Refuse(reason) => return Err(reason),
            };
    }
    deliver(headers, &endpoint)
}

/// A packet from outside the cluster to a Service address (the node's own
/// address at a node port, or an external or load balancer address): a
/// new connection gets a backend as externalTrafficPolicy says (the
/// entries of scope "outside"), a tracked one its own. Only what the
/// kernel would forward may become a pod's: a frame of a VLAN, or one the
/// forwarding checks refuse (a martian or spoofed source among them:
/// before any connection is opened for it), stays the node's. The verdict, or `None` when the
/// packet was translated for a backend on this node: then it is judged and
/// delivered as a packet for that pod. (No enum holding the headers: its
/// unset payload bytes, copied, made the verifier refuse the program.)
#[inline(always)]
fn enter_service(
    headers: Ipv4Headers<'_>,
    config: &NodeConfig,
    uplink: u32,
) -> Option<Result<Verdict, DropReason>> {
    let (saddr, daddr) = (headers.ip().saddr, headers.ip().daddr);
    let (vlan_present, vlan_tci) = headers.packet().vlan();
    if config.flags & NODE_FLAG_SERVICES == 0
        || (vlan_present != 0 && vlan_tci & VLAN_VID_MASK != 0)
        || strict::frame_ok(&headers).is_err()
        || strict::source_ok(headers.packet(), saddr, config).is_err()
    {
        return Some(Ok(Verdict::HostStack));
    }
    let back = Back::Out { ifindex: uplink };
    let translated =
        match translate::<true>(headers, true, config.conntrack_max_per_client, SERVICE_SCOPE_OUTSIDE) {
            Ok(translated) => translated,
            Err(reason) => return Some(Err(reason)),
        };
    let headers = match translated {
        Translation::Forward(headers, _) => headers,
        // A new connection whose TTL runs out here: from the node, as a router.
        Translation::Refuse(DropReason::TtlExceeded) => {
            return Some(Ok(Verdict::Answer {
                reason: DropReason::TtlExceeded,
                error: IcmpError::TIME_EXCEEDED,
                source: config.node_ipv4,
                back,
            }));
        }
        Translation::Refuse(reason) => {
            // From the address the client asked for.
            return Some(Ok(Verdict::Answer {
                reason,
                error: IcmpError::PORT_UNREACHABLE,
                source: daddr,
                back,
            }));
        }
    };
    let new_daddr = headers.ip().daddr;
    if same_ipv4(new_daddr, daddr) {
        // No Service's: the node's own (or nobody's) business.
        return Some(Ok(Verdict::HostStack));
    }
    // Only the destination changed: a backend on this node. (Or an ICMP
    // error from a router, whose source stays, about a source-NAT
    // connection: rare, so only those pay the lookup.)
    if same_ipv4(headers.ip().saddr, saddr)
        && (headers.ip().protocol != IPPROTO_ICMP || local_endpoint(new_daddr).is_some())
    {
        return None;
    }
    // Source NAT: a connection's packet for another node's backend, from
    // the node's address, or that backend's reply on its way back to the
    // client, from the Service address; or an ICMP error about one (a
    // router's keeps its source). What the kernel checks of what it
    // forwards.
    if headers.ip().ttl_expires() {
        return Some(Ok(Verdict::Answer {
            reason: DropReason::TtlExceeded,
            error: IcmpError::TIME_EXCEEDED,
            source: config.node_ipv4,
            back,
        }));
    }
    let packet = headers.into_packet();
    if remote_node_for(new_daddr).is_some()
        && let Ok(headers) = packet.ipv4()
        && let Some(verdict) = to_remote_node(headers, new_daddr, config)
    {
        return Some(verdict);
    }
    Some(out_routed(packet, uplink))
}

/// Straight out of the uplink to a client outside (the FIB picks the next
/// hop), one hop older.
#[inline(always)]
fn out_routed(packet: &mut Packet, uplink: u32) -> Result<Verdict, DropReason> {
    let mut headers = packet.ipv4()?;
    headers.ip_mut().decrement_ttl()?;
    Ok(Verdict::OutRouted { ifindex: uplink })
}

/// Is this TCP or UDP packet for an external or load balancer address of a
/// Service ([`SERVICE_SCOPE_OUTSIDE`])? A later fragment (no ports) may be
/// one's: its first fragment's translation, if any, says.
#[inline(always)]
fn outside_service(headers: &Ipv4Headers<'_>) -> bool {
    let ip = headers.ip();
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return false;
    }
    if ip.frag_off() & IP_OFFSET_MASK != 0 {
        return true;
    }
    let l4 = ETH_HLEN + (ip.version_ihl & 0x0f) as usize * 4;
    let Some(ports) = headers.packet().load::<[u8; 4]>(l4) else {
        return false;
    };
    let key = ServiceKey {
        vip: ip.daddr,
        port: [ports[2], ports[3]],
        protocol: ip.protocol,
        scope: SERVICE_SCOPE_OUTSIDE,
    };
    // SAFETY: only tested for presence.
    unsafe { SERVICES.get(key) }.is_some()
}

/// VXLAN from a known peer node to this node's VXLAN port: on a native
/// node that peer runs the overlay.
#[inline(always)]
fn vxlan_from_peer(headers: &Ipv4Headers<'_>, config: &NodeConfig) -> bool {
    let ip = headers.ip();
    if ip.protocol != IPPROTO_UDP || ip.version_ihl != IPV4_NO_OPTIONS {
        return false;
    }
    let Some(ports) = headers.packet().load::<[u8; 4]>(ETH_HLEN + IPV4_MIN_HLEN) else {
        return false;
    };
    if [ports[2], ports[3]] != config.vxlan_port {
        return false;
    }
    is_known_node(ip.saddr)
}

/// Count a packet `peer` sent in the other mode, for the agent to log.
#[inline(always)]
fn record_mode_mismatch(peer: [u8; 4]) {
    let key = NodeKey { ipv4: peer };
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match PEER_MODE_MISMATCHES.get_ptr_mut(key) {
        Some(entry) => {
            // SAFETY: a live entry. Another CPU may add at the same moment
            // and one count be lost: it only tells the agent to warn.
            unsafe {
                (*entry).packets += 1;
                (*entry).last_seen_ns = now;
            }
        }
        None => {
            let first = ModeMismatch { packets: 1, last_seen_ns: now };
            let _ = PEER_MODE_MISMATCHES.insert(key, first, BPF_NOEXIST as u64);
        }
    }
}
