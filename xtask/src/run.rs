//! `cargo xtask run`: with no arguments, a demo node with two pods in network
//! namespaces, the real agent and CNI plugin, until Ctrl-C; with
//! `-- <agent args>`, the agent itself on this host.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use datapath_tests::lab::{Node, ping, tcp_echo};

use crate::{build_bins, run_cmd};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Arguments for `datapath-agent` (e.g. `run --config /etc/datapath/agent.toml`).
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
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

    println!("== demo node: namespace, uplink, agent");
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    println!(
        "node namespace {}  bpffs {}  agent log {}",
        node.netns.name,
        node.bpffs_dir.display(),
        node.work_dir.join("agent.log").display()
    );
    println!("== two pods through the CNI plugin");
    let a = node.add_pod("pod-a");
    let b = node.add_pod("pod-b");
    println!("pod-a {} (netns {}, host veth {})", a.ip, a.netns.name, a.host_veth);
    println!("pod-b {} (netns {}, host veth {})", b.ip, b.netns.name, b.host_veth);

    println!("\n== datapath-agent inspect endpoints");
    show(
        std::process::Command::new(bins.join("datapath-agent"))
            .args(["inspect", "endpoints", "--bpffs-dir"])
            .arg(&node.bpffs_dir),
    );
    println!("\n== bpftool map dump pinned {}/maps/endpoints", node.bpffs_dir.display());
    show(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(node.bpffs_dir.join("maps/endpoints")),
    );

    println!("\n== checks");
    let checks = [
        ("ping pod-a -> pod-b", ping(&a.netns, b.ip, 3)),
        ("ping pod-b -> pod-a", ping(&b.netns, a.ip, 3)),
        ("ping node -> pod-a", ping(&node.netns, a.ip, 3)),
        ("TCP pod-a -> pod-b (1 MiB echoed)", tcp_echo(&b.netns, b.ip, &a.netns, 1 << 20).is_ok()),
        ("TCP pod-b -> pod-a (1 MiB echoed)", tcp_echo(&a.netns, a.ip, &b.netns, 1 << 20).is_ok()),
    ];
    for (what, ok) in &checks {
        println!("{:<40} {}", what, if *ok { "ok" } else { "FAILED" });
    }
    println!("\n== datapath-agent inspect counters");
    show(
        std::process::Command::new(bins.join("datapath-agent"))
            .args(["inspect", "counters", "--bpffs-dir"])
            .arg(&node.bpffs_dir),
    );

    println!("\nTry it: ip netns exec {} ping {}", a.netns.name, b.ip);
    println!("Running until Ctrl-C; everything is removed on exit.");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\n== cleaning up");
    let _ = node.del_pod(&a);
    let _ = node.del_pod(&b);
    drop((a, b));
    drop(node);
    anyhow::ensure!(checks.iter().all(|(_, ok)| *ok), "some checks failed");
    Ok(())
}

fn show(cmd: &mut std::process::Command) {
    match cmd.output() {
        Ok(out) => {
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Err(e) => println!("({cmd:?}: {e})"),
    }
}
