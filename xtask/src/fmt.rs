//! `cargo xtask fmt`: rustfmt as the test command checks it.
//!
//! Import grouping (std/core/alloc, other crates, this crate) is a nightly
//! rustfmt option, so formatting runs on the nightly pinned for the eBPF
//! crate (datapath-ebpf/rust-toolchain.toml); rustfmt.toml keeps only the
//! stable options, so a plain `cargo fmt` agrees with it on everything else
//! and prints no warnings.

use crate::{run_cmd, test::ebpf_toolchain, workspace_root};

/// The nightly-only options, passed on the command line.
const NIGHTLY_OPTIONS: &str = "group_imports=StdExternalCrate";

/// Format the workspace, or with `check` only report what would change.
pub(crate) fn fmt(check: bool) -> anyhow::Result<()> {
    let root = workspace_root();
    let toolchain = ebpf_toolchain(&root)?;
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(&root)
        .args(["run", &toolchain, "cargo", "fmt", "--all", "--", "--config", NIGHTLY_OPTIONS])
        // The toolchain's own cargo and rustfmt, not the ones xtask runs under.
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTFMT");
    if check {
        cmd.arg("--check");
    }
    run_cmd(&mut cmd)
}
