//! What to build, read from a cluster file: nodes with their addresses, pods with their node.
//!
//! This is the only module that reads Kubernetes objects (through `control::cluster`, the same
//! reader the agent uses). The checks here run before anything is created:
//! - every node's InternalIP is in one /24 (the fabric is one bridge, one subnet), and `.250` of
//!   that /24 is free for the external client;
//! - every pod with `spec.nodeName` names a node of the file. Pods without a node (unscheduled)
//!   and `hostNetwork` pods get no namespace of their own.
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
        pods.push(PlanPod {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node,
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

    #[test]
    fn no_nodes_is_refused() {
        assert!(matches!(
            build("f", vec![], vec![]),
            Err(PlanError::NoNodes { .. })
        ));
    }
}
