//! NetworkPolicy and HostNetworkPolicy objects, validated and normalised into one shape that
//! both the compiler and the reference evaluator read. Defaults are applied here (policyTypes,
//! protocol TCP, absent `podSelector` = all pods), and every invalid part is reported as a
//! [`PolicyWarning`] naming the object and the field:
//! - an invalid selector or `policyTypes` value skips the whole policy (as the API server would
//!   refuse it);
//! - an invalid port (`endPort` without a numeric `port`, a named port with `endPort`, unknown
//!   protocol, out of range) or peer (bad CIDR, `except` outside `cidr`, `ipBlock` together with
//!   a selector, an empty peer) skips only that rule: the policy still isolates its pods, so a
//!   broken rule allows less, never more.
//!
//! This layer only parses. What a rule *matches* is decided twice, independently: by expansion
//! into identities and CIDRs in [`super::compile()`] and by direct evaluation on the objects in
//! [`super::reference`].

use std::collections::BTreeMap;
use std::fmt;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::host::HostNetworkPolicy;
use super::selector::{Labels, Selector};
use super::{PolicyWarning, AUDIT_ANNOTATION};
use crate::cluster::{ClusterState, DEFAULT_NAMESPACE};

/// Layer-4 protocols a policy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// IP protocol 6.
    Tcp,
    /// IP protocol 17.
    Udp,
    /// IP protocol 132.
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol with IP protocol number `n`, if a policy can name it.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Kubernetes' spelling (`TCP`, `UDP`, `SCTP`), the only one the API accepts.
    pub fn parse_k8s(text: &str) -> Option<Self> {
        match text {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// `TCP`, `UDP` or `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Traffic direction as seen from the selected endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Into the pod (or node).
    Ingress,
    /// Out of the pod.
    Egress,
}

impl Direction {
    /// `ingress` / `egress`, as the rule list is named in the object.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// `from` / `to`: the peer list of a rule of this direction.
    pub fn peers_field(self) -> &'static str {
        match self {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        }
    }
}

/// Which object a policy came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKey {
    /// `networking.k8s.io/v1` NetworkPolicy (namespace, name).
    Network { namespace: String, name: String },
    /// `policy.sluice.io/v1alpha1` HostNetworkPolicy (name).
    Host { name: String },
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyKey::Network { namespace, name } => write!(f, "{namespace}/{name}"),
            PolicyKey::Host { name } => write!(f, "HostNetworkPolicy {name}"),
        }
    }
}

impl PolicyKey {
    /// `NetworkPolicy ns/name` or `HostNetworkPolicy name`: how warnings name the object.
    pub fn object(&self) -> String {
        match self {
            PolicyKey::Network { .. } => format!("NetworkPolicy {self}"),
            PolicyKey::Host { .. } => self.to_string(),
        }
    }
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods by selectors. `namespaces: None` = the policy's own namespace (or, for a host
    /// policy, every namespace); `pods: None` = every pod of the selected namespaces.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
        /// The policy's namespace, when `namespaces` is None and the policy has one.
        own_namespace: Option<String>,
    },
    /// Addresses in `cidr` but not in any of `except`.
    IpBlock { cidr: Ipv4Net, except: Vec<Ipv4Net> },
    /// An IPv6 ipBlock: never matches anything in this IPv4-only dataplane.
    Ipv6,
}

impl Peer {
    /// Whether a pod in `namespace` (with namespace labels `ns_labels`) with `labels` is
    /// selected by this peer's selectors (false for ipBlock peers).
    pub fn selects_pod(&self, namespace: &str, ns_labels: &Labels, labels: &Labels) -> bool {
        match self {
            Peer::Pods {
                namespaces,
                pods,
                own_namespace,
            } => {
                let ns_ok = match (namespaces, own_namespace) {
                    (Some(sel), _) => sel.matches(ns_labels),
                    (None, Some(own)) => own == namespace,
                    (None, None) => true,
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(labels))
            }
            Peer::IpBlock { .. } | Peer::Ipv6 => false,
        }
    }
}

/// The port part of a rule's port entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of the protocol.
    All,
    /// `lo..=hi` (`port` alone: lo == hi).
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// One rule with its index in the object (indices survive skipped rules, peers and ports so
/// explanations name what the user wrote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Index in `spec.ingress` / `spec.egress`.
    pub index: usize,
    /// `(index in from/to, peer)`; None = every peer (`from`/`to` absent or empty).
    pub peers: Option<Vec<(usize, Peer)>>,
    /// `(index in ports, port)`; None = every port of every protocol (`ports` absent or empty).
    pub ports: Option<Vec<(usize, Port)>>,
}

/// A validated policy of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub key: PolicyKey,
    /// Audit mode (annotation [`AUDIT_ANNOTATION`] or agent-wide audit).
    pub audit: bool,
    /// Pods (of `key`'s namespace) or nodes this policy applies to.
    pub subject: Selector,
    /// Ingress rules when the policy isolates ingress (None: not an ingress policy).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when the policy isolates egress (None: not an egress policy).
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// The rules of `dir`, when the policy isolates that direction.
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// The namespace of a NetworkPolicy.
    pub fn namespace(&self) -> Option<&str> {
        match &self.key {
            PolicyKey::Network { namespace, .. } => Some(namespace),
            PolicyKey::Host { .. } => None,
        }
    }
}

/// All valid policies of a cluster state, and the warnings about the invalid parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    /// NetworkPolicies, in (namespace, name) order.
    pub network: Vec<Policy>,
    /// HostNetworkPolicies, in name order.
    pub host: Vec<Policy>,
    pub warnings: Vec<PolicyWarning>,
}

/// Validates every policy of `state`; `audit_all` puts every policy in audit mode.
pub fn policies(state: &ClusterState, audit_all: bool) -> Policies {
    let mut out = Policies::default();
    for np in &state.network_policies {
        if let Some(p) = network_policy(np, audit_all, &mut out.warnings) {
            out.network.push(p);
        }
    }
    for hp in &state.host_policies {
        if let Some(p) = host_policy(hp, audit_all, &mut out.warnings) {
            out.host.push(p);
        }
    }
    out
}

/// Validates every HostNetworkPolicy of `state` (as [`policies`] does).
pub(crate) fn host_policies(
    state: &ClusterState,
    audit_all: bool,
    warnings: &mut Vec<PolicyWarning>,
) -> Vec<Policy> {
    state
        .host_policies
        .iter()
        .filter_map(|hp| host_policy(hp, audit_all, warnings))
        .collect()
}

fn warn(warnings: &mut Vec<PolicyWarning>, key: &PolicyKey, field: String, message: String) {
    warnings.push(PolicyWarning {
        object: key.object(),
        field,
        message,
    });
}

fn audit_of(meta: &ObjectMeta, key: &PolicyKey, warnings: &mut Vec<PolicyWarning>) -> bool {
    match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUDIT_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            warn(
                warnings,
                key,
                format!("metadata.annotations[{AUDIT_ANNOTATION}]"),
                format!(
                    "{other:?} is neither \"true\" nor \"false\"; the policy is enforced \
                     (write \"true\" for audit mode)"
                ),
            );
            false
        }
    }
}

pub(crate) fn network_policy(
    np: &NetworkPolicy,
    audit_all: bool,
    warnings: &mut Vec<PolicyWarning>,
) -> Option<Policy> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let key = PolicyKey::Network {
        namespace: namespace.clone(),
        name: np.metadata.name.clone().unwrap_or_default(),
    };
    let audit = audit_of(&np.metadata, &key, warnings) || audit_all;
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let subject = match Selector::new_or_everything(spec.pod_selector.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            skip_policy(warnings, &key, "spec.podSelector", &e.to_string());
            return None;
        }
    };
    let (mut ingress_type, mut egress_type) = (false, false);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            // networking/v1 defaulting: Ingress always, Egress when there are egress rules.
            ingress_type = true;
            egress_type = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        skip_policy(
                            warnings,
                            &key,
                            &format!("spec.policyTypes[{i}]"),
                            &format!("unknown policy type {other:?}; use Ingress or Egress"),
                        );
                        return None;
                    }
                }
            }
        }
    }
    let ctx = Ctx {
        key: &key,
        own_namespace: Some(&namespace),
    };
    let ingress = if ingress_type {
        let raw: Vec<_> = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref()))
            .collect();
        Some(ctx.rules(Direction::Ingress, &raw, warnings)?)
    } else {
        None
    };
    let egress = if egress_type {
        let raw: Vec<_> = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_deref(), r.ports.as_deref()))
            .collect();
        Some(ctx.rules(Direction::Egress, &raw, warnings)?)
    } else {
        None
    };
    Some(Policy {
        key,
        audit,
        subject,
        ingress,
        egress,
    })
}

fn host_policy(
    hp: &HostNetworkPolicy,
    audit_all: bool,
    warnings: &mut Vec<PolicyWarning>,
) -> Option<Policy> {
    let key = PolicyKey::Host {
        name: hp.metadata.name.clone().unwrap_or_default(),
    };
    let audit = audit_of(&hp.metadata, &key, warnings) || audit_all;
    let default_spec = Default::default();
    let spec = hp.spec.as_ref().unwrap_or(&default_spec);
    let subject = match Selector::new_or_everything(spec.node_selector.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            skip_policy(warnings, &key, "spec.nodeSelector", &e.to_string());
            return None;
        }
    };
    let ctx = Ctx {
        key: &key,
        own_namespace: None,
    };
    let raw: Vec<_> = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| (r.from.as_deref(), r.ports.as_deref()))
        .collect();
    let ingress = Some(ctx.rules(Direction::Ingress, &raw, warnings)?);
    Some(Policy {
        key,
        audit,
        subject,
        ingress,
        egress: None,
    })
}

fn skip_policy(warnings: &mut Vec<PolicyWarning>, key: &PolicyKey, field: &str, reason: &str) {
    warn(
        warnings,
        key,
        field.to_owned(),
        format!("{reason}; the whole policy is ignored until it is fixed"),
    );
}

struct Ctx<'a> {
    key: &'a PolicyKey,
    own_namespace: Option<&'a str>,
}

/// What is wrong with one rule: (field, reason).
type RuleProblem = (String, String);

/// A rule's raw (peers, ports).
type RawRule<'a> = (
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
);

impl Ctx<'_> {
    /// The valid rules of one direction; None when a selector error skips the whole policy.
    fn rules(
        &self,
        dir: Direction,
        raw: &[RawRule<'_>],
        warnings: &mut Vec<PolicyWarning>,
    ) -> Option<Vec<Rule>> {
        let mut rules = Vec::new();
        for (index, (peers, ports)) in raw.iter().enumerate() {
            let base = format!("spec.{}[{index}]", dir.as_str());
            let peers = match self.peers(&base, dir, peers.unwrap_or_default()) {
                Ok(p) => p,
                Err(RuleError::Policy(field, reason)) => {
                    skip_policy(warnings, self.key, &field, &reason);
                    return None;
                }
                Err(RuleError::Rule((field, reason))) => {
                    skip_rule(warnings, self.key, field, reason);
                    continue;
                }
            };
            let ports = match ports_of(&base, ports.unwrap_or_default()) {
                Ok(p) => p,
                Err((field, reason)) => {
                    skip_rule(warnings, self.key, field, reason);
                    continue;
                }
            };
            rules.push(Rule {
                index,
                peers,
                ports,
            });
        }
        Some(rules)
    }

    fn peers(
        &self,
        base: &str,
        dir: Direction,
        peers: &[NetworkPolicyPeer],
    ) -> Result<Option<Vec<(usize, Peer)>>, RuleError> {
        if peers.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let field = format!("{base}.{}[{i}]", dir.peers_field());
            let selector = |s: Option<&_>, name: &str| -> Result<Option<Selector>, RuleError> {
                s.map(Selector::new)
                    .transpose()
                    .map_err(|e| RuleError::Policy(format!("{field}.{name}.{}", e.field), e.reason))
            };
            let namespaces = selector(peer.namespace_selector.as_ref(), "namespaceSelector")?;
            let pods = selector(peer.pod_selector.as_ref(), "podSelector")?;
            let p = match (&peer.ip_block, namespaces.is_some() || pods.is_some()) {
                (Some(_), true) => {
                    return Err(RuleError::Rule((
                        field,
                        "ipBlock cannot be combined with podSelector or namespaceSelector in \
                         one peer; write them as two peers"
                            .into(),
                    )))
                }
                (None, false) => {
                    return Err(RuleError::Rule((
                        field,
                        "empty peer; give podSelector, namespaceSelector or ipBlock (or drop \
                         the list to allow every peer)"
                            .into(),
                    )))
                }
                (None, true) => Peer::Pods {
                    namespaces,
                    pods,
                    own_namespace: self.own_namespace.map(str::to_owned),
                },
                (Some(block), false) => {
                    ip_block(&format!("{field}.ipBlock"), block).map_err(RuleError::Rule)?
                }
            };
            out.push((i, p));
        }
        Ok(Some(out))
    }
}

enum RuleError {
    /// Skip the whole policy (selector errors): (field, reason).
    Policy(String, String),
    /// Skip the rule.
    Rule(RuleProblem),
}

fn skip_rule(warnings: &mut Vec<PolicyWarning>, key: &PolicyKey, field: String, reason: String) {
    warn(
        warnings,
        key,
        field,
        format!("{reason}; this rule is ignored (the policy still isolates its pods)"),
    );
}

fn ip_block(
    field: &str,
    block: &k8s_openapi::api::networking::v1::IPBlock,
) -> Result<Peer, RuleProblem> {
    let cidr = match block.cidr.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => n.trunc(),
        Ok(IpNet::V6(_)) => return Ok(Peer::Ipv6),
        Err(_) => {
            return Err((
                format!("{field}.cidr"),
                format!("{:?} is not a CIDR (e.g. 10.0.0.0/8)", block.cidr),
            ))
        }
    };
    let mut except = Vec::new();
    for (e, text) in block.except.iter().flatten().enumerate() {
        let field = format!("{field}.except[{e}]");
        match text.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => {
                let n = n.trunc();
                if !cidr.contains(&n) || n.prefix_len() <= cidr.prefix_len() {
                    return Err((
                        field,
                        format!("{n} is not strictly inside the block's cidr {cidr}"),
                    ));
                }
                except.push(n);
            }
            Ok(IpNet::V6(_)) => {
                return Err((field, format!("{text} is IPv6 but cidr {cidr} is IPv4")))
            }
            Err(_) => return Err((field, format!("{text:?} is not a CIDR"))),
        }
    }
    except.sort();
    except.dedup();
    Ok(Peer::IpBlock { cidr, except })
}

fn ports_of(
    base: &str,
    ports: &[NetworkPolicyPort],
) -> Result<Option<Vec<(usize, Port)>>, RuleProblem> {
    if ports.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("{base}.ports[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(text) => Protocol::parse_k8s(text).ok_or_else(|| {
                (
                    format!("{field}.protocol"),
                    format!("unknown protocol {text:?}; use TCP, UDP or SCTP"),
                )
            })?,
        };
        let number = |n: i32, f: &str| {
            u16::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                (
                    format!("{field}.{f}"),
                    format!("port {n} is out of range; ports are 1..=65535"),
                )
            })
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortMatch::All,
            (None, Some(_)) => {
                return Err((
                    format!("{field}.endPort"),
                    "endPort needs a numeric port (the start of the range)".into(),
                ))
            }
            (Some(IntOrString::String(name)), Some(_)) => {
                return Err((
                    format!("{field}.endPort"),
                    format!("endPort cannot be used with the named port {name:?}; give a number"),
                ))
            }
            (Some(IntOrString::String(name)), None) if name.is_empty() => {
                return Err((
                    format!("{field}.port"),
                    "empty port name; give a number or a container port name".into(),
                ))
            }
            (Some(IntOrString::String(name)), None) => PortMatch::Named(name.clone()),
            (Some(IntOrString::Int(n)), None) => {
                let n = number(*n, "port")?;
                PortMatch::Range(n, n)
            }
            (Some(IntOrString::Int(n)), Some(end)) => {
                let (lo, hi) = (number(*n, "port")?, number(end, "endPort")?);
                if hi < lo {
                    return Err((
                        format!("{field}.endPort"),
                        format!("endPort {hi} is below port {lo}"),
                    ));
                }
                PortMatch::Range(lo, hi)
            }
        };
        out.push((i, Port { protocol, port }));
    }
    Ok(Some(out))
}

/// The labels of every namespace that has pods or a Namespace object, each with
/// `kubernetes.io/metadata.name` set (the API server always sets it; hand-written files may
/// omit the label or the whole Namespace).
pub fn namespace_labels(state: &ClusterState) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    for ns in &state.namespaces {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
        out.insert(name, labels);
    }
    for pod in &state.pods {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        out.entry(ns.clone())
            .or_insert_with(|| Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), ns)]));
    }
    out
}

/// The label the API server puts on every Namespace, with its name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
