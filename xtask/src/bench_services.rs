//! `cargo xtask bench --suite services`: ClusterIP Services at scale (issue
//! 8, 18), ours against kube-proxy in iptables and in nftables mode, built
//! in the same run; NodePort from outside is `bench_node_ports`.
//!
//! At N = 1,000 and 10,000 Services (smoke: 10 and 100), one setup each:
//!
//! - **ours**: a lab node (real agent, native mode) with a client and a
//!   backend pod made by the CNI plugin, and N Services in the agent's
//!   config; the measured one is 10.96.0.10:80 -> backend:8080, the others
//!   have their own cluster IPs and the same backend.
//! - **kube-proxy iptables**: the same topology without our datapath,
//!   routed like Calico (/32 routes on the host veths, pods' gateway
//!   169.254.1.1 as a static neighbour), and kube-proxy's nat table for the
//!   same N Services loaded with one `iptables-restore` (Debian's,
//!   iptables-nft), the measured Service last in KUBE-SERVICES: the worst
//!   case of the linear scan every new connection makes.
//! - **kube-proxy nftables**: the same, with its nftables table
//!   (`bench_kube_proxy_nft`).
//!
//! Each setup is measured twice: with a pod as the client, and with the
//! node's own process (ours: socket load balancing; kube-proxy: its
//! OUTPUT chain). Measured, repeats interleaved, client on CPU 0 and
//! server on CPU 1: TCP_CRR through the Service (closed with FIN, and
//! closed with a reset by the client, which keeps no TIME_WAIT and so is
//! free of the harness's ephemeral-port ceiling), and the time `connect()`
//! to the cluster IP takes (first packet: SYN out, DNAT, SYN-ACK back).
//! Then the time to apply one Service change at N: ours, the agent's own
//! `ServiceSync::change` (as the Kubernetes watch hands a change over) on a
//! private datapath holding N Services, for one Service's new backend, and
//! the same change as a whole new list (`replace_all`, a config reload);
//! kube-proxy iptables, one `iptables-restore --noflush` of the whole nat
//! table (its full sync); kube-proxy nftables, its partial sync of the
//! changed Service (one `nft -f -` transaction). Run from a release build.

use std::{
    hash::{Hash as _, Hasher as _},
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datapath_agent::{
    bpf::Datapath,
    model::ServiceRef,
    reconcile::{service_sync::ServiceSync, services::ThisNode},
    source::config::{ServiceConfig, ServicePortConfig, ServiceProtocol, SessionAffinity, TrafficPolicy},
};
use datapath_tests::{
    lab::{CLUSTER_CIDR, Netns, Node, Pod, VETH_PREFIX, mac_of},
    sh,
};

use crate::{
    bench::{
        BenchArgs, CRR_CLIENT_PORTS, Pair, Stats, at_harness_ceiling, ceiling_mark, crr_client_ports,
        crr_harness_ceiling, enter, feed_in_netns, request_response, request_response_reset, reset_on_close,
        stats,
    },
    bench_extra::Target,
    bench_kube_proxy_nft::{KUBE_PROXY_NFT, KubeProxyNftSetup},
};

/// The measured Service: clients connect here.
pub(crate) const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub(crate) const SERVICE_PORT: u16 = 80;
/// The backend listens here (the Service's target port).
pub(crate) const SERVER_PORT: u16 = 8080;
/// A backend address no pod has: what one Service's change switches to.
pub(crate) const OTHER_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 200);
const OURS: &str = "ours";
const KUBE_PROXY: &str = "kube-proxy iptables";
/// The same setups with the node's own process as the client (a host
/// process or hostNetwork pod): ours by socket load balancing, kube-proxy
/// by its OUTPUT chain.
const OURS_NODE: &str = "ours, node client";
const KUBE_PROXY_NODE: &str = "kube-proxy iptables, node client";
const KUBE_PROXY_NFT_NODE: &str = "kube-proxy nftables, node client";
/// The node's own address in kube-proxy's node (ours: the lab node's).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// The cluster IP of the `i`-th other Service: 10.96.0.100 upwards, inside
/// 10.96.0.0/16 (up to 65,000-odd), never the measured one.
fn other_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 100)) + i as u32)
}

/// One Service port with one backend, as both setups program it.
#[derive(Clone)]
pub(crate) struct Svc {
    pub(crate) name: String,
    pub(crate) vip: Ipv4Addr,
    pub(crate) backend: SocketAddrV4,
}

/// The N Services of a setup: N-1 others, then the measured one (last, so
/// kube-proxy's KUBE-SERVICES scan passes all others first).
pub(crate) fn service_list(n: usize, backend: Ipv4Addr) -> Vec<Svc> {
    let to = SocketAddrV4::new(backend, SERVER_PORT);
    let mut all: Vec<Svc> =
        (0..n - 1).map(|i| Svc { name: format!("svc-{i}"), vip: other_vip(i), backend: to }).collect();
    all.push(Svc { name: "measured".into(), vip: VIP, backend: to });
    all
}

/// `[[services]]` entries for the agent's config.
fn agent_config(services: &[Svc]) -> String {
    let mut out = String::new();
    for s in services {
        out.push_str(&format!(
            "\n[[services]]\nname = \"{}\"\nnamespace = \"bench\"\ncluster_ip = \"{}\"\nbackends = [\"{}\"]\n\
             [[services.ports]]\nname = \"http\"\nport = {SERVICE_PORT}\ntarget_port = {}\n",
            s.name,
            s.vip,
            s.backend.ip(),
            s.backend.port()
        ));
    }
    out
}

/// The Services as the agent holds them (what `[[services]]` or the
/// Kubernetes watch gives it).
fn service_configs(services: &[Svc]) -> Vec<ServiceConfig> {
    services
        .iter()
        .map(|s| ServiceConfig {
            name: s.name.clone(),
            namespace: "bench".into(),
            cluster_ip: s.vip,
            session_affinity: SessionAffinity::None,
            session_affinity_timeout_seconds: 10_800,
            ports: vec![ServicePortConfig {
                port: SERVICE_PORT,
                protocol: ServiceProtocol::Tcp,
                target_port: Some(s.backend.port()),
                name: Some("http".into()),
                node_port: None,
            }],
            backends: vec![*s.backend.ip()],
            terminating_backends: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        })
        .collect()
}

/// Our node: agent, client and backend pods, N Services programmed.
struct OursSetup {
    // Drop order: pods, then the node.
    client: Pod,
    backend: Pod,
    node: Node,
}

impl OursSetup {
    fn new(n: usize) -> anyhow::Result<Self> {
        let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
        node.start_agent();
        let client = node.add_pod("svc-client");
        let backend = node.add_pod("svc-backend");
        // Closed connections are forgotten after 1 s (default 10), so that the
        // connect() runs find no entry of an earlier run's 5-tuple.
        node.set_extra_config(&format!(
            "conntrack_closing_seconds = 1\n{}",
            agent_config(&service_list(n, backend.ip))
        ));
        let setup = Self { client, backend, node };
        // The agent reads the file every 500 ms; wait until all N are in the maps.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let programmed = setup.node.inspect("services").as_array().map_or(0, Vec::len);
            if programmed == n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent programmed {programmed} of {n} Services:\n{}",
                setup.node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(setup)
    }

    /// Wait (up to 30 s) until the node tracks no connection, so that the
    /// next connections' first packets take the Service lookup, not an entry
    /// an earlier connection of the same 5-tuple left; returns how many
    /// were still tracked.
    fn wait_untracked(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let tracked = self.node.inspect("conntrack").as_array().map_or(0, Vec::len);
            if tracked == 0 || Instant::now() > deadline {
                return tracked;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn pair(&self) -> Pair {
        Pair::between(OURS, &self.client.netns, &self.backend.netns, self.backend.ip)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }

    /// The node's own process as the client (socket load balancing).
    fn node_pair(&self) -> Pair {
        Pair::between(OURS_NODE, &self.node.netns, &self.backend.netns, self.backend.ip)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }
}

/// kube-proxy's node: pods routed like Calico, the nat table as kube-proxy
/// writes it.
struct KubeProxySetup {
    pods: RoutedPods,
    services: Vec<Svc>,
    /// Chains of the last restore (a resync deletes the ones it no longer uses).
    chains: Vec<String>,
}

pub(crate) const KP_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub(crate) const KP_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// The pods' gateway, as Calico gives it: a static neighbour, never an address.
const POD_GATEWAY: &str = "169.254.1.1";

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A client and a backend pod routed by a node namespace the way Calico
/// routes them, without our datapath: /32 routes on the host veths, the
/// pods' gateway 169.254.1.1 a static neighbour. The kernel baselines
/// (kube-proxy, an iptables NetworkPolicy) are built on it.
pub(crate) struct RoutedPods {
    // Drop order: pods, then the node.
    pub(crate) client: Netns,
    pub(crate) backend: Netns,
    pub(crate) node: Netns,
}

impl RoutedPods {
    /// Namespaces `<prefix>-<tag>-{node,client,backend}`.
    pub(crate) fn new(prefix: &str, tag: &str) -> Self {
        let node = Netns::new(format!("{prefix}-{tag}-node"));
        let client = Netns::new(format!("{prefix}-{tag}-client"));
        let backend = Netns::new(format!("{prefix}-{tag}-backend"));
        let ns = node.name.clone();
        sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (pod, veth, ip) in
            [(&client, Self::CLIENT_VETH, KP_CLIENT_IP), (&backend, Self::BACKEND_VETH, KP_BACKEND_IP)]
        {
            let veth = format!("{VETH_PREFIX}{veth}");
            let (p, ip) = (pod.name.as_str(), ip.to_string());
            sh(&["ip", "-n", &ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", p]);
            sh(&["ip", "-n", &ns, "link", "set", &veth, "up"]);
            sh(&["ip", "-n", p, "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            sh(&["ip", "-n", p, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", p, "route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"]);
            sh(&["ip", "-n", p, "route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"]);
            let host_mac = mac_string(mac_of(&node, &veth));
            let pod_mac = mac_string(mac_of(pod, "eth0"));
            sh(&[
                "ip",
                "-n",
                p,
                "neigh",
                "replace",
                POD_GATEWAY,
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            sh(&["ip", "-n", &ns, "route", "add", &format!("{ip}/32"), "dev", &veth]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "neigh",
                "replace",
                &ip,
                "lladdr",
                &pod_mac,
                "dev",
                &veth,
                "nud",
                "permanent",
            ]);
        }
        // The node's uplink: its own address (a host process's source) and
        // a default route, without which a host process's connect() to a
        // cluster IP fails before kube-proxy's OUTPUT chain sees it.
        let uplink = format!("{VETH_PREFIX}kpu");
        let far_end = format!("{VETH_PREFIX}kpv");
        sh(&["ip", "-n", &ns, "link", "add", &uplink, "type", "veth", "peer", "name", &far_end]);
        for device in [&uplink, &far_end] {
            sh(&["ip", "-n", &ns, "link", "set", device, "up"]);
        }
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{NODE_IP}/24"), "dev", &uplink]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", "10.250.0.254", "dev", &uplink]);
        Self { client, backend, node }
    }

    const CLIENT_VETH: &str = "kpc";
    const BACKEND_VETH: &str = "kpb";

    /// The backend's host veth (in the node namespace).
    pub(crate) fn backend_veth() -> String {
        format!("{VETH_PREFIX}{}", Self::BACKEND_VETH)
    }
}

impl KubeProxySetup {
    fn new(prefix: &str, n: usize) -> anyhow::Result<Self> {
        let pods = RoutedPods::new(prefix, &format!("kp{n}"));
        let mut setup = Self { pods, services: service_list(n, KP_BACKEND_IP), chains: Vec::new() };
        // The whole nat table in one restore, flushing what was there.
        setup.restore(&["-w"], true)?;
        Ok(setup)
    }

    fn pair(&self) -> Pair {
        Pair::between(KUBE_PROXY, &self.pods.client, &self.pods.backend, KP_BACKEND_IP)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }

    fn node_pair(&self) -> Pair {
        Pair::between(KUBE_PROXY_NODE, &self.pods.node, &self.pods.backend, KP_BACKEND_IP)
            .via(SocketAddrV4::new(VIP, SERVICE_PORT), SERVER_PORT)
    }

    /// Write the nat table for `self.services` with `iptables-restore ARGS`
    /// in the node; returns how long the command took (spawn included, as
    /// kube-proxy pays it too).
    fn restore(&mut self, args: &[&str], initial: bool) -> anyhow::Result<Duration> {
        let (text, chains) = nat_table(&self.services, &self.chains, initial);
        let command: Vec<&str> = ["iptables-restore"].into_iter().chain(args.iter().copied()).collect();
        let took = feed_in_netns(&self.pods.node.name, &command, &text)?;
        self.chains = chains;
        Ok(took)
    }

    /// Rules in the nat table (a sanity check that all N are there).
    fn rule_count(&self) -> usize {
        sh(&["ip", "netns", "exec", &self.pods.node.name, "iptables", "-w", "-t", "nat", "-S"])
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    }
}

/// kube-proxy's chain name hash: 16 characters of base32 over a hash of
/// what names the chain (kube-proxy takes SHA-256; any stable hash names
/// chains alike).
pub(crate) fn chain_hash(what: &str) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        (what, salt).hash(&mut h);
        h.finish()
    };
    let bits = (u128::from(half(1)) << 64) | u128::from(half(2));
    (0..16).map(|i| BASE32[((bits >> (5 * i)) & 31) as usize] as char).collect()
}

/// The nat table as kube-proxy (iptables mode, with --cluster-cidr) writes
/// it for `services` (one TCP port each, named "http"): with `initial`, the
/// built-in chains and their jumps too (a plain restore replaces the whole
/// table); otherwise what its full sync writes with `--noflush`: every
/// KUBE-* chain declared (which flushes it) and refilled, and the chains of
/// `previous` no longer used declared and deleted. Returns the text and the
/// chains it leaves.
fn nat_table(services: &[Svc], previous: &[String], initial: bool) -> (String, Vec<String>) {
    let mut chains: Vec<String> =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].map(String::from).into();
    let mut rules = String::new();
    if initial {
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        );
    }
    rules.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut per_service = String::new();
    for s in services {
        let port_name = format!("bench/{}:http", s.name);
        let svc = format!("KUBE-SVC-{}", chain_hash(&format!("{port_name}tcp")));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}\n",
            s.vip
        ));
        per_service.push_str(&format!(
            "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ\n",
            s.vip
        ));
        let endpoints = [s.backend];
        let mut seps = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{port_name}tcp{ep}")));
            // Endpoint i of n takes 1/(n-i) of what the earlier ones left.
            let left = endpoints.len() - i;
            let pick = if left > 1 {
                format!(" -m statistic --mode random --probability {:.11}", 1.0 / left as f64)
            } else {
                String::new()
            };
            per_service
                .push_str(&format!("-A {svc} -m comment --comment \"{port_name} -> {ep}\"{pick} -j {sep}\n"));
            seps.push((sep, ep));
        }
        chains.push(svc);
        for (sep, ep) in seps {
            per_service.push_str(&format!(
                "-A {sep} -s {}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ep}\n",
                ep.ip()
            ));
            chains.push(sep);
        }
    }
    rules.push_str(&per_service);
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let wanted: std::collections::HashSet<&String> = chains.iter().collect();
    let stale: Vec<&String> = previous.iter().filter(|c| !wanted.contains(c)).collect();
    let mut text = String::from("*nat\n");
    if initial {
        for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            text.push_str(&format!(":{builtin} ACCEPT [0:0]\n"));
        }
    }
    for chain in chains.iter().chain(stale.iter().copied()) {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    text.push_str(&rules);
    for chain in &stale {
        text.push_str(&format!("-X {chain}\n"));
    }
    text.push_str("COMMIT\n");
    (text, chains)
}

/// Median time `connect()` to the pair's Service takes, over `count` new
/// connections one after another, in µs. The client closes each with a
/// reset (SO_LINGER 0): no TIME_WAIT sockets pile up in its namespace to
/// slow the next runs' port search.
pub(crate) fn connect_latency(pair: &Pair, count: usize) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let (server_ns, server_ip, port) = (pair.server.clone(), pair.server_ip, pair.server_port);
    let (tx, rx) = std::sync::mpsc::channel();
    let server_stop = Arc::clone(&stop);
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        enter(&server_ns, 1)?;
        let listener = TcpListener::bind((server_ip, port))?;
        tx.send(())?;
        let mut byte = [0u8; 1];
        while !server_stop.load(Ordering::Relaxed) {
            let (mut conn, _) = listener.accept()?;
            // Until the client closes: it closes first, as in TCP_CRR.
            while let Ok(n) = conn.read(&mut byte) {
                if n == 0 {
                    break;
                }
            }
        }
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(5))?;
    let target = pair.target(port);
    let (client_ns, client_ports) = (pair.client.clone(), pair.client_ports);
    let client = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        enter(&client_ns, 0)?;
        crr_client_ports(client_ports)?;
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            times.push(started.elapsed().as_secs_f64() * 1e6);
            reset_on_close(&conn)?;
            drop(conn);
        }
        Ok(times)
    });
    let times = client.join().map_err(|_| anyhow::anyhow!("client panicked"));
    crate::bench::stop_server(pair, target, &stop, server);
    Ok(stats(times??).median)
}

/// Times (ms) of `changes` Service changes on our datapath, as the agent
/// makes them: a private datapath and state dir holding `n` Services, each
/// change one Service's backend swapped. First, a change as the Kubernetes
/// watch hands it over (`ServiceSync::change`: that Service's map entries
/// and its names record); second, the same change as a whole new list
/// (`ServiceSync::replace_all`: a config-file reload or a relist).
fn ours_change_ms(n: usize, changes: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut list = service_configs(&service_list(n, Ipv4Addr::new(10, 244, 1, 3)));
    let state_dir = tempdir_named("dpb-svc-state")?;
    let mut dp = Datapath::load_unpinned()?;
    let mut sync = ServiceSync::new(
        state_dir.0.clone(),
        ThisNode {
            pod_cidr: "10.244.1.0/24".parse()?,
            address: Ipv4Addr::new(192, 168, 1, 10),
            serve_outside: false,
        },
    );
    let report = sync.replace_all(&mut dp, list.clone())?;
    anyhow::ensure!(report.added == n, "{} of {n} Services added", report.added);
    let mut one = Vec::with_capacity(changes);
    let mut whole = Vec::with_capacity(changes);
    for k in 0..changes * 2 {
        // Service 0 (never the measured one) swaps between two backends.
        let ip = if k % 2 == 0 { OTHER_BACKEND } else { Ipv4Addr::new(10, 244, 1, 3) };
        list[0].backends = vec![ip];
        let report = if k < changes {
            let changed = [(ServiceRef::of(&list[0]), Some(list[0].clone()))].into();
            let started = Instant::now();
            let report = sync.change(&mut dp, changed)?;
            one.push(started.elapsed().as_secs_f64() * 1e3);
            report
        } else {
            let new_list = list.clone();
            let started = Instant::now();
            let report = sync.replace_all(&mut dp, new_list)?;
            whole.push(started.elapsed().as_secs_f64() * 1e3);
            report
        };
        anyhow::ensure!(
            (report.added, report.updated, report.removed) == (0, 1, 0),
            "one Service change made {report:?}"
        );
    }
    let names = datapath_agent::reconcile::service_names::load_names(&state_dir.0)?;
    anyhow::ensure!(names.len() == n, "{} names records for {n} Services", names.len());
    Ok((one, whole))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

fn tempdir_named(prefix: &str) -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(TempDir(path))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// kube-proxy's full sync after one Service's endpoint changed: the whole
/// nat table with `iptables-restore --noflush`, `changes` times (ms). The
/// table is left as it was.
fn kube_proxy_change_ms(setup: &mut KubeProxySetup, changes: usize) -> anyhow::Result<Vec<f64>> {
    let original = setup.services[0].backend;
    let mut times = Vec::with_capacity(changes);
    for k in 0..changes {
        let ip = if k % 2 == 0 { OTHER_BACKEND } else { *original.ip() };
        setup.services[0].backend = SocketAddrV4::new(ip, SERVER_PORT);
        times.push(setup.restore(&["-w", "--noflush", "--counters"], false)?.as_secs_f64() * 1e3);
    }
    if setup.services[0].backend != original {
        setup.services[0].backend = original;
        setup.restore(&["-w", "--noflush", "--counters"], false)?;
    }
    Ok(times)
}

/// Run `f` on a thread pinned to CPU 0 (and so are the commands it spawns).
fn pinned<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        let mut set = nix::sched::CpuSet::new();
        set.set(0)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("panicked"))?
}

/// One setup's figures at one N.
struct Row {
    setup: &'static str,
    n: usize,
    crr: Vec<f64>,
    /// TCP_CRR with the client closing by reset (no TIME_WAIT).
    crr_reset: Vec<f64>,
    connect_us: Vec<f64>,
    change_ms: Vec<f64>,
}

pub(crate) fn services(prefix: &str, args: &BenchArgs) -> anyhow::Result<(serde_json::Value, Vec<Target>)> {
    let sizes: [usize; 2] = if args.smoke { [10, 100] } else { [1_000, 10_000] };
    let connections = if args.smoke { 200 } else { 2_000 };
    let (ours_changes, kube_proxy_changes) = if args.smoke { (4, 2) } else { (20, 5) };
    let duration = Duration::from_secs(args.duration);
    let iptables = sh(&["iptables-restore", "--version"]).trim().to_owned();
    let nft = sh(&["nft", "--version"]).trim().to_owned();

    // Setups: ours and kube-proxy's (both modes) at each N (the guards
    // remove everything, also on failure).
    let mut ours = Vec::new();
    let mut kube_proxy = Vec::new();
    let mut kube_proxy_nft = Vec::new();
    for &n in &sizes {
        eprintln!("services: setting up ours and kube-proxy (iptables, nftables) with {n} Services");
        ours.push(OursSetup::new(n)?);
        let kp = KubeProxySetup::new(prefix, n)?;
        let rules = kp.rule_count();
        anyhow::ensure!(rules >= 5 * n, "kube-proxy's nat table has {rules} rules for {n} Services");
        kube_proxy.push(kp);
        kube_proxy_nft.push(KubeProxyNftSetup::new(prefix, n)?);
    }
    // Each setup with a pod as the client, then with the node's own process.
    let pairs: Vec<(Pair, usize, Option<&OursSetup>)> = sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| {
            [
                (ours[i].pair(), n, Some(&ours[i])),
                (kube_proxy[i].pair(), n, None),
                (kube_proxy_nft[i].pair(), n, None),
                (ours[i].node_pair(), n, None),
                (kube_proxy[i].node_pair(), n, None),
                (kube_proxy_nft[i].node_pair(KUBE_PROXY_NFT_NODE), n, None),
            ]
        })
        .collect();
    let mut rows: Vec<Row> = pairs
        .iter()
        .map(|(p, n, _)| Row {
            setup: p.name,
            n: *n,
            crr: Vec::new(),
            crr_reset: Vec::new(),
            connect_us: Vec::new(),
            change_ms: Vec::new(),
        })
        .collect();
    // connect() first: TCP_CRR leaves thousands of TIME_WAIT sockets in the
    // client, which would slow the connect() runs after it.
    let mut still_tracked = 0;
    for rep in 0..args.repeats {
        for ((pair, n, ours), row) in pairs.iter().zip(&mut rows) {
            eprintln!("services connect() {}/{}: {} with {n} Services", rep + 1, args.repeats, pair.name);
            if let Some(ours) = ours {
                still_tracked = still_tracked.max(ours.wait_untracked());
            }
            row.connect_us.push(connect_latency(pair, connections)?);
        }
    }
    for rep in 0..args.repeats {
        for ((pair, n, _), row) in pairs.iter().zip(&mut rows) {
            eprintln!("services TCP_CRR {}/{}: {} with {n} Services", rep + 1, args.repeats, pair.name);
            row.crr.push(request_response(pair, duration, true)?);
            row.crr_reset.push(request_response_reset(pair, duration)?);
        }
    }
    drop(pairs);
    drop(ours);
    // Changes: ours on a private datapath, kube-proxy in its node.
    let mut whole_list = Vec::new();
    for &n in &sizes {
        eprintln!("services: one Service change at {n} Services");
        let (times, whole) = pinned(move || ours_change_ms(n, ours_changes))?;
        whole_list.push((n, stats(whole)));
        rows.iter_mut().find(|r| r.setup == OURS && r.n == n).context("row")?.change_ms = times;
        let mut kp = kube_proxy.remove(0);
        let times = pinned(move || kube_proxy_change_ms(&mut kp, kube_proxy_changes).map(|t| (t, kp)));
        let (times, kp) = times?;
        drop(kp);
        rows.iter_mut().find(|r| r.setup == KUBE_PROXY && r.n == n).context("row")?.change_ms = times;
        let mut kp = kube_proxy_nft.remove(0);
        let times = pinned(move || kp.change_ms(kube_proxy_changes).map(|t| (t, kp)));
        let (times, kp) = times?;
        drop(kp);
        rows.iter_mut().find(|r| r.setup == KUBE_PROXY_NFT && r.n == n).context("row")?.change_ms = times;
    }

    println!(
        "\nServices (ClusterIP): TCP_CRR and connect() through a Service at N Services, {} s x {} repeats,\n\
         {connections} connects per repeat (median of each), client CPU 0, server CPU 1; kube-proxy iptables =\n\
         {iptables} rules in a node namespace (routed pods, no bridge), the measured Service LAST in\n\
         KUBE-SERVICES (worst case of its linear scan, which grows with N); kube-proxy nftables = its table\n\
         since Kubernetes 1.31 ({nft}): verdict maps, filter checks included. \"node client\": the\n\
         client is the node's own process (host process, hostNetwork pod): ours by socket load balancing\n\
         (no per-packet NAT), kube-proxy by its OUTPUT chain. One change: ours = the agent's\n\
         ServiceSync::change for one Service's new backend, maps and names record ({ours_changes} changes);\n\
         kube-proxy iptables = one iptables-restore --noflush of the whole nat table, its full sync;\n\
         kube-proxy nftables = its partial sync of that Service, one nft -f - transaction\n\
         ({kube_proxy_changes} changes each). connect() runs (each connection reset by the client) come before\n\
         the TCP_CRR runs. TCP_CRR reset: the client closes each connection with a reset (no TIME_WAIT),\n\
         free of the ceiling its ephemeral ports set on the FIN-closed TCP_CRR ({ceiling:.0}/s). Ours forgets closed connections after 1 s (conntrack_closing_seconds) and each\n\
         connect() run starts with none tracked, so every SYN takes the Service lookup",
        args.duration,
        args.repeats,
        ceiling = crr_harness_ceiling(CRR_CLIENT_PORTS)
    );
    if still_tracked > 0 {
        println!("NOTE: {still_tracked} connections were still tracked when a connect() run began");
    }
    println!("{:<34} {:>7} {:<26} {:>12} {:>12} {:>12}", "setup", "N", "metric", "min", "median", "max");
    let summary: Vec<(&Row, Stats, Stats, Option<Stats>, Stats)> = rows
        .iter()
        .map(|r| {
            let change = (!r.change_ms.is_empty()).then(|| stats(r.change_ms.clone()));
            (r, stats(r.crr.clone()), stats(r.connect_us.clone()), change, stats(r.crr_reset.clone()))
        })
        .collect();
    for (r, crr, connect, change, reset) in &summary {
        let mut lines = vec![
            ("TCP_CRR (trans/s)", crr, ceiling_mark(crr, CRR_CLIENT_PORTS)),
            ("TCP_CRR reset (trans/s)", reset, ""),
            ("connect() (us, median)", connect, ""),
        ];
        if let Some(change) = change {
            lines.push(("one change (ms)", change, ""));
        }
        for (metric, s, mark) in lines {
            // Our change times are well under a millisecond: show them.
            let digits = if s.max < 10.0 { 3 } else { 1 };
            println!(
                "{:<34} {:>7} {:<26} {:>12.digits$} {:>12.digits$} {:>12.digits$}{mark}",
                r.setup, r.n, metric, s.min, s.median, s.max
            );
        }
    }
    for (n, s) in &whole_list {
        println!(
            "ours at {n}: the same change as a whole new list (config reload or relist, ServiceSync::replace_all): \
             {:.1} ms median (min {:.1}, max {:.1})",
            s.median, s.min, s.max
        );
    }
    let find = |setup: &str, n: usize| summary.iter().find(|(r, ..)| r.setup == setup && r.n == n);
    let (small, big) = (sizes[0], sizes[1]);
    let mut targets = Vec::new();
    if let (Some(o), Some(k), Some(f)) = (find(OURS, big), find(KUBE_PROXY, big), find(KUBE_PROXY_NFT, big)) {
        let better = k.1.median.max(f.1.median);
        // A ratio of figures at the harness's ceiling says nothing.
        let bound = [o, k, f].iter().any(|row| at_harness_ceiling(&row.1, CRR_CLIENT_PORTS));
        targets.push(Target {
            what: format!(
                "Service TCP_CRR ours / the better kube-proxy mode, {big} Services{}",
                if bound { " (HARNESS CEILING)" } else { "" }
            ),
            value: o.1.median / better,
            at_least: true,
            target: 1.5,
        });
        let better_reset = k.4.median.max(f.4.median);
        targets.push(Target {
            what: format!("Service TCP_CRR reset ours / the better kube-proxy mode, {big} Services"),
            value: o.4.median / better_reset,
            at_least: true,
            target: 1.5,
        });
    }
    if let (Some(b), Some(s)) = (find(OURS, big), find(OURS, small)) {
        targets.push(Target {
            what: format!("Service TCP_CRR reset ours {big} / {small} Services (flat in N)"),
            value: b.4.median / s.4.median,
            at_least: true,
            target: 0.95,
        });
        targets.push(Target {
            what: format!("Service connect() ours {big} / {small} Services"),
            value: b.2.median / s.2.median,
            at_least: false,
            target: 1.1,
        });
        if let Some(change) = &b.3 {
            targets.push(Target {
                what: format!("one Service change at {big} Services, ms"),
                value: change.median,
                at_least: false,
                target: 10.0,
            });
        }
    }
    if let (Some(o), Some(k), Some(f)) =
        (find(OURS_NODE, big), find(KUBE_PROXY_NODE, big), find(KUBE_PROXY_NFT_NODE, big))
    {
        let better = k.2.median.min(f.2.median);
        targets.push(Target {
            what: format!(
                "node client connect() ours (socket LB) / the better kube-proxy mode, {big} Services"
            ),
            value: o.2.median / better,
            at_least: false,
            target: 1.0,
        });
    }
    let report = serde_json::json!({
        "suite": "services",
        "duration_s": args.duration,
        "repeats": args.repeats,
        "connects_per_repeat": connections,
        "kube_proxy": {
            "iptables": iptables,
            "nftables": nft,
            "measured_service": "iptables: last in KUBE-SERVICES (worst case of the linear scan); nftables: one verdict map",
            "change": "iptables: iptables-restore --noflush --counters of the whole nat table (full sync); nftables: the partial sync of the changed Service (one nft -f - transaction)",
            "changes": kube_proxy_changes,
        },
        "ours_conntrack_closing_seconds": 1,
        "ours_tracked_before_connects": still_tracked,
        "ours_change": {
            "what": "ServiceSync::change (as from the Kubernetes watch), one Service's backend changed",
            "changes": ours_changes,
            "whole_list_ms": whole_list.iter().map(|(n, s)| serde_json::json!({ "services": n, "stats": s })).collect::<Vec<_>>(),
        },
        "results": summary.iter().map(|(r, crr, connect, change, reset)| serde_json::json!({
            "setup": r.setup,
            "services": r.n,
            "tcp_crr_tps": crr,
            "tcp_crr_at_harness_ceiling": at_harness_ceiling(crr, CRR_CLIENT_PORTS),
            "tcp_crr_reset_tps": reset,
            "connect_us": connect,
            "change_ms": change,
        })).collect::<Vec<_>>(),
    });
    Ok((report, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_table_is_kube_proxys_layout_with_the_measured_service_last() {
        let all = service_list(3, KP_BACKEND_IP);
        let (text, chains) = nat_table(&all, &[], true);
        assert!(text.starts_with("*nat\n:PREROUTING ACCEPT [0:0]\n") && text.ends_with("COMMIT\n"));
        // 4 fixed chains, one KUBE-SVC and one KUBE-SEP per Service.
        assert_eq!(chains.len(), 4 + 2 * 3);
        let portals: Vec<&str> = text.lines().filter(|l| l.starts_with("-A KUBE-SERVICES -d ")).collect();
        assert_eq!(portals.len(), 3);
        assert!(portals[2].starts_with("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp"), "{}", portals[2]);
        assert!(text.contains("-j DNAT --to-destination 10.244.1.3:8080\n"));
        // A resync after one endpoint changed deletes that Service's old KUBE-SEP.
        let mut changed = all.clone();
        changed[0].backend = SocketAddrV4::new(OTHER_BACKEND, SERVER_PORT);
        let (resync, after) = nat_table(&changed, &chains, false);
        assert!(!resync.contains("PREROUTING"));
        let gone: Vec<&String> = chains.iter().filter(|c| !after.contains(c)).collect();
        assert_eq!(gone.len(), 1);
        assert!(resync.contains(&format!("-X {}\n", gone[0])));
    }

    #[test]
    fn other_cluster_ips_stay_in_the_service_range() {
        let all = service_list(10_000, KP_BACKEND_IP);
        let range: ipnet::Ipv4Net = "10.96.0.0/16".parse().unwrap();
        let distinct: std::collections::HashSet<Ipv4Addr> = all.iter().map(|s| s.vip).collect();
        assert_eq!(distinct.len(), 10_000);
        assert!(all.iter().all(|s| range.contains(&s.vip)));
    }
}
