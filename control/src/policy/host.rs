//! `HostNetworkPolicy` (`policy.sluice.io/v1alpha1`): the host firewall's policy kind.
//!
//! Shaped like Cilium's `CiliumClusterwideNetworkPolicy` with a `nodeSelector` (cluster-scoped,
//! selects Nodes by label), with NetworkPolicy's ingress rule shape so one compiler serves both:
//!
//! ```yaml
//! apiVersion: policy.sluice.io/v1alpha1
//! kind: HostNetworkPolicy          # cluster-scoped
//! metadata: {name: ssh-and-web, annotations: {policy.sluice.io/audit: "false"}}
//! spec:
//!   nodeSelector: {matchLabels: {node-role.kubernetes.io/worker: ""}}  # absent or {} = all nodes
//!   ingress:                       # NetworkPolicyIngressRule, same semantics
//!   - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
//!     ports: [{port: 443, protocol: TCP}]
//! ```
//!
//! A node is open until a HostNetworkPolicy selects it; from then on only what some selecting
//! policy's rules allow reaches the node's own addresses, plus the failsafe ports
//! ([`super::PolicyOptions::failsafe`]), which are always allowed. `ingress: []` (or no
//! `ingress`) denies all but the failsafe ports. Peers with `podSelector` / `namespaceSelector`
//! select pods as in a NetworkPolicy (pods reach the node from their pod address), except that
//! a `podSelector` alone selects in *every* namespace, as in Cilium's clusterwide policies
//! (the policy has no namespace of its own). Named ports never match the host: it has no
//! container ports. Only ingress exists: egress of the host is not filtered.

use k8s_openapi::api::networking::v1::NetworkPolicyIngressRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// `apiVersion` of [`HostNetworkPolicy`].
pub const HOST_POLICY_API_VERSION: &str = "policy.sluice.io/v1alpha1";
/// `kind` of [`HostNetworkPolicy`].
pub const HOST_POLICY_KIND: &str = "HostNetworkPolicy";

/// A cluster-scoped host firewall policy (module doc).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostNetworkPolicy {
    /// Standard object metadata (`name`, `annotations`; no namespace).
    pub metadata: ObjectMeta,
    /// What the policy selects and allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<HostNetworkPolicySpec>,
}

/// `spec` of a [`HostNetworkPolicy`]. Unknown fields (e.g. `egress`, a typo of `ingress`) are
/// refused so a policy never silently means less than what was written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostNetworkPolicySpec {
    /// Nodes this policy applies to, by Node label; absent or `{}` selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Allowed incoming traffic to the node's own addresses (NetworkPolicy ingress rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
}

impl k8s_openapi::Resource for HostNetworkPolicy {
    const API_VERSION: &'static str = HOST_POLICY_API_VERSION;
    const GROUP: &'static str = "policy.sluice.io";
    const KIND: &'static str = HOST_POLICY_KIND;
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "hostnetworkpolicies";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for HostNetworkPolicy {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
