//! What `sluice status` shows: the agent's view of its workers, interfaces and counters, as
//! JSON over the local API and as text for people.
use std::fmt::Write as _;

use dataplane::{runtime::WorkerReport, stats::Counters, worker::PortStatus, DropReason};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub source: String,
    /// Generation of the published snapshot.
    pub generation: u64,
    /// The last cluster-file error, if the file is currently broken (the agent keeps running
    /// the last good state).
    pub source_error: Option<String>,
    pub gateway: String,
    pub pod_cidr: String,
    pub workers: Vec<WorkerStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    pub totals: Vec<(String, u64)>,
    /// Every drop reason with its number and count (zeros included).
    pub drops: Vec<DropStatus>,
    /// WireGuard between nodes, when on.
    #[serde(default)]
    pub wireguard: Option<WgStatus>,
    /// The policy table in force.
    #[serde(default)]
    pub policy: Option<PolicyStatus>,
    /// `--source kubernetes`: the API server as the source sees it.
    #[serde(default)]
    pub api: Option<ApiStatus>,
}

/// The `api` section of `sluice status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiStatus {
    pub connected: bool,
    /// Unix seconds of the last change of `connected`.
    pub since_unix: u64,
    pub last_error: Option<String>,
    pub kinds_synced: Vec<String>,
    /// Every kind finished a list: the state in force is the API's, not the checkpoint's.
    pub all_synced: bool,
    pub relists: u64,
    pub skipped_objects: u64,
}

/// The `policy` section of `sluice status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyStatus {
    /// Generation of the compiled table (moves only when the rules change; 0: never compiled).
    pub generation: u16,
    /// Local pods some NetworkPolicy isolates (their flows are tracked and judged).
    pub isolated_pods: usize,
    /// A HostNetworkPolicy selects this node.
    pub host_isolated: bool,
    /// The host firewall is running (re-injection pair up, uplink program configured).
    pub host_firewall: bool,
    /// Agent-wide audit mode (`--policy-audit`).
    pub audit: bool,
}

/// `sluice wg peers` / the WireGuard section of `sluice status`, like `wg show`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WgStatus {
    pub public_key: String,
    pub listen_port: u16,
    pub strict: bool,
    pub handshakes_completed: u64,
    pub initiations_sent: u64,
    /// Handshake messages refused (bad MAC, replayed timestamp, unknown peer, ...).
    pub handshake_failures: u64,
    pub peers: Vec<WgPeerStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WgPeerStatus {
    pub node: String,
    pub public_key: String,
    pub endpoint: String,
    /// Seconds since the latest handshake, if any.
    pub latest_handshake_s_ago: Option<u64>,
    pub has_session: bool,
    /// Packets and bytes sealed to / opened from this peer by the workers (plaintext bytes
    /// received, sealed message bytes sent, as `wg show` counts).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// `wg show`-style text for the WireGuard section.
pub fn render_wireguard(w: &WgStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wireguard: public key {}  listening port {}{}",
        w.public_key,
        w.listen_port,
        if w.strict { "  strict" } else { "" }
    );
    let _ = writeln!(
        out,
        "  handshakes completed {}  initiations sent {}  refused {}",
        w.handshakes_completed, w.initiations_sent, w.handshake_failures
    );
    if w.peers.is_empty() {
        let _ = writeln!(out, "  (no peers: no other Node has a key annotation)");
    }
    for p in &w.peers {
        let _ = writeln!(out, "  peer {} ({})", p.public_key, p.node);
        let _ = writeln!(out, "    endpoint: {}", p.endpoint);
        match p.latest_handshake_s_ago {
            Some(s) => {
                let _ = writeln!(out, "    latest handshake: {s} seconds ago");
            }
            None => {
                let _ = writeln!(out, "    latest handshake: never");
            }
        }
        let _ = writeln!(
            out,
            "    transfer: {} B received ({} packets), {} B sent ({} packets){}",
            p.rx_bytes,
            p.rx_packets,
            p.tx_bytes,
            p.tx_packets,
            if p.has_session { "" } else { "  (no session)" }
        );
    }
    out
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: usize,
    pub core: Option<usize>,
    pub hugepages: bool,
    pub generation: u64,
    /// UMEM frames free / owned in all.
    pub free_frames: u64,
    pub total_frames: u64,
    pub counters: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub mac: String,
    pub xdp_mode: String,
    pub pod: Option<String>,
    pub ip: Option<String>,
    pub queues: Vec<QueueStatus>,
    /// The XDP program's own counters: redirected, pass_no_socket, pass_rule, pass_short.
    pub xdp: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueStatus {
    pub queue: u32,
    pub worker: usize,
    pub mode: String,
    pub kernel_rx_dropped: u64,
    pub kernel_rx_ring_full: u64,
    pub kernel_rx_fill_ring_empty: u64,
    pub kernel_tx_ring_empty: u64,
    pub frames_in_kernel: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DropStatus {
    pub reason: String,
    pub number: u8,
    pub count: u64,
}

pub fn counters_list(c: &Counters) -> Vec<(String, u64)> {
    c.values()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

pub fn drops_list(c: &Counters) -> Vec<DropStatus> {
    c.drops_by_reason()
        .into_iter()
        .map(|(r, n)| DropStatus {
            reason: r.as_str().to_string(),
            number: r as u8,
            count: n,
        })
        .collect()
}

pub fn worker_status(r: &WorkerReport) -> WorkerStatus {
    WorkerStatus {
        id: r.id,
        core: r.core,
        hugepages: r.hugepages,
        generation: r.generation,
        free_frames: r.free_frames,
        total_frames: r.total_frames,
        counters: counters_list(&r.counters),
    }
}

pub fn queue_status(p: &PortStatus) -> QueueStatus {
    QueueStatus {
        queue: p.queue,
        worker: p.worker,
        mode: format!("{:?}", p.mode).to_lowercase(),
        kernel_rx_dropped: p.kernel.rx_dropped,
        kernel_rx_ring_full: p.kernel.rx_ring_full,
        kernel_rx_fill_ring_empty: p.kernel.rx_fill_ring_empty_descs,
        kernel_tx_ring_empty: p.kernel.tx_ring_empty_descs,
        frames_in_kernel: p.frames_in_kernel,
    }
}

impl Status {
    /// What keeps the node from being healthy, a line each; none: `sluice status --brief`
    /// prints `OK` (as `cilium status --brief`). A worker without a snapshot, a source error
    /// or note (a broken cluster file, forwarding from a checkpoint or a hand-over before the
    /// first sync), an API server that is unreachable or not yet listed, a WireGuard peer
    /// without a session.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in self.workers.iter().filter(|w| w.generation == 0) {
            out.push(format!("worker {}: no snapshot yet", w.id));
        }
        if let Some(e) = &self.source_error {
            out.push(format!("source {}: {e}", self.source));
        }
        if let Some(a) = &self.api {
            if !a.connected {
                let why = a.last_error.as_deref().unwrap_or("no answer");
                out.push(format!("api server: unreachable ({why})"));
            } else if !a.all_synced {
                out.push(format!(
                    "api server: not every kind listed yet (synced: {})",
                    a.kinds_synced.join(", ")
                ));
            }
        }
        if let Some(wg) = &self.wireguard {
            for p in wg.peers.iter().filter(|p| !p.has_session) {
                out.push(format!("wireguard: no session with {}", p.node));
            }
        }
        out
    }

    /// A named total (e.g. "forwarded"), 0 if absent.
    pub fn total(&self, name: &str) -> u64 {
        self.totals
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    }
    /// Drops counted for `reason`.
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|d| d.number == reason as u8)
            .map_or(0, |d| d.count)
    }

    /// Text for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "node {}  snapshot generation {}  source {}",
            self.node, self.generation, self.source
        );
        let _ = writeln!(s, "pod CIDR {}  gateway {}", self.pod_cidr, self.gateway);
        if let Some(e) = &self.source_error {
            let _ = writeln!(s, "SOURCE ERROR (running the last good state): {e}");
        }
        let _ = writeln!(s, "\nworkers:");
        for w in &self.workers {
            let get = |n: &str| {
                w.counters
                    .iter()
                    .find(|(k, _)| k == n)
                    .map_or(0, |(_, v)| *v)
            };
            let _ = writeln!(
                s,
                "  worker {} core {} hugepages {} gen {} frames free {}/{}: rx {} tx {} forwarded {} dropped {}",
                w.id,
                w.core.map_or("-".to_string(), |c| c.to_string()),
                w.hugepages,
                w.generation,
                w.free_frames,
                w.total_frames,
                get("rx_packets"),
                get("tx_packets"),
                get("forwarded"),
                get("dropped"),
            );
        }
        let _ = writeln!(s, "\ninterfaces:");
        for i in &self.interfaces {
            let xdp: Vec<String> = i.xdp.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "  {:<16} ifindex {:<4} xdp {:<7} pod {:<24} ip {:<15} queues {}  [{}]",
                i.name,
                i.ifindex,
                i.xdp_mode,
                i.pod.as_deref().unwrap_or("-"),
                i.ip.as_deref().unwrap_or("-"),
                i.queues.len(),
                xdp.join(" ")
            );
            for q in &i.queues {
                if q.kernel_rx_dropped + q.kernel_rx_ring_full + q.kernel_rx_fill_ring_empty > 0 {
                    let _ = writeln!(
                        s,
                        "      queue {} (worker {}, {}): kernel rx_dropped {} rx_ring_full {} fill_empty {}",
                        q.queue, q.worker, q.mode, q.kernel_rx_dropped, q.kernel_rx_ring_full, q.kernel_rx_fill_ring_empty
                    );
                }
            }
        }
        let _ = writeln!(s, "\ncounters:");
        for (k, v) in &self.totals {
            let _ = writeln!(s, "  {k:<22} {v}");
        }
        let _ = writeln!(s, "\ndrops by reason:");
        for d in &self.drops {
            let _ = writeln!(s, "  {:>3} {:<24} {}", d.number, d.reason, d.count);
        }
        if let Some(a) = &self.api {
            let _ = writeln!(
                s,
                "\napi server: {} since {} (unix), {}{}, relists {}, skipped objects {}{}",
                if a.connected {
                    "connected"
                } else {
                    "UNREACHABLE (forwarding with the last state)"
                },
                a.since_unix,
                if a.all_synced {
                    "synced"
                } else {
                    "not synced yet: "
                },
                if a.all_synced {
                    String::new()
                } else {
                    format!("{} kinds listed", a.kinds_synced.len())
                },
                a.relists,
                a.skipped_objects,
                a.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if let Some(p) = &self.policy {
            let _ = writeln!(
                s,
                "\npolicy: generation {}, {} isolated pods, host policy {}, host firewall {}{}",
                p.generation,
                p.isolated_pods,
                if p.host_isolated {
                    "selects this node"
                } else {
                    "none"
                },
                if p.host_firewall { "on" } else { "off" },
                if p.audit {
                    ", AUDIT MODE (nothing dropped by policy)"
                } else {
                    ""
                }
            );
        }
        if let Some(w) = &self.wireguard {
            s.push('\n');
            s.push_str(&render_wireguard(w));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Status {
        Status {
            node: "node1".into(),
            source: "kubernetes".into(),
            generation: 4,
            source_error: None,
            gateway: "10.244.1.1".into(),
            pod_cidr: "10.244.1.0/24".into(),
            workers: vec![WorkerStatus {
                id: 0,
                core: Some(1),
                hugepages: true,
                generation: 4,
                free_frames: 100,
                total_frames: 200,
                counters: Vec::new(),
            }],
            interfaces: Vec::new(),
            totals: Vec::new(),
            drops: Vec::new(),
            wireguard: Some(WgStatus {
                public_key: "k".into(),
                listen_port: 51871,
                strict: true,
                handshakes_completed: 1,
                initiations_sent: 1,
                handshake_failures: 0,
                peers: vec![WgPeerStatus {
                    node: "node2".into(),
                    public_key: "p".into(),
                    endpoint: "172.18.0.12:51871".into(),
                    latest_handshake_s_ago: Some(3),
                    has_session: true,
                    tx_packets: 0,
                    tx_bytes: 0,
                    rx_packets: 0,
                    rx_bytes: 0,
                }],
            }),
            policy: None,
            api: Some(ApiStatus {
                connected: true,
                since_unix: 0,
                last_error: None,
                kinds_synced: vec!["Node".into(), "Pod".into()],
                all_synced: true,
                relists: 0,
                skipped_objects: 0,
            }),
        }
    }

    #[test]
    fn a_healthy_node_has_no_problem_and_each_fault_is_named() {
        assert_eq!(healthy().problems(), Vec::<String>::new());

        let mut s = healthy();
        s.workers[0].generation = 0;
        assert_eq!(s.problems(), ["worker 0: no snapshot yet"]);

        let mut s = healthy();
        s.source_error = Some("forwarding from the checkpoint".into());
        assert_eq!(
            s.problems(),
            ["source kubernetes: forwarding from the checkpoint"]
        );

        let mut s = healthy();
        let a = s.api.as_mut().unwrap();
        a.connected = false;
        a.last_error = Some("connection refused".into());
        assert_eq!(
            s.problems(),
            ["api server: unreachable (connection refused)"]
        );

        let mut s = healthy();
        s.api.as_mut().unwrap().all_synced = false;
        assert_eq!(
            s.problems(),
            ["api server: not every kind listed yet (synced: Node, Pod)"]
        );

        let mut s = healthy();
        s.wireguard.as_mut().unwrap().peers[0].has_session = false;
        assert_eq!(s.problems(), ["wireguard: no session with node2"]);
    }
}
