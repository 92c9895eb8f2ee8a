//! One agent per node: a second agent in the same network namespace, or on
//! the same pinned state, records or CNI socket, is refused (naming the
//! first one's pid) before it touches anything, and leaves nothing behind;
//! an agent removes the CNI socket on exit only if it is still the one it
//! bound; the node routes it owns are put back when someone deletes them.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    bin_dir,
    lab::{Netns, Node, Peer, UPLINK},
    require_root, sh,
};

/// Run another agent in `node`'s namespace with `config`; its exit status
/// (None if it was still running after 20 s, then killed) and its log.
fn second_agent(node: &Node, config: &str) -> (Option<ExitStatus>, String) {
    second_agent_in(node, &node.netns.path(), config)
}

/// [`second_agent`] in the network namespace at `netns`.
fn second_agent_in(node: &Node, netns: &std::path::Path, config: &str) -> (Option<ExitStatus>, String) {
    let path = node.work_dir.join("second-agent.toml");
    std::fs::write(&path, config).unwrap();
    let log_path = node.work_dir.join("second-agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new("nsenter");
    child.arg(format!("--net={}", netns.display())).arg(bin_dir().join("datapath-agent"));
    let mut child = child
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log_path).unwrap())
}

/// Pins a second agent may have made in a bpffs directory of its own
/// (removing them detaches its links).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_second_agent_is_refused_and_the_socket_stays_the_first_ones() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let first_pid = node.agent_pid().unwrap();
    let config = node.agent_config();
    let own_bpffs = RemoveOnDrop(PathBuf::from(format!("{}-second", node.bpffs_dir.display())));
    let socket = node.socket.display().to_string();
    let state = node.work_dir.join("state").display().to_string();
    let bpffs = node.bpffs_dir.display().to_string();
    let other_socket = node.work_dir.join("run/second.sock").display().to_string();
    let other_state = node.work_dir.join("state-second").display().to_string();
    let without_health = config.replace("health_address = \"127.0.0.1:9976\"\n", "");
    let in_this_netns = "runs in this network namespace".to_owned();
    for (what, config, refusal) in [
        (
            "its own bpffs and state dirs, socket and no health address",
            without_health
                .replace(&socket, &other_socket)
                .replace(&bpffs, &own_bpffs.0.display().to_string())
                .replace(&state, &other_state),
            format!("pid {first_pid}"),
        ),
        ("the same config", config.clone(), format!("pid {first_pid}")),
        (
            "another socket, the same bpffs and state dirs",
            without_health.replace(&socket, &other_socket),
            format!("pid {first_pid}"),
        ),
        (
            "the same bpffs dir, another state dir and socket",
            without_health.replace(&socket, &other_socket).replace(&state, &other_state),
            format!("pid {first_pid}"),
        ),
        (
            "the same socket, its own bpffs and state dirs",
            without_health.replace(&bpffs, &own_bpffs.0.display().to_string()).replace(&state, &other_state),
            format!("pid {first_pid}"),
        ),
    ] {
        let (status, log) = second_agent(&node, &config);
        let status = status.unwrap_or_else(|| panic!("a second agent with {what} kept running:\n{log}"));
        assert!(!status.success(), "a second agent with {what} exited with {status}:\n{log}");
        assert!(log.contains(&refusal), "a second agent with {what} does not say {refusal:?}:\n{log}");
        assert!(
            log.contains(&in_this_netns),
            "a second agent with {what} in the same network namespace is refused for that:\n{log}"
        );
        assert!(node.socket.exists(), "the first agent's socket is still there after one with {what}");
        assert!(!own_bpffs.0.exists(), "a refused agent with {what} made no bpffs dir:\n{log}");
        assert!(
            !PathBuf::from(&other_state).exists(),
            "a refused agent with {what} made no state dir:\n{log}"
        );
    }
    // In another network namespace (another node on the same host, say),
    // the same socket is still refused, and nothing is left behind.
    let elsewhere = Netns::new(format!("{}-elsewhere", node.id));
    let ns = elsewhere.name.as_str();
    sh(&["ip", "-n", ns, "link", "add", UPLINK, "type", "veth", "peer", "name", "dptup1"]);
    sh(&["ip", "-n", ns, "addr", "add", &format!("{}/24", node.node_ip), "dev", UPLINK]);
    sh(&["ip", "-n", ns, "link", "set", UPLINK, "up"]);
    let (status, log) = second_agent_in(
        &node,
        &elsewhere.path(),
        &without_health.replace(&bpffs, &own_bpffs.0.display().to_string()).replace(&state, &other_state),
    );
    assert!(status.is_some_and(|s| !s.success()), "the same socket from another netns: {status:?}\n{log}");
    assert!(log.contains("is served by another process"), "{log}");
    assert!(!own_bpffs.0.exists(), "a refused agent made no bpffs dir:\n{log}");
    assert!(!PathBuf::from(&other_state).exists(), "a refused agent made no state dir:\n{log}");
    // Its own directories but the first one's state dir from another netns:
    // refused by the state lock, and the bpffs dir it made is removed again.
    let (status, log) = second_agent_in(
        &node,
        &elsewhere.path(),
        &without_health.replace(&bpffs, &own_bpffs.0.display().to_string()).replace(&socket, &other_socket),
    );
    assert!(status.is_some_and(|s| !s.success()), "the same state dir from another netns: {status:?}\n{log}");
    assert!(log.contains(&format!("pid {first_pid}")) && log.contains("agent.lock"), "{log}");
    assert!(!own_bpffs.0.exists(), "a refused agent removed the bpffs dir it made:\n{log}");
    drop(elsewhere);
    // The first agent still serves the CNI plugin.
    let pod = node.add_pod("a");
    assert!(datapath_tests::lab::ping(&node.netns, pod.ip, 1));

    // The socket path is taken over by someone else: on exit the agent
    // leaves it alone.
    std::fs::remove_file(&node.socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&node.socket).unwrap();
    node.stop_agent();
    assert!(node.socket.exists(), "the agent removed a socket it did not bind:\n{}", node.agent_log());
    assert!(std::os::unix::net::UnixStream::connect(&node.socket).is_ok(), "still the other socket");
    assert!(node.agent_log().contains("no longer the one this agent bound"), "{}", node.agent_log());
    drop(other);

    // Its own socket it does remove.
    node.start_agent();
    node.stop_agent();
    assert!(!node.socket.exists(), "the agent left its own socket behind:\n{}", node.agent_log());
}

/// A second agent with directories, socket and health address of its own in
/// the node's network namespace would attach a second program to the uplink
/// and, without peers, delete the first one's node routes: it is refused,
/// and the first agent's routes and link stay.
#[test]
fn one_agent_per_network_namespace_whatever_its_directories() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.set_peers(vec![peer()]);
    node.start_agent();
    let first_pid = node.agent_pid().unwrap();
    let routes_before = node.host_routes();
    assert!(routes_before.contains("10.244.2.0/24 via 10.250.0.2"), "{routes_before}");
    let links_before =
        sh(&["ip", "netns", "exec", &node.netns.name, "bpftool", "net", "show", "dev", UPLINK]);
    let own_bpffs = RemoveOnDrop(PathBuf::from(format!("{}-second", node.bpffs_dir.display())));
    let own_state = node.work_dir.join("second-state");
    let config = format!(
        "node_name = \"second\"\npod_cidr = \"10.244.9.0/24\"\nuplink_interface = \"{UPLINK}\"\n\
         bpffs_dir = \"{}\"\napi_socket = \"{}\"\nstate_dir = \"{}\"\n\
         cluster_cidr = \"10.244.0.0/16\"\nnode_ip = \"10.250.0.1\"\nmode = \"native\"\n\
         health_address = \"127.0.0.1:9977\"\n",
        own_bpffs.0.display(),
        node.work_dir.join("second/agent.sock").display(),
        own_state.display(),
    );
    let (status, log) = second_agent(&node, &config);
    let status = status.unwrap_or_else(|| panic!("the second agent kept running:\n{log}"));
    assert!(!status.success(), "{status}:\n{log}");
    assert!(
        log.contains("runs in this network namespace") && log.contains(&format!("pid {first_pid}")),
        "refused for the network namespace, naming the first agent:\n{log}"
    );
    assert!(!own_bpffs.0.exists() && !own_state.exists(), "nothing made:\n{log}");
    assert!(!node.work_dir.join("second").exists(), "no socket dir made:\n{log}");
    // The second agent has exited: what it could have changed is changed.
    assert_eq!(node.host_routes(), routes_before, "the first agent's routes stay");
    let links_after = sh(&["ip", "netns", "exec", &node.netns.name, "bpftool", "net", "show", "dev", UPLINK]);
    assert_eq!(links_after, links_before, "one program on the uplink, the first agent's");
}

/// The peer of [`one_agent_per_network_namespace_whatever_its_directories`]
/// and [`node_routes_deleted_by_someone_else_are_put_back`].
fn peer() -> Peer {
    Peer { name: "peer".into(), node_ip: Ipv4Addr::new(10, 250, 0, 2), pod_cidr: "10.244.2.0/24".into() }
}

/// The node's routes to other nodes' pods (proto 217) are the agent's: one
/// deleted by someone else is added again within seconds, with a log line;
/// a route that is not ours is never removed or replaced, also for a peer's
/// pod CIDR (the agent says so).
#[test]
fn node_routes_deleted_by_someone_else_are_put_back() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.set_peers(vec![peer()]);
    node.start_agent();
    let ns = node.netns.name.clone();
    let ours = "10.244.2.0/24 via 10.250.0.2 dev dptup0 proto 217";
    let routes = || sh(&["ip", "-n", &ns, "route", "show"]);
    assert!(routes().contains(ours), "{}", routes());
    // Someone else's route, unrelated to the peers.
    sh(&["ip", "-n", &ns, "route", "add", "10.99.0.0/24", "via", "10.250.0.3", "proto", "static"]);
    let wait_for = |what: &str, check: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = routes();
            if check(&now) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}:\n{now}\n{}", node.agent_log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    sh(&["ip", "-n", &ns, "route", "del", "10.244.2.0/24"]);
    assert!(!routes().contains("10.244.2.0/24"));
    let deleted = Instant::now();
    wait_for("our route put back", &|r| r.contains(ours));
    eprintln!("route put back after {:?}", deleted.elapsed());
    node.wait_for_log("node route was missing", Duration::from_secs(5));
    assert!(routes().contains("10.99.0.0/24 via 10.250.0.3"), "not ours: kept");

    // Someone puts a route of their own to the peer's pod CIDR in ours'
    // place: it is left alone, and the agent says why it cannot route.
    sh(&["ip", "-n", &ns, "route", "replace", "10.244.2.0/24", "via", "10.250.0.3", "proto", "static"]);
    node.wait_for_log("not ours", Duration::from_secs(30));
    assert!(routes().contains("10.244.2.0/24 via 10.250.0.3 dev dptup0 proto static"), "{}", routes());
    // Once it is gone, ours comes back.
    sh(&["ip", "-n", &ns, "route", "del", "10.244.2.0/24"]);
    wait_for("our route put back again", &|r| r.contains(ours));
    assert!(routes().contains("10.99.0.0/24 via 10.250.0.3"), "not ours: kept");
}
