//! The bench suites beyond packets on the wire: the per-packet cost of each
//! program path (BPF_PROG_TEST_RUN), the control plane at scale, and the
//! targets every figure is held against.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use datapath_agent::datapath::{Datapath, RemoteRoute};
use datapath_common::{Endpoint, NodeConfig, PodInterface, RoutingMode, program_names};
use datapath_tests::{
    lab::{Netns, Node},
    packets::{ETH_P_IP, Ipv4, arp_request, ethernet},
};

use crate::bench::{Stats, stats};

const POD_A: [u8; 4] = [10, 244, 1, 10];
const POD_B: [u8; 4] = [10, 244, 1, 11];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const MAC_A: [u8; 6] = [2, 0xaa, 0, 0, 0, 10];
const HOST_MAC_A: [u8; 6] = [2, 0xee, 0, 0, 0, 10];

/// A datapath with private maps: pod A (on the test-run device, ifindex 1)
/// and pod B local, 10.244.2.0/24 on a peer node, in `mode`.
fn datapath(mode: RoutingMode) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load_unpinned()?;
    dp.insert_pod_interface(
        1,
        PodInterface { pod_ipv4: POD_A, host_mac: HOST_MAC_A, _pad: [0; 2], traffic_slot: 0 },
    )?;
    dp.insert_endpoint(
        Ipv4Addr::from(POD_B),
        Endpoint {
            host_ifindex: 4242,
            pod_mac: [2, 0xaa, 0, 0, 0, 11],
            host_mac: [2, 0xee, 0, 0, 0, 11],
            flags: 0,
            traffic_slot: 1,
        },
    )?;
    dp.set_node_config(NodeConfig {
        node_ipv4: [192, 0, 2, 1],
        mode: mode as u32,
        uplink_ifindex: 1,
        vxlan_ifindex: 1,
        vni: 1,
        flags: 0,
    })?;
    dp.sync_remote_nodes(&[RemoteRoute {
        pod_cidr: "10.244.2.0/24".parse()?,
        node_ip: Ipv4Addr::new(192, 0, 2, 2),
    }])?;
    Ok(dp)
}

fn frame(dst: [u8; 4]) -> Vec<u8> {
    ethernet(HOST_MAC_A, MAC_A, ETH_P_IP, &Ipv4::icmp_echo(POD_A, dst).bytes())
}

/// ns/packet of each program path, `repeats` times `count` packets.
pub fn program_paths(count: u32, repeats: usize) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let cases: [(&str, RoutingMode, &str, Vec<u8>); 6] = [
        ("local delivery", RoutingMode::Native, program_names::FROM_POD, frame(POD_B)),
        ("remote native", RoutingMode::Native, program_names::FROM_POD, frame(REMOTE_POD)),
        ("remote overlay", RoutingMode::Vxlan, program_names::FROM_POD, frame(REMOTE_POD)),
        // Test runs cannot attach tunnel metadata: this is the drop path.
        ("overlay ingress (no tunnel key)", RoutingMode::Vxlan, program_names::FROM_OVERLAY, frame(POD_B)),
        (
            "ARP reply",
            RoutingMode::Native,
            program_names::FROM_POD,
            arp_request(MAC_A, POD_A, [169, 254, 1, 1]),
        ),
        ("pass to host", RoutingMode::Native, program_names::FROM_POD, frame([198, 51, 100, 9])),
    ];
    let mut out = Vec::new();
    for (name, mode, program, packet) in cases {
        let dp = datapath(mode)?;
        let mut samples = Vec::new();
        for _ in 0..repeats {
            let mut data_out = vec![0u8; packet.len() + 256];
            let result = dp.program(program)?.test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut data_out),
                repeat: count,
                ..Default::default()
            })?;
            samples.push(result.duration.as_nanos() as f64);
        }
        out.push((name, stats(samples)));
    }
    Ok(out)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::to_owned))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub struct ControlPlane {
    pub pods: usize,
    pub add_to_ping_p50: Duration,
    pub add_to_ping_p99: Duration,
    pub agent_rss_idle_kib: u64,
    pub endpoints: usize,
    pub remote_cidrs: usize,
    pub program_time: Duration,
    pub rss_at_scale_kib: u64,
}

/// CNI ADD to a pod that answers ping over `pods` pods (real agent and
/// plugin), then `endpoints` endpoints and `cidrs` remote pod CIDRs written
/// into the maps with the agent's own code, timed, with the RSS it takes.
pub fn control_plane(pods: usize, endpoints: usize, cidrs: usize) -> anyhow::Result<ControlPlane> {
    let mut node = Node::new("10.244.0.0/20", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    std::thread::sleep(Duration::from_millis(500));
    let agent_rss_idle_kib = node.agent_pid().map(rss_kib).unwrap_or(0);
    let conf = node.cni_config().to_string();
    let mut times = Vec::new();
    let mut namespaces = Vec::new();
    for i in 0..pods {
        let ns = Netns::new(format!("{}-p{i}", node.id));
        let netns = ns.path().display().to_string();
        let started = Instant::now();
        let add = node.cni(&Node::cni_env("ADD", &format!("bench-{i}"), &netns), conf.as_bytes());
        anyhow::ensure!(add.success, "ADD: {}", add.raw_stdout);
        let ip =
            add.stdout["ips"][0]["address"].as_str().unwrap_or_default().trim_end_matches("/32").to_owned();
        while !node.netns.exec_ok(&["ping", "-c", "1", "-W", "1", "-i", "0.01", &ip]) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "pod {i} never answered");
        }
        times.push(started.elapsed());
        namespaces.push(ns);
    }
    times.sort();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    drop(namespaces);
    drop(node);

    // Scale: the same Datapath code the agent runs, in this process.
    let before = rss_kib(std::process::id());
    let started = Instant::now();
    let mut dp = Datapath::load_unpinned()?;
    for i in 0..endpoints {
        let ip = Ipv4Addr::from(0x0a80_0000u32 + i as u32); // 10.128.0.0/10: not overlapping the CIDRs below
        dp.insert_endpoint(
            ip,
            Endpoint {
                host_ifindex: 1000 + i as u32,
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
                flags: 0,
                traffic_slot: datapath_common::NO_TRAFFIC_SLOT,
            },
        )?;
    }
    // 100k /24s over 5,000 nodes (Kubernetes' node limit), 20 CIDRs each.
    let routes: Vec<RemoteRoute> = (0..cidrs)
        .map(|i| RemoteRoute {
            pod_cidr: ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000u32 + ((i as u32) << 8)), 24).unwrap(),
            node_ip: Ipv4Addr::from(0xc0a8_0000u32 + (i as u32 % 5000) + 1),
        })
        .collect();
    dp.sync_remote_nodes(&routes)?;
    let program_time = started.elapsed();
    let rss_at_scale_kib = rss_kib(std::process::id()).saturating_sub(before);
    Ok(ControlPlane {
        pods,
        add_to_ping_p50: pct(50),
        add_to_ping_p99: pct(99),
        agent_rss_idle_kib,
        endpoints,
        remote_cidrs: cidrs,
        program_time,
        rss_at_scale_kib,
    })
}

/// A figure and its target: `value` must be >= (or <=) `target`.
pub struct Target {
    pub what: String,
    pub value: f64,
    pub at_least: bool,
    pub target: f64,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least { self.value >= self.target } else { self.value <= self.target }
    }
    pub fn line(&self) -> String {
        format!(
            "{:<58} {:>10.2} {} {:<8} {}",
            self.what,
            self.value,
            if self.at_least { ">=" } else { "<=" },
            self.target,
            if self.met() { "met" } else { "SHORT" }
        )
    }
}
