//! The smoke run of `make test` (root): `sluice-perf run pod-to-pod` with the kernel baseline,
//! one second per mode at 20 000 packets/s. Checks that the report holds both modes, their
//! figures and the ratios, that nothing was lost at that rate, that the interval logs and the
//! plot exist and parse, and that no testbed is left behind. The output directory is removed on
//! drop; the testbeds remove themselves (also when the run fails).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;

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

/// Checks an HdrHistogram interval log: `#` comment lines, a `StartTime` or `BaseTime`, and at
/// least one record `[Tag=T,]start,length,max,BASE64` whose histogram decodes. Returns the tags.
fn check_hlog(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        text.lines()
            .any(|l| l.starts_with("#[StartTime: ") || l.starts_with("#[BaseTime: ")),
        "{}: no StartTime/BaseTime header\n{text}",
        path.display()
    );
    let mut tags = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.starts_with('"') || line.trim().is_empty() {
            continue;
        }
        let (tag, rest) = match line.strip_prefix("Tag=") {
            Some(r) => {
                let (t, rest) = r.split_once(',').expect("tag then fields");
                (t.to_string(), rest)
            }
            None => (String::new(), line),
        };
        let fields: Vec<&str> = rest.split(',').collect();
        assert_eq!(fields.len(), 4, "{}: record {line:?}", path.display());
        for f in &fields[..3] {
            f.parse::<f64>()
                .unwrap_or_else(|e| panic!("{}: {f:?} in {line:?}: {e}", path.display()));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(fields[3])
            .unwrap_or_else(|e| panic!("{}: record is not base64: {e}", path.display()));
        let h: hdrhistogram::Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .unwrap_or_else(|e| panic!("{}: not an HdrHistogram: {e}", path.display()));
        assert!(
            !h.is_empty(),
            "{}: empty histogram for {tag:?}",
            path.display()
        );
        tags.push(tag);
    }
    assert!(!tags.is_empty(), "{}: no records\n{text}", path.display());
    tags
}

#[test]
fn smoke_pod_to_pod_with_baseline() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    if !binaries_present() {
        eprintln!("skipping: build the agent and CNI first (`cargo build --workspace --bins`)");
        return;
    }
    let instance = format!("smoke{}", std::process::id());
    let out = TempDir(std::env::temp_dir().join(format!("sluice-perf-smoke-{instance}")));
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_sluice-perf"))
        .args([
            "run",
            "pod-to-pod",
            "--duration",
            "1",
            "--size",
            "64",
            "--rate",
            "20000",
        ])
        .args(["--instance", &instance, "--out"])
        .arg(&out.0)
        .output()
        .expect("run sluice-perf");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "sluice-perf run failed\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "smoke run took {:?}",
        started.elapsed()
    );
    let dirs: Vec<PathBuf> = std::fs::read_dir(&out.0)
        .expect("output directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = &dirs[0];
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    assert!(
        name.as_deref()
            .is_some_and(|n| n.starts_with("pod-to-pod-2")),
        "{name:?}"
    );
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    assert!(stdout.contains("report.json"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    assert_eq!(r["schema_version"], 2);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{text}");
    assert!(r["machine"]["nproc"].as_u64().unwrap_or(0) > 0);
    assert!(r["machine"]["kernel"].is_string());
    assert_eq!(r["parameters"]["rate_pps"], 20_000);
    for mode in ["kernel", "sluice"] {
        let m = &r["modes"][mode];
        assert_eq!(m["mode"], mode, "{text}");
        let sent = m["results"]["gen"]["sent"].as_u64().expect("gen.sent");
        assert_eq!(sent, 20_000, "{mode}");
        assert_eq!(
            m["results"]["sink"]["received"].as_u64(),
            Some(sent),
            "{mode}"
        );
        assert_eq!(m["results"]["sink"]["lost"].as_u64(), Some(0), "{mode}");
        let metric = |name: &str| {
            m["metrics"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == name))
                .and_then(|x| x["value"].as_f64())
        };
        assert_eq!(metric("loss_pct"), Some(0.0), "{mode}");
        assert!(metric("one_way_p50_us").unwrap_or(0.0) > 0.0, "{mode}");
    }
    let cores = &r["modes"]["sluice"]["agents"]["node1"]["worker_cores"];
    assert_eq!(cores.as_array().map(Vec::len), Some(1), "{text}");
    // Ratios for throughput and every latency percentile, each with its direction.
    let ratios = r["ratios"].as_array().expect("ratios");
    for (metric, better) in [
        ("rx_pps", "higher"),
        ("one_way_p50_us", "lower"),
        ("one_way_p90_us", "lower"),
        ("one_way_p99_us", "lower"),
        ("one_way_p999_us", "lower"),
    ] {
        let x = ratios
            .iter()
            .find(|x| x["metric"] == metric)
            .unwrap_or_else(|| panic!("no ratio for {metric}: {text}"));
        assert_eq!(x["better"], better, "{metric}");
        let (s, b) = (
            x["sluice"].as_f64().unwrap_or(0.0),
            x["baseline"].as_f64().unwrap_or(0.0),
        );
        let ratio = x["ratio"].as_f64().expect("defined ratio");
        assert!((ratio - s / b).abs() < 1e-9, "{metric}: {x}");
    }
    assert!(r["warnings"]
        .as_array()
        .is_some_and(|w| w.iter().any(|x| x.as_str().unwrap_or("").contains("share"))));
    // Exports: the one-way latency log has both modes; the plot is SVG.
    let files: Vec<&str> = r["files"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    assert!(files.contains(&"one-way.hlog"), "{files:?}");
    assert!(files.contains(&"latency.svg"), "{files:?}");
    let mut tags = check_hlog(&dir.join("one-way.hlog"));
    tags.sort();
    assert_eq!(tags, ["kernel", "sluice"]);
    for f in files.iter().filter(|f| f.ends_with(".hlog")) {
        check_hlog(&dir.join(f));
    }
    let svg = std::fs::read_to_string(dir.join("latency.svg")).expect("latency.svg");
    // An XML declaration may come first; the root element is <svg>.
    let body = svg.trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map_or("", |(_, b)| b).trim_start(),
        None => body,
    };
    assert!(body.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    // No testbed left behind: no namespace carries the instance name.
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&instance),
        "testbed left namespaces behind"
    );
}
