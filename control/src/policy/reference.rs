//! The reference evaluator: one connection judged directly on the cluster objects, without the
//! compiled tables, with the reasons. It is the engine of `sluice policy trace` and the oracle
//! the compiler is tested against (same verdicts for random clusters, policies and
//! connections), so it is written to be obviously right rather than fast: every policy, every
//! rule, every peer and every port entry is looked at for every question.
//!
//! A connection passes up to three checkpoints, each enforced on one node:
//! - **egress** of the source, when it is a pod (on the source pod's node);
//! - **ingress** of the destination, when it is a pod (on the destination pod's node);
//! - **host** ingress, when the destination is an address of a node (on that node).
//!
//! Each checkpoint: not isolated -> allowed; isolated by an enforcing policy and no enforcing
//! rule allows -> denied; else, when no rule at all allows -> audit; else allowed. The
//! connection's verdict is the worst of its checkpoints. Always allowed, whatever the
//! policies: a pod talking to itself, ingress to a pod from its own node's addresses, and the
//! failsafe ports of a node.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::identity::{cluster_node_ips, node_addresses, pod_views, PodView};
use super::model::{policies, Direction, Peer, Policies, Policy, PortMatch, Protocol, Rule};
use super::{FailsafeFrom, PolicyOptions, PolicyWarning};
use crate::cluster::ClusterState;

/// What policy says about a connection (or one checkpoint of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    /// Forwarded, but an audit-mode policy would drop it.
    Audit,
    Deny,
}

impl Verdict {
    /// `ALLOWED`, `AUDIT` (allowed, would be denied) or `DENIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOWED",
            Verdict::Audit => "AUDIT",
            Verdict::Deny => "DENIED",
        }
    }
}

/// Which checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    /// Egress of the source pod.
    Egress,
    /// Ingress of the destination pod.
    Ingress,
    /// Ingress of the destination node (host firewall).
    Host,
}

impl Checkpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Checkpoint::Egress => "egress",
            Checkpoint::Ingress => "ingress",
            Checkpoint::Host => "host",
        }
    }
}

/// A policy that isolates a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// `ns/name` or `HostNetworkPolicy name`.
    pub policy: String,
    pub audit: bool,
}

/// A rule that allowed the connection: `policy ingress[rule] from[peer] ports[port]`
/// (`peer`/`port` None: the rule has no peer / port list, so it allows every one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: String,
    pub audit: bool,
    pub direction: Direction,
    pub rule: usize,
    pub peer: Option<usize>,
    pub port: Option<usize>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}[{}]",
            self.policy,
            self.direction.as_str(),
            self.rule
        )?;
        if let Some(p) = self.peer {
            write!(f, " {}[{p}]", self.direction.peers_field())?;
        }
        if let Some(p) = self.port {
            write!(f, " ports[{p}]")?;
        }
        if self.audit {
            f.write_str(" (audit)")?;
        }
        Ok(())
    }
}

/// One checkpoint of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointTrace {
    pub checkpoint: Checkpoint,
    /// `ns/pod` or `node NAME`.
    pub subject: String,
    /// The node that enforces this checkpoint (empty for an unscheduled pod).
    pub node: String,
    /// Policies selecting the subject for this direction (empty: not isolated).
    pub isolated_by: Vec<PolicyRef>,
    /// Rules that allow the connection.
    pub allowed_by: Vec<RuleRef>,
    /// Why the connection is allowed whatever the policies, if it is.
    pub always_allowed: Option<String>,
    pub verdict: Verdict,
}

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub addr: Ipv4Addr,
    /// `ns/name` when the address is a pod's.
    pub pod: Option<String>,
    /// The pod's node, or the node whose address this is.
    pub node: Option<String>,
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, &self.node) {
            (Some(pod), _) => write!(f, "{pod} ({})", self.addr),
            (None, Some(node)) => write!(f, "node {node} ({})", self.addr),
            (None, None) => write!(f, "{}", self.addr),
        }
    }
}

/// A connection judged by the reference evaluator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub from: Party,
    pub to: Party,
    /// IP protocol number.
    pub protocol: u8,
    pub port: u16,
    /// The worst verdict over all checkpoints.
    pub verdict: Verdict,
    pub checkpoints: Vec<CheckpointTrace>,
}

impl Trace {
    /// The verdict of the checkpoints enforced on `node` (what that node's compiled table
    /// answers).
    pub fn verdict_on(&self, node: &str) -> Verdict {
        self.checkpoints
            .iter()
            .filter(|c| c.node == node)
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Allow)
    }

    /// The verdict of pod checkpoints (egress, ingress) enforced on `node`: what
    /// `PolicyTable::check` answers there.
    pub fn pod_verdict_on(&self, node: &str) -> Verdict {
        self.checkpoints
            .iter()
            .filter(|c| c.node == node && c.checkpoint != Checkpoint::Host)
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Allow)
    }

    /// The host checkpoint's verdict on `node`: what `PolicyTable::check_host` answers there.
    pub fn host_verdict_on(&self, node: &str) -> Verdict {
        self.checkpoints
            .iter()
            .filter(|c| c.node == node && c.checkpoint == Checkpoint::Host)
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Allow)
    }

    /// The first checkpoint with the connection's verdict, when that is not "allowed".
    pub fn decided_by(&self) -> Option<&CheckpointTrace> {
        if self.verdict == Verdict::Allow {
            return None;
        }
        self.checkpoints.iter().find(|c| c.verdict == self.verdict)
    }

    /// The human-readable explanation (`sluice policy trace`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let proto = proto_name(self.protocol);
        let _ = writeln!(
            out,
            "connection: {} -> {} port {}/{proto}",
            self.from, self.to, self.port
        );
        match self.decided_by() {
            Some(c) => {
                let at = match c.checkpoint {
                    Checkpoint::Host => format!("host firewall of {}", c.subject),
                    other => format!("{} of {}", other.as_str(), c.subject),
                };
                let _ = writeln!(out, "verdict: {} ({at})", self.verdict.as_str());
            }
            None => {
                let _ = writeln!(out, "verdict: {}", self.verdict.as_str());
            }
        }
        if self.checkpoints.is_empty() {
            let _ = writeln!(
                out,
                "no checkpoint: neither end is a pod and the destination is not a node"
            );
        }
        for c in &self.checkpoints {
            let on = if c.node.is_empty() {
                String::from(" [not scheduled]")
            } else {
                format!(" [on {}]", c.node)
            };
            let _ = write!(out, "{:<7} {}{on}: ", c.checkpoint.as_str(), c.subject);
            if let Some(why) = &c.always_allowed {
                let _ = writeln!(out, "always allowed ({why})");
                continue;
            }
            if c.isolated_by.is_empty() {
                let _ = writeln!(
                    out,
                    "not isolated (no policy selects it for {})",
                    match c.checkpoint {
                        Checkpoint::Egress => "egress",
                        Checkpoint::Ingress | Checkpoint::Host => "ingress",
                    }
                );
                continue;
            }
            let isolated: Vec<String> = c
                .isolated_by
                .iter()
                .map(|p| {
                    if p.audit {
                        format!("{} (audit)", p.policy)
                    } else {
                        p.policy.clone()
                    }
                })
                .collect();
            let _ = write!(out, "isolated by {}; ", isolated.join(", "));
            if c.allowed_by.is_empty() {
                let remote = match c.checkpoint {
                    Checkpoint::Egress => &self.to,
                    Checkpoint::Ingress | Checkpoint::Host => &self.from,
                };
                let _ = write!(out, "no rule allows {remote} port {}/{proto}", self.port);
            } else {
                let rules: Vec<String> = c.allowed_by.iter().map(ToString::to_string).collect();
                let _ = write!(out, "allowed by {}", rules.join(", "));
            }
            let _ = writeln!(out, " -> {}", c.verdict.as_str().to_ascii_lowercase());
        }
        out
    }
}

/// `TCP`, `UDP`, `SCTP`, `ICMP` or the number.
pub fn proto_name(protocol: u8) -> String {
    match Protocol::from_number(protocol) {
        Some(p) => p.as_str().to_owned(),
        None if protocol == 1 => "ICMP".to_owned(),
        None => format!("proto-{protocol}"),
    }
}

/// Why a trace question cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error(
        "pod {0} is not in the cluster state (or has no IPv4 status.podIP, runs with \
         hostNetwork, or has finished); check `kubectl get pod -n NS NAME -o wide`"
    )]
    UnknownPod(String),
    #[error("{0:?} is neither NAMESPACE/POD nor an IPv4 address")]
    BadEndpoint(String),
    #[error("port {0:?}: expected N, N/tcp, N/udp or N/sctp with N in 1..=65535")]
    BadPort(String),
}

/// The reference evaluator over one cluster state (module doc).
#[derive(Debug, Clone)]
pub struct Evaluator {
    policies: Policies,
    pods: Vec<PodView>,
    by_addr: BTreeMap<Ipv4Addr, usize>,
    /// Address -> node name, for every IPv4 InternalIP/ExternalIP of every node.
    node_of_addr: BTreeMap<Ipv4Addr, String>,
    /// Node name -> labels.
    node_labels: BTreeMap<String, super::selector::Labels>,
    node_ips: Vec<Ipv4Addr>,
    failsafe: Vec<super::FailsafePort>,
    warnings: Vec<PolicyWarning>,
}

impl Evaluator {
    /// Reads the policies, pods and nodes of `state`.
    pub fn new(state: &ClusterState, opts: &PolicyOptions) -> Self {
        let policies = policies(state, opts.audit);
        let (pods, pod_warnings) = pod_views(state);
        let by_addr = pods.iter().enumerate().map(|(i, p)| (p.addr, i)).collect();
        let mut node_of_addr = BTreeMap::new();
        let mut node_labels = BTreeMap::new();
        for node in &state.nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            for addr in node_addresses(state, &name) {
                node_of_addr.entry(addr).or_insert_with(|| name.clone());
            }
            node_labels.insert(name, node.metadata.labels.clone().unwrap_or_default());
        }
        let mut warnings = policies.warnings.clone();
        warnings.extend(pod_warnings);
        Self {
            policies,
            pods,
            by_addr,
            node_of_addr,
            node_labels,
            node_ips: cluster_node_ips(state),
            failsafe: opts.failsafe.clone(),
            warnings,
        }
    }

    /// Warnings about invalid policies and pods (the same the compiler gives).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// `NAMESPACE/POD` (the pod's address) or an IPv4 address.
    pub fn resolve(&self, text: &str) -> Result<Ipv4Addr, TraceError> {
        if let Ok(addr) = text.parse::<Ipv4Addr>() {
            return Ok(addr);
        }
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => self
                .pods
                .iter()
                .find(|p| p.key == text)
                .map(|p| p.addr)
                .ok_or_else(|| TraceError::UnknownPod(text.to_owned())),
            _ => Err(TraceError::BadEndpoint(text.to_owned())),
        }
    }

    fn party(&self, addr: Ipv4Addr) -> Party {
        match self.pod(addr) {
            Some(p) => Party {
                addr,
                pod: Some(p.key.clone()),
                node: Some(p.node.clone()).filter(|n| !n.is_empty()),
            },
            None => Party {
                addr,
                pod: None,
                node: self.node_of_addr.get(&addr).cloned(),
            },
        }
    }

    fn pod(&self, addr: Ipv4Addr) -> Option<&PodView> {
        self.by_addr.get(&addr).map(|&i| &self.pods[i])
    }

    /// Judges a connection from `from` to `to`, IP protocol `protocol`, destination `port`
    /// (module doc).
    pub fn evaluate(&self, from: Ipv4Addr, to: Ipv4Addr, protocol: u8, port: u16) -> Trace {
        let conn = Conn {
            from,
            to,
            protocol,
            port,
            src: self.pod(from),
            dst: self.pod(to),
        };
        let mut checkpoints = Vec::new();
        if let Some(src) = conn.src {
            checkpoints.push(self.pod_checkpoint(&conn, src, Direction::Egress));
        }
        if let Some(dst) = conn.dst {
            checkpoints.push(self.pod_checkpoint(&conn, dst, Direction::Ingress));
        }
        if conn.dst.is_none() {
            if let Some(node) = self.node_of_addr.get(&to) {
                checkpoints.push(self.host_checkpoint(&conn, node));
            }
        }
        Trace {
            from: self.party(from),
            to: self.party(to),
            protocol,
            port,
            verdict: checkpoints
                .iter()
                .map(|c| c.verdict)
                .max()
                .unwrap_or(Verdict::Allow),
            checkpoints,
        }
    }

    fn pod_checkpoint(&self, conn: &Conn<'_>, pod: &PodView, dir: Direction) -> CheckpointTrace {
        let selecting: Vec<&Policy> = self
            .policies
            .network
            .iter()
            .filter(|p| p.namespace() == Some(pod.namespace.as_str()))
            .filter(|p| p.subject.matches(&pod.labels))
            .filter(|p| p.rules(dir).is_some())
            .collect();
        let always_allowed = if conn.from == conn.to {
            Some("a pod talking to itself".to_owned())
        } else if dir == Direction::Ingress
            && !pod.node.is_empty()
            && self.node_of_addr.get(&conn.from) == Some(&pod.node)
        {
            Some(format!(
                "from an address of its own node {} (kubelet probes)",
                pod.node
            ))
        } else {
            None
        };
        let checkpoint = match dir {
            Direction::Ingress => Checkpoint::Ingress,
            Direction::Egress => Checkpoint::Egress,
        };
        self.judge(
            conn,
            checkpoint,
            pod.key.clone(),
            pod.node.clone(),
            Some(pod),
            &selecting,
            dir,
            always_allowed,
        )
    }

    fn host_checkpoint(&self, conn: &Conn<'_>, node: &str) -> CheckpointTrace {
        let labels = self.node_labels.get(node).cloned().unwrap_or_default();
        let selecting: Vec<&Policy> = self
            .policies
            .host
            .iter()
            .filter(|p| p.subject.matches(&labels))
            .collect();
        let failsafe = self.failsafe.iter().find(|f| {
            f.covers(conn.protocol, conn.port)
                && match f.from {
                    FailsafeFrom::Anywhere => true,
                    FailsafeFrom::Nodes => self.node_ips.contains(&conn.from),
                }
        });
        let always_allowed = failsafe.map(|f| format!("failsafe port {f}"));
        self.judge(
            conn,
            Checkpoint::Host,
            format!("node {node}"),
            node.to_owned(),
            None,
            &selecting,
            Direction::Ingress,
            always_allowed,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        conn: &Conn<'_>,
        checkpoint: Checkpoint,
        subject: String,
        node: String,
        local: Option<&PodView>,
        selecting: &[&Policy],
        dir: Direction,
        always_allowed: Option<String>,
    ) -> CheckpointTrace {
        let isolated_by: Vec<PolicyRef> = selecting
            .iter()
            .map(|p| PolicyRef {
                policy: p.key.to_string(),
                audit: p.audit,
            })
            .collect();
        let mut allowed_by = Vec::new();
        for policy in selecting {
            for rule in policy.rules(dir).unwrap_or_default() {
                if let Some((peer, port)) = rule_allows(conn, dir, local, rule) {
                    allowed_by.push(RuleRef {
                        policy: policy.key.to_string(),
                        audit: policy.audit,
                        direction: dir,
                        rule: rule.index,
                        peer,
                        port,
                    });
                }
            }
        }
        let verdict = if always_allowed.is_some() || isolated_by.is_empty() {
            Verdict::Allow
        } else if isolated_by.iter().any(|p| !p.audit) && allowed_by.iter().all(|r| r.audit) {
            Verdict::Deny
        } else if allowed_by.is_empty() {
            Verdict::Audit
        } else {
            Verdict::Allow
        };
        CheckpointTrace {
            checkpoint,
            subject,
            node,
            isolated_by,
            allowed_by,
            always_allowed,
            verdict,
        }
    }
}

struct Conn<'a> {
    from: Ipv4Addr,
    to: Ipv4Addr,
    protocol: u8,
    port: u16,
    src: Option<&'a PodView>,
    dst: Option<&'a PodView>,
}

/// The first (peer, port) pair of `rule` that matches the connection, by their indices.
fn rule_allows(
    conn: &Conn<'_>,
    dir: Direction,
    local: Option<&PodView>,
    rule: &Rule,
) -> Option<(Option<usize>, Option<usize>)> {
    let remote_addr = match dir {
        Direction::Ingress => conn.from,
        Direction::Egress => conn.to,
    };
    let remote_pod = match dir {
        Direction::Ingress => conn.src,
        Direction::Egress => conn.dst,
    };
    // The pod that owns the destination port: named ports resolve on it.
    let dst_pod = match dir {
        Direction::Ingress => local,
        Direction::Egress => remote_pod,
    };
    let peers: Vec<(Option<usize>, Option<&Peer>)> = match &rule.peers {
        None => vec![(None, None)],
        Some(list) => list.iter().map(|(i, p)| (Some(*i), Some(p))).collect(),
    };
    for (peer_index, peer) in peers {
        let peer_ok = match peer {
            None => true,
            Some(Peer::Ipv6) => false,
            Some(Peer::IpBlock { cidr, except }) => {
                cidr.contains(&remote_addr) && !except.iter().any(|e| e.contains(&remote_addr))
            }
            Some(p @ Peer::Pods { .. }) => remote_pod
                .is_some_and(|r| p.selects_pod(&r.namespace, &r.namespace_labels, &r.labels)),
        };
        if !peer_ok {
            continue;
        }
        let Some(ports) = &rule.ports else {
            return Some((peer_index, None));
        };
        for (port_index, p) in ports {
            if p.protocol.number() != conn.protocol {
                continue;
            }
            let port_ok = match &p.port {
                PortMatch::All => true,
                PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&conn.port),
                PortMatch::Named(name) => {
                    // Egress through an ipBlock never resolves a name (module doc of `policy`).
                    let through_block = matches!(peer, Some(Peer::IpBlock { .. }));
                    !(dir == Direction::Egress && through_block)
                        && dst_pod
                            .is_some_and(|d| d.resolve(name, p.protocol).any(|n| n == conn.port))
                }
            };
            if port_ok {
                return Some((peer_index, Some(*port_index)));
            }
        }
    }
    None
}

/// `N`, `N/tcp`, `N/udp` or `N/sctp` (`sluice policy trace --port`): (IP protocol, port).
pub fn parse_port_spec(text: &str) -> Result<(u8, u16), TraceError> {
    let bad = || TraceError::BadPort(text.to_owned());
    let (port, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let protocol = Protocol::parse_k8s(&proto.to_ascii_uppercase()).ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p >= 1)
        .ok_or_else(bad)?;
    Ok((protocol.number(), port))
}

/// What this node's compiled table says, beside the reference verdict for the same checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneVerdict {
    pub verdict: Verdict,
    /// The drop reason the workers would count (`policy_denied_egress`, ...), if not allowed.
    pub reason: Option<String>,
    /// The compiled table's policy generation.
    pub generation: u16,
    /// The reference evaluator's verdict for the checkpoints on this node (should be equal).
    pub reference: Verdict,
}

/// A `sluice policy trace` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    /// The node that answered.
    pub node: String,
    pub trace: Trace,
    /// None when no checkpoint of the connection is on this node.
    pub dataplane: Option<DataplaneVerdict>,
    /// Invalid policies (skipped in whole or in part) that may explain a surprise.
    pub warnings: Vec<PolicyWarning>,
}

impl TraceReport {
    /// The explanation, then the dataplane comparison and the warnings.
    pub fn render(&self) -> String {
        let mut out = self.trace.render();
        match &self.dataplane {
            Some(d) => {
                let _ = write!(
                    out,
                    "dataplane on {}: {} (policy generation {})",
                    self.node,
                    d.verdict.as_str().to_ascii_lowercase(),
                    d.generation
                );
                if let Some(r) = &d.reason {
                    let _ = write!(out, ", drop reason {r}");
                }
                if d.verdict != d.reference {
                    let _ = write!(
                        out,
                        "; MISMATCH: the reference says {} for the checkpoints on this node \
                         (please report this)",
                        d.reference.as_str().to_ascii_lowercase()
                    );
                }
                out.push('\n');
            }
            None => {
                let _ = writeln!(
                    out,
                    "dataplane on {}: no checkpoint of this connection is enforced here; ask the \
                     agent of the nodes named above",
                    self.node
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

/// Answers `sluice policy trace` on node `node`: resolves `from` / `to` (`NS/POD` or an IPv4
/// address), judges the connection with the reference evaluator, and asks `table` (this node's
/// compiled policy) about the checkpoints enforced here.
#[allow(clippy::too_many_arguments)]
pub fn trace(
    state: &ClusterState,
    opts: &PolicyOptions,
    table: &dataplane::policy::PolicyTable,
    node: &str,
    from: &str,
    to: &str,
    protocol: u8,
    port: u16,
) -> Result<TraceReport, TraceError> {
    let eval = Evaluator::new(state, opts);
    let (src, dst) = (eval.resolve(from)?, eval.resolve(to)?);
    let trace = eval.evaluate(src, dst, protocol, port);
    let dataplane = dataplane_verdict(&trace, table, node);
    Ok(TraceReport {
        node: node.to_owned(),
        trace,
        dataplane,
        warnings: eval.warnings().to_vec(),
    })
}

/// What `table` (compiled for `node`) answers for the checkpoints of `trace` on `node`:
/// `check` for the pod checkpoints, `check_host` for the host one; None when none is on `node`.
pub fn dataplane_verdict(
    trace: &Trace,
    table: &dataplane::policy::PolicyTable,
    node: &str,
) -> Option<DataplaneVerdict> {
    use dataplane::policy::{policy_port, PolicyVerdict};
    let here = |host: bool| {
        trace
            .checkpoints
            .iter()
            .any(|c| c.node == node && (c.checkpoint == Checkpoint::Host) == host)
    };
    let port = policy_port(trace.protocol, trace.port);
    let mut answers = Vec::new();
    if here(false) {
        answers.push(table.check(trace.from.addr, trace.to.addr, trace.protocol, port));
    }
    if here(true) {
        answers.push(table.check_host(trace.from.addr, trace.protocol, port));
    }
    if answers.is_empty() {
        return None;
    }
    let judged = |v: &PolicyVerdict| match v {
        PolicyVerdict::Allow => (Verdict::Allow, None),
        PolicyVerdict::Audit(r) => (Verdict::Audit, Some(r.as_str().to_owned())),
        PolicyVerdict::Deny(r) => (Verdict::Deny, Some(r.as_str().to_owned())),
    };
    let (verdict, reason) = answers
        .iter()
        .map(judged)
        .max_by_key(|(v, _)| *v)
        .unwrap_or((Verdict::Allow, None));
    Some(DataplaneVerdict {
        verdict,
        reason,
        generation: table.generation(),
        reference: trace.verdict_on(node),
    })
}
