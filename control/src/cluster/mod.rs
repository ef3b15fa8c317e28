//! Cluster state as real Kubernetes objects, read from a multi-document YAML file.
//!
//! ```text
//!  cluster.yaml ──parse_str/load_file──> ClusterState { nodes, namespaces, pods, services,
//!  (kubectl get -o yaml,                                 endpoint_slices, network_policies,
//!                                                        host_policies }
//!   hand-written, testbed)                     │            (k8s_openapi types, sorted)
//!  API server (kube-rs watchers, later) ───────┘
//!                                              └──> node_info / pods_on / effective_endpoint_slices
//!                                                   ──> snapshot compiler, testbed
//! ```
//!
//! The state holds the `k8s_openapi` types themselves, so the file source and the API-server
//! source feed one translation path. A file is a YAML stream (`---` separated) of objects of the
//! seven kinds sluice reads (the six Kubernetes kinds and sluice's `HostNetworkPolicy`), `kind: List` (or `PodList`, ...) documents with `items`, and empty
//! documents; objects of other kinds (Deployments, ConfigMaps, ... in a `kubectl get all` dump)
//! are skipped with a warning.
//!
//! Invariants of a [`ClusterState`] from [`parse_str`]/[`load_file`]:
//! - every object has a non-empty `metadata.name`; namespaced objects have
//!   `metadata.namespace` (defaulted to `default`); (kind, namespace, name) is unique;
//! - every Node has an IPv4 `InternalIP`, and its `spec.podCIDR`, when set, is an IPv4 network;
//! - every Pod's `spec.nodeName`, when set, names a Node of the state; `status.podIP`, when set,
//!   is IPv4;
//! - Service `spec.clusterIP` (unless empty or `None`) is IPv4; every port number is 1..=65535;
//! - each vector is sorted by (namespace, name), so equal files give equal states.
//!
//! Errors name the file, the 1-based document index (and `items[i]` inside a List), the object
//! and the field path: `cluster.yaml: document 3 (Pod default/web):
//! spec.containers[0].ports[0].containerPort: invalid type: string "x", expected i32`.

mod checkpoint;
mod endpoints;
mod error;
mod parse;
mod source;
pub(crate) mod validate;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use checkpoint::ToYamlError;
pub use endpoints::{
    ENDPOINTSLICE_CONTROLLER, MANAGED_BY_LABEL, MAX_ENDPOINTS_PER_SLICE, SERVICE_NAME_LABEL,
};
pub use error::{ClusterError, Location};
pub use parse::{parse_str, DEFAULT_NAMESPACE};
pub use source::FileSource;
pub use validate::INTERNAL_IP;

/// Which kinds of objects changed between two states (so the agent rebuilds only the tables
/// they feed). A source that cannot tell says [`ChangedKinds::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangedKinds(u8);

impl ChangedKinds {
    pub const NONE: ChangedKinds = ChangedKinds(0);
    pub const NODES: ChangedKinds = ChangedKinds(1);
    pub const NAMESPACES: ChangedKinds = ChangedKinds(1 << 1);
    pub const PODS: ChangedKinds = ChangedKinds(1 << 2);
    pub const SERVICES: ChangedKinds = ChangedKinds(1 << 3);
    pub const ENDPOINT_SLICES: ChangedKinds = ChangedKinds(1 << 4);
    pub const NETWORK_POLICIES: ChangedKinds = ChangedKinds(1 << 5);
    pub const HOST_POLICIES: ChangedKinds = ChangedKinds(1 << 6);
    pub const ALL: ChangedKinds = ChangedKinds(0x7f);

    /// What `services::translate` reads: Services, EndpointSlices, the Pods behind derived
    /// slices, and the Nodes (NodePort addresses, endpoint locality).
    const SERVICE_INPUTS: ChangedKinds = ChangedKinds(1 | 1 << 2 | 1 << 3 | 1 << 4);
    /// What `policy::compile` reads: Pods and Namespaces (identities), the policies, and the
    /// Nodes (host endpoints).
    const POLICY_INPUTS: ChangedKinds = ChangedKinds(1 | 1 << 1 | 1 << 2 | 1 << 5 | 1 << 6);

    pub fn union(self, other: ChangedKinds) -> ChangedKinds {
        ChangedKinds(self.0 | other.0)
    }
    pub fn contains(self, other: ChangedKinds) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The service plan may differ.
    pub fn services(self) -> bool {
        self.0 & Self::SERVICE_INPUTS.0 != 0
    }
    /// The policy table may differ.
    pub fn policy(self) -> bool {
        self.0 & Self::POLICY_INPUTS.0 != 0
    }
}

/// The Kubernetes objects sluice translates, each vector sorted by (namespace, name).
///
/// Objects are shared (`Arc`): a source hands out a new state per batch by cloning pointers,
/// not objects, and the translation caches recognise an unchanged object by its pointer
/// ([`Arc::ptr_eq`]), so a change costs work in proportion to what changed. Replace an object
/// to change it (`Arc::make_mut` copies it when it is shared).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// `v1` Nodes.
    pub nodes: Vec<Arc<Node>>,
    /// `v1` Namespaces.
    pub namespaces: Vec<Arc<Namespace>>,
    /// `v1` Pods.
    pub pods: Vec<Arc<Pod>>,
    /// `v1` Services.
    pub services: Vec<Arc<Service>>,
    /// `discovery.k8s.io/v1` EndpointSlices as given (see
    /// [`effective_endpoint_slices`](ClusterState::effective_endpoint_slices) for derived ones).
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// `networking.k8s.io/v1` NetworkPolicies.
    pub network_policies: Vec<Arc<NetworkPolicy>>,
    /// `policy.sluice.io/v1alpha1` HostNetworkPolicies (cluster-scoped, sorted by name).
    pub host_policies: Vec<Arc<crate::policy::HostNetworkPolicy>>,
}

/// What a node's dataplane needs to know about a node: its pod network and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDR`: the addresses of this node's pods.
    pub pod_cidr: Ipv4Net,
    /// The address pods route everything to (first host of `pod_cidr`), answered by the
    /// dataplane's ARP responder.
    pub gateway: Ipv4Addr,
    /// The IPv4 `InternalIP`: where other nodes reach this one (VXLAN/WireGuard endpoint).
    pub internal_ip: Ipv4Addr,
}

/// Reads and parses a cluster file; errors name `path`.
pub fn load_file(path: &Path) -> Result<ClusterState, ClusterError> {
    let bytes = std::fs::read(path).map_err(|e| ClusterError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
        source: Some(e),
    })?;
    load_bytes(&bytes, path)
}

pub(crate) fn load_bytes(bytes: &[u8], path: &Path) -> Result<ClusterState, ClusterError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ClusterError::Read {
        path: path.to_owned(),
        reason: format!("not UTF-8 text ({e}); save the file as UTF-8"),
        source: None,
    })?;
    parse_str(text, &path.display().to_string())
}

/// The order of a state's vectors: (namespace, name), a missing field as "" (the order of the
/// Kubernetes source's stores, so its states need no sorting).
pub(crate) fn name_order(a: &ObjectMeta, b: &ObjectMeta) -> std::cmp::Ordering {
    fn key(m: &ObjectMeta) -> (&str, &str) {
        (
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or(""),
        )
    }
    key(a).cmp(&key(b))
}

fn sort_by_name<T>(objects: &mut [T], meta: impl Fn(&T) -> &ObjectMeta) {
    objects.sort_by(|a, b| name_order(meta(a), meta(b)));
}

impl ClusterState {
    pub(crate) fn sort(&mut self) {
        sort_by_name(&mut self.nodes, |o| &o.metadata);
        sort_by_name(&mut self.namespaces, |o| &o.metadata);
        sort_by_name(&mut self.pods, |o| &o.metadata);
        sort_by_name(&mut self.services, |o| &o.metadata);
        sort_by_name(&mut self.endpoint_slices, |o| &o.metadata);
        sort_by_name(&mut self.network_policies, |o| &o.metadata);
        sort_by_name(&mut self.host_policies, |o| &o.metadata);
    }

    /// The Node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .map(|n| &**n)
    }

    /// Pod network and address of node `name`: `spec.podCIDR` (else the first IPv4 entry of
    /// `spec.podCIDRs`), the gateway pods route to (the CIDR's first host address) and the first
    /// IPv4 `InternalIP`.
    pub fn node_info(&self, name: &str) -> Result<NodeInfo, ClusterError> {
        let node = self.node(name).ok_or_else(|| ClusterError::NodeNotFound {
            node: name.to_owned(),
        })?;
        let unusable = |reason: String| ClusterError::NodeUnusable {
            node: name.to_owned(),
            reason,
        };
        let spec = node.spec.as_ref();
        let pod_cidr = match spec
            .and_then(|s| s.pod_cidr.as_deref())
            .filter(|c| !c.is_empty())
        {
            Some(cidr) => {
                validate::pod_cidr(cidr).map_err(|r| unusable(format!("spec.podCIDR: {r}")))?
            }
            None => spec
                .and_then(|s| s.pod_cidrs.as_ref())
                .into_iter()
                .flatten()
                .find_map(|c| match c.parse::<IpNet>() {
                    Ok(IpNet::V4(net)) => Some(net.trunc()),
                    _ => None,
                })
                .ok_or_else(|| {
                    unusable(
                        "has no IPv4 spec.podCIDR; set it (kube-controller-manager \
                         --allocate-node-cidrs does, or write it in the cluster file)"
                            .to_owned(),
                    )
                })?,
        };
        let gateway = first_host(pod_cidr).ok_or_else(|| {
            unusable(format!(
                "pod CIDR {pod_cidr} has no room for a gateway and pods; use a /30 or larger"
            ))
        })?;
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == INTERNAL_IP)
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| unusable("has no IPv4 InternalIP in status.addresses".to_owned()))?;
        Ok(NodeInfo {
            name: name.to_owned(),
            pod_cidr,
            gateway,
            internal_ip,
        })
    }

    /// Pods whose `spec.nodeName` is `node`, in (namespace, name) order.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .iter()
            .filter(move |p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .map(|p| &**p)
    }

    /// `namespace/name` of a pod (namespace `default` when unset).
    pub fn pod_key(pod: &Pod) -> String {
        let namespace = pod
            .metadata
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or(""))
    }
}

/// The first host address of a network (network address + 1), if the prefix leaves room for it
/// and for at least one more address.
fn first_host(net: Ipv4Net) -> Option<Ipv4Addr> {
    if net.prefix_len() > 30 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(net.network()).checked_add(1)?))
}

#[cfg(test)]
mod tests;
