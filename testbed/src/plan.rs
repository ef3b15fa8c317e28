//! What to build, read from a cluster file: nodes with their addresses, pods with their node.
//!
//! This is the only module that reads Kubernetes objects (through `control::cluster`, the same
//! reader the agent uses). The checks here run before anything is created:
//! - every node's InternalIP is in one /24 (the fabric is one bridge, one subnet), and `.250` of
//!   that /24 is free for the external client;
//! - every pod with `spec.nodeName` names a node of the file. Pods without a node (unscheduled)
//!   and `hostNetwork` pods get no namespace of their own.
//! - a pod whose file gives it an IPv4 address (`status.podIP`, else the first IPv4 of
//!   `status.podIPs`: what the agent derives EndpointSlices from) inside its node's podCIDR
//!   gets exactly that address (the CNI's `IP=`, [`PlanPod::requested_ip`]); that address must
//!   not be the node's gateway, the CIDR's network or broadcast address, nor another pod's.
//!   Pods without an address, or with one outside their node's CIDR, get the IPAM's next free
//!   address, as a cluster's CNI would give them.
use std::{net::Ipv4Addr, path::Path};

use control::cluster::{self, ClusterError, ClusterState};
use ipnet::Ipv4Net;

use crate::NodeKind;

/// Host part of the external client's address in the nodes' /24.
pub const EXTERNAL_HOST: u8 = 250;
/// Prefix length of the fabric subnet.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// Node annotation choosing what moves the node's pod packets in sluice mode: `kernel` (kernel
/// routing and the kernel's vxlan device, no agent) or `sluice` (the default).
pub const DATAPLANE_ANNOTATION: &str = "sluice.io/testbed-dataplane";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "cluster file {path}: pod {pod} has podIP {ip}, the {what} of node {node}'s podCIDR \
         {cidr}; the CNI cannot give it to a pod: pick another address or leave podIP out"
    )]
    UnusablePodIp {
        path: String,
        pod: String,
        ip: Ipv4Addr,
        what: &'static str,
        node: String,
        cidr: Ipv4Net,
    },
    #[error("cluster file {path}: pods {a} and {b} both have podIP {ip}; give each pod its own")]
    DuplicatePodIp {
        path: String,
        a: String,
        b: String,
        ip: Ipv4Addr,
    },
    #[error("reading cluster file {path}: {source}")]
    Cluster {
        path: String,
        #[source]
        source: ClusterError,
    },
    #[error("cluster file {path} has no Node objects: the testbed needs at least one node")]
    NoNodes { path: String },
    #[error("cluster file {path}: a Node has no metadata.name")]
    UnnamedNode { path: String },
    #[error(
        "cluster file {path}: node {node} has InternalIP {ip}, which is not in {fabric} (the /24 of \
         node {first}); all node InternalIPs must share one /24, the testbed's fabric subnet"
    )]
    NotOneSubnet {
        path: String,
        node: String,
        ip: Ipv4Addr,
        fabric: Ipv4Net,
        first: String,
    },
    #[error(
        "cluster file {path}: node {node} uses {ip}, the address the testbed gives the external \
         client (.{EXTERNAL_HOST} of the fabric /24); give the node another InternalIP"
    )]
    ExternalClash {
        path: String,
        node: String,
        ip: Ipv4Addr,
    },
    #[error("cluster file {path}: nodes {a} and {b} both have InternalIP {ip}")]
    DuplicateIp {
        path: String,
        a: String,
        b: String,
        ip: Ipv4Addr,
    },
    #[error(
        "cluster file {path}: pod {pod} has spec.nodeName {node:?}, which is not a Node in the \
         file; add the Node or fix nodeName"
    )]
    UnknownNode {
        path: String,
        pod: String,
        node: String,
    },
    #[error(
        "cluster file {path}: node {node} has annotation {DATAPLANE_ANNOTATION}: {value:?}; \
         use \"kernel\" or \"sluice\" (or leave it out: sluice)"
    )]
    BadDataplane {
        path: String,
        node: String,
        value: String,
    },
    #[error("cluster file {path}: pod {pod} appears twice")]
    DuplicatePod { path: String, pod: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// From [`DATAPLANE_ANNOTATION`].
    pub kind: NodeKind,
    /// `aa:bb:cc:dd:ee:ff`, as the agents compute it (`control::overlay::vtep_mac`: the
    /// `sluice.io/vtep-mac` annotation, else derived from the InternalIP).
    pub vtep_mac: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// The address the file gives the pod, when it is inside its node's podCIDR: passed to the
    /// CNI plugin as `CNI_ARGS` `IP=`. `None`: the IPAM picks (creation order).
    pub requested_ip: Option<Ipv4Addr>,
}

impl PlanPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub nodes: Vec<PlanNode>,
    pub pods: Vec<PlanPod>,
    /// The /24 shared by the node uplinks and the external client.
    pub fabric: Ipv4Net,
    pub external_ip: Ipv4Addr,
}

/// Reads and checks a cluster file.
pub fn load(path: &Path) -> Result<Plan, PlanError> {
    let shown = path.display().to_string();
    let state = cluster::load_file(path).map_err(|source| PlanError::Cluster {
        path: shown.clone(),
        source,
    })?;
    from_state(&shown, &state)
}

fn from_state(path: &str, state: &ClusterState) -> Result<Plan, PlanError> {
    let mut nodes = Vec::new();
    for node in &state.nodes {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or_else(|| PlanError::UnnamedNode { path: path.into() })?;
        let info = state
            .node_info(&name)
            .map_err(|source| PlanError::Cluster {
                path: path.into(),
                source,
            })?;
        let annotation = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DATAPLANE_ANNOTATION));
        let kind = match annotation.map(|v| v.trim()) {
            None | Some("sluice") => NodeKind::Sluice,
            Some("kernel") => NodeKind::Kernel,
            Some(other) => {
                return Err(PlanError::BadDataplane {
                    path: path.into(),
                    node: name,
                    value: other.to_string(),
                })
            }
        };
        nodes.push(PlanNode {
            vtep_mac: control::overlay::vtep_mac(node, info.internal_ip).to_string(),
            name,
            ip: info.internal_ip,
            pod_cidr: info.pod_cidr,
            gateway: info.gateway,
            kind,
        });
    }
    let mut pods = Vec::new();
    for pod in &state.pods {
        let spec = pod.spec.as_ref();
        let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            continue;
        }
        let node_cidr = nodes.iter().find(|n| n.name == node).map(|n| n.pod_cidr);
        // The address as the agent reads it (`control::cluster`'s EndpointSlice derivation):
        // `status.podIP`, else the first IPv4 address in `status.podIPs`.
        let file_ip = pod.status.as_ref().and_then(|status| {
            status
                .pod_ip
                .iter()
                .chain(status.pod_ips.iter().flatten().map(|p| &p.ip))
                .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
        });
        let requested_ip = file_ip.filter(|ip| node_cidr.is_some_and(|c| c.contains(ip)));
        pods.push(PlanPod {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node,
            requested_ip,
        });
    }
    build(path, nodes, pods)
}

/// Checks nodes and pods (the rules in the module doc) and computes the fabric subnet.
pub fn build(path: &str, nodes: Vec<PlanNode>, pods: Vec<PlanPod>) -> Result<Plan, PlanError> {
    let first = nodes
        .first()
        .ok_or_else(|| PlanError::NoNodes { path: path.into() })?;
    let fabric = Ipv4Net::new(first.ip, FABRIC_PREFIX_LEN)
        .map(|net| net.trunc())
        .map_err(|_| PlanError::NoNodes { path: path.into() })?;
    let external_ip = Ipv4Addr::from(u32::from(fabric.network()) | u32::from(EXTERNAL_HOST));
    for (index, node) in nodes.iter().enumerate() {
        if !fabric.contains(&node.ip) {
            return Err(PlanError::NotOneSubnet {
                path: path.into(),
                node: node.name.clone(),
                ip: node.ip,
                fabric,
                first: first.name.clone(),
            });
        }
        if node.ip == external_ip {
            return Err(PlanError::ExternalClash {
                path: path.into(),
                node: node.name.clone(),
                ip: node.ip,
            });
        }
        if let Some(other) = nodes[..index].iter().find(|n| n.ip == node.ip) {
            return Err(PlanError::DuplicateIp {
                path: path.into(),
                a: other.name.clone(),
                b: node.name.clone(),
                ip: node.ip,
            });
        }
    }
    for (index, pod) in pods.iter().enumerate() {
        if !nodes.iter().any(|n| n.name == pod.node) {
            return Err(PlanError::UnknownNode {
                path: path.into(),
                pod: pod.key(),
                node: pod.node.clone(),
            });
        }
        if pods[..index].iter().any(|p| p.key() == pod.key()) {
            return Err(PlanError::DuplicatePod {
                path: path.into(),
                pod: pod.key(),
            });
        }
        let Some(ip) = pod.requested_ip else {
            continue;
        };
        if let Some(node) = nodes.iter().find(|n| n.name == pod.node) {
            let cidr = node.pod_cidr.trunc();
            let what = if ip == node.gateway {
                Some("gateway")
            } else if ip == cidr.network() {
                Some("network address")
            } else if ip == cidr.broadcast() {
                Some("broadcast address")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(PlanError::UnusablePodIp {
                    path: path.into(),
                    pod: pod.key(),
                    ip,
                    what,
                    node: node.name.clone(),
                    cidr,
                });
            }
        }
        if let Some(other) = pods[..index].iter().find(|p| p.requested_ip == Some(ip)) {
            return Err(PlanError::DuplicatePodIp {
                path: path.into(),
                a: other.key(),
                b: pod.key(),
                ip,
            });
        }
    }
    Ok(Plan {
        nodes,
        pods,
        fabric,
        external_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: [u8; 4], third: u8) -> PlanNode {
        PlanNode {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).expect("valid"),
            gateway: Ipv4Addr::new(10, 244, third, 1),
            kind: NodeKind::Sluice,
            vtep_mac: "0a:58:00:00:00:00".into(),
        }
    }

    fn pod(name: &str, node: &str) -> PlanPod {
        PlanPod {
            namespace: "default".into(),
            name: name.into(),
            node: node.into(),
            requested_ip: None,
        }
    }

    fn pod_at(name: &str, node: &str, ip: [u8; 4]) -> PlanPod {
        PlanPod {
            requested_ip: Some(Ipv4Addr::from(ip)),
            ..pod(name, node)
        }
    }

    #[test]
    fn nodes_in_one_slash24_get_the_external_client_at_250() {
        let plan = build(
            "f",
            vec![
                node("n1", [192, 168, 7, 11], 1),
                node("n2", [192, 168, 7, 12], 2),
            ],
            vec![pod("a", "n1"), pod("b", "n2")],
        )
        .expect("valid plan");
        assert_eq!(plan.fabric.to_string(), "192.168.7.0/24");
        assert_eq!(plan.external_ip, Ipv4Addr::new(192, 168, 7, 250));
        assert_eq!(plan.pods[1].key(), "default/b");
    }

    #[test]
    fn nodes_in_different_subnets_are_refused() {
        let err = build(
            "f",
            vec![
                node("n1", [192, 168, 7, 11], 1),
                node("n2", [192, 168, 8, 12], 2),
            ],
            vec![],
        )
        .expect_err("two subnets");
        assert!(
            matches!(err, PlanError::NotOneSubnet { ref node, .. } if node == "n2"),
            "{err}"
        );
    }

    #[test]
    fn a_node_on_the_external_address_is_refused() {
        let err = build("f", vec![node("n1", [10, 0, 0, 250], 1)], vec![]).expect_err("clash");
        assert!(matches!(err, PlanError::ExternalClash { .. }), "{err}");
    }

    #[test]
    fn duplicate_node_ips_are_refused() {
        let err = build(
            "f",
            vec![node("n1", [10, 0, 0, 1], 1), node("n2", [10, 0, 0, 1], 2)],
            vec![],
        )
        .expect_err("duplicate");
        assert!(matches!(err, PlanError::DuplicateIp { .. }), "{err}");
    }

    #[test]
    fn pods_on_unknown_nodes_and_duplicate_pods_are_refused() {
        let nodes = vec![node("n1", [10, 0, 0, 1], 1)];
        let err = build("f", nodes.clone(), vec![pod("a", "n9")]).expect_err("unknown node");
        assert!(matches!(err, PlanError::UnknownNode { .. }), "{err}");
        let err = build("f", nodes, vec![pod("a", "n1"), pod("a", "n1")]).expect_err("dup pod");
        assert!(matches!(err, PlanError::DuplicatePod { .. }), "{err}");
    }

    const ANNOTATED: &str = "
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Node
metadata:
  name: n2
  annotations: {sluice.io/testbed-dataplane: kernel, sluice.io/vtep-mac: \"02:aa:bb:cc:dd:ee\"}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
";

    #[test]
    fn node_kinds_and_vtep_macs_come_from_annotations() {
        let state = cluster::parse_str(ANNOTATED, "t.yaml").expect("parses");
        let plan = from_state("t.yaml", &state).expect("valid plan");
        assert_eq!(plan.nodes[0].kind, NodeKind::Sluice);
        assert_eq!(plan.nodes[0].vtep_mac, "0a:58:ac:12:00:0b", "derived");
        assert_eq!(plan.nodes[1].kind, NodeKind::Kernel);
        assert_eq!(plan.nodes[1].vtep_mac, "02:aa:bb:cc:dd:ee", "annotated");
    }

    #[test]
    fn an_unknown_dataplane_is_refused() {
        let text = ANNOTATED.replace("dataplane: kernel", "dataplane: cilium");
        let state = cluster::parse_str(&text, "t.yaml").expect("parses");
        let err = from_state("t.yaml", &state).expect_err("unknown kind");
        assert!(
            matches!(err, PlanError::BadDataplane { ref node, ref value, .. } if node == "n2" && value == "cilium"),
            "{err}"
        );
    }

    const PODS: &str = "
---
apiVersion: v1
kind: Pod
metadata: {name: at-10, namespace: default}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: v6-first, namespace: default}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIPs: [{ip: \"fd00::5\"}, {ip: 10.244.2.7}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other-cidr, namespace: default}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.244.2.9}
---
apiVersion: v1
kind: Pod
metadata: {name: no-ip, namespace: default}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
";

    #[test]
    fn pods_request_the_file_address_only_inside_their_node_cidr() {
        let text = format!("{ANNOTATED}{PODS}");
        let state = cluster::parse_str(&text, "t.yaml").expect("parses");
        let plan = from_state("t.yaml", &state).expect("valid plan");
        let requested: Vec<(String, Option<Ipv4Addr>)> = plan
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.requested_ip))
            .collect();
        assert_eq!(
            requested,
            [
                // (The cluster reader lists pods by namespace/name.)
                ("at-10".to_string(), Some(Ipv4Addr::new(10, 244, 1, 10))),
                ("no-ip".to_string(), None),
                // 10.244.2.9 is node n2's range, not n1's: the IPAM picks.
                ("other-cidr".to_string(), None),
                ("v6-first".to_string(), Some(Ipv4Addr::new(10, 244, 2, 7))),
            ]
        );
    }

    #[test]
    fn pod_addresses_the_cni_cannot_give_are_refused() {
        let nodes = vec![node("n1", [10, 0, 0, 1], 1)];
        for (ip, what) in [
            ([10, 244, 1, 1], "gateway"),
            ([10, 244, 1, 0], "network address"),
            ([10, 244, 1, 255], "broadcast address"),
        ] {
            let err = build("f", nodes.clone(), vec![pod_at("a", "n1", ip)]).expect_err(what);
            assert!(
                matches!(err, PlanError::UnusablePodIp { what: w, .. } if w == what),
                "{err}"
            );
            assert!(err.to_string().contains("default/a"), "{err}");
        }
        let err = build(
            "f",
            nodes.clone(),
            vec![
                pod_at("a", "n1", [10, 244, 1, 9]),
                pod_at("b", "n1", [10, 244, 1, 9]),
            ],
        )
        .expect_err("same address twice");
        assert!(
            matches!(err, PlanError::DuplicatePodIp { ref a, ref b, .. } if a == "default/a" && b == "default/b"),
            "{err}"
        );
        build(
            "f",
            nodes,
            vec![
                pod_at("a", "n1", [10, 244, 1, 9]),
                pod("b", "n1"),
                pod("c", "n1"),
            ],
        )
        .expect("one request and two IPAM picks");
    }

    #[test]
    fn no_nodes_is_refused() {
        assert!(matches!(
            build("f", vec![], vec![]),
            Err(PlanError::NoNodes { .. })
        ));
    }
}
