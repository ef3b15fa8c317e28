//! Prometheus text exposition (format 0.0.4) of the agent's state, and the tiny HTTP server
//! that serves it with `/healthz` and `/readyz`.
//!
//! Everything the workers count is exported: every scalar counter of
//! [`dataplane::stats::Counters`] per worker, every drop reason per worker (zeros included), the
//! XDP program's actions per interface, the kernel's AF_XDP ring statistics per queue, the
//! free-frame gauge, the snapshot generation per worker, and the pipeline latency histograms
//! (per batch, per packet, packets per batch) as Prometheus histograms.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    sync::mpsc,
    time::Duration,
};

use dataplane::{latency::LatencyHistograms, runtime::WorkerReport, DropReason};
use hdrhistogram::Histogram;

use crate::status::{ApiStatus, InterfaceStatus, WgStatus};

/// Upper bounds (seconds) of the duration histograms' buckets.
pub const DURATION_BUCKETS_S: [f64; 16] = [
    50e-9, 100e-9, 250e-9, 500e-9, 1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 10e-3, 100e-3,
];
/// Upper bounds of the packets-per-batch histogram's buckets.
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// What one scrape shows.
pub struct Snapshot<'a> {
    pub node: &'a str,
    pub generation: u64,
    pub source_error: bool,
    pub endpoints: usize,
    pub workers: &'a [WorkerReport],
    pub interfaces: &'a [InterfaceStatus],
    /// Per worker, in `workers` order.
    pub histograms: Option<&'a [LatencyHistograms]>,
    /// Network programming latency in microseconds: a change of cluster state seen by the
    /// source -> every worker running the snapshot generation that carries it.
    pub programming: Option<&'a Histogram<u64>>,
    /// WireGuard between nodes, when on.
    pub wireguard: Option<&'a WgStatus>,
    /// `--source kubernetes`: the API server as the source sees it.
    pub api: Option<&'a ApiStatus>,
}

/// Buckets of `sluice_network_programming_duration_seconds`: 1 ms doubling to 16 s (kube-proxy's
/// metric of the same name starts at 250 ms: it also counts the API server and the informer).
pub const PROGRAMMING_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &Histogram<u64>,
    bounds: &[f64],
    scale: f64,
) {
    // Cumulative counts at each bound; HDR values are integers in `1/scale` units.
    for b in bounds {
        let limit = (b / scale).round() as u64;
        let count = if limit == 0 {
            0
        } else {
            h.count_between(0, limit)
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.len());
    let sum = h.mean() * h.len() as f64 * scale;
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.len());
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders one scrape.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let node = esc(s.node);
    header(
        &mut out,
        "sluice_up",
        "gauge",
        "1 while the agent's control loop answers.",
    );
    let _ = writeln!(out, "sluice_up{{node=\"{node}\"}} 1");
    header(
        &mut out,
        "sluice_source_error",
        "gauge",
        "1 when the cluster source is broken and the last good state runs.",
    );
    let _ = writeln!(
        out,
        "sluice_source_error{{node=\"{node}\"}} {}",
        u8::from(s.source_error)
    );
    header(
        &mut out,
        "sluice_endpoints",
        "gauge",
        "Pod endpoints attached on this node.",
    );
    let _ = writeln!(out, "sluice_endpoints{{node=\"{node}\"}} {}", s.endpoints);
    header(
        &mut out,
        "sluice_snapshot_generation",
        "gauge",
        "Snapshot generation published by control.",
    );
    let _ = writeln!(
        out,
        "sluice_snapshot_generation{{node=\"{node}\"}} {}",
        s.generation
    );
    if let Some(a) = s.api {
        render_api(&mut out, &node, a);
    }
    if let Some(w) = s.wireguard {
        render_wireguard(&mut out, &node, w);
    }
    if let Some(h) = s.programming {
        header(
            &mut out,
            "sluice_network_programming_duration_seconds",
            "histogram",
            "Time from a cluster state change seen by the source (file or Kubernetes API) to every worker running the snapshot that carries it (as kube-proxy's network_programming_duration_seconds).",
        );
        histogram(
            &mut out,
            "sluice_network_programming_duration_seconds",
            &format!("node=\"{node}\""),
            h,
            &PROGRAMMING_BUCKETS,
            1e-6,
        );
    }
    header(
        &mut out,
        "sluice_worker_snapshot_generation",
        "gauge",
        "Snapshot generation each worker runs.",
    );
    for w in s.workers {
        let _ = writeln!(
            out,
            "sluice_worker_snapshot_generation{{worker=\"{}\"}} {}",
            w.id, w.generation
        );
    }
    header(
        &mut out,
        "sluice_worker_frames_free",
        "gauge",
        "UMEM frames in the worker's free list.",
    );
    for w in s.workers {
        let _ = writeln!(
            out,
            "sluice_worker_frames_free{{worker=\"{}\"}} {}",
            w.id, w.free_frames
        );
    }
    header(
        &mut out,
        "sluice_worker_frames",
        "gauge",
        "UMEM frames the worker owns.",
    );
    for w in s.workers {
        let _ = writeln!(
            out,
            "sluice_worker_frames{{worker=\"{}\"}} {}",
            w.id, w.total_frames
        );
    }
    // Gauges among the worker's fields: the conntrack fill level and size (per worker).
    for (name, metric, help) in [
        (
            "ct_entries",
            "sluice_conntrack_entries",
            "Conntrack entries in use (live or expired, not yet reclaimed).",
        ),
        (
            "ct_capacity",
            "sluice_conntrack_capacity",
            "Conntrack entries the worker's table holds.",
        ),
    ] {
        header(&mut out, metric, "gauge", help);
        for w in s.workers {
            let v = w
                .counters
                .values()
                .into_iter()
                .find(|(k, _)| *k == name)
                .map_or(0, |(_, v)| v);
            let _ = writeln!(out, "{metric}{{worker=\"{}\"}} {v}", w.id);
        }
    }
    for name in dataplane::stats::Counters::NAMES {
        if matches!(*name, "ct_entries" | "ct_capacity") {
            continue;
        }
        let metric = format!("sluice_{name}_total");
        header(
            &mut out,
            &metric,
            "counter",
            &format!("Worker counter {name}."),
        );
        for w in s.workers {
            let v = w
                .counters
                .values()
                .into_iter()
                .find(|(k, _)| k == name)
                .map_or(0, |(_, v)| v);
            let _ = writeln!(out, "{metric}{{worker=\"{}\"}} {v}", w.id);
        }
    }
    header(
        &mut out,
        "sluice_drops_total",
        "counter",
        "Packets dropped, by numbered reason.",
    );
    for w in s.workers {
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "sluice_drops_total{{worker=\"{}\",reason=\"{}\",number=\"{}\"}} {}",
                w.id,
                r.as_str(),
                r as u8,
                w.counters.drops[r as usize]
            );
        }
    }
    header(
        &mut out,
        "sluice_xdp_actions_total",
        "counter",
        "What the XDP program did, per interface.",
    );
    for i in s.interfaces {
        for (action, v) in &i.xdp {
            let _ = writeln!(
                out,
                "sluice_xdp_actions_total{{interface=\"{}\",action=\"{}\"}} {v}",
                esc(&i.name),
                esc(action)
            );
        }
    }
    for (metric, help) in [
        (
            "sluice_xsk_rx_dropped_total",
            "Kernel AF_XDP rx_dropped per socket.",
        ),
        (
            "sluice_xsk_rx_ring_full_total",
            "Kernel AF_XDP rx_ring_full per socket.",
        ),
        (
            "sluice_xsk_rx_fill_ring_empty_total",
            "Kernel AF_XDP rx_fill_ring_empty_descs per socket.",
        ),
        (
            "sluice_xsk_tx_ring_empty_total",
            "Kernel AF_XDP tx_ring_empty_descs per socket.",
        ),
    ] {
        header(&mut out, metric, "counter", help);
        for i in s.interfaces {
            for q in &i.queues {
                let v = match metric {
                    "sluice_xsk_rx_dropped_total" => q.kernel_rx_dropped,
                    "sluice_xsk_rx_ring_full_total" => q.kernel_rx_ring_full,
                    "sluice_xsk_rx_fill_ring_empty_total" => q.kernel_rx_fill_ring_empty,
                    _ => q.kernel_tx_ring_empty,
                };
                let _ = writeln!(
                    out,
                    "{metric}{{interface=\"{}\",queue=\"{}\",worker=\"{}\"}} {v}",
                    esc(&i.name),
                    q.queue,
                    q.worker
                );
            }
        }
    }
    if let Some(hists) = s.histograms {
        let ns = 1e-9;
        header(
            &mut out,
            "sluice_pipeline_batch_duration_seconds",
            "histogram",
            "Time per batch with frames (rx to tx published), from the TSC.",
        );
        for (w, h) in s.workers.iter().zip(hists) {
            histogram(
                &mut out,
                "sluice_pipeline_batch_duration_seconds",
                &format!("worker=\"{}\"", w.id),
                &h.batch_ns,
                &DURATION_BUCKETS_S,
                ns,
            );
        }
        header(
            &mut out,
            "sluice_pipeline_packet_duration_seconds",
            "histogram",
            "Time per packet (batch time / frames), weighted by frames.",
        );
        for (w, h) in s.workers.iter().zip(hists) {
            histogram(
                &mut out,
                "sluice_pipeline_packet_duration_seconds",
                &format!("worker=\"{}\"", w.id),
                &h.packet_ns,
                &DURATION_BUCKETS_S,
                ns,
            );
        }
        header(
            &mut out,
            "sluice_pipeline_batch_packets",
            "histogram",
            "Frames per batch.",
        );
        for (w, h) in s.workers.iter().zip(hists) {
            histogram(
                &mut out,
                "sluice_pipeline_batch_packets",
                &format!("worker=\"{}\"", w.id),
                &h.batch_packets,
                &BATCH_BUCKETS,
                1.0,
            );
        }
    }
    out
}

/// One sample line per `(name, kind, help, value)` with the node's label.
fn node_samples(out: &mut String, node: &str, samples: &[(&str, &str, &str, u64)]) {
    for (name, kind, help, value) in samples {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name}{{node=\"{node}\"}} {value}");
    }
}

/// The Kubernetes source: connected, synced, relists, skipped objects.
fn render_api(out: &mut String, node: &str, a: &ApiStatus) {
    node_samples(
        out,
        node,
        &[
            (
                "sluice_api_connected",
                "gauge",
                "1 while the API server answers the source's requests.",
                u64::from(a.connected),
            ),
            (
                "sluice_api_synced",
                "gauge",
                "1 once every kind finished a list: the state in force is the API server's.",
                u64::from(a.all_synced),
            ),
            (
                "sluice_api_kinds_synced",
                "gauge",
                "Kinds whose watcher finished its list.",
                a.kinds_synced.len() as u64,
            ),
            (
                "sluice_api_relists_total",
                "counter",
                "Lists after the first (410 Gone, reconnections).",
                a.relists,
            ),
            (
                "sluice_api_skipped_objects_total",
                "counter",
                "Objects skipped because they did not decode or were invalid.",
                a.skipped_objects,
            ),
        ],
    );
}

/// A per-peer WireGuard sample: name, kind, help, and its value for a peer (`None`: no sample).
type PeerSample = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::status::WgPeerStatus) -> Option<u64>,
);

/// WireGuard: handshakes and, per peer, the session and the traffic sealed and opened.
fn render_wireguard(out: &mut String, node: &str, w: &WgStatus) {
    node_samples(
        out,
        node,
        &[
            (
                "sluice_wireguard_peers",
                "gauge",
                "WireGuard peers (other nodes with a public key).",
                w.peers.len() as u64,
            ),
            (
                "sluice_wireguard_handshakes_completed_total",
                "counter",
                "WireGuard handshakes completed, either side initiating.",
                w.handshakes_completed,
            ),
            (
                "sluice_wireguard_handshake_initiations_total",
                "counter",
                "WireGuard handshake initiations sent.",
                w.initiations_sent,
            ),
            (
                "sluice_wireguard_handshake_failures_total",
                "counter",
                "WireGuard handshake messages refused (bad MAC, replayed timestamp, unknown peer).",
                w.handshake_failures,
            ),
        ],
    );
    let per_peer: [PeerSample; 6] = [
        (
            "sluice_wireguard_peer_session",
            "gauge",
            "1 while a session with the peer can carry traffic.",
            |p| Some(u64::from(p.has_session)),
        ),
        (
            "sluice_wireguard_peer_latest_handshake_seconds",
            "gauge",
            "Seconds since the latest handshake with the peer (absent: none yet).",
            |p| p.latest_handshake_s_ago,
        ),
        (
            "sluice_wireguard_peer_tx_packets_total",
            "counter",
            "Packets sealed to the peer.",
            |p| Some(p.tx_packets),
        ),
        (
            "sluice_wireguard_peer_tx_bytes_total",
            "counter",
            "Sealed message bytes sent to the peer.",
            |p| Some(p.tx_bytes),
        ),
        (
            "sluice_wireguard_peer_rx_packets_total",
            "counter",
            "Packets opened from the peer.",
            |p| Some(p.rx_packets),
        ),
        (
            "sluice_wireguard_peer_rx_bytes_total",
            "counter",
            "Plaintext bytes received from the peer.",
            |p| Some(p.rx_bytes),
        ),
    ];
    for (name, kind, help, value) in per_peer {
        header(out, name, kind, help);
        for p in &w.peers {
            if let Some(v) = value(p) {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{node}\",peer=\"{}\"}} {v}",
                    esc(&p.node)
                );
            }
        }
    }
}

/// What the HTTP thread asks the control loop for.
pub enum Scrape {
    /// The rendered /metrics body.
    Metrics(mpsc::SyncSender<String>),
    /// Liveness (`/healthz`): answered when the control loop runs.
    Ping(mpsc::SyncSender<()>),
    /// Readiness (`/readyz`): the control loop runs and the dataplane forwards a complete
    /// state, else why not.
    Ready(mpsc::SyncSender<Result<(), String>>),
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends. Each request
/// is answered by asking the control loop (bounded wait), so `/healthz` fails when the loop is
/// stuck, as a probe should.
pub fn serve(listener: TcpListener, to_control: impl Fn(Scrape) -> bool) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("");
        let (code, body, ctype) = match path {
            "/metrics" => {
                let (tx, rx) = mpsc::sync_channel(1);
                let got = if to_control(Scrape::Metrics(tx)) {
                    rx.recv_timeout(Duration::from_secs(5)).ok()
                } else {
                    None
                };
                match got {
                    Some(text) => ("200 OK", text, "text/plain; version=0.0.4"),
                    None => (
                        "503 Service Unavailable",
                        "control loop not answering\n".into(),
                        "text/plain",
                    ),
                }
            }
            "/healthz" => {
                let (tx, rx) = mpsc::sync_channel(1);
                let ok =
                    to_control(Scrape::Ping(tx)) && rx.recv_timeout(Duration::from_secs(2)).is_ok();
                if ok {
                    ("200 OK", "ok\n".into(), "text/plain")
                } else {
                    (
                        "503 Service Unavailable",
                        "control loop not answering\n".into(),
                        "text/plain",
                    )
                }
            }
            "/readyz" => {
                let (tx, rx) = mpsc::sync_channel(1);
                let answer = if to_control(Scrape::Ready(tx)) {
                    rx.recv_timeout(Duration::from_secs(2))
                        .unwrap_or_else(|_| Err("control loop not answering".into()))
                } else {
                    Err("control loop not answering".into())
                };
                match answer {
                    Ok(()) => ("200 OK", "ok\n".into(), "text/plain"),
                    Err(why) => ("503 Service Unavailable", format!("{why}\n"), "text/plain"),
                }
            }
            _ => (
                "404 Not Found",
                "try /metrics, /healthz or /readyz\n".into(),
                "text/plain",
            ),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Binds the metrics address, with an error that names it.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("binding the metrics address {addr}: {e} (use --metrics-addr)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::QueueStatus;
    use dataplane::stats::Counters;

    fn parse(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').expect("metric line has a value");
                (k.to_string(), v.parse::<f64>().expect("value parses"))
            })
            .collect()
    }

    #[test]
    fn every_counter_and_drop_reason_is_exported_and_parses() {
        let mut c = Counters::default();
        for r in DropReason::ALL {
            c.count_drop(r);
        }
        c.rx_packets = 5;
        let workers = vec![WorkerReport {
            id: 0,
            core: Some(1),
            hugepages: true,
            generation: 3,
            free_frames: 10,
            total_frames: 20,
            counters: c,
            wg_peers: [[0; 4]; dataplane::stats::WG_PEER_SLOTS],
        }];
        let interfaces = vec![InterfaceStatus {
            name: "lxc1".into(),
            ifindex: 3,
            mac: "02:00:00:00:00:01".into(),
            xdp_mode: "native".into(),
            pod: None,
            ip: None,
            queues: vec![QueueStatus {
                queue: 0,
                worker: 0,
                mode: "copy".into(),
                kernel_rx_dropped: 1,
                kernel_rx_ring_full: 2,
                kernel_rx_fill_ring_empty: 3,
                kernel_tx_ring_empty: 4,
                frames_in_kernel: 5,
            }],
            xdp: vec![("redirected".into(), 7)],
        }];
        let mut h = LatencyHistograms::new();
        h.record_batch(3_000, 30);
        h.record_batch(400_000, 4);
        let hists = vec![h];
        let text = render(&Snapshot {
            node: "n1",
            generation: 3,
            source_error: false,
            endpoints: 1,
            workers: &workers,
            interfaces: &interfaces,
            histograms: Some(&hists),
            programming: None,
            wireguard: None,
            api: None,
        });
        let m = parse(&text);
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        for name in Counters::NAMES {
            let key = match *name {
                "ct_entries" => "sluice_conntrack_entries{worker=\"0\"}".to_string(),
                "ct_capacity" => "sluice_conntrack_capacity{worker=\"0\"}".to_string(),
                _ => format!("sluice_{name}_total{{worker=\"0\"}}"),
            };
            assert!(get(&key).is_some(), "{name} not exported as {key}");
        }
        assert!(
            !text.contains("sluice_ct_entries_total"),
            "a gauge must not be exported as a counter"
        );
        for r in DropReason::ALL {
            let key = format!(
                "sluice_drops_total{{worker=\"0\",reason=\"{}\",number=\"{}\"}}",
                r.as_str(),
                r as u8
            );
            assert_eq!(get(&key), Some(1.0), "{key}");
        }
        assert_eq!(get("sluice_rx_packets_total{worker=\"0\"}"), Some(5.0));
        assert_eq!(
            get("sluice_xdp_actions_total{interface=\"lxc1\",action=\"redirected\"}"),
            Some(7.0)
        );
        assert_eq!(
            get("sluice_xsk_rx_ring_full_total{interface=\"lxc1\",queue=\"0\",worker=\"0\"}"),
            Some(2.0)
        );
        assert_eq!(get("sluice_worker_frames_free{worker=\"0\"}"), Some(10.0));
        // Histograms: cumulative, ending at the count; 30 packets at 100 ns, 4 at 100 us.
        assert_eq!(
            get("sluice_pipeline_packet_duration_seconds_count{worker=\"0\"}"),
            Some(34.0)
        );
        assert_eq!(
            get("sluice_pipeline_packet_duration_seconds_bucket{worker=\"0\",le=\"0.0000001\"}"),
            Some(30.0)
        );
        assert_eq!(
            get("sluice_pipeline_packet_duration_seconds_bucket{worker=\"0\",le=\"0.0001\"}"),
            Some(34.0)
        );
        assert_eq!(
            get("sluice_pipeline_batch_duration_seconds_bucket{worker=\"0\",le=\"+Inf\"}"),
            Some(2.0)
        );
        let mut last = 0.0;
        for (k, v) in &m {
            if k.starts_with("sluice_pipeline_batch_duration_seconds_bucket") {
                assert!(*v >= last, "buckets are cumulative");
                last = *v;
            }
        }
        // Every sample line belongs to a declared metric family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().expect("name");
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {base} histogram")),
                "{family} undeclared"
            );
        }
    }

    #[test]
    fn api_and_wireguard_state_are_exported() {
        let api = ApiStatus {
            connected: false,
            since_unix: 0,
            last_error: Some("refused".into()),
            kinds_synced: vec!["Node".into(), "Pod".into()],
            all_synced: false,
            relists: 3,
            skipped_objects: 2,
        };
        let peer = |node: &str, session: bool, ago: Option<u64>| crate::status::WgPeerStatus {
            node: node.into(),
            public_key: "k".into(),
            endpoint: "172.18.0.12:51871".into(),
            latest_handshake_s_ago: ago,
            has_session: session,
            tx_packets: 10,
            tx_bytes: 1000,
            rx_packets: 9,
            rx_bytes: 900,
        };
        let wg = WgStatus {
            public_key: "me".into(),
            listen_port: 51871,
            strict: true,
            handshakes_completed: 4,
            initiations_sent: 5,
            handshake_failures: 1,
            peers: vec![peer("node2", true, Some(7)), peer("node3", false, None)],
        };
        let text = render(&Snapshot {
            node: "n1",
            generation: 1,
            source_error: false,
            endpoints: 0,
            workers: &[],
            interfaces: &[],
            histograms: None,
            programming: None,
            wireguard: Some(&wg),
            api: Some(&api),
        });
        let m = parse(&text);
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        for (k, v) in [
            ("sluice_api_connected{node=\"n1\"}", 0.0),
            ("sluice_api_synced{node=\"n1\"}", 0.0),
            ("sluice_api_kinds_synced{node=\"n1\"}", 2.0),
            ("sluice_api_relists_total{node=\"n1\"}", 3.0),
            ("sluice_api_skipped_objects_total{node=\"n1\"}", 2.0),
            ("sluice_wireguard_peers{node=\"n1\"}", 2.0),
            (
                "sluice_wireguard_handshakes_completed_total{node=\"n1\"}",
                4.0,
            ),
            (
                "sluice_wireguard_handshake_initiations_total{node=\"n1\"}",
                5.0,
            ),
            (
                "sluice_wireguard_handshake_failures_total{node=\"n1\"}",
                1.0,
            ),
            (
                "sluice_wireguard_peer_session{node=\"n1\",peer=\"node2\"}",
                1.0,
            ),
            (
                "sluice_wireguard_peer_session{node=\"n1\",peer=\"node3\"}",
                0.0,
            ),
            (
                "sluice_wireguard_peer_latest_handshake_seconds{node=\"n1\",peer=\"node2\"}",
                7.0,
            ),
            (
                "sluice_wireguard_peer_tx_bytes_total{node=\"n1\",peer=\"node3\"}",
                1000.0,
            ),
            (
                "sluice_wireguard_peer_rx_packets_total{node=\"n1\",peer=\"node2\"}",
                9.0,
            ),
        ] {
            assert_eq!(get(k), Some(v), "{k} in\n{text}");
        }
        assert_eq!(
            get("sluice_wireguard_peer_latest_handshake_seconds{node=\"n1\",peer=\"node3\"}"),
            None,
            "no handshake yet: no sample"
        );
    }

    /// GET `path` from a [`serve`] on loopback whose control loop answers readiness with
    /// `ready`: (status line, body).
    fn get(path: &str, ready: Result<(), String>) -> (String, String) {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            serve(listener, move |s| {
                match s {
                    Scrape::Ping(tx) => {
                        let _ = tx.send(());
                    }
                    Scrape::Ready(tx) => {
                        let _ = tx.send(ready.clone());
                    }
                    Scrape::Metrics(tx) => {
                        let _ = tx.send(String::new());
                    }
                }
                true
            })
        });
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("answer");
        let status = answer.lines().next().unwrap_or("").to_string();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    #[test]
    fn readyz_says_why_the_node_is_not_ready_and_healthz_only_needs_the_loop() {
        let not_ready = Err("worker 0 runs no snapshot yet".to_string());
        let (status, body) = get("/readyz", not_ready.clone());
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "worker 0 runs no snapshot yet\n");
        let (status, _) = get("/healthz", not_ready);
        assert_eq!(status, "HTTP/1.1 200 OK", "alive while not ready");
        let (status, body) = get("/readyz", Ok(()));
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok\n")
        );
    }

    #[test]
    fn programming_latency_is_a_cumulative_histogram_in_seconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        // 3 ms, 3 ms, 40 ms, 2 s (microseconds).
        for us in [3_000, 3_000, 40_000, 2_000_000] {
            h.record(us).unwrap();
        }
        let text = render(&Snapshot {
            node: "n1",
            generation: 3,
            source_error: false,
            endpoints: 0,
            workers: &[],
            interfaces: &[],
            histograms: None,
            programming: Some(&h),
            wireguard: None,
            api: None,
        });
        let m = parse(&text);
        let get = |le: &str| {
            let k = format!(
                "sluice_network_programming_duration_seconds_bucket{{node=\"n1\",le=\"{le}\"}}"
            );
            m.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("{k} missing in\n{text}"))
        };
        assert_eq!(get("0.002"), 0.0);
        assert_eq!(get("0.004"), 2.0);
        assert_eq!(get("0.032"), 2.0);
        assert_eq!(get("0.064"), 3.0);
        assert_eq!(get("2.048"), 4.0);
        assert_eq!(get("+Inf"), 4.0);
        let count = m
            .iter()
            .find(|(n, _)| n == "sluice_network_programming_duration_seconds_count{node=\"n1\"}")
            .map(|(_, v)| *v);
        assert_eq!(count, Some(4.0));
    }
}
