#!/usr/bin/env bash
# Installs what building and testing sluice needs, idempotently: skips what is present.
# Needs root (apt-get). Used by `make demo`, `make test` and .ci/run.
set -euo pipefail

log() { printf '[deps] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------------
# clang/libelf: eBPF tooling; llvm-22-dev (+ polly, zlib, zstd): bpf-linker links LLVM 22;
# iproute2/ethtool/iputils-ping/iperf3/python3: testbed, CNI plugin and end-to-end tests;
# nftables: the kernel kube-proxy (nftables mode) baseline for Services in kernel-mode testbeds;
# wireguard-go/wireguard-tools: the independent WireGuard peer of the interop tests.
APT_PACKAGES=(clang llvm-22-dev libpolly-22-dev libelf-dev zlib1g-dev libzstd-dev pkg-config
              iproute2 ethtool iputils-ping iperf3 python3 util-linux procps curl tcpdump nftables
              wireguard-go wireguard-tools)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

# --- Rust toolchains -------------------------------------------------------------------------
command -v rustup >/dev/null || { echo "rustup is required (the machines ship it)"; exit 1; }
# Stable, pinned in rust-toolchain.toml (rustup installs it on first use; make that explicit).
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^${pinned}"; then
  log "installing Rust ${pinned}"
  rustup toolchain install "${pinned}" --profile minimal --component rustfmt,clippy
fi
rustup component list --toolchain "${pinned}" --installed | grep -q '^clippy' || rustup component add clippy --toolchain "${pinned}"
rustup component list --toolchain "${pinned}" --installed | grep -q '^rustfmt' || rustup component add rustfmt --toolchain "${pinned}"
# Nightly + rust-src for the eBPF program (-Z build-std=core for bpfel-unknown-none).
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
else
  log "nightly rust-src present"
fi

# --- bpf-linker ------------------------------------------------------------------------------
# bpf-linker 0.13 needs LLVM 21+; LLVM_PREFIX keeps it from picking /usr/bin/llvm-config (14).
if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  log "installing bpf-linker (LLVM 22)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +"${pinned}" install bpf-linker@0.13.0 \
    --no-default-features --features llvm-22
else
  log "bpf-linker present"
fi
log "done"
