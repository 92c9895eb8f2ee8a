//! `datapath-agent`: the node agent (`run`), its inspection CLI (`inspect`),
//! the live event monitor (`monitor`) and the uninstaller (`cleanup`).

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use datapath_agent::cmd::{cleanup, inspect, monitor, run, status};
use nix::sys::signal::{SigHandler, Signal, signal};

#[derive(Debug, Parser)]
#[command(version = datapath_agent::build_info::LONG_VERSION, about = "eBPF pod datapath: node agent and inspection CLI")]
struct Cli {
    /// How log lines are written to stderr: text for people, json (one
    /// object per line: timestamp, level, target, fields) for log
    /// collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DATAPATH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    let cli = Cli::parse();
    // The programs' own log lines (target datapath_ebpf) exist only with
    // ebpf_log = "debug": show them when that build runs.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,datapath_ebpf=debug"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
    let result = execute(cli.command);
    if let (Err(e), LogFormat::Json) = (&result, cli.log_format) {
        // A log collector reads this line too, not a plain-text error.
        tracing::error!(error = format!("{e:#}"), "datapath-agent failed");
        std::process::exit(1);
    }
    result
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
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
