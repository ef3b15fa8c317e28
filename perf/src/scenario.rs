//! Scenarios as data: which cluster file, which pod talks to which server, what traffic, and the
//! default parameters. `sluice-perf run NAME` looks a name up here and the runner is generic over
//! the entry, so a later issue adds its measurement by adding a row (cross-node: the two-node
//! cluster file and pods on different nodes; a Service: [`Target::ClusterIp`]; WireGuard:
//! [`Scenario::encryption`] and a cluster file whose Nodes carry keys).
//!
//! Every scenario runs in each [`crate::metrics`] mode (sluice, then the kernel baseline) on the
//! same cluster file, so the two figures compare like with like. For a [`Target::ClusterIp`]
//! scenario the kernel baseline is kube-proxy's nftables mode: the testbed loads rules shaped
//! like it into the kernel nodes ([`crate::service`], `testbed::nft`). For an encrypted scenario
//! ([`Encryption::Wireguard`]) both testbeds are brought up with it
//! (`testbed::UpOptions::encryption`): the sluice agents seal VXLAN in their workers, and the
//! kernel baseline's nodes are `kernel-wireguard` nodes (the kernel's vxlan device over
//! wireguard-go, the shape of Flannel's or Cilium's WireGuard + VXLAN modes).
//!
//! A **policy scenario** ([`Scenario::policies`]) compares sluice with sluice instead: the same
//! traffic on the cluster file (no NetworkPolicy) and on its twin with NetworkPolicies that
//! isolate both ends; the kernel baseline is not run (the kernel path here has no policy
//! engine; `pod-to-pod` gives sluice against the kernel on the same topology). The policies-on
//! run must prove its policies were enforced ([`crate::policy`]).

use serde::{Deserialize, Serialize};

pub use testbed::Encryption;

/// Where a scenario's server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The server pod's own IP.
    PodIp,
    /// The ClusterIP of the Service `namespace/name`, on the scenario's port, whose backend is
    /// the server pod. The Service port and its targetPort must both be the scenario's port
    /// (the server binds it); [`crate::service::resolve`] checks both.
    ClusterIp { service: &'static str },
}

/// What traffic a scenario sends, and so which programs run and which metrics it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// UDP generator -> sink: packet rate, loss, reordering, one-way latency. Open loop with a
    /// rate, closed loop without.
    UdpStream,
    /// TCP sender -> receiver over `flows` connections: bytes per second.
    TcpStream,
    /// UDP request/response: round-trip latency. Closed loop (one request outstanding) without
    /// a rate, open loop (requests at the rate, whatever the replies do) with one.
    UdpRequestResponse,
}

impl Traffic {
    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::UdpStream => "udp-stream",
            Traffic::TcpStream => "tcp-stream",
            Traffic::UdpRequestResponse => "udp-request-response",
        }
    }
}

/// Parameters a scenario uses unless the command line says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Defaults {
    pub duration_s: u32,
    /// Ethernet frame size (UDP) or write size (TCP), bytes.
    pub size: usize,
    /// `None`: closed loop.
    pub rate_pps: Option<u64>,
    pub flows: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    /// What the figures mean, one line.
    pub measures: &'static str,
    /// Where the traffic goes, one line.
    pub topology: &'static str,
    /// Cluster file, relative to the repository root.
    pub cluster: &'static str,
    /// `namespace/name` of the pod running the client (generator, sender, requester).
    pub client_pod: &'static str,
    /// `namespace/name` of the pod running the server (sink, receiver, responder).
    pub server_pod: &'static str,
    pub target: Target,
    pub traffic: Traffic,
    /// The server's port (UDP or TCP, by `traffic`).
    pub port: u16,
    /// Between nodes: VXLAN in clear, or in WireGuard (both modes; module doc). An encrypted
    /// scenario needs keys on every Node of its cluster file (`testbed::plan::WG_PRIVATE_KEY_ANNOTATION`).
    pub encryption: Encryption,
    /// A policy scenario: this cluster file is [`Scenario::cluster`] plus NetworkPolicies, and
    /// the run compares sluice on it (policies on) with sluice on `cluster` (policies off),
    /// instead of sluice with the kernel (which has no policy engine here); see
    /// [`crate::policy`]. The policies must isolate both ends, allow the scenario's port and
    /// not allow [`crate::policy::PROBE_PORT`].
    pub policies: Option<&'static str>,
    /// A restart scenario: during a UDP stream at a fixed rate the agent of the client's node
    /// is restarted (`--restart term|kill|hot`, `--restart-at`), and the run reports the loss and
    /// the outage ([`crate::restart`]). No kernel baseline (the kernel path has no agent).
    pub restart: bool,
    pub defaults: Defaults,
}

const DEMO: &str = "testbed/clusters/demo.yaml";
const TWO_NODE: &str = "testbed/clusters/two-node.yaml";
/// Services fixture: `default/echo` (ClusterIP 10.96.1.15) has one backend, `echo-1`, on the
/// client's node.
const SERVICES: &str = "testbed/clusters/services.yaml";
/// ClusterIP scenarios: sluice's DNAT in the workers vs kube-proxy-shaped nftables rules.
const CLUSTER_IP: &str =
    "client -> ClusterIP of default/echo (one backend, echo-1), same node; kernel: nftables DNAT";
/// Cross-node scenarios: sluice VXLAN in the workers vs the kernel's vxlan device (Flannel's
/// vxlan backend shape: VNI 1, port 8472) on the same two-node topology.
const CROSS_NODE: &str = "pod-a1 (node1) -> pod-b1's IP (node2), over VXLAN";
/// Two-node fixture whose Nodes carry WireGuard keys (otherwise the same cluster as
/// [`TWO_NODE`]).
const WIREGUARD: &str = "testbed/clusters/wireguard.yaml";
/// Encrypted cross-node scenarios: sluice seals VXLAN in its workers vs the kernel's vxlan device
/// carried by wireguard-go tunnels, on the same two-node topology.
const CROSS_NODE_WG: &str =
    "pod-a1 (node1) -> pod-b1's IP (node2), VXLAN in WireGuard; kernel: vxlan over wireguard-go";

/// [`DEMO`] plus NetworkPolicies isolating pod-b's ingress (from app: a) and pod-a's egress (to
/// app: b) on the perf ports 9000-9002.
const POLICY_PERF: &str = "testbed/clusters/policy-perf.yaml";
/// Policy scenarios: sluice with NetworkPolicies vs sluice without, same traffic.
const POLICY: &str =
    "pod-a -> pod-b's IP, same node; pod-a egress and pod-b ingress isolated (policies on vs off)";

/// Restart scenarios: the agent of the client's node is stopped and started again mid-stream.
const RESTART: &str = "pod-a -> pod-b's IP, same node; node1's agent restarted mid-stream";
const RESTART_CROSS_NODE: &str =
    "pod-a1 (node1) -> pod-b1 (node2), VXLAN; node1's agent restarted mid-stream";
/// Restart scenarios: a fixed rate (so lost packets are time), long enough for the new agent
/// to come up and the flow to resume well before the end.
const RESTART_DEFAULTS: Defaults = Defaults {
    duration_s: 4,
    size: 64,
    rate_pps: Some(50_000),
    flows: 1,
};

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "pod-to-pod",
        measures: "UDP packet rate, loss and one-way latency at a frame size",
        topology: "pod-a -> pod-b's IP, same node",
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-pod-tcp",
        measures: "TCP throughput (bytes/s) over one or --flows connections",
        topology: "pod-a -> pod-b's IP, same node",
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::TcpStream,
        port: 9002,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 128 * 1024,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-pod-rr",
        measures: "UDP request/response round-trip latency (closed loop, or open loop at --rate)",
        topology: "pod-a -> pod-b's IP, same node",
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::UdpRequestResponse,
        port: 9001,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node",
        measures: "UDP packet rate, loss and one-way latency between nodes, over VXLAN",
        topology: CROSS_NODE,
        cluster: TWO_NODE,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node-tcp",
        measures: "TCP throughput between nodes, over VXLAN",
        topology: CROSS_NODE,
        cluster: TWO_NODE,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::TcpStream,
        port: 9002,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 128 * 1024,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node-rr",
        measures: "UDP request/response round-trip latency between nodes, over VXLAN",
        topology: CROSS_NODE,
        cluster: TWO_NODE,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::UdpRequestResponse,
        port: 9001,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node-wg",
        measures: "UDP packet rate, loss and one-way latency between nodes, VXLAN in WireGuard",
        topology: CROSS_NODE_WG,
        cluster: WIREGUARD,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::Wireguard,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node-wg-tcp",
        measures: "TCP throughput between nodes, VXLAN in WireGuard",
        topology: CROSS_NODE_WG,
        cluster: WIREGUARD,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::TcpStream,
        port: 9002,
        encryption: Encryption::Wireguard,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 128 * 1024,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "node-to-node-wg-rr",
        measures: "UDP request/response round-trip latency between nodes, VXLAN in WireGuard",
        topology: CROSS_NODE_WG,
        cluster: WIREGUARD,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::UdpRequestResponse,
        port: 9001,
        encryption: Encryption::Wireguard,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-clusterip",
        measures: "UDP packet rate, loss and one-way latency through a ClusterIP (DNAT)",
        topology: CLUSTER_IP,
        cluster: SERVICES,
        client_pod: "default/client",
        server_pod: "default/echo-1",
        target: Target::ClusterIp {
            service: "default/echo",
        },
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-clusterip-rr",
        measures: "UDP request/response round-trip latency through a ClusterIP (DNAT)",
        topology: CLUSTER_IP,
        cluster: SERVICES,
        client_pod: "default/client",
        server_pod: "default/echo-1",
        target: Target::ClusterIp {
            service: "default/echo",
        },
        traffic: Traffic::UdpRequestResponse,
        port: 9001,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-clusterip-tcp",
        measures: "TCP throughput through a ClusterIP (DNAT) over one or --flows connections",
        topology: CLUSTER_IP,
        cluster: SERVICES,
        client_pod: "default/client",
        server_pod: "default/echo-1",
        target: Target::ClusterIp {
            service: "default/echo",
        },
        traffic: Traffic::TcpStream,
        port: 9002,
        encryption: Encryption::None,
        policies: None,
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 128 * 1024,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-pod-policy",
        measures: "UDP packet rate, loss and one-way latency with NetworkPolicies on vs off",
        topology: POLICY,
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: Some(POLICY_PERF),
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-pod-policy-rr",
        measures: "UDP request/response round-trip latency with NetworkPolicies on vs off",
        topology: POLICY,
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::UdpRequestResponse,
        port: 9001,
        encryption: Encryption::None,
        policies: Some(POLICY_PERF),
        restart: false,
        defaults: Defaults {
            duration_s: 5,
            size: 64,
            rate_pps: None,
            flows: 1,
        },
    },
    Scenario {
        name: "pod-to-pod-restart",
        measures: "UDP loss and outage while the agent restarts (--restart term|kill|hot)",
        topology: RESTART,
        cluster: DEMO,
        client_pod: "default/pod-a",
        server_pod: "default/pod-b",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: None,
        restart: true,
        defaults: RESTART_DEFAULTS,
    },
    Scenario {
        name: "node-to-node-restart",
        measures: "UDP loss and outage between nodes while node1's agent restarts",
        topology: RESTART_CROSS_NODE,
        cluster: TWO_NODE,
        client_pod: "default/pod-a1",
        server_pod: "default/pod-b1",
        target: Target::PodIp,
        traffic: Traffic::UdpStream,
        port: 9000,
        encryption: Encryption::None,
        policies: None,
        restart: true,
        defaults: RESTART_DEFAULTS,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Names for error messages.
pub fn names() -> Vec<&'static str> {
    SCENARIOS.iter().map(|s| s.name).collect()
}

/// A scenario and the cluster file it runs on do not fit together ([`check_cluster`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterMismatch {
    #[error(
        "scenario {scenario}: cluster file {cluster} has no pod {pod} (the {role}); use the \
         scenario's own cluster file or one with that pod"
    )]
    NoPod {
        scenario: &'static str,
        cluster: String,
        pod: &'static str,
        role: &'static str,
    },
    #[error(
        "scenario {scenario}: cluster file {cluster} puts {client} and {server} on the same node \
         {node}, so no packet would cross nodes and nothing would be encrypted; place them on \
         two nodes"
    )]
    SameNode {
        scenario: &'static str,
        cluster: String,
        client: &'static str,
        server: &'static str,
        node: String,
    },
    #[error(
        "scenario {scenario}: node {node} in cluster file {cluster} has no WireGuard key pair; \
         give every Node both {private} and {public} annotations (see \
         testbed/clusters/wireguard.yaml)"
    )]
    NoWgKeys {
        scenario: &'static str,
        cluster: String,
        node: String,
        private: &'static str,
        public: &'static str,
    },
}

/// Whether `plan` (the scenario's cluster file, or the one given instead) can run `s`: both pods
/// exist, and for an encrypted scenario they are on different nodes and every node has its keys.
/// Checked before any testbed is built, and by a test for every row.
pub fn check_cluster(
    s: &Scenario,
    cluster: &str,
    plan: &testbed::plan::Plan,
) -> Result<(), ClusterMismatch> {
    let node_of = |pod: &'static str, role: &'static str| {
        plan.pods
            .iter()
            .find(|p| p.key() == pod)
            .map(|p| p.node.clone())
            .ok_or_else(|| ClusterMismatch::NoPod {
                scenario: s.name,
                cluster: cluster.to_string(),
                pod,
                role,
            })
    };
    let client_node = node_of(s.client_pod, "client")?;
    let server_node = node_of(s.server_pod, "server")?;
    if s.encryption == Encryption::None {
        return Ok(());
    }
    if client_node == server_node {
        return Err(ClusterMismatch::SameNode {
            scenario: s.name,
            cluster: cluster.to_string(),
            client: s.client_pod,
            server: s.server_pod,
            node: client_node,
        });
    }
    match plan
        .nodes
        .iter()
        .find(|n| n.wireguard.private_key.is_none() || n.wireguard.public_key.is_none())
    {
        Some(n) => Err(ClusterMismatch::NoWgKeys {
            scenario: s.name,
            cluster: cluster.to_string(),
            node: n.name.clone(),
            private: testbed::plan::WG_PRIVATE_KEY_ANNOTATION,
            public: control::wg::PUBLIC_KEY_ANNOTATION,
        }),
        None => Ok(()),
    }
}

/// What is wrong with a scenario entry, if anything (checked by a test for every row).
pub fn validate(s: &Scenario) -> Result<(), String> {
    let name_ok = !s.name.is_empty()
        && s.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(format!("{:?}: names are lowercase, digits and '-'", s.name));
    }
    for (field, pod) in [("client_pod", s.client_pod), ("server_pod", s.server_pod)] {
        match pod.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {}
            _ => return Err(format!("{}: {field} {pod:?} is not namespace/name", s.name)),
        }
    }
    if let Target::ClusterIp { service } = s.target {
        match service.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {}
            _ => {
                return Err(format!(
                    "{}: target service {service:?} is not namespace/name",
                    s.name
                ))
            }
        }
    }
    if s.client_pod == s.server_pod {
        return Err(format!("{}: client and server are the same pod", s.name));
    }
    if s.port == 0 {
        return Err(format!("{}: port 0", s.name));
    }
    if let Some(p) = s.policies {
        if !p.ends_with(".yaml") || p == s.cluster {
            return Err(format!(
                "{}: policies {p:?} is not a .yaml file other than the cluster file",
                s.name
            ));
        }
        if s.encryption != Encryption::None {
            return Err(format!(
                "{}: policy scenarios run in clear (one change at a time)",
                s.name
            ));
        }
    }
    if !s.cluster.ends_with(".yaml") {
        return Err(format!(
            "{}: cluster {:?} is not a .yaml file",
            s.name, s.cluster
        ));
    }
    let d = s.defaults;
    if s.restart
        && (s.traffic != Traffic::UdpStream || d.rate_pps.is_none() || s.policies.is_some())
    {
        return Err(format!(
            "{}: a restart scenario is a UDP stream at a fixed rate without policies (lost \
             packets must be time)",
            s.name
        ));
    }
    if d.duration_s == 0 || d.flows == 0 || d.size == 0 || d.rate_pps == Some(0) {
        return Err(format!("{}: defaults {d:?} have a zero", s.name));
    }
    if s.traffic != Traffic::TcpStream
        && !(crate::payload::MIN_FRAME_BYTES..=crate::payload::MAX_FRAME_BYTES).contains(&d.size)
    {
        return Err(format!(
            "{}: default frame size {} out of range",
            s.name, d.size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_valid_and_names_are_unique() {
        for s in SCENARIOS {
            assert_eq!(validate(s), Ok(()), "{}", s.name);
            assert!(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(s.cluster)
                    .is_file(),
                "{}: cluster file {} missing",
                s.name,
                s.cluster
            );
        }
        let mut n = names();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), SCENARIOS.len());
        assert!(find("pod-to-pod").is_some());
        assert!(find("nope").is_none());
    }

    #[test]
    fn clusterip_scenarios_cover_every_traffic_kind() {
        for t in [
            Traffic::UdpStream,
            Traffic::TcpStream,
            Traffic::UdpRequestResponse,
        ] {
            assert!(
                SCENARIOS
                    .iter()
                    .any(|s| s.traffic == t && matches!(s.target, Target::ClusterIp { .. })),
                "{t:?}"
            );
        }
        let s = find("pod-to-clusterip").expect("pod-to-clusterip");
        assert_eq!(
            s.target,
            Target::ClusterIp {
                service: "default/echo"
            }
        );
        assert!(find("pod-to-clusterip-rr").is_some());
    }

    fn plan_of(cluster: &str) -> testbed::plan::Plan {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(cluster);
        testbed::plan::load(&path).unwrap_or_else(|e| panic!("{cluster}: {e}"))
    }

    #[test]
    fn every_row_fits_its_cluster_file() {
        for s in SCENARIOS {
            assert_eq!(
                check_cluster(s, s.cluster, &plan_of(s.cluster)),
                Ok(()),
                "{}",
                s.name
            );
        }
    }

    /// Every encrypted scenario is its clear twin (the name without `-wg`) with WireGuard on:
    /// same pods, traffic, port and defaults, so the two can be read side by side.
    #[test]
    fn encrypted_scenarios_are_clear_ones_with_wireguard_on() {
        let encrypted: Vec<&Scenario> = SCENARIOS
            .iter()
            .filter(|s| s.encryption == Encryption::Wireguard)
            .collect();
        for t in [
            Traffic::UdpStream,
            Traffic::TcpStream,
            Traffic::UdpRequestResponse,
        ] {
            assert!(encrypted.iter().any(|s| s.traffic == t), "{t:?}");
        }
        for s in encrypted {
            let clear_name = s.name.replacen("-wg", "", 1);
            let clear = find(&clear_name).unwrap_or_else(|| panic!("{}: no {clear_name}", s.name));
            assert_eq!(clear.encryption, Encryption::None, "{clear_name}");
            assert_eq!(
                Scenario {
                    name: clear.name,
                    measures: clear.measures,
                    topology: clear.topology,
                    cluster: clear.cluster,
                    encryption: clear.encryption,
                    ..*s
                },
                *clear,
                "{} differs from {clear_name} in more than encryption",
                s.name
            );
            assert_ne!(
                s.topology, clear.topology,
                "{}: topology says WireGuard",
                s.name
            );
            let plan = plan_of(s.cluster);
            let node = |pod: &str| {
                plan.pods
                    .iter()
                    .find(|p| p.key() == pod)
                    .map(|p| p.node.clone())
            };
            assert_ne!(node(s.client_pod), node(s.server_pod), "{}", s.name);
        }
        assert_eq!(
            find("node-to-node-wg").map(|s| s.encryption),
            Some(Encryption::Wireguard)
        );
        assert!(find("node-to-node-wg-tcp").is_some());
        assert!(find("node-to-node-wg-rr").is_some());
    }

    fn policy_scenarios() -> Vec<&'static Scenario> {
        SCENARIOS.iter().filter(|s| s.policies.is_some()).collect()
    }

    /// Every policy scenario is its plain twin (the name without `-policy`) with policies on:
    /// same cluster file, pods, traffic, port and defaults.
    #[test]
    fn policy_scenarios_are_plain_ones_with_policies_on() {
        let with = policy_scenarios();
        assert!(with.iter().any(|s| s.traffic == Traffic::UdpStream));
        assert!(with
            .iter()
            .any(|s| s.traffic == Traffic::UdpRequestResponse));
        for s in with {
            let plain_name = s.name.replacen("-policy", "", 1);
            let plain = find(&plain_name).unwrap_or_else(|| panic!("{}: no {plain_name}", s.name));
            assert_eq!(plain.policies, None, "{plain_name}");
            assert_eq!(
                Scenario {
                    name: plain.name,
                    measures: plain.measures,
                    topology: plain.topology,
                    policies: None,
                    ..*s
                },
                *plain,
                "{} differs from {plain_name} in more than its policies",
                s.name
            );
        }
        assert!(find("pod-to-pod-policy").is_some());
        assert!(find("pod-to-pod-policy-rr").is_some());
    }

    fn state_of(file: &str) -> control::cluster::ClusterState {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(file);
        control::cluster::load_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// The labels of pod `key` (`namespace/name`) in `state`.
    fn labels_of(
        state: &control::cluster::ClusterState,
        key: &str,
    ) -> std::collections::BTreeMap<String, String> {
        let (ns, name) = key.split_once('/').expect("namespace/name");
        state
            .pods
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .and_then(|p| p.metadata.labels.clone())
            .unwrap_or_default()
    }

    /// Whether `selector` (a LabelSelector's JSON, matchLabels only) selects `labels`.
    fn selects(
        selector: &serde_json::Value,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        assert!(
            selector.get("matchExpressions").is_none(),
            "the test reads matchLabels only"
        );
        selector
            .get("matchLabels")
            .and_then(|m| m.as_object())
            .is_some_and(|m| {
                m.iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
            })
    }

    /// The (protocol, port, endPort) of every port of a rule.
    fn ports_of(rule: &serde_json::Value) -> Vec<(String, u64, u64)> {
        rule.get("ports")
            .and_then(|p| p.as_array())
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let port = p["port"].as_u64().expect("numeric ports in the test files");
                        (
                            p["protocol"].as_str().unwrap_or("TCP").to_string(),
                            port,
                            p["endPort"].as_u64().unwrap_or(port),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A policy scenario's policies file is its cluster file plus NetworkPolicies (nothing else
    /// differs), they isolate the server's ingress from the client and the client's egress to
    /// the server, both on the scenario's port, and no rule allows the denied probe's port.
    #[test]
    fn policies_files_are_cluster_files_plus_policies_that_fit_the_scenario() {
        for s in policy_scenarios() {
            let file = s.policies.expect("a policy scenario");
            let plain = state_of(s.cluster);
            assert!(
                plain.network_policies.is_empty(),
                "{}: {} has policies",
                s.name,
                s.cluster
            );
            let with = state_of(file);
            assert!(
                !with.network_policies.is_empty(),
                "{}: {file} has no policy",
                s.name
            );
            let mut stripped = with.clone();
            stripped.network_policies.clear();
            assert_eq!(
                stripped, plain,
                "{file} differs from {} beyond its policies",
                s.cluster
            );
            assert_eq!(plan_of(file), plan_of(s.cluster));
            assert_eq!(check_cluster(s, file, &plan_of(file)), Ok(()));
            let client = labels_of(&with, s.client_pod);
            let server = labels_of(&with, s.server_pod);
            let proto = match s.traffic {
                Traffic::TcpStream => "TCP",
                _ => "UDP",
            };
            let covers = |ports: &[(String, u64, u64)], port: u16| {
                ports
                    .iter()
                    .any(|(p, lo, hi)| p == proto && (*lo..=*hi).contains(&u64::from(port)))
            };
            let (mut ingress_ok, mut egress_ok) = (false, false);
            for np in &with.network_policies {
                let v = serde_json::to_value(np).expect("a policy serialises");
                let spec = &v["spec"];
                let types: Vec<&str> = spec["policyTypes"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                for (dir, peers_field, end, peer_labels) in [
                    ("ingress", "from", &server, &client),
                    ("egress", "to", &client, &server),
                ] {
                    let rules = spec[dir].as_array().cloned().unwrap_or_default();
                    for rule in &rules {
                        assert!(
                            !covers(&ports_of(rule), crate::policy::PROBE_PORT)
                                && !ports_of(rule).is_empty(),
                            "{file}: a rule allows the probe port {}",
                            crate::policy::PROBE_PORT
                        );
                    }
                    let isolates = types.iter().any(|t| t.eq_ignore_ascii_case(dir))
                        && selects(&spec["podSelector"], end);
                    let allows = rules.iter().any(|r| {
                        covers(&ports_of(r), s.port)
                            && r[peers_field].as_array().is_some_and(|ps| {
                                ps.iter().any(|p| selects(&p["podSelector"], peer_labels))
                            })
                    });
                    if isolates && allows {
                        if dir == "ingress" {
                            ingress_ok = true;
                        } else {
                            egress_ok = true;
                        }
                    }
                }
            }
            assert!(
                ingress_ok,
                "{}: no policy isolates {} and admits {} on {}",
                s.name, s.server_pod, s.client_pod, s.port
            );
            assert!(
                egress_ok,
                "{}: no policy isolates {}'s egress and allows {} on {}",
                s.name, s.client_pod, s.server_pod, s.port
            );
        }
    }

    #[test]
    fn check_cluster_refuses_what_cannot_run_encrypted() {
        let wg = *find("node-to-node-wg").expect("node-to-node-wg");
        let keyed = plan_of(WIREGUARD);
        // The clear cluster file has no keys.
        assert!(matches!(
            check_cluster(&wg, TWO_NODE, &plan_of(TWO_NODE)),
            Err(ClusterMismatch::NoWgKeys { ref node, .. }) if node == "node1"
        ));
        // The same scenario in clear runs on it.
        let clear = Scenario {
            encryption: Encryption::None,
            ..wg
        };
        assert_eq!(check_cluster(&clear, TWO_NODE, &plan_of(TWO_NODE)), Ok(()));
        // pod-a2 is on node1 with the client: nothing would cross nodes.
        let same_node = Scenario {
            server_pod: "default/pod-a2",
            ..wg
        };
        assert!(matches!(
            check_cluster(&same_node, WIREGUARD, &keyed),
            Err(ClusterMismatch::SameNode { ref node, .. }) if node == "node1"
        ));
        assert_eq!(
            check_cluster(
                &Scenario {
                    encryption: Encryption::None,
                    ..same_node
                },
                WIREGUARD,
                &keyed
            ),
            Ok(())
        );
        let missing = Scenario {
            server_pod: "default/nope",
            ..wg
        };
        let err = check_cluster(&missing, WIREGUARD, &keyed).expect_err("no such pod");
        assert!(matches!(err, ClusterMismatch::NoPod { role: "server", .. }));
        assert!(err.to_string().contains("default/nope"), "{err}");
        // Keys removed from one node of the keyed file.
        let mut half = keyed.clone();
        half.nodes[1].wireguard.private_key = None;
        let err = check_cluster(&wg, WIREGUARD, &half).expect_err("node2 has no private key");
        assert!(err.to_string().contains("node2"), "{err}");
        assert!(
            err.to_string()
                .contains(testbed::plan::WG_PRIVATE_KEY_ANNOTATION),
            "{err}"
        );
    }

    #[test]
    fn the_three_traffic_kinds_are_covered() {
        for t in [
            Traffic::UdpStream,
            Traffic::TcpStream,
            Traffic::UdpRequestResponse,
        ] {
            assert!(SCENARIOS.iter().any(|s| s.traffic == t), "{t:?}");
        }
    }

    /// Every restart scenario is its plain twin (the name without `-restart`) at a fixed rate
    /// with a restart: same cluster file, pods, target, traffic and port.
    #[test]
    fn restart_scenarios_are_plain_udp_streams_with_a_restart() {
        let with: Vec<&Scenario> = SCENARIOS.iter().filter(|s| s.restart).collect();
        assert!(with.len() >= 2, "same-node and cross-node");
        for s in with {
            let plain_name = s.name.replacen("-restart", "", 1);
            let plain = find(&plain_name).unwrap_or_else(|| panic!("{}: no {plain_name}", s.name));
            assert!(!plain.restart);
            assert!(s.defaults.rate_pps.is_some(), "{}", s.name);
            assert_eq!(
                Scenario {
                    name: plain.name,
                    measures: plain.measures,
                    topology: plain.topology,
                    restart: false,
                    defaults: plain.defaults,
                    ..*s
                },
                *plain,
                "{} differs from {plain_name} in more than the restart",
                s.name
            );
        }
        let p2p = find("pod-to-pod-restart").expect("pod-to-pod-restart");
        assert!(validate(&Scenario {
            defaults: Defaults {
                rate_pps: None,
                ..p2p.defaults
            },
            ..*p2p
        })
        .is_err());
        assert!(validate(&Scenario {
            traffic: Traffic::TcpStream,
            ..*p2p
        })
        .is_err());
        assert!(validate(&Scenario {
            policies: Some(POLICY_PERF),
            ..*p2p
        })
        .is_err());
    }

    #[test]
    fn validation_catches_bad_rows() {
        let good = SCENARIOS[0];
        assert!(validate(&Scenario {
            name: "Bad Name",
            ..good
        })
        .is_err());
        assert!(validate(&Scenario {
            client_pod: "pod-a",
            ..good
        })
        .is_err());
        assert!(validate(&Scenario {
            server_pod: good.client_pod,
            ..good
        })
        .is_err());
        assert!(validate(&Scenario { port: 0, ..good }).is_err());
        assert!(validate(&Scenario {
            target: Target::ClusterIp { service: "echo" },
            ..good
        })
        .is_err());
        assert!(validate(&Scenario {
            target: Target::ClusterIp {
                service: "default/echo"
            },
            ..good
        })
        .is_ok());
        assert!(validate(&Scenario {
            defaults: Defaults {
                size: 20,
                ..good.defaults
            },
            ..good
        })
        .is_err());
        assert!(validate(&Scenario {
            defaults: Defaults {
                rate_pps: Some(0),
                ..good.defaults
            },
            ..good
        })
        .is_err());
    }
}
