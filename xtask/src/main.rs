//! `cargo xtask <task>`: the project's developer tasks.

mod bench;
mod bench_extra;
mod bench_kube_proxy_nft;
mod bench_node_ports;
mod bench_policy;
mod bench_policy_e2e;
mod bench_services;
mod chart;
mod fmt;
mod run;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks of the eBPF pod datapath")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The whole test suite: fmt, clippy, unit, packet-level and end-to-end tests (root).
    Test(test::TestArgs),
    /// Format the workspace as `test` checks it (nightly rustfmt: grouped imports).
    Fmt,
    /// Demo node with two pods (no arguments), or the agent on this host (`-- <agent args>`).
    Run(run::RunArgs),
    /// Pod-to-pod TCP_RR, TCP_CRR and throughput against baselines, ns/packet, control plane,
    /// Services against kube-proxy;
    /// JSON report and SVG chart (`--chart-only JSON` redraws a chart).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Test(args) => test::test(args),
        Task::Fmt => fmt::fmt(false),
        Task::Run(args) => run::run(args),
        Task::Bench(args) => bench::bench(args),
    }
}

/// Run a command to completion, failing with its name if it fails.
pub fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd.status().map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

pub fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Build the agent and plugin binaries; returns their directory.
pub fn build_bins(release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut cmd = cargo();
    // Quiet: errors still show; progress lines of a nested cargo only bury the demo's output.
    eprintln!("building datapath-agent and datapath-cni ({})", if release { "release" } else { "debug" });
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "datapath-agent",
        "-p",
        "datapath-cni",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    Ok(workspace_root().join("target").join(if release { "release" } else { "debug" }))
}
