//! Builds the eBPF programs (`datapath-ebpf`) for the BPF target on the nightly
//! toolchain and leaves the object in OUT_DIR, where `src/bpf/ebpf.rs` embeds it.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../datapath-ebpf").canonicalize().context("locating datapath-ebpf")?;
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "datapath-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom("nightly"),
    )
}
