//! End to end on one simulated node: the real agent in a node namespace,
//! pods made by the real CNI plugin, real pings and TCP connections.

use std::net::Ipv4Addr;

use datapath_tests::{
    lab::{Node, malformed_frames, ping, ping_from_spoofed_address, send_raw_frames, tcp_echo},
    require_root, sh, wait_for,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

fn node() -> Node {
    let mut node = Node::new("10.244.1.0/24", NODE_IP);
    node.start_agent();
    node
}

#[test]
fn pods_reach_each_other_and_the_node() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let c = node.add_pod("c");

    for (from, to) in [(&a, &b), (&b, &a), (&a, &c), (&c, &b)] {
        assert!(ping(&from.netns, to.ip, 3), "ping {} -> {}", from.ip, to.ip);
    }
    // Kubelet probes: node to pod, and the replies. And pod to node.
    assert!(ping(&node.netns, a.ip, 3), "ping node -> pod");
    assert!(ping(&a.netns, NODE_IP, 3), "ping pod -> node");
    tcp_echo(&b.netns, b.ip, &a.netns, 4 << 20).expect("TCP pod a -> pod b");
    tcp_echo(&a.netns, a.ip, &b.netns, 4 << 20).expect("TCP pod b -> pod a");
    tcp_echo(&a.netns, a.ip, &node.netns, 1 << 20).expect("TCP node -> pod a");
    tcp_echo(&node.netns, NODE_IP, &c.netns, 1 << 20).expect("TCP pod c -> node");

    let counters = node.inspect("counters");
    assert!(counters["forwards"]["local_delivery"].as_u64().unwrap() > 100, "{counters}");
    assert!(counters["forwards"]["arp_reply"].as_u64().unwrap() >= 3, "{counters}");
    for (reason, n) in counters["drops"].as_object().unwrap() {
        assert_eq!(n.as_u64(), Some(0), "unexpected drops of {reason}: {counters}");
    }

    // The endpoint map matches the pods exactly.
    let endpoints = node.inspect("endpoints");
    let mut seen: Vec<(String, String)> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["pod_ip"].as_str().unwrap().to_owned(), e["host_ifname"].as_str().unwrap().to_owned()))
        .collect();
    seen.sort();
    let mut expected: Vec<(String, String)> =
        [&a, &b, &c].iter().map(|p| (p.ip.to_string(), p.host_veth.clone())).collect();
    expected.sort();
    assert_eq!(seen, expected);

    // The pod sees what Kubernetes expects: one /32 and a default route via the link-local gateway.
    let addrs = sh(&["ip", "-n", &a.netns.name, "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("{}/32", a.ip)), "{addrs}");
    let routes = sh(&["ip", "-n", &a.netns.name, "route", "show"]);
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
}

#[test]
fn spoofed_source_from_a_pod_is_dropped() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    // The pod takes an address that is not its own and uses it.
    let before = node.drop_count("spoofed_source");
    assert!(!ping_from_spoofed_address(&a, "10.244.1.250", b.ip, 3));
    let after = node.drop_count("spoofed_source");
    assert!(after >= before + 3, "spoofed_source {before} -> {after}");
    // Its real address still works.
    assert!(ping(&a.netns, b.ip, 1));
}

#[test]
fn ttl_one_from_a_pod_is_dropped() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(!a.netns.exec_ok(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "-t", "1", &b.ip.to_string()]));
    assert_eq!(node.drop_count("ttl_exceeded"), 2);
    assert!(
        a.netns.exec_ok(&["ping", "-c", "1", "-W", "2", "-t", "2", &b.ip.to_string()]),
        "TTL 2 arrives with TTL 1"
    );
}

#[test]
fn malformed_frames_from_a_pod_are_dropped_with_their_reason() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let frames = malformed_frames(&node, &a, &b);

    let before = node.inspect("counters");
    send_raw_frames(&a.netns, "eth0", frames).unwrap();
    let reasons = ["malformed_ipv4", "vlan_tagged", "spoofed_arp"];
    let count = |counters: &serde_json::Value, reason: &str| counters["drops"][reason].as_u64().unwrap();
    wait_for("each frame counted", std::time::Duration::from_secs(5), || {
        let now = node.inspect("counters");
        reasons.iter().all(|r| count(&now, r) > count(&before, r))
    });
    let after = node.inspect("counters");
    for reason in reasons {
        let (x, y) = (before["drops"][reason].as_u64().unwrap(), after["drops"][reason].as_u64().unwrap());
        assert_eq!(y, x + 1, "{reason}: {before} -> {after}");
    }
    // And nothing broke: traffic goes on.
    assert!(ping(&a.netns, b.ip, 1));
}

#[test]
fn del_removes_veth_route_map_entry_and_lease_and_is_idempotent() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    assert_eq!(node.ipam_leases().len(), 2);
    assert!(node.bpffs_dir.join("links").join(&b.host_veth).exists());

    let del = node.del_pod(&b);
    assert!(del.success, "DEL: {}", del.raw_stdout);
    assert_eq!(node.host_veths(), vec![a.host_veth.clone()], "b's veth is gone, a's stays");
    assert!(
        !node.host_routes().contains(&format!("{} dev", b.ip)),
        "route to b is gone: {}",
        node.host_routes()
    );
    let endpoints = node.inspect("endpoints");
    let ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, vec![a.ip.to_string()]);
    assert!(!node.bpffs_dir.join("links").join(&b.host_veth).exists(), "link pin removed");
    assert_eq!(node.ipam_leases(), vec![a.ip.to_string()]);
    assert!(!sh(&["ip", "-n", &b.netns.name, "link"]).contains("eth0"), "pod interface gone");

    // DEL again, and DEL without a netns (containerd's second DEL): both succeed.
    assert!(node.del_pod(&b).success);
    let mut conf = node.cni_config();
    conf["prevResult"] = b.result.clone();
    let no_netns = node.cni(&Node::cni_env("DEL", &b.container_id, ""), conf.to_string().as_bytes());
    assert!(no_netns.success, "{}", no_netns.raw_stdout);
    // DEL of a pod that never existed.
    let never =
        node.cni(&Node::cni_env("DEL", "never-existed", ""), node.cni_config().to_string().as_bytes());
    assert!(never.success, "{}", never.raw_stdout);
    assert!(ping(&node.netns, a.ip, 1), "the other pod is untouched");
}

#[test]
fn forwarding_survives_agent_stop_kill_and_restart() {
    require_root!();
    let mut node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let endpoints_before = node.programmed_endpoints();

    node.stop_agent();
    assert!(ping(&a.netns, b.ip, 2), "forwarding with the agent stopped");
    tcp_echo(&b.netns, b.ip, &a.netns, 1 << 20).expect("TCP with the agent stopped");

    node.start_agent();
    assert!(ping(&a.netns, b.ip, 2), "forwarding after restart");
    assert_eq!(node.programmed_endpoints(), endpoints_before, "restart changed no endpoint");
    assert!(
        node.agent_log().contains("links_updated=4"),
        "both pods' two links moved to the new program:\n{}",
        node.agent_log()
    );

    node.kill_agent();
    assert!(ping(&a.netns, b.ip, 2), "forwarding with the agent SIGKILLed");
    node.start_agent();
    assert!(ping(&b.netns, a.ip, 2), "forwarding after the second restart");
    assert_eq!(node.programmed_endpoints(), endpoints_before);

    // A pod added after the restart works with the ones from before.
    let c = node.add_pod("c");
    assert!(ping(&c.netns, a.ip, 2));
}

/// The pod's namespace is deleted before DEL (a runtime that lost the
/// container; containerd's RemovePodSandbox after a vanished netns): the
/// host veth goes with it. DEL must still forget the pod's interface entry
/// (by the index the agent recorded), and a DEL sweeps entries of
/// interfaces that no longer exist, never those of live ones.
#[test]
fn del_after_the_netns_is_gone_leaves_no_interface_entry() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let index_of = |veth: &str| nix::net::if_::if_nametoindex(veth).unwrap();
    let (a_index, b_index) = datapath_tests::lab::in_netns(&node.netns.path(), {
        let (a, b) = (a.host_veth.clone(), b.host_veth.clone());
        move || (index_of(&a), index_of(&b))
    })
    .join()
    .unwrap();
    let mut both = vec![a_index, b_index];
    both.sort();
    assert_eq!(node.pod_interface_indexes(), both);

    sh(&["ip", "netns", "del", &b.netns.name]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.host_veths().contains(&b.host_veth) {
        assert!(std::time::Instant::now() < deadline, "b's veth outlived its namespace");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let del = node.del_pod(&b);
    assert!(del.success, "DEL after the netns went: {}", del.raw_stdout);
    assert_eq!(
        node.pod_interface_indexes(),
        vec![a_index],
        "b's interface entry forgotten, a's kept:\n{}",
        node.agent_log()
    );
    let endpoints = node.inspect("endpoints");
    let ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, vec![a.ip.to_string()]);
    assert!(!node.bpffs_dir.join("links").join(&b.host_veth).exists(), "b's link pin removed");

    // An entry of an interface that does not exist (left by an agent that
    // leaked it) goes at the next DEL, whoever it is for; a's stays.
    node.insert_pod_interface(0x7fff_fff0, Ipv4Addr::new(10, 244, 1, 250));
    assert_eq!(node.pod_interface_indexes(), vec![a_index, 0x7fff_fff0]);
    let never =
        node.cni(&Node::cni_env("DEL", "never-existed", ""), node.cni_config().to_string().as_bytes());
    assert!(never.success, "{}", never.raw_stdout);
    assert_eq!(node.pod_interface_indexes(), vec![a_index], "the stale entry swept, a's kept");
    assert!(ping(&node.netns, a.ip, 1), "a untouched");
}

#[test]
fn a_pod_whose_host_veth_is_down_gets_nothing_and_is_back_when_it_is_up() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    // An operator quarantines b: the kernel drops its /32 route; the agent
    // marks it down, and the programs deliver nothing more into it.
    sh(&["ip", "-n", &node.netns.name, "link", "set", &b.host_veth, "down"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.drop_count("endpoint_down") == 0 {
        assert!(std::time::Instant::now() < deadline, "no endpoint_down drop:\n{}", node.agent_log());
        let _ = ping(&a.netns, b.ip, 1);
    }
    let before = node.inspect("endpoints");
    let delivered = |endpoints: &serde_json::Value| {
        endpoints.as_array().unwrap().iter().find(|e| e["pod_ip"] == b.ip.to_string()).unwrap()["delivered_packets"]
            .as_u64()
            .unwrap()
    };
    assert!(!ping(&a.netns, b.ip, 2), "b answered while its veth was down");
    assert_eq!(
        delivered(&node.inspect("endpoints")),
        delivered(&before),
        "delivered into a pod that is down"
    );
    assert!(node.agent_log().contains("host veth down"), "{}", node.agent_log());
    // Up again: delivered, and the node reaches it again (its route back).
    sh(&["ip", "-n", &node.netns.name, "link", "set", &b.host_veth, "up"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ping(&a.netns, b.ip, 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "b unreachable after its veth came up:\n{}",
            node.agent_log()
        );
    }
    assert!(ping(&node.netns, b.ip, 2), "node -> pod: the route was not restored:\n{}", node.host_routes());
}
