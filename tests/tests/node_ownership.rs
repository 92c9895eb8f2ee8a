//! One agent per node: a second agent on the same pinned state, records or
//! CNI socket is refused (naming the first one's pid) before it touches
//! anything, and an agent removes the CNI socket on exit only if it is
//! still the one it bound.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{bin_dir, lab::Node, require_root};

/// Run another agent in `node`'s namespace with `config`; its exit status
/// (None if it was still running after 20 s, then killed) and its log.
fn second_agent(node: &Node, config: &str) -> (Option<ExitStatus>, String) {
    let path = node.work_dir.join("second-agent.toml");
    std::fs::write(&path, config).unwrap();
    let log_path = node.work_dir.join("second-agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = node
        .in_node(&bin_dir().join("datapath-agent"))
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
    if !require_root("a_second_agent_is_refused_and_the_socket_stays_the_first_ones") {
        return;
    }
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
    for (what, config, refusal) in [
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
            "is served by another process".to_owned(),
        ),
    ] {
        let (status, log) = second_agent(&node, &config);
        let status = status.unwrap_or_else(|| panic!("a second agent with {what} kept running:\n{log}"));
        assert!(!status.success(), "a second agent with {what} exited with {status}:\n{log}");
        assert!(log.contains(&refusal), "a second agent with {what} does not say {refusal:?}:\n{log}");
        assert!(node.socket.exists(), "the first agent's socket is still there after one with {what}");
        assert!(!own_bpffs.0.join("maps").exists(), "a refused agent pinned nothing");
    }
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
