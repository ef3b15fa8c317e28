//! End-to-end generator -> sink and ping-pong runs: over loopback (in-process, threads) and
//! between two network namespaces joined by a veth pair (the `sluice-perf` binary run with
//! `ip netns exec`). The namespace test needs root; every name is unique (pid + counter) and
//! removed on drop, every child is killed by pid on drop, every wait is bounded.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use perf::gen::{run_gen, GenConfig, GenReport, StopReason};
use perf::hist::LatencySummary;
use perf::pingpong::{PingReport, PingServerConfig};
use perf::sink::{SinkConfig, SinkReport};

const PACKETS: u64 = 20_000;
const RATE_PPS: u64 = 100_000;
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique() -> String {
    format!(
        "{}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn assert_ordered(l: &LatencySummary) {
    assert!(l.count > 0, "{l:?}");
    assert!(
        l.min_ns > 0 && l.p50_ns > 0,
        "latency should be non-zero: {l:?}"
    );
    assert!(l.min_ns <= l.p50_ns, "{l:?}");
    assert!(l.p50_ns <= l.p90_ns && l.p90_ns <= l.p99_ns, "{l:?}");
    assert!(l.p99_ns <= l.p999_ns && l.p999_ns <= l.max_ns, "{l:?}");
    assert!(l.max_ns < 2_000_000_000, "latency above 2 s: {l:?}");
}

fn assert_complete(g: &GenReport, s: &SinkReport) {
    assert_eq!(g.sent, PACKETS, "{g:?}");
    assert_eq!(g.stopped_by, StopReason::Count, "{g:?}");
    assert_eq!(s.seq.received, g.sent, "{s:?}");
    assert_eq!(s.seq.lost, 0, "{s:?}");
    assert_eq!(s.seq.duplicates, 0, "{s:?}");
    assert_eq!(s.malformed, 0, "{s:?}");
    assert_eq!(s.latency.count, g.sent, "{s:?}");
    assert_ordered(&s.latency);
}

#[test]
fn loopback_gen_to_sink_and_pingpong() {
    let sink_sock =
        perf::sink::bind_sink(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind sink");
    let Ok(std::net::SocketAddr::V4(bound)) = sink_sock.local_addr() else {
        panic!("sink bound to a non-IPv4 address");
    };
    let sink_cfg = SinkConfig {
        bind: bound,
        duration: Duration::from_secs(4),
        idle_timeout: Duration::from_millis(500),
        expect: Some(PACKETS),
        batch: 64,
        cpu: None,
        include_histogram: true,
        ready_file: None,
    };
    let sink = std::thread::spawn(move || perf::sink::run_sink_on(&sink_sock, &sink_cfg));
    let g = run_gen(&GenConfig {
        dst: bound,
        frame_bytes: 64,
        count: PACKETS,
        duration: Duration::from_secs(2),
        rate_pps: Some(RATE_PPS),
        flows: 4,
        batch: 32,
        cpu: None,
    })
    .expect("generator runs");
    let s = sink.join().expect("sink thread").expect("sink runs");
    assert_complete(&g, &s);
    assert_eq!(s.flows, 4);
    assert_eq!(s.stopped_by, StopReason::Expected);
    assert!(
        g.rate_reached,
        "100 kpps over loopback should be reachable: {g:?}"
    );
    let h = perf::hist::LatencyHistogram::from_base64(
        s.histogram.as_deref().expect("histogram requested"),
    )
    .expect("histogram decodes");
    assert_eq!(h.summary(), s.latency);

    let server_sock = perf::pingpong::bind_server(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .expect("bind ping-pong server");
    let Ok(std::net::SocketAddr::V4(server_addr)) = server_sock.local_addr() else {
        panic!("server bound to a non-IPv4 address");
    };
    let server_cfg = PingServerConfig {
        bind: server_addr,
        duration: Duration::from_secs(3),
        cpu: None,
    };
    let server =
        std::thread::spawn(move || perf::pingpong::run_server_on(&server_sock, &server_cfg));
    let p = perf::pingpong::run_pingpong(&perf::pingpong::PingConfig {
        dst: server_addr,
        frame_bytes: 1400,
        count: 1_000,
        duration: Duration::from_secs(2),
        reply_timeout: Duration::from_millis(200),
        cpu: None,
        include_histogram: false,
        rate_pps: None,
    })
    .expect("ping-pong runs");
    assert_eq!((p.sent, p.received, p.timeouts), (1_000, 1_000, 0), "{p:?}");
    assert_ordered(&p.latency);
    // Open loop: 2000 requests at 10 000/s, every reply matched by its sequence number.
    let o = perf::pingpong::run_pingpong(&perf::pingpong::PingConfig {
        dst: server_addr,
        frame_bytes: 64,
        count: 2_000,
        duration: Duration::from_secs(2),
        reply_timeout: Duration::from_millis(200),
        cpu: None,
        include_histogram: true,
        rate_pps: Some(10_000),
    })
    .expect("open-loop ping-pong runs");
    assert_eq!(
        (o.sent, o.received, o.lost, o.duplicates),
        (2_000, 2_000, 0, 0),
        "{o:?}"
    );
    assert_eq!(o.target_pps, Some(10_000));
    assert!(o.rate_reached, "{o:?}");
    assert!(
        o.duration_ns >= 190_000_000,
        "2000 at 10k/s take ~0.2 s: {o:?}"
    );
    assert_eq!(o.latency.count, 2_000);
    assert_ordered(&o.latency);
    let served = server.join().expect("server thread").expect("server runs");
    assert_eq!(served.served, 3_000);
}

/// Two namespaces joined by a veth pair; deleted (with the veth) on drop.
struct NetnsPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetnsPair {
    fn new(id: &str, a_ip: &str, b_ip: &str) -> Self {
        let pair = Self {
            a: format!("spa{id}"),
            b: format!("spb{id}"),
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        let (va, vb) = (format!("spva{id}"), format!("spvb{id}"));
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        for (ns, dev, addr) in [(&pair.a, &va, a_ip), (&pair.b, &vb, b_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Kid(Child);

impl Kid {
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "child still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_in(ns: &str, args: &[&str]) -> Kid {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_sluice-perf")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sluice-perf in a namespace");
    Kid(child)
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).expect("read a --json-out file");
    serde_json::from_str(text.trim()).expect("parse a --json-out file")
}

#[test]
fn netns_pair_gen_to_sink_and_pingpong() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let id = unique();
    let tmp = TempDir(std::env::temp_dir().join(format!("sluice-perf-test-{id}")));
    std::fs::create_dir_all(&tmp.0).expect("create temp dir");
    let f = |n: &str| tmp.0.join(n).display().to_string();
    let pair = NetnsPair::new(&id, "10.254.77.1", "10.254.77.2");

    let mut sink = spawn_in(
        &pair.b,
        &[
            "sink",
            "--bind",
            "10.254.77.2:9000",
            "--duration",
            "4",
            "--expect",
            &PACKETS.to_string(),
            "--histogram",
            "--ready-file",
            &f("sink.ready"),
            "--json-out",
            &f("sink.json"),
        ],
    );
    wait_for(Path::new(&f("sink.ready")));
    let mut gen = spawn_in(
        &pair.a,
        &[
            "gen",
            "--dst",
            "10.254.77.2:9000",
            "--size",
            "64",
            "--count",
            &PACKETS.to_string(),
            "--duration",
            "2",
            "--rate",
            &RATE_PPS.to_string(),
            "--flows",
            "2",
            "--json-out",
            &f("gen.json"),
        ],
    );
    assert!(gen.wait(Duration::from_secs(10)).success());
    assert!(sink.wait(Duration::from_secs(10)).success());
    let g: GenReport = read(Path::new(&f("gen.json")));
    let s: SinkReport = read(Path::new(&f("sink.json")));
    assert_complete(&g, &s);
    assert_eq!(s.flows, 2);

    let mut server = spawn_in(
        &pair.b,
        &[
            "pingpong-server",
            "--bind",
            "10.254.77.2:9001",
            "--duration",
            "3",
            "--ready-file",
            &f("pp.ready"),
        ],
    );
    wait_for(Path::new(&f("pp.ready")));
    let mut client = spawn_in(
        &pair.a,
        &[
            "pingpong",
            "--dst",
            "10.254.77.2:9001",
            "--count",
            "1000",
            "--duration",
            "2",
            "--size",
            "64",
            "--json-out",
            &f("pp.json"),
        ],
    );
    assert!(client.wait(Duration::from_secs(10)).success());
    let p: PingReport = read(Path::new(&f("pp.json")));
    assert_eq!((p.sent, p.received, p.timeouts), (1_000, 1_000, 0), "{p:?}");
    assert_ordered(&p.latency);
    assert!(server.wait(Duration::from_secs(10)).success());
}
