//! Helpers for the datapath's tests: root/skip policy, namespace guards, a
//! simulated node with pods made by the real CNI plugin, and traffic checks.
//!
//! Every kernel object a test makes carries the prefix `dpt` plus the test
//! process id, and is removed by a guard's `Drop`, also when the test fails.

pub mod kube_api;
pub mod lab;
pub mod oracle;
pub mod packets;
pub mod traffic;

use std::path::PathBuf;

/// Skip (with a printed reason) when not root; under CI a skip is a failure.
/// Returns true when the test should go on.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    eprintln!("SKIP {test}: needs root (network namespaces, bpffs, BPF programs)");
    false
}

/// Where the agent and plugin binaries are: `DATAPATH_BIN_DIR` (set by
/// `cargo xtask test`), else the workspace's target/debug.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("DATAPATH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    for bin in ["datapath-agent", "datapath-cni"] {
        assert!(
            dir.join(bin).is_file(),
            "{} not found in {}: run `cargo xtask test` (or `cargo build -p datapath-agent -p datapath-cni --bins` first)",
            bin,
            dir.display()
        );
    }
    dir
}

/// Run a command, panicking with its output if it fails.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and report only whether it succeeded.
pub fn sh_ok(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
