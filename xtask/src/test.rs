//! `cargo xtask test`: everything CI checks, in one command.

use crate::{build_bins, cargo, run_cmd, workspace_root};

#[derive(clap::Args)]
pub(crate) struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub(crate) fn test(args: TestArgs) -> anyhow::Result<()> {
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
            output: Some(root.join("target/bench/smoke.json")),
            chart: None,
            chart_only: None,
            program_path: None,
        })?;
    }
    println!("== cargo test (kernel tests run serially)");
    // Tests that touch kernel state share one machine: one test at a time.
    let mut child = cargo()
        .current_dir(&root)
        .env("DATAPATH_BIN_DIR", &bins)
        .args(["test", "--no-fail-fast"])
        .args(&args.cargo_test_args)
        .args(["--", "--test-threads=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Pass the output through, and total the per-binary results so the run
    // ends with one line that says what ran.
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed");
    anyhow::ensure!(status.success() && failed == 0, "cargo test failed ({failed} failed)");
    anyhow::ensure!(passed > 0, "cargo test ran no test");
    Ok(())
}
