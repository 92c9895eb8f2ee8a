//! "From overlay": TC ingress of the collect_md VXLAN device. The kernel has
//! already removed the outer headers; the tunnel metadata says who sent it.
//! Only known peer nodes, with this cluster's VNI, may send; the inner source
//! must belong to the sender (its pod CIDR or its own address). Packets for a
//! local pod go straight into it; packets for this node go to its stack.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    Direction, DropReason, ETH_P_IP, NODE_FLAG_POLICY, NODE_FLAG_SERVICES, SERVICE_SCOPE_CLUSTER,
};

use crate::{
    forward::{deliver, too_big_for_pod},
    headers::same_ipv4,
    icmp::IcmpError,
    lookup::{is_known_node, local_endpoint, node_config, remote_node_for},
    packet::Packet,
    policy::{self, Flow},
    services::{Translation, translate},
    verdict::{Back, Verdict, apply},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let mut packet = Packet::new(ctx);
    let verdict = classify(&mut packet);
    apply::<LOG>(&mut packet, Direction::FromOverlay, verdict)
}

#[inline(always)]
fn classify(packet: &mut Packet) -> Result<Verdict, DropReason> {
    let key = packet.tunnel_key().ok_or(DropReason::NoTunnelKey)?;
    // The helper gives the outer source in host byte order.
    // SAFETY: the helper filled the IPv4 member (any bits are a valid u32).
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
    let (vlan_present, _) = packet.vlan();
    if vlan_present != 0 {
        return Err(DropReason::VlanTagged);
    }
    packet.pull_headers();
    if packet.ethertype().ok_or(DropReason::TruncatedEthernet)? != ETH_P_IP {
        // Peers only tunnel IPv4 today.
        return Err(DropReason::OverlayUnknownDestination);
    }
    let mut headers = packet.ipv4()?;
    let saddr = headers.ip().saddr;
    let from_sender = same_ipv4(saddr, outer_source)
        || remote_node_for(saddr).is_some_and(|n| same_ipv4(n.node_ipv4, outer_source));
    if !from_sender {
        return Err(DropReason::OverlaySpoofedSource);
    }
    let daddr = headers.ip().daddr;
    if let Some(endpoint) = local_endpoint(daddr) {
        // What the kernel checks before it forwards, but the MAC: the inner
        // one is the sending node's choice (the sender was checked above).
        headers.ip().check_forwardable()?;
        let back =
            Back::Tunnel { vxlan_ifindex: config.vxlan_ifindex, node_ipv4: outer_source, vni: config.vni };
        if headers.ip().ttl_expires() {
            return Ok(Verdict::Answer {
                reason: DropReason::TtlExceeded,
                error: IcmpError::TIME_EXCEEDED,
                source: config.node_ipv4,
                back,
            });
        }
        // Ingress of the local pod (each node judges for its own pods),
        // before anything may hand the packet to the host stack. Judged as
        // it arrived: a Service reply is translated below, after it.
        if config.flags & NODE_FLAG_POLICY != 0
            && let Some(flow) = Flow::of(&headers)
            && let Err(refusal) = policy::enforce(&flow, None, 0, endpoint.isolation(), &config)
        {
            return refusal.verdict(daddr, back);
        }
        if let Some(verdict) =
            too_big_for_pod(&headers, &endpoint, &config, back, Verdict::HostStackFromTunnel)
        {
            return Ok(verdict);
        }
        // Replies of Service connections opened by pods on this node
        // (checked above with the backend's address, which the sender
        // owns): the source becomes the Service; the destination stays.
        if config.flags & NODE_FLAG_SERVICES != 0 {
            headers = match translate::<true>(
                headers,
                false,
                config.conntrack_max_per_client,
                SERVICE_SCOPE_CLUSTER,
            )? {
                Translation::Forward(headers, _) => headers,
                // Only new connections are refused, and only "from pod" opens them.
                Translation::Refuse(reason) => return Err(reason),
            };
        }
        return deliver(headers, &endpoint);
    }
    if same_ipv4(daddr, config.node_ipv4) {
        // The reply of a node port's connection to a backend on the sending
        // node (source NAT: sent to this node's address): back to its
        // client, straight out of the uplink.
        if config.flags & NODE_FLAG_SERVICES != 0 {
            headers = match translate::<true>(
                headers,
                false,
                config.conntrack_max_per_client,
                SERVICE_SCOPE_CLUSTER,
            )? {
                Translation::Forward(headers, _) => headers,
                Translation::Refuse(reason) => return Err(reason),
            };
            if !same_ipv4(headers.ip().daddr, config.node_ipv4) {
                headers.ip().check_forwardable()?;
                headers.ip_mut().decrement_ttl()?;
                return Ok(Verdict::OutRouted { ifindex: config.uplink_ifindex });
            }
        }
        return Ok(Verdict::HostStackFromTunnel);
    }
    Err(DropReason::OverlayUnknownDestination)
}
