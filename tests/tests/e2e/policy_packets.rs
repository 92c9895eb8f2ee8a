//! NetworkPolicy at packet level: the real programs (BPF_PROG_TEST_RUN) on
//! crafted frames, with policy maps written as the agent writes them.
//! What the lab's TCP/UDP probes cannot show: SCTP (this kernel has none),
//! which refusals are answered, fragments, ICMP errors, replies.

use std::net::Ipv4Addr;

use datapath_agent::{
    bpf::{
        Datapath,
        policy::{PolicyMaps, PolicyRule},
    },
    model::RemoteRoute,
};
use datapath_common::{
    DropReason, Endpoint, ForwardPath, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, NodeConfig, POLICY_EGRESS,
    POLICY_INGRESS, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PodInterface, PolicyRuleKey, RoutingMode,
    program_names,
};
use datapath_tests::{packets::*, require_root};

const POD_A: [u8; 4] = [10, 244, 1, 10];
const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0a];
const HOST_A_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x0a];
const POD_B: [u8; 4] = [10, 244, 1, 11];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const PEER_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 2];
const ID_A: u32 = 11;
const ID_B: u32 = 12;
const ID_REMOTE: u32 = 13;

/// Pod A sends on the run device (also the uplink), pods A and B are local
/// endpoints, 10.244.2.0/24 is a native peer's; then `policy`.
fn harness(policy: &PolicyMaps) -> (Datapath, RunDevice) {
    // (The hairpin address routed out of the uplink, as a default route
    // would: only policy stands between it and the pods.)
    let device =
        RunDevice::new(HOST_A_MAC, &["10.244.2.0/24 via 192.0.2.2", "169.254.42.0/24 via 192.0.2.2"]);
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (verifier)");
    dp.insert_pod_interface(
        device.ifindex,
        PodInterface { pod_ipv4: POD_A, host_mac: HOST_A_MAC, isolation: 0, _pad: 0, traffic_slot: 0 },
    )
    .unwrap();
    for (ip, ifindex, slot) in [(POD_A, 4241, 0), (POD_B, 4242, 1)] {
        dp.insert_endpoint(
            Ipv4Addr::from(ip),
            Endpoint {
                host_ifindex: ifindex,
                pod_mac: [0x02, 0xaa, 0, 0, 0, ip[3]],
                host_mac: [0x02, 0xee, 0, 0, 0, ip[3]],
                flags: 0,
                traffic_slot: slot,
            },
        )
        .unwrap();
    }
    dp.set_node_config(NodeConfig {
        node_ipv4: RUN_DEVICE_IP,
        mode: RoutingMode::Native as u32,
        uplink_ifindex: device.ifindex,
        vxlan_ifindex: 0,
        vni: 1,
        flags: 0,
        vxlan_port: 8472u16.to_be_bytes(),
        pod_cidr: [10, 244, 1, 0],
        pod_prefix_len: 24,
        _pad: 0,
        pod_mtu: 1500,
        conntrack_max_per_client: 0,
        host_netns_cookie: 0,
    })
    .unwrap();
    dp.sync_remote_nodes(&[RemoteRoute {
        pod_cidr: "10.244.2.0/24".parse().unwrap(),
        node_ip: Ipv4Addr::new(192, 0, 2, 2),
    }])
    .unwrap();
    dp.write_policy_maps(&PolicyMaps::default(), policy).unwrap();
    (dp, device)
}

/// The three pods' identities, and `isolated` pods with `rules`.
fn policy(isolated: &[([u8; 4], u32)], rules: &[PolicyRule]) -> PolicyMaps {
    let mut maps = PolicyMaps::default();
    for (ip, id) in [(POD_A, ID_A), (POD_B, ID_B), (REMOTE_POD, ID_REMOTE)] {
        maps.peers.insert(Ipv4Addr::from(ip).into(), id);
    }
    for (ip, flags) in isolated {
        maps.endpoints.insert(Ipv4Addr::from(*ip), *flags);
    }
    maps.rules.extend(rules.iter().copied());
    maps
}

fn rule(endpoint: [u8; 4], direction: u32, peer: u32, protocol: u8, port: Option<u16>) -> PolicyRule {
    PolicyRule {
        prefix_len: match (protocol, port) {
            (0, _) => POLICY_PREFIX_ANY_PROTOCOL,
            (_, None) => POLICY_PREFIX_ANY_PROTOCOL + 8,
            (_, Some(_)) => POLICY_PREFIX_FULL,
        },
        key: PolicyRuleKey {
            endpoint,
            identity: peer.to_be_bytes(),
            direction: direction as u8,
            protocol,
            port: port.unwrap_or(0).to_be_bytes(),
        },
    }
}

fn from_a(ip: &Ipv4) -> Vec<u8> {
    ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &ip.bytes())
}

/// An SCTP packet (common header, then an INIT chunk; the CRC is not
/// checked on this path).
fn sctp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Ipv4 {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0; 8]);
    s.extend_from_slice(&[1, 0, 0, 20]);
    s.extend_from_slice(&[0; 16]);
    Ipv4 { src, dst, ttl: 64, protocol: IPPROTO_SCTP, options: vec![], frag: 0x4000, payload: s }
}

/// B admits only SCTP to port 80 from A.
#[test]
fn sctp_ports_are_judged_like_tcp_and_udp() {
    require_root!();
    let maps =
        policy(&[(POD_B, POLICY_INGRESS)], &[rule(POD_B, POLICY_INGRESS, ID_A, IPPROTO_SCTP, Some(80))]);
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&sctp(POD_A, 5000, POD_B, 80)))
        .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&sctp(POD_A, 5000, POD_B, 81)))
        .assert_answered(DropReason::PolicyDeniedIngress);
    // TCP to the same port: another protocol, refused.
    let (dp, device) = harness(&maps);
    test_run_on(
        &device,
        &dp,
        program_names::FROM_POD,
        &from_a(&Ipv4::tcp(POD_A, 5000, POD_B, 80, TCP_SYN, b"")),
    )
    .assert_answered(DropReason::PolicyDeniedIngress);
}

/// A refused SYN is answered with ICMP administratively prohibited from the
/// address it was sent to; a refused segment of no tracked connection is
/// dropped without an answer.
#[test]
fn a_refused_syn_is_answered_a_refused_segment_dropped() {
    require_root!();
    let maps = policy(&[(POD_A, POLICY_EGRESS)], &[rule(POD_A, POLICY_EGRESS, ID_B, IPPROTO_TCP, Some(80))]);
    let (dp, device) = harness(&maps);
    let run = test_run_on(
        &device,
        &dp,
        program_names::FROM_POD,
        &from_a(&Ipv4::tcp(POD_A, 40000, POD_B, 81, TCP_SYN, b"")),
    );
    run.assert_answered(DropReason::PolicyDeniedEgress);
    let reply = Parsed::new(&run.out);
    assert_eq!((reply.src, reply.dst, reply.protocol), (POD_B, POD_A, 1), "from B to A, ICMP");
    assert_eq!((reply.l4[0], reply.l4[1]), (3, 13), "destination unreachable, administratively prohibited");
    let (dp, device) = harness(&maps);
    test_run_on(
        &device,
        &dp,
        program_names::FROM_POD,
        &from_a(&Ipv4::tcp(POD_A, 40000, POD_B, 81, TCP_ACK, b"x")),
    )
    .assert_only_drop(DropReason::PolicyDeniedEgress);
    let (dp, device) = harness(&maps);
    test_run_on(
        &device,
        &dp,
        program_names::FROM_POD,
        &from_a(&Ipv4::tcp(POD_A, 40000, POD_B, 80, TCP_SYN, b"")),
    )
    .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
}

/// A datagram's first fragment is judged; a later one carries no ports and
/// passes (useless to the receiver without its first).
#[test]
fn first_fragments_are_judged_later_ones_pass() {
    require_root!();
    let maps =
        policy(&[(POD_B, POLICY_INGRESS)], &[rule(POD_B, POLICY_INGRESS, ID_A, IPPROTO_UDP, Some(53))]);
    let mut first = Ipv4::udp(POD_A, 40000, POD_B, 5353, &[7; 64], true);
    first.frag = 0x2000;
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&first))
        .assert_answered(DropReason::PolicyDeniedIngress);
    let mut allowed = Ipv4::udp(POD_A, 40000, POD_B, 53, &[7; 64], true);
    allowed.frag = 0x2000;
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&allowed))
        .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    let later = Ipv4 {
        src: POD_A,
        dst: POD_B,
        ttl: 64,
        protocol: IPPROTO_UDP,
        options: vec![],
        frag: 9,
        payload: vec![7; 64],
    };
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&later))
        .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
}

/// An ICMP error `from` -> `to` quoting a UDP packet `quoted_src` -> `quoted_dst`.
fn icmp_error(from: [u8; 4], to: [u8; 4], quoted_src: [u8; 4], quoted_dst: [u8; 4]) -> Ipv4 {
    let quoted = Ipv4::udp(quoted_src, 53, quoted_dst, 40000, b"", true).bytes();
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[..28]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ipv4 { src: from, dst: to, ttl: 64, protocol: 1, options: vec![], frag: 0, payload: icmp }
}

/// An ICMP error reaches an isolated pod only about a connection policy
/// allowed (tracked): not about what the pod supposedly sent, which anyone
/// can claim (a channel into a quarantined pod).
#[test]
fn icmp_errors_reach_an_isolated_pod_only_about_tracked_connections() {
    require_root!();
    let maps = policy(&[(POD_B, POLICY_INGRESS)], &[]);
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&icmp_error(POD_A, POD_B, POD_B, POD_A)))
        .assert_only_drop(DropReason::PolicyDeniedIngress);
    // A's query to the remote pod is tracked (A is isolated); the remote
    // pod's error about it comes in, one about another port does not.
    let maps = policy(
        &[(POD_A, POLICY_INGRESS | POLICY_EGRESS)],
        &[rule(POD_A, POLICY_EGRESS, ID_REMOTE, IPPROTO_UDP, Some(53))],
    );
    let (dp, device) = harness(&maps);
    let query = from_a(&Ipv4::udp(POD_A, 40000, REMOTE_POD, 53, b"query", true));
    test_run_on(&device, &dp, program_names::FROM_POD, &query);
    let from_peer = |ip: &Ipv4| ethernet(HOST_A_MAC, PEER_MAC, ETH_P_IP, &ip.bytes());
    // icmp_error quotes a UDP packet 53 -> 40000 from its third argument.
    let about = |quoted_sport: u16| {
        let quoted = Ipv4::udp(POD_A, 40000, REMOTE_POD, quoted_sport, b"", true).bytes();
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[..28]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        from_peer(&Ipv4 {
            src: REMOTE_POD,
            dst: POD_A,
            ttl: 64,
            protocol: 1,
            options: vec![],
            frag: 0,
            payload: icmp,
        })
    };
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &about(53));
    assert_eq!(
        run.counters.forward_count(ForwardPath::LocalDelivery),
        1,
        "the error about the query comes in"
    );
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &about(54));
    assert_eq!(
        run.counters.drop_count(DropReason::PolicyDeniedIngress),
        1,
        "one about nothing tracked does not"
    );
}

/// What the red team found, each now refused: a TCP SYN whose first
/// fragment is too short for the flags (RFC 1858), a packet too big for
/// the pod without DF (it went to the host stack, which knows no policy),
/// a source forged as the hairpin address from outside.
#[test]
fn tiny_fragments_oversized_packets_and_the_hairpin_address_are_judged() {
    require_root!();
    let maps = policy(&[(POD_B, POLICY_INGRESS), (POD_A, POLICY_INGRESS)], &[]);
    let syn = Ipv4::tcp(POD_A, 40000, POD_B, 80, TCP_SYN, b"");
    let tiny = Ipv4 { frag: 0x2000, payload: syn.payload[..8].to_vec(), ..syn.clone() };
    let (dp, device) = harness(&maps);
    test_run_on(&device, &dp, program_names::FROM_POD, &from_a(&tiny))
        .assert_only_drop(DropReason::PolicyDeniedIngress);
    let from_peer = |ip: &Ipv4| ethernet(HOST_A_MAC, PEER_MAC, ETH_P_IP, &ip.bytes());
    let mut big = Ipv4::udp(REMOTE_POD, 40000, POD_A, 80, &[1; 1600], true);
    big.frag = 0;
    let (dp, device) = harness(&maps);
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &from_peer(&big));
    assert_eq!(
        run.counters.drop_count(DropReason::PolicyDeniedIngress),
        1,
        "not handed to the host stack: {:?}",
        run.counters
    );
    assert_eq!(run.counters.forward_count(ForwardPath::ToHostStack), 0);
    let forged = Ipv4::udp([169, 254, 42, 1], 40000, POD_A, 80, b"x", true);
    let (dp, device) = harness(&maps);
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &from_peer(&forged));
    assert_eq!(
        run.counters.drop_count(DropReason::PolicyDeniedIngress),
        1,
        "the hairpin address is no free pass"
    );
}

/// An egress-isolated pod opens nothing to its own node unless a rule
/// allows it (the Kubernetes documentation exempts the node for ingress
/// only); what opens nothing (replies to the node's probes) passes.
#[test]
fn egress_to_the_own_node_is_judged_when_it_opens_a_connection() {
    require_root!();
    let maps = policy(&[(POD_A, POLICY_EGRESS)], &[]);
    let (dp, device) = harness(&maps);
    let syn = from_a(&Ipv4::tcp(POD_A, 40000, RUN_DEVICE_IP, 10250, TCP_SYN, b""));
    test_run_on(&device, &dp, program_names::FROM_POD, &syn).assert_answered(DropReason::PolicyDeniedEgress);
    let (dp, device) = harness(&maps);
    let reply = from_a(&Ipv4::tcp(POD_A, 8080, RUN_DEVICE_IP, 40000, TCP_ACK, b"HTTP/1.1 200 OK"));
    test_run_on(&device, &dp, program_names::FROM_POD, &reply)
        .assert_only_forward(ForwardPath::ToHostStack, 0);
}

/// A may only send to the remote pod's UDP 53 and is isolated for ingress
/// with no rule: the answer to its query comes in, a datagram from the same
/// pod to another port of A does not.
#[test]
fn replies_pass_where_the_connection_was_allowed_and_nothing_else_does() {
    require_root!();
    let maps = policy(
        &[(POD_A, POLICY_INGRESS | POLICY_EGRESS)],
        &[rule(POD_A, POLICY_EGRESS, ID_REMOTE, IPPROTO_UDP, Some(53))],
    );
    let (dp, device) = harness(&maps);
    let query = from_a(&Ipv4::udp(POD_A, 40000, REMOTE_POD, 53, b"query", true));
    let run = test_run_on(&device, &dp, program_names::FROM_POD, &query);
    assert_eq!(run.counters.forward_count(ForwardPath::ToRemoteNative), 1, "the query leaves for the peer");
    let from_peer = |ip: &Ipv4| ethernet(HOST_A_MAC, PEER_MAC, ETH_P_IP, &ip.bytes());
    let answer = from_peer(&Ipv4::udp(REMOTE_POD, 53, POD_A, 40000, b"answer", true));
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &answer);
    assert_eq!(run.counters.forward_count(ForwardPath::LocalDelivery), 1, "the answer is delivered");
    let other = from_peer(&Ipv4::udp(REMOTE_POD, 53, POD_A, 40001, b"unasked", true));
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &other);
    assert_eq!(run.counters.drop_count(DropReason::PolicyDeniedIngress), 1, "an unasked datagram is refused");
    // A SYN to the remote pod: not what A's egress allows.
    let syn = from_a(&Ipv4::tcp(POD_A, 40002, REMOTE_POD, 53, TCP_SYN, b""));
    let run = test_run_on(&device, &dp, program_names::FROM_POD, &syn);
    assert_eq!(run.counters.drop_count(DropReason::PolicyDeniedEgress), 1);
}

/// A SYN on the 5-tuple of a connection that is over opens a new
/// connection, which today's rules judge: while the rule allows it, it
/// passes; after the rule is gone, it is refused even though the old
/// connection's entry is still in its closing time (netfilter drops a
/// closed entry on a new SYN the same way). A SYN on a connection that is
/// still open (a retransmission) is not judged again.
#[test]
fn a_syn_on_a_closed_connections_tuple_is_judged_afresh() {
    require_root!();
    let allow =
        policy(&[(POD_A, POLICY_INGRESS)], &[rule(POD_A, POLICY_INGRESS, ID_REMOTE, IPPROTO_TCP, Some(80))]);
    let deny = policy(&[(POD_A, POLICY_INGRESS)], &[]);
    let from_peer = |flags: u8| {
        ethernet(HOST_A_MAC, PEER_MAC, ETH_P_IP, &Ipv4::tcp(REMOTE_POD, 45679, POD_A, 80, flags, b"").bytes())
    };
    let from_pod = |flags: u8| from_a(&Ipv4::tcp(POD_A, 80, REMOTE_POD, 45679, flags, b""));
    // (Counters add up over the runs: each check is of what one run added.)
    let in_ok = |dp: &Datapath, device: &RunDevice, flags: u8, what: &str| {
        let before = dp.counters().unwrap().forward_count(ForwardPath::LocalDelivery);
        let run = test_run_on(device, dp, program_names::FROM_UPLINK, &from_peer(flags));
        assert_eq!(run.counters.forward_count(ForwardPath::LocalDelivery), before + 1, "{what} is delivered");
    };
    let out_ok = |dp: &Datapath, device: &RunDevice, flags: u8| {
        let before = dp.counters().unwrap().forward_count(ForwardPath::ToRemoteNative);
        let run = test_run_on(device, dp, program_names::FROM_POD, &from_pod(flags));
        assert_eq!(run.counters.forward_count(ForwardPath::ToRemoteNative), before + 1, "A's segment leaves");
    };
    let close = |dp: &Datapath, device: &RunDevice| {
        out_ok(dp, device, TCP_FIN | TCP_ACK);
        in_ok(dp, device, TCP_FIN | TCP_ACK, "the peer's FIN");
        in_ok(dp, device, TCP_ACK, "the last ACK");
    };
    let (mut dp, device) = harness(&allow);
    // A whole connection, closed normally.
    in_ok(&dp, &device, TCP_SYN, "the allowed SYN");
    in_ok(&dp, &device, TCP_SYN, "a retransmitted SYN of an opening connection");
    out_ok(&dp, &device, TCP_SYN | TCP_ACK);
    in_ok(&dp, &device, TCP_ACK, "the handshake's ACK");
    close(&dp, &device);
    // While allowed, the tuple is used again: a new connection, tracked
    // afresh (its segments pass as an open connection's).
    in_ok(&dp, &device, TCP_SYN, "a SYN reusing the closed tuple while allowed");
    out_ok(&dp, &device, TCP_SYN | TCP_ACK);
    in_ok(&dp, &device, TCP_ACK, "the new handshake's ACK");
    in_ok(&dp, &device, TCP_SYN, "a SYN on the open connection (not over: no new judgement)");
    close(&dp, &device);
    // The allow is taken away; the closed entry is still there.
    dp.write_policy_maps(&allow, &deny).unwrap();
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &from_peer(TCP_SYN));
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "the refused SYN is answered");
    assert_eq!(run.counters.drop_count(DropReason::PolicyDeniedIngress), 1, "the SYN on the closed tuple");
    // Nothing of the old connection is left to ride on.
    let run = test_run_on(&device, &dp, program_names::FROM_UPLINK, &from_peer(TCP_ACK));
    assert_eq!(run.verdict, TC_ACT_SHOT, "a late ACK of the old connection");
    assert_eq!(
        run.counters.drop_count(DropReason::PolicyDeniedIngress),
        2,
        "a late ACK of the old connection"
    );
}
