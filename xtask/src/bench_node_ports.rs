//! NodePort from outside the cluster (part of `cargo xtask bench --suite
//! services`): a host on the nodes' network opens connections to a node
//! port of node A whose backend is on node A ("local") or on node B
//! ("remote": source NAT to node A's address, so that the replies come
//! back through it), ours against kube-proxy in iptables and in nftables
//! mode, each with externalTrafficPolicy Cluster. The reference is a
//! direct pod-to-pod connection across the same two nodes.
//!
//! - **ours**: two lab nodes (real agents, native mode) with
//!   `serve_outside_clients = true`;
//! - **kube-proxy**: two flannel host-gw nodes (pods on a bridge, routes to
//!   the peer's pod CIDR), kube-proxy's rules for the two Services on node
//!   A (the node the client reaches), as its iptables or nftables mode
//!   writes them.
//!
//! A failed run names ours' nonzero counters; with
//! `DPT_BENCH_PAUSE_ON_FAILURE=<seconds>` it also waits that long before
//! tearing the setups down, so that their maps can be read (`bpftool map
//! dump pinned /sys/fs/bpf/dpt<pid>x<n>/maps/conntrack-v2`: how the
//! reopened-tuple bug was found).
//!
//! TCP_CRR twice: closed as usual (FIN, the client keeps TIME_WAIT) and
//! closed with a reset by the client, which keeps no TIME_WAIT and so
//! escapes the harness's own ceiling (its ephemeral ports; every setup
//! meets it at about the same rate with FIN).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datapath_tests::lab::{Fabric, Netns, Node, Pod, peered_nodes};

use crate::{
    bench::{
        BenchArgs, FlannelNode, Pair, Stats, at_harness_ceiling, ceiling_mark, crr_harness_ceiling,
        feed_in_netns, flannel_pair, request_response, request_response_reset, stats,
    },
    bench_extra::Target,
    bench_kube_proxy_nft::{ruleset, service_chain},
    bench_services::{SERVER_PORT, SERVICE_PORT, Svc, chain_hash},
};

const LOCAL_NODE_PORT: u16 = 30080;
const REMOTE_NODE_PORT: u16 = 30081;
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// The host outside, on each setup's network (a /24 with the nodes).
const OUTSIDE_HOST: u8 = 50;
/// The client's ephemeral ports: a range of its own, the same in every
/// setup. With ours, each client port open or closing holds one
/// source-NAT port per backend (33,512): 15,000 keep them under half used.
/// Its FIN-closed TCP_CRR is at the harness's ceiling (7,500/s, marked as
/// such): the reset runs are this suite's figures.
const CLIENT_PORTS: (u32, u32) = (40_000, 54_999);

/// Ours: two lab nodes, a backend pod on each, a client pod on node A (for
/// the pod-to-pod reference), a host outside.
struct Ours {
    // Drop order: pods and the host, then the nodes, then their network.
    local: Pod,
    remote: Pod,
    client: Pod,
    outside: Netns,
    a: Node,
    b: Node,
    _fabric: Fabric,
}

impl Ours {
    fn new() -> anyhow::Result<Self> {
        let fabric = Fabric::new();
        let (mut a, mut b) = peered_nodes(&fabric, "native");
        let local = a.add_pod("np-local");
        let client = a.add_pod("np-client");
        let remote = b.add_pod("np-remote");
        let service = |name: &str, vip: Ipv4Addr, backend: Ipv4Addr, node_port: u16| {
            format!(
                "\n[[services]]\nname = \"{name}\"\nnamespace = \"bench\"\ncluster_ip = \"{vip}\"\n\
                 backends = [\"{backend}\"]\n[[services.ports]]\nport = {SERVICE_PORT}\n\
                 target_port = {SERVER_PORT}\nnode_port = {node_port}\n"
            )
        };
        let config = format!(
            "serve_outside_clients = true\n{}{}",
            service("np-local", LOCAL_VIP, local.ip, LOCAL_NODE_PORT),
            service("np-remote", REMOTE_VIP, remote.ip, REMOTE_NODE_PORT)
        );
        // The setting is read at start.
        for node in [&mut a, &mut b] {
            node.set_extra_config(&config);
            node.stop_agent();
            node.start_agent();
        }
        let outside = fabric.add_host("np-outside", Ipv4Addr::new(10, 250, 0, OUTSIDE_HOST));
        let setup = Self { local, remote, client, outside, a, b, _fabric: fabric };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !setup.serves_node_ports() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "node A does not serve its node ports:\n{}\n{}",
                setup.a.agent_log(),
                setup.b.agent_log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(setup)
    }

    /// Both node ports have their entries for clients outside on node A.
    fn serves_node_ports(&self) -> bool {
        let services = self.a.inspect("services");
        let outside = |port: u16| {
            services.as_array().into_iter().flatten().any(|s| {
                s["clients"] == "outside"
                    && s["port"] == port
                    && s["backends"].as_array().is_some_and(|b| !b.is_empty())
            })
        };
        outside(LOCAL_NODE_PORT) && outside(REMOTE_NODE_PORT)
    }

    fn pairs(&self) -> [Pair; 3] {
        let node_a = self.a.node_ip;
        [
            Pair::between("ours, NodePort local", &self.outside, &self.local.netns, self.local.ip)
                .via(SocketAddrV4::new(node_a, LOCAL_NODE_PORT), SERVER_PORT),
            Pair::between("ours, NodePort remote", &self.outside, &self.remote.netns, self.remote.ip)
                .via(SocketAddrV4::new(node_a, REMOTE_NODE_PORT), SERVER_PORT),
            Pair::between(
                "ours, pod to pod across nodes",
                &self.client.netns,
                &self.remote.netns,
                self.remote.ip,
            ),
        ]
    }
}

/// kube-proxy's mode.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Iptables,
    Nftables,
}

/// kube-proxy on two flannel host-gw nodes: pod 10.246.1.2 on node A
/// (10.251.0.1), pod 10.246.2.2 on node B (10.251.0.2), a host outside.
struct KubeProxy {
    mode: Mode,
    outside: Netns,
    nodes: [FlannelNode; 2],
    reference: Pair,
    _fabric: Fabric,
}

const FLANNEL_NODE_A: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
const FLANNEL_POD_CIDR: &str = "10.246.0.0/16";
const FLANNEL_LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 246, 1, 2);
const FLANNEL_REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 246, 2, 2);

impl KubeProxy {
    fn new(prefix: &str, mode: Mode) -> anyhow::Result<Self> {
        let fabric = Fabric::new();
        let tag = if mode == Mode::Iptables { "npi" } else { "npn" };
        let (nodes, mut reference) = flannel_pair(&format!("{prefix}-{tag}"), &fabric, false);
        reference.name = if mode == Mode::Iptables {
            "kube-proxy iptables, pod to pod across nodes"
        } else {
            "kube-proxy nftables, pod to pod across nodes"
        };
        let outside = fabric.add_host("np-outside", Ipv4Addr::new(10, 251, 0, OUTSIDE_HOST));
        let setup = Self { mode, outside, nodes, reference, _fabric: fabric };
        let services = [
            (svc("np-local", LOCAL_VIP, FLANNEL_LOCAL_POD), LOCAL_NODE_PORT),
            (svc("np-remote", REMOTE_VIP, FLANNEL_REMOTE_POD), REMOTE_NODE_PORT),
        ];
        let (command, text): (&[&str], String) = match mode {
            Mode::Iptables => (&["iptables-restore", "-w"], iptables_rules(&services)),
            Mode::Nftables => (&["nft", "-f", "-"], nftables_rules(&services)),
        };
        feed_in_netns(&setup.nodes[0].node.name, command, &text)?;
        Ok(setup)
    }

    fn pairs(&self) -> [Pair; 3] {
        let (local, remote) = if self.mode == Mode::Iptables {
            ("kube-proxy iptables, NodePort local", "kube-proxy iptables, NodePort remote")
        } else {
            ("kube-proxy nftables, NodePort local", "kube-proxy nftables, NodePort remote")
        };
        [
            Pair::between(local, &self.outside, &self.nodes[0].pod, FLANNEL_LOCAL_POD)
                .via(SocketAddrV4::new(FLANNEL_NODE_A, LOCAL_NODE_PORT), SERVER_PORT),
            Pair::between(remote, &self.outside, &self.nodes[1].pod, FLANNEL_REMOTE_POD)
                .via(SocketAddrV4::new(FLANNEL_NODE_A, REMOTE_NODE_PORT), SERVER_PORT),
            self.reference.clone(),
        ]
    }
}

fn svc(name: &str, vip: Ipv4Addr, backend: Ipv4Addr) -> Svc {
    Svc { name: name.into(), vip, backend: SocketAddrV4::new(backend, SERVER_PORT) }
}

/// kube-proxy's nat table (iptables mode) for `services` with their node
/// ports, externalTrafficPolicy Cluster: KUBE-NODEPORTS jumps to each
/// port's KUBE-EXT chain, which marks the connection for masquerading and
/// goes on to the Service's chain.
fn iptables_rules(services: &[(Svc, u16)]) -> String {
    let mut chains: Vec<String> =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].map(String::from).into();
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for (s, node_port) in services {
        let port_name = format!("bench/{}:http", s.name);
        let hash = |what: &str| chain_hash(&format!("{port_name}{what}"));
        let (svc, ext, sep) = (
            format!("KUBE-SVC-{}", hash("tcp")),
            format!("KUBE-EXT-{}", hash("tcp")),
            format!("KUBE-SEP-{}", hash(&s.backend.to_string())),
        );
        let (vip, ep) = (s.vip, s.backend);
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}\n\
             -A KUBE-NODEPORTS -p tcp -m comment --comment \"{port_name}\" -m tcp --dport {node_port} -j {ext}\n\
             -A {ext} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc}\n\
             -A {svc} ! -s {FLANNEL_POD_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ\n\
             -A {svc} -m comment --comment \"{port_name} -> {ep}\" -j {sep}\n\
             -A {sep} -s {}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ep}\n",
            ep.ip()
        ));
        chains.extend([svc, ext, sep]);
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let mut text = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for chain in chains {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    text.push_str(&rules);
    text.push_str("COMMIT\n");
    text
}

/// kube-proxy's table (nftables mode) for `services` with their node
/// ports: the ClusterIP table, node A's address in `nodeport-ips`, and
/// each node port in `service-nodeports` going to an `external-` chain
/// that marks for masquerading and goes on to the Service's chain.
fn nftables_rules(services: &[(Svc, u16)]) -> String {
    let plain: Vec<Svc> = services.iter().map(|(s, _)| s.clone()).collect();
    let t = "ip kube-proxy";
    let mut text = ruleset(&plain);
    text.push_str(&format!("add element {t} nodeport-ips {{ {FLANNEL_NODE_A} }}\n"));
    for (s, node_port) in services {
        let name = format!("bench/{}/tcp/http", s.name);
        let external = format!("external-{}-{name}", &chain_hash(&format!("external{name}"))[..8]);
        text.push_str(&format!(
            "add chain {t} {external}\n\
             add rule {t} {external} jump mark-for-masquerade\n\
             add rule {t} {external} goto {}\n\
             add element {t} service-nodeports {{ tcp . {node_port} : goto {external} }}\n",
            service_chain(s)
        ));
    }
    text
}

/// One pair's figures.
struct Row {
    setup: &'static str,
    crr: Vec<f64>,
    crr_reset: Vec<f64>,
}

pub(crate) fn node_ports(prefix: &str, args: &BenchArgs) -> anyhow::Result<(serde_json::Value, Vec<Target>)> {
    let duration = Duration::from_secs(args.duration);
    eprintln!("services: setting up NodePort (ours, kube-proxy iptables, kube-proxy nftables)");
    let ours = Ours::new()?;
    let iptables = KubeProxy::new(prefix, Mode::Iptables)?;
    let nftables = KubeProxy::new(prefix, Mode::Nftables)?;
    let pairs: Vec<Pair> = [ours.pairs(), iptables.pairs(), nftables.pairs()]
        .into_iter()
        .flatten()
        .map(|p| p.with_client_ports(CLIENT_PORTS))
        .collect();
    let mut rows: Vec<Row> =
        pairs.iter().map(|p| Row { setup: p.name, crr: Vec::new(), crr_reset: Vec::new() }).collect();
    for rep in 0..args.repeats {
        for (pair, row) in pairs.iter().zip(&mut rows) {
            eprintln!("services NodePort TCP_CRR {}/{}: {}", rep + 1, args.repeats, pair.name);
            // (Ours' drops say why, if a run fails.)
            let why = || {
                let nonzero = |node: &Node| -> Vec<String> {
                    let counters = node.inspect("counters");
                    ["drops", "forwards"]
                        .iter()
                        .flat_map(|kind| counters[kind].as_object().cloned().unwrap_or_default())
                        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect()
                };
                let tracked = ours.a.inspect("conntrack").as_array().map_or(0, Vec::len);
                if let Some(seconds) = std::env::var_os("DPT_BENCH_PAUSE_ON_FAILURE") {
                    let seconds: u64 = seconds.to_string_lossy().parse().unwrap_or(600);
                    eprintln!("failed; paused {seconds} s for a look (DPT_BENCH_PAUSE_ON_FAILURE)");
                    std::thread::sleep(Duration::from_secs(seconds));
                }
                format!(
                    "{}: node A {:?}, {tracked} connections tracked; node B {:?}",
                    pair.name,
                    nonzero(&ours.a),
                    nonzero(&ours.b)
                )
            };
            row.crr.push(request_response(pair, duration, true).with_context(why)?);
            row.crr_reset.push(request_response_reset(pair, duration).with_context(why)?);
        }
    }
    let snat_refused = ours.a.drop_count("snat_ports_exhausted");
    drop(pairs);
    drop((ours, iptables, nftables));

    println!(
        "\nNodePort from a host outside the cluster to node A, backend on node A (local) or node B (remote,\n\
         source NAT to node A's address), externalTrafficPolicy Cluster; the reference is a pod on node A\n\
         to the pod on node B. TCP_CRR, {} s x {} repeats, client CPU 0, server CPU 1, the client's\n\
         ephemeral ports {}-{}: closed with FIN (client keeps TIME_WAIT) and closed with a reset by the client\n\
         (no TIME_WAIT: free of the harness's port ceiling). Ours: native mode; kube-proxy: flannel host-gw\n\
         nodes, its rules on node A",
        args.duration, args.repeats, CLIENT_PORTS.0, CLIENT_PORTS.1
    );
    if snat_refused > 0 {
        println!("NOTE: ours refused {snat_refused} NodePort connections for want of a source port");
    }
    println!("{:<44} {:<24} {:>10} {:>10} {:>10}", "setup", "metric", "min", "median", "max");
    let summary: Vec<(&Row, Stats, Stats)> =
        rows.iter().map(|r| (r, stats(r.crr.clone()), stats(r.crr_reset.clone()))).collect();
    for (r, crr, reset) in &summary {
        for (metric, s, mark) in [
            ("TCP_CRR (trans/s)", crr, ceiling_mark(crr, CLIENT_PORTS)),
            ("TCP_CRR reset (trans/s)", reset, ""),
        ] {
            println!(
                "{:<44} {:<24} {:>10.0} {:>10.0} {:>10.0}{mark}",
                r.setup, metric, s.min, s.median, s.max
            );
        }
    }
    let reset = |setup: &str| summary.iter().find(|(r, ..)| r.setup == setup).map(|(_, _, s)| s.median);
    let mut targets = Vec::new();
    if let (Some(np), Some(direct)) = (reset("ours, NodePort remote"), reset("ours, pod to pod across nodes"))
    {
        targets.push(Target {
            what: "NodePort remote / pod to pod across nodes, ours, TCP_CRR reset".into(),
            value: np / direct,
            at_least: true,
            target: 0.9,
        });
    }
    for (ours, iptables, nftables, what) in [
        (
            "ours, NodePort local",
            "kube-proxy iptables, NodePort local",
            "kube-proxy nftables, NodePort local",
            "local",
        ),
        (
            "ours, NodePort remote",
            "kube-proxy iptables, NodePort remote",
            "kube-proxy nftables, NodePort remote",
            "remote",
        ),
    ] {
        if let (Some(o), Some(i), Some(n)) = (reset(ours), reset(iptables), reset(nftables)) {
            targets.push(Target {
                what: format!("NodePort {what} ours / the better kube-proxy mode, TCP_CRR reset"),
                value: o / i.max(n),
                at_least: true,
                target: 1.0,
            });
        }
    }
    let report = serde_json::json!({
        "suite": "services-node-ports",
        "duration_s": args.duration,
        "repeats": args.repeats,
        "client_ephemeral_ports": [CLIENT_PORTS.0, CLIENT_PORTS.1],
        "tcp_crr_harness_ceiling_tps": crr_harness_ceiling(CLIENT_PORTS),
        "ours_snat_ports_exhausted": snat_refused,
        "results": summary.iter().map(|(r, crr, reset)| serde_json::json!({
            "setup": r.setup,
            "tcp_crr_tps": crr,
            "tcp_crr_at_harness_ceiling": at_harness_ceiling(crr, CLIENT_PORTS),
            "tcp_crr_reset_tps": reset,
        })).collect::<Vec<_>>(),
    });
    Ok((report, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ports_jump_to_their_services_in_both_modes() {
        let services = [
            (svc("np-local", LOCAL_VIP, FLANNEL_LOCAL_POD), LOCAL_NODE_PORT),
            (svc("np-remote", REMOTE_VIP, FLANNEL_REMOTE_POD), REMOTE_NODE_PORT),
        ];
        let ipt = iptables_rules(&services);
        assert!(ipt.starts_with("*nat\n") && ipt.ends_with("COMMIT\n"));
        assert_eq!(ipt.matches("-A KUBE-NODEPORTS -p tcp").count(), 2);
        assert!(ipt.contains("--dport 30081 -j KUBE-EXT-"));
        assert!(ipt.contains("-j DNAT --to-destination 10.246.2.2:8080\n"));
        let nft = nftables_rules(&services);
        assert!(nft.contains("add element ip kube-proxy nodeport-ips { 10.251.0.1 }"));
        assert_eq!(nft.matches("service-nodeports { tcp . ").count(), 2);
    }
}
