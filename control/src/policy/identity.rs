//! Pods as policy sees them, and their grouping into identities.
//!
//! As Cilium's: pods with the same namespace, labels, namespace labels and named container
//! ports are indistinguishable to every selector and every named port, so they share one
//! identity and one set of rules. The dataplane maps every pod address of the cluster to its
//! identity id; rules name identities, so a rule's size depends on how many *kinds* of pods a
//! selector picks, not on how many pods there are.
//!
//! Which pods count: those with an IPv4 `status.podIP`, not `hostNetwork` (their address is the
//! node's, which NetworkPolicy does not govern) and not finished (`Succeeded`/`Failed`: the
//! address may already belong to a new pod). When two remaining pods claim one address, the
//! first in (namespace, name) order keeps it and a warning names the other.
//!
//! Identity ids are assigned in sorted key order starting at [`FIRST_POD_IDENTITY`] (ids below
//! it are reserved, like Cilium's reserved identities), so equal cluster states give equal ids.
//! Adding a new kind of pod can renumber later identities; the compiled table then differs and
//! the agent publishes a new policy generation, which is correct if not minimal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;

use super::model::{namespace_labels, Protocol};
use super::selector::Labels;
use super::PolicyWarning;
use crate::cluster::{ClusterState, DEFAULT_NAMESPACE, INTERNAL_IP};

/// The first identity id given to pods.
pub const FIRST_POD_IDENTITY: u32 = 256;

/// A container port with a name: what a named policy port resolves to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod that policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    /// The IPv4 `status.podIP`.
    pub addr: Ipv4Addr,
    /// `spec.nodeName` (empty when not scheduled).
    pub node: String,
    pub labels: Labels,
    /// Labels of the pod's namespace (with `kubernetes.io/metadata.name`).
    pub namespace_labels: Labels,
    /// Named ports of `spec.containers`, sorted.
    pub named_ports: Vec<NamedPort>,
}

impl PodView {
    /// Port numbers of the container ports named `name` with `protocol`.
    pub fn resolve(&self, name: &str, protocol: Protocol) -> impl Iterator<Item = u16> + '_ {
        let name = name.to_owned();
        self.named_ports
            .iter()
            .filter(move |p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// The pods policy applies to, in (namespace, name) order, and warnings about address clashes.
pub fn pod_views(state: &ClusterState) -> (Vec<PodView>, Vec<PolicyWarning>) {
    let ns_labels = namespace_labels(state);
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for pod in &state.pods {
        let Some(view) = view(pod, &ns_labels) else {
            continue;
        };
        if let Some(first) = seen.get(&view.addr) {
            warnings.push(PolicyWarning {
                object: format!("Pod {}", view.key),
                field: "status.podIP".into(),
                message: format!(
                    "address {} is also Pod {first}'s; policy treats it as {first}'s",
                    view.addr
                ),
            });
            continue;
        }
        seen.insert(view.addr, view.key.clone());
        out.push(view);
    }
    (out, warnings)
}

fn view(pod: &Pod, ns_labels: &BTreeMap<String, Labels>) -> Option<PodView> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let addr: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let mut named_ports: Vec<NamedPort> = spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone().filter(|n| !n.is_empty())?;
            let protocol = Protocol::parse_k8s(p.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(p.container_port).ok().filter(|&n| n > 0)?;
            Some(NamedPort {
                name,
                protocol,
                port,
            })
        })
        .collect();
    named_ports.sort();
    named_ports.dedup();
    Some(PodView {
        key: ClusterState::pod_key(pod),
        namespace_labels: ns_labels.get(&namespace).cloned().unwrap_or_default(),
        namespace,
        addr,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        named_ports,
    })
}

/// What makes two pods indistinguishable to policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    pub namespace_labels: Labels,
    pub named_ports: Vec<NamedPort>,
}

impl IdentityKey {
    fn of(pod: &PodView) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            namespace_labels: pod.namespace_labels.clone(),
            named_ports: pod.named_ports.clone(),
        }
    }
}

/// Identities of a set of pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities {
    /// Every identity with its id, in id order.
    pub identities: Vec<(u32, IdentityKey)>,
    /// Identity id of each pod, same order as the pods given.
    pub of_pod: Vec<u32>,
}

impl Identities {
    /// Groups `pods` (module doc).
    pub fn new(pods: &[PodView]) -> Self {
        let keys: BTreeSet<IdentityKey> = pods.iter().map(IdentityKey::of).collect();
        let identities: Vec<(u32, IdentityKey)> = keys
            .into_iter()
            .zip(FIRST_POD_IDENTITY..)
            .map(|(k, id)| (id, k))
            .collect();
        let index: BTreeMap<&IdentityKey, u32> =
            identities.iter().map(|(id, k)| (k, *id)).collect();
        let of_pod = pods
            .iter()
            .map(|p| index.get(&IdentityKey::of(p)).copied().unwrap_or(0))
            .collect();
        Self { identities, of_pod }
    }
}

/// IPv4 `InternalIP` and `ExternalIP` addresses of node `name`, sorted.
pub fn node_addresses(state: &ClusterState, name: &str) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = state
        .node(name)
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == INTERNAL_IP || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// IPv4 `InternalIP`s of every node of the cluster, sorted: the peers of the failsafe ports
/// that are only open to nodes (VXLAN, WireGuard).
pub fn cluster_node_ips(state: &ClusterState) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = state
        .nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == INTERNAL_IP)
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}
