//! Network policy: Kubernetes NetworkPolicies and sluice's HostNetworkPolicies compiled into the
//! dataplane's [`PolicyTable`](dataplane::policy::PolicyTable) for one node, and evaluated directly on the objects to explain a
//! verdict (`sluice policy trace`).
//!
//! ```text
//!  ClusterState ──model::policies──> Policies (validated, defaults applied, warnings)
//!   (NetworkPolicy,        │                   │
//!    HostNetworkPolicy,    │                   ├─> compile(state, node, opts, generation)
//!    Pod, Namespace, Node) │                   │     pods ─> identities (ns, labels, ns labels,
//!                          │                   │             named ports) ─> rules per local pod
//!                          │                   │     ─> dataplane::policy::PolicyBuilder ─> PolicyTable
//!                          │                   └─> reference::Evaluator: one connection, on the
//!                          │                         objects themselves ─> Trace (verdict, which
//!                          │                         policies isolate, which rule allowed)
//! ```
//!
//! NetworkPolicy semantics (networking.k8s.io/v1, as the upstream docs and e2e suite define
//! them): a pod is isolated for a direction once some policy of its namespace selects it with
//! that policy type; what is allowed is then the union of the rules of every selecting policy.
//! `policyTypes` defaults to Ingress, plus Egress when the policy has egress rules. Empty or
//! absent `from`/`to` = every peer; empty or absent `ports` = every port of every protocol.
//! In a peer, `namespaceSelector` and `podSelector` are ANDed; `podSelector` alone means the
//! policy's namespace. `ipBlock` matches any address, pod addresses included. Named ports
//! resolve on the *destination* pod (the local pod for ingress, the remote pod for egress) and
//! never match a destination that is not a pod, nor one reached through an `ipBlock` peer.
//! Ingress to a pod from its own node's addresses (kubelet probes) is always allowed, and so is
//! a pod talking to itself.
//!
//! Audit mode: a policy annotated [`AUDIT_ANNOTATION`]`: "true"` (or every policy, with
//! [`PolicyOptions::audit`]) does not drop; what it alone would deny is forwarded and reported
//! as audit (see `dataplane::policy`). Host policies: [`host`].
//!
//! Invalid parts of a policy become [`PolicyWarning`]s and are skipped (see [`model`]); the
//! rest compiles. Which pods count, and how they group into identities: [`identity`].
//!
//! Limits: IPv4 only (IPv6 ipBlocks match nothing); `hostNetwork` pods are not policy endpoints
//! (their traffic is the node's); a named port reached through an `ipBlock` peer never matches
//! (the table keys rules by identity *or* CIDR, not both); the file parser refuses what the API
//! server refuses (e.g. `endPort` with a named port), so those warnings only appear for objects
//! from other sources.

pub mod compile;
pub mod host;
pub mod identity;
pub mod model;
pub mod reference;
pub mod selector;
pub mod xyz;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use compile::{compile, compile_cached, Cache, Compiled, PolicyCompileError};
pub use host::{HostNetworkPolicy, HostNetworkPolicySpec};
pub use model::{Direction, PolicyKey, Protocol};
pub use reference::{Evaluator, Trace, Verdict};
pub use selector::{Selector, SelectorError};

/// Annotation that puts one policy (NetworkPolicy or HostNetworkPolicy) in audit mode.
pub const AUDIT_ANNOTATION: &str = "policy.sluice.io/audit";

/// Something in a policy (or pod) that policy could not use; the rest still compiles.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyWarning {
    /// `NetworkPolicy ns/name`, `HostNetworkPolicy name` or `Pod ns/name`.
    pub object: String,
    /// Field path in the object, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    /// What is wrong, what was done about it and what to change.
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// Who may use a failsafe port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailsafeFrom {
    /// Any source address.
    Anywhere,
    /// Only the cluster's node `InternalIP`s (overlay and tunnel ports).
    Nodes,
}

/// A port of the node that no host policy can close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FailsafePort {
    pub protocol: Protocol,
    /// First port of the range.
    pub lo: u16,
    /// Last port of the range (== `lo` for one port).
    pub hi: u16,
    pub from: FailsafeFrom,
}

impl FailsafePort {
    const fn tcp(lo: u16, hi: u16) -> Self {
        Self {
            protocol: Protocol::Tcp,
            lo,
            hi,
            from: FailsafeFrom::Anywhere,
        }
    }

    const fn udp_from_nodes(port: u16) -> Self {
        Self {
            protocol: Protocol::Udp,
            lo: port,
            hi: port,
            from: FailsafeFrom::Nodes,
        }
    }

    /// Whether it covers `protocol` (IP number) `port`.
    pub fn covers(&self, protocol: u8, port: u16) -> bool {
        self.protocol.number() == protocol && (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for FailsafePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.as_str().to_ascii_lowercase();
        write!(f, "{proto}:{}", self.lo)?;
        if self.hi != self.lo {
            write!(f, "-{}", self.hi)?;
        }
        if self.from == FailsafeFrom::Nodes {
            f.write_str("@nodes")?;
        }
        Ok(())
    }
}

/// The default failsafe ports: SSH 22, kube-apiserver 6443, KubePrism 7445, kubelet 10250,
/// Talos apid/trustd 50000-50001 and etcd 2379-2380 from anywhere; VXLAN 8472 and WireGuard
/// 51871 (UDP) from the cluster's nodes only.
pub const DEFAULT_FAILSAFE: [FailsafePort; 8] = [
    FailsafePort::tcp(22, 22),
    FailsafePort::tcp(6443, 6443),
    FailsafePort::tcp(7445, 7445),
    FailsafePort::tcp(10250, 10250),
    FailsafePort::tcp(50000, 50001),
    FailsafePort::tcp(2379, 2380),
    FailsafePort::udp_from_nodes(8472),
    FailsafePort::udp_from_nodes(51871),
];

/// Agent-wide policy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Every policy in audit mode (`--policy-audit`): nothing is dropped by policy, what would
    /// be is reported.
    pub audit: bool,
    /// Ports of the node that stay open whatever the host policies say (`--host-failsafe`).
    pub failsafe: Vec<FailsafePort>,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            audit: false,
            failsafe: DEFAULT_FAILSAFE.to_vec(),
        }
    }
}

/// A bad `--host-failsafe` list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--host-failsafe entry {entry:?}: {reason}; write PROTO:PORT[-END][@nodes] entries \
     separated by commas (e.g. tcp:22,tcp:50000-50001,udp:8472@nodes), or none"
)]
pub struct FailsafeParseError {
    /// The entry that did not parse.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses `--host-failsafe`: comma-separated `PROTO:PORT[-END][@nodes]` (`tcp`, `udp`, `sctp`;
/// `@nodes`: only from the cluster's node InternalIPs), or `none` for no failsafe port at all.
pub fn parse_failsafe(text: &str) -> Result<Vec<FailsafePort>, FailsafeParseError> {
    let text = text.trim();
    if text == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in text.split(',').map(str::trim) {
        let err = |reason: &str| FailsafeParseError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let (body, from) = match entry.strip_suffix("@nodes") {
            Some(b) => (b, FailsafeFrom::Nodes),
            None => (entry, FailsafeFrom::Anywhere),
        };
        let (proto, ports) = body.split_once(':').ok_or_else(|| err("missing PROTO:"))?;
        let protocol = Protocol::parse_k8s(&proto.to_ascii_uppercase())
            .ok_or_else(|| err("protocol must be tcp, udp or sctp"))?;
        let port = |s: &str| {
            s.parse::<u16>()
                .ok()
                .filter(|&p| p >= 1)
                .ok_or_else(|| err("ports are numbers 1..=65535"))
        };
        let (lo, hi) = match ports.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => (port(ports)?, port(ports)?),
        };
        if hi < lo {
            return Err(err("the range ends below its start"));
        }
        out.push(FailsafePort {
            protocol,
            lo,
            hi,
            from,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests;
