//! `compile`: policies of a cluster state to the [`PolicyTable`] of one node.
//!
//! Expansion, per local pod selected by some policy and per rule of each selecting policy:
//! - peers: every peer (`from`/`to` empty) -> [`PeerSpec::Any`]; pod/namespace selectors -> one
//!   [`PeerSpec::Identity`] per identity they select (cluster-wide); `ipBlock` ->
//!   [`PeerSpec::IpBlock`] (the dataplane matches it on any address, pods included);
//! - ports: none -> [`PortSpec::ALL`]; `port`/`endPort` -> a range of the protocol; a named port
//!   -> for ingress, the local pod's own container port(s) of that name and protocol; for
//!   egress, per destination identity (only identity peers, or every identity for an "every
//!   peer" rule): a named port never reaches a non-pod address;
//! - flags: [`ALLOW_AUDIT`] for audit-mode policies, else [`ALLOW_ENFORCED`]; isolation bits the
//!   same way.
//!
//! The host endpoint exists once a HostNetworkPolicy selects this node; the failsafe ports are
//! then enforced allow rules on it (from anywhere, or from every node `InternalIP` as /32
//! blocks).
//!
//! Rules are collected in a sorted set before they reach the builder, and pods, identities
//! and policies are visited in sorted order, so equal states give equal tables
//! ([`PolicyTable::same_rules`]) and the agent publishes a new policy generation only when the
//! rules really change. Output size: O(local selected pods x rules x selected identities x
//! ports); the dataplane's per-packet cost does not depend on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use dataplane::policy::{
    Dir, Isolation, PeerSpec, PolicyBuilder, PolicyError, PolicyTable, PortSpec, ALLOW_AUDIT,
    ALLOW_ENFORCED,
};

use super::identity::{cluster_node_ips, node_addresses, IdentityCache, IdentityKey, PodView};
use super::model::{host_policies, network_policy, Direction, Peer, Policy, PortMatch, Rule};
use super::{FailsafeFrom, PolicyOptions, PolicyWarning};
use crate::cluster::ClusterState;

/// A compiled policy table and what could not be compiled.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub table: PolicyTable,
    /// Invalid policies, rules and pods, each naming the object and field (already skipped).
    pub warnings: Vec<PolicyWarning>,
    /// Local pods isolated by some policy (ingress or egress).
    pub isolated_pods: usize,
    /// Whether a host policy selects this node.
    pub host_isolated: bool,
}

/// The dataplane refused the compiled input (limits of its tables).
#[derive(Debug, thiserror::Error)]
pub enum PolicyCompileError {
    #[error("policy table for node {node} not built: {source}; the previous table stays in force")]
    Build {
        node: String,
        #[source]
        source: PolicyError,
    },
}

/// A rule ready for the builder, ordered so the set is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RuleKey {
    ep: u32,
    dir: u8,
    peer: PeerKey,
    proto: u8,
    lo: u16,
    hi: u16,
    flags: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Any,
    Identity(u32),
    Block((Ipv4Addr, u8), Vec<(Ipv4Addr, u8)>),
}

/// What [`compile_cached`] keeps across states: pod views and stable identity ids
/// ([`IdentityCache`]), each NetworkPolicy's validation, and which identities each peer of a
/// policy selects. A peer's selection is extended with the identities created since it was
/// computed (ids only grow) and filtered to the live ones, so a one-object change does not
/// evaluate every selector against every identity again.
#[derive(Debug, Default)]
pub struct Cache {
    identities: IdentityCache,
    audit_all: Option<bool>,
    policies: HashMap<usize, PolicyMemo>,
    peers: HashMap<PeerRef, PeerMemo>,
}

#[derive(Debug)]
struct PolicyMemo {
    object: Arc<NetworkPolicy>,
    parsed: Option<Arc<Policy>>,
    warnings: Vec<PolicyWarning>,
    used: bool,
}

/// (NetworkPolicy pointer, direction, rule index, peer index; `usize::MAX`: every peer).
type PeerRef = (usize, u8, usize, usize);

#[derive(Debug)]
struct PeerMemo {
    /// Held so the pointer in the key stays this policy's.
    _object: Arc<NetworkPolicy>,
    /// Selected identity ids, ascending (some may have died since).
    selected: Vec<u32>,
    /// Identities below this id have been evaluated.
    upto: u32,
    used: bool,
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity id the cache gives the pod with address `addr` (tests).
    #[cfg(test)]
    pub(crate) fn identities_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.identities.id_of(addr)
    }

    /// Panics unless the identity bookkeeping agrees with itself (tests).
    #[cfg(test)]
    pub(crate) fn check_identities(&self) {
        self.identities.check();
    }

    /// Makes the next new identity get id `next` (tests of the numbering restart).
    #[cfg(test)]
    pub(crate) fn set_next_identity(&mut self, next: u32) {
        self.identities.next_id = next;
    }
}

/// Compiles every policy of `state` for node `node` (module doc). Invalid parts become
/// warnings; the only error is the dataplane refusing the result.
pub fn compile(
    state: &ClusterState,
    node: &str,
    opts: &PolicyOptions,
    generation: u16,
) -> Result<Compiled, PolicyCompileError> {
    compile_cached(state, node, opts, generation, &mut Cache::new())
}

/// [`compile`], reusing what `cache` holds (see [`Cache`]); the agent keeps one cache across
/// states. The rules are the same as a fresh compile's up to identity numbering.
pub fn compile_cached(
    state: &ClusterState,
    node: &str,
    opts: &PolicyOptions,
    generation: u16,
    cache: &mut Cache,
) -> Result<Compiled, PolicyCompileError> {
    if cache.audit_all != Some(opts.audit) {
        cache.policies.clear();
        cache.peers.clear();
        cache.audit_all = Some(opts.audit);
    }
    let mut warnings = Vec::new();
    let mut network: Vec<(Arc<NetworkPolicy>, Arc<Policy>)> = Vec::new();
    for np in &state.network_policies {
        let ptr = Arc::as_ptr(np) as usize;
        let m = cache.policies.entry(ptr).or_insert_with(|| {
            let mut w = Vec::new();
            let parsed = network_policy(np, opts.audit, &mut w).map(Arc::new);
            PolicyMemo {
                object: Arc::clone(np),
                parsed,
                warnings: w,
                used: false,
            }
        });
        m.used = true;
        warnings.extend(m.warnings.iter().cloned());
        if let Some(p) = &m.parsed {
            network.push((Arc::clone(&m.object), Arc::clone(p)));
        }
    }
    cache.policies.retain(|_, m| std::mem::take(&mut m.used));
    let host = host_policies(state, opts.audit, &mut warnings);
    let ids_before = cache.identities.next_id;
    let refreshed = cache.identities.refresh(state, node);
    if cache.identities.next_id < ids_before {
        // The identity cache started numbering again: memoised selections name old ids.
        cache.peers.clear();
    }
    warnings.extend(refreshed.warnings.iter().cloned());
    let mut by_namespace: BTreeMap<&str, Vec<(&Arc<NetworkPolicy>, &Policy)>> = BTreeMap::new();
    for (object, p) in &network {
        if let Some(ns) = p.namespace() {
            by_namespace.entry(ns).or_default().push((object, p));
        }
    }

    let mut b = PolicyBuilder::new(generation);
    for slot in refreshed.views() {
        b.identity(slot.addr, slot.id);
    }
    for addr in node_addresses(state, node) {
        b.node_addr(addr);
    }
    let mut rules: BTreeSet<RuleKey> = BTreeSet::new();
    let mut ctx = Expand {
        ids: &cache.identities.by_id,
        next_id: cache.identities.next_id,
        peers: &mut cache.peers,
    };
    let mut isolated_pods = 0;

    for pod in refreshed
        .local
        .iter()
        .filter_map(|&i| refreshed.slot(i))
        .map(|s| &s.view)
    {
        let selecting: Vec<(&Arc<NetworkPolicy>, &Policy)> = by_namespace
            .get(pod.namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|(_, p)| p.subject.matches(&pod.labels))
            .copied()
            .collect();
        let policies: Vec<&Policy> = selecting.iter().map(|(_, p)| *p).collect();
        let ingress = isolation(&policies, Direction::Ingress);
        let egress = isolation(&policies, Direction::Egress);
        if ingress == Isolation::OPEN && egress == Isolation::OPEN {
            continue;
        }
        isolated_pods += 1;
        let ep = b.endpoint(pod.addr, ingress, egress);
        for (object, policy) in &selecting {
            for dir in [Direction::Ingress, Direction::Egress] {
                for (i, rule) in policy.rules(dir).unwrap_or_default().iter().enumerate() {
                    let at = Some((*object, i));
                    ctx.rule(&mut rules, ep, dir, Some(pod), policy, rule, at);
                }
            }
        }
    }
    ctx.peers.retain(|_, m| std::mem::take(&mut m.used));

    let node_labels = state
        .node(node)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let selecting: Vec<&Policy> = if state.node(node).is_some() {
        host.iter()
            .filter(|p| p.subject.matches(&node_labels))
            .collect()
    } else {
        Vec::new()
    };
    let host_isolation = isolation(&selecting, Direction::Ingress);
    let host_isolated = host_isolation != Isolation::OPEN;
    if host_isolated {
        let ep = b.host(host_isolation);
        let node_ips = cluster_node_ips(state);
        for f in &opts.failsafe {
            let port = (f.protocol.number(), f.lo, f.hi);
            match f.from {
                FailsafeFrom::Anywhere => {
                    rules.insert(key(
                        ep,
                        Direction::Ingress,
                        PeerKey::Any,
                        port,
                        ALLOW_ENFORCED,
                    ));
                }
                FailsafeFrom::Nodes => {
                    for ip in &node_ips {
                        let peer = PeerKey::Block((*ip, 32), Vec::new());
                        rules.insert(key(ep, Direction::Ingress, peer, port, ALLOW_ENFORCED));
                    }
                }
            }
        }
        for policy in &selecting {
            for rule in policy.rules(Direction::Ingress).unwrap_or_default() {
                ctx.rule(&mut rules, ep, Direction::Ingress, None, policy, rule, None);
            }
        }
    }

    for r in rules {
        let dir = if r.dir == 0 {
            Dir::Ingress
        } else {
            Dir::Egress
        };
        let peer = match r.peer {
            PeerKey::Any => PeerSpec::Any,
            PeerKey::Identity(id) => PeerSpec::Identity(id),
            PeerKey::Block(cidr, except) => PeerSpec::IpBlock { cidr, except },
        };
        let port = PortSpec {
            proto: r.proto,
            lo: r.lo,
            hi: r.hi,
        };
        b.allow(r.ep, dir, peer, port, r.flags);
    }
    let table = b.build().map_err(|source| PolicyCompileError::Build {
        node: node.to_owned(),
        source,
    })?;
    Ok(Compiled {
        table,
        warnings,
        isolated_pods,
        host_isolated,
    })
}

fn isolation(selecting: &[&Policy], dir: Direction) -> Isolation {
    let mut iso = Isolation::OPEN;
    for p in selecting.iter().filter(|p| p.rules(dir).is_some()) {
        if p.audit {
            iso.audit = true;
        } else {
            iso.enforced = true;
        }
    }
    iso
}

fn key(ep: u32, dir: Direction, peer: PeerKey, port: (u8, u16, u16), flags: u8) -> RuleKey {
    RuleKey {
        ep,
        dir: match dir {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        },
        peer,
        proto: port.0,
        lo: port.1,
        hi: port.2,
        flags,
    }
}

struct Expand<'a> {
    ids: &'a BTreeMap<u32, Arc<IdentityKey>>,
    next_id: u32,
    peers: &'a mut HashMap<PeerRef, PeerMemo>,
}

/// A port entry once resolved as far as it can be without knowing the remote pod.
enum Resolved<'a> {
    /// (proto, lo, hi); PROTO_ANY (0) for "every protocol".
    Numbers(Vec<(u8, u16, u16)>),
    /// Egress named port: resolved per destination identity.
    Named(&'a str, super::Protocol),
}

impl Expand<'_> {
    /// `at`: the NetworkPolicy and rule index, to memoise peer selections (`None`: host
    /// policies, evaluated directly).
    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        out: &mut BTreeSet<RuleKey>,
        ep: u32,
        dir: Direction,
        local: Option<&PodView>,
        policy: &Policy,
        rule: &Rule,
        at: Option<(&Arc<NetworkPolicy>, usize)>,
    ) {
        let d = match dir {
            Direction::Ingress => 0u8,
            Direction::Egress => 1,
        };
        let memo = |peer: usize| {
            at.map(|(object, rule)| (object, (Arc::as_ptr(object) as usize, d, rule, peer)))
        };
        let flags = if policy.audit {
            ALLOW_AUDIT
        } else {
            ALLOW_ENFORCED
        };
        let ports: Vec<Resolved<'_>> = match &rule.ports {
            None => vec![Resolved::Numbers(vec![(
                PortSpec::ALL.proto,
                PortSpec::ALL.lo,
                PortSpec::ALL.hi,
            )])],
            Some(list) => list
                .iter()
                .map(|(_, p)| {
                    let proto = p.protocol.number();
                    match &p.port {
                        PortMatch::All => Resolved::Numbers(vec![(proto, 0, u16::MAX)]),
                        PortMatch::Range(lo, hi) => Resolved::Numbers(vec![(proto, *lo, *hi)]),
                        PortMatch::Named(name) => match dir {
                            // Ingress: the destination is the local pod (the host has none).
                            Direction::Ingress => Resolved::Numbers(
                                local
                                    .map(|pod| {
                                        pod.resolve(name, p.protocol)
                                            .map(|n| (proto, n, n))
                                            .collect()
                                    })
                                    .unwrap_or_default(),
                            ),
                            Direction::Egress => Resolved::Named(name, p.protocol),
                        },
                    }
                })
                .collect(),
        };
        let any_peer = [Peer::Pods {
            namespaces: None,
            pods: None,
            own_namespace: None,
        }];
        let peers: Vec<(usize, Option<&Peer>)> = match &rule.peers {
            None => vec![(usize::MAX, None)],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, (_, p))| (i, Some(p)))
                .collect(),
        };
        for (peer_index, peer) in peers {
            let m = memo(peer_index);
            for port in &ports {
                match (peer, port) {
                    (None, Resolved::Numbers(numbers)) => {
                        for &n in numbers {
                            out.insert(key(ep, dir, PeerKey::Any, n, flags));
                        }
                    }
                    // Every peer with a named port: every pod that has the port.
                    (None, Resolved::Named(name, protocol)) => {
                        self.identities(out, ep, dir, &any_peer[0], m, name, *protocol, flags)
                    }
                    (Some(Peer::Ipv6), _) => {}
                    (Some(Peer::IpBlock { .. }), Resolved::Named(..)) => {}
                    (Some(Peer::IpBlock { cidr, except }), Resolved::Numbers(numbers)) => {
                        let block = PeerKey::Block(
                            (cidr.network(), cidr.prefix_len()),
                            except
                                .iter()
                                .map(|e| (e.network(), e.prefix_len()))
                                .collect(),
                        );
                        for &n in numbers {
                            out.insert(key(ep, dir, block.clone(), n, flags));
                        }
                    }
                    (Some(p @ Peer::Pods { .. }), Resolved::Numbers(numbers)) => {
                        for id in self.selected(p, m) {
                            for &n in numbers {
                                out.insert(key(ep, dir, PeerKey::Identity(id), n, flags));
                            }
                        }
                    }
                    (Some(p @ Peer::Pods { .. }), Resolved::Named(name, protocol)) => {
                        self.identities(out, ep, dir, p, m, name, *protocol, flags)
                    }
                }
            }
        }
    }

    /// Identity ids whose pods `peer` selects, ascending; memoised under `memo` (extended
    /// by the identities created since, filtered to the live ones).
    fn selected(&mut self, peer: &Peer, memo: Option<(&Arc<NetworkPolicy>, PeerRef)>) -> Vec<u32> {
        let selects =
            |k: &IdentityKey| peer.selects_pod(&k.namespace, &k.namespace_labels, &k.labels);
        let Some((object, key)) = memo else {
            return self
                .ids
                .iter()
                .filter(|(_, k)| selects(k))
                .map(|(id, _)| *id)
                .collect();
        };
        let m = self.peers.entry(key).or_insert_with(|| PeerMemo {
            _object: Arc::clone(object),
            selected: Vec::new(),
            upto: 0,
            used: false,
        });
        m.used = true;
        if m.upto < self.next_id {
            m.selected.extend(
                self.ids
                    .range(m.upto..)
                    .filter(|(_, k)| selects(k))
                    .map(|(id, _)| *id),
            );
            m.upto = self.next_id;
        }
        let ids = self.ids;
        m.selected.retain(|id| ids.contains_key(id));
        m.selected.clone()
    }

    /// Egress named port: one rule per selected identity that has the port.
    #[allow(clippy::too_many_arguments)]
    fn identities(
        &mut self,
        out: &mut BTreeSet<RuleKey>,
        ep: u32,
        dir: Direction,
        peer: &Peer,
        memo: Option<(&Arc<NetworkPolicy>, PeerRef)>,
        name: &str,
        protocol: super::Protocol,
        flags: u8,
    ) {
        for id in self.selected(peer, memo) {
            let Some(k) = self.ids.get(&id) else { continue };
            for np in k
                .named_ports
                .iter()
                .filter(|np| np.name == name && np.protocol == protocol)
            {
                let n = (protocol.number(), np.port, np.port);
                out.insert(key(ep, dir, PeerKey::Identity(id), n, flags));
            }
        }
    }
}
