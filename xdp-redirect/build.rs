//! Builds the eBPF program in `ebpf/` with the nightly toolchain for `bpfel-unknown-none` and
//! puts the object at `$OUT_DIR/xdp-redirect.o`, which `src/lib.rs` embeds.
//!
//! Needs: the nightly toolchain with `rust-src`, and `bpf-linker` on PATH (see `.ci/run`).
//! What aya-build does, but by manifest path (the eBPF crate stays out of the host workspace).
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let ebpf_dir = manifest_dir.join("ebpf");
    for rel in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(rel).display()
        );
    }
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "-Z",
            "build-std=core",
        ])
        .args(["--target", "bpfel-unknown-none", "--bins", "--locked"])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer (stable) cargo's settings must not leak into the nightly eBPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(key);
    }
    // BTF in the object (aya loads BTF-less objects too; BTF gives bpftool readable maps).
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("xdp-redirect: cannot run `rustup run nightly cargo` ({e}); run .ci/run or install rustup")
    });
    if !status.success() {
        panic!(
            "xdp-redirect: building the eBPF program failed ({status}). It needs the nightly \
             toolchain with rust-src (`rustup component add rust-src --toolchain nightly`) and \
             bpf-linker on PATH (see .ci/run)."
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/xdp-redirect");
    std::fs::copy(&built, out_dir.join("xdp-redirect.o"))
        .unwrap_or_else(|e| panic!("xdp-redirect: copy {}: {e}", built.display()));
}
