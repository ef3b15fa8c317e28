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
//! [`Identities::new`] numbers identities in sorted key order starting at
//! [`FIRST_POD_IDENTITY`] (ids below it are reserved, like Cilium's reserved identities), so
//! equal cluster states give equal ids. The agent compiles through [`IdentityCache`] instead:
//! ids stay stable while an identity has pods and are not reused, so a new kind of pod never
//! renumbers the others (a fresh cache numbers a state as `Identities::new` does).

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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Pod views and identities kept across compiles (the agent's [`super::compile::Cache`]).
///
/// A pod's view is computed again only when its object (compared by pointer: sources share
/// unchanged objects between states) or its namespace's labels changed. Identity ids are
/// stable while an identity has pods, as Cilium's are: a new kind of pod gets the next unused
/// id (new ones of one refresh in sorted key order, so a fresh cache numbers a state as
/// [`Identities::new`] would) and ids are not reused, so adding a pod never renumbers others
/// and peer selections computed earlier stay valid (see `compile`'s peer memo).
#[derive(Debug)]
pub struct IdentityCache {
    ns_labels: BTreeMap<String, std::sync::Arc<Labels>>,
    pods: crate::FastMap<usize, PodMemo>,
    ids: std::collections::HashMap<std::sync::Arc<IdentityKey>, u32>,
    /// Live identities by id.
    pub(crate) by_id: BTreeMap<u32, std::sync::Arc<IdentityKey>>,
    /// The id the next new identity gets.
    pub(crate) next_id: u32,
    /// The last refresh: its namespaces, its pods (pointers, kept alive by `pods`) and result,
    /// returned as it is while neither changes (a policy-only change).
    last: Option<LastRefresh>,
}

#[derive(Debug)]
struct LastRefresh {
    /// The node the refresh was for (`Refreshed::local`).
    node: String,
    namespaces: Vec<std::sync::Arc<k8s_openapi::api::core::v1::Namespace>>,
    /// The state's pods (pointers; `pods` holds the objects).
    pods: Vec<usize>,
    /// Each of those pods' view, in the same order (before address clashes are dropped).
    per_pod: Vec<PodSlot>,
    refreshed: std::sync::Arc<Refreshed>,
}

impl Default for IdentityCache {
    fn default() -> Self {
        Self {
            ns_labels: BTreeMap::new(),
            pods: Default::default(),
            ids: Default::default(),
            by_id: BTreeMap::new(),
            next_id: FIRST_POD_IDENTITY,
            last: None,
        }
    }
}

#[derive(Debug)]
struct PodMemo {
    /// Held so the pointer the memo is keyed by stays this pod's.
    _pod: std::sync::Arc<Pod>,
    ns_labels: std::sync::Arc<Labels>,
    view: Option<(std::sync::Arc<PodView>, u32)>,
    used: bool,
}

/// One refresh's result: the pods policy applies to (with their identity), in (namespace,
/// name) order, and address-clash warnings.
#[derive(Debug)]
pub(crate) struct Refreshed {
    pub views: Vec<(std::sync::Arc<PodView>, u32)>,
    /// Indices into `views` of the pods on the node refreshed for.
    pub local: Vec<usize>,
    pub warnings: Vec<PolicyWarning>,
}

impl IdentityCache {
    /// The identity of the pod with address `addr` (tests).
    #[cfg(test)]
    pub(crate) fn id_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.pods
            .values()
            .filter_map(|m| m.view.as_ref())
            .find(|(v, _)| v.addr == addr)
            .map(|(_, id)| *id)
    }

    /// Brings the views and identities up to `state` (module doc of [`IdentityCache`]).
    ///
    /// Three ways, by what changed since the last refresh:
    /// - neither Namespaces nor Pods (a policy-only change): the last result as it is;
    /// - Pods only: a walk over the last refresh's pods and the state's side by side, which
    ///   compares pointers (no hashing, no strings) and computes views only for the pods that
    ///   are new or changed, so a one-pod change at 100,000 pods costs a pass over two arrays;
    /// - Namespaces: every pod's view is looked up by pointer and computed again when its
    ///   namespace's labels changed.
    pub(crate) fn refresh(
        &mut self,
        state: &ClusterState,
        node: &str,
    ) -> std::sync::Arc<Refreshed> {
        use std::sync::Arc;
        if let Some(last) = self.last.take().filter(|l| l.node == node) {
            let same_namespaces = last.namespaces.len() == state.namespaces.len()
                && last
                    .namespaces
                    .iter()
                    .zip(&state.namespaces)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            if same_namespaces {
                let same_pods = last.pods.len() == state.pods.len()
                    && last
                        .pods
                        .iter()
                        .zip(&state.pods)
                        .all(|(&a, b)| a == Arc::as_ptr(b) as usize);
                if same_pods {
                    let refreshed = Arc::clone(&last.refreshed);
                    self.last = Some(last);
                    return refreshed;
                }
                return self.refresh_pods(state, node, last);
            }
        }
        self.refresh_all(state, node)
    }

    /// The namespace labels pods of `ns` see: the namespace's own (in `self.ns_labels` after a
    /// full refresh), else only the name label (as `namespace_labels`), added to the map.
    fn labels_of(
        map: &mut BTreeMap<String, std::sync::Arc<Labels>>,
        old: &BTreeMap<String, std::sync::Arc<Labels>>,
        ns: &str,
    ) -> std::sync::Arc<Labels> {
        use std::sync::Arc;
        if let Some(l) = map.get(ns) {
            return Arc::clone(l);
        }
        let only = Labels::from([(super::model::NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned())]);
        let l = match old.get(ns) {
            Some(old) if **old == only => Arc::clone(old),
            _ => Arc::new(only),
        };
        map.insert(ns.to_owned(), Arc::clone(&l));
        l
    }

    /// The view of `pod` (namespace labels `labels`), memoised by the pod's pointer: `Ok` with
    /// the memo's view when it was made with these labels, else `Err` with a new view (its
    /// identity not known yet) and the memo replaced.
    fn view_of(
        &mut self,
        pod: &std::sync::Arc<Pod>,
        ns: &str,
        labels: std::sync::Arc<Labels>,
    ) -> Result<PodSlot, Option<PodView>> {
        use std::sync::Arc;
        let ptr = Arc::as_ptr(pod) as usize;
        if let Some(m) = self.pods.get_mut(&ptr) {
            if Arc::ptr_eq(&m.ns_labels, &labels) {
                m.used = true;
                return Ok(m.view.clone());
            }
        }
        let one = BTreeMap::from([(ns.to_owned(), (*labels).clone())]);
        let v = view(pod, &one);
        // The view's identity is filled in by `number`, once new identities have ids.
        self.pods.insert(
            ptr,
            PodMemo {
                _pod: Arc::clone(pod),
                ns_labels: labels,
                view: None,
                used: true,
            },
        );
        Err(v)
    }

    /// Gives new identities of `pending` ids (in key order) and fills in the views.
    fn number(&mut self, per_pod: &mut [PodSlot], pending: Vec<(usize, usize, PodView)>) {
        use std::sync::Arc;
        let mut new_keys: BTreeSet<IdentityKey> = BTreeSet::new();
        for (_, _, v) in &pending {
            let k = IdentityKey::of(v);
            if !self.ids.contains_key(&k) {
                new_keys.insert(k);
            }
        }
        for k in new_keys {
            let id = self.next_id;
            self.next_id += 1;
            let k = Arc::new(k);
            self.ids.insert(Arc::clone(&k), id);
            self.by_id.insert(id, k);
        }
        for (at, ptr, v) in pending {
            let id = self.ids.get(&IdentityKey::of(&v)).copied().unwrap_or(0);
            let slot = Some((Arc::new(v), id));
            if let Some(m) = self.pods.get_mut(&ptr) {
                m.view = slot.clone();
            }
            if let Some(s) = per_pod.get_mut(at) {
                *s = slot;
            }
        }
    }

    fn refresh_all(&mut self, state: &ClusterState, node: &str) -> std::sync::Arc<Refreshed> {
        use std::sync::Arc;
        // Namespace labels, reusing the previous Arc when equal (pods' memos compare them by
        // pointer).
        let mut ns_labels: BTreeMap<String, Arc<Labels>> = BTreeMap::new();
        for ns in &state.namespaces {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert(super::model::NAMESPACE_NAME_LABEL.to_owned(), name.clone());
            let labels = match self.ns_labels.get(&name) {
                Some(old) if **old == labels => Arc::clone(old),
                _ => Arc::new(labels),
            };
            ns_labels.insert(name, labels);
        }
        let old_labels = std::mem::take(&mut self.ns_labels);
        let mut per_pod: Vec<PodSlot> = Vec::with_capacity(state.pods.len());
        let mut pending: Vec<(usize, usize, PodView)> = Vec::new();
        for pod in &state.pods {
            let ns = namespace_of(pod);
            let labels = Self::labels_of(&mut ns_labels, &old_labels, ns);
            match self.view_of(pod, ns, labels) {
                Ok(slot) => per_pod.push(slot),
                Err(v) => {
                    per_pod.push(None);
                    if let Some(v) = v {
                        pending.push((per_pod.len() - 1, Arc::as_ptr(pod) as usize, v));
                    }
                }
            }
        }
        self.ns_labels = ns_labels;
        self.number(&mut per_pod, pending);
        self.pods.retain(|_, m| std::mem::take(&mut m.used));
        self.finish(state, node, per_pod)
    }

    /// Namespaces as in `last`: walks `last`'s pods and the state's together (both in (namespace,
    /// name) order), reusing the view of every pod whose pointer is where it was.
    fn refresh_pods(
        &mut self,
        state: &ClusterState,
        node: &str,
        mut last: LastRefresh,
    ) -> std::sync::Arc<Refreshed> {
        use std::sync::Arc;
        let old = std::mem::take(&mut last.pods);
        let mut old_slots = std::mem::take(&mut last.per_pod);
        drop(last);
        let mut per_pod: Vec<PodSlot> = Vec::with_capacity(state.pods.len());
        let mut pending: Vec<(usize, usize, PodView)> = Vec::new();
        // Pods of the last refresh not at their place (deleted or changed), and pods of the
        // state not at theirs (new or changed, or moved: the walk does not need the order, it
        // is only faster with it).
        let mut gone: Vec<usize> = Vec::new();
        let mut placed: crate::FastSet<usize> = Default::default();
        let old_labels = self.ns_labels.clone();
        let mut ns_labels = std::mem::take(&mut self.ns_labels);
        let mut i = 0;
        for pod in &state.pods {
            let ptr = Arc::as_ptr(pod) as usize;
            // Skip the last refresh's pods that sort before this one or are an older version
            // of it: they are gone from here.
            while let Some(&o) = old.get(i) {
                if o == ptr {
                    break;
                }
                let before = self.pods.get(&o).is_some_and(|m| {
                    crate::cluster::name_order(&m._pod.metadata, &pod.metadata).is_le()
                });
                if !before {
                    break;
                }
                gone.push(o);
                i += 1;
            }
            if old.get(i) == Some(&ptr) {
                per_pod.push(old_slots.get_mut(i).and_then(Option::take));
                i += 1;
                continue;
            }
            placed.insert(ptr);
            let ns = namespace_of(pod);
            let labels = Self::labels_of(&mut ns_labels, &old_labels, ns);
            match self.view_of(pod, ns, labels) {
                Ok(slot) => per_pod.push(slot),
                Err(v) => {
                    per_pod.push(None);
                    if let Some(v) = v {
                        pending.push((per_pod.len() - 1, ptr, v));
                    }
                }
            }
        }
        gone.extend(old.get(i..).unwrap_or_default());
        self.ns_labels = ns_labels;
        for o in gone {
            if !placed.contains(&o) {
                self.pods.remove(&o);
            }
        }
        self.number(&mut per_pod, pending);
        self.finish(state, node, per_pod)
    }

    /// The result from every pod's view (`per_pod`, in the state's pod order): address clashes
    /// dropped, identities no pod has any more forgotten.
    fn finish(
        &mut self,
        state: &ClusterState,
        node: &str,
        per_pod: Vec<PodSlot>,
    ) -> std::sync::Arc<Refreshed> {
        use std::sync::Arc;
        let mut seen: crate::FastMap<Ipv4Addr, &str> =
            crate::FastMap::with_capacity_and_hasher(per_pod.len(), Default::default());
        // Every memoised view's identity stays (a pod that lost an address clash keeps its
        // id for when it wins it), so a memo never names a forgotten id.
        let mut live: crate::FastSet<u32> = Default::default();
        let mut views = Vec::with_capacity(per_pod.len());
        let mut local = Vec::new();
        let mut warnings = Vec::new();
        for (v, id) in per_pod.iter().flatten() {
            live.insert(*id);
            if let Some(first) = seen.get(&v.addr) {
                warnings.push(PolicyWarning {
                    object: format!("Pod {}", v.key),
                    field: "status.podIP".into(),
                    message: format!(
                        "address {} is also Pod {first}'s; policy treats it as {first}'s",
                        v.addr
                    ),
                });
                continue;
            }
            seen.insert(v.addr, v.key.as_str());
            if v.node == node {
                local.push(views.len());
            }
            views.push((Arc::clone(v), *id));
        }
        drop(seen);
        self.by_id.retain(|id, _| live.contains(id));
        self.ids.retain(|_, id| live.contains(id));
        if self.next_id > dataplane::policy::MAX_IDENTITY - (1 << 20) {
            // Ids are not reused; after half a billion kinds of pod start again from scratch.
            *self = IdentityCache::default();
            return self.refresh(state, node);
        }
        let refreshed = Arc::new(Refreshed {
            views,
            local,
            warnings,
        });
        self.last = Some(LastRefresh {
            node: node.to_owned(),
            namespaces: state.namespaces.clone(),
            pods: state.pods.iter().map(|p| Arc::as_ptr(p) as usize).collect(),
            per_pod,
            refreshed: Arc::clone(&refreshed),
        });
        refreshed
    }
}

/// A pod's view and identity (`None`: policy does not apply to it).
type PodSlot = Option<(std::sync::Arc<PodView>, u32)>;

/// The namespace of a pod as policy reads it ("" -> `default`).
fn namespace_of(pod: &Pod) -> &str {
    pod.metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}
