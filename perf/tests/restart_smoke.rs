//! Smoke test of the restart scenario (root): `sluice-perf run pod-to-pod-restart` with
//! `--restart term`, `--restart kill` and `--restart hot`, 2.5 s at 20 000 packets/s each, the
//! agent signalled (hot: the new agent started) 0.8 s in. Checks that the measurement adds up:
//! the report's loss is `sent - received` of the programs' own reports, the restart's instants
//! come in order, the outage (the longest gap) lies between the signal and the new agent's
//! readiness (within `perf::restart::MARGINS`), its packets match its duration at the rate, the
//! flow resumed, and no testbed is left behind. `kill` must lose packets: SIGKILL takes the
//! XDP links with the process, so nothing forwards until the new agent attaches. `hot` must
//! lose less than either cold restart: the program stays attached and what arrives while the
//! workers change waits in the handed-over rings (at this rate and a debug build's pause of
//! about 50 ms, nothing is lost).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use perf::restart::MARGINS;

const RATE_PPS: f64 = 20_000.0;
/// The generator's batch: send timestamps are per batch.
const BATCH: f64 = 32.0;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn binaries_present() -> bool {
    let dir = Path::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    ["sluice", "sluice-cni"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn f(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn u(v: &serde_json::Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a count: {v}"))
}

/// Runs one restart and checks its report; returns the loss.
fn run_once(how: &str, out: &Path, instance: &str) -> u64 {
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .args([
            "run",
            "pod-to-pod-restart",
            "--restart",
            how,
            "--restart-at",
            "0.8",
            "--duration",
            "2.5",
            "--rate",
            "20000",
            "--instance",
            instance,
            "--out",
        ])
        .arg(out)
        .output()
        .expect("run sluice-perf");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "sluice-perf run --restart {how} failed\n{stdout}\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{how}: took {:?}",
        started.elapsed()
    );
    let dir = std::fs::read_dir(out)
        .expect("output directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.join("report.json").is_file()
                && !p.join(".checked").exists()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pod-to-pod-restart-2"))
        })
        .expect("a report for this run");
    std::fs::write(dir.join(".checked"), b"").expect("mark the report as read");
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{text}");
    let modes: Vec<&String> = r["modes"].as_object().expect("modes").keys().collect();
    assert_eq!(modes, ["sluice"], "no kernel baseline for a restart");
    let m = &r["modes"]["sluice"];
    let rs = &m["restart"];
    assert_eq!(rs["how"], how, "{text}");
    assert_eq!(rs["node"], "node1");
    assert_ne!(rs["old_pid"], rs["new_pid"], "a new agent process");
    let t = &rs["times"];
    let (signal, exited, ready) = (
        u(&t["signal_ns"], "signal_ns"),
        u(&t["exited_ns"], "exited_ns"),
        u(&t["ready_ns"], "ready_ns"),
    );
    if how == "hot" {
        // The new agent is ready (it has taken over) before the old one is seen gone.
        assert!(signal < ready && ready <= exited, "{t}");
    } else {
        assert!(signal < exited && exited < ready, "{t}");
    }
    let o = &rs["outcome"];
    let sent = u(&m["results"]["gen"]["sent"], "gen.sent");
    let received = u(&m["results"]["sink"]["received"], "sink.received");
    assert_eq!(u(&o["sent"], "sent"), sent);
    assert_eq!(u(&o["received"], "received"), received);
    let lost = u(&o["lost"], "lost");
    assert_eq!(lost, sent - received, "{o}");
    assert_eq!(sent, 50_000, "2.5 s at 20 kpps");
    let signal_at = f(&o["signal_after_start_ms"], "signal_after_start_ms");
    assert!((750.0..1000.0).contains(&signal_at), "{signal_at} ms");
    assert_eq!(o["resumed"], true, "{o}");
    let outage = u(&o["outage_packets"], "outage_packets");
    assert!(outage <= lost);
    if outage > 0 {
        let start = f(&o["gap_start_after_signal_ms"], "gap start");
        let end = f(&o["gap_end_after_ready_ms"], "gap end");
        assert!(
            start >= -MARGINS.before_signal_ms,
            "{how}: the outage began {start} ms after the signal\n{o}"
        );
        assert!(
            end <= MARGINS.after_ready_ms,
            "{how}: the outage ended {end} ms after the agent was ready\n{o}"
        );
        // Its packets are its time at the rate, to a batch either side.
        let ms = f(&o["outage_ms"], "outage_ms");
        let expected = ms / 1000.0 * RATE_PPS;
        assert!(
            (outage as f64 - expected).abs() <= 2.0 * BATCH + expected * 0.05,
            "{how}: {outage} packets in {ms} ms at {RATE_PPS} pps\n{o}"
        );
    }
    // The table shows the restart's rows.
    for row in ["lost_packets", "outage_ms", "agent_ready_ms"] {
        assert!(stdout.contains(row), "{row} missing\n{stdout}");
    }
    lost
}

#[test]
fn restart_smoke_term_kill_and_hot() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    if !binaries_present() {
        eprintln!("skipping: build the agent and CNI first (`cargo build --workspace --bins`)");
        return;
    }
    let instance = format!("rsmoke{}", std::process::id());
    let out = TempDir(std::env::temp_dir().join(format!("sluice-perf-{instance}")));
    let term = run_once("term", &out.0, &format!("{instance}t"));
    let kill = run_once("kill", &out.0, &format!("{instance}k"));
    let hot = run_once("hot", &out.0, &format!("{instance}h"));
    eprintln!("lost: term {term}, kill {kill}, hot {hot}");
    assert!(
        kill > 0,
        "SIGKILL removes the XDP links: packets must be lost until the new agent attaches"
    );
    assert!(
        hot < term.min(kill),
        "a hot restart keeps the program and the rings: it must lose less than a cold one \
         (hot {hot}, term {term}, kill {kill})"
    );
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&instance),
        "testbed left namespaces behind"
    );
}
