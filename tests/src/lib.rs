//! Helpers for the datapath's tests: root/skip policy, namespace guards, a
//! simulated node with pods made by the real CNI plugin, and traffic checks.
//!
//! Every kernel object a test makes carries the prefix `dpt` plus the test
//! process id, and is removed by a guard's `Drop`, also when the test fails.

pub mod kube_api;
pub mod lab;
pub mod netpol;
pub mod netpol_cases;
pub mod oracle;
pub mod packets;
pub mod traffic;

use std::path::PathBuf;

/// Return from the calling test (with a printed reason) when not root; under
/// CI a skip is a failure. The test's name comes from the enclosing function.
#[macro_export]
macro_rules! require_root {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        // "<test binary>::<module>::<test>::here" -> "<module>::<test>",
        // the name libtest prints.
        let test = path.strip_suffix("::here").unwrap_or(path);
        let test = test.split_once("::").map_or(test, |(_, rest)| rest);
        if !$crate::require_root(test) {
            return;
        }
    }};
}

/// One test per routing mode from one scenario function taking the mode:
/// `in_both_modes! { name => scenario; }` makes `name::native` and
/// `name::vxlan`.
#[macro_export]
macro_rules! in_both_modes {
    ($($test:ident => $scenario:ident;)+) => {$(
        mod $test {
            #[test]
            fn native() {
                $crate::require_root!();
                super::$scenario("native");
            }

            #[test]
            fn vxlan() {
                $crate::require_root!();
                super::$scenario("vxlan");
            }
        }
    )+};
}

/// Skip (with a printed reason) when not root; under CI a skip is a failure.
/// Returns true when the test should go on. Tests call [`require_root!`].
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

/// Poll `check` every 100 ms until it holds; panic naming `what` after
/// `timeout`. Waiting for a positive sign (a log line, a counter, a route)
/// instead of sleeping a fixed time keeps tests fast and honest.
#[track_caller]
pub fn wait_for(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
