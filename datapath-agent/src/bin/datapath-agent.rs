//! `datapath-agent`: the node agent (`run`), its inspection CLI (`inspect`),
//! the live event monitor (`monitor`) and the uninstaller (`cleanup`).

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use datapath_agent::cmd::{cleanup, inspect, monitor, run, status};
use nix::sys::signal::{SigHandler, Signal, signal};

#[derive(Debug, Parser)]
#[command(version = datapath_agent::build_info::LONG_VERSION, about = "eBPF pod datapath: node agent and inspection CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and pin the datapath, reconcile, and serve the CNI plugin.
    Run(run::RunArgs),
    /// Show what the pinned maps hold.
    Inspect(inspect::InspectArgs),
    /// Stream drop events (and with --forwards every verdict) as they happen.
    Monitor(monitor::MonitorArgs),
    /// One summary of the node's datapath; exit status 1 when not healthy.
    Status(status::StatusArgs),
    /// Remove what the agent made on this node (uninstall), once it stopped.
    Cleanup(cleanup::CleanupArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The programs' own log lines (target datapath_ebpf) exist only
                // with ebpf_log = "debug": show them when that build runs.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,datapath_ebpf=debug")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run::run(args)),
        Command::Inspect(args) => {
            // Rust ignores SIGPIPE, so a closed pipe (`inspect ... | head -1`)
            // would make println! panic. A listing has nothing to clean up:
            // end quietly on SIGPIPE, as other command-line tools do.
            // SAFETY: no other thread exists yet, and no handler is installed.
            unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.context("restoring SIGPIPE")?;
            inspect::inspect(args)
        }
        Command::Monitor(args) => monitor::monitor(args),
        Command::Status(args) => {
            if !status::status(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Cleanup(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(cleanup::cleanup(args)),
    }
}
