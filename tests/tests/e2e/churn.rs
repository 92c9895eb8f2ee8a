//! 500 pods created and deleted through the CNI plugin on one node: nothing
//! leaks (veth, route, lease, map entry, pinned link, endpoint record), the agent's memory
//! stays flat, and the time from ADD to a pod that answers ping is reported.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Netns, Node},
    require_root,
};

const PODS: usize = 500;

#[test]
fn five_hundred_pods_come_and_go_without_leaks() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let conf = node.cni_config().to_string();
    let mut add_to_ping = Vec::with_capacity(PODS);
    let mut rss_after_warmup = 0;
    for i in 0..PODS {
        let ns = Netns::new(format!("{}-churn", node.id));
        let netns = ns.path().display().to_string();
        let container = format!("churn-{i}");
        let started = Instant::now();
        let add = node.cni(&Node::cni_env("ADD", &container, &netns), conf.as_bytes());
        assert!(add.success, "ADD #{i}: {}", add.raw_stdout);
        let ip = add.stdout["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_owned();
        // The node pings the pod until it answers (kubelet's view of "ready").
        let deadline = started + Duration::from_secs(5);
        while !node.netns.exec_ok(&["ping", "-c", "1", "-W", "1", "-i", "0.01", &ip]) {
            assert!(Instant::now() < deadline, "pod #{i} never answered");
        }
        add_to_ping.push(started.elapsed());
        let mut del_conf = node.cni_config();
        del_conf["prevResult"] = add.stdout.clone();
        let del = node.cni(&Node::cni_env("DEL", &container, &netns), del_conf.to_string().as_bytes());
        assert!(del.success, "DEL #{i}: {}", del.raw_stdout);
        drop(ns);
        if i == 49 {
            rss_after_warmup = node.agent_rss_kib();
        }
    }
    let rss_end = node.agent_rss_kib();

    add_to_ping.sort();
    let median = add_to_ping[PODS / 2];
    let p99 = add_to_ping[PODS * 99 / 100];
    eprintln!(
        "{PODS} pods: ADD -> answers ping median {median:?}, p99 {p99:?}, max {:?}; agent RSS {rss_after_warmup} KiB after 50, {rss_end} KiB after {PODS}",
        add_to_ping[PODS - 1]
    );

    assert_eq!(node.host_veths(), Vec::<String>::new(), "veths left");
    assert!(!node.host_routes().contains("10.244.1."), "routes left: {}", node.host_routes());
    assert_eq!(node.ipam_leases(), Vec::<String>::new(), "leases left");
    assert_eq!(node.inspect("endpoints"), serde_json::json!([]), "map entries left");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("links")).unwrap().count(), 0, "link pins left");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("to-pod-links")).unwrap().count(), 0, "link pins left");
    assert_eq!(
        std::fs::read_dir(node.work_dir.join("state/endpoints")).unwrap().count(),
        0,
        "endpoint records left"
    );
    assert!(rss_end <= rss_after_warmup + 2048, "agent grew from {rss_after_warmup} to {rss_end} KiB");
}
