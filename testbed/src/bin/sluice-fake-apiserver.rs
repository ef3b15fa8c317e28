//! `sluice-fake-apiserver`: the in-process test API server ([`control::kube::fake`]) as a
//! process, serving the objects of a cluster file over plain HTTP for end-to-end tests and the
//! perf harness (`sluice run --source kubernetes --api-server http://127.0.0.1:PORT`).
//!
//! ```text
//!  cluster.yaml ──load_file (every --poll-ms, on change)──┐
//!                                                          ├──> FakeApi ──list/watch (HTTP)──> agents
//!  POST /fake/{apply,insert-raw,delete,compact,            │
//!   drop-watches,delay,down,error,served} ─────────────────┘
//! ```
//!
//! The file is the truth each time it changes: a re-read makes the served objects exactly the
//! file's (changed ones MODIFIED, new ones ADDED, the rest DELETED, including objects added
//! through `/fake/apply`). A file that does not parse is reported on stderr and the last good
//! state keeps being served. The listening URL is printed on stdout (and written to
//! `--url-file`), so `--listen 127.0.0.1:0` can be used.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use control::kube::fake::{cluster_objects, FakeApi};

/// Serves a cluster file's objects with the Kubernetes list/watch protocol (plain HTTP).
#[derive(Debug, Parser)]
#[command(name = "sluice-fake-apiserver", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Cluster file (multi-document YAML of Kubernetes objects) to serve; re-read on change.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// How often the cluster file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Interval between watch BOOKMARK events, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// Longest watch stream, in seconds (larger client timeoutSeconds are cut to this).
    #[arg(long, default_value_t = 1800)]
    max_watch_timeout_s: u64,
    /// Also write the URL (`http://127.0.0.1:PORT`) to this file once listening.
    #[arg(long)]
    url_file: Option<PathBuf>,
}

fn load(api: &FakeApi, path: &std::path::Path) -> anyhow::Result<usize> {
    let state = control::cluster::load_file(path)?;
    let objects = cluster_objects(&state)?;
    let n = objects.len();
    api.sync(objects)?;
    Ok(n)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = FakeApi::start(&args.listen)?;
    api.set_bookmark_interval(Duration::from_millis(args.bookmark_interval_ms));
    api.set_max_watch_timeout(Duration::from_secs(args.max_watch_timeout_s));
    let mut last = None;
    if let Some(path) = &args.cluster {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading cluster file {}", path.display()))?;
        let n =
            load(&api, path).with_context(|| format!("serving cluster file {}", path.display()))?;
        last = Some(bytes);
        println!(
            "sluice-fake-apiserver: serving {n} objects of {} on {}",
            path.display(),
            api.url()
        );
    } else {
        println!(
            "sluice-fake-apiserver: serving no objects on {} (add them with POST /fake/apply)",
            api.url()
        );
    }
    if let Some(url_file) = &args.url_file {
        std::fs::write(url_file, format!("{}\n", api.url()))
            .with_context(|| format!("writing --url-file {}", url_file.display()))?;
    }
    let poll = Duration::from_millis(args.poll_ms.max(10));
    loop {
        std::thread::sleep(poll);
        let Some(path) = &args.cluster else {
            continue;
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!(
                    "sluice-fake-apiserver: cannot read {}: {e}; still serving the last state",
                    path.display()
                );
                continue;
            }
        };
        if last.as_ref() == Some(&bytes) {
            continue;
        }
        match load(&api, path) {
            Ok(n) => println!(
                "sluice-fake-apiserver: {} changed: {n} objects, resourceVersion {}",
                path.display(),
                api.resource_version()
            ),
            // The error names the file (and document, object, field).
            Err(e) => eprintln!("sluice-fake-apiserver: {e:#}; still serving the last good state"),
        }
        last = Some(bytes);
    }
}
