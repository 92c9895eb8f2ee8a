//! `cargo xtask test`: everything CI checks, in one command.

use anyhow::Context as _;

use crate::{build_bins, cargo, run_cmd, workspace_root};

#[derive(clap::Args)]
pub(crate) struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub(crate) fn test(args: TestArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    println!("== cargo fmt --check (pinned nightly rustfmt: imports grouped std / crates / this crate)");
    crate::fmt::fmt(true)?;
    println!("== cargo clippy --all-targets -- -D warnings");
    run_cmd(cargo().current_dir(&root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate is no default member (its programs build for BPF
    // only): its host part (the pure logic and its unit tests) and its BPF
    // build are linted here.
    println!("== cargo clippy -p datapath-ebpf --lib --tests -- -D warnings");
    run_cmd(
        cargo()
            .current_dir(&root)
            .args(["clippy", "-p", "datapath-ebpf", "--lib", "--tests"])
            .args(["--", "-D", "warnings"]),
    )?;
    let toolchain = ebpf_toolchain(&root)?;
    println!(
        "== cargo +{toolchain} clippy -p datapath-ebpf --target {BPF_TARGET} -Z build-std=core -- -D warnings"
    );
    run_cmd(&mut bpf_clippy(&root, &toolchain))?;
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
    // Quick and kernel-free: run whatever the filter, so that a filtered
    // run still checks the pure logic its packets go through.
    println!("== cargo test -p datapath-ebpf --lib (the eBPF crate's pure logic, on the host)");
    let ebpf_unit = run_tests(cargo().current_dir(&root).args(["test", "-p", "datapath-ebpf", "--lib"]))?;
    println!("== cargo test (kernel tests run serially)");
    // Tests that touch kernel state share one machine: one test at a time.
    let workspace = run_tests(
        cargo()
            .current_dir(&root)
            .env("DATAPATH_BIN_DIR", &bins)
            .args(["test", "--no-fail-fast"])
            .args(&args.cargo_test_args)
            .args(["--", "--test-threads=1"]),
    )?;
    let (passed, failed) = (ebpf_unit.passed + workspace.passed, ebpf_unit.failed + workspace.failed);
    println!("summary: {passed} passed, {failed} failed");
    anyhow::ensure!(
        ebpf_unit.success && workspace.success && failed == 0,
        "cargo test failed ({failed} failed)"
    );
    anyhow::ensure!(ebpf_unit.passed > 0, "the eBPF crate's unit tests ran no test");
    anyhow::ensure!(workspace.passed > 0, "cargo test ran no test");
    Ok(())
}

/// The target the eBPF crate is built for (by aya-build, from the agent's
/// `build.rs`).
const BPF_TARGET: &str = "bpfel-unknown-none";

/// The nightly the eBPF crate is built with: the channel pinned in its
/// `rust-toolchain.toml`, which the agent's `build.rs` reads too.
pub(crate) fn ebpf_toolchain(root: &std::path::Path) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct ToolchainFile {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let path = root.join("datapath-ebpf").join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: ToolchainFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.toolchain.channel)
}

/// Clippy on the eBPF crate as aya-build builds it: on `toolchain`, for
/// [`BPF_TARGET`], with `core` built from source. Run from the crate's
/// directory with that toolchain's cargo, the way aya-build does (`rustup
/// run <toolchain> cargo`, no inherited `RUSTC`).
fn bpf_clippy(root: &std::path::Path, toolchain: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(root.join("datapath-ebpf"))
        .args(["run", toolchain, "cargo", "clippy", "-p", "datapath-ebpf", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cmd
}

/// What one `cargo test` run did.
struct TestRun {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Run `cargo test`, passing its output through and totalling the
/// per-binary results, so that the run ends with one line that says what
/// ran.
fn run_tests(cmd: &mut std::process::Command) -> anyhow::Result<TestRun> {
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    // Tests run one at a time, so a test took from the end of the line
    // before to the end of its own. Each line gets its time, and the run
    // ends with the slowest: CI has a time limit, and this is where it goes.
    let mut since = std::time::Instant::now();
    let mut timed: Vec<(std::time::Duration, String)> = Vec::new();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        if line.starts_with("running ") {
            since = std::time::Instant::now();
        }
        if line.starts_with("test ") && line.contains(" ... ") {
            let took = since.elapsed();
            since = std::time::Instant::now();
            println!("{line} ({:.1} s)", took.as_secs_f64());
            timed.push((took, line));
            continue;
        }
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
    let success = child.wait()?.success();
    timed.sort_by_key(|(took, _)| std::cmp::Reverse(*took));
    let total: f64 = timed.iter().map(|(took, _)| took.as_secs_f64()).sum();
    // (Unit tests take no time worth listing.)
    if total >= 1.0 {
        println!("slowest tests (of {total:.0} s in tests):");
        for (took, line) in timed.iter().take(15) {
            println!("  {:7.1} s  {line}", took.as_secs_f64());
        }
    }
    Ok(TestRun { passed, failed, success })
}
