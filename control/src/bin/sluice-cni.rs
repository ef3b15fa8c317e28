//! `sluice-cni`: the CNI plugin binary. The container runtime runs it with the CNI_* variables and
//! the network config on stdin; see `control::cni` for what each command does.
//!
//! stdout carries only the CNI result or error JSON; logs go to stderr (the runtime keeps them),
//! at `warn` unless `SLUICE_CNI_LOG` says otherwise (e.g. `SLUICE_CNI_LOG=debug`).
use std::io::Write;

use control::cni::{self, netops::IpRoute};
use tracing_subscriber::EnvFilter;

fn main() {
    let filter =
        EnvFilter::try_from_env("SLUICE_CNI_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let output = cni::execute(
        |name| std::env::var(name).ok(),
        &mut std::io::stdin().lock(),
        &IpRoute,
    );
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(output.stdout.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("sluice-cni: cannot write the result to stdout: {e}");
        std::process::exit(1);
    }
    std::process::exit(output.exit_code);
}
