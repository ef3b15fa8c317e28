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
//! - WireGuard keys: a node's public key is its [`PUBLIC_KEY_ANNOTATION`] (what agents read for
//!   their peers); for the testbed only, its private key is [`WG_PRIVATE_KEY_ANNOTATION`]. Both
//!   must be base64 32-byte keys (`wg genkey`, `wg pubkey`); a node with a private key must also
//!   carry its public key, and the two must match, so that what peers read is what the node
//!   uses. A `kernel-wireguard` node must have both.
use std::{net::Ipv4Addr, path::Path};

use control::{
    cluster::{self, ClusterError, ClusterState},
    wg::{PrivateKey, PublicKey, PUBLIC_KEY_ANNOTATION},
};
use ipnet::Ipv4Net;

use crate::NodeKind;

/// Host part of the external client's address in the nodes' /24.
pub const EXTERNAL_HOST: u8 = 250;
/// Prefix length of the fabric subnet.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// Node annotation choosing what moves the node's pod packets in sluice mode: `kernel` (kernel
/// routing and the kernel's vxlan device, no agent), `kernel-wireguard` (the same, with the
/// vxlan packets to other nodes carried by wireguard-go) or `sluice` (the default).
pub const DATAPLANE_ANNOTATION: &str = "sluice.io/testbed-dataplane";
/// Node annotation with the node's WireGuard private key (base64, `wg genkey`), for the testbed
/// only: a real node keeps it in its state directory and publishes only the public key.
pub const WG_PRIVATE_KEY_ANNOTATION: &str = "sluice.io/testbed-wg-private-key";

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
         use \"kernel\", \"kernel-wireguard\" or \"sluice\" (or leave it out: sluice)"
    )]
    BadDataplane {
        path: String,
        node: String,
        value: String,
    },
    #[error(
        "cluster file {path}: node {node} has annotation {annotation}: {value:?}, which is not a \
         base64 32-byte WireGuard key ({reason}); make a pair with `wg genkey | tee private | wg \
         pubkey`"
    )]
    BadWgKey {
        path: String,
        node: String,
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "cluster file {path}: node {node}'s private key ({WG_PRIVATE_KEY_ANNOTATION}) belongs to \
         public key {derived}, but its annotation {PUBLIC_KEY_ANNOTATION} is {annotated:?}; peers \
         would not accept the node: set {PUBLIC_KEY_ANNOTATION}: {derived:?}"
    )]
    WgKeyMismatch {
        path: String,
        node: String,
        derived: String,
        annotated: Option<String>,
    },
    #[error(
        "cluster file {path}: node {node} is a kernel-wireguard node but has no WireGuard key: \
         give it the annotations {WG_PRIVATE_KEY_ANNOTATION} (`wg genkey`) and \
         {PUBLIC_KEY_ANNOTATION} (its `wg pubkey`)"
    )]
    NoWgKey { path: String, node: String },
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
    /// From [`WG_PRIVATE_KEY_ANNOTATION`] and [`PUBLIC_KEY_ANNOTATION`] (module doc).
    pub wireguard: WgKeys,
}

/// A node's WireGuard keys as the cluster file gives them, checked and in canonical base64.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WgKeys {
    /// What peers use ([`PUBLIC_KEY_ANNOTATION`]).
    pub public_key: Option<String>,
    /// The node's own key ([`WG_PRIVATE_KEY_ANNOTATION`]); when present, `public_key` is its
    /// public key.
    pub private_key: Option<String>,
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
        let annotations = node.metadata.annotations.as_ref();
        let annotation = annotations.and_then(|a| a.get(DATAPLANE_ANNOTATION));
        let kind = match annotation.map(|v| v.trim()) {
            None | Some("sluice") => NodeKind::Sluice,
            Some("kernel") => NodeKind::Kernel,
            Some("kernel-wireguard") => NodeKind::KernelWireguard,
            Some(other) => {
                return Err(PlanError::BadDataplane {
                    path: path.into(),
                    node: name,
                    value: other.to_string(),
                })
            }
        };
        let wireguard = wg_keys(
            path,
            &name,
            annotations.and_then(|a| a.get(PUBLIC_KEY_ANNOTATION)),
            annotations.and_then(|a| a.get(WG_PRIVATE_KEY_ANNOTATION)),
        )?;
        if kind == NodeKind::KernelWireguard && wireguard.private_key.is_none() {
            return Err(PlanError::NoWgKey {
                path: path.into(),
                node: name,
            });
        }
        nodes.push(PlanNode {
            vtep_mac: control::overlay::vtep_mac(node, info.internal_ip).to_string(),
            wireguard,
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

/// A node's key annotations, checked (module doc).
pub fn wg_keys(
    path: &str,
    node: &str,
    public: Option<&String>,
    private: Option<&String>,
) -> Result<WgKeys, PlanError> {
    let bad = |annotation: &'static str, value: &str, reason: String| PlanError::BadWgKey {
        path: path.into(),
        node: node.into(),
        annotation,
        value: value.into(),
        reason,
    };
    let public_key = public
        .map(|v| {
            PublicKey::from_base64(v)
                .map(|k| k.to_base64())
                .map_err(|reason| bad(PUBLIC_KEY_ANNOTATION, v, reason))
        })
        .transpose()?;
    let private_key = private
        .map(|v| {
            PrivateKey::from_base64(v).map_err(|reason| bad(WG_PRIVATE_KEY_ANNOTATION, v, reason))
        })
        .transpose()?;
    if let Some(key) = &private_key {
        let derived = key.public_key().to_base64();
        if public_key.as_deref() != Some(derived.as_str()) {
            return Err(PlanError::WgKeyMismatch {
                path: path.into(),
                node: node.into(),
                derived,
                annotated: public.cloned(),
            });
        }
    }
    Ok(WgKeys {
        public_key,
        private_key: private_key.map(|k| k.to_base64()),
    })
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
            wireguard: WgKeys::default(),
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

    /// Pairs made with `wg genkey | tee private | wg pubkey`.
    const PRIVATE_1: &str = "IMtFMu88FJkTORctIv3UxbXBgmI94VGJBOplTqCTwlg=";
    const PUBLIC_1: &str = "F67yS5yg5sxofTAV8scCul69HAKGFpYLBa5wbwTvJH0=";
    const PRIVATE_2: &str = "QBPk8z4vWwnV4Pv5WDvFQqc0KH7xvuu5XDyW7fEVTG0=";
    const PUBLIC_2: &str = "+1HBB8avFFxPdmma/CYyzkkGlRmq6s1ekHOrSdeRmkM=";

    /// n1: a sluice node with both keys; n2: a kernel-wireguard node with both keys.
    fn keyed(n1_annotations: &str, n2_annotations: &str) -> String {
        format!(
            "
apiVersion: v1
kind: Node
metadata:
  name: n1
  annotations: {{{n1_annotations}}}
spec: {{podCIDR: 10.244.1.0/24}}
status: {{addresses: [{{type: InternalIP, address: 172.18.0.11}}]}}
---
apiVersion: v1
kind: Node
metadata:
  name: n2
  annotations: {{{n2_annotations}}}
spec: {{podCIDR: 10.244.2.0/24}}
status: {{addresses: [{{type: InternalIP, address: 172.18.0.12}}]}}
"
        )
    }

    fn keys(public: &str, private: &str) -> String {
        format!("{PUBLIC_KEY_ANNOTATION}: \"{public}\", {WG_PRIVATE_KEY_ANNOTATION}: \"{private}\"")
    }

    fn plan_of(text: &str) -> Result<Plan, PlanError> {
        let state = cluster::parse_str(text, "t.yaml").expect("parses");
        from_state("t.yaml", &state)
    }

    #[test]
    fn wireguard_keys_and_the_kernel_wireguard_kind_come_from_annotations() {
        let n2 = format!(
            "{DATAPLANE_ANNOTATION}: kernel-wireguard, {}",
            keys(PUBLIC_2, PRIVATE_2)
        );
        let plan = plan_of(&keyed(&keys(PUBLIC_1, PRIVATE_1), &n2)).expect("valid plan");
        assert_eq!(plan.nodes[0].kind, NodeKind::Sluice);
        assert_eq!(
            plan.nodes[0].wireguard,
            WgKeys {
                public_key: Some(PUBLIC_1.into()),
                private_key: Some(PRIVATE_1.into()),
            }
        );
        assert_eq!(plan.nodes[1].kind, NodeKind::KernelWireguard);
        assert_eq!(
            plan.nodes[1].wireguard.public_key.as_deref(),
            Some(PUBLIC_2)
        );
        assert_eq!(
            plan.nodes[1].wireguard.private_key.as_deref(),
            Some(PRIVATE_2)
        );
        // A node with only a public key (its private key lives elsewhere) is a peer.
        let plan = plan_of(&keyed(
            &format!("{PUBLIC_KEY_ANNOTATION}: \"{PUBLIC_1}\""),
            "",
        ))
        .expect("public key only");
        assert_eq!(
            plan.nodes[0].wireguard.public_key.as_deref(),
            Some(PUBLIC_1)
        );
        assert_eq!(plan.nodes[0].wireguard.private_key, None);
        assert_eq!(plan.nodes[1].wireguard, WgKeys::default());
    }

    #[test]
    fn bad_wireguard_key_annotations_are_refused_naming_the_node() {
        for (n2, annotation) in [
            (keys("not base64!", PRIVATE_2), PUBLIC_KEY_ANNOTATION),
            (keys(PUBLIC_2, "c2hvcnQ="), WG_PRIVATE_KEY_ANNOTATION),
        ] {
            let err = plan_of(&keyed("", &n2)).expect_err("bad key");
            assert!(
                matches!(err, PlanError::BadWgKey { ref node, annotation: a, .. } if node == "n2" && a == annotation),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("node n2") && text.contains(annotation),
                "{text}"
            );
        }
        // The private key of node 1 with the public key of node 2: peers would reject n2.
        let err = plan_of(&keyed("", &keys(PUBLIC_2, PRIVATE_1))).expect_err("mismatch");
        assert!(
            matches!(err, PlanError::WgKeyMismatch { ref node, ref derived, .. } if node == "n2" && derived == PUBLIC_1),
            "{err}"
        );
        // A private key without its public key: peers could not know it.
        let err = plan_of(&keyed(
            &format!("{WG_PRIVATE_KEY_ANNOTATION}: \"{PRIVATE_1}\""),
            "",
        ))
        .expect_err("no public key");
        assert!(
            matches!(err, PlanError::WgKeyMismatch { ref node, annotated: None, .. } if node == "n1"),
            "{err}"
        );
        // A kernel-wireguard node cannot run wireguard-go without a key.
        let err = plan_of(&keyed(
            "",
            &format!("{DATAPLANE_ANNOTATION}: kernel-wireguard"),
        ))
        .expect_err("no key");
        assert!(
            matches!(err, PlanError::NoWgKey { ref node, .. } if node == "n2"),
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
