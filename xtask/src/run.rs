//! `cargo xtask run`: with no arguments, a demo cluster of two simulated
//! nodes (network namespaces on one "physical" bridge) with two pods each,
//! the real agent and CNI plugin, in native or VXLAN mode, until Ctrl-C;
//! with `-- <agent args>`, the agent itself on this host.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use datapath_tests::lab::{Fabric, peered_nodes, ping, ping_from_spoofed_address, tcp_echo};

use crate::{build_bins, run_cmd};

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Cross-node mode of the demo: native or vxlan.
    #[arg(long, default_value = "native", value_parser = ["native", "vxlan"])]
    pub mode: String,
    /// Arguments for `datapath-agent` (e.g. `run --config /etc/datapath/agent.toml`).
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<()> {
    let bins = build_bins(false)?;
    if !args.agent_args.is_empty() {
        return run_cmd(std::process::Command::new(bins.join("datapath-agent")).args(&args.agent_args));
    }
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo needs root (network namespaces, BPF): use sudo"
    );
    // SAFETY: single-threaded here; the variable is read by the lab helpers.
    unsafe { std::env::set_var("DATAPATH_BIN_DIR", &bins) };
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::signal(sig, handler) }.context("installing signal handler")?;
    }

    println!("== demo cluster, {} mode: two nodes on one bridge, agents", args.mode);
    let fabric = Fabric::new();
    let (mut a, mut b) = peered_nodes(&fabric, &args.mode);
    // Both agents read NetworkPolicy objects from one directory (the
    // static source), empty until the policy step below.
    let policy_dir = a.work_dir.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    for node in [&mut a, &mut b] {
        node.set_extra_config(&format!("policy_dir = \"{}\"\n", policy_dir.display()));
        node.stop_agent();
        node.start_agent();
    }
    for node in [&a, &b] {
        println!(
            "node {} ({}, pod CIDR {}): netns {}, bpffs {}, log {}",
            node.id,
            node.node_ip,
            node.pod_cidr,
            node.netns.name,
            node.bpffs_dir.display(),
            node.work_dir.join("agent.log").display()
        );
    }
    println!("\n== four pods through the CNI plugin (namespace demo)");
    let pods = [
        a.add_pod_as("a1", "demo", "a1"),
        a.add_pod_as("a2", "demo", "a2"),
        b.add_pod_as("b1", "demo", "b1"),
        b.add_pod_as("b2", "demo", "b2"),
    ];
    for p in &pods {
        println!("{:<16} netns {:<28} host veth {}", p.ip.to_string(), p.netns.name, p.host_veth);
    }

    for node in [&a, &b] {
        println!("\n== node {}: datapath-agent inspect endpoints / nodes", node.id);
        show(
            node.in_node(&bins.join("datapath-agent"))
                .args(["inspect", "endpoints", "--bpffs-dir"])
                .arg(&node.bpffs_dir),
        );
        show(
            node.in_node(&bins.join("datapath-agent"))
                .args(["inspect", "nodes", "--bpffs-dir"])
                .arg(&node.bpffs_dir),
        );
    }
    println!("\n== bpftool map dump pinned {}/maps/remote_nodes-v1", a.bpffs_dir.display());
    show(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(a.bpffs_dir.join("maps/remote_nodes-v1")),
    );

    println!("\n== checks");
    let [a1, a2, b1, b2] = &pods;
    let checks = [
        ("ping a1 -> a2 (same node)", ping(&a1.netns, a2.ip, 2)),
        ("ping a1 -> b1 (other node)", ping(&a1.netns, b1.ip, 2)),
        ("ping b2 -> a2 (other node)", ping(&b2.netns, a2.ip, 2)),
        ("ping node a -> b1", ping(&a.netns, b1.ip, 2)),
        ("ping b1 -> node a", ping(&b1.netns, a.node_ip, 2)),
        ("TCP a1 -> b1 (4 MiB echoed)", tcp_echo(&b1.netns, b1.ip, &a1.netns, 4 << 20).is_ok()),
        ("TCP b2 -> a2 (4 MiB echoed)", tcp_echo(&a2.netns, a2.ip, &b2.netns, 4 << 20).is_ok()),
    ];
    for (what, ok) in &checks {
        println!("{:<40} {}", what, if *ok { "ok" } else { "FAILED" });
    }
    println!(
        "\n== node {}: datapath-agent monitor (a1 pings b1 from a spoofed address, then with TTL 1)",
        a.id
    );
    let monitor = a.monitor_text(&["--count", "2", "--seconds", "10"]);
    ping_from_spoofed_address(a1, "10.244.1.250", b1.ip, 1);
    a1.netns.exec_ok(&["ping", "-c", "1", "-W", "1", "-t", "1", &b1.ip.to_string()]);
    let (events, summary) = monitor.finish_text();
    print!("{events}{summary}");
    println!("\n== node {}: datapath-agent monitor --forwards (one ping a1 -> b1 and its reply)", a.id);
    let monitor = a.monitor_text(&["--forwards", "--count", "2", "--seconds", "10"]);
    ping(&a1.netns, b1.ip, 1);
    let (events, summary) = monitor.finish_text();
    print!("{events}{summary}");

    println!("\n== NetworkPolicy: deny all ingress in namespace demo, allow app=client -> app=web");
    let labels = [("a1", "client"), ("a2", "web"), ("b1", "web"), ("b2", "other")];
    let mut objects = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    for ((name, app), pod) in labels.iter().zip(&pods) {
        objects.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: demo, name: {name}, labels: {{app: {app}}}}}\nstatus: {{podIP: {}}}\n",
            pod.ip
        ));
    }
    objects.push_str(DEMO_POLICIES);
    print!("{DEMO_POLICIES}");
    let tmp = policy_dir.join(".demo.yaml.tmp");
    std::fs::write(&tmp, objects)?;
    std::fs::rename(&tmp, policy_dir.join("demo.yaml"))?;
    // The agents look at the directory every 50 ms.
    std::thread::sleep(Duration::from_millis(500));
    // Every pod serves TCP and UDP on 80 and 81 from here on.
    let _servers = datapath_tests::netpol::Servers::start(&pods);
    let refused_fast = |from: &datapath_tests::lab::Pod, to: std::net::Ipv4Addr| {
        datapath_tests::lab::in_netns(&from.netns.path(), move || {
            let started = std::time::Instant::now();
            let connected = datapath_tests::netpol::connects(
                datapath_tests::netpol_cases::Protocol::Tcp,
                std::net::SocketAddr::from((to, 80)),
            );
            !connected && started.elapsed() < Duration::from_secs(1)
        })
        .join()
        .unwrap_or(false)
    };
    let policy_checks = [
        ("ping a1 (client) -> b1 (web)", ping(&a1.netns, b1.ip, 2)),
        ("TCP a1 (client) -> b1 (web)", tcp_echo(&b1.netns, b1.ip, &a1.netns, 64 << 10).is_ok()),
        ("ping b2 (other) -> a2 (web) refused", !ping(&b2.netns, a2.ip, 1)),
        ("TCP b2 (other) -> a2 (web) refused at once", refused_fast(b2, a2.ip)),
        ("TCP a1 (client) -> b2 (other) refused at once", refused_fast(a1, b2.ip)),
        ("ping node b -> b2 (its own node is always allowed)", ping(&b.netns, b2.ip, 1)),
        ("ping node a -> b2 refused (another node is a peer)", !ping(&a.netns, b2.ip, 1)),
    ];
    for (what, ok) in &policy_checks {
        println!("{:<48} {}", what, if *ok { "ok" } else { "FAILED" });
    }
    println!("\n== node {}: datapath-agent inspect policy", b.id);
    show(
        b.in_node(&bins.join("datapath-agent"))
            .args(["inspect", "policy", "--bpffs-dir"])
            .arg(&b.bpffs_dir)
            .arg("--state-dir")
            .arg(b.work_dir.join("state")),
    );

    for node in [&a, &b] {
        println!("\n== node {}: datapath-agent inspect counters", node.id);
        show(
            node.in_node(&bins.join("datapath-agent"))
                .args(["inspect", "counters", "--bpffs-dir"])
                .arg(&node.bpffs_dir),
        );
    }

    println!("\nTry it (as root, while this runs):");
    println!("  ip netns exec {} ping {}", a1.netns.name, b1.ip);
    for node in [&a, &b] {
        let agent = format!(
            "nsenter --net={} {}",
            node.netns.path().display(),
            bins.join("datapath-agent").display()
        );
        let config = node.config_path();
        println!("  # node {}", node.id);
        println!("  {agent} status --config {}", config.display());
        println!("  {agent} inspect endpoints --config {}", config.display());
        println!(
            "  {agent} monitor --config {} --pod demo/{}",
            config.display(),
            if node.id == a.id { "a1" } else { "b1" }
        );
        println!(
            "  nsenter --net={} curl -s http://127.0.0.1:9976/metrics | grep ^pod_datapath_drops_total",
            node.netns.path().display()
        );
    }
    println!("Running until Ctrl-C; everything is removed on exit.");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\n== cleaning up");
    for (node, pod) in [(&a, a1), (&a, a2), (&b, b1), (&b, b2)] {
        let _ = node.del_pod(pod);
    }
    drop(pods);
    drop((a, b, fabric));
    anyhow::ensure!(checks.iter().chain(&policy_checks).all(|(_, ok)| *ok), "some checks failed");
    Ok(())
}

const DEMO_POLICIES: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: demo, name: deny-all-ingress}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: demo, name: web-from-client}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
";

fn show(cmd: &mut std::process::Command) {
    match cmd.output() {
        Ok(out) => {
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Err(e) => println!("({cmd:?}: {e})"),
    }
}
