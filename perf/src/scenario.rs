//! Scenarios as data: which cluster file, which pod talks to which server, what traffic, and the
//! default parameters. `sluice-perf run NAME` looks a name up here and the runner is generic over
//! the entry, so a later issue adds its measurement by adding a row (cross-node: the two-node
//! cluster file and pods on different nodes; a Service: [`Target::ClusterIp`]; WireGuard: the
//! cluster file that enables it).
//!
//! Every scenario runs in each [`crate::metrics`] mode (sluice, then the kernel baseline) on the
//! same cluster file, so the two figures compare like with like. For a [`Target::ClusterIp`]
//! scenario the kernel baseline is kube-proxy's nftables mode: the testbed loads rules shaped
//! like it into the kernel nodes ([`crate::service`], `testbed::nft`).

use serde::{Deserialize, Serialize};

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
        defaults: Defaults {
            duration_s: 5,
            size: 128 * 1024,
            rate_pps: None,
            flows: 1,
        },
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Names for error messages.
pub fn names() -> Vec<&'static str> {
    SCENARIOS.iter().map(|s| s.name).collect()
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
    if !s.cluster.ends_with(".yaml") {
        return Err(format!(
            "{}: cluster {:?} is not a .yaml file",
            s.name, s.cluster
        ));
    }
    let d = s.defaults;
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
