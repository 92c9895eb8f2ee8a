//! Kubernetes mode against an API server that serves real Node objects
//! (tests/src/kube_api.rs): the agents learn their own pod CIDR and address
//! from their Node, program peers from the Node list as it changes (pod CIDR
//! assigned later, node deleted), ride out bookmarks, disconnects and server
//! errors without touching the maps, and the result forwards for real.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use datapath_tests::{
    kube_api::{FakeApiServer, node_object},
    lab::{Fabric, Netns, Node, http_get_local, ping},
    require_root, sh,
};

const API_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn peer_cidrs(node: &Node) -> Vec<String> {
    node.inspect("nodes")
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pod_cidr"].as_str().unwrap().to_owned())
        .collect()
}

fn health(ns: &Netns, path: &str) -> u16 {
    http_get_local(ns, 9976, path).0
}

#[test]
fn agents_follow_the_node_list_and_forward() {
    if !require_root("agents_follow_the_node_list_and_forward") {
        return;
    }
    let fabric = Fabric::new();
    // The API server sits on the physical network, as in a real cluster.
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);

    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let mut b = Node::on_fabric(&fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), "native");
    let mut c = Node::on_fabric(&fabric, "10.244.3.0/24", Ipv4Addr::new(10, 250, 0, 3), "native");
    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2"));
    // C has registered but has no pod CIDR yet.
    api.apply(node_object(&c.id, None, "10.250.0.3"));
    // An unrelated dual-stack node without an InternalIPv4 is ignored.
    let mut odd = node_object("odd", Some("fd00:10:244:9::/64"), "fd00::9");
    odd["spec"]["podCIDRs"] = serde_json::json!(["fd00:10:244:9::/64"]);
    api.apply(odd);

    for node in [&mut a, &mut b] {
        let kubeconfig = api.kubeconfig(&node.work_dir);
        node.use_kubernetes(&kubeconfig);
        node.start_agent();
    }
    wait_for("A to know B", || peer_cidrs(&a) == ["10.244.2.0/24"]);
    assert_eq!(peer_cidrs(&b), ["10.244.1.0/24"]);
    assert!(a.agent_log().contains("node facts from its Node object"), "{}", a.agent_log());
    wait_for("A ready", || health(&a.netns, "/readyz") == 200);
    assert_eq!(health(&a.netns, "/healthz"), 200);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.written_cni_config()).unwrap()).unwrap();
    assert_eq!(written["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24", "{written}");

    let a1 = a.add_pod("a1");
    let b1 = b.add_pod("b1");
    assert!(ping(&a1.netns, b1.ip, 2), "A -> B from the Node list");

    // C gets its pod CIDR later: A and B add it; C's agent can start now.
    api.apply(node_object(&c.id, Some("10.244.3.0/24"), "10.250.0.3"));
    wait_for("A to add C", || peer_cidrs(&a) == ["10.244.2.0/24", "10.244.3.0/24"]);
    let kubeconfig = api.kubeconfig(&c.work_dir);
    c.use_kubernetes(&kubeconfig);
    c.start_agent();
    wait_for("C to know A and B", || peer_cidrs(&c).len() == 2);
    let c1 = c.add_pod("c1");
    assert!(ping(&a1.netns, c1.ip, 2), "A -> C");
    assert!(ping(&c1.netns, b1.ip, 2), "C -> B");

    // Bookmarks, a label change, dropped watches and a burst of 500s: the
    // maps must not move, forwarding must not stop.
    let before = (a.inspect("nodes"), b.inspect("nodes"), c.inspect("nodes"));
    api.bookmark();
    let mut relabelled = node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2");
    relabelled["metadata"]["labels"]["tier"] = "gold".into();
    api.apply(relabelled);
    api.fail_next(4);
    api.disconnect_watches();
    std::thread::sleep(Duration::from_secs(3));
    assert!(ping(&a1.netns, b1.ip, 2), "forwarding during API trouble");
    wait_for("the watches to come back", || {
        api.requests().iter().filter(|r| r.contains("watch=")).count() >= 6
    });
    assert_eq!((a.inspect("nodes"), b.inspect("nodes"), c.inspect("nodes")), before, "maps unchanged");
    let logs = [a.agent_log(), b.agent_log(), c.agent_log()].concat();
    assert!(logs.contains("Node watch failed"), "the 500s reached an agent's watcher: {logs}");

    // B's InternalIP changes: A re-points B's CIDR (one map update and a
    // route replace), then back.
    let node_ip_of_b = |a: &Node| {
        a.inspect("nodes").as_array().unwrap().iter().find(|n| n["pod_cidr"] == "10.244.2.0/24").unwrap()["node_ip"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.12"));
    wait_for("A to follow B's new address", || node_ip_of_b(&a) == "10.250.0.12");
    assert!(a.host_routes().contains("10.244.2.0/24 via 10.250.0.12"), "{}", a.host_routes());
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2"));
    wait_for("A to follow B back", || node_ip_of_b(&a) == "10.250.0.2");
    assert!(ping(&a1.netns, b1.ip, 2), "A -> B after the address came back");

    // C is deleted: A and B stop routing to it (maps and node routes).
    api.delete(&c.id);
    wait_for("A to drop C", || peer_cidrs(&a) == ["10.244.2.0/24"]);
    wait_for("B to drop C", || peer_cidrs(&b) == ["10.244.1.0/24"]);
    assert!(!a.host_routes().contains("10.244.3.0/24"), "{}", a.host_routes());
    assert!(ping(&a1.netns, b1.ip, 1), "A -> B unaffected");
    drop((a1, b1, c1));
}

#[test]
fn kubernetes_mode_refuses_a_file_that_sets_what_the_node_decides() {
    if !require_root("kubernetes_mode_refuses_a_file_that_sets_what_the_node_decides") {
        return;
    }
    let fabric = Fabric::new();
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    let kubeconfig = api.kubeconfig(&a.work_dir);
    a.use_kubernetes(&kubeconfig);
    let mut text = std::fs::read_to_string(a.config_path()).unwrap();
    text = text.replacen("source = ", "pod_cidr = \"10.244.1.0/24\"\nsource = ", 1);
    std::fs::write(a.config_path(), text).unwrap();
    let out = a
        .in_node(&datapath_tests::bin_dir().join("datapath-agent"))
        .args(["run", "--config"])
        .arg(a.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`pod_cidr`") && stderr.contains("Node object"), "{stderr}");
}
