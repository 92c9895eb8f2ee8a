//! `datapath-agent run`: load and pin the datapath, reconcile, serve the CNI plugin.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    use datapath_api::build_info::{GIT_COMMIT, PROFILE, VERSION};
    tracing::info!(version = VERSION, commit = GIT_COMMIT, profile = PROFILE, "datapath-agent starting");
    crate::agent::run(&args.config).await
}
