//! The report of a `sluice-perf run`: machine, scenario, parameters, results and the caveats a
//! reader must see next to the numbers. Written as `report.json` (schema versioned) and printed
//! as a table.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::gen::GenReport;
use crate::pingpong::PingReport;
use crate::sink::SinkReport;

/// Bumped when a field changes meaning or disappears.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// Always true on the testbed machines (NOTES.md): said in every report.
pub const SHARED_CPU_CAVEAT: &str = "generator, sink and dataplane share this machine's CPUs; veth runs the \
receiving side's NAPI (XDP program, copy into the UMEM) on the sending CPU, so the generator's CPU also \
carries part of the dataplane's work";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: Option<String>,
    pub nproc: usize,
    pub kernel: Option<String>,
    pub git_commit: Option<String>,
    /// Uncommitted changes in the work tree the binary was built from.
    pub git_dirty: Option<bool>,
}

/// The `model name` of the first CPU in `/proc/cpuinfo` text.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRecord {
    pub name: String,
    pub description: String,
    pub client_pod: String,
    pub server_pod: String,
    pub server_addr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunParameters {
    /// "sluice" or "kernel".
    pub mode: String,
    pub workers: Option<usize>,
    pub cluster_file: String,
    pub frame_bytes: usize,
    pub duration_s: f64,
    pub rate_pps: Option<u64>,
    pub flows: u16,
    pub batch: usize,
    pub gen_cpu: Option<usize>,
    pub sink_cpu: Option<usize>,
    pub pingpong_count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    pub gen: Option<GenReport>,
    pub sink: Option<SinkReport>,
    pub pingpong: Option<PingReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub schema_version: u32,
    pub tool: String,
    pub started_unix_s: u64,
    pub machine: MachineInfo,
    pub scenario: ScenarioRecord,
    pub parameters: RunParameters,
    pub results: RunResults,
    /// What a reader must know to read the numbers: shared CPUs, missed target rate, loss.
    pub caveats: Vec<String>,
    /// Raw `Status` answers of the node's agent; not interpreted here.
    pub agent_status_before: Option<serde_json::Value>,
    pub agent_status_after: Option<serde_json::Value>,
    /// Steps that failed (the run goes on where it can, and says so here).
    pub errors: Vec<String>,
}

/// The caveats that follow from the results.
pub fn caveats(results: &RunResults, nproc: usize) -> Vec<String> {
    let mut c = vec![format!("{SHARED_CPU_CAVEAT} ({nproc} CPUs here).")];
    if let Some(g) = &results.gen {
        if !g.rate_reached {
            c.push(format!(
                "GENERATOR DID NOT REACH ITS TARGET: {:.0} of {} pps; the figures measure the \
                 generator, not the dataplane.",
                g.achieved_pps,
                g.target_pps.unwrap_or(0)
            ));
        }
        if g.target_pps.is_none() {
            c.push("closed loop (no --rate): the generator sends as fast as the socket takes packets; \
                    loss then says the receiving side fell behind."
                .into());
        }
    }
    if let (Some(g), Some(s)) = (&results.gen, &results.sink) {
        let missing = g.sent.saturating_sub(s.seq.received);
        if missing > 0 {
            c.push(format!(
                "{missing} of {} packets sent never reached the sink.",
                g.sent
            ));
        }
    }
    if let Some(p) = &results.pingpong {
        if p.timeouts > 0 {
            c.push(format!("{} ping-pong round trips timed out.", p.timeouts));
        }
    }
    c
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1_000.0)
}

/// The human table.
pub fn render_table(r: &RunReport) -> String {
    let mut t = String::new();
    let m = &r.machine;
    let _ = writeln!(
        t,
        "sluice-perf run {} ({})",
        r.scenario.name, r.scenario.description
    );
    let _ = writeln!(
        t,
        "machine: {} x{} | kernel {} | commit {}{}",
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
        }
    );
    let p = &r.parameters;
    let _ = writeln!(
        t,
        "mode {} workers {} | frame {} B | {} s | rate {} | flows {} | batch {} | gen cpu {} sink cpu {}",
        p.mode,
        p.workers.map_or("-".into(), |w| w.to_string()),
        p.frame_bytes,
        p.duration_s,
        p.rate_pps.map_or("closed loop".into(), |r| format!("{r} pps")),
        p.flows,
        p.batch,
        p.gen_cpu.map_or("-".into(), |c| c.to_string()),
        p.sink_cpu.map_or("-".into(), |c| c.to_string()),
    );
    let _ = writeln!(
        t,
        "{:<10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "packets", "pps", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
    );
    if let Some(g) = &r.results.gen {
        let _ = writeln!(t, "{:<10} {:>12} {:>12.0}", "sent", g.sent, g.achieved_pps);
    }
    if let Some(s) = &r.results.sink {
        let l = &s.latency;
        let _ = writeln!(
            t,
            "{:<10} {:>12} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>9}   (one-way; lost {} reordered {} dup {})",
            "received", s.seq.received, s.rate_pps, us(l.p50_ns), us(l.p90_ns), us(l.p99_ns), us(l.p999_ns), us(l.max_ns),
            s.seq.lost, s.seq.reordered, s.seq.duplicates
        );
    }
    if let Some(pp) = &r.results.pingpong {
        let l = &pp.latency;
        let _ = writeln!(
            t,
            "{:<10} {:>12} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>9}   (round trip; timeouts {})",
            "pingpong",
            pp.received,
            pp.rate_pps,
            us(l.p50_ns),
            us(l.p90_ns),
            us(l.p99_ns),
            us(l.p999_ns),
            us(l.max_ns),
            pp.timeouts
        );
    }
    for c in &r.caveats {
        let _ = writeln!(t, "note: {c}");
    }
    for e in &r.errors {
        let _ = writeln!(t, "error: {e}");
    }
    t
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

    fn gen(rate_reached: bool) -> GenReport {
        GenReport {
            kind: "gen".into(),
            dst: "10.0.0.2:9000".into(),
            frame_bytes: 64,
            payload_bytes: 18,
            flows: 1,
            batch: 32,
            sent: 1000,
            send_errors: 0,
            duration_ns: 1_000_000_000,
            achieved_pps: 1000.0,
            target_pps: Some(if rate_reached { 1000 } else { 5000 }),
            rate_reached,
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
                p99_ns: 9_000,
                ..Default::default()
            },
            stopped_by: StopReason::IdleTimeout,
            histogram: None,
        }
    }

    fn report(results: RunResults) -> RunReport {
        RunReport {
            schema_version: REPORT_SCHEMA_VERSION,
            tool: "sluice-perf".into(),
            started_unix_s: 1,
            machine: MachineInfo {
                nproc: 2,
                ..Default::default()
            },
            scenario: ScenarioRecord {
                name: "pod-to-pod".into(),
                description: "d".into(),
                client_pod: "default/pod-a".into(),
                server_pod: "default/pod-b".into(),
                server_addr: "10.0.0.2:9000".into(),
            },
            parameters: RunParameters {
                mode: "kernel".into(),
                workers: None,
                cluster_file: "c.yaml".into(),
                frame_bytes: 64,
                duration_s: 1.0,
                rate_pps: Some(1000),
                flows: 1,
                batch: 32,
                gen_cpu: Some(0),
                sink_cpu: Some(1),
                pingpong_count: 100,
            },
            results,
            caveats: vec![],
            agent_status_before: None,
            agent_status_after: Some(serde_json::json!({"anything": [1, 2]})),
            errors: vec![],
        }
    }

    #[test]
    fn cpu_model_is_parsed() {
        let text =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t: x\n";
        assert_eq!(parse_cpu_model(text).as_deref(), Some("AMD EPYC 9R14"));
        assert_eq!(parse_cpu_model("nothing here"), None);
    }

    #[test]
    fn caveats_always_state_shared_cpus_and_flag_missed_rate_and_loss() {
        let ok = caveats(
            &RunResults {
                gen: Some(gen(true)),
                sink: Some(sink(1000)),
                pingpong: None,
            },
            2,
        );
        assert_eq!(ok.len(), 1);
        assert!(ok[0].contains("share") && ok[0].contains("2 CPUs"));
        let bad = caveats(
            &RunResults {
                gen: Some(gen(false)),
                sink: Some(sink(990)),
                pingpong: None,
            },
            2,
        );
        assert!(bad.iter().any(|c| c.contains("DID NOT REACH")));
        assert!(bad.iter().any(|c| c.contains("10 of 1000")));
    }

    #[test]
    fn json_shape() {
        let r = report(RunResults {
            gen: Some(gen(true)),
            sink: Some(sink(1000)),
            pingpong: None,
        });
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["machine"]["nproc"], 2);
        assert_eq!(v["scenario"]["name"], "pod-to-pod");
        assert_eq!(v["parameters"]["rate_pps"], 1000);
        assert_eq!(v["results"]["gen"]["rate_reached"], true);
        assert_eq!(v["results"]["gen"]["stopped_by"], "count");
        // Sequence and latency fields are flat in the sink's object.
        assert_eq!(v["results"]["sink"]["received"], 1000);
        assert_eq!(v["results"]["sink"]["lost"], 0);
        assert_eq!(v["results"]["sink"]["p50_ns"], 5000);
        assert_eq!(v["results"]["sink"]["p99_ns"], 9000);
        assert_eq!(v["results"]["sink"]["latency_samples"], 1000);
        assert!(v["results"]["sink"].get("histogram").is_none());
        assert!(v["results"]["pingpong"].is_null());
        assert_eq!(v["agent_status_after"]["anything"][1], 2);
        let back: RunReport = serde_json::from_value(v).expect("deserialises");
        assert_eq!(back, r);
    }

    #[test]
    fn table_shows_results_and_caveats() {
        let mut r = report(RunResults {
            gen: Some(gen(false)),
            sink: Some(sink(990)),
            pingpong: None,
        });
        r.caveats = caveats(&r.results, 2);
        let t = render_table(&r);
        assert!(t.contains("received"), "{t}");
        assert!(t.contains("990"), "{t}");
        assert!(t.contains("5.0"), "{t}");
        assert!(t.contains("DID NOT REACH"), "{t}");
    }
}
