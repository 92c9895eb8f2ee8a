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
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain.toolchain.channel),
    )
}

#[derive(serde::Deserialize)]
struct ToolchainFile {
    toolchain: Toolchain,
}

#[derive(serde::Deserialize)]
struct Toolchain {
    channel: String,
}
