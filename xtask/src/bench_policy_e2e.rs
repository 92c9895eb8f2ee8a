//! New connections into a pod that N NetworkPolicy rules isolate: ours
//! against the kernel's iptables with Calico's layout, built in the same run
//! (part of `cargo xtask bench --suite policy`).
//!
//! At N = 1,000 and 10,000 rules (smoke: 10 and 100), one setup each:
//!
//! - **ours**: a lab node (real agent, native mode, `policy_dir`) with a
//!   client and a backend pod made by the CNI plugin; N policies select the
//!   backend, each allowing one other /32 on its own port, and the last one
//!   allows the client on the measured port.
//! - **iptables, Calico's layout**: the same pods routed like Calico
//!   (`RoutedPods`), the filter table as Calico's iptables dataplane lays
//!   it out: established connections accepted first, then a chain per
//!   endpoint jumping to a chain per policy, the allowing policy last (the
//!   worst case of the walk every new connection makes). Peers are matched
//!   by address, as an ipset of one member would match them; Calico's
//!   mark-and-return per policy is left out, which only makes the baseline
//!   faster.
//!
//! Measured, repeats interleaved, client on CPU 0 and server on CPU 1:
//! TCP_CRR to the backend, and the time `connect()` takes (SYN judged, the
//! SYN-ACK a reply).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Node, Pod},
    sh,
};

use crate::{
    bench::{
        BenchArgs, CRR_CLIENT_PORTS, Pair, Stats, at_harness_ceiling, ceiling_mark, feed_in_netns,
        request_response, stats,
    },
    bench_extra::Target,
    bench_services::{KP_BACKEND_IP, KP_CLIENT_IP, RoutedPods, connect_latency},
};

/// The backend listens here; the last policy allows the client on it.
const SERVER_PORT: u16 = 7070;
const OURS: &str = "ours";
const IPTABLES: &str = "iptables (Calico layout)";

/// The peer the `i`-th filler rule allows: 10.128.0.0/16 upwards, no pod's.
fn filler_peer(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 128 + (i / 65_536) as u8, (i / 256 % 256) as u8, (i % 256) as u8)
}

/// The `i`-th filler rule's port (never the measured one).
fn filler_port(i: usize) -> u16 {
    8_000 + (i % 1_000) as u16
}

/// Our node: agent with `policy_dir`, client and backend pods, N policies
/// selecting the backend (N - 1 fillers, then the one allowing the client).
struct OursSetup {
    // Drop order: pods, then the node.
    client: Pod,
    backend: Pod,
    node: Node,
}

impl OursSetup {
    fn new(n: usize) -> anyhow::Result<Self> {
        let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
        let dir = node.work_dir.join("policy");
        std::fs::create_dir_all(&dir)?;
        // Closed connections forgotten after 1 s, so that TCP_CRR's do not
        // fill the connection-tracking map.
        node.set_extra_config(&format!(
            "policy_dir = \"{}\"\nconntrack_closing_seconds = 1\n",
            dir.display()
        ));
        node.start_agent();
        let client = node.add_pod_as("pol-client", "bench", "client");
        let backend = node.add_pod_as("pol-backend", "bench", "backend");
        let mut yaml = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
        for (pod, app) in [(&client, "client"), (&backend, "backend")] {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: bench, name: {app}, labels: {{app: {app}}}}}\nstatus: {{podIP: {}}}\n",
                pod.ip
            ));
        }
        for i in 0..n.saturating_sub(1) {
            yaml.push_str(&format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: bench, name: filler{i}}}\nspec:\n  podSelector: {{matchLabels: {{app: backend}}}}\n  policyTypes: [Ingress]\n  ingress: [{{from: [{{ipBlock: {{cidr: {}/32}}}}], ports: [{{port: {}}}]}}]\n",
                filler_peer(i),
                filler_port(i)
            ));
        }
        yaml.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: bench, name: allow-client}}\nspec:\n  podSelector: {{matchLabels: {{app: backend}}}}\n  policyTypes: [Ingress]\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: {SERVER_PORT}}}]}}]\n"
        ));
        let tmp = dir.join(".objects.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join("objects.yaml"))?;
        let setup = Self { client, backend, node };
        // Wait until the backend's N rules are in the maps.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let policy = setup.node.inspect("policy");
            let rules = policy["endpoints"].as_array().map_or(0, |endpoints| {
                endpoints
                    .iter()
                    .filter(|e| e["pod_ip"] == setup.backend.ip.to_string())
                    .map(|e| e["rules"].as_array().map_or(0, Vec::len))
                    .sum()
            });
            if rules >= n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent wrote {rules} of {n} rules for the backend:\n{}",
                setup.node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(setup)
    }

    fn pair(&self) -> Pair {
        let mut pair = Pair::between(OURS, &self.client.netns, &self.backend.netns, self.backend.ip);
        pair.server_port = SERVER_PORT;
        pair
    }
}

/// The same pods without our datapath, N rules in Calico's filter layout.
struct IptablesSetup {
    pods: RoutedPods,
}

impl IptablesSetup {
    fn new(prefix: &str, n: usize) -> anyhow::Result<Self> {
        let pods = RoutedPods::new(prefix, &format!("np{n}"));
        let mut text = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:cali-tw-backend - [0:0]\n");
        let policies: Vec<String> = (0..n).map(|i| format!("cali-pi-pol{i}")).collect();
        for chain in &policies {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        text.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
        text.push_str(&format!("-A FORWARD -o {} -j cali-tw-backend\n", RoutedPods::backend_veth()));
        for chain in &policies {
            text.push_str(&format!("-A cali-tw-backend -j {chain}\n"));
        }
        text.push_str("-A cali-tw-backend -j DROP\n");
        for (i, chain) in policies.iter().enumerate() {
            let (peer, port) =
                if i + 1 == n { (KP_CLIENT_IP, SERVER_PORT) } else { (filler_peer(i), filler_port(i)) };
            text.push_str(&format!("-A {chain} -s {peer}/32 -p tcp -m tcp --dport {port} -j ACCEPT\n"));
        }
        text.push_str("COMMIT\n");
        feed_in_netns(&pods.node.name, &["iptables-restore", "-w"], &text)?;
        let rules = sh(&["ip", "netns", "exec", &pods.node.name, "iptables", "-w", "-S"])
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        anyhow::ensure!(rules >= 2 * n, "the filter table has {rules} rules for {n} policies");
        Ok(Self { pods })
    }

    fn pair(&self) -> Pair {
        let mut pair = Pair::between(IPTABLES, &self.pods.client, &self.pods.backend, KP_BACKEND_IP);
        pair.server_port = SERVER_PORT;
        pair
    }
}

struct Row {
    setup: &'static str,
    n: usize,
    crr: Vec<f64>,
    connect_us: Vec<f64>,
}

/// Run the comparison; its report and targets.
pub(crate) fn connections(
    prefix: &str,
    args: &BenchArgs,
) -> anyhow::Result<(serde_json::Value, Vec<Target>)> {
    let sizes: [usize; 2] = if args.smoke { [10, 100] } else { [1_000, 10_000] };
    let connects = if args.smoke { 200 } else { 2_000 };
    let duration = Duration::from_secs(args.duration);
    let mut ours = Vec::new();
    let mut iptables = Vec::new();
    for &n in &sizes {
        eprintln!("policy: setting up ours and iptables with {n} rules for the backend");
        ours.push(OursSetup::new(n)?);
        iptables.push(IptablesSetup::new(prefix, n)?);
    }
    let pairs: Vec<(Pair, usize)> =
        sizes.iter().enumerate().flat_map(|(i, &n)| [(ours[i].pair(), n), (iptables[i].pair(), n)]).collect();
    let mut rows: Vec<Row> = pairs
        .iter()
        .map(|(p, n)| Row { setup: p.name, n: *n, crr: Vec::new(), connect_us: Vec::new() })
        .collect();
    // connect() first: TCP_CRR leaves TIME_WAIT sockets that slow later runs.
    for rep in 0..args.repeats {
        for ((pair, n), row) in pairs.iter().zip(&mut rows) {
            eprintln!("policy connect() {}/{}: {} with {n} rules", rep + 1, args.repeats, pair.name);
            row.connect_us.push(connect_latency(pair, connects)?);
        }
    }
    for rep in 0..args.repeats {
        for ((pair, n), row) in pairs.iter().zip(&mut rows) {
            eprintln!("policy TCP_CRR {}/{}: {} with {n} rules", rep + 1, args.repeats, pair.name);
            row.crr.push(request_response(pair, duration, true)?);
        }
    }
    drop(pairs);
    drop(ours);
    drop(iptables);
    let iptables_version = sh(&["iptables-restore", "--version"]).trim().to_owned();
    println!(
        "\npolicy: new connections into a pod N rules isolate (same node), {} s x {} repeats, {connects} connects\n\
         per repeat (median of each), client CPU 0, server CPU 1; iptables = {iptables_version} in a node\n\
         namespace, Calico's filter layout (a chain per policy, the allowing one last)",
        args.duration, args.repeats
    );
    println!("{:<26} {:>7} {:<26} {:>10} {:>10} {:>10}", "setup", "N", "metric", "min", "median", "max");
    let summary: Vec<(&Row, Stats, Stats)> =
        rows.iter().map(|r| (r, stats(r.crr.clone()), stats(r.connect_us.clone()))).collect();
    for (r, crr, connect) in &summary {
        for (metric, s, mark) in [
            ("TCP_CRR (trans/s)", crr, ceiling_mark(crr, CRR_CLIENT_PORTS)),
            ("connect() (us, median)", connect, ""),
        ] {
            println!(
                "{:<26} {:>7} {:<26} {:>10.1} {:>10.1} {:>10.1}{mark}",
                r.setup, r.n, metric, s.min, s.median, s.max
            );
        }
    }
    let find = |setup: &str, n: usize| summary.iter().find(|(r, ..)| r.setup == setup && r.n == n);
    let (small, big) = (sizes[0], sizes[1]);
    let mut targets = Vec::new();
    if let (Some(o), Some(k)) = (find(OURS, big), find(IPTABLES, big)) {
        let bound = [o, k].iter().any(|row| at_harness_ceiling(&row.1, CRR_CLIENT_PORTS));
        targets.push(Target {
            what: format!(
                "policy TCP_CRR ours / iptables (Calico layout), {big} rules{}",
                if bound { " (HARNESS CEILING)" } else { "" }
            ),
            value: o.1.median / k.1.median,
            at_least: true,
            target: 1.5,
        });
    }
    if let (Some(b), Some(s)) = (find(OURS, big), find(OURS, small)) {
        targets.push(Target {
            what: format!("policy connect() ours {big} / {small} rules"),
            value: b.2.median / s.2.median,
            at_least: false,
            target: 1.1,
        });
    }
    let report = serde_json::json!({
        "what": "new connections into a pod N rules isolate",
        "iptables": iptables_version,
        "connects_per_repeat": connects,
        "results": summary.iter().map(|(r, crr, connect)| serde_json::json!({
            "setup": r.setup,
            "rules": r.n,
            "tcp_crr_tps": crr,
            "tcp_crr_at_harness_ceiling": at_harness_ceiling(crr, CRR_CLIENT_PORTS),
            "connect_us": connect,
        })).collect::<Vec<_>>(),
    });
    Ok((report, targets))
}
