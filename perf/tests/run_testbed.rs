//! `sluice-perf run pod-to-pod` end to end on the testbed (root): brings up the demo cluster
//! under a unique instance name, measures, tears it down, and writes a report.json whose numbers
//! add up. The testbed removes its namespaces itself (also when the run fails); the output
//! directory is removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

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

fn run_mode(mode: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    if !binaries_present() {
        eprintln!("skipping: build the agent and CNI first (`cargo build -p control`)");
        return;
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let instance = format!("pt{}-{n}", std::process::id());
    let out = TempDir(std::env::temp_dir().join(format!("sluice-perf-run-{instance}")));
    let cluster = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters/demo.yaml");
    let status = Command::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .args([
            "run",
            "pod-to-pod",
            "--mode",
            mode,
            "--duration",
            "1",
            "--rate",
            "20000",
            "--pingpong-count",
            "500",
        ])
        .args(["--instance", &instance, "--out"])
        .arg(&out.0)
        .arg("--cluster")
        .arg(&cluster)
        .status()
        .expect("run sluice-perf");
    assert!(status.success(), "sluice-perf run --mode {mode} failed");
    let report_path = out
        .0
        .join(format!("pod-to-pod-{instance}"))
        .join("report.json");
    let text = std::fs::read_to_string(&report_path).expect("report.json written");
    let r: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["parameters"]["mode"], mode);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{text}");
    let sent = r["results"]["gen"]["sent"].as_u64().expect("gen.sent");
    assert_eq!(sent, 20_000);
    assert_eq!(
        r["results"]["sink"]["received"].as_u64(),
        Some(sent),
        "{text}"
    );
    assert_eq!(r["results"]["sink"]["lost"].as_u64(), Some(0));
    assert!(r["results"]["sink"]["p50_ns"].as_u64().unwrap_or(0) > 0);
    assert_eq!(r["results"]["pingpong"]["received"].as_u64(), Some(500));
    assert!(r["caveats"][0].as_str().unwrap_or("").contains("share"));
    assert_eq!(r["agent_status_after"].is_null(), mode == "kernel");
    assert!(r["machine"]["nproc"].as_u64().unwrap_or(0) > 0);
    // The testbed is gone: no namespace carries the instance name.
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&instance),
        "testbed left namespaces behind"
    );
}

#[test]
fn run_pod_to_pod_kernel_mode() {
    run_mode("kernel");
}

#[test]
fn run_pod_to_pod_sluice_mode() {
    run_mode("sluice");
}
