//! "From pod": TC ingress of every pod's host-side veth.
//!
//! One loaded program serves every pod; it finds out which pod is sending from
//! the ingress ifindex (`POD_INTERFACES`). It answers the pod's ARP for its
//! gateway, enforces the pod's source address, delivers to pods on this node
//! with `bpf_redirect_peer`, sends traffic for other nodes' pods (and for the
//! peer nodes themselves) straight to the peer, natively or through VXLAN, and
//! hands everything else to the host stack.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    ConntrackKey, Direction, DropReason, ETH_P_ARP, ETH_P_IP, NODE_FLAG_POLICY, NODE_FLAG_SERVICES,
    SERVICE_SCOPE_CLUSTER,
};

use crate::{
    arp::{self, ArpOutcome},
    counters::count_sent,
    forward::{deliver, forwarded_by_us, to_remote_node, too_big_for_pod},
    headers::{ETH_P_8021AD, ETH_P_8021Q, same_ipv4},
    icmp::IcmpError,
    lookup::{local_endpoint, node_config, pod_interface, remote_node_for},
    packet::Packet,
    policy::{self, Flow},
    services::{Translation, translate},
    strict,
    verdict::{Back, Verdict, apply},
};

/// The program; `LOG` selects the debug build (see [`crate::programs!`]).
#[inline(always)]
pub fn run<const LOG: bool>(ctx: TcContext) -> i32 {
    let mut packet = Packet::new(ctx);
    let verdict = classify(&mut packet);
    apply::<LOG>(&mut packet, Direction::FromPod, verdict)
}

#[inline(always)]
fn classify(packet: &mut Packet) -> Result<Verdict, DropReason> {
    let ifindex = packet.ifindex();
    let Some(iface) = pod_interface(ifindex) else {
        return Err(DropReason::UnknownInterface);
    };
    count_sent(iface.traffic_slot, packet.frame_len());
    // veth's VLAN offload moves an 802.1Q tag out of the frame into skb
    // metadata before TC runs, so a tagged frame looks untagged here.
    let (vlan_present, _) = packet.vlan();
    if vlan_present != 0 {
        return Err(DropReason::VlanTagged);
    }
    packet.pull_headers();
    match packet.ethertype().ok_or(DropReason::TruncatedEthernet)? {
        ETH_P_IP => ipv4(packet, ifindex, iface.pod_ipv4, iface.isolation as u32),
        ETH_P_ARP => {
            let mut headers = packet.arp()?;
            let (eth, arp) = headers.both_mut();
            match arp::answer(eth, arp, iface.pod_ipv4, iface.host_mac)? {
                ArpOutcome::Replied => Ok(Verdict::ArpReply { ifindex }),
                ArpOutcome::NotOurs => Ok(Verdict::HostStack),
            }
        }
        ETH_P_8021Q | ETH_P_8021AD => Err(DropReason::VlanTagged),
        // IPv6 and everything else: the host stack decides (no IPv6 datapath yet).
        _ => Ok(Verdict::HostStack),
    }
}

#[inline(always)]
fn ipv4(packet: &mut Packet, ifindex: u32, pod_ipv4: [u8; 4], isolation: u32) -> Result<Verdict, DropReason> {
    let mut headers = packet.ipv4()?;
    if !same_ipv4(headers.ip().saddr, pod_ipv4) {
        return Err(DropReason::SpoofedSource);
    }
    let config = node_config();
    let back = Back::Out { ifindex };
    // The kernel's checks before it forwards (wrong MAC, options, header
    // checksum, TTL), made before any translation so that an error quotes
    // what the pod sent. A packet that fails one is ours to refuse only if
    // we would forward it; the host stack judges the rest itself.
    if let Err(reason) = strict::frame_ok(&headers) {
        return if forwarded_by_us(&headers, &config) { Err(reason) } else { Ok(Verdict::HostStack) };
    }
    if headers.ip().ttl_expires() {
        if !forwarded_by_us(&headers, &config) {
            return Ok(Verdict::HostStack);
        }
        return Ok(Verdict::Answer {
            reason: DropReason::TtlExceeded,
            error: IcmpError::TIME_EXCEEDED,
            source: config.node_ipv4,
            back,
        });
    }
    let policy_on = config.flags & NODE_FLAG_POLICY != 0;
    // A backend's reply is judged with the addresses it left the pod with.
    let mut reply = ConntrackKey::default();
    if config.flags & NODE_FLAG_SERVICES != 0 {
        let service = headers.ip().daddr;
        headers = match translate::<false>(
            headers,
            true,
            config.conntrack_max_per_client,
            SERVICE_SCOPE_CLUSTER,
        )? {
            Translation::Forward(headers, was_reply) => {
                reply = was_reply;
                headers
            }
            Translation::Refuse(reason) => {
                // From the Service address the client asked for.
                return Ok(Verdict::Answer {
                    reason,
                    error: IcmpError::PORT_UNREACHABLE,
                    source: service,
                    back,
                });
            }
        };
    }
    let daddr = headers.ip().daddr;
    let local = local_endpoint(daddr);
    // An address of this node's pods that no pod has: not remembered.
    let unassigned = local.is_none() && config.in_pod_cidr(daddr);
    // After the Service translation: policy is about the backend pod.
    if policy_on
        && let Some(flow) =
            Flow::of(&headers).map(|flow| flow.before_translation(reply).untracked_if(unassigned))
        && let Err(refusal) =
            policy::enforce(&flow, Some(pod_ipv4), isolation, local.map_or(0, |e| e.isolation()), &config)
    {
        return refusal.verdict(daddr, back);
    }
    if let Some(endpoint) = local {
        // Pods of one node share an MTU unless one was given a smaller one.
        if let Some(verdict) = too_big_for_pod(&headers, &endpoint, &config, back, Verdict::HostStack) {
            return Ok(verdict);
        }
        return deliver(headers, &endpoint);
    }
    // The reply of a connection from outside (a node port, or an external
    // or load balancer address), now from that Service address (no pod
    // can send from another address than its own: checked above):
    // straight out to its client, as the node's stack would refuse it (a
    // source of its own, or not of the interface it came in by).
    let service_source = !same_ipv4(headers.ip().saddr, pod_ipv4);
    if same_ipv4(headers.ip().saddr, config.node_ipv4)
        || (service_source && !same_ipv4(daddr, config.node_ipv4) && remote_node_for(daddr).is_none())
    {
        headers.ip_mut().decrement_ttl()?;
        return Ok(Verdict::OutRouted { ifindex: config.uplink_ifindex });
    }
    if let Some(verdict) = to_remote_node(headers, daddr, &config) {
        return verdict;
    }
    // This node, or outside the cluster (masqueraded by the node).
    Ok(Verdict::HostStack)
}
