//! Builds the eBPF programs (`datapath-ebpf`) for the BPF target on the nightly
//! pinned in `datapath-ebpf/rust-toolchain.toml`, and leaves the object in
//! OUT_DIR, where `src/bpf/ebpf.rs` embeds it.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../datapath-ebpf").canonicalize().context("locating datapath-ebpf")?;
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The dated nightly pinned next to the programs, so that the programs are
    // built the same way whoever builds them.
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain: ToolchainFile = toml::from_str(
        &std::fs::read_to_string(&toolchain_file)
            .with_context(|| format!("reading {}", toolchain_file.display()))?,
    )
    .with_context(|| format!("parsing {}", toolchain_file.display()))?;
    git_commit(&manifest_dir);
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain.toolchain.channel),
    )
}

/// The commit built, for `--version`, the start log and `datapath_build_info`
/// (`DATAPATH_GIT_COMMIT`): from git where the source is a checkout (rerun
/// when HEAD moves: a commit relinks the agent), else as the image build
/// passes it, else "unknown".
fn git_commit(manifest_dir: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=DATAPATH_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(manifest_dir)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
                let dir = PathBuf::from(dir);
                println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
                if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    println!("cargo:rerun-if-changed={}", dir.join(head_ref).display());
                }
                let packed = dir.join("packed-refs");
                if packed.exists() {
                    println!("cargo:rerun-if-changed={}", packed.display());
                }
            }
            commit
        }
        None => std::env::var("DATAPATH_GIT_COMMIT").unwrap_or_else(|_| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=DATAPATH_GIT_COMMIT={commit}");
}

#[derive(serde::Deserialize)]
struct ToolchainFile {
    toolchain: Toolchain,
}

#[derive(serde::Deserialize)]
struct Toolchain {
    channel: String,
}
