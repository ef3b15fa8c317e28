//! Smoke run of the policy scenario (root): `sluice-perf run pod-to-pod-policy`, one second per
//! mode at 20 000 packets/s: sluice on demo.yaml (policies off), then on policy-perf.yaml
//! (NetworkPolicies isolating both pods). Checks that both modes delivered every packet, that
//! the ratios are policies on / off, and above all that the policies-on run had policies at
//! work, read from the agents' own counters in the report (not only from the runner's summary):
//! flows tracked for policy and the denied probe dropped as `policy_denied_*`, none of either
//! with policies off. An agent that ignored the NetworkPolicies fails this test. No testbed is
//! left behind; the output directory is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Two testbeds up and down plus two seconds of traffic (about 10 s in practice).
const RUN_LIMIT: Duration = Duration::from_secs(120);
const RATE: u64 = 20_000;

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

/// `name`'s value in a `Status` JSON's `totals` (`[[name, value], ...]`).
fn total(status: &serde_json::Value, name: &str) -> u64 {
    status["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|p| p[0] == name).and_then(|p| p[1].as_u64()))
        .unwrap_or(0)
}

/// The policy drops (ingress + egress) in a `Status` JSON's `drops`.
fn policy_drops(status: &serde_json::Value) -> u64 {
    status["drops"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|x| {
                    x["reason"] == "policy_denied_ingress" || x["reason"] == "policy_denied_egress"
                })
                .filter_map(|x| x["count"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn smoke_pod_to_pod_policy_on_vs_off() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    if !binaries_present() {
        eprintln!("skipping: build the agent and CNI first (`cargo build --workspace --bins`)");
        return;
    }
    let instance = format!("polsmoke{}", std::process::id());
    let out = TempDir(std::env::temp_dir().join(format!("sluice-perf-{instance}")));
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .args([
            "run",
            "pod-to-pod-policy",
            "--duration",
            "1",
            "--size",
            "64",
        ])
        .args(["--rate", &RATE.to_string()])
        .args(["--instance", &instance, "--out"])
        .arg(&out.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice-perf");
    // Bounded wait: kill the run (by its pid, through Child) past the limit.
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for sluice-perf") {
            break Some(s);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("sluice-perf output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let status = status.unwrap_or_else(|| panic!("run took over {RUN_LIMIT:?}\n{stderr}"));
    assert!(
        status.success(),
        "sluice-perf run failed\n{stdout}\n{stderr}"
    );

    let dirs: Vec<PathBuf> = std::fs::read_dir(&out.0)
        .expect("output directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let text = std::fs::read_to_string(dirs[0].join("report.json")).expect("report.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{text}");
    let modes: Vec<&String> = r["modes"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(modes, ["sluice", "sluice-policy"], "no kernel mode");
    assert_eq!(r["parameters"]["baseline"], "sluice without policies");
    assert!(
        r["scenario"]["policies_file"]
            .as_str()
            .is_some_and(|f| f.ends_with("policy-perf.yaml")),
        "{text}"
    );

    for (mode, on) in [("sluice", false), ("sluice-policy", true)] {
        let m = &r["modes"][mode];
        // The allowed traffic went through, all of it.
        let sent = m["results"]["gen"]["sent"].as_u64().expect("gen.sent");
        assert_eq!(sent, RATE, "{mode}");
        assert_eq!(
            m["results"]["sink"]["received"].as_u64(),
            Some(sent),
            "{mode}"
        );
        // The agent's own counters, before and after the mode.
        let agent = &m["agents"]["node1"];
        let (before, after) = (&agent["status_before"], &agent["status_after"]);
        assert!(after.is_object(), "{mode}: no agent status\n{text}");
        let flows = total(after, "policy_flows").saturating_sub(total(before, "policy_flows"));
        let denied = policy_drops(after).saturating_sub(policy_drops(before));
        if on {
            assert!(
                flows >= 1,
                "{mode}: no flow tracked for policy: the NetworkPolicies were ignored"
            );
            assert!(
                denied >= 20,
                "{mode}: the probe to port 9999 was not denied ({denied} policy drops)"
            );
        } else {
            assert_eq!(
                (flows, denied),
                (0, 0),
                "{mode}: policy at work without policies"
            );
        }
        // The runner's summary says the same.
        assert_eq!(m["policy"]["policies_on"], on, "{mode}");
        assert_eq!(m["policy"]["policy_flows"], flows, "{mode}");
        assert_eq!(m["policy"]["policy_denied"], denied, "{mode}");
        assert_eq!(m["policy"]["probe_sent"], 20, "{mode}");
    }
    // Ratios: policies on / off, per metric.
    assert!(
        r["ratio_of"]
            .as_str()
            .is_some_and(|s| s.starts_with("sluice-policy / sluice")),
        "{text}"
    );
    let ratios = r["ratios"].as_array().expect("ratios");
    let rx = ratios
        .iter()
        .find(|x| x["metric"] == "rx_pps")
        .unwrap_or_else(|| panic!("no rx_pps ratio: {text}"));
    let on = r["modes"]["sluice-policy"]["metrics"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "rx_pps"))
        .and_then(|x| x["value"].as_f64())
        .expect("rx_pps with policies");
    assert_eq!(rx["sluice"].as_f64(), Some(on));
    assert!(
        stdout.contains("ratio = sluice-policy / sluice"),
        "{stdout}"
    );
    // No testbed left behind.
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&instance),
        "testbed left namespaces behind"
    );
}
