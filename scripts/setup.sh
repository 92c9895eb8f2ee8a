#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian/Ubuntu machine (run as root).
# Installs the toolchain pieces the eBPF build needs, the tools the tests drive,
# and mounts bpffs. Re-running skips whatever is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# SETUP_MINIMAL=1 (image builds): only what building needs, no test tools.
if [ "${SETUP_MINIMAL:-0}" = 1 ]; then
APT_PACKAGES=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev binutils)
else
APT_PACKAGES=(
    llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev   # bpf-linker build
    binutils                                             # strip, readelf: the image's stripped binaries
    bpftool iproute2 iputils-ping util-linux             # inspection, namespaces, nsenter
    nftables                                             # masquerading of pod -> outside traffic
    containernetworking-plugins                          # host-local IPAM, loopback
    iperf3                                               # throughput figures (xtask bench)
    iptables                                             # kube-proxy baseline (xtask bench --suite services)
    prometheus                                           # promtool: /metrics checked as Prometheus would
    containerd runc podman catatonit busybox-static      # real runtimes in the tests
)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The eBPF crate builds on the nightly pinned in datapath-ebpf/rust-toolchain.toml
# (-Z build-std=core needs rust-src; clippy lints the programs).
EBPF_TOOLCHAIN=$(sed -n 's/^channel = "\(.*\)"$/\1/p' datapath-ebpf/rust-toolchain.toml)
[ -n "$EBPF_TOOLCHAIN" ] || { echo "setup: no channel in datapath-ebpf/rust-toolchain.toml" >&2; exit 1; }
for c in rust-src clippy rustfmt; do
    rustup component list --toolchain "$EBPF_TOOLCHAIN" --installed 2>/dev/null | grep -q "^$c" \
        || rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal \
            --component rust-src --component clippy --component rustfmt
done
for c in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

# bpf-linker against Debian's LLVM 22 (the nightly toolchain's LLVM major).
BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    LLVM_PREFIX=/usr/lib/llvm-22 PATH=/usr/lib/llvm-22/bin:$PATH \
        cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features llvm-22
fi

# CRI v1 client for the containerd tests (tests/runtimes/cri_driver.py).
if [ "${SETUP_MINIMAL:-0}" != 1 ]; then
    python3 -c "import cri_api.v1.api_pb2_grpc" 2>/dev/null \
        || python3 -m pip install --quiet --root-user-action=ignore container-runtime-interface-api==2.0.1
fi

# bpffs: the agent pins maps and links under it (not inside image builds).
if [ "${SETUP_SKIP_BPFFS:-0}" != 1 ]; then
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
fi

echo "setup: done"
