//! `sluice-perf`: scenarios on the testbed with a kernel baseline in the same run (policy
//! scenarios: sluice without policies as the baseline; restart scenarios: none, an agent restarts mid-stream) (`list`, `run`, `compare`), and the bounded programs they start inside pods (UDP generator and sink,
//! request/response client and server, TCP sender and receiver). The programs print one JSON
//! line on stdout (and write it to `--json-out` if given).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use perf::gen::{run_gen, GenConfig};
use perf::pingpong::{run_pingpong, PingConfig, PingServerConfig};
use perf::sink::{run_sink, SinkConfig};
use perf::tcp::{run_tcp_recv, run_tcp_send, TcpRecvConfig, TcpSendConfig};

mod export;
mod run;
mod scale_api;
mod wg;

#[derive(Parser)]
#[command(
    name = "sluice-perf",
    version,
    about = "Bounded packet-rate and latency measurements for sluice"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(format!("{s} s is outside (0, 86400]"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Subcommand)]
enum Cmd {
    /// UDP generator: sendmmsg batches, open loop with --rate, closed loop without.
    Gen {
        #[arg(long)]
        dst: SocketAddrV4,
        /// Ethernet frame size in bytes, FCS included (64 ..= 1518).
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        count: u64,
        /// Seconds (fractions allowed).
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Target packets per second; leave out for closed loop.
        #[arg(long)]
        rate: Option<u64>,
        /// Number of source ports (one socket each).
        #[arg(long, default_value_t = 1)]
        flows: u16,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// UDP sink: recvmmsg batches, per-flow loss/reorder/duplicates, one-way latency.
    Sink {
        #[arg(long)]
        bind: SocketAddrV4,
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Stop after this long without traffic, once traffic has started.
        #[arg(long, default_value_t = 500)]
        idle_timeout_ms: u64,
        /// Stop once this many distinct packets arrived.
        #[arg(long)]
        expect: Option<u64>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long)]
        cpu: Option<usize>,
        /// Include the HdrHistogram (V2 + deflate, base64) in the JSON.
        #[arg(long)]
        histogram: bool,
        /// Create this file once the socket is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Echo server for `pingpong`.
    PingpongServer {
        #[arg(long)]
        bind: SocketAddrV4,
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Closed-loop request/response latency, one request outstanding.
    Pingpong {
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long)]
        count: u64,
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Ethernet frame size in bytes, FCS included (64 ..= 1518).
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 200)]
        reply_timeout_ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(long)]
        histogram: bool,
        /// Open loop: requests per second whatever the replies do (default: closed loop,
        /// one request outstanding).
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// TCP receiver: accepts --flows connections, reads each to its end, counts bytes.
    TcpRecv {
        #[arg(long)]
        bind: SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        flows: u16,
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        /// Give up on a connection this long after its last byte.
        #[arg(long, default_value_t = 2000)]
        idle_timeout_ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// TCP sender: --flows connections writing until --bytes (in total) or --duration.
    TcpSend {
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        flows: u16,
        /// Total over all connections (default: no limit but the duration).
        #[arg(long)]
        bytes: Option<u64>,
        #[arg(long, value_parser = seconds)]
        duration: Duration,
        #[arg(long, default_value_t = 128 * 1024)]
        write_bytes: usize,
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// The scenarios `run` knows: name, what it measures, topology, traffic.
    List,
    /// Bring up a testbed per mode (kernel baseline, sluice), run a scenario, tear down, report
    /// with ratios; writes report.json, .hlog interval logs and latency.svg.
    Run(run::RunArgs),
    /// Pipeline cost per packet over table sizes (no testbed): writes scale.json and scale.svg.
    Scale {
        /// Table that grows (endpoints).
        #[arg(long, default_value = "endpoints")]
        table: String,
        /// Comma-separated table sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 256, 4096, 65536])]
        sizes: Vec<u32>,
        /// Packets per timed repeat.
        #[arg(long, default_value_t = 200_000)]
        packets: u32,
        /// Timed repeats per size.
        #[arg(long, default_value_t = 5)]
        repeats: u32,
        /// Writes DIR/scale-<table>-<UTC timestamp>.{json,svg}.
        #[arg(long, default_value = "perf-out")]
        out: PathBuf,
    },
    /// Control-plane scale (no testbed, no root): fake API server + Kubernetes source + the
    /// agent's translation at 10,000 Services; first sync, memory, update latency p50/p99.
    ScaleApi(scale_api::ScaleApiArgs),
    /// Compare two report.json files: per figure A, B, B/A, change, regressions (exits 0).
    Compare {
        a: PathBuf,
        b: PathBuf,
        /// Changes for the worse beyond this many percent are marked as regressions.
        #[arg(long, default_value_t = 5.0)]
        threshold_pct: f64,
    },
}

fn list() {
    println!(
        "{:<20} {:<22} {:<32} measures",
        "scenario", "traffic", "topology"
    );
    for s in perf::scenario::SCENARIOS {
        println!(
            "{:<20} {:<22} {:<32} {}",
            s.name,
            s.traffic.as_str(),
            s.topology,
            s.measures
        );
    }
}

fn scale(table: &str, opts: &perf::scale::ScaleOptions, out: &Path) -> Result<()> {
    let t = perf::scale::ScaleTable::from_name(table).ok_or_else(|| {
        anyhow::anyhow!(
            "no scale table {table:?}; known: {}",
            perf::scale::ScaleTable::ALL
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let report = perf::scale::run_scale_table(t, opts);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output directory {}", out.display()))?;
    let stem = out.join(format!(
        "scale-{}-{}",
        t.as_str(),
        perf::report::utc_stamp(now)
    ));
    let json = stem.with_extension("json");
    let svg = stem.with_extension("svg");
    let value = report.to_json();
    std::fs::write(&json, serde_json::to_string_pretty(&value)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    perf::plot::write_svg(&svg, &report.to_svg())
        .with_context(|| format!("writing {}", svg.display()))?;
    println!(
        "{:>10} {:>14} {:>14}",
        "size", "ns/pkt min", "ns/pkt median"
    );
    for p in &report.points {
        println!(
            "{:>10} {:>14.1} {:>14.1}",
            p.size, p.ns_per_packet_min, p.ns_per_packet_median
        );
    }
    println!("scale: {} and {}", json.display(), svg.display());
    Ok(())
}

fn compare(a: &Path, b: &Path, threshold_pct: f64) -> Result<()> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON; pass two report.json files", p.display()))
    };
    let (ra, rb) = (read(a)?, read(b)?);
    for (label, path, r) in [("A", a, &ra), ("B", b, &rb)] {
        println!(
            "{label}: {} ({} {}, commit {})",
            path.display(),
            r["scenario"]["name"].as_str().unwrap_or("?"),
            r["parameters"]["rate_pps"]
                .as_u64()
                .map_or("closed loop".to_string(), |x| format!("{x} pps")),
            r["machine"]["git_commit"]
                .as_str()
                .map_or("?", |c| &c[..c.len().min(12)]),
        );
    }
    if ra["scenario"]["name"] != rb["scenario"]["name"] {
        println!("note: A and B ran different scenarios");
    }
    let rows = perf::metrics::compare(&ra, &rb, threshold_pct);
    print!("{}", perf::metrics::render_compare(&rows, threshold_pct));
    Ok(())
}

/// Prints `value` as one JSON line and writes it to `json_out` (via a temporary file and a
/// rename, so a reader never sees half a file).
fn emit(value: &impl Serialize, json_out: Option<&Path>) -> Result<()> {
    let line = serde_json::to_string(value).context("serialising the report")?;
    println!("{line}");
    if let Some(path) = json_out {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{line}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Gen {
            dst,
            size,
            count,
            duration,
            rate,
            flows,
            batch,
            cpu,
            json_out,
        } => {
            let cfg = GenConfig {
                dst,
                frame_bytes: size,
                count,
                duration,
                rate_pps: rate,
                flows,
                batch,
                cpu,
            };
            emit(&run_gen(&cfg)?, json_out.as_deref())
        }
        Cmd::Sink {
            bind,
            duration,
            idle_timeout_ms,
            expect,
            batch,
            cpu,
            histogram,
            ready_file,
            json_out,
        } => {
            let cfg = SinkConfig {
                bind,
                duration,
                idle_timeout: Duration::from_millis(idle_timeout_ms),
                expect,
                batch,
                cpu,
                include_histogram: histogram,
                ready_file,
            };
            emit(&run_sink(&cfg)?, json_out.as_deref())
        }
        Cmd::PingpongServer {
            bind,
            duration,
            cpu,
            ready_file,
            json_out,
        } => {
            let sock = perf::pingpong::bind_server(bind)?;
            if let Some(path) = &ready_file {
                std::fs::write(path, b"")
                    .with_context(|| format!("creating ready file {}", path.display()))?;
            }
            let report = perf::pingpong::run_server_on(
                &sock,
                &PingServerConfig {
                    bind,
                    duration,
                    cpu,
                },
            )?;
            emit(&report, json_out.as_deref())
        }
        Cmd::Pingpong {
            dst,
            count,
            duration,
            size,
            reply_timeout_ms,
            cpu,
            histogram,
            rate,
            json_out,
        } => {
            let cfg = PingConfig {
                dst,
                frame_bytes: size,
                count,
                duration,
                reply_timeout: Duration::from_millis(reply_timeout_ms),
                cpu,
                include_histogram: histogram,
                rate_pps: rate,
            };
            emit(&run_pingpong(&cfg)?, json_out.as_deref())
        }
        Cmd::TcpRecv {
            bind,
            flows,
            duration,
            idle_timeout_ms,
            cpu,
            ready_file,
            json_out,
        } => {
            let cfg = TcpRecvConfig {
                bind,
                flows,
                duration,
                idle_timeout: Duration::from_millis(idle_timeout_ms),
                cpu,
                ready_file,
            };
            emit(&run_tcp_recv(&cfg)?, json_out.as_deref())
        }
        Cmd::TcpSend {
            dst,
            flows,
            bytes,
            duration,
            write_bytes,
            cpu,
            json_out,
        } => {
            let cfg = TcpSendConfig {
                dst,
                flows,
                bytes: bytes.unwrap_or(u64::MAX),
                duration,
                write_bytes,
                cpu,
            };
            emit(&run_tcp_send(&cfg)?, json_out.as_deref())
        }
        Cmd::List => {
            list();
            Ok(())
        }
        Cmd::Run(args) => run::run(&args),
        Cmd::Scale {
            table,
            sizes,
            packets,
            repeats,
            out,
        } => scale(
            &table,
            &perf::scale::ScaleOptions {
                sizes,
                packets,
                repeats,
            },
            &out,
        ),
        Cmd::ScaleApi(args) => scale_api::run(&args),
        Cmd::Compare {
            a,
            b,
            threshold_pct,
        } => compare(&a, &b, threshold_pct),
    }
}
