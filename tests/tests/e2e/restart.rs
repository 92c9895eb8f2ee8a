//! The agent restarts and upgrades without interrupting forwarding, and
//! reconciles what changed while it was away.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Fabric, Netns, Node, peered_nodes, ping},
    require_root,
    traffic::{Stream, ping_flood, ping_result},
};

#[test]
fn sigkill_and_restart_under_load_lose_nothing() {
    require_root!();
    let fabric = Fabric::new();
    let (mut a, mut b) = peered_nodes(&fabric, "native");
    let a1 = a.add_pod("a1");
    let a2 = a.add_pod("a2");
    let b1 = b.add_pod("b1");
    assert!(ping(&a1.netns, b1.ip, 1));
    let state_before =
        [a.programmed_endpoints(), a.inspect("nodes"), b.programmed_endpoints(), b.inspect("nodes")];
    let sent_by = |node: &Node, ip: Ipv4Addr| -> u64 {
        let endpoints = node.inspect("endpoints");
        let endpoint = endpoints.as_array().unwrap().iter().find(|e| e["pod_ip"] == ip.to_string()).cloned();
        endpoint.unwrap()["sent_packets"].as_u64().unwrap()
    };
    let a2_sent_before = sent_by(&a, a2.ip);
    let link = a.bpffs_dir.join("links").join(&a1.host_veth);
    let prog_before = a.link_prog_id(&link);

    let tag_normal = a.link_prog_tag(&link);

    let cross = ping_flood(&a1.netns, b1.ip, 2500);
    let local = ping_flood(&a2.netns, a1.ip, 2500);
    let stream = Stream::start(&b1.netns, b1.ip, &a1.netns);
    let started = Instant::now();
    let mut progs = vec![prog_before];
    // Three SIGKILL + restarts with the same build, then an upgrade to a
    // different build (the debug build: other instructions, aya-log calls)
    // and back. Each start loads the programs anew and swaps them into the
    // pinned links with bpf_link_update, under traffic.
    let builds = ["off", "off", "off", "debug", "off"];
    let mut tags = Vec::new();
    for ebpf_log in builds {
        std::thread::sleep(Duration::from_millis(700));
        a.kill_agent();
        b.kill_agent();
        a.set_extra_config(&format!("ebpf_log = \"{ebpf_log}\"\n"));
        b.set_extra_config(&format!("ebpf_log = \"{ebpf_log}\"\n"));
        std::thread::sleep(Duration::from_millis(300));
        a.start_agent();
        b.start_agent();
        progs.push(a.link_prog_id(&link));
        tags.push(a.link_prog_tag(&link));
        if ebpf_log == "debug" {
            // The new build is the one running: its log lines arrive.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !a.agent_log().contains("local_delivery") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = a.agent_log();
            assert!(log.contains("datapath_ebpf") && log.contains("local_delivery"), "{log}");
        }
    }
    let restarts = started.elapsed();
    let (cross_tx, cross_rx) = ping_result(cross);
    let (local_tx, local_rx) = ping_result(local);
    let (stall, bytes) = stream.finish();
    eprintln!(
        "4 SIGKILL+restarts of both agents and 1 downgrade, builds {builds:?}, in {restarts:?}: \
         cross-node pings {cross_rx}/{cross_tx}, same-node pings {local_rx}/{local_tx}, TCP {} MiB with \
         longest gap {stall:?}, program ids {progs:?}, tags {tags:?}",
        bytes >> 20
    );
    assert_eq!(cross_rx, cross_tx, "cross-node pings lost");
    assert_eq!(local_rx, local_tx, "same-node pings lost");
    assert!(stall < Duration::from_millis(500), "TCP stalled for {stall:?}");
    for pair in progs.windows(2) {
        assert_ne!(pair[0], pair[1], "each restart attached a newly loaded program: {progs:?}");
    }
    for (build, tag) in builds.iter().zip(&tags) {
        if *build == "off" {
            assert_eq!(*tag, tag_normal, "same build, same instructions: {tags:?}");
        } else {
            assert_ne!(*tag, tag_normal, "the debug build is a different program: {tags:?}");
        }
    }
    let state_after =
        [a.programmed_endpoints(), a.inspect("nodes"), b.programmed_endpoints(), b.inspect("nodes")];
    assert_eq!(state_after, state_before, "maps identical after the restarts");
    // Per-pod counters live in pinned maps too: they kept counting throughout.
    let a2_sent_after = sent_by(&a, a2.ip);
    assert!(a2_sent_after >= a2_sent_before + u64::from(local_tx), "{a2_sent_before} -> {a2_sent_after}");
}

#[test]
fn changes_made_while_the_agent_is_down_are_reconciled() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    node.kill_agent();

    // DEL while the agent is down: the veth and lease go, the map entry stays
    // stale until the agent is back.
    let del = node.del_pod(&b);
    assert!(del.success, "DEL with the agent down: {}", del.raw_stdout);
    assert_eq!(node.host_veths(), vec![a.host_veth.clone()]);
    // ADD while the agent is down: try again later, nothing made.
    let c = Netns::new(format!("{}-c", node.id));
    let add = node.cni(
        &Node::cni_env("ADD", "c-container", &c.path().display().to_string()),
        node.cni_config().to_string().as_bytes(),
    );
    assert_eq!(add.stdout["code"].as_u64(), Some(11), "{}", add.raw_stdout);
    assert!(ping(&a.netns, Ipv4Addr::new(10, 250, 0, 1), 1), "a keeps working meanwhile");

    node.start_agent();
    let endpoints = node.inspect("endpoints");
    let ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, vec![a.ip.to_string()], "b's stale entry removed, a's kept");
    assert!(!node.bpffs_dir.join("links").join(&b.host_veth).exists(), "b's link pin removed");
    assert!(node.agent_log().contains("stale_endpoints_removed=1"), "{}", node.agent_log());
    assert!(ping(&node.netns, a.ip, 1));
    // And the pod refused earlier can be added now.
    let add = node.cni(
        &Node::cni_env("ADD", "c-container", &c.path().display().to_string()),
        node.cni_config().to_string().as_bytes(),
    );
    assert!(add.success, "{}", add.raw_stdout);
}

/// `BPF_LINK_UPDATE` in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_UPDATE: u32 = 29;

/// A restart whose switch of a live pod's link to the new program fails
/// (here the kernel refuses bpf(BPF_LINK_UPDATE)) must not detach the pod:
/// the link stays, forwarding with the program it has, the error is logged
/// with its cause, and the switch is retried; a later start switches it.
#[test]
fn a_live_link_whose_switch_fails_is_kept_and_retried() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let links =
        [a.host_veth.clone(), b.host_veth.clone()].map(|veth| node.bpffs_dir.join("links").join(veth));
    let progs_before = links.clone().map(|link| node.link_prog_id(&link));
    node.kill_agent();

    node.start_agent_refusing_bpf_commands(&[BPF_LINK_UPDATE]);
    let wait_for_log = |node: &Node, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.agent_log().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{}", node.agent_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for_log(&node, "datapath loaded and reconciled");
    for link in &links {
        assert!(link.exists(), "{} kept:\n{}", link.display(), node.agent_log());
    }
    assert_eq!(links.clone().map(|link| node.link_prog_id(&link)), progs_before, "still the old programs");
    assert!(ping(&a.netns, b.ip, 2), "a -> b with its links kept:\n{}", node.agent_log());
    assert!(ping(&node.netns, a.ip, 1), "node -> a");
    let log = node.agent_log();
    // Both pods' links (from_pod and to_pod) and the uplink's.
    assert!(log.contains("links_failed=5"), "{log}");
    assert!(
        log.contains("cannot switch this link to the loaded program")
            && log.contains("Operation not permitted"),
        "the error and its cause are logged:\n{log}"
    );
    assert!(log.contains("stale_links_removed=0"), "nothing taken for stale:\n{log}");
    wait_for_log(&node, "switching this link to the loaded program failed again");
    assert!(ping(&a.netns, b.ip, 1), "a -> b after the retry failed");

    // Without the fault, the next start switches both.
    node.stop_agent();
    node.start_agent();
    assert!(node.agent_log().contains("links_updated=4"), "{}", node.agent_log());
    for (link, before) in links.iter().zip(progs_before) {
        assert_ne!(node.link_prog_id(link), before, "switched to the new program");
    }
    assert!(ping(&a.netns, b.ip, 1));
}

/// `BPF_LINK_CREATE` in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: u32 = 28;

/// Forget the pods' neighbour entries: the next packet needs ARP for the
/// gateway again, which only the program on the host veth answers.
fn flush_neighbours(pods: &[&datapath_tests::lab::Pod]) {
    for pod in pods {
        datapath_tests::sh(&["ip", "-n", &pod.netns.name, "neigh", "flush", "all"]);
    }
}

/// The pinned state is lost while the agent is down (a DaemonSet without
/// the host's bpffs, an `rm -rf` of the pin directory): the agent restores
/// each endpoint whose veth still exists from its record, map entries and
/// program link, as ADD made them; a record whose veth is gone is stale.
#[test]
fn endpoints_whose_pins_were_lost_are_restored_at_start() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let c = node.add_pod("c");
    let programmed = node.programmed_endpoints();
    node.stop_agent();

    std::fs::remove_dir_all(&node.bpffs_dir).unwrap();
    // c's sandbox goes too, without a DEL: its record is stale now.
    datapath_tests::sh(&["ip", "netns", "del", &c.netns.name]);
    node.start_agent();
    let log = node.agent_log();
    assert!(log.contains("endpoints_restored=2") && log.contains("stale_records=1"), "{log}");
    assert_eq!(log.matches("endpoint restored from its record").count(), 2, "{log}");
    let endpoints = node.programmed_endpoints();
    let ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, vec![a.ip.to_string(), b.ip.to_string()], "{endpoints:#}");
    let without_c: Vec<serde_json::Value> =
        programmed.as_array().unwrap().iter().filter(|e| e["pod_ip"] != c.ip.to_string()).cloned().collect();
    assert_eq!(endpoints, serde_json::Value::Array(without_c), "as ADD made them");
    for pod in [&a, &b] {
        assert!(node.bpffs_dir.join("links").join(&pod.host_veth).exists(), "{} linked", pod.host_veth);
    }
    flush_neighbours(&[&a, &b]);
    assert!(ping(&a.netns, b.ip, 2), "a -> b:\n{}", node.agent_log());
    assert!(ping(&b.netns, a.ip, 1), "b -> a");
    assert!(ping(&node.netns, a.ip, 1), "node -> a");
    let (status, body) = datapath_tests::lab::http_get_local(&node.netns, 9976, "/readyz");
    assert_eq!(status, 200, "{body}");
    // A restart with everything in place restores nothing.
    node.stop_agent();
    node.start_agent();
    assert!(node.agent_log().contains("endpoints_restored=0"), "{}", node.agent_log());
}

/// A pod's link pin removed while the agent runs detaches its program: the
/// agent notices within seconds and attaches it again. When it cannot, it
/// says so (nothing is attached) and the node is not ready until it can.
#[test]
fn a_pod_link_lost_while_running_is_attached_again() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let pin = node.bpffs_dir.join("links").join(&a.host_veth);
    let readyz = |node: &Node| datapath_tests::lab::http_get_local(&node.netns, 9976, "/readyz");

    std::fs::remove_file(&pin).unwrap();
    let removed = Instant::now();
    while !pin.exists() {
        assert!(removed.elapsed() < Duration::from_secs(10), "not attached again:\n{}", node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("link attached again after {:?}", removed.elapsed());
    node.wait_for_log("program link was missing", Duration::from_secs(2));
    assert!(!node.agent_log().contains("keeping it"), "{}", node.agent_log());
    flush_neighbours(&[&a, &b]);
    assert!(ping(&a.netns, b.ip, 2), "a -> b:\n{}", node.agent_log());
    assert!(ping(&node.netns, a.ip, 1), "node -> a");
    assert_eq!(readyz(&node).0, 200);

    // The kernel refuses new links: the pod stays without its program.
    node.stop_agent();
    node.start_agent_refusing_bpf_commands(&[BPF_LINK_CREATE]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(&node).0 != 200 {
        assert!(Instant::now() < deadline, "not ready: {:?}\n{}", readyz(&node), node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&pin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while readyz(&node).0 == 200 {
        assert!(Instant::now() < deadline, "still ready without a's program:\n{}", node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, body) = readyz(&node);
    assert!(body.contains(&a.host_veth) && body.contains("no program attached"), "{body}");
    node.wait_for_log("no program attached", Duration::from_secs(2));
    let log = node.agent_log();
    assert!(log.contains("Operation not permitted"), "the cause is logged:\n{log}");
    assert!(!log.contains("keeping it"), "nothing is kept: nothing is attached:\n{log}");
    // Without the fault, the next start attaches it.
    node.stop_agent();
    node.start_agent();
    assert!(pin.exists(), "{}", node.agent_log());
    assert!(node.agent_log().contains("endpoints_restored=1"), "{}", node.agent_log());
    flush_neighbours(&[&a, &b]);
    assert!(ping(&a.netns, b.ip, 2), "a -> b:\n{}", node.agent_log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&node).0 != 200 {
        assert!(Instant::now() < deadline, "not ready again: {:?}", readyz(&node));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod made by a build without `to_pod` (no pin on its veth's egress, as
/// after an upgrade) gets it at the next start, without a moment of
/// forwarding lost, and from then on what the node routes into the pod
/// (here: the node's own pings) passes through it.
#[test]
fn pods_made_without_to_pod_get_it_at_start() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let pin = node.bpffs_dir.join("to-pod-links").join(&a.host_veth);
    assert!(pin.exists(), "ADD attaches to_pod");
    let routed = |node: &Node| node.inspect("counters")["forwards"]["routed_into_pod"].as_u64().unwrap();
    node.stop_agent();
    // The pin was the link's only holder: this detaches it.
    std::fs::remove_file(&pin).unwrap();
    let before = routed(&node);
    assert!(ping(&node.netns, a.ip, 2), "node -> a without to_pod");
    assert_eq!(routed(&node), before, "nothing passes a detached to_pod");
    node.start_agent();
    assert!(pin.exists(), "{}", node.agent_log());
    node.wait_for_log("to_pod attached to this pod's veth", Duration::from_secs(2));
    assert!(!node.agent_log().contains("endpoint restored from its record"), "{}", node.agent_log());
    assert!(ping(&node.netns, a.ip, 2), "node -> a");
    assert!(routed(&node) >= before + 2, "the node's pings pass to_pod: {}", node.inspect("counters"));
}
