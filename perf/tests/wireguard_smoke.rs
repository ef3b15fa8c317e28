//! Smoke run of the encrypted cross-node scenario (root): `sluice-perf run node-to-node-wg-rr`,
//! one second per mode, wireguard-go (kernel-wireguard nodes) as the baseline and the sluice
//! agents in WireGuard strict mode. Checks that both modes produced round trips without errors,
//! that each mode's `encryption.json` shows the client's node sealing and the server's node
//! opening during the traffic (so the figures are of an encrypted path), and that no testbed is
//! left behind. The output directory is removed on drop; the testbeds remove themselves.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Two testbeds up and down plus two seconds of traffic; far less in practice (~15 s).
const RUN_LIMIT: Duration = Duration::from_secs(120);

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

fn tools_present() -> bool {
    ["wireguard-go", "wg"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn smoke_node_to_node_wg_rr_against_wireguard_go() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    if !binaries_present() {
        eprintln!("skipping: build the agent and CNI first (`cargo build --workspace --bins`)");
        return;
    }
    if !tools_present() {
        eprintln!("skipping: needs wireguard-go and wg (Debian: wireguard-go wireguard-tools)");
        return;
    }
    let instance = format!("wgsmoke{}", std::process::id());
    let out = TempDir(std::env::temp_dir().join(format!("sluice-perf-{instance}")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .args([
            "run",
            "node-to-node-wg-rr",
            "--duration",
            "1",
            "--size",
            "64",
        ])
        .args(["--instance", &instance, "--out"])
        .arg(&out.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice-perf");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for sluice-perf").is_some() {
            break;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice-perf ran longer than {RUN_LIMIT:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = child.wait_with_output().expect("sluice-perf output");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "sluice-perf run failed\n{stdout}\n{stderr}"
    );
    let dirs: Vec<PathBuf> = std::fs::read_dir(&out.0)
        .expect("output directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = &dirs[0];
    let report = read_json(&dir.join("report.json"));
    assert_eq!(report["scenario"]["name"], "node-to-node-wg-rr");
    assert_eq!(
        report["errors"].as_array().map(Vec::len),
        Some(0),
        "{report:#}"
    );
    for mode in ["kernel", "sluice"] {
        let m = &report["modes"][mode];
        let trips = m["results"]["pingpong"]["received"].as_u64().unwrap_or(0);
        assert!(trips > 100, "{mode}: {trips} round trips\n{m:#}");
        let enc = read_json(&dir.join(mode).join("encryption.json"));
        let during = &enc["during"];
        let (sealed, opened) = (
            during["node1"]["tx_bytes"].as_u64().unwrap_or(0),
            during["node2"]["rx_bytes"].as_u64().unwrap_or(0),
        );
        // Every request crossed in WireGuard: at least one encrypted VXLAN packet (> 100 B for
        // a 64 B frame) per round trip, each way.
        assert!(
            sealed > trips * 100,
            "{mode}: node1 sealed {sealed} B for {trips} trips"
        );
        assert!(
            opened > trips * 64,
            "{mode}: node2 opened {opened} B for {trips} trips"
        );
        if mode == "sluice" {
            let packets = during["node1"]["tx_packets"].as_u64().unwrap_or(0);
            assert!(
                packets >= trips,
                "sluice sealed {packets} packets for {trips} trips"
            );
        }
    }
    // The sluice agents ran in strict mode (no clear-text fallback), as the scenario asks.
    let agents = &report["modes"]["sluice"]["agents"];
    for node in ["node1", "node2"] {
        let wg = &agents[node]["status_after"]["wireguard"];
        assert_eq!(wg["strict"], true, "{node}: {wg:#}");
    }
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&instance),
        "testbed left namespaces behind"
    );
}
