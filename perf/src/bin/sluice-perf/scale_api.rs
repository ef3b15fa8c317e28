//! `sluice-perf scale-api`: the control-plane scale benchmark ([`perf::scale_api`]) on the
//! command line; prints the figures and writes them as JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use perf::scale_api::{run_scale_api, ScaleApiOptions};

/// What `sluice-perf scale-api` takes (defaults: the 10,000 Services, 100,000
/// endpoints, 1,000 policies).
#[derive(Args, Debug)]
pub struct ScaleApiArgs {
    /// Nodes (the agent simulated is the first one's).
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Namespaces.
    #[arg(long, default_value_t = 50)]
    namespaces: u32,
    /// Services.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Endpoints (one Pod each), in EndpointSlices of at most 100.
    #[arg(long, default_value_t = 100_000)]
    endpoints: u32,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 1_000)]
    policies: u32,
    /// Single-object updates per batch window.
    #[arg(long, default_value_t = 200)]
    updates: u32,
    /// Comma-separated batch windows of the source, ms; one pass each (30 is the default).
    #[arg(long, value_delimiter = ',', default_values_t = [30u64, 0])]
    batch_ms: Vec<u64>,
    /// Maglev table size (a prime).
    #[arg(long, default_value_t = control::services::DEFAULT_TABLE_SIZE)]
    maglev_table_size: u32,
    /// Seconds to wait for the first full state.
    #[arg(long, default_value_t = 600)]
    sync_timeout_s: u64,
    /// Writes DIR/scale-api-<UTC timestamp>.json.
    #[arg(long, default_value = "perf-out")]
    out: PathBuf,
}

/// Runs the benchmark, prints the table and writes the JSON report.
pub fn run(a: &ScaleApiArgs) -> Result<()> {
    let opts = ScaleApiOptions {
        nodes: a.nodes,
        namespaces: a.namespaces,
        services: a.services,
        endpoints: a.endpoints,
        policies: a.policies,
        updates: a.updates,
        batch_windows_ms: a.batch_ms.clone(),
        maglev_table_size: a.maglev_table_size,
        sync_timeout: Duration::from_secs(a.sync_timeout_s),
        ..ScaleApiOptions::default()
    };
    if cfg!(debug_assertions) {
        eprintln!("scale-api: this is a debug build; figures mean little (cargo run --release)");
    }
    let report = run_scale_api(&opts, &mut |line| eprintln!("scale-api: {line}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating the output directory {}", a.out.display()))?;
    let json = a
        .out
        .join(format!("scale-api-{}.json", perf::report::utc_stamp(now)));
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    print!("{}", report.to_text());
    println!("scale-api: {}", json.display());
    Ok(())
}
