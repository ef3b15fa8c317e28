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

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use dataplane::policy::{
    Dir, Isolation, PeerSpec, PolicyBuilder, PolicyError, PolicyTable, PortSpec, ALLOW_AUDIT,
    ALLOW_ENFORCED,
};

use super::identity::{cluster_node_ips, node_addresses, pod_views, Identities, PodView};
use super::model::{policies, Direction, Peer, Policy, PortMatch, Rule};
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

/// Compiles every policy of `state` for node `node` (module doc). Invalid parts become
/// warnings; the only error is the dataplane refusing the result.
pub fn compile(
    state: &ClusterState,
    node: &str,
    opts: &PolicyOptions,
    generation: u16,
) -> Result<Compiled, PolicyCompileError> {
    let parsed = policies(state, opts.audit);
    let (pods, pod_warnings) = pod_views(state);
    let ids = Identities::new(&pods);
    let mut warnings = parsed.warnings.clone();
    warnings.extend(pod_warnings);

    let mut b = PolicyBuilder::new(generation);
    for (pod, id) in pods.iter().zip(&ids.of_pod) {
        b.identity(pod.addr, *id);
    }
    for addr in node_addresses(state, node) {
        b.node_addr(addr);
    }
    let mut rules: BTreeSet<RuleKey> = BTreeSet::new();
    let ctx = Expand { ids: &ids };
    let mut isolated_pods = 0;

    for pod in pods.iter().filter(|p| p.node == node) {
        let selecting: Vec<&Policy> = parsed
            .network
            .iter()
            .filter(|p| p.namespace() == Some(pod.namespace.as_str()))
            .filter(|p| p.subject.matches(&pod.labels))
            .collect();
        let ingress = isolation(&selecting, Direction::Ingress);
        let egress = isolation(&selecting, Direction::Egress);
        if ingress == Isolation::OPEN && egress == Isolation::OPEN {
            continue;
        }
        isolated_pods += 1;
        let ep = b.endpoint(pod.addr, ingress, egress);
        for policy in &selecting {
            for dir in [Direction::Ingress, Direction::Egress] {
                for rule in policy.rules(dir).unwrap_or_default() {
                    ctx.rule(&mut rules, ep, dir, Some(pod), policy, rule);
                }
            }
        }
    }

    let node_labels = state
        .node(node)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let selecting: Vec<&Policy> = if state.node(node).is_some() {
        parsed
            .host
            .iter()
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
                ctx.rule(&mut rules, ep, Direction::Ingress, None, policy, rule);
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
    ids: &'a Identities,
}

/// A port entry once resolved as far as it can be without knowing the remote pod.
enum Resolved<'a> {
    /// (proto, lo, hi); PROTO_ANY (0) for "every protocol".
    Numbers(Vec<(u8, u16, u16)>),
    /// Egress named port: resolved per destination identity.
    Named(&'a str, super::Protocol),
}

impl Expand<'_> {
    fn rule(
        &self,
        out: &mut BTreeSet<RuleKey>,
        ep: u32,
        dir: Direction,
        local: Option<&PodView>,
        policy: &Policy,
        rule: &Rule,
    ) {
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
        let peers: Vec<Option<&Peer>> = match &rule.peers {
            None => vec![None],
            Some(list) => list.iter().map(|(_, p)| Some(p)).collect(),
        };
        for peer in peers {
            for port in &ports {
                match (peer, port) {
                    (None, Resolved::Numbers(numbers)) => {
                        for &n in numbers {
                            out.insert(key(ep, dir, PeerKey::Any, n, flags));
                        }
                    }
                    // Every peer with a named port: every pod that has the port.
                    (None, Resolved::Named(name, protocol)) => {
                        self.identities(out, ep, dir, &any_peer[0], name, *protocol, flags)
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
                        for id in self.selected(p) {
                            for &n in numbers {
                                out.insert(key(ep, dir, PeerKey::Identity(id), n, flags));
                            }
                        }
                    }
                    (Some(p @ Peer::Pods { .. }), Resolved::Named(name, protocol)) => {
                        self.identities(out, ep, dir, p, name, *protocol, flags)
                    }
                }
            }
        }
    }

    /// Identity ids whose pods `peer` selects.
    fn selected<'b>(&'b self, peer: &'b Peer) -> impl Iterator<Item = u32> + 'b {
        self.ids
            .identities
            .iter()
            .filter(move |(_, k)| peer.selects_pod(&k.namespace, &k.namespace_labels, &k.labels))
            .map(|(id, _)| *id)
    }

    /// Egress named port: one rule per selected identity that has the port.
    #[allow(clippy::too_many_arguments)]
    fn identities(
        &self,
        out: &mut BTreeSet<RuleKey>,
        ep: u32,
        dir: Direction,
        peer: &Peer,
        name: &str,
        protocol: super::Protocol,
        flags: u8,
    ) {
        for (id, k) in &self.ids.identities {
            if !peer.selects_pod(&k.namespace, &k.namespace_labels, &k.labels) {
                continue;
            }
            for np in k
                .named_ports
                .iter()
                .filter(|np| np.name == name && np.protocol == protocol)
            {
                let n = (protocol.number(), np.port, np.port);
                out.insert(key(ep, dir, PeerKey::Identity(*id), n, flags));
            }
        }
    }
}
