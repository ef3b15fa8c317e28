//! The report of a `sluice-perf run`: machine, scenario, parameters, per mode (sluice and the
//! kernel baseline) the raw results and the [`Metric`]s derived from them, sluice / baseline
//! [`Ratio`]s, the cores everything ran on, and the warnings a reader must see next to the
//! numbers. Written as `report.json` (schema versioned) and printed as a table.
//!
//! Pure functions decide what the figures and warnings are ([`metrics_for`], [`mode_warnings`],
//! [`core_warnings`]), so they are tested without a testbed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::gen::GenReport;
use crate::metrics::{Better, Metric, Ratio};
use crate::pingpong::PingReport;
use crate::scenario::{Scenario, Traffic};
use crate::sink::SinkReport;
use crate::tcp::{TcpRecvReport, TcpSendReport};

/// Bumped when a field changes meaning or disappears. 2: one report holds every mode.
pub const REPORT_SCHEMA_VERSION: u32 = 2;

/// Always true on the testbed machines (NOTES.md): said in every report.
pub const SHARED_CPU_CAVEAT: &str = "generator, sink and dataplane share this machine's CPUs; veth runs the \
receiving side's NAPI (XDP program, copy into the UMEM) on the sending CPU, so the generator's CPU also \
carries part of the dataplane's work";

/// Reserved 2 MiB pages (the workers' UMEMs use them when there are enough).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hugepages {
    pub total: u64,
    pub free: u64,
    pub size_kb: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: Option<String>,
    pub nproc: usize,
    pub kernel: Option<String>,
    pub git_commit: Option<String>,
    /// Uncommitted changes in the work tree the binary was built from.
    pub git_dirty: Option<bool>,
    #[serde(default)]
    pub hugepages: Option<Hugepages>,
    /// `debug` or `release`: debug builds are several times slower.
    #[serde(default)]
    pub build: String,
}

/// The `model name` of the first CPU in `/proc/cpuinfo` text.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `HugePages_Total`, `HugePages_Free` and `Hugepagesize` from `/proc/meminfo` text.
pub fn parse_hugepages(meminfo: &str) -> Option<Hugepages> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .and_then(|(_, v)| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Hugepages {
        total: field("HugePages_Total")?,
        free: field("HugePages_Free")?,
        size_kb: field("Hugepagesize")?,
    })
}

fn uname_release() -> Option<String> {
    // SAFETY: utsname is plain arrays; all-zero is valid, and uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

fn git(args: &[&str]) -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl MachineInfo {
    /// Best effort: fields that cannot be read are `None`.
    pub fn collect() -> Self {
        Self {
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .as_deref()
                .and_then(parse_cpu_model),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: uname_release(),
            git_commit: git(&["rev-parse", "HEAD"]),
            git_dirty: git(&["status", "--porcelain", "--untracked-files=no"])
                .map(|s| !s.is_empty()),
            hugepages: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .as_deref()
                .and_then(parse_hugepages),
            build: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRecord {
    pub name: String,
    pub measures: String,
    pub topology: String,
    pub traffic: Traffic,
    pub cluster_file: String,
    pub client_pod: String,
    pub server_pod: String,
    /// Encryption between nodes in both modes (`none`, or `wireguard`: sluice seals, the
    /// baseline's nodes run wireguard-go). Absent in reports written before it existed.
    #[serde(default)]
    pub encryption: crate::scenario::Encryption,
    /// A policy scenario: the cluster file of the policies-on run (`cluster_file` is the
    /// policies-off one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies_file: Option<String>,
}

impl ScenarioRecord {
    pub fn new(s: &Scenario, cluster_file: &Path) -> Self {
        Self {
            name: s.name.into(),
            measures: s.measures.into(),
            topology: s.topology.into(),
            traffic: s.traffic,
            cluster_file: cluster_file.display().to_string(),
            client_pod: s.client_pod.into(),
            server_pod: s.server_pod.into(),
            encryption: s.encryption,
            policies_file: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunParameters {
    pub duration_s: f64,
    /// Ethernet frame bytes (UDP) or bytes per write (TCP).
    pub size: usize,
    /// `None`: closed loop.
    pub rate_pps: Option<u64>,
    pub flows: u16,
    pub batch: usize,
    /// sluice workers per node.
    pub workers: u32,
    /// `kernel` or `none`.
    pub baseline: String,
    pub gen_cpu: Option<usize>,
    pub sink_cpu: Option<usize>,
    /// Closed-loop request/response: at most this many round trips.
    pub rr_count: Option<u64>,
    /// TCP: at most this many bytes over all connections.
    pub tcp_bytes: Option<u64>,
}

/// What the programs of one mode reported (those the scenario's traffic runs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModeResults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<GenReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pingpong: Option<PingReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_send: Option<TcpSendReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_recv: Option<TcpRecvReport>,
}

/// The agent of the server's node, in sluice mode.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Each worker's pinned core (`null`: not pinned), from `Status`.
    pub worker_cores: Vec<Option<usize>>,
    pub status_before: Option<serde_json::Value>,
    pub status_after: Option<serde_json::Value>,
    /// The workers' pipeline histograms after the traffic (cumulative since the agent, started
    /// for this run, came up), HdrHistogram V2+deflate base64.
    pub histograms: Option<control::api::Histograms>,
    /// Why `histograms` is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histograms_error: Option<String>,
}

/// One mode's run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModeReport {
    /// `sluice` or `kernel`.
    pub mode: String,
    /// 0 for the mode that ran first.
    pub order: usize,
    pub instance: String,
    pub server_addr: String,
    /// Seconds after the run started at which this mode's traffic began and ended.
    pub traffic_start_s: f64,
    pub traffic_end_s: f64,
    pub results: ModeResults,
    pub metrics: Vec<Metric>,
    /// sluice mode: each node's agent, by node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agents: BTreeMap<String, AgentRecord>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
    /// A sluice mode of a policy scenario: what the agents' counters say about policy during
    /// the mode ([`crate::policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyEvidence>,
    /// A restart scenario: the agent restart made during the traffic and the loss it caused
    /// ([`crate::restart`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<crate::restart::RestartRecord>,
}

/// Who ran where. `None`: not pinned (the scheduler decides).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cores {
    pub generator: Option<usize>,
    pub sink: Option<usize>,
    pub workers: Vec<Option<usize>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub schema_version: u32,
    pub tool: String,
    pub started_unix_s: f64,
    pub machine: MachineInfo,
    pub scenario: ScenarioRecord,
    pub parameters: RunParameters,
    /// By mode name.
    pub modes: BTreeMap<String, ModeReport>,
    /// sluice / kernel per metric (empty without a baseline); see `ratio_of`.
    pub ratios: Vec<Ratio>,
    /// What `ratios` divide, when not sluice by the kernel baseline (policy scenarios:
    /// policies on by policies off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_of: Option<String>,
    pub cores: Cores,
    /// What a reader must know to read the numbers: shared CPUs, core overlaps, missed rates,
    /// loss; every mode's warnings are repeated here prefixed with its name.
    pub warnings: Vec<String>,
    /// Steps that failed (the run goes on where it can, and says so here).
    pub errors: Vec<String>,
    /// Files written next to this report (names relative to its directory).
    pub files: Vec<String>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn latency_metrics(out: &mut Vec<Metric>, prefix: &str, l: &crate::hist::LatencySummary) {
    if l.count == 0 {
        return;
    }
    for (name, ns) in [
        ("p50", l.p50_ns),
        ("p90", l.p90_ns),
        ("p99", l.p99_ns),
        ("p999", l.p999_ns),
    ] {
        out.push(Metric::new(
            &format!("{prefix}_{name}_us"),
            "us",
            Better::Lower,
            us(ns),
        ));
    }
}

/// The figures of one mode, by traffic kind. Rates that something other than the dataplane
/// bounded carry `limited_by`: `generator` (it missed its target, or in closed loop the sink
/// kept up, so the sender's own speed set the rate) or `offered load` (open loop at a rate the
/// path carried: the rate is the one asked for).
pub fn metrics_for(traffic: Traffic, r: &ModeResults) -> Vec<Metric> {
    let mut m = Vec::new();
    match traffic {
        Traffic::UdpStream => {
            let (Some(g), Some(s)) = (&r.gen, &r.sink) else {
                return m;
            };
            let lost = g.sent.saturating_sub(s.seq.received);
            let mut tx = Metric::new("tx_pps", "pps", Better::Higher, g.achieved_pps);
            let mut rx = Metric::new("rx_pps", "pps", Better::Higher, s.rate_pps);
            let limit = if !g.rate_reached {
                Some("generator")
            } else if g.target_pps.is_some() && lost == 0 {
                Some("offered load")
            } else if g.target_pps.is_none() && lost == 0 {
                Some("generator")
            } else {
                None
            };
            tx.limited_by = (!g.rate_reached).then(|| "generator".to_string());
            rx.limited_by = limit.map(str::to_string);
            m.push(tx);
            m.push(rx);
            m.push(Metric::new(
                "loss_pct",
                "%",
                Better::Lower,
                pct(lost, g.sent),
            ));
            latency_metrics(&mut m, "one_way", &s.latency);
        }
        Traffic::TcpStream => {
            if let Some(t) = &r.tcp_recv {
                m.push(Metric::new(
                    "rx_bytes_per_s",
                    "B/s",
                    Better::Higher,
                    t.totals.bytes_per_s,
                ));
            }
            if let Some(t) = &r.tcp_send {
                m.push(Metric::new(
                    "tx_bytes_per_s",
                    "B/s",
                    Better::Higher,
                    t.totals.bytes_per_s,
                ));
            }
        }
        Traffic::UdpRequestResponse => {
            let Some(p) = &r.pingpong else {
                return m;
            };
            let mut rt = Metric::new("round_trips_per_s", "1/s", Better::Higher, p.rate_pps);
            if p.target_pps.is_some() {
                rt.limited_by = Some(if p.rate_reached {
                    "offered load".into()
                } else {
                    "generator".into()
                });
                m.push(rt);
                m.push(Metric::new(
                    "loss_pct",
                    "%",
                    Better::Lower,
                    pct(p.lost, p.sent),
                ));
            } else {
                m.push(rt);
            }
            latency_metrics(&mut m, "rtt", &p.latency);
        }
    }
    m
}

/// What one mode's results oblige the reader to know.
pub fn mode_warnings(traffic: Traffic, r: &ModeResults) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(g) = &r.gen {
        if !g.rate_reached {
            w.push(format!(
                "GENERATOR-LIMITED: the generator sent {:.0} of the {} pps asked for; the rate \
                 figures measure the generator, not the dataplane",
                g.achieved_pps,
                g.target_pps.unwrap_or(0)
            ));
        }
        if g.target_pps.is_none() {
            w.push(
                "closed loop (no --rate): the generator sends as fast as its socket takes \
                 packets; loss then means the receiving side fell behind, and no loss means the \
                 generator (with the veth work it carries) set the rate"
                    .into(),
            );
        }
        if let Some(s) = &r.sink {
            let missing = g.sent.saturating_sub(s.seq.received);
            if missing > 0 {
                w.push(format!(
                    "{missing} of {} packets sent never reached the sink ({:.3} %)",
                    g.sent,
                    pct(missing, g.sent)
                ));
            }
            if s.seq.reordered > 0 || s.seq.duplicates > 0 {
                w.push(format!(
                    "{} packets reordered, {} duplicated",
                    s.seq.reordered, s.seq.duplicates
                ));
            }
        }
    }
    if let Some(p) = &r.pingpong {
        match p.target_pps {
            None => {
                if p.timeouts > 0 {
                    w.push(format!(
                        "{} of {} round trips timed out (closed loop: the responder or the path \
                         lost them)",
                        p.timeouts, p.sent
                    ));
                }
            }
            Some(t) => {
                if !p.rate_reached {
                    w.push(format!(
                        "GENERATOR-LIMITED: requests went out below the {t} per second asked for"
                    ));
                }
                if p.lost > 0 {
                    w.push(format!("{} of {} requests got no reply", p.lost, p.sent));
                }
            }
        }
    }
    if traffic == Traffic::TcpStream {
        if let (Some(s), Some(rx)) = (&r.tcp_send, &r.tcp_recv) {
            if s.totals.bytes != rx.totals.bytes {
                w.push(format!(
                    "the sender wrote {} bytes but the receiver read {} (a connection ended \
                     early)",
                    s.totals.bytes, rx.totals.bytes
                ));
            }
        }
    }
    w
}

/// The CPU picture: always the shared-machine caveat, plus every overlap between generator,
/// sink and sluice workers, and everything left unpinned.
pub fn core_warnings(nproc: usize, cores: &Cores) -> Vec<String> {
    let mut w = vec![format!("{SHARED_CPU_CAVEAT} ({nproc} CPUs here)")];
    match (cores.generator, cores.sink) {
        (Some(g), Some(s)) if g == s => {
            w.push(format!(
                "OVERLAP: generator and sink are both pinned to CPU {g}"
            ));
        }
        _ => {}
    }
    for (who, cpu) in [("generator", cores.generator), ("sink", cores.sink)] {
        match cpu {
            None => w.push(format!(
                "the {who} is not pinned (--{}-cpu): the scheduler may run it on a worker's core",
                if who == "generator" { "gen" } else { "sink" }
            )),
            Some(c) => {
                for (id, wc) in cores.workers.iter().enumerate() {
                    if *wc == Some(c) {
                        w.push(format!(
                            "OVERLAP: the {who} runs on CPU {c}, which is also sluice worker \
                             {id}'s core"
                        ));
                    }
                }
                if nproc > 0 && c >= nproc {
                    w.push(format!(
                        "the {who} is pinned to CPU {c} but there are {nproc}"
                    ));
                }
            }
        }
    }
    for (id, wc) in cores.workers.iter().enumerate() {
        if wc.is_none() {
            w.push(format!("sluice worker {id} is not pinned to a core"));
        }
    }
    w
}

/// The run's warnings: [`core_warnings`], then every mode's own warnings prefixed with its
/// name (in the order the modes ran), then a note when the binary is a debug build.
pub fn run_warnings(machine: &MachineInfo, cores: &Cores, modes: &[&ModeReport]) -> Vec<String> {
    let mut w = core_warnings(machine.nproc, cores);
    let mut ordered: Vec<&&ModeReport> = modes.iter().collect();
    ordered.sort_by_key(|m| m.order);
    for m in ordered {
        w.extend(m.warnings.iter().map(|x| format!("{}: {x}", m.mode)));
    }
    if machine.build == "debug" {
        w.push(
            "debug build: figures are several times below a release build's \
             (cargo build --release --workspace --bins)"
                .into(),
        );
    }
    w
}

/// Each worker's core from an agent's `Status` JSON (`workers[].core`).
pub fn worker_cores(status: &serde_json::Value) -> Vec<Option<usize>> {
    status
        .get("workers")
        .and_then(|w| w.as_array())
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    w.get("core")
                        .and_then(|c| c.as_u64())
                        .and_then(|c| usize::try_from(c).ok())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The human table: one row per metric, a column per mode, the ratio, then warnings.
pub fn render_table(r: &RunReport) -> String {
    let mut t = String::new();
    let m = &r.machine;
    let _ = writeln!(
        t,
        "sluice-perf run {}: {} ({})",
        r.scenario.name, r.scenario.measures, r.scenario.topology
    );
    let _ = writeln!(
        t,
        "machine: {} x{} | kernel {} | commit {}{} | {} build | hugepages {}",
        m.cpu_model.as_deref().unwrap_or("?"),
        m.nproc,
        m.kernel.as_deref().unwrap_or("?"),
        m.git_commit
            .as_deref()
            .map_or("?", |c| &c[..c.len().min(12)]),
        if m.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        },
        m.build,
        m.hugepages
            .map_or("?".into(), |h| format!("{} free of {}", h.free, h.total)),
    );
    let p = &r.parameters;
    let opt = |c: Option<usize>| c.map_or("-".into(), |c| c.to_string());
    let _ = writeln!(
        t,
        "parameters: {} s | size {} B | rate {} | flows {} | workers {} | baseline {} | cores: generator {} sink {} workers [{}]",
        p.duration_s,
        p.size,
        p.rate_pps.map_or("closed loop".into(), |r| format!("{r} pps")),
        p.flows,
        p.workers,
        p.baseline,
        opt(r.cores.generator),
        opt(r.cores.sink),
        r.cores.workers.iter().map(|c| opt(*c)).collect::<Vec<_>>().join(", "),
    );
    let modes: Vec<&String> = {
        let mut v: Vec<(&String, usize)> = r.modes.iter().map(|(k, m)| (k, m.order)).collect();
        v.sort_by_key(|(_, o)| *o);
        v.into_iter().map(|(k, _)| k).collect()
    };
    let _ = write!(t, "{:<18} {:>5} {:<17}", "metric", "unit", "");
    for mode in &modes {
        let _ = write!(t, " {:>12}", mode);
    }
    let _ = writeln!(t, " {:>9}", if r.ratios.is_empty() { "" } else { "ratio" });
    let mut names: Vec<(&str, &str, Better)> = Vec::new();
    for mode in &modes {
        for x in &r.modes[*mode].metrics {
            if !names.iter().any(|(n, _, _)| *n == x.name) {
                names.push((&x.name, &x.unit, x.better));
            }
        }
    }
    for (name, unit, better) in names {
        let _ = write!(t, "{name:<18} {unit:>5} {:<17}", better.as_str());
        let mut limited = Vec::new();
        for mode in &modes {
            let v = r.modes[*mode].metrics.iter().find(|x| x.name == name);
            let _ = write!(t, " {:>12}", v.map_or("-".into(), |x| fmt_value(x.value)));
            if let Some(l) = v.and_then(|x| x.limited_by.as_deref()) {
                limited.push(format!("{mode}: {l}-limited"));
            }
        }
        let ratio = r.ratios.iter().find(|x| x.metric == name);
        let _ = write!(
            t,
            " {:>9}",
            ratio
                .and_then(|x| x.ratio)
                .map_or(String::new(), |x| format!("{x:.3}"))
        );
        if !limited.is_empty() {
            let _ = write!(t, "  ({})", limited.join("; "));
        }
        let _ = writeln!(t);
    }
    if !r.ratios.is_empty() {
        let _ = writeln!(
            t,
            "ratio = {}, both measured in this run on the same topology",
            r.ratio_of.as_deref().unwrap_or("sluice / kernel baseline")
        );
    }
    for w in &r.warnings {
        let _ = writeln!(t, "warning: {w}");
    }
    for e in &r.errors {
        let _ = writeln!(t, "error: {e}");
    }
    t
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (UTC), for directory names that sort by time.
pub fn utc_stamp(unix_s: u64) -> String {
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

/// Writes `report.json` (pretty) into `dir`, creating it; returns the file's path.
pub fn write_report(dir: &Path, r: &RunReport) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("report.json");
    let text = serde_json::to_string_pretty(r).map_err(std::io::Error::other)?;
    std::fs::write(&path, text + "\n")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::StopReason;
    use crate::hist::LatencySummary;
    use crate::seq::SeqStats;

    fn gen(target: Option<u64>, achieved: f64) -> GenReport {
        GenReport {
            kind: "gen".into(),
            dst: "10.0.0.2:9000".into(),
            frame_bytes: 64,
            payload_bytes: 18,
            flows: 1,
            batch: 32,
            sent: 1000,
            start_ns: 0,
            send_errors: 0,
            duration_ns: 1_000_000_000,
            achieved_pps: achieved,
            target_pps: target,
            rate_reached: crate::pacing::rate_reached(achieved, target),
            stopped_by: StopReason::Count,
        }
    }

    fn sink(received: u64) -> SinkReport {
        SinkReport {
            kind: "sink".into(),
            bind: "0.0.0.0:9000".into(),
            seq: SeqStats {
                received,
                lost: 1000 - received,
                ..Default::default()
            },
            malformed: 0,
            flows: 1,
            bytes: received * 18,
            duration_ns: 1_000_000_000,
            rate_pps: received as f64,
            expected: None,
            missing_vs_expected: None,
            latency: LatencySummary {
                count: received,
                p50_ns: 5_000,
                p90_ns: 7_000,
                p99_ns: 9_000,
                p999_ns: 12_000,
                ..Default::default()
            },
            stopped_by: StopReason::IdleTimeout,
            longest_gap: None,
            gaps: Vec::new(),
            gap_count: 0,
            last_packet: None,
            histogram: None,
        }
    }

    fn udp(target: Option<u64>, achieved: f64, received: u64) -> ModeResults {
        ModeResults {
            gen: Some(gen(target, achieved)),
            sink: Some(sink(received)),
            ..Default::default()
        }
    }

    fn value(m: &[Metric], name: &str) -> f64 {
        m.iter()
            .find(|x| x.name == name)
            .map_or(f64::NAN, |x| x.value)
    }

    #[test]
    fn machine_fields_are_parsed() {
        let text =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t: x\n";
        assert_eq!(parse_cpu_model(text).as_deref(), Some("AMD EPYC 9R14"));
        assert_eq!(parse_cpu_model("nothing here"), None);
        let mem = "MemTotal: 1 kB\nHugePages_Total:      32\nHugePages_Free:       30\n\
                   HugePages_Rsvd:        0\nHugepagesize:       2048 kB\n";
        assert_eq!(
            parse_hugepages(mem),
            Some(Hugepages {
                total: 32,
                free: 30,
                size_kb: 2048
            })
        );
        assert_eq!(parse_hugepages("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn udp_metrics_loss_and_latency() {
        let m = metrics_for(Traffic::UdpStream, &udp(Some(1000), 1000.0, 990));
        assert_eq!(value(&m, "rx_pps"), 990.0);
        assert!((value(&m, "loss_pct") - 1.0).abs() < 1e-9);
        assert_eq!(value(&m, "one_way_p50_us"), 5.0);
        assert_eq!(value(&m, "one_way_p999_us"), 12.0);
        let rx = m.iter().find(|x| x.name == "rx_pps").expect("rx_pps");
        assert_eq!(rx.better, Better::Higher);
        assert_eq!(
            rx.limited_by, None,
            "loss: the path, not the load, set the rate"
        );
        assert!(m
            .iter()
            .filter(|x| x.name.starts_with("one_way"))
            .all(|x| x.better == Better::Lower));
        // Nothing to report without both programs' results.
        assert!(metrics_for(Traffic::UdpStream, &ModeResults::default()).is_empty());
    }

    #[test]
    fn rate_limits_are_attributed() {
        let missed = metrics_for(Traffic::UdpStream, &udp(Some(5000), 1000.0, 1000));
        let rx = missed.iter().find(|x| x.name == "rx_pps").expect("rx_pps");
        assert_eq!(rx.limited_by.as_deref(), Some("generator"));
        let tx = missed.iter().find(|x| x.name == "tx_pps").expect("tx_pps");
        assert_eq!(tx.limited_by.as_deref(), Some("generator"));
        let offered = metrics_for(Traffic::UdpStream, &udp(Some(1000), 1000.0, 1000));
        let rx = offered.iter().find(|x| x.name == "rx_pps").expect("rx_pps");
        assert_eq!(rx.limited_by.as_deref(), Some("offered load"));
        let closed = metrics_for(Traffic::UdpStream, &udp(None, 1000.0, 1000));
        let rx = closed.iter().find(|x| x.name == "rx_pps").expect("rx_pps");
        assert_eq!(rx.limited_by.as_deref(), Some("generator"));
        let w = mode_warnings(Traffic::UdpStream, &udp(Some(5000), 1000.0, 1000));
        assert!(w.iter().any(|x| x.contains("GENERATOR-LIMITED")), "{w:?}");
        let w = mode_warnings(Traffic::UdpStream, &udp(None, 1000.0, 900));
        assert!(w.iter().any(|x| x.contains("fell behind")), "{w:?}");
        assert!(w.iter().any(|x| x.contains("100 of 1000")), "{w:?}");
        assert!(mode_warnings(Traffic::UdpStream, &udp(Some(1000), 1000.0, 1000)).is_empty());
    }

    #[test]
    fn tcp_metrics_and_byte_mismatch() {
        use crate::tcp::{TcpStop, TcpTotals};
        let totals = |bytes: u64| TcpTotals {
            connections: 1,
            bytes,
            duration_ns: 1_000_000_000,
            bytes_per_s: bytes as f64,
            min_flow_bytes: bytes,
            max_flow_bytes: bytes,
        };
        let r = ModeResults {
            tcp_send: Some(TcpSendReport {
                kind: "tcp-send".into(),
                dst: "10.0.0.2:9002".into(),
                flows: 1,
                write_bytes: 1024,
                target_bytes: u64::MAX,
                totals: totals(2_000),
                stopped_by: TcpStop::Duration,
            }),
            tcp_recv: Some(TcpRecvReport {
                kind: "tcp-recv".into(),
                bind: "0.0.0.0:9002".into(),
                flows: 1,
                totals: totals(1_500),
                stopped_by: TcpStop::Done,
            }),
            ..Default::default()
        };
        let m = metrics_for(Traffic::TcpStream, &r);
        assert_eq!(value(&m, "rx_bytes_per_s"), 1_500.0);
        assert_eq!(value(&m, "tx_bytes_per_s"), 2_000.0);
        let w = mode_warnings(Traffic::TcpStream, &r);
        assert!(
            w.iter().any(|x| x.contains("2000") && x.contains("1500")),
            "{w:?}"
        );
    }

    #[test]
    fn core_overlaps_are_warned() {
        let ok = core_warnings(
            4,
            &Cores {
                generator: Some(0),
                sink: Some(1),
                workers: vec![Some(2), Some(3)],
            },
        );
        assert_eq!(ok.len(), 1, "{ok:?}");
        assert!(ok[0].contains("share") && ok[0].contains("4 CPUs"));
        let bad = core_warnings(
            2,
            &Cores {
                generator: Some(1),
                sink: Some(1),
                workers: vec![Some(1), None],
            },
        );
        assert!(
            bad.iter().any(|x| x.contains("both pinned to CPU 1")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|x| x.contains("generator runs on CPU 1")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|x| x.contains("sink runs on CPU 1")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|x| x.contains("worker 1 is not pinned")),
            "{bad:?}"
        );
        let unpinned = core_warnings(2, &Cores::default());
        assert!(
            unpinned.iter().any(|x| x.contains("--gen-cpu")),
            "{unpinned:?}"
        );
        assert!(
            unpinned.iter().any(|x| x.contains("--sink-cpu")),
            "{unpinned:?}"
        );
    }

    fn run_report() -> RunReport {
        let mode = |name: &str, order: usize, received: u64| {
            let results = udp(Some(1000), 1000.0, received);
            ModeReport {
                mode: name.into(),
                order,
                instance: format!("t-{name}"),
                server_addr: "10.244.1.3:9000".into(),
                traffic_start_s: 1.0,
                traffic_end_s: 2.0,
                metrics: metrics_for(Traffic::UdpStream, &results),
                warnings: mode_warnings(Traffic::UdpStream, &results),
                results,
                agents: BTreeMap::new(),
                errors: vec![],
                policy: None,
                restart: None,
            }
        };
        let (k, s) = (mode("kernel", 0, 1000), mode("sluice", 1, 990));
        let ratios = crate::metrics::ratios(&s.metrics, &k.metrics);
        let cores = Cores {
            generator: Some(0),
            sink: Some(0),
            workers: vec![Some(1)],
        };
        RunReport {
            schema_version: REPORT_SCHEMA_VERSION,
            tool: "sluice-perf".into(),
            started_unix_s: 1.5,
            machine: MachineInfo {
                nproc: 2,
                ..Default::default()
            },
            scenario: ScenarioRecord::new(&crate::scenario::SCENARIOS[0], Path::new("c.yaml")),
            parameters: RunParameters {
                duration_s: 1.0,
                size: 64,
                rate_pps: Some(1000),
                flows: 1,
                batch: 32,
                workers: 1,
                baseline: "kernel".into(),
                gen_cpu: Some(0),
                sink_cpu: Some(0),
                rr_count: None,
                tcp_bytes: None,
            },
            warnings: run_warnings(
                &MachineInfo {
                    nproc: 2,
                    build: "debug".into(),
                    ..Default::default()
                },
                &cores,
                &[&s, &k],
            ),
            cores,
            modes: [k, s].into_iter().map(|m| (m.mode.clone(), m)).collect(),
            ratios,
            ratio_of: None,
            errors: vec![],
            files: vec!["one-way.hlog".into()],
        }
    }

    /// A policy scenario's report: two sluice modes, the ratio says what it divides, the
    /// evidence is kept, and reports without these fields still load.
    #[test]
    fn policy_reports_name_their_ratio_and_keep_the_evidence() {
        let mut r = run_report();
        let mut off = r.modes.remove("sluice").expect("sluice mode");
        let mut on = r.modes.remove("kernel").expect("kernel mode");
        r.modes.clear();
        off.order = 0;
        off.policy = Some(crate::policy::PolicyEvidence {
            policies_on: false,
            probe_sent: 20,
            ..Default::default()
        });
        on.mode = "sluice-policy".into();
        on.order = 1;
        on.policy = Some(crate::policy::PolicyEvidence {
            policies_on: true,
            policy_flows: 1,
            policy_denied: 20,
            probe_sent: 20,
        });
        r.ratios = crate::metrics::ratios(&on.metrics, &off.metrics);
        r.ratio_of = Some("sluice-policy / sluice (policies on / off)".into());
        r.scenario.policies_file = Some("p.yaml".into());
        r.modes = [off, on].into_iter().map(|m| (m.mode.clone(), m)).collect();
        let t = render_table(&r);
        assert!(
            t.contains("ratio = sluice-policy / sluice (policies on / off), both measured"),
            "{t}"
        );
        assert!(!t.contains("kernel baseline"), "{t}");
        let header = t.lines().find(|l| l.starts_with("metric")).expect("header");
        assert!(
            header.find(" sluice ").expect("off column")
                < header.find("sluice-policy").expect("on column"),
            "{header}"
        );
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["modes"]["sluice-policy"]["policy"]["policy_flows"], 1);
        assert_eq!(v["scenario"]["policies_file"], "p.yaml");
        let back: RunReport = serde_json::from_value(v).expect("deserialises");
        assert_eq!(back, r);
        let plain = serde_json::to_value(run_report()).expect("serialises");
        assert!(plain.get("ratio_of").is_none(), "absent unless set");
        assert!(plain["modes"]["sluice"].get("policy").is_none());
    }

    #[test]
    fn report_json_shape_and_round_trip() {
        let r = run_report();
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["schema_version"], 2);
        assert_eq!(v["scenario"]["traffic"], "udp_stream");
        assert_eq!(v["scenario"]["encryption"], "none");
        // Reports from before the field existed still load, as unencrypted.
        let mut old = v.clone();
        old["scenario"]
            .as_object_mut()
            .expect("scenario object")
            .remove("encryption");
        let back_old: RunReport = serde_json::from_value(old).expect("old report loads");
        assert_eq!(
            back_old.scenario.encryption,
            crate::scenario::Encryption::None
        );
        assert_eq!(v["modes"]["kernel"]["order"], 0);
        assert_eq!(v["modes"]["sluice"]["results"]["sink"]["received"], 990);
        assert!(v["modes"]["sluice"]["results"].get("pingpong").is_none());
        assert_eq!(v["modes"]["sluice"]["metrics"][1]["name"], "rx_pps");
        assert_eq!(v["ratios"][1]["metric"], "rx_pps");
        assert_eq!(v["ratios"][1]["ratio"], 0.99);
        assert_eq!(v["cores"]["workers"][0], 1);
        let back: RunReport = serde_json::from_value(v).expect("deserialises");
        assert_eq!(back, r);
    }

    #[test]
    fn table_has_a_column_per_mode_the_ratio_and_the_warnings() {
        let t = render_table(&run_report());
        let header = t.lines().find(|l| l.starts_with("metric")).expect("header");
        let (k, s) = (
            header.find("kernel").expect("kernel column"),
            header.find("sluice").expect("sluice column"),
        );
        assert!(k < s, "baseline ran first: {header}");
        assert!(header.contains("ratio"));
        let rx = t
            .lines()
            .find(|l| l.starts_with("rx_pps"))
            .expect("rx_pps row");
        assert!(
            rx.contains("higher is better") && rx.contains("0.990"),
            "{rx}"
        );
        let p99 = t
            .lines()
            .find(|l| l.starts_with("one_way_p99_us"))
            .expect("p99 row");
        assert!(
            p99.contains("lower is better") && p99.contains("9.00"),
            "{p99}"
        );
        assert!(t.contains("OVERLAP"), "{t}");
        assert!(t.contains("warning: sluice: 10 of 1000"), "{t}");
        assert!(t.contains("debug build"), "{t}");
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_000_000), "20261118T110640Z");
        assert_eq!(utc_stamp(4_102_444_799), "20991231T235959Z");
    }

    #[test]
    fn worker_cores_from_status() {
        let s = serde_json::json!({"workers": [{"id": 0, "core": 1}, {"id": 1, "core": null}]});
        assert_eq!(worker_cores(&s), vec![Some(1), None]);
        assert!(worker_cores(&serde_json::json!({"nope": 1})).is_empty());
    }
}
