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
use std::sync::Arc;

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
///
/// How many pods hold each address and each identity is kept up to date with the changes, so
/// a refresh after one pod changed neither hashes 100,000 addresses to find clashes nor
/// recounts the identities in use.
#[derive(Debug)]
pub struct IdentityCache {
    ns_labels: BTreeMap<String, Arc<Labels>>,
    pods: crate::FastMap<usize, PodMemo>,
    ids: std::collections::HashMap<Arc<IdentityKey>, u32>,
    /// Live identities by id.
    pub(crate) by_id: BTreeMap<u32, Arc<IdentityKey>>,
    /// The id the next new identity gets.
    pub(crate) next_id: u32,
    /// Pods of the last refresh per identity id (an id with none is forgotten).
    id_pods: crate::FastMap<u32, u32>,
    /// Pods of the last refresh per address, and how many addresses have more than one.
    addr_pods: crate::FastMap<Ipv4Addr, u32>,
    clashing: usize,
    /// The last refresh, returned as it is while neither Namespaces nor Pods change (a
    /// policy-only change), and walked beside the next state when only Pods do.
    last: Option<LastRefresh>,
}

#[derive(Debug)]
struct LastRefresh {
    /// The node the refresh was for (`Slot::local`).
    node: String,
    namespaces: Vec<Arc<k8s_openapi::api::core::v1::Namespace>>,
    /// The state's pods (pointers; `pods` holds the objects), in the order of
    /// `refreshed.per_pod`.
    pods: Vec<usize>,
    refreshed: Arc<Refreshed>,
}

impl Default for IdentityCache {
    fn default() -> Self {
        Self {
            ns_labels: BTreeMap::new(),
            pods: Default::default(),
            ids: Default::default(),
            by_id: BTreeMap::new(),
            next_id: FIRST_POD_IDENTITY,
            id_pods: Default::default(),
            addr_pods: Default::default(),
            clashing: 0,
            last: None,
        }
    }
}

#[derive(Debug)]
struct PodMemo {
    /// Held so the pointer the memo is keyed by stays this pod's.
    _pod: Arc<Pod>,
    ns_labels: Arc<Labels>,
    view: PodSlot,
    used: bool,
}

/// A pod policy applies to: its view, identity, and (copied out of the view, so passes over
/// every pod read one array) its address and whether it runs on the node refreshed for.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub view: Arc<PodView>,
    pub id: u32,
    pub addr: Ipv4Addr,
    pub local: bool,
}

/// A pod's slot (`None`: policy does not apply to it).
type PodSlot = Option<Slot>;

/// What `view_of` found: the memo's slot, or a new view (`None`: policy does not apply) whose
/// identity is not known yet.
enum Looked {
    Memo(PodSlot),
    New(Option<PodView>),
}

/// One refresh's result: every pod of the state in its (namespace, name) order, which of them
/// lost an address clash, the local ones, and the clash warnings.
#[derive(Debug, Default)]
pub(crate) struct Refreshed {
    per_pod: Vec<PodSlot>,
    /// Indices into `per_pod` of pods whose address an earlier pod holds, ascending.
    clashed: Vec<usize>,
    /// Indices into `per_pod` of the pods on the node refreshed for (clash winners only).
    pub local: Vec<usize>,
    pub warnings: Vec<PolicyWarning>,
}

impl Refreshed {
    /// The pods policy applies to, in order, without the clash losers.
    pub fn views(&self) -> impl Iterator<Item = &Slot> + '_ {
        let mut clashed = self.clashed.iter().peekable();
        self.per_pod
            .iter()
            .enumerate()
            .filter(move |(i, _)| {
                if clashed.peek() == Some(&i) {
                    clashed.next();
                    return false;
                }
                true
            })
            .filter_map(|(_, s)| s.as_ref())
    }

    /// The slot at `i` of `per_pod` (an index of [`Self::local`]).
    pub fn slot(&self, i: usize) -> Option<&Slot> {
        self.per_pod.get(i)?.as_ref()
    }
}

impl IdentityCache {
    /// The identity of the pod with address `addr` (tests).
    #[cfg(test)]
    pub(crate) fn id_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.pods
            .values()
            .filter_map(|m| m.view.as_ref())
            .find(|s| s.addr == addr)
            .map(|s| s.id)
    }

    /// Panics unless every pod's identity is a live one whose key maps back to it, each key
    /// has one id, and the per-identity and per-address counts are those of the last refresh
    /// (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let Some(last) = &self.last else { return };
        let mut ids: crate::FastMap<u32, u32> = Default::default();
        let mut addrs: crate::FastMap<Ipv4Addr, u32> = Default::default();
        for s in last.refreshed.per_pod.iter().flatten() {
            let key = self.by_id.get(&s.id);
            assert!(
                key.is_some(),
                "pod {} has identity {}, which is not live",
                s.view.key,
                s.id
            );
            if let Some(key) = key {
                assert_eq!(
                    **key,
                    IdentityKey::of(&s.view),
                    "identity {} of {}",
                    s.id,
                    s.view.key
                );
                assert_eq!(self.ids.get(key), Some(&s.id), "key of identity {}", s.id);
            }
            *ids.entry(s.id).or_insert(0) += 1;
            *addrs.entry(s.addr).or_insert(0) += 1;
        }
        assert_eq!(ids, self.id_pods, "pods per identity");
        assert_eq!(addrs, self.addr_pods, "pods per address");
        assert_eq!(self.clashing, addrs.values().filter(|&&n| n > 1).count());
        assert_eq!(self.by_id.len(), ids.len(), "live identities");
        assert_eq!(self.ids.len(), ids.len(), "identity keys");
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
    pub(crate) fn refresh(&mut self, state: &ClusterState, node: &str) -> Arc<Refreshed> {
        if self.last.as_ref().is_some_and(|l| l.node != node) {
            // Slots say which pods are local to the node: start again for another node.
            *self = IdentityCache::default();
        }
        if let Some(last) = self.last.take() {
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

    /// The namespace labels pods of `ns` see: the namespace's own (in `map` after a full
    /// refresh), else only the name label (as `namespace_labels`), added to the map.
    fn labels_of(
        map: &mut BTreeMap<String, Arc<Labels>>,
        old: &BTreeMap<String, Arc<Labels>>,
        ns: &str,
    ) -> Arc<Labels> {
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

    /// The slot of `pod` (namespace labels `labels`), memoised by the pod's pointer: the memo's
    /// slot when it was made with these labels, else a new view and the memo replaced.
    fn view_of(&mut self, pod: &Arc<Pod>, ns: &str, labels: Arc<Labels>) -> Looked {
        let ptr = Arc::as_ptr(pod) as usize;
        if let Some(m) = self.pods.get_mut(&ptr) {
            if Arc::ptr_eq(&m.ns_labels, &labels) {
                m.used = true;
                return Looked::Memo(m.view.clone());
            }
        }
        let one = BTreeMap::from([(ns.to_owned(), (*labels).clone())]);
        let v = view(pod, &one);
        // The slot is filled in by `number`, once new identities have ids.
        self.pods.insert(
            ptr,
            PodMemo {
                _pod: Arc::clone(pod),
                ns_labels: labels,
                view: None,
                used: true,
            },
        );
        Looked::New(v)
    }

    /// Gives new identities of `pending` ids (in key order) and fills in the slots.
    fn number(
        &mut self,
        node: &str,
        per_pod: &mut [PodSlot],
        pending: Vec<(usize, usize, PodView)>,
    ) {
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
            let slot = Some(Slot {
                id,
                addr: v.addr,
                local: v.node == node,
                view: Arc::new(v),
            });
            if let Some(m) = self.pods.get_mut(&ptr) {
                m.view = slot.clone();
            }
            if let Some(s) = per_pod.get_mut(at) {
                *s = slot;
            }
        }
    }

    /// Counts `slot` in (`add`) or out of the per-identity and per-address counts.
    fn count(&mut self, slot: &Slot, add: bool) {
        let n = self.addr_pods.entry(slot.addr).or_insert(0);
        if add {
            *n += 1;
            if *n == 2 {
                self.clashing += 1;
            }
        } else {
            *n = n.saturating_sub(1);
            if *n == 1 {
                self.clashing = self.clashing.saturating_sub(1);
            } else if *n == 0 {
                self.addr_pods.remove(&slot.addr);
            }
        }
        let n = self.id_pods.entry(slot.id).or_insert(0);
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // No pod has this identity any more: forget it (ids are not reused).
                self.id_pods.remove(&slot.id);
                if let Some(key) = self.by_id.remove(&slot.id) {
                    self.ids.remove(&key);
                }
            }
        }
    }

    fn refresh_all(&mut self, state: &ClusterState, node: &str) -> Arc<Refreshed> {
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
                Looked::Memo(slot) => per_pod.push(slot),
                Looked::New(v) => {
                    per_pod.push(None);
                    if let Some(v) = v {
                        pending.push((per_pod.len() - 1, Arc::as_ptr(pod) as usize, v));
                    }
                }
            }
        }
        self.ns_labels = ns_labels;
        self.number(node, &mut per_pod, pending);
        self.pods.retain(|_, m| std::mem::take(&mut m.used));
        // Counts from scratch; identities no pod has are forgotten.
        self.addr_pods.clear();
        self.id_pods.clear();
        self.clashing = 0;
        for slot in per_pod.iter().flatten() {
            let n = self.addr_pods.entry(slot.addr).or_insert(0);
            *n += 1;
            if *n == 2 {
                self.clashing += 1;
            }
            *self.id_pods.entry(slot.id).or_insert(0) += 1;
        }
        let live = &self.id_pods;
        self.by_id.retain(|id, _| live.contains_key(id));
        self.ids.retain(|_, id| live.contains_key(id));
        self.finish(state, node, per_pod)
    }

    /// Namespaces as in `last`: walks `last`'s pods and the state's together (both in (namespace,
    /// name) order), reusing the slot of every pod whose pointer is where it was.
    fn refresh_pods(
        &mut self,
        state: &ClusterState,
        node: &str,
        last: LastRefresh,
    ) -> Arc<Refreshed> {
        let LastRefresh {
            pods: old,
            refreshed,
            ..
        } = last;
        // The compile that used the last result has dropped it: its slots move over.
        let mut old_slots = match Arc::try_unwrap(refreshed) {
            Ok(r) => r.per_pod,
            Err(shared) => shared.per_pod.clone(),
        };
        let mut per_pod: Vec<PodSlot> = Vec::with_capacity(state.pods.len());
        let mut pending: Vec<(usize, usize, PodView)> = Vec::new();
        // Pods of the last refresh not at their place (deleted or changed), and pods of the
        // state not at theirs (new or changed, or moved: the walk does not need the order, it
        // is only faster with it).
        let mut gone: Vec<usize> = Vec::new();
        let mut placed: Vec<usize> = Vec::new();
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
            placed.push(per_pod.len());
            let ns = namespace_of(pod);
            let labels = Self::labels_of(&mut ns_labels, &old_labels, ns);
            match self.view_of(pod, ns, labels) {
                Looked::Memo(slot) => per_pod.push(slot),
                Looked::New(v) => {
                    per_pod.push(None);
                    if let Some(v) = v {
                        pending.push((per_pod.len() - 1, ptr, v));
                    }
                }
            }
        }
        gone.extend(old.get(i..).unwrap_or_default());
        self.ns_labels = ns_labels;
        // The slots not taken over are the pods gone from their place; the placed ones are
        // new there. New identities are numbered before the counts change, so an identity
        // that moves from a gone pod to a new one keeps its id.
        self.number(node, &mut per_pod, pending);
        for at in &placed {
            if let Some(Some(slot)) = per_pod.get(*at) {
                let slot = slot.clone();
                self.count(&slot, true);
            }
        }
        for slot in old_slots.into_iter().flatten() {
            self.count(&slot, false);
        }
        if !gone.is_empty() {
            let placed_ptrs: crate::FastSet<usize> = placed
                .iter()
                .filter_map(|&at| state.pods.get(at))
                .map(|p| Arc::as_ptr(p) as usize)
                .collect();
            for o in gone {
                if !placed_ptrs.contains(&o) {
                    self.pods.remove(&o);
                }
            }
        }
        self.finish(state, node, per_pod)
    }

    /// The result from every pod's slot (`per_pod`, in the state's pod order): address clashes
    /// found (only when the counts say there are some) and the local pods listed.
    fn finish(
        &mut self,
        state: &ClusterState,
        node: &str,
        per_pod: Vec<PodSlot>,
    ) -> Arc<Refreshed> {
        let mut clashed = Vec::new();
        let mut warnings = Vec::new();
        if self.clashing > 0 {
            let mut seen: crate::FastMap<Ipv4Addr, &str> =
                crate::FastMap::with_capacity_and_hasher(per_pod.len(), Default::default());
            for (i, slot) in per_pod.iter().enumerate() {
                let Some(s) = slot else { continue };
                if let Some(first) = seen.get(&s.addr) {
                    warnings.push(PolicyWarning {
                        object: format!("Pod {}", s.view.key),
                        field: "status.podIP".into(),
                        message: format!(
                            "address {} is also Pod {first}'s; policy treats it as {first}'s",
                            s.addr
                        ),
                    });
                    clashed.push(i);
                    continue;
                }
                seen.insert(s.addr, s.view.key.as_str());
            }
        }
        let mut local = Vec::new();
        let mut next_clash = clashed.iter().peekable();
        for (i, slot) in per_pod.iter().enumerate() {
            if next_clash.peek() == Some(&&i) {
                next_clash.next();
                continue;
            }
            if slot.as_ref().is_some_and(|s| s.local) {
                local.push(i);
            }
        }
        if self.next_id > dataplane::policy::MAX_IDENTITY - (1 << 20) {
            // Ids are not reused; after half a billion kinds of pod start again from scratch.
            *self = IdentityCache::default();
            return self.refresh(state, node);
        }
        let refreshed = Arc::new(Refreshed {
            per_pod,
            clashed,
            local,
            warnings,
        });
        self.last = Some(LastRefresh {
            node: node.to_owned(),
            namespaces: state.namespaces.clone(),
            pods: state.pods.iter().map(|p| Arc::as_ptr(p) as usize).collect(),
            refreshed: Arc::clone(&refreshed),
        });
        refreshed
    }
}

/// The namespace of a pod as policy reads it ("" -> `default`).
fn namespace_of(pod: &Pod) -> &str {
    pod.metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}
