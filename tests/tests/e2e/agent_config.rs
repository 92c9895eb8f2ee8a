//! The agent refuses a bad configuration with the field's name and the fix.

use std::process::Command;

use datapath_tests::{bin_dir, require_root};

fn run_with(config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("dpt{}-config", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let out =
        Command::new(bin_dir().join("datapath-agent")).args(["run", "--config"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    require_root!();
    let base = "node_name = \"n1\"\npod_cidr = \"10.244.1.0/24\"\nuplink_interface = \"lo\"\nbpffs_dir = \"/sys/fs/bpf/dpt-config-test\"\napi_socket = \"/tmp/dpt-config-test.sock\"\ncluster_cidr = \"10.244.0.0/16\"\nnode_ip = \"127.0.0.1\"\n";
    for (config, field) in [
        (base.replace("10.244.1.0/24", "10.244.1.0/33"), "pod_cidr"),
        (base.replace("10.244.1.0/24", "10.244.1.9/24"), "pod_cidr"),
        (base.replace("\"lo\"", "\"dpt-nonexistent\""), "uplink_interface"),
        (base.replace("/sys/fs/bpf/dpt-config-test", "/tmp/not-bpffs"), "bpffs_dir"),
        (format!("{base}mode = \"geneve\"\n"), "mode"),
        (base.replace("127.0.0.1", "127.0.0.2"), "node_ip"),
        (base.replace("node_name = \"n1\"\n", ""), "node_name"),
    ] {
        let (ok, stderr) = run_with(&config);
        assert!(!ok, "accepted:\n{config}");
        assert!(stderr.contains(field), "error does not name {field}:\n{stderr}");
    }
    // A syntax error: its line and column, said once.
    let (ok, stderr) = run_with(&base.replace("\"10.244.1.0/24\"", "10.244.1.0/24"));
    assert!(!ok);
    assert_eq!(stderr.matches("line 2, column 18").count(), 1, "the position once:\n{stderr}");
    assert!(stderr.contains("agent.toml is not valid"), "{stderr}");
    let missing = Command::new(bin_dir().join("datapath-agent"))
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/agent.toml"));
}

/// A health_address that cannot be bound stops the agent at start: running
/// on without its probes would have Kubernetes restart it forever.
#[test]
fn a_health_address_that_cannot_be_bound_is_fatal() {
    require_root!();
    let mut node = datapath_tests::lab::Node::new("10.244.1.0/24", std::net::Ipv4Addr::new(10, 250, 0, 1));
    // Someone else has the port in the node's namespace.
    let taken = datapath_tests::lab::in_netns(&node.netns.path(), || {
        std::net::TcpListener::bind(("127.0.0.1", 9976)).unwrap()
    })
    .join()
    .unwrap();
    node.launch_agent(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.agent_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent runs without its health address:\n{}",
            node.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = node.agent_log();
    assert!(log.contains("health_address 127.0.0.1:9976"), "{log}");
    assert!(!node.socket.exists(), "it served nothing");
    drop(taken);
}
