//! Cross-node forwarding in a lab of simulated nodes: node namespaces whose
//! uplinks are plugged into one bridge (the physical network), pods made by
//! the real CNI plugin, an outside host on the same network. Every test runs
//! in both modes: native routing and VXLAN overlay.

use std::{
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use datapath_tests::{
    lab::{
        Fabric, Netns, Node, Pod, in_netns, peered_nodes, ping, ping_from_spoofed_address, send_vxlan,
        tcp_echo,
    },
    packets::{ETH_P_IP, Ipv4, ethernet},
    require_root, sh, wait_for,
};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 200);

struct Lab {
    // Drop order: pods before nodes before the fabric.
    pods: Vec<Pod>,
    a: Node,
    b: Node,
    outside: Netns,
    _fabric: Fabric,
}

fn lab(mode: &str) -> Lab {
    let fabric = Fabric::new();
    let outside = fabric.add_host("outside", OUTSIDE_IP);
    let (a, b) = peered_nodes(&fabric, mode);
    let pods = vec![a.add_pod("a1"), a.add_pod("a2"), b.add_pod("b1")];
    Lab { pods, a, b, outside, _fabric: fabric }
}

fn pod_mtu(mode: &str) -> u32 {
    if mode == "vxlan" { 1450 } else { 1500 }
}

/// Who connected to a TCP server in `ns` on `ip`: accept one connection from
/// a client in `client_ns` and return the peer address the server saw.
fn source_seen_by(server_ns: &Netns, ip: Ipv4Addr, client_ns: &Netns) -> Ipv4Addr {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_netns(&server_ns.path(), move || {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        let (_, peer) = listener.accept().unwrap();
        peer.ip()
    });
    let port = rx.recv().unwrap();
    assert!(
        client_ns.exec_ok(&["timeout", "5", "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")]),
        "connect to {ip}:{port}"
    );
    match server.join().unwrap() {
        std::net::IpAddr::V4(v4) => v4,
        other => panic!("IPv6 peer {other}"),
    }
}

fn cross_node(mode: &str) {
    let lab = lab(mode);
    let [a1, a2, b1] = [&lab.pods[0], &lab.pods[1], &lab.pods[2]];

    // Pod to pod across nodes, both ways, and on the same node still.
    assert!(ping(&a1.netns, b1.ip, 3), "{mode}: ping a1 -> b1");
    assert!(ping(&b1.netns, a1.ip, 3), "{mode}: ping b1 -> a1");
    assert!(ping(&a2.netns, a1.ip, 2), "{mode}: same node");
    tcp_echo(&b1.netns, b1.ip, &a1.netns, 4 << 20).expect("TCP a1 -> b1");
    tcp_echo(&a2.netns, a2.ip, &b1.netns, 4 << 20).expect("TCP b1 -> a2");

    // Node to remote pod (and its replies), pod to remote node.
    assert!(ping(&lab.a.netns, b1.ip, 2), "{mode}: node a -> pod b1");
    assert!(ping(&b1.netns, lab.a.node_ip, 2), "{mode}: pod b1 -> node a");
    tcp_echo(&b1.netns, b1.ip, &lab.a.netns, 1 << 20).expect("TCP node a -> b1");
    tcp_echo(&lab.b.netns, lab.b.node_ip, &a1.netns, 1 << 20).expect("TCP a1 -> node b");

    // Pod to outside: masqueraded to the node's address, replies come back.
    assert!(ping(&a1.netns, OUTSIDE_IP, 2), "{mode}: pod -> outside");
    assert_eq!(source_seen_by(&lab.outside, OUTSIDE_IP, &a1.netns), lab.a.node_ip, "{mode}: SNAT to node A");
    assert_eq!(source_seen_by(&lab.outside, OUTSIDE_IP, &b1.netns), lab.b.node_ip, "{mode}: SNAT to node B");
    // Pod to pod is never masqueraded.
    assert_eq!(source_seen_by(&b1.netns, b1.ip, &a1.netns), a1.ip, "{mode}: pod source kept across nodes");

    // MTU: DF at exactly the pod MTU passes; one byte more is refused with
    // "message too long", not lost.
    let mtu = pod_mtu(mode);
    let link = sh(&["ip", "-n", &a1.netns.name, "link", "show", "eth0"]);
    assert!(link.contains(&format!("mtu {mtu}")), "{mode}: pod MTU {mtu}: {link}");
    let fits = (mtu - 28).to_string();
    let too_big = (mtu - 27).to_string();
    assert!(
        a1.netns.exec_ok(&["ping", "-c", "2", "-W", "2", "-M", "do", "-s", &fits, &b1.ip.to_string()]),
        "{mode}: DF ping of {fits} bytes"
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &a1.netns.name, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", &too_big])
        .arg(b1.ip.to_string())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("message too long"), "{mode}: {text}");
    // Large TCP segments across the tunnel/uplink (PMTU right, no fragments lost).
    tcp_echo(&b1.netns, b1.ip, &a1.netns, 16 << 20).expect("bulk TCP a1 -> b1");

    // Spoofed pod source on the way out is dropped on the sending node.
    let before = lab.a.drop_count("spoofed_source");
    assert!(!ping_from_spoofed_address(a1, "10.244.1.250", b1.ip, 2));
    assert!(lab.a.drop_count("spoofed_source") >= before + 2, "{mode}: spoofed source counted");

    // The right paths were used, and nothing was dropped elsewhere.
    let path = if mode == "vxlan" { "to_remote_overlay" } else { "to_remote_native" };
    for node in [&lab.a, &lab.b] {
        let counters = node.inspect("counters");
        assert!(counters["forwards"][path].as_u64().unwrap() > 10, "{mode}: {counters}");
        for (reason, n) in counters["drops"].as_object().unwrap() {
            if reason != "spoofed_source" {
                assert_eq!(n.as_u64(), Some(0), "{mode}: unexpected drops of {reason}: {counters}");
            }
        }
    }
    let nodes = lab.a.inspect("nodes");
    assert_eq!(
        nodes,
        serde_json::json!([{ "pod_cidr": "10.244.2.0/24", "node_ip": "10.250.0.2", "mode": mode }])
    );
}

#[test]
fn cross_node_native_routing() {
    require_root!();
    cross_node("native");
}

#[test]
fn cross_node_vxlan_overlay() {
    require_root!();
    cross_node("vxlan");
}

#[test]
fn forged_vxlan_from_an_unknown_host_is_dropped() {
    require_root!();
    let lab = lab("vxlan");
    let a1 = &lab.pods[0];
    // The outside host builds its own VXLAN towards node A, with the
    // cluster's VNI and port, and claims an address in node B's pod CIDR.
    let o = &lab.outside.name;
    sh(&[
        "ip",
        "-n",
        o,
        "link",
        "add",
        "dptvx",
        "type",
        "vxlan",
        "id",
        "1",
        "remote",
        "10.250.0.1",
        "dstport",
        "8472",
    ]);
    sh(&["ip", "-n", o, "addr", "add", "10.244.2.99/24", "dev", "dptvx"]);
    sh(&["ip", "-n", o, "link", "set", "dptvx", "up"]);
    sh(&["ip", "-n", o, "route", "add", "10.244.1.0/24", "dev", "dptvx"]);
    sh(&["ip", "-n", o, "neigh", "add", &a1.ip.to_string(), "lladdr", "ee:ee:ee:ee:ee:01", "dev", "dptvx"]);
    let before = lab.a.drop_count("unknown_tunnel_source");
    assert!(!lab.outside.exec_ok(&["ping", "-c", "3", "-i", "0.2", "-W", "1", &a1.ip.to_string()]));
    let after = lab.a.drop_count("unknown_tunnel_source");
    assert!(after >= before + 3, "unknown_tunnel_source {before} -> {after}");
    assert_eq!(
        lab.a.inspect("counters")["forwards"]["local_delivery"].as_u64(),
        Some(0),
        "nothing delivered"
    );
}

#[test]
fn forged_vxlan_from_a_peer_node_is_dropped_with_its_reason() {
    require_root!();
    let lab = lab("vxlan");
    let a1 = &lab.pods[0];
    let monitor = lab.a.monitor(&["--count", "3", "--seconds", "20"]);
    let inner_to = |src: [u8; 4], dst: [u8; 4]| {
        let ip = Ipv4::icmp_echo(src, dst).bytes();
        ethernet([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2], ETH_P_IP, &ip)
    };
    let inner = |src: [u8; 4]| inner_to(src, a1.ip.octets());
    // From node B's own address (a known tunnel source): a VNI that is not
    // the cluster's, then the right VNI with an inner source outside B's pod CIDR.
    let (b_ip, a_ip) = (lab.b.node_ip, lab.a.node_ip);
    send_vxlan(&lab.b.netns, b_ip, a_ip, 8472, 2, inner([10, 244, 2, 77]));
    send_vxlan(&lab.b.netns, b_ip, a_ip, 8472, 1, inner([10, 244, 9, 9]));
    // And a well-formed packet for an address in A's pod CIDR that no pod has.
    send_vxlan(&lab.b.netns, b_ip, a_ip, 8472, 1, inner_to([10, 244, 2, 77], [10, 244, 1, 200]));
    let (events, summary) = monitor.finish();
    let counters = lab.a.inspect("counters");
    let overlay = &counters["drops_by_direction"]["from_overlay"];
    assert_eq!(overlay["wrong_vni"].as_u64(), Some(1), "{counters}");
    assert_eq!(overlay["overlay_spoofed_source"].as_u64(), Some(1), "{counters}");
    assert_eq!(overlay["overlay_unknown_destination"].as_u64(), Some(1), "{counters}");
    let reasons: Vec<&str> = events.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["wrong_vni", "overlay_spoofed_source", "overlay_unknown_destination"], "{summary}");
    assert!(
        events.iter().all(|e| e["direction"] == "from_overlay" && e["interface"] == "dp-vxlan"),
        "{events:#?}"
    );
    assert_eq!(events[1]["source"], "10.244.9.9");
    assert_eq!(events[1]["destination"], a1.ip.to_string());
}

#[test]
fn peer_list_changes_apply_live_without_restart() {
    require_root!();
    for mode in ["native", "vxlan"] {
        let fabric = Fabric::new();
        let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), mode);
        let mut b = Node::on_fabric(&fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), mode);
        b.set_peers(vec![a.as_peer()]);
        a.start_agent();
        b.start_agent();
        let a1 = a.add_pod("a1");
        let b1 = b.add_pod("b1");
        assert!(!ping(&a1.netns, b1.ip, 1), "{mode}: A does not know B yet");

        a.set_peers(vec![b.as_peer()]);
        wait_for("peer added", Duration::from_secs(10), || a.inspect("nodes").as_array().unwrap().len() == 1);
        assert!(ping(&a1.netns, b1.ip, 2), "{mode}: after adding B to A's peers");
        // (The map is written first, the node's route a moment later.)
        wait_for("the node route", Duration::from_secs(5), || a.host_routes().contains("10.244.2.0/24"));

        // A third node appears; B's entry must not be touched.
        let c = Node::on_fabric(&fabric, "10.244.3.0/24", Ipv4Addr::new(10, 250, 0, 3), mode);
        a.set_peers(vec![b.as_peer(), c.as_peer()]);
        wait_for("second peer", Duration::from_secs(10), || {
            a.inspect("nodes").as_array().unwrap().len() == 2
        });
        assert!(ping(&a1.netns, b1.ip, 2), "{mode}: B still reachable");

        a.set_peers(vec![]);
        wait_for("peers removed", Duration::from_secs(10), || {
            a.inspect("nodes").as_array().unwrap().is_empty()
        });
        wait_for("the node route removed", Duration::from_secs(5), || {
            !a.host_routes().contains("10.244.2.0/24")
        });
        assert!(a.agent_log().contains("peer nodes programmed"), "{}", a.agent_log());

        // A bad edit is refused and changes nothing.
        a.set_peers(vec![a.as_peer()]);
        wait_for("the bad edit refused", Duration::from_secs(10), || {
            a.agent_log().contains("ignoring invalid config change")
        });
        assert!(a.inspect("nodes").as_array().unwrap().is_empty());
        drop((a1, b1));
    }
}

#[test]
fn agent_restart_keeps_cross_node_forwarding_and_state() {
    require_root!();
    for mode in ["native", "vxlan"] {
        let mut lab = lab(mode);
        let (a1, b1) = (&lab.pods[0], &lab.pods[2]);
        let routes_before = lab.a.host_routes();
        let nodes_before = lab.a.inspect("nodes");
        let vxlan_before = sh(&["ip", "-n", &lab.a.netns.name, "-o", "link", "show"]);

        lab.a.kill_agent();
        assert!(ping(&a1.netns, b1.ip, 2), "{mode}: forwarding with agent A SIGKILLed");
        assert!(ping(&b1.netns, a1.ip, 2), "{mode}: and back");
        assert!(ping(&lab.a.netns, b1.ip, 1), "{mode}: node A -> b1 with its agent down");

        lab.a.start_agent();
        assert!(ping(&a1.netns, b1.ip, 2), "{mode}: after restart");
        assert_eq!(lab.a.host_routes(), routes_before, "{mode}: routes unchanged");
        assert_eq!(lab.a.inspect("nodes"), nodes_before, "{mode}: remote nodes unchanged");
        // Same devices with the same ifindexes: nothing was recreated.
        assert_eq!(sh(&["ip", "-n", &lab.a.netns.name, "-o", "link", "show"]), vxlan_before, "{mode}: links");
        assert!(lab.a.agent_log().contains("added=0 updated=0 removed=0"), "{mode}: {}", lab.a.agent_log());
    }
}

#[test]
fn a_peer_in_the_other_mode_is_named_not_black_holed_silently() {
    require_root!();
    // Node A runs native routing, node B the overlay: each drops the
    // other's pod traffic as peer_mode_mismatch and its agent says which
    // peer, and how to fix it.
    let fabric = Fabric::new();
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let mut b = Node::on_fabric(&fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), "vxlan");
    a.set_peers(vec![b.as_peer()]);
    b.set_peers(vec![a.as_peer()]);
    a.start_agent();
    b.start_agent();
    let (a1, b1) = (a.add_pod("a1"), b.add_pod("b1"));
    // b1 -> a1 arrives at A as VXLAN; a1's attempt arrives at B unencapsulated.
    assert!(!ping(&b1.netns, a1.ip, 2), "a VXLAN packet reached a native node's pod");
    assert!(!ping(&a1.netns, b1.ip, 2), "a plain pod packet reached a VXLAN node's pod");
    assert!(a.drop_count("peer_mode_mismatch") > 0, "A counted nothing");
    assert!(b.drop_count("peer_mode_mismatch") > 0, "B counted nothing");
    let named = |node: &Node, peer: Ipv4Addr| {
        let log = node.agent_log();
        log.lines().any(|l| l.contains("runs the other routing mode") && l.contains(&peer.to_string()))
    };
    wait_for("A to name B", Duration::from_secs(10), || named(&a, b.node_ip));
    wait_for("B to name A", Duration::from_secs(10), || named(&b, a.node_ip));
    // Worded by each node's own mode.
    let line = |node: &Node| {
        node.agent_log().lines().find(|l| l.contains("runs the other routing mode")).unwrap().to_owned()
    };
    assert!(line(&a).contains("this_node=\"native\"") && line(&a).contains("it sends VXLAN"), "{}", line(&a));
    assert!(line(&b).contains("this_node=\"vxlan\"") && line(&b).contains("it sends plain"), "{}", line(&b));
    // Logged, then forgotten: a restart does not tell old history again.
    a.stop_agent();
    a.start_agent();
    std::thread::sleep(std::time::Duration::from_secs(7));
    assert!(!named(&a, b.node_ip), "logged again after a restart:\n{}", a.agent_log());
    assert_eq!(a.peer_mode_mismatch_peers(), Vec::<Ipv4Addr>::new(), "the note is gone once logged");
    drop((a1, b1));
}
