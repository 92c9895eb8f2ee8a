//! `datapath-agent`: the node agent (`run`) and its inspection CLI (`inspect`).

use clap::{Parser, Subcommand};
use datapath_agent::cmd::{inspect, run};

#[derive(Debug, Parser)]
#[command(version, about = "eBPF pod datapath: node agent and inspection CLI")]
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
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
        Command::Inspect(args) => inspect::inspect(args),
    }
}
