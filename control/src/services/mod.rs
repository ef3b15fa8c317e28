//! Services: the kube-proxy replacement's control half. Turns Service and EndpointSlice objects
//! into a [`ServicePlan`] of frontends (what addresses the dataplane answers) and per-port service
//! entries (backends with their state, and the precomputed Maglev tables workers look up).
//!
//! ```text
//!  ClusterState ──effective_endpoint_slices──┐
//!   .services   ─────────────────────────────┴─> translate(cluster, this_node, opts)
//!                                                   │
//!   ServicePlan { frontends: [(IPv4, port, TCP|UDP) -> services[i], kind, scope, eTP flag],
//!                 services:  [ns/name:port -> backends (Active|Terminating|NotServing, local),
//!                             cluster rotation (+ local rotation for eTP/iTP=Local),
//!                             Maglev table per rotation, affinity, healthCheckNodePort],
//!                 skipped:   [(ns/name, reason)] }
//! ```
//!
//! The translation follows kube-proxy (`pkg/proxy/servicechangetracker.go`,
//! `endpointslicecache.go`, `topology.go`, v1.33) so the same objects behave the same:
//! - NodePorts are answered on every IPv4 `InternalIP` and `ExternalIP` of this node (kube-proxy's
//!   `nodePortAddresses` unset, nftables mode: the node's primary addresses); other nodes'
//!   addresses never are. LoadBalancer ingress IPs with `ipMode: Proxy` are not served (the load
//!   balancer forwards to node ports), as kube-proxy.
//! - Services labelled [`SERVICE_PROXY_NAME_LABEL`] belong to another proxy and are ignored;
//!   ExternalName and headless (`clusterIP: None`) Services have nothing to proxy and are skipped;
//!   so are Services whose `clusterIP` is not allocated yet.
//! - A backend belongs to a service port when its slice's port has the *same name* and protocol
//!   as the Service port; the backend's port is that slice port's number, so a named
//!   `targetPort` resolves per backend. Only the first address of an endpoint is used, only
//!   `addressType: IPv4` slices are read (sluice is IPv4-only).
//! - Conditions: `ready` (nil = true) -> [`BackendState::Active`]; `serving` (nil = true) and
//!   `terminating` -> [`BackendState::Terminating`], in rotation only when the rotation has no
//!   Active backend; otherwise [`BackendState::NotServing`], kept so flows already pinned to it
//!   can finish, never chosen for new flows. `publishNotReadyAddresses` makes every endpoint
//!   Active.
//! - Traffic policies: `externalTrafficPolicy: Local` gives NodePort, LoadBalancer and
//!   externalIP frontends [`Scope::Local`] (local backends only, client address kept, see
//!   [`Frontend::external_traffic_local`]); `internalTrafficPolicy: Local` does the same for the
//!   ClusterIP frontend. Each scope has its own rotation, with the terminating fallback applied
//!   within the scope, as kube-proxy's `CategorizeEndpoints` does. Traffic from this node's own
//!   pods to an external frontend may use the cluster rotation (kube-proxy's short-circuit);
//!   that choice is the dataplane's.
//!
//! Everything is sorted, so equal input gives an equal plan (and equal Maglev tables, which use a
//! hash written out in [`maglev`], not std's unstable `DefaultHasher`).
//!
//! Not done here: `loadBalancerSourceRanges`, `trafficDistribution`/topology hints, IPv6.

pub mod dataplane;
pub mod health;
pub mod listing;
pub mod maglev;
mod translate;

use std::fmt;
use std::net::Ipv4Addr;

pub use maglev::{MaglevError, DEFAULT_TABLE_SIZE};
pub use translate::{translate, translate_cached, Cache};

/// Label that hands a Service to a proxy other than the default one; kube-proxy (and sluice)
/// ignore Services carrying it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// How workers choose a backend for a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectionMode {
    /// Look the flow hash up in the rotation's Maglev table (consistent: most flows keep their
    /// backend when another backend comes or goes).
    #[default]
    Maglev,
    /// Flow hash modulo the number of backends in the rotation; no tables are built.
    Random,
}

/// Options of the translation; build with [`ServiceOptions::new`] (validated) or `default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceOptions {
    maglev_table_size: u32,
    selection: SelectionMode,
}

impl Default for ServiceOptions {
    /// Maglev with Cilium's default table size, [`DEFAULT_TABLE_SIZE`] (16381).
    fn default() -> Self {
        Self {
            maglev_table_size: DEFAULT_TABLE_SIZE,
            selection: SelectionMode::Maglev,
        }
    }
}

impl ServiceOptions {
    /// Options with Maglev table size `maglev_table_size` (a prime, see
    /// [`maglev::validate_table_size`]) and backend selection `selection`.
    pub fn new(maglev_table_size: u32, selection: SelectionMode) -> Result<Self, MaglevError> {
        maglev::validate_table_size(maglev_table_size)?;
        Ok(Self {
            maglev_table_size,
            selection,
        })
    }

    /// Entries in every Maglev table.
    pub fn maglev_table_size(&self) -> u32 {
        self.maglev_table_size
    }

    /// How workers choose a backend.
    pub fn selection(&self) -> SelectionMode {
        self.selection
    }
}

/// L4 protocol of a frontend; Services' other protocols (SCTP) are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// IP protocol 6.
    Tcp,
    /// IP protocol 17.
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling, `TCP` or `UDP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What made an address a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// `spec.clusterIP`.
    ClusterIp,
    /// `spec.ports[].nodePort` on one of this node's addresses.
    NodePort,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// `spec.externalIPs[]`.
    ExternalIp,
}

impl FrontendKind {
    /// Whether traffic to this kind of frontend comes from outside the cluster, so that
    /// `externalTrafficPolicy` applies.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }

    /// Lower-case name for listings and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "clusterip",
            FrontendKind::NodePort => "nodeport",
            FrontendKind::LoadBalancer => "loadbalancer",
            FrontendKind::ExternalIp => "externalip",
        }
    }
}

/// Which of a service entry's rotations a frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Backends on every node: [`ServiceEntry::cluster`].
    Cluster,
    /// Backends on this node only: [`ServiceEntry::local`]. With no local backend the packet is
    /// dropped with a reason (kube-proxy's behaviour for eTP/iTP=Local).
    Local,
}

/// One address the dataplane answers for a service port. Keys `(address, port, protocol)` are
/// unique within a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// Destination address.
    pub address: Ipv4Addr,
    /// Destination port.
    pub port: u16,
    /// Destination protocol.
    pub protocol: Protocol,
    /// Where the frontend comes from.
    pub kind: FrontendKind,
    /// Index of its service port in [`ServicePlan::services`].
    pub service: usize,
    /// Which rotation new flows use.
    pub scope: Scope,
    /// `externalTrafficPolicy: Local` on an external frontend: local backends only and the
    /// client's source address is kept (no SNAT).
    pub external_traffic_local: bool,
}

/// A backend's condition, from the EndpointSlice endpoint's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// `ready` (or `publishNotReadyAddresses`): in rotation.
    Active,
    /// `serving` and `terminating`: in rotation only when the rotation has no Active backend.
    Terminating,
    /// Neither: never chosen for a new flow, kept for flows already pinned to it.
    NotServing,
}

impl BackendState {
    /// Lower-case name for listings.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::NotServing => "not-serving",
        }
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The endpoint's (first) address.
    pub address: Ipv4Addr,
    /// The slice port's number: the resolved `targetPort`.
    pub port: u16,
    /// The endpoint's `nodeName`.
    pub node_name: Option<String>,
    /// `nodeName` is the node this plan is for.
    pub local: bool,
    /// Condition.
    pub state: BackendState,
}

impl Backend {
    /// The stable key the Maglev permutation is hashed from, `address:port`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// The backends new flows may go to, for one scope of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rotation {
    /// Indices into [`ServiceEntry::backends`], ascending: the Active backends of the scope, or
    /// its Terminating ones when it has no Active backend. Empty: no backend (reject).
    pub backends: Vec<u32>,
    /// The rotation holds Terminating backends because no Active one exists.
    pub terminating_fallback: bool,
    /// Maglev lookup table ([`SelectionMode::Maglev`]): entry `flow_hash % len` is an index into
    /// [`ServiceEntry::backends`]. Empty for [`SelectionMode::Random`] or when `backends` is.
    pub maglev: std::sync::Arc<[u16]>,
}

/// `sessionAffinity: ClientIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionAffinity {
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, default
    /// [`DEFAULT_AFFINITY_TIMEOUT_SECONDS`].
    pub timeout_seconds: u32,
}

/// One port of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// `spec.ports[].name` (empty when unnamed).
    pub port_name: String,
    /// `spec.ports[].port`.
    pub port: u16,
    /// `spec.ports[].protocol`.
    pub protocol: Protocol,
    /// `spec.clusterIP`.
    pub cluster_ip: Ipv4Addr,
    /// Every backend, sorted by (address, port); rotations and tables index into it.
    pub backends: Vec<Backend>,
    /// Rotation over all nodes' backends.
    pub cluster: Rotation,
    /// Rotation over this node's backends; present when either traffic policy is `Local`.
    pub local: Option<Rotation>,
    /// `sessionAffinity: ClientIP`.
    pub affinity: Option<SessionAffinity>,
    /// `externalTrafficPolicy: Local`.
    pub external_traffic_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_traffic_local: bool,
    /// `spec.healthCheckNodePort`, recorded for `externalTrafficPolicy: Local` Services: the
    /// agent answers it with this node's local endpoint count, as kube-proxy does.
    pub health_check_node_port: Option<u16>,
}

impl ServiceEntry {
    /// `namespace/name`.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The rotation a scope uses; `Local` falls back to an empty rotation when neither policy
    /// is Local (no frontend asks for it then).
    pub fn rotation(&self, scope: Scope) -> &Rotation {
        static EMPTY: std::sync::LazyLock<Rotation> = std::sync::LazyLock::new(Rotation::default);
        match scope {
            Scope::Cluster => &self.cluster,
            Scope::Local => self.local.as_ref().unwrap_or(&*EMPTY),
        }
    }
}

/// The translation of a cluster's Services for one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePlan {
    /// Sorted by (address, port, protocol); keys unique.
    pub frontends: Vec<Frontend>,
    /// Sorted by (namespace, name, port name, protocol, port). Shared (`Arc`): a plan made
    /// after one Service changed holds the other Services' entries of the previous plan, so
    /// building, comparing and dropping it costs what changed.
    pub services: Vec<std::sync::Arc<ServiceEntry>>,
    /// `(namespace/name, reason)` for every Service (or part of one) left out, sorted.
    pub skipped: Vec<(String, String)>,
}

impl ServicePlan {
    /// The frontend for a destination, if any (binary search).
    pub fn frontend(&self, address: Ipv4Addr, port: u16, protocol: Protocol) -> Option<&Frontend> {
        self.frontends
            .binary_search_by(|f| (f.address, f.port, f.protocol).cmp(&(address, port, protocol)))
            .ok()
            .and_then(|i| self.frontends.get(i))
    }
}

#[cfg(test)]
mod tests;
