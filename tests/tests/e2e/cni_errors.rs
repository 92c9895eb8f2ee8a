//! Bad input to the CNI plugin: a CNI error JSON with the right code and a
//! message to act on, and nothing left behind (no veth, lease or map entry).

use std::net::Ipv4Addr;

use datapath_tests::{
    lab::{Netns, Node},
    require_root, sh,
};

fn node() -> Node {
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    node
}

#[track_caller]
fn assert_error(run: &datapath_tests::lab::CniRun, code: u64, msg_contains: &str) {
    assert!(!run.success, "expected failure, got {}", run.raw_stdout);
    assert_eq!(run.stdout["code"].as_u64(), Some(code), "{}", run.raw_stdout);
    let msg = run.stdout["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(msg_contains), "msg {msg:?} lacks {msg_contains:?}");
    assert!(run.stdout["cniVersion"].is_string(), "{}", run.raw_stdout);
    // The runtime logs stderr with the error: it names the build.
    let build = built_as("datapath-cni");
    assert!(run.stderr.contains(&build), "stderr {:?} lacks {build:?}", run.stderr);
}

/// How `binary` names its build, up to the profile (the binaries under
/// test may be built in another profile than this test).
fn built_as(binary: &str) -> String {
    use datapath_agent::build_info::{GIT_COMMIT, VERSION};
    format!("{binary} {VERSION} (commit {GIT_COMMIT}, ")
}

/// Both binaries name their build: version, git commit, profile.
#[test]
fn both_binaries_name_their_build() {
    for binary in ["datapath-cni", "datapath-agent"] {
        let out = std::process::Command::new(datapath_tests::bin_dir().join(binary))
            .arg("--version")
            .env_remove("CNI_COMMAND")
            .output()
            .unwrap();
        assert!(out.status.success(), "{binary}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with(&built_as(binary)) && said.ends_with(" build)\n"), "{binary}: {said:?}");
    }
}

#[track_caller]
fn assert_nothing_left(node: &Node) {
    assert_eq!(node.host_veths(), Vec::<String>::new(), "no host veth left");
    assert_eq!(node.ipam_leases(), Vec::<String>::new(), "no address lease left");
    assert_eq!(node.inspect("endpoints"), serde_json::json!([]), "no endpoint left");
    let routes = node.host_routes();
    assert!(!routes.contains("10.244.1."), "no pod route left: {routes}");
}

#[test]
fn bad_environment_and_config_get_the_right_codes() {
    require_root!();
    let node = node();
    let pod = Netns::new(format!("{}-pod", node.id));
    let netns = pod.path().display().to_string();
    let conf = node.cni_config().to_string();

    let run = node.cni(&[("CNI_CONTAINERID", "c1")], conf.as_bytes());
    assert_error(&run, 4, "CNI_COMMAND");

    let mut env = Node::cni_env("ADD", "c1", &netns);
    env.retain(|(k, _)| *k != "CNI_IFNAME");
    assert_error(&node.cni(&env, conf.as_bytes()), 4, "CNI_IFNAME");

    assert_error(
        &node.cni(&Node::cni_env("ADD", "c1", &netns), b"{\"cniVersion\": \"1.0.0\", "),
        6,
        "not valid",
    );

    let mut bad = node.cni_config();
    bad["cniVersion"] = "0.1.0".into();
    assert_error(&node.cni(&Node::cni_env("ADD", "c1", &netns), bad.to_string().as_bytes()), 1, "cniVersion");

    let mut bad = node.cni_config();
    bad.as_object_mut().unwrap().remove("ipam");
    assert_error(&node.cni(&Node::cni_env("ADD", "c1", &netns), bad.to_string().as_bytes()), 7, "ipam");

    let mut bad = node.cni_config();
    bad["mtu"] = 9.into();
    assert_error(&node.cni(&Node::cni_env("ADD", "c1", &netns), bad.to_string().as_bytes()), 7, "mtu");

    let mut bad = node.cni_config();
    bad["ipam"]["type"] = "no-such-ipam".into();
    assert_error(
        &node.cni(&Node::cni_env("ADD", "c1", &netns), bad.to_string().as_bytes()),
        7,
        "no-such-ipam",
    );

    let gone = "/run/netns/dpt-does-not-exist";
    assert_error(&node.cni(&Node::cni_env("ADD", "c1", gone), conf.as_bytes()), 3, "network namespace");

    assert_nothing_left(&node);
    // The pod namespace is untouched.
    assert!(!sh(&["ip", "-n", &pod.name, "link"]).contains("eth0"));
}

#[test]
fn version_lists_supported_versions() {
    require_root!();
    let node = node();
    let run = node.cni(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert!(run.success);
    let versions = run.stdout["supportedVersions"].as_array().unwrap();
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&v.into()), "{}", run.raw_stdout);
    }
}

#[test]
fn agent_down_means_try_again_later_and_nothing_made() {
    require_root!();
    let mut node = node();
    node.stop_agent();
    let pod = Netns::new(format!("{}-pod", node.id));
    let run = node.cni(
        &Node::cni_env("ADD", "c1", &pod.path().display().to_string()),
        node.cni_config().to_string().as_bytes(),
    );
    assert_error(&run, 11, "agent is not running");
    assert_eq!(node.host_veths(), Vec::<String>::new());
    assert_eq!(node.ipam_leases(), Vec::<String>::new());

    let status = node.cni(&[("CNI_COMMAND", "STATUS")], node.cni_config().to_string().as_bytes());
    assert_error(&status, 50, "agent");
    node.start_agent();
    let status = node.cni(&[("CNI_COMMAND", "STATUS")], node.cni_config().to_string().as_bytes());
    assert!(status.success, "{}", status.raw_stdout);
}

#[test]
fn failure_after_the_veth_exists_rolls_everything_back() {
    require_root!();
    let node = node();
    // IPAM hands out an address outside the agent's pod CIDR: the agent
    // refuses the endpoint after the plugin made veth, routes and lease.
    let mut conf = node.cni_config();
    conf["ipam"]["ranges"] = serde_json::json!([[{ "subnet": "10.99.0.0/24" }]]);
    let pod = Netns::new(format!("{}-pod", node.id));
    let run =
        node.cni(&Node::cni_env("ADD", "c1", &pod.path().display().to_string()), conf.to_string().as_bytes());
    assert!(!run.success);
    assert!(run.raw_stdout.contains("outside this node's pod CIDR"), "{}", run.raw_stdout);
    assert_nothing_left(&node);
    assert!(!sh(&["ip", "-n", &pod.name, "link"]).contains("eth0"), "pod end removed too");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("links")).unwrap().count(), 0, "no link pinned");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("to-pod-links")).unwrap().count(), 0, "no link pinned");
}

#[test]
fn interface_name_taken_in_the_pod_rolls_back() {
    require_root!();
    let node = node();
    let pod = Netns::new(format!("{}-pod", node.id));
    // Something already called eth0 in the pod: the veth cannot be made.
    sh(&["ip", "-n", &pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "other0"]);
    let run = node.cni(
        &Node::cni_env("ADD", "c1", &pod.path().display().to_string()),
        node.cni_config().to_string().as_bytes(),
    );
    assert!(!run.success);
    assert_eq!(run.stdout["code"].as_u64(), Some(5), "{}", run.raw_stdout);
    assert_nothing_left(&node);
}

#[test]
fn exhausted_pool_fails_cleanly() {
    require_root!();
    let node = node();
    let mut conf = node.cni_config();
    conf["ipam"]["ranges"] = serde_json::json!([[{ "subnet": "10.244.1.0/24", "rangeStart": "10.244.1.10", "rangeEnd": "10.244.1.10" }]]);
    let p1 = Netns::new(format!("{}-p1", node.id));
    let p2 = Netns::new(format!("{}-p2", node.id));
    let first =
        node.cni(&Node::cni_env("ADD", "c1", &p1.path().display().to_string()), conf.to_string().as_bytes());
    assert!(first.success, "{}", first.raw_stdout);
    let second =
        node.cni(&Node::cni_env("ADD", "c2", &p2.path().display().to_string()), conf.to_string().as_bytes());
    assert!(!second.success);
    assert!(second.stdout["msg"].as_str().unwrap().contains("IPAM"), "{}", second.raw_stdout);
    assert_eq!(node.host_veths().len(), 1, "only the first pod's veth");
    assert_eq!(node.ipam_leases(), vec!["10.244.1.10".to_owned()]);
}

#[test]
fn cni_netns_that_is_not_a_network_namespace_gets_code_4() {
    require_root!();
    let node = node();
    let file = node.work_dir.join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let dir = node.work_dir.join("not-a-netns-dir");
    std::fs::create_dir(&dir).unwrap();
    let conf = node.cni_config().to_string();
    let paths = [
        file.display().to_string(),
        dir.display().to_string(),
        "/dev/null".to_owned(),
        // A namespace, but a mount namespace.
        "/proc/self/ns/mnt".to_owned(),
    ];
    for path in &paths {
        let run = node.cni(&Node::cni_env("ADD", "c1", path), conf.as_bytes());
        assert_error(&run, 4, "CNI_NETNS");
        let msg = run.stdout["msg"].as_str().unwrap();
        assert!(msg.contains(path.as_str()), "msg {msg:?} names the path {path}");
        assert_nothing_left(&node);

        let mut check_conf = node.cni_config();
        check_conf["prevResult"] = serde_json::json!({ "ips": [{ "address": "10.244.1.2/32" }] });
        let run = node.cni(&Node::cni_env("CHECK", "c1", path), check_conf.to_string().as_bytes());
        assert_error(&run, 4, "CNI_NETNS");
    }
    assert_eq!(node.cni_lock_files(), Vec::<String>::new(), "no lock file left");
}

#[test]
fn del_succeeds_for_a_container_id_ipam_rejects() {
    require_root!();
    let node = node();
    let pod = Netns::new(format!("{}-pod", node.id));
    let netns = pod.path().display().to_string();
    let conf = node.cni_config().to_string();
    for id in ["a/b", "with space", "../../etc/passwd", "-leading-dash"] {
        let add = node.cni(&Node::cni_env("ADD", id, &netns), conf.as_bytes());
        assert!(!add.success, "ADD {id:?}: {}", add.raw_stdout);
        assert_eq!(add.stdout["code"].as_u64(), Some(4), "ADD {id:?}: {}", add.raw_stdout);
        assert_nothing_left(&node);
        // Nothing was made, so there is nothing to release: DEL succeeds, every time.
        for attempt in 1..=2 {
            let del = node.cni(&Node::cni_env("DEL", id, &netns), conf.as_bytes());
            assert!(del.success, "DEL #{attempt} of {id:?}: {}", del.raw_stdout);
        }
        let msg = add.stdout["msg"].as_str().unwrap_or_default();
        assert!(msg.contains("CNI_CONTAINERID"), "ADD {id:?}: msg {msg:?} names CNI_CONTAINERID");
        assert_eq!(node.cni_lock_files(), Vec::<String>::new(), "no lock file left for {id:?}");
    }
    assert!(!sh(&["ip", "-n", &pod.name, "link"]).contains("eth0"));
}

#[test]
fn cni_netns_of_the_node_itself_gets_code_4() {
    require_root!();
    let node = node();
    let routes_before = node.host_routes();
    let conf = node.cni_config().to_string();
    // The node's namespace by its bind mount, and as the plugin's own /proc
    // entry (the plugin runs in the node's namespace, as a runtime's would).
    for path in [node.netns.path().display().to_string(), "/proc/self/ns/net".to_owned()] {
        let run = node.cni(&Node::cni_env("ADD", "c1", &path), conf.as_bytes());
        assert_error(&run, 4, "CNI_NETNS");
        let msg = run.stdout["msg"].as_str().unwrap();
        assert!(
            msg.contains(&path) && msg.contains("node"),
            "msg {msg:?} names the path {path} and the node"
        );
        assert_nothing_left(&node);
        assert_eq!(node.host_routes(), routes_before, "the node's routes are untouched");
        assert!(!sh(&["ip", "-n", &node.netns.name, "link"]).contains("eth0"), "no eth0 in the node");

        let mut check_conf = node.cni_config();
        check_conf["prevResult"] = serde_json::json!({ "ips": [{ "address": "10.244.1.2/32" }] });
        let run = node.cni(&Node::cni_env("CHECK", "c1", &path), check_conf.to_string().as_bytes());
        assert_error(&run, 4, "CNI_NETNS");
    }
    assert_eq!(node.cni_lock_files(), Vec::<String>::new(), "no lock file left");
}

#[test]
fn mtu_above_the_agents_pod_mtu_gets_code_7() {
    require_root!();
    let node = node();
    // The lab's uplink is a plain veth: MTU 1500, native mode, pod MTU 1500.
    let pod_mtu = node.cni(&[("CNI_COMMAND", "STATUS")], node.cni_config().to_string().as_bytes());
    assert!(pod_mtu.success, "{}", pod_mtu.raw_stdout);
    let pod = Netns::new(format!("{}-pod", node.id));
    let netns = pod.path().display().to_string();
    for too_big in [1501, 9000] {
        let mut conf = node.cni_config();
        conf["mtu"] = too_big.into();
        let run = node.cni(&Node::cni_env("ADD", "c1", &netns), conf.to_string().as_bytes());
        assert_error(&run, 7, "\"mtu\"");
        let msg = run.stdout["msg"].as_str().unwrap();
        assert!(msg.contains(&too_big.to_string()) && msg.contains("at most 1500"), "{msg}");
        assert_nothing_left(&node);
        assert!(!sh(&["ip", "-n", &pod.name, "link"]).contains("eth0"), "nothing made in the pod");
    }
    // Up to the pod MTU is fine, and the pod gets what it asked for.
    let mut conf = node.cni_config();
    conf["mtu"] = 1400.into();
    let run = node.cni(&Node::cni_env("ADD", "c1", &netns), conf.to_string().as_bytes());
    assert!(run.success, "{}", run.raw_stdout);
    assert!(sh(&["ip", "-n", &pod.name, "link", "show", "eth0"]).contains("mtu 1400"));
}

/// A listening unix socket standing in for an agent that takes no calls
/// (out of file descriptors, overloaded): nothing is ever accepted.
struct StuckAgent {
    path: std::path::PathBuf,
    _listener: socket2::Socket,
    /// Connections that fill the backlog.
    _queued: Vec<std::os::unix::net::UnixStream>,
}

impl StuckAgent {
    /// A backlog of `backlog`, with `queued` connections waiting in it.
    fn new(path: std::path::PathBuf, backlog: i32, queued: usize) -> Self {
        use socket2::{Domain, SockAddr, Socket, Type};
        let _ = std::fs::remove_file(&path);
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(backlog).unwrap();
        let queued = (0..queued).map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap()).collect();
        Self { path, _listener: listener, _queued: queued }
    }
}

impl Drop for StuckAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn an_agent_that_takes_no_calls_means_try_again_later() {
    require_root!();
    // No agent: a socket that never accepts stands in for one that is out of
    // file descriptors or overloaded.
    let node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    std::fs::create_dir_all(node.socket.parent().unwrap()).unwrap();
    let pod = Netns::new(format!("{}-pod", node.id));
    let netns = pod.path().display().to_string();
    let conf = node.cni_config().to_string();
    // (1) Room in the backlog: the connection is made, no answer comes.
    // (2) Backlog full (a backlog of 0 holds one): the connect itself waits.
    for (case, backlog, queued) in [("no answer", 8, 0), ("backlog full", 0, 1)] {
        let stuck = StuckAgent::new(node.socket.clone(), backlog, queued);
        for verb in ["ADD", "DEL"] {
            let run = node
                .cni_within(
                    &Node::cni_env(verb, "c1", &netns),
                    conf.as_bytes(),
                    std::time::Duration::from_secs(40),
                )
                .unwrap_or_else(|| panic!("{case}: {verb} hung on the agent socket"));
            assert_error(&run, 11, "try again later");
            let msg = run.stdout["msg"].as_str().unwrap();
            assert!(msg.contains("overloaded"), "{case}: {verb}: {msg}");
        }
        assert_eq!(node.host_veths(), Vec::<String>::new());
        assert_eq!(node.ipam_leases(), Vec::<String>::new());
        drop(stuck);
    }
}
