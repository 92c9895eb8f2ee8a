//! `cargo xtask test`: everything CI checks, in one command.

use crate::{build_bins, cargo, run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn test(args: TestArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    println!("== cargo fmt --check");
    run_cmd(cargo().current_dir(&root).args(["fmt", "--all", "--", "--check"]))?;
    println!("== cargo clippy --all-targets -- -D warnings");
    run_cmd(cargo().current_dir(&root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    println!("== build agent and CNI plugin");
    let bins = build_bins(false)?;
    if args.cargo_test_args.is_empty() {
        // One short repeat of every suite, so the benchmark cannot rot; its
        // figures mean nothing (a timed test is not a benchmark).
        println!("== cargo xtask bench --smoke");
        crate::bench::bench(crate::bench::BenchArgs {
            duration: 1,
            repeats: 1,
            suite: "all".into(),
            smoke: true,
            output: root.join("target/bench/smoke.json"),
        })?;
    }
    println!("== cargo test (kernel tests run serially)");
    // Tests that touch kernel state share one machine: one test at a time.
    run_cmd(
        cargo()
            .current_dir(&root)
            .env("DATAPATH_BIN_DIR", &bins)
            .args(["test", "--no-fail-fast"])
            .args(&args.cargo_test_args)
            .args(["--", "--test-threads=1"]),
    )
}
