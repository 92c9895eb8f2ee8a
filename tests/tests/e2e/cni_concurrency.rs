//! A runtime may send DEL while its ADD of the same container still runs
//! (a sandbox cancelled during creation, a CRI timeout): the plugin
//! serialises the two, so each race ends with the pod either fully there
//! (veth, lease, map entry, link pin, record) or fully gone. GC's sweep of
//! veths without an owner waits for ADDs under way.

use std::{
    net::Ipv4Addr,
    sync::Barrier,
    time::{Duration, Instant},
};

use datapath_cni::lock::{DirLock, LOCK_WAIT};
use datapath_tests::{
    lab::{CniRun, Netns, Node},
    require_root, sh,
};

const ROUNDS: usize = 100;

/// What the node holds for pods, counted.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    veths: Vec<String>,
    leases: Vec<String>,
    endpoints: Vec<String>,
    link_pins: usize,
    records: usize,
}

impl Held {
    fn read(node: &Node) -> Self {
        let endpoints = node.inspect("endpoints");
        let count = |dir: std::path::PathBuf| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        Self {
            veths: node.host_veths(),
            leases: node.ipam_leases(),
            endpoints: endpoints
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["pod_ip"].as_str().unwrap().to_owned())
                .collect(),
            link_pins: count(node.bpffs_dir.join("links")),
            records: count(node.work_dir.join("state/endpoints")),
        }
    }

    fn nothing() -> Self {
        Self { veths: vec![], leases: vec![], endpoints: vec![], link_pins: 0, records: 0 }
    }
}

#[test]
fn add_racing_del_of_the_same_container_ends_all_or_nothing() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let node = node;
    let conf = node.cni_config().to_string();
    let started = Instant::now();
    let (mut there, mut gone) = (0, 0);
    for round in 0..ROUNDS {
        let pod = Netns::new(format!("{}-race", node.id));
        let netns = pod.path().display().to_string();
        let container = format!("{}-race-{round}", node.id);
        // Both calls start together, as a runtime that cancels a sandbox
        // during its creation sends them.
        let start = Barrier::new(2);
        let call = |command: &str| -> CniRun {
            start.wait();
            node.cni(&Node::cni_env(command, &container, &netns), conf.as_bytes())
        };
        let (add, del) = std::thread::scope(|s| {
            let add = s.spawn(|| call("ADD"));
            let del = s.spawn(|| call("DEL"));
            (add.join().unwrap(), del.join().unwrap())
        });
        assert!(add.success, "round {round}: ADD: {} {}", add.raw_stdout, add.stderr);
        assert!(del.success, "round {round}: DEL: {} {}", del.raw_stdout, del.stderr);

        let held = Held::read(&node);
        if held == Held::nothing() {
            gone += 1;
        } else {
            // DEL came first, ADD after: the pod must be whole.
            let ip = add.stdout["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_owned();
            let host_veth = add.stdout["interfaces"][0]["name"].as_str().unwrap().to_owned();
            let whole = Held {
                veths: vec![host_veth],
                leases: vec![ip.clone()],
                endpoints: vec![ip.clone()],
                link_pins: 1,
                records: 1,
            };
            assert_eq!(held, whole, "round {round}: a half pod is left (ADD {})", add.raw_stdout);
            assert!(pod.exec(&["ip", "-o", "addr", "show", "eth0"]).contains(&format!("{ip}/32")));
            // Clean up for the next round, as the runtime's next DEL would.
            let mut del_conf = node.cni_config();
            del_conf["prevResult"] = add.stdout.clone();
            let del = node.cni(&Node::cni_env("DEL", &container, &netns), del_conf.to_string().as_bytes());
            assert!(del.success, "round {round}: final DEL: {}", del.raw_stdout);
            assert_eq!(Held::read(&node), Held::nothing(), "round {round}: DEL left something");
            there += 1;
        }
    }
    eprintln!(
        "{ROUNDS} ADD+DEL races in {:?}: {there} ended with the pod there, {gone} with it gone",
        started.elapsed()
    );
    assert_eq!(node.cni_lock_files(), Vec::<String>::new(), "lock files left");
}

#[test]
fn gc_leaves_the_veth_of_an_add_under_way_alone() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let node = node;
    // An ADD under way: it holds the lock directory shared, and its veth
    // (our name pattern) exists before the agent has a record of it.
    let adding = DirLock::shared(&node.cni_lock_dir(), LOCK_WAIT).unwrap();
    let veth = "dpt0123456789ab";
    sh(&["ip", "-n", &node.netns.name, "link", "add", veth, "type", "veth", "peer", "name", "dptpeer"]);
    let mut conf = node.cni_config();
    conf["cniVersion"] = "1.1.0".into();
    conf["cni.dev/valid-attachments"] = serde_json::json!([]);
    let conf = conf.to_string();
    std::thread::scope(|s| {
        let gc = s.spawn(|| node.cni(&[("CNI_COMMAND", "GC")], conf.as_bytes()));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!gc.is_finished(), "GC waits for the ADD");
        assert!(node.host_veths().contains(&veth.to_owned()), "the ADD's veth is left alone");
        // The ADD dies half-way: its veth has no owner now, and GC takes it.
        drop(adding);
        let run = gc.join().unwrap();
        assert!(run.success, "GC: {} {}", run.raw_stdout, run.stderr);
    });
    assert_eq!(node.host_veths(), Vec::<String>::new());
}
