//! `cargo xtask bench`: pod-to-pod TCP_RR, TCP_CRR and throughput, measured
//! in one run against baselines built with iproute2 exactly as flannel builds
//! them (../shared/reference/baselines.md), CPUs pinned (client on CPU 0,
//! server on CPU 1), repeats interleaved across setups so drift hits all
//! alike; min/median/max per figure and the ratio of medians to the suite's
//! physical limit.
//!
//! - same-node: bare veth pair (limit), Linux bridge (flannel), ours.
//! - cross-node: node to node over the uplink (limit), ours native, ours
//!   VXLAN, flannel host-gw, flannel vxlan.
//! - services: ClusterIP Services at 1k and 10k, ours against kube-proxy's
//!   iptables rules (`crate::bench_services`).
//!
//! The JSON report gets an SVG chart beside it (`crate::chart`);
//! `--chart-only REPORT.json` redraws one without measuring.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datapath_tests::{
    lab::{Fabric, Netns, Node, Pod, peered_nodes},
    sh,
};

use crate::build_bins;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// Repeats of every measurement (at least 3 for min/median/max).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Which comparison to run.
    #[arg(long, default_value = "all", value_parser = ["same-node", "cross-node", "programs", "control", "services", "node-ports", "policy", "all"])]
    pub suite: String,
    /// One short repeat of everything, so the benchmark cannot rot (part of
    /// `cargo xtask test`); its figures mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Where to write the JSON report [default: target/bench/report.json, or
    /// target/bench/smoke.json with --smoke].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Where to write the SVG chart [default: the JSON report's path with `.svg`].
    #[arg(long, value_name = "SVG")]
    pub chart: Option<PathBuf>,
    /// Programs suite: measure only the path of this name, e.g. "local
    /// delivery" (to profile it alone: perf record -e cpu-clock -g).
    #[arg(long, value_name = "NAME")]
    pub program_path: Option<String>,
    /// Measure nothing: redraw the chart of an existing JSON report (beside
    /// it, or at --chart), e.g. `--chart-only target/bench/report.json`.
    #[arg(long, value_name = "JSON")]
    pub chart_only: Option<PathBuf>,
}

/// Two endpoints to measure between: namespaces and the server's address.
#[derive(Clone)]
pub(crate) struct Pair {
    pub(crate) name: &'static str,
    pub(crate) client: PathBuf,
    client_name: String,
    pub(crate) server: PathBuf,
    server_name: String,
    pub(crate) server_ip: Ipv4Addr,
    /// The port the server listens on (0: any free one).
    pub(crate) server_port: u16,
    /// Where the client connects (a Service address that leads to the
    /// server), if not straight to the server.
    pub(crate) connect_to: Option<SocketAddrV4>,
    /// The client's ephemeral ports in TCP_CRR (its namespace's range).
    pub(crate) client_ports: (u32, u32),
}

impl Pair {
    pub(crate) fn between(name: &'static str, client: &Netns, server: &Netns, server_ip: Ipv4Addr) -> Self {
        Pair {
            name,
            client: client.path(),
            client_name: client.name.clone(),
            server: server.path(),
            server_name: server.name.clone(),
            server_ip,
            server_port: 0,
            connect_to: None,
            client_ports: CRR_CLIENT_PORTS,
        }
    }

    /// The client's TCP_CRR connections come from `ports` (a narrower range
    /// than the default lowers the harness's ceiling: [`crr_harness_ceiling`]).
    pub(crate) fn with_client_ports(mut self, ports: (u32, u32)) -> Self {
        self.client_ports = ports;
        self
    }

    /// The client connects to `service`, which leads to the server listening
    /// on `server_port`.
    pub(crate) fn via(mut self, service: SocketAddrV4, server_port: u16) -> Self {
        self.connect_to = Some(service);
        self.server_port = server_port;
        self
    }

    /// Where the client connects, given the port the server listens on.
    pub(crate) fn target(&self, port: u16) -> SocketAddr {
        self.connect_to.map_or(SocketAddr::from((self.server_ip, port)), SocketAddr::V4)
    }
}

/// Bare veth pair: two namespaces, one cable.
struct BareVeth {
    a: Netns,
    b: Netns,
}

impl BareVeth {
    fn new(prefix: &str) -> Self {
        let a = Netns::new(format!("{prefix}-veth-a"));
        let b = Netns::new(format!("{prefix}-veth-b"));
        sh(&[
            "ip", "-n", &a.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &b.name,
        ]);
        sh(&["ip", "-n", &a.name, "addr", "add", "10.201.0.1/24", "dev", "eth0"]);
        sh(&["ip", "-n", &b.name, "addr", "add", "10.201.0.2/24", "dev", "eth0"]);
        sh(&["ip", "-n", &a.name, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &b.name, "link", "set", "eth0", "up"]);
        Self { a, b }
    }
    fn pair(&self) -> Pair {
        Pair::between("bare veth pair (limit)", &self.a, &self.b, Ipv4Addr::new(10, 201, 0, 2))
    }
}

/// flannel's same-node path: pods on the `cni0` bridge (baselines.md).
struct Bridge {
    node: Netns,
    a: Netns,
    b: Netns,
}

impl Bridge {
    fn new(prefix: &str) -> Self {
        let node = Netns::new(format!("{prefix}-br-node"));
        let a = Netns::new(format!("{prefix}-br-a"));
        let b = Netns::new(format!("{prefix}-br-b"));
        let n = node.name.clone();
        sh(&["ip", "netns", "exec", &n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(&["ip", "-n", &n, "link", "add", "cni0", "type", "bridge"]);
        sh(&["ip", "-n", &n, "link", "set", "cni0", "mtu", "1500", "up"]);
        sh(&["ip", "-n", &n, "addr", "add", "10.202.0.1/24", "dev", "cni0"]);
        for (pod, veth, ip) in [(&a, "vetha", "10.202.0.2/24"), (&b, "vethb", "10.202.0.3/24")] {
            sh(&[
                "ip", "-n", &n, "link", "add", veth, "mtu", "1500", "type", "veth", "peer", "name", "eth0",
                "netns", &pod.name,
            ]);
            sh(&["ip", "-n", &n, "link", "set", veth, "master", "cni0", "up"]);
            sh(&["ip", "-n", &n, "link", "set", "dev", veth, "type", "bridge_slave", "hairpin", "on"]);
            sh(&["ip", "-n", &pod.name, "addr", "add", ip, "dev", "eth0"]);
            sh(&["ip", "-n", &pod.name, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &pod.name, "route", "add", "default", "via", "10.202.0.1"]);
        }
        Self { node, a, b }
    }
    fn pair(&self) -> Pair {
        let _ = &self.node;
        Pair::between("Linux bridge (flannel)", &self.a, &self.b, Ipv4Addr::new(10, 202, 0, 3))
    }
}

/// A flannel node: pods on `cni0`, and either host-gw routes or the
/// `flannel.1` VXLAN device with static fdb and neighbour entries.
pub(crate) struct FlannelNode {
    pub(crate) node: Netns,
    pub(crate) pod: Netns,
}

pub(crate) fn flannel_pair(prefix: &str, fabric: &Fabric, vxlan: bool) -> ([FlannelNode; 2], Pair) {
    let mtu = if vxlan { "1450" } else { "1500" };
    let tag = if vxlan { "fv" } else { "fh" };
    let nodes: Vec<FlannelNode> = (1..=2u8)
        .map(|n| {
            let node = Netns::new(format!("{prefix}-{tag}{n}-node"));
            let pod = Netns::new(format!("{prefix}-{tag}{n}-pod"));
            let (ns, p) = (node.name.clone(), pod.name.clone());
            fabric.plug(&ns, "eth0");
            sh(&["ip", "-n", &ns, "addr", "add", &format!("10.251.0.{n}/24"), "dev", "eth0"]);
            sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            sh(&["ip", "-n", &ns, "link", "add", "cni0", "type", "bridge"]);
            sh(&["ip", "-n", &ns, "link", "set", "cni0", "mtu", mtu, "up"]);
            sh(&["ip", "-n", &ns, "addr", "add", &format!("10.246.{n}.1/24"), "dev", "cni0"]);
            sh(&[
                "ip", "-n", &ns, "link", "add", "vethA", "mtu", mtu, "type", "veth", "peer", "name", "eth0",
                "netns", &p,
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "vethA", "master", "cni0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "dev", "vethA", "type", "bridge_slave", "hairpin", "on"]);
            sh(&["ip", "-n", &p, "addr", "add", &format!("10.246.{n}.2/24"), "dev", "eth0"]);
            sh(&["ip", "-n", &p, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &p, "route", "add", "default", "via", &format!("10.246.{n}.1")]);
            FlannelNode { node, pod }
        })
        .collect();
    for (n, m) in [(1u8, 2u8), (2, 1)] {
        let ns = &nodes[usize::from(n - 1)].node.name;
        if vxlan {
            let local = format!("10.251.0.{n}");
            sh(&[
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "link",
                "set",
                "flannel.1",
                "address",
                &format!("02:fe:00:00:00:0{n}"),
                "mtu",
                "1450",
                "up",
            ]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("10.246.{n}.0/32"), "dev", "flannel.1"]);
            let peer_mac = format!("02:fe:00:00:00:0{m}");
            sh(&[
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                &format!("10.246.{m}.0"),
                "lladdr",
                &peer_mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ]);
            sh(&[
                "bridge",
                "-n",
                ns,
                "fdb",
                "replace",
                &peer_mac,
                "dev",
                "flannel.1",
                "dst",
                &format!("10.251.0.{m}"),
                "self",
                "permanent",
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                &format!("10.246.{m}.0/24"),
                "via",
                &format!("10.246.{m}.0"),
                "dev",
                "flannel.1",
                "onlink",
            ]);
        } else {
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                &format!("10.246.{m}.0/24"),
                "via",
                &format!("10.251.0.{m}"),
                "dev",
                "eth0",
            ]);
        }
    }
    let name = if vxlan { "flannel vxlan" } else { "flannel host-gw" };
    let pair = Pair::between(name, &nodes[0].pod, &nodes[1].pod, Ipv4Addr::new(10, 246, 2, 2));
    let mut it = nodes.into_iter();
    ([it.next().unwrap(), it.next().unwrap()], pair)
}

fn ours_pair(a: &Pod, b: &Pod) -> Pair {
    Pair::between(OURS_SAME, &a.netns, &b.netns, b.ip)
}

pub(crate) fn enter(ns: &Path, cpu: usize) -> anyhow::Result<()> {
    datapath_api::netns::enter(ns)?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// 1-byte request/response over one TCP connection (netperf TCP_RR) or a new
/// connection per transaction (TCP_CRR). Returns transactions per second.
pub(crate) fn request_response(
    pair: &Pair,
    duration: Duration,
    new_connection_each: bool,
) -> anyhow::Result<f64> {
    request_response_closing(pair, duration, new_connection_each, false)
}

/// TCP_CRR with each connection closed by a reset from the client: no
/// TIME_WAIT, so the client's ephemeral ports (the harness's own ceiling
/// with a FIN close) never run short.
pub(crate) fn request_response_reset(pair: &Pair, duration: Duration) -> anyhow::Result<f64> {
    request_response_closing(pair, duration, true, true)
}

fn request_response_closing(
    pair: &Pair,
    duration: Duration,
    new_connection_each: bool,
    reset: bool,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (server_ns, server_ip, server_port) = (pair.server.clone(), pair.server_ip, pair.server_port);
    let server_stop = Arc::clone(&stop);
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        enter(&server_ns, 1)?;
        let listener = TcpListener::bind((server_ip, server_port))?;
        tx.send(listener.local_addr()?.port())?;
        let mut byte = [0u8; 1];
        while !server_stop.load(Ordering::Relaxed) {
            let (mut conn, _) = listener.accept()?;
            conn.set_nodelay(true)?;
            while let Ok(1) = conn.read(&mut byte) {
                conn.write_all(&byte)?;
            }
        }
        Ok(())
    });
    let port: u16 = rx.recv_timeout(Duration::from_secs(5))?;
    let target = pair.target(port);
    let (client_ns, client_ports) = (pair.client.clone(), pair.client_ports);
    let client = std::thread::spawn(move || -> anyhow::Result<u64> {
        enter(&client_ns, 0)?;
        if new_connection_each {
            crr_client_ports(client_ports)?;
        }
        let connect = || -> anyhow::Result<TcpStream> {
            let c = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            Ok(c)
        };
        let mut byte = [1u8; 1];
        let mut done = 0u64;
        let mut conn = connect()?;
        let start = Instant::now();
        while start.elapsed() < duration {
            if new_connection_each && done > 0 {
                if reset {
                    reset_on_close(&conn)?;
                }
                conn = connect()?;
            }
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            done += 1;
        }
        Ok(done)
    });
    let done = client.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    stop_server(pair, target, &stop, server);
    Ok(done as f64 / duration.as_secs_f64())
}

/// A TCP_CRR client's ephemeral ports unless its pair says otherwise: the
/// whole unprivileged range. The default (32768-60999) made the harness's
/// own ceiling the figure of every setup in a quiet run (BENCHMARKS.md,
/// "The harness's TCP_CRR ceiling").
pub(crate) const CRR_CLIENT_PORTS: (u32, u32) = (1024, 65535);
/// How long connect() waits before it reuses a TIME_WAIT port (the kernel's
/// default, set so that the ceiling is known whatever the host's is).
const CRR_TW_REUSE_DELAY_MS: u32 = 1000;

/// Set the calling thread's namespace (a TCP_CRR client's) up so that the
/// harness's ceiling is known and, with the default ports, well above what
/// the paths can do: TIME_WAIT ports reused (else TCP_CRR measures the
/// ephemeral port search), the reuse delay and the port range set.
pub(crate) fn crr_client_ports(ports: (u32, u32)) -> anyhow::Result<()> {
    let sysctl = |name: &str, value: String| {
        std::fs::write(format!("/proc/sys/net/ipv4/{name}"), &value)
            .with_context(|| format!("setting net.ipv4.{name} = {value} in the client's namespace"))
    };
    sysctl("tcp_tw_reuse", "1".into())?;
    sysctl("tcp_tw_reuse_delay", CRR_TW_REUSE_DELAY_MS.to_string())?;
    sysctl("ip_local_port_range", format!("{} {}", ports.0, ports.1))
}

/// The most FIN-closed TCP_CRR the harness itself can do, whatever the
/// path: each connection leaves its client port in TIME_WAIT, and measured
/// here connect() gets through half the port range per reuse delay (28,232
/// ports gave 14,100-14,250 trans/s in every setup at a 1 s delay, and
/// 7,142-7,172 at 2 s): its port search walks the ports of one parity
/// before it tries the other half, so past that half's refill rate each
/// connect() first walks all of it.
pub(crate) fn crr_harness_ceiling(ports: (u32, u32)) -> f64 {
    let count = f64::from(ports.1 - ports.0 + 1);
    count / 2.0 * 1000.0 / f64::from(CRR_TW_REUSE_DELAY_MS)
}

/// A FIN-closed TCP_CRR figure this near the ceiling measures the harness,
/// not the path: the tables mark it and the reports say so.
pub(crate) fn at_harness_ceiling(s: &Stats, ports: (u32, u32)) -> bool {
    s.max >= 0.95 * crr_harness_ceiling(ports)
}

/// What a table prints after FIN-closed TCP_CRR figures `s` of a client
/// with `ports`.
pub(crate) fn ceiling_mark(s: &Stats, ports: (u32, u32)) -> &'static str {
    if at_harness_ceiling(s, ports) { "  AT THE HARNESS CEILING: not a result" } else { "" }
}

/// Run `command` in namespace `ns` with `text` on its standard input (a
/// rule set for `iptables-restore` or `nft -f -`); how long it took, spawn
/// included (kube-proxy pays that too). Its standard error is the error.
pub(crate) fn feed_in_netns(ns: &str, command: &[&str], text: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} (run scripts/setup.sh)", command[0]))?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    anyhow::ensure!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(took)
}

/// Make closing `conn` send a reset (SO_LINGER 0): no TIME_WAIT.
pub(crate) fn reset_on_close(conn: &TcpStream) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a live socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Stop a server thread blocked in accept(): set `stop`, then connect once
/// from the client's namespace so that accept() returns and sees it. If
/// that path is what failed (the run's error is on its way), connect from
/// the server's own namespace, straight to the listener, instead of
/// waiting forever.
pub(crate) fn stop_server<T>(
    pair: &Pair,
    target: std::net::SocketAddr,
    stop: &AtomicBool,
    server: std::thread::JoinHandle<T>,
) {
    stop.store(true, Ordering::Relaxed);
    let direct = match pair.connect_to {
        Some(_) => std::net::SocketAddr::from((pair.server_ip, pair.server_port)),
        None => target,
    };
    for (ns, to) in [(pair.client.clone(), target), (pair.server.clone(), direct)] {
        let woken = std::thread::spawn(move || -> anyhow::Result<bool> {
            enter(&ns, 0)?;
            Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
        })
        .join();
        if matches!(woken, Ok(Ok(true))) || server.is_finished() {
            break;
        }
    }
    let _ = server.join();
}

/// iperf3, client pinned to CPU 0 and server to CPU 1. Returns Gbit/s.
fn throughput(pair: &Pair, duration: Duration) -> anyhow::Result<f64> {
    let ip = pair.server_ip.to_string();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &pair.server_name, "iperf3", "-s", "-1", "-B", &ip, "-A", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 server (is iperf3 installed? run scripts/setup.sh)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.client_name, "iperf3", "-c", &ip, "-A", "0", "-J", "-t"])
        .arg(duration.as_secs().to_string())
        .output()?;
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no result: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(bps / 1e9)
}

#[derive(serde::Serialize, Clone, Copy)]
pub(crate) struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

pub(crate) fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    Stats { min: v[0], median, max: v[v.len() - 1] }
}

/// Everything a setup owns; dropped (and cleaned up) after the suite.
type Guards = Vec<Box<dyn std::any::Any>>;

fn same_node_suite(prefix: &str) -> (Vec<Pair>, Guards) {
    let veth = BareVeth::new(prefix);
    let bridge = Bridge::new(prefix);
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("bench-a");
    let b = node.add_pod("bench-b");
    let pairs = vec![veth.pair(), bridge.pair(), ours_pair(&a, &b)];
    (pairs, vec![Box::new(a), Box::new(b), Box::new(node), Box::new(veth), Box::new(bridge)])
}

fn cross_node_suite(prefix: &str) -> (Vec<Pair>, Guards) {
    let mut guards: Guards = Vec::new();
    let mut pairs = Vec::new();

    // The limit: two hosts on the same physical network, nothing else.
    let fabric = Fabric::new();
    let h1 = fabric.add_host("limit-a", Ipv4Addr::new(10, 252, 0, 1));
    let h2 = fabric.add_host("limit-b", Ipv4Addr::new(10, 252, 0, 2));
    pairs.push(Pair::between("node to node (limit)", &h1, &h2, Ipv4Addr::new(10, 252, 0, 2)));
    guards.extend([Box::new(h1) as Box<dyn std::any::Any>, Box::new(h2), Box::new(fabric)]);

    for mode in ["native", "vxlan"] {
        let fabric = Fabric::new();
        let (a, b) = peered_nodes(&fabric, mode);
        let a1 = a.add_pod("bench-a1");
        let b1 = b.add_pod("bench-b1");
        let mut pair = ours_pair(&a1, &b1);
        pair.name = if mode == "native" { "ours native" } else { "ours vxlan" };
        pairs.push(pair);
        guards.extend([
            Box::new(a1) as Box<dyn std::any::Any>,
            Box::new(b1),
            Box::new(a),
            Box::new(b),
            Box::new(fabric),
        ]);
    }
    for vxlan in [false, true] {
        let fabric = Fabric::new();
        let (nodes, pair) = flannel_pair(prefix, &fabric, vxlan);
        pairs.push(pair);
        guards.extend([Box::new(nodes) as Box<dyn std::any::Any>, Box::new(fabric)]);
    }
    (pairs, guards)
}

/// A target on the ratio of two setups' medians of one metric in one suite.
pub(crate) struct RatioTarget {
    pub what: &'static str,
    pub suite: &'static str,
    pub setup: &'static str,
    pub versus: &'static str,
    /// The setup's JSON key: `tcp_rr_tps`, `tcp_crr_tps` or `tcp_stream_gbps`.
    pub metric: &'static str,
    /// At least this ratio.
    pub target: f64,
}

const OURS_SAME: &str = "ours (TCX + redirect_peer)";

pub(crate) const RATIO_TARGETS: [RatioTarget; 8] = [
    RatioTarget {
        what: "same-node TCP_RR vs bare veth",
        suite: "same-node",
        setup: OURS_SAME,
        versus: "bare veth pair (limit)",
        metric: "tcp_rr_tps",
        target: 1.0,
    },
    RatioTarget {
        what: "same-node TCP_RR vs Linux bridge",
        suite: "same-node",
        setup: OURS_SAME,
        versus: "Linux bridge (flannel)",
        metric: "tcp_rr_tps",
        target: 1.15,
    },
    RatioTarget {
        what: "same-node throughput vs bare veth",
        suite: "same-node",
        setup: OURS_SAME,
        versus: "bare veth pair (limit)",
        metric: "tcp_stream_gbps",
        target: 0.95,
    },
    RatioTarget {
        what: "native TCP_RR vs node to node",
        suite: "cross-node",
        setup: "ours native",
        versus: "node to node (limit)",
        metric: "tcp_rr_tps",
        target: 0.97,
    },
    RatioTarget {
        what: "native TCP_RR vs flannel host-gw",
        suite: "cross-node",
        setup: "ours native",
        versus: "flannel host-gw",
        metric: "tcp_rr_tps",
        target: 1.2,
    },
    RatioTarget {
        what: "native throughput vs node to node",
        suite: "cross-node",
        setup: "ours native",
        versus: "node to node (limit)",
        metric: "tcp_stream_gbps",
        target: 0.95,
    },
    RatioTarget {
        what: "overlay TCP_RR vs flannel vxlan",
        suite: "cross-node",
        setup: "ours vxlan",
        versus: "flannel vxlan",
        metric: "tcp_rr_tps",
        target: 1.2,
    },
    RatioTarget {
        what: "overlay throughput vs flannel vxlan",
        suite: "cross-node",
        setup: "ours vxlan",
        versus: "flannel vxlan",
        metric: "tcp_stream_gbps",
        target: 1.0,
    },
];

pub(crate) fn bench(mut args: BenchArgs) -> anyhow::Result<()> {
    if let Some(json) = &args.chart_only {
        let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let svg = chart_path(json, args.chart.as_deref())?;
        crate::chart::draw(&report, &svg)?;
        println!("chart: {}", svg.display());
        return Ok(());
    }
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (network namespaces, BPF)");
    if !args.smoke && cfg!(debug_assertions) {
        // Part of what is measured runs in this process (the control-plane
        // and Service-change figures): measure the agent's code as it ships,
        // optimised, by running this task again from a release build.
        use std::os::unix::process::CommandExt as _;
        eprintln!("bench: re-running from a release build of xtask");
        let error = crate::cargo()
            .current_dir(crate::workspace_root())
            .args(["run", "--release", "--quiet", "--package", "xtask", "--"])
            .args(std::env::args_os().skip(1))
            .exec();
        return Err(anyhow::Error::new(error).context("re-running the benchmark from a release build"));
    }
    if args.smoke {
        args.duration = 1;
        args.repeats = 1;
    } else {
        anyhow::ensure!(args.repeats >= 3, "--repeats must be at least 3 for min/median/max");
    }
    // A smoke run's meaningless figures never replace a real report.
    let output = args.output.clone().unwrap_or_else(|| {
        PathBuf::from(if args.smoke { "target/bench/smoke.json" } else { "target/bench/report.json" })
    });
    let bins = build_bins(!args.smoke)?;
    // SAFETY: single-threaded here; read by the lab helpers.
    unsafe { std::env::set_var("DATAPATH_BIN_DIR", &bins) };
    let prefix = format!("dpb{}", std::process::id());
    let wants = |suite: &str| args.suite == "all" || args.suite == suite;
    let mut reports = Vec::new();
    let mut medians: std::collections::BTreeMap<String, f64> = Default::default();
    for suite in ["same-node", "cross-node"] {
        if !wants(suite) {
            continue;
        }
        let (pairs, guards) =
            if suite == "same-node" { same_node_suite(&prefix) } else { cross_node_suite(&prefix) };
        let report = run_suite(suite, &pairs, &args)?;
        for setup in report["setups"].as_array().into_iter().flatten() {
            for metric in ["tcp_rr_tps", "tcp_crr_tps", "tcp_stream_gbps"] {
                medians.insert(
                    format!("{suite}/{}/{metric}", setup["setup"].as_str().unwrap_or_default()),
                    setup[metric]["median"].as_f64().unwrap_or(0.0),
                );
            }
        }
        reports.push(report);
        drop(pairs);
        // Pods before nodes before fabrics: the order they were pushed in.
        for guard in guards {
            drop(guard);
        }
    }
    let mut targets = Vec::new();
    if wants("programs") {
        // Rounds of fewer packets beat a few long runs on a noisy machine.
        let rounds = if args.smoke { 1 } else { args.repeats.max(3) * 5 };
        let count = if args.smoke { 10_000 } else { 200_000 };
        let paths = crate::bench_extra::program_paths(count, rounds, args.program_path.as_deref())?;
        println!(
            "\nper-packet cost, BPF_PROG_TEST_RUN, {rounds} rounds x {count} packets, one pinned CPU (ns/packet);\n\
             every packet checked against the datapath's counter for its path; net = minus an empty\n\
             program run the same way in the same round (the harness)"
        );
        println!(
            "{:<34} {:>7} {:>7} {:>7}   {:>7} {:>7} {:>7}   {:>7} {:>7}",
            "path", "min", "median", "max", "net min", "median", "max", "harness", "per run"
        );
        for p in &paths {
            println!(
                "{:<34} {:>7.1} {:>7.1} {:>7.1}   {:>7.1} {:>7.1} {:>7.1}   {:>7.1} {:>7}",
                p.name,
                p.raw.min,
                p.raw.median,
                p.raw.max,
                p.net.min,
                p.net.median,
                p.net.max,
                p.harness.median,
                p.per_run
            );
        }
        if let Some(p) = paths.iter().find(|p| p.name == "local delivery") {
            targets.push(crate::bench_extra::Target {
                what: "local delivery ns/packet".into(),
                value: p.raw.median,
                at_least: false,
                target: 40.0,
            });
        }
        reports.push(serde_json::json!({
            "suite": "programs",
            "packets_per_repeat": count,
            "repeats": rounds,
            "ns_per_packet": paths.iter().map(|p| serde_json::json!({
                "path": p.name,
                "stats": p.raw,
                "net_of_harness": p.net,
                "harness": p.harness,
                "packets_per_test_run": p.per_run,
            })).collect::<Vec<_>>(),
        }));
    }
    if wants("control") {
        let (pods, endpoints, cidrs) = if args.smoke { (5, 1_000, 1_000) } else { (100, 65_536, 100_000) };
        let c = crate::bench_extra::control_plane(pods, endpoints, cidrs)?;
        println!("\ncontrol plane");
        println!(
            "CNI ADD -> pod answers ping, {} pods: p50 {:?}, p99 {:?}",
            c.pods, c.add_to_ping_p50, c.add_to_ping_p99
        );
        println!("agent RSS idle: {} KiB", c.agent_rss_idle_kib);
        println!(
            "{} endpoints + {} remote pod CIDRs programmed in {:?}, RSS +{} KiB",
            c.endpoints, c.remote_cidrs, c.program_time, c.rss_at_scale_kib
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        targets.push(crate::bench_extra::Target {
            what: format!("CNI ADD to ready p99 ms ({} pods)", c.pods),
            value: ms(c.add_to_ping_p99),
            at_least: false,
            target: 100.0,
        });
        targets.push(crate::bench_extra::Target {
            what: format!("{} endpoints + {} CIDRs programmed, s", c.endpoints, c.remote_cidrs),
            value: c.program_time.as_secs_f64(),
            at_least: false,
            target: 2.0,
        });
        targets.push(crate::bench_extra::Target {
            what: "agent RSS at that scale, MB (idle agent + maps' cost)".into(),
            value: (c.agent_rss_idle_kib + c.rss_at_scale_kib) as f64 / 1024.0,
            at_least: false,
            target: 40.0,
        });
        reports.push(serde_json::json!({
            "suite": "control",
            "pods": c.pods,
            "add_to_ping_ms": { "p50": ms(c.add_to_ping_p50), "p99": ms(c.add_to_ping_p99) },
            "agent_rss_idle_kib": c.agent_rss_idle_kib,
            "endpoints": c.endpoints,
            "remote_cidrs": c.remote_cidrs,
            "program_seconds": c.program_time.as_secs_f64(),
            "rss_growth_at_scale_kib": c.rss_at_scale_kib,
        }));
    }
    if wants("policy") {
        let rounds = if args.smoke { 1 } else { args.repeats.max(3) * 5 };
        let count = if args.smoke { 10_000 } else { 200_000 };
        let paths = crate::bench_extra::policy_paths(count, rounds)?;
        println!("\npolicy: ns/packet (BPF_PROG_TEST_RUN, CPU pinned, {rounds} rounds of {count} packets)");
        println!(
            "{:<44} {:>7} {:>7} {:>7}   {:>7} {:>7} {:>7}",
            "path", "min", "median", "max", "net min", "median", "max"
        );
        for p in &paths {
            println!(
                "{:<44} {:>7.1} {:>7.1} {:>7.1}   {:>7.1} {:>7.1} {:>7.1}",
                p.name, p.raw.min, p.raw.median, p.raw.max, p.net.min, p.net.median, p.net.max
            );
        }
        let median =
            |name: &str| paths.iter().find(|p| p.name == name).map(|p| p.net.median).unwrap_or(f64::NAN);
        targets.push(crate::bench_extra::Target {
            what: "policy: tracked connection, ns/packet over no policy".into(),
            value: median("local delivery, policy, tracked") - median("local delivery, no policy"),
            at_least: false,
            target: 15.0,
        });
        for rules in ["1k", "10k"] {
            targets.push(crate::bench_extra::Target {
                what: format!("policy: judging a new connection, {rules} rules / 10 rules"),
                value: median(&format!("new connection judged, {rules} rules"))
                    / median("new connection judged, 10 rules"),
                at_least: false,
                target: 1.2,
            });
        }
        let (pods, policies, local, changes) =
            if args.smoke { (100, 50, 10, 5) } else { (1_000, 500, 100, 50) };
        let change = crate::bench_policy::change_latency(pods, policies, local, changes)?;
        // The static source looks at its directory every 50 ms: a change
        // waits for that at most, then for the compile and the write.
        let poll_ms = 50.0;
        println!(
            "policy change at {} pods / {} policies ({} local pods; maps {} endpoints, {} peers, {} rules): first sync {:.1} ms; a change compiled and written in min {:.1} / median {:.1} / max {:.1} ms, + at most {poll_ms} ms until the watch sees the file",
            change.pods,
            change.policies,
            change.local,
            change.entries.0,
            change.entries.1,
            change.entries.2,
            change.first_sync.as_secs_f64() * 1000.0,
            change.change.min,
            change.change.median,
            change.change.max
        );
        targets.push(crate::bench_extra::Target {
            what: format!("policy change to enforcement, worst of {changes} (poll + compile + write), ms"),
            value: change.change.max + poll_ms,
            at_least: false,
            target: 100.0,
        });
        let (pods, policies, local) = if args.smoke { (500, 100, 20) } else { (10_000, 1_000, 110) };
        let scale = crate::bench_policy::at_scale(pods, policies, local)?;
        println!(
            "policy at {} pods / {} policies ({} local pods): compiled and written in {:.0} ms; maps {} endpoints, {} peers, {} rules; agent memory +{} KiB",
            scale.pods,
            scale.policies,
            scale.local,
            scale.sync.as_secs_f64() * 1000.0,
            scale.entries.0,
            scale.entries.1,
            scale.entries.2,
            scale.rss_growth_kib
        );
        let (connections, connection_targets) = crate::bench_policy_e2e::connections(&prefix, &args)?;
        targets.extend(connection_targets);
        reports.push(serde_json::json!({
            "suite": "policy",
            "connections": connections,
            "ns_per_packet": paths.iter().map(|p| serde_json::json!({
                "path": p.name, "stats": p.raw, "net_of_harness": p.net, "harness": p.harness,
            })).collect::<Vec<_>>(),
            "change": {
                "pods": change.pods, "policies": change.policies, "local_pods": change.local,
                "first_sync_ms": change.first_sync.as_secs_f64() * 1000.0,
                "change_ms": change.change, "poll_ms": poll_ms,
                "entries": { "endpoints": change.entries.0, "peers": change.entries.1, "rules": change.entries.2 },
            },
            "at_scale": {
                "pods": scale.pods, "policies": scale.policies, "local_pods": scale.local,
                "sync_ms": scale.sync.as_secs_f64() * 1000.0,
                "entries": { "endpoints": scale.entries.0, "peers": scale.entries.1, "rules": scale.entries.2 },
                "agent_memory_growth_kib": scale.rss_growth_kib,
            },
        }));
    }
    if wants("services") {
        let (report, service_targets) = crate::bench_services::services(&prefix, &args)?;
        reports.push(report);
        targets.extend(service_targets);
    }
    // (Also alone: `--suite node-ports`.)
    if wants("services") || args.suite == "node-ports" {
        let (report, node_port_targets) = crate::bench_node_ports::node_ports(&prefix, &args)?;
        reports.push(report);
        targets.extend(node_port_targets);
    }
    let ratio = |a: &str, b: &str| -> Option<f64> {
        let (x, y) = (medians.get(a)?, medians.get(b)?);
        (*y > 0.0).then(|| x / y)
    };
    for r in &RATIO_TARGETS {
        let key = |setup: &str| format!("{}/{setup}/{}", r.suite, r.metric);
        if let Some(value) = ratio(&key(r.setup), &key(r.versus)) {
            targets.push(crate::bench_extra::Target {
                what: r.what.into(),
                value,
                at_least: true,
                target: r.target,
            });
        }
    }
    println!("\ntargets (ratios of medians; smoke runs mean nothing)");
    for t in &targets {
        println!("{}", t.line());
    }
    let target_json = |t: &crate::bench_extra::Target| {
        let mut j = serde_json::json!({ "what": t.what, "value": t.value, "target": t.target, "at_least": t.at_least, "met": t.met() });
        // What a ratio target divides, so the chart can place it.
        if let Some(r) = RATIO_TARGETS.iter().find(|r| r.what == t.what) {
            j["ratio_of"] = serde_json::json!({ "suite": r.suite, "setup": r.setup, "versus": r.versus, "metric": r.metric });
        }
        j
    };
    reports.push(serde_json::json!({
        "suite": "targets",
        "targets": targets.iter().map(target_json).collect::<Vec<_>>(),
    }));
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let machine = serde_json::json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))),
        "smoke": args.smoke,
    });
    let report = serde_json::json!({ "machine": machine, "suites": reports });
    std::fs::write(&output, serde_json::to_string_pretty(&report)?)?;
    let svg = chart_path(&output, args.chart.as_deref())?;
    crate::chart::draw(&report, &svg)?;
    println!("\nmachine: {machine}");
    println!("JSON report: {}", output.display());
    println!("chart: {}", svg.display());
    Ok(())
}

/// The chart's path: `chart` if given, else the report's with `.svg`.
fn chart_path(report: &Path, chart: Option<&Path>) -> anyhow::Result<PathBuf> {
    let svg = chart.map_or_else(|| report.with_extension("svg"), Path::to_owned);
    anyhow::ensure!(svg != report, "the chart would overwrite the report {}", report.display());
    if let Some(dir) = svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(svg)
}

fn run_suite(suite: &str, pairs: &[Pair], args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let duration = Duration::from_secs(args.duration);
    let metrics = ["TCP_RR (trans/s)", "TCP_CRR (trans/s)", "TCP stream (Gbit/s)"];
    let mut samples = vec![vec![Vec::new(); metrics.len()]; pairs.len()];
    for rep in 0..args.repeats {
        for (i, pair) in pairs.iter().enumerate() {
            eprintln!("{suite} repeat {}/{}: {}", rep + 1, args.repeats, pair.name);
            samples[i][0].push(request_response(pair, duration, false)?);
            samples[i][1].push(request_response(pair, duration, true)?);
            samples[i][2].push(throughput(pair, duration)?);
        }
    }
    let results: Vec<Vec<Stats>> =
        samples.into_iter().map(|per| per.into_iter().map(stats).collect()).collect();
    println!(
        "\n{suite} pod to pod, {} s x {} repeats, client CPU 0, server CPU 1 ({} CPUs)",
        args.duration,
        args.repeats,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "{:<28} {:<20} {:>12} {:>12} {:>12} {:>10}",
        "setup", "metric", "min", "median", "max", "vs limit"
    );
    for (i, pair) in pairs.iter().enumerate() {
        for (m, metric) in metrics.iter().enumerate() {
            let s = results[i][m];
            let ratio = s.median / results[0][m].median;
            let mark = if m == 1 { ceiling_mark(&s, pair.client_ports) } else { "" };
            println!(
                "{:<28} {:<20} {:>12.1} {:>12.1} {:>12.1} {:>10.2}{mark}",
                pair.name, metric, s.min, s.median, s.max, ratio
            );
        }
    }
    Ok(serde_json::json!({
        "suite": suite,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "setups": pairs.iter().enumerate().map(|(i, p)| serde_json::json!({
            "setup": p.name,
            "tcp_rr_tps": results[i][0],
            "tcp_crr_tps": results[i][1],
            "tcp_crr_harness_ceiling_tps": crr_harness_ceiling(p.client_ports),
            "tcp_crr_at_harness_ceiling": at_harness_ceiling(&results[i][1], p.client_ports),
            "tcp_stream_gbps": results[i][2],
            "ratio_to_limit": {
                "tcp_rr": results[i][0].median / results[0][0].median,
                "tcp_crr": results[i][1].median / results[0][1].median,
                "tcp_stream": results[i][2].median / results[0][2].median,
            },
        })).collect::<Vec<_>>(),
    }))
}
