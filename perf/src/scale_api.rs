//! Control-plane scale benchmark (issue 8, part 7): a generated cluster of 10,000 Services,
//! 100,000 endpoints and 1,000 NetworkPolicies served by the in-process fake API server, read by
//! the real [`KubeSource`], translated as the agent does on every state.
//!
//! ```text
//!  ClusterGen ──objects (JSON)──> FakeApi::sync ──list/watch HTTP──> KubeSource ──State──┐
//!                                     ^                                                 │
//!   updates: apply(one object) ───────┘              agent's cost, as apply_cluster:    v
//!   t_apply ── first_change (source saw it) ── t_state (State received) ── services::translate
//!                                                   ── service_table (if the plan changed)
//!                                                   ── policy::compile (+ same_rules)
//!                                                   ── checkpoint (ClusterState::to_yaml)
//! ```
//!
//! What is measured, per batch window (a fresh [`KubeSource`] per window):
//! - **first sync**: `KubeSource::start` -> first `SourceEvent::State` (every kind listed, in
//!   pages of 500, and the batch window), then the translation of that state, each step timed;
//! - **incremental updates**: one object changed per update, cycling over an endpoint added to
//!   one EndpointSlice, a label added to one Pod, and one NetworkPolicy's port changed; each
//!   waits for its `State` before the next, so updates never share a batch;
//! - **memory**: `VmRSS` at each stage and `VmHWM` at the end, from `/proc/self/status`, and the
//!   exact size of the Maglev arrays (the big structure of the translation).
//!
//! Design decisions and limits:
//! - One process, no root, no testbed: fake API server, source and translation share the two
//!   vCPUs and the heap. RSS deltas attribute memory by stage; the fake server's own copy of the
//!   objects (JSON values, an event history, list snapshots for paging) is in the process too,
//!   so the "source" delta includes the fake's list snapshots. Allocators rarely return memory,
//!   so RSS after a stage is an upper bound of what the stage keeps.
//! - The agent's steps are called directly (`services::translate`,
//!   `services::dataplane::service_table`, `policy::compile`, `ClusterState::to_yaml`) in the
//!   agent's order, with its "rebuild only when changed" rules; building the worker snapshot
//!   (`publish`) is not included (it covers local pods and interfaces only).
//! - An added endpoint is only written to its slice (no new Pod), so it has no policy identity.
//! - Latencies are wall-clock on a shared machine: report `uptime` load with every figure.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use control::cluster::{ChangedKinds, ClusterState};
use control::kube::fake::{FakeApi, FakeApiError};
use control::kube::{KubeError, KubeOptions, KubeSource, SourceEvent};
use control::policy::{PolicyCompileError, PolicyOptions};
use control::services::{self, MaglevError, SelectionMode, ServiceOptions, ServicePlan};
use serde::Serialize;
use serde_json::{json, Value};

/// The node whose agent is simulated (the translation is per node).
pub const THIS_NODE: &str = "node-0000";
/// Endpoints per EndpointSlice (the endpointslice controller's default maximum).
pub const ENDPOINTS_PER_SLICE: usize = 100;
/// One Service in this many is "big": it gets [`BIG_SERVICE_WEIGHT`] times the endpoints.
pub const BIG_SERVICE_EVERY: u32 = 50;
/// Endpoint weight of a big Service (with the defaults: 168 endpoints, two slices).
pub const BIG_SERVICE_WEIGHT: u64 = 25;
/// One Service in this many is a NodePort (every other one is ClusterIP).
pub const NODE_PORT_EVERY: u32 = 10;
/// One Service in this many has a second port (`grpc` 9000).
pub const SECOND_PORT_EVERY: u32 = 4;
/// Pod CIDRs are carved from here (10.64.0.0/10).
const POD_NET_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
const POD_NET_SIZE: u64 = 1 << 22;
/// ClusterIPs from 10.96.0.1 (10.96.0.0/12).
const SERVICE_NET_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_NET_SIZE: u64 = 1 << 20;
/// Addresses of endpoints added by updates (no Pod behind them).
const ADDED_ENDPOINT_BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);
/// Node InternalIPs from 172.20.0.10.
const NODE_IP_BASE: u32 = u32::from_be_bytes([172, 20, 0, 10]);
const NODE_PORT_FIRST: u32 = 30000;
const NODE_PORT_COUNT: u32 = 2768;
const TIERS: [&str; 4] = ["web", "api", "db", "cache"];
const TEAMS: u32 = 10;

/// What to generate and how to measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScaleApiOptions {
    /// Nodes (the first, [`THIS_NODE`], is the one translated for).
    pub nodes: u32,
    /// Namespaces; Services, Pods and policies are spread over them round-robin.
    pub namespaces: u32,
    /// Services.
    pub services: u32,
    /// Endpoints in total (one Pod each), in slices of at most [`ENDPOINTS_PER_SLICE`].
    pub endpoints: u32,
    /// NetworkPolicies.
    pub policies: u32,
    /// Single-object changes measured per batch window.
    pub updates: u32,
    /// Batch windows of the source, in ms; one pass (fresh source) per window.
    pub batch_windows_ms: Vec<u64>,
    /// Maglev table size (a prime; 16381 is Cilium's and sluice's default).
    pub maglev_table_size: u32,
    /// Longest wait for the first full state.
    pub sync_timeout: Duration,
    /// Longest wait for the state of one update.
    pub update_timeout: Duration,
}

impl Default for ScaleApiOptions {
    /// The issue's figures: 100 nodes, 50 namespaces, 10,000 Services, 100,000 endpoints, 1,000
    /// policies; 200 updates with the default 30 ms window and with none.
    fn default() -> Self {
        ScaleApiOptions {
            nodes: 100,
            namespaces: 50,
            services: 10_000,
            endpoints: 100_000,
            policies: 1_000,
            updates: 200,
            batch_windows_ms: vec![30, 0],
            maglev_table_size: services::DEFAULT_TABLE_SIZE,
            sync_timeout: Duration::from_secs(600),
            update_timeout: Duration::from_secs(60),
        }
    }
}

/// Errors of the benchmark; each names the step and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ScaleApiError {
    /// A count is zero or the generated addresses do not fit their ranges.
    #[error("scale-api: {what}; choose smaller --{option}")]
    Shape {
        /// What does not fit.
        what: String,
        /// The command-line option to change.
        option: &'static str,
    },
    /// The Maglev table size is not valid.
    #[error("scale-api: --maglev-table-size: {0}")]
    Maglev(#[from] MaglevError),
    /// The fake API server could not start or refused an object.
    #[error("scale-api: fake API server: {0}")]
    Fake(#[from] FakeApiError),
    /// The Kubernetes source could not start.
    #[error("scale-api: Kubernetes source: {0}")]
    Source(#[from] KubeError),
    /// No state arrived in time.
    #[error(
        "scale-api: no State from the source within {timeout:?} ({step}); the machine may be \
         overloaded: check `uptime`, or raise the timeout"
    )]
    Timeout {
        /// First sync or update N.
        step: String,
        /// The wait.
        timeout: Duration,
    },
    /// The source's state lacks objects that were served (some were skipped as bad).
    #[error(
        "scale-api: the first state has {got} {kind} but {expected} were served; objects were \
         skipped as invalid (see the warnings) and the generator must be fixed"
    )]
    Incomplete {
        /// Kind name.
        kind: &'static str,
        /// Served.
        expected: usize,
        /// In the state.
        got: usize,
    },
    /// The dataplane refused the service table.
    #[error("scale-api: service table not built: {0}")]
    ServiceTable(#[from] dataplane::services::ServiceTableError),
    /// The policy compiler failed.
    #[error("scale-api: {0}")]
    Policy(#[from] PolicyCompileError),
    /// The checkpoint did not serialise.
    #[error("scale-api: checkpoint (ClusterState::to_yaml): {0}")]
    Checkpoint(#[from] control::cluster::ToYamlError),
}

/// Object counts of a generated cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ObjectCounts {
    /// Nodes.
    pub nodes: usize,
    /// Namespaces.
    pub namespaces: usize,
    /// Pods.
    pub pods: usize,
    /// Services.
    pub services: usize,
    /// EndpointSlices.
    pub endpoint_slices: usize,
    /// Endpoints over all slices.
    pub endpoints: usize,
    /// NetworkPolicies.
    pub network_policies: usize,
}

impl ObjectCounts {
    /// The counts of a state (endpoints summed over its slices).
    pub fn of_state(state: &ClusterState) -> Self {
        ObjectCounts {
            nodes: state.nodes.len(),
            namespaces: state.namespaces.len(),
            pods: state.pods.len(),
            services: state.services.len(),
            endpoint_slices: state.endpoint_slices.len(),
            endpoints: state
                .endpoint_slices
                .iter()
                .map(|s| s.endpoints.len())
                .sum(),
            network_policies: state.network_policies.len(),
        }
    }

    /// Every object.
    pub fn total(&self) -> usize {
        self.nodes
            + self.namespaces
            + self.pods
            + self.services
            + self.endpoint_slices
            + self.network_policies
    }

    fn check_against(&self, got: &ObjectCounts) -> Result<(), ScaleApiError> {
        let pairs = [
            ("Nodes", self.nodes, got.nodes),
            ("Namespaces", self.namespaces, got.namespaces),
            ("Pods", self.pods, got.pods),
            ("Services", self.services, got.services),
            ("EndpointSlices", self.endpoint_slices, got.endpoint_slices),
            ("endpoints", self.endpoints, got.endpoints),
            (
                "NetworkPolicies",
                self.network_policies,
                got.network_policies,
            ),
        ];
        for (kind, expected, got) in pairs {
            if expected != got {
                return Err(ScaleApiError::Incomplete {
                    kind,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// A deterministic cluster: any object can be regenerated (with a change) by index.
#[derive(Debug, Clone)]
pub struct ClusterGen {
    opts: ScaleApiOptions,
    /// Endpoints of Service `i`.
    endpoints_of: Vec<u32>,
    /// Global index of Service `i`'s first Pod.
    first_pod: Vec<u32>,
    /// Addresses per node block (a power of two).
    block: u32,
}

fn ip(n: u32) -> String {
    Ipv4Addr::from(n).to_string()
}

impl ClusterGen {
    /// Checks the shape and lays out endpoints: one Service in [`BIG_SERVICE_EVERY`] gets
    /// [`BIG_SERVICE_WEIGHT`] times the share of the others; the remainder goes one each to the
    /// first Services.
    pub fn new(opts: &ScaleApiOptions) -> Result<Self, ScaleApiError> {
        let shape = |what: String, option| Err(ScaleApiError::Shape { what, option });
        for (n, option) in [
            (opts.nodes, "nodes"),
            (opts.namespaces, "namespaces"),
            (opts.services, "services"),
        ] {
            if n == 0 {
                return shape(format!("{option} is 0; at least 1 is needed"), option);
            }
        }
        if u64::from(opts.services) + 1 >= SERVICE_NET_SIZE {
            return shape(
                format!("{} Services do not fit 10.96.0.0/12", opts.services),
                "services",
            );
        }
        if opts.nodes > 60_000 {
            return shape(format!("{} nodes exceed 60000", opts.nodes), "nodes");
        }
        let per_node = opts.endpoints.div_ceil(opts.nodes) + 2;
        let block = per_node.next_power_of_two().max(256);
        if u64::from(block) * u64::from(opts.nodes) > POD_NET_SIZE {
            return shape(
                format!(
                    "{} endpoints over {} nodes need /{} pod CIDRs, more than 10.64.0.0/10 holds",
                    opts.endpoints,
                    opts.nodes,
                    32 - block.trailing_zeros()
                ),
                "endpoints",
            );
        }
        let weight = |i: u32| {
            if i.is_multiple_of(BIG_SERVICE_EVERY) {
                BIG_SERVICE_WEIGHT
            } else {
                1
            }
        };
        let total_weight: u64 = (0..opts.services).map(weight).sum();
        let mut endpoints_of: Vec<u32> = (0..opts.services)
            .map(|i| (u64::from(opts.endpoints) * weight(i) / total_weight) as u32)
            .collect();
        let mut rest = opts.endpoints - endpoints_of.iter().sum::<u32>();
        for n in endpoints_of.iter_mut() {
            if rest == 0 {
                break;
            }
            *n += 1;
            rest -= 1;
        }
        let mut first_pod = Vec::with_capacity(endpoints_of.len());
        let mut next = 0u32;
        for n in &endpoints_of {
            first_pod.push(next);
            next += n;
        }
        Ok(ClusterGen {
            opts: opts.clone(),
            endpoints_of,
            first_pod,
            block,
        })
    }

    /// The options generated from.
    pub fn options(&self) -> &ScaleApiOptions {
        &self.opts
    }

    /// Endpoints of Service `i`.
    pub fn endpoints_of(&self, service: u32) -> u32 {
        self.endpoints_of
            .get(service as usize)
            .copied()
            .unwrap_or(0)
    }

    fn node_name(n: u32) -> String {
        format!("node-{n:04}")
    }

    fn namespace_name(n: u32) -> String {
        format!("ns-{n:03}")
    }

    fn service_namespace(&self, i: u32) -> u32 {
        i % self.opts.namespaces
    }

    fn app(i: u32) -> String {
        format!("app-{i:05}")
    }

    fn slices_of(&self, service: u32) -> u32 {
        (self.endpoint_count(service) as usize)
            .div_ceil(ENDPOINTS_PER_SLICE)
            .max(1) as u32
    }

    fn endpoint_count(&self, service: u32) -> u32 {
        self.endpoints_of(service)
    }

    /// Node `n`: InternalIP, a pod CIDR of [`Self::pod_prefix_len`], zone label.
    pub fn node(&self, n: u32) -> Value {
        let name = Self::node_name(n);
        let cidr = format!(
            "{}/{}",
            ip(POD_NET_BASE + n * self.block),
            self.pod_prefix_len()
        );
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": format!("zone-{}", n % 3),
            }},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": ip(NODE_IP_BASE + n)},
                {"type": "Hostname", "address": name},
            ]},
        })
    }

    /// Prefix length of every node's pod CIDR.
    pub fn pod_prefix_len(&self) -> u32 {
        32 - self.block.trailing_zeros()
    }

    /// Namespace `n`, labelled with a team and an environment.
    pub fn namespace(&self, n: u32) -> Value {
        let name = Self::namespace_name(n);
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/metadata.name": name,
                "team": format!("team-{}", n % TEAMS),
                "env": if n.is_multiple_of(3) { "staging" } else { "prod" },
            }},
        })
    }

    /// Service `i`: ClusterIP (every [`NODE_PORT_EVERY`]th a NodePort, one in 100 of those
    /// with `externalTrafficPolicy: Local`), port `http` 80 -> 8080, and on one in
    /// [`SECOND_PORT_EVERY`] `grpc` 9000; one in 20 with ClientIP affinity.
    pub fn service(&self, i: u32) -> Value {
        let mut ports =
            vec![json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"})];
        if i % SECOND_PORT_EVERY == 1 {
            ports
                .push(json!({"name": "grpc", "port": 9000, "targetPort": 9000, "protocol": "TCP"}));
        }
        let node_port = i.is_multiple_of(NODE_PORT_EVERY);
        if node_port {
            let first = NODE_PORT_FIRST + (i / NODE_PORT_EVERY) % NODE_PORT_COUNT;
            if let Some(p) = ports.first_mut().and_then(Value::as_object_mut) {
                p.insert("nodePort".into(), first.into());
            }
        }
        let cluster_ip = ip(SERVICE_NET_BASE + 1 + i);
        let mut spec = json!({
            "type": if node_port { "NodePort" } else { "ClusterIP" },
            "selector": {"app": Self::app(i)},
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": ports,
            "sessionAffinity": if i % 20 == 3 { "ClientIP" } else { "None" },
        });
        if node_port && i.is_multiple_of(NODE_PORT_EVERY * 100) {
            spec["externalTrafficPolicy"] = "Local".into();
        }
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": format!("svc-{i:05}"),
                "namespace": Self::namespace_name(self.service_namespace(i)),
                "labels": {"app": Self::app(i)},
            },
            "spec": spec,
        })
    }

    /// Where endpoint `k` of Service `i` runs: (node, address).
    fn placement(&self, service: u32, k: u32) -> (u32, u32) {
        let p = self.first_pod.get(service as usize).copied().unwrap_or(0) + k;
        let node = p % self.opts.nodes;
        let slot = p / self.opts.nodes;
        (node, POD_NET_BASE + node * self.block + 2 + slot)
    }

    /// Pod `k` of Service `i`; `version`, when set, adds the label `version: v<N>`.
    pub fn pod(&self, service: u32, k: u32, version: Option<u32>) -> Value {
        let (node, addr) = self.placement(service, k);
        let ns = self.service_namespace(service);
        let mut labels = json!({
            "app": Self::app(service),
            "tier": TIERS[(service % 4) as usize],
            "team": format!("team-{}", ns % TEAMS),
            "pod-template-hash": format!("{:08x}", service.wrapping_mul(2_654_435_761)),
        });
        if let Some(v) = version {
            labels["version"] = format!("v{v}").into();
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{}-{k}", Self::app(service)),
                "namespace": Self::namespace_name(ns),
                "labels": labels,
            },
            "spec": {
                "nodeName": Self::node_name(node),
                "containers": [{
                    "name": "app", "image": "registry.example/app:1.0",
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "grpc", "containerPort": 9000, "protocol": "TCP"},
                    ],
                }],
            },
            "status": {
                "phase": "Running",
                "hostIP": ip(NODE_IP_BASE + node),
                "podIP": ip(addr),
                "podIPs": [{"ip": ip(addr)}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })
    }

    /// Slice `c` of Service `i`, with `added` extra endpoints (from 10.200.0.0/16, no Pod) at
    /// its end.
    pub fn slice(&self, service: u32, c: u32, added: u32) -> Value {
        let ns = Self::namespace_name(self.service_namespace(service));
        let start = c * ENDPOINTS_PER_SLICE as u32;
        let end = (start + ENDPOINTS_PER_SLICE as u32).min(self.endpoint_count(service));
        let mut endpoints: Vec<Value> = (start..end)
            .map(|k| {
                let (node, addr) = self.placement(service, k);
                json!({
                    "addresses": [ip(addr)],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": Self::node_name(node),
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{}-{k}", Self::app(service))},
                })
            })
            .collect();
        for a in 0..added {
            endpoints.push(json!({
                "addresses": [ip(ADDED_ENDPOINT_BASE + (service % 256) * 256 + a % 256)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": Self::node_name(a % self.opts.nodes),
            }));
        }
        let mut ports = vec![json!({"name": "http", "port": 8080, "protocol": "TCP"})];
        if service % SECOND_PORT_EVERY == 1 {
            ports.push(json!({"name": "grpc", "port": 9000, "protocol": "TCP"}));
        }
        let svc = format!("svc-{service:05}");
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{svc}-{c}"),
                "namespace": ns,
                "labels": {
                    "kubernetes.io/service-name": svc,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        })
    }

    /// Policy `q` (namespace `q % namespaces`), one of five shapes by `q % 5`: ingress from a
    /// tier, from a team's namespaces, from an ipBlock with an exception, egress to an ipBlock
    /// and DNS, ingress from the namespace on a named port and a port range. `variant` > 0
    /// changes the main port to `20000 + variant`.
    pub fn policy(&self, q: u32, variant: u32) -> Value {
        let n = self.opts.namespaces;
        let ns = q % n;
        let per_ns_services = self.opts.services.div_ceil(n).max(1);
        // A Service of this namespace: services i with i % n == ns.
        let mut target = ns + n * ((q / n).wrapping_mul(7) % per_ns_services);
        if target >= self.opts.services {
            target = ns.min(self.opts.services - 1);
        }
        let port = if variant == 0 { 8080 } else { 20000 + variant };
        let app = json!({"matchLabels": {"app": Self::app(target)}});
        let (selector, types, ingress, egress) = match q % 5 {
            0 => (
                app,
                vec!["Ingress"],
                json!([{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                        "ports": [{"protocol": "TCP", "port": port}]}]),
                Value::Null,
            ),
            1 => (
                json!({"matchLabels": {"tier": "api"}}),
                vec!["Ingress"],
                json!([{"from": [{
                            "namespaceSelector": {"matchLabels": {"team": format!("team-{}", q % TEAMS)}},
                            "podSelector": {"matchLabels": {"tier": "web"}}}],
                        "ports": [{"protocol": "TCP", "port": port}, {"protocol": "TCP", "port": 9000}]}]),
                Value::Null,
            ),
            2 => (
                app,
                vec!["Ingress"],
                json!([{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                        "ports": [{"protocol": "TCP", "port": port}]}]),
                Value::Null,
            ),
            3 => (
                json!({"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["web", "api"]},
                    {"key": "app", "operator": "In", "values": [Self::app(target)]}]}),
                vec!["Egress"],
                Value::Null,
                json!([
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                     "ports": [{"protocol": "TCP", "port": if variant == 0 { 443 } else { port }}]},
                    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                ]),
            ),
            _ => (
                app,
                vec!["Ingress"],
                json!([{"from": [{"podSelector": {}}],
                        "ports": [{"protocol": "TCP", "port": "http"},
                                  {"protocol": "TCP", "port": if variant == 0 { 9000 } else { port }, "endPort": 9100 + variant}]}]),
                Value::Null,
            ),
        };
        let mut spec = json!({"podSelector": selector, "policyTypes": types});
        if !ingress.is_null() {
            spec["ingress"] = ingress;
        }
        if !egress.is_null() {
            spec["egress"] = egress;
        }
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("pol-{q:04}"), "namespace": Self::namespace_name(ns)},
            "spec": spec,
        })
    }

    /// Every object, and their counts.
    pub fn objects(&self) -> (Vec<Value>, ObjectCounts) {
        let o = &self.opts;
        let mut out = Vec::new();
        let mut counts = ObjectCounts::default();
        for n in 0..o.nodes {
            out.push(self.node(n));
        }
        for n in 0..o.namespaces {
            out.push(self.namespace(n));
        }
        for i in 0..o.services {
            out.push(self.service(i));
            for k in 0..self.endpoint_count(i) {
                out.push(self.pod(i, k, None));
            }
            for c in 0..self.slices_of(i) {
                out.push(self.slice(i, c, 0));
                counts.endpoint_slices += 1;
            }
            counts.endpoints += self.endpoint_count(i) as usize;
        }
        for q in 0..o.policies {
            out.push(self.policy(q, 0));
        }
        counts.nodes = o.nodes as usize;
        counts.namespaces = o.namespaces as usize;
        counts.pods = o.endpoints as usize;
        counts.services = o.services as usize;
        counts.network_policies = o.policies as usize;
        (out, counts)
    }

    /// Update `u` (0-based): what it changes and the object to apply. Cycles over an endpoint
    /// added to a slice, a Pod label, a NetworkPolicy port (the policy only when there are
    /// policies). Slices keep at most [`ENDPOINTS_PER_SLICE`] endpoints: a full slice gets a
    /// different address in place of its last added one instead.
    pub fn update(&self, u: u32) -> (UpdateKind, Value) {
        let kinds = if self.opts.policies > 0 { 3 } else { 2 };
        let round = u / kinds + 1;
        match u % kinds {
            0 => {
                let service = (u.wrapping_mul(37)) % self.opts.services;
                let c = self.slices_of(service) - 1;
                let in_slice = self
                    .endpoint_count(service)
                    .saturating_sub(c * ENDPOINTS_PER_SLICE as u32);
                let room = (ENDPOINTS_PER_SLICE as u32).saturating_sub(in_slice);
                // `round` distinct addresses over time; at most `room` endpoints added.
                let added = if room == 0 { 0 } else { 1 + (round - 1) % room };
                let mut slice = self.slice(service, c, added);
                if added == 0 {
                    // A full slice: change the last endpoint's address instead.
                    if let Some(last) = slice["endpoints"].as_array_mut().and_then(|e| e.last_mut())
                    {
                        last["addresses"] = json!([ip(ADDED_ENDPOINT_BASE + 0xff00 + round % 256)]);
                    }
                }
                (UpdateKind::EndpointAdded, slice)
            }
            1 => {
                let service = (u.wrapping_mul(7919)) % self.opts.services;
                let k = u % self.endpoint_count(service).max(1);
                if self.endpoint_count(service) == 0 {
                    return (UpdateKind::PodLabel, self.service(service));
                }
                (UpdateKind::PodLabel, self.pod(service, k, Some(round)))
            }
            _ => {
                let q = (u.wrapping_mul(13)) % self.opts.policies;
                (UpdateKind::PolicyChanged, self.policy(q, round))
            }
        }
    }
}

/// What one update changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// One endpoint added to one EndpointSlice.
    EndpointAdded,
    /// One label added to one Pod (a new policy identity).
    PodLabel,
    /// One NetworkPolicy's port changed.
    PolicyChanged,
}

impl UpdateKind {
    /// Name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::EndpointAdded => "endpoint_added",
            UpdateKind::PodLabel => "pod_label",
            UpdateKind::PolicyChanged => "policy_changed",
        }
    }
}

/// `VmRSS` and `VmHWM` of this process, KiB (0 when `/proc/self/status` is unreadable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Resident set now.
    pub rss_kib: u64,
    /// Peak resident set so far.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads `/proc/self/status`.
    pub fn now() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// `VmRSS`/`VmHWM` lines of a `/proc/PID/status` text.
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}

/// Nearest-rank summary of durations, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Summary {
    /// Summary of `samples` (all zero when empty).
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
            us[r - 1]
        };
        Summary {
            n: us.len(),
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: us[us.len() - 1],
            mean_us: us.iter().sum::<f64>() / us.len() as f64,
        }
    }
}

/// The agent's translation of one state, each step timed (µs); steps the agent would skip
/// (nothing changed) are 0 and flagged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TranslationTimes {
    /// `services::translate` (includes deriving slices and building every Maglev table).
    pub services_translate_us: f64,
    /// `services::dataplane::service_table` (0 when the plan did not change).
    pub service_table_us: f64,
    /// The plan changed, so the table was rebuilt.
    pub service_table_rebuilt: bool,
    /// `policy::compile` plus the `same_rules` comparison.
    pub policy_compile_us: f64,
    /// The policy rules changed.
    pub policy_changed: bool,
    /// `ClusterState::to_yaml`, the checkpoint the agent writes on every Kubernetes state
    /// (serialisation only; the file write is not included).
    pub checkpoint_us: f64,
    /// Size of the checkpoint, bytes.
    pub checkpoint_bytes: usize,
}

impl TranslationTimes {
    /// Tables ready (without the checkpoint).
    pub fn tables_us(&self) -> f64 {
        self.services_translate_us + self.service_table_us + self.policy_compile_us
    }
}

/// Sizes of what the translation keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TranslationSizes {
    /// Service ports in the plan.
    pub service_ports: usize,
    /// Frontends (ClusterIP, NodePort x node address).
    pub frontends: usize,
    /// Backends over all service ports.
    pub backends: usize,
    /// Maglev tables (cluster and local rotations with backends).
    pub maglev_tables: usize,
    /// Entries per Maglev table.
    pub maglev_table_size: u32,
    /// Bytes of the distinct Maglev arrays (rotations with the same backends, and the Maglev
    /// cache, share one).
    pub distinct_maglev_bytes: u64,
    /// Bytes of the Maglev arrays over all rotations (u16 entries, what workers read; the plan
    /// and the service table share them).
    pub table_maglev_bytes: u64,
    /// Services skipped by the translation.
    pub skipped: usize,
    /// Local pods isolated by some policy.
    pub isolated_pods: usize,
    /// Policy warnings (skipped rules or pods).
    pub policy_warnings: usize,
}

impl TranslationSizes {
    fn of(plan: &ServicePlan, maglev_table_size: u32) -> Self {
        let mut s = TranslationSizes {
            service_ports: plan.services.len(),
            frontends: plan.frontends.len(),
            maglev_table_size,
            skipped: plan.skipped.len(),
            ..Default::default()
        };
        let mut distinct = std::collections::HashSet::new();
        for e in &plan.services {
            s.backends += e.backends.len();
            for r in std::iter::once(&e.cluster).chain(e.local.as_ref()) {
                if !r.maglev.is_empty() {
                    s.maglev_tables += 1;
                    s.table_maglev_bytes += r.maglev.len() as u64 * 2;
                    if distinct.insert(r.maglev.as_ptr() as usize) {
                        s.distinct_maglev_bytes += r.maglev.len() as u64 * 2;
                    }
                }
            }
        }
        s
    }
}

/// The agent's tables, kept between states to apply its "rebuild only on change" rules.
struct Agent {
    services: ServiceOptions,
    policy: PolicyOptions,
    plan: Option<ServicePlan>,
    table: Option<dataplane::services::ServiceTable>,
    policy_table: Option<dataplane::policy::PolicyTable>,
    generation: u64,
    sizes: TranslationSizes,
    translate_cache: services::Cache,
    policy_cache: control::policy::Cache,
}

impl Agent {
    fn new(maglev_table_size: u32) -> Result<Self, ScaleApiError> {
        Ok(Agent {
            services: ServiceOptions::new(maglev_table_size, SelectionMode::Maglev)?,
            policy: PolicyOptions::default(),
            plan: None,
            table: None,
            policy_table: None,
            generation: 0,
            sizes: TranslationSizes::default(),
            translate_cache: services::Cache::new(),
            policy_cache: control::policy::Cache::new(),
        })
    }

    /// What `Agent::apply_cluster` does with a state, in its order and with its rules: the
    /// Services are translated only when their inputs changed, the policy table compiled only
    /// when its inputs did (`ChangedKinds`, from the source).
    fn apply(
        &mut self,
        state: &ClusterState,
        changed: ChangedKinds,
    ) -> Result<TranslationTimes, ScaleApiError> {
        let mut t = TranslationTimes::default();
        let us = |since: Instant| since.elapsed().as_secs_f64() * 1e6;
        if changed.services() {
            self.translate(state, &mut t)?;
        }
        if changed.policy() {
            self.compile(state, &mut t)?;
        }
        let start = Instant::now();
        let yaml = state.to_yaml()?;
        t.checkpoint_us = us(start);
        t.checkpoint_bytes = yaml.len();
        Ok(t)
    }

    fn translate(
        &mut self,
        state: &ClusterState,
        t: &mut TranslationTimes,
    ) -> Result<(), ScaleApiError> {
        let us = |since: Instant| since.elapsed().as_secs_f64() * 1e6;
        let start = Instant::now();
        // The agent keeps each Service's translation and its Maglev tables across states (only
        // changed Services are translated again).
        let plan =
            services::translate_cached(state, THIS_NODE, &self.services, &mut self.translate_cache);
        t.services_translate_us = us(start);
        if self.plan.as_ref() != Some(&plan) {
            self.generation += 1;
            let start = Instant::now();
            let table = services::dataplane::service_table(&plan, self.generation)?;
            t.service_table_us = us(start);
            t.service_table_rebuilt = true;
            self.table = Some(table);
            let sizes = TranslationSizes::of(&plan, self.services.maglev_table_size());
            self.sizes = TranslationSizes {
                isolated_pods: self.sizes.isolated_pods,
                policy_warnings: self.sizes.policy_warnings,
                ..sizes
            };
            self.plan = Some(plan);
        }
        Ok(())
    }

    fn compile(
        &mut self,
        state: &ClusterState,
        t: &mut TranslationTimes,
    ) -> Result<(), ScaleApiError> {
        let us = |since: Instant| since.elapsed().as_secs_f64() * 1e6;
        let start = Instant::now();
        let next = self
            .policy_table
            .as_ref()
            .map_or(1, |p| p.generation().wrapping_add(1).max(1));
        let compiled = control::policy::compile_cached(
            state,
            THIS_NODE,
            &self.policy,
            next,
            &mut self.policy_cache,
        )?;
        let changed = self
            .policy_table
            .as_ref()
            .is_none_or(|p| !compiled.table.same_rules(p));
        if changed {
            self.sizes.isolated_pods = compiled.isolated_pods;
            self.sizes.policy_warnings = compiled.warnings.len();
            self.policy_table = Some(compiled.table);
        }
        t.policy_compile_us = us(start);
        t.policy_changed = changed;
        Ok(())
    }
}

/// The first full sync of one pass.
#[derive(Debug, Clone, Serialize)]
pub struct FirstSync {
    /// `KubeSource::start` -> first `State` received.
    pub source_us: f64,
    /// The translation of that state.
    pub translation: TranslationTimes,
    /// Source plus tables (without the checkpoint).
    pub total_tables_us: f64,
    /// Source plus tables plus checkpoint.
    pub total_with_checkpoint_us: f64,
    /// Counts in the state received.
    pub counts: ObjectCounts,
    /// Memory when the state arrived.
    pub memory_after_source: Memory,
    /// Memory after the translation.
    pub memory_after_translation: Memory,
    /// Sizes of the translation.
    pub sizes: TranslationSizes,
}

/// One update's timings, µs from `fake.apply`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UpdateSample {
    /// What changed.
    pub kind: UpdateKind,
    /// apply -> the source saw the change (`first_change`; watch delivery and decode).
    pub seen_us: f64,
    /// apply -> the `State` was received (adds the batch window and building the state).
    pub state_us: f64,
    /// apply -> tables rebuilt (adds the agent's translation, without the checkpoint).
    pub tables_us: f64,
    /// apply -> checkpoint serialised too.
    pub with_checkpoint_us: f64,
    /// The agent's translation of the state.
    pub translation: TranslationTimes,
}

/// Summaries of a set of updates.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateSummary {
    /// apply -> change seen by the source.
    pub seen: Summary,
    /// Change seen -> State received: the batch window plus building the full state.
    pub seen_to_state: Summary,
    /// apply -> State received.
    pub state: Summary,
    /// State received -> tables rebuilt (the agent's translation).
    pub translation: Summary,
    /// apply -> tables rebuilt.
    pub tables: Summary,
    /// The checkpoint (`to_yaml`) alone.
    pub checkpoint: Summary,
    /// apply -> tables rebuilt and checkpoint serialised.
    pub with_checkpoint: Summary,
}

impl UpdateSummary {
    fn of<'a>(samples: impl Iterator<Item = &'a UpdateSample> + Clone) -> Self {
        let d = |f: fn(&UpdateSample) -> f64| -> Vec<Duration> {
            samples
                .clone()
                .map(|s| Duration::from_secs_f64(f(s).max(0.0) / 1e6))
                .collect()
        };
        UpdateSummary {
            seen: Summary::of(&d(|s| s.seen_us)),
            seen_to_state: Summary::of(&d(|s| s.state_us - s.seen_us)),
            state: Summary::of(&d(|s| s.state_us)),
            translation: Summary::of(&d(|s| s.translation.tables_us())),
            tables: Summary::of(&d(|s| s.tables_us)),
            checkpoint: Summary::of(&d(|s| s.translation.checkpoint_us)),
            with_checkpoint: Summary::of(&d(|s| s.with_checkpoint_us)),
        }
    }
}

/// One pass: a fresh source with one batch window.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    /// The source's batch window, ms.
    pub batch_window_ms: u64,
    /// First full sync.
    pub first_sync: FirstSync,
    /// States received after the first one without a change (should be 0).
    pub spurious_states: u32,
    /// Every update.
    pub updates: Vec<UpdateSample>,
    /// All updates.
    pub all: UpdateSummary,
    /// Per kind of update.
    pub by_kind: BTreeMap<UpdateKind, UpdateSummary>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleApiReport {
    /// Options.
    pub options: ScaleApiOptions,
    /// Generated (and served) objects.
    pub generated: ObjectCounts,
    /// Generating the objects, µs.
    pub generate_us: f64,
    /// Loading them into the fake API server, µs.
    pub fake_load_us: f64,
    /// Memory at start.
    pub memory_start: Memory,
    /// Memory once the fake server holds the objects (generated JSON dropped).
    pub memory_fake_loaded: Memory,
    /// Memory at the end (`hwm_kib` is the run's peak).
    pub memory_end: Memory,
    /// One per batch window.
    pub passes: Vec<Pass>,
    /// Built with optimisation (debug figures mean little).
    pub optimized_build: bool,
    /// `/proc/loadavg` at start and end (the machine is shared).
    pub loadavg_start: String,
    /// See `loadavg_start`.
    pub loadavg_end: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The next `State` within `timeout` (health events skipped): state, first change, received.
fn next_state(
    source: &KubeSource,
    timeout: Duration,
) -> Option<(ClusterState, Instant, Instant, ChangedKinds)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match source.recv_timeout(left)? {
            SourceEvent::State {
                state,
                first_change,
                changed,
            } => return Some((state, first_change, Instant::now(), changed)),
            SourceEvent::Health(_) => {}
        }
    }
}

fn us_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e6
}

/// Runs the benchmark; `progress` gets one line per stage (for a terminal).
pub fn run_scale_api(
    opts: &ScaleApiOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ScaleApiReport, ScaleApiError> {
    let loadavg_start = loadavg();
    let memory_start = Memory::now();
    let gen = ClusterGen::new(opts)?;
    let start = Instant::now();
    let (objects, generated) = gen.objects();
    let generate_us = start.elapsed().as_secs_f64() * 1e6;
    progress(&format!(
        "generated {} objects ({} pods, {} services, {} slices, {} endpoints, {} policies) in {:.1} s",
        generated.total(),
        generated.pods,
        generated.services,
        generated.endpoint_slices,
        generated.endpoints,
        generated.network_policies,
        generate_us / 1e6
    ));
    let fake = FakeApi::start("127.0.0.1:0")?;
    let start = Instant::now();
    fake.sync(objects)?;
    let fake_load_us = start.elapsed().as_secs_f64() * 1e6;
    let memory_fake_loaded = Memory::now();
    progress(&format!(
        "fake API server loaded in {:.1} s; RSS {} MiB",
        fake_load_us / 1e6,
        memory_fake_loaded.rss_kib / 1024
    ));

    let mut passes = Vec::new();
    for &window in &opts.batch_windows_ms {
        passes.push(run_pass(&gen, &fake, generated, window, progress)?);
    }
    Ok(ScaleApiReport {
        options: opts.clone(),
        generated,
        generate_us,
        fake_load_us,
        memory_start,
        memory_fake_loaded,
        memory_end: Memory::now(),
        passes,
        optimized_build: !cfg!(debug_assertions),
        loadavg_start,
        loadavg_end: loadavg(),
    })
}

fn run_pass(
    gen: &ClusterGen,
    fake: &FakeApi,
    generated: ObjectCounts,
    window_ms: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<Pass, ScaleApiError> {
    let opts = gen.options();
    let mut agent = Agent::new(opts.maglev_table_size)?;
    let kube_opts = KubeOptions {
        api_server: Some(fake.url()),
        batch: Duration::from_millis(window_ms),
        ..KubeOptions::new(THIS_NODE)
    };
    let start = Instant::now();
    let source = KubeSource::start(kube_opts)?;
    let (state, _, received, changed) =
        next_state(&source, opts.sync_timeout).ok_or_else(|| ScaleApiError::Timeout {
            step: format!("first sync, batch window {window_ms} ms"),
            timeout: opts.sync_timeout,
        })?;
    let source_us = us_between(start, received);
    let memory_after_source = Memory::now();
    let counts = ObjectCounts::of_state(&state);
    generated.check_against(&counts)?;
    let translation = agent.apply(&state, changed)?;
    drop(state);
    let memory_after_translation = Memory::now();
    let first_sync = FirstSync {
        source_us,
        total_tables_us: source_us + translation.tables_us(),
        total_with_checkpoint_us: source_us + translation.tables_us() + translation.checkpoint_us,
        translation,
        counts,
        memory_after_source,
        memory_after_translation,
        sizes: agent.sizes,
    };
    progress(&format!(
        "window {window_ms} ms: first State after {:.2} s, tables {:.2} s, checkpoint {:.2} s; RSS {} MiB",
        source_us / 1e6,
        translation.tables_us() / 1e6,
        translation.checkpoint_us / 1e6,
        memory_after_translation.rss_kib / 1024
    ));

    // Nothing changed since the list: no further state is expected.
    let mut spurious_states = 0;
    while next_state(&source, Duration::from_millis(window_ms + 200)).is_some() {
        spurious_states += 1;
        if spurious_states > 10 {
            break;
        }
    }

    let mut updates = Vec::with_capacity(opts.updates as usize);
    for u in 0..opts.updates {
        let (kind, object) = gen.update(u);
        let applied = Instant::now();
        fake.apply(object)?;
        let (state, first_change, received, changed) = next_state(&source, opts.update_timeout)
            .ok_or_else(|| ScaleApiError::Timeout {
                step: format!(
                    "update {u} ({}), batch window {window_ms} ms",
                    kind.as_str()
                ),
                timeout: opts.update_timeout,
            })?;
        let translation = agent.apply(&state, changed)?;
        let state_us = us_between(applied, received);
        updates.push(UpdateSample {
            kind,
            seen_us: us_between(applied, first_change),
            state_us,
            tables_us: state_us + translation.tables_us(),
            with_checkpoint_us: state_us + translation.tables_us() + translation.checkpoint_us,
            translation,
        });
    }
    // Put the changed objects back so the next pass starts from the generated cluster.
    let (objects, _) = gen.objects();
    fake.sync(objects)?;
    drop(source);

    let all = UpdateSummary::of(updates.iter());
    let mut by_kind = BTreeMap::new();
    for kind in [
        UpdateKind::EndpointAdded,
        UpdateKind::PodLabel,
        UpdateKind::PolicyChanged,
    ] {
        if updates.iter().any(|s| s.kind == kind) {
            by_kind.insert(
                kind,
                UpdateSummary::of(updates.iter().filter(move |s| s.kind == kind)),
            );
        }
    }
    progress(&format!(
        "window {window_ms} ms: {} updates, apply -> State p50 {:.1} ms p99 {:.1} ms, -> tables p50 {:.1} ms p99 {:.1} ms",
        updates.len(),
        all.state.p50_us / 1e3,
        all.state.p99_us / 1e3,
        all.tables.p50_us / 1e3,
        all.tables.p99_us / 1e3
    ));
    Ok(Pass {
        batch_window_ms: window_ms,
        first_sync,
        spurious_states,
        updates,
        all,
        by_kind,
    })
}

impl ScaleApiReport {
    /// A plain-text table of the figures (what the README and docs quote).
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let g = &self.generated;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            s,
            "cluster: {} nodes, {} namespaces, {} Services, {} EndpointSlices, {} endpoints/pods, {} NetworkPolicies ({} objects)",
            g.nodes, g.namespaces, g.services, g.endpoint_slices, g.endpoints, g.network_policies, g.total()
        );
        let _ = writeln!(
            s,
            "build: {}; load average {} at start, {} at end",
            if self.optimized_build {
                "release"
            } else {
                "DEBUG (figures mean little)"
            },
            self.loadavg_start,
            self.loadavg_end
        );
        let _ = writeln!(
            s,
            "memory (RSS MiB): start {:.0}, fake API server loaded {:.0}, end {:.0}, peak {:.0}",
            mib(self.memory_start.rss_kib),
            mib(self.memory_fake_loaded.rss_kib),
            mib(self.memory_end.rss_kib),
            mib(self.memory_end.hwm_kib)
        );
        for p in &self.passes {
            let f = &p.first_sync;
            let t = &f.translation;
            let z = &f.sizes;
            let _ = writeln!(s, "\nbatch window {} ms", p.batch_window_ms);
            let _ = writeln!(
                s,
                "  first sync: source {:.2} s + services::translate {:.2} s + service_table {:.2} s + policy::compile {:.2} s = {:.2} s; checkpoint to_yaml {:.2} s ({:.0} MiB) -> {:.2} s",
                f.source_us / 1e6,
                t.services_translate_us / 1e6,
                t.service_table_us / 1e6,
                t.policy_compile_us / 1e6,
                f.total_tables_us / 1e6,
                t.checkpoint_us / 1e6,
                t.checkpoint_bytes as f64 / 1048576.0,
                f.total_with_checkpoint_us / 1e6
            );
            let _ = writeln!(
                s,
                "  RSS after State {:.0} MiB (+{:.0} over the loaded fake), after translation {:.0} MiB (+{:.0})",
                mib(f.memory_after_source.rss_kib),
                mib(f.memory_after_source.rss_kib.saturating_sub(self.memory_fake_loaded.rss_kib)),
                mib(f.memory_after_translation.rss_kib),
                mib(f.memory_after_translation.rss_kib.saturating_sub(f.memory_after_source.rss_kib))
            );
            let _ = writeln!(
                s,
                "  plan: {} service ports, {} frontends, {} backends, {} Maglev tables x {} = {:.0} MiB of u16 entries, {:.0} MiB of them distinct (shared by the Maglev cache, the plan and the service table); {} isolated local pods, {} policy warnings, {} skipped",
                z.service_ports,
                z.frontends,
                z.backends,
                z.maglev_tables,
                z.maglev_table_size,
                z.table_maglev_bytes as f64 / 1048576.0,
                z.distinct_maglev_bytes as f64 / 1048576.0,
                z.isolated_pods,
                z.policy_warnings,
                z.skipped
            );
            if p.spurious_states > 0 {
                let _ = writeln!(
                    s,
                    "  WARNING: {} states without a change",
                    p.spurious_states
                );
            }
            let _ = writeln!(
                s,
                "  {:<16} {:>5} {:>19} {:>19} {:>19} {:>19} {:>19}",
                "updates (ms)",
                "n",
                "apply->seen p50/99",
                "seen->State",
                "apply->State",
                "translation",
                "apply->tables"
            );
            let row = |s: &mut String, name: &str, u: &UpdateSummary| {
                let pp = |x: &Summary| format!("{:.1} / {:.1}", x.p50_us / 1e3, x.p99_us / 1e3);
                let _ = writeln!(
                    s,
                    "  {:<16} {:>5} {:>19} {:>19} {:>19} {:>19} {:>19}   (+checkpoint {} -> {})",
                    name,
                    u.state.n,
                    pp(&u.seen),
                    pp(&u.seen_to_state),
                    pp(&u.state),
                    pp(&u.translation),
                    pp(&u.tables),
                    pp(&u.checkpoint),
                    pp(&u.with_checkpoint)
                );
            };
            row(&mut s, "all", &p.all);
            for (k, u) in &p.by_kind {
                row(&mut s, k.as_str(), u);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ScaleApiOptions {
        ScaleApiOptions {
            nodes: 7,
            namespaces: 3,
            services: 120,
            endpoints: 1_000,
            policies: 10,
            updates: 9,
            ..Default::default()
        }
    }

    #[test]
    fn generator_counts_are_exact_and_slices_bounded() {
        let gen = ClusterGen::new(&small()).expect("shape fits");
        let (objects, counts) = gen.objects();
        assert_eq!(counts.endpoints, 1_000);
        assert_eq!(
            (0..120).map(|i| gen.endpoints_of(i)).sum::<u32>(),
            1_000,
            "every endpoint placed"
        );
        // Service 0 is big: 25 times the weight (1000 * 25 / (117 + 75) = 130 plus remainder).
        assert!(gen.endpoints_of(0) > ENDPOINTS_PER_SLICE as u32);
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let mut addrs = std::collections::HashSet::new();
        for o in &objects {
            *kinds
                .entry(o["kind"].as_str().unwrap().to_owned())
                .or_default() += 1;
            if o["kind"] == "EndpointSlice" {
                let n = o["endpoints"].as_array().unwrap().len();
                assert!(n <= ENDPOINTS_PER_SLICE, "slice of {n} endpoints");
            }
            if o["kind"] == "Pod" {
                let a = o["status"]["podIP"].as_str().unwrap().to_owned();
                assert!(addrs.insert(a.clone()), "pod address {a} used twice");
            }
        }
        assert_eq!(kinds["Pod"], counts.pods);
        assert_eq!(kinds["EndpointSlice"], counts.endpoint_slices);
        assert_eq!(kinds["NetworkPolicy"], 10);
        assert_eq!(objects.len(), counts.total());
    }

    #[test]
    fn generated_objects_parse_as_a_cluster_file() {
        let gen = ClusterGen::new(&small()).expect("shape fits");
        let (objects, counts) = gen.objects();
        let yaml: String = objects
            .iter()
            .map(|o| format!("---\n{}\n", serde_json::to_string(o).unwrap()))
            .collect();
        let state =
            control::cluster::parse_str(&yaml, "gen.yaml").expect("generated objects are valid");
        assert_eq!(ObjectCounts::of_state(&state), counts);
        let plan = services::translate(&state, THIS_NODE, &ServiceOptions::default());
        assert!(plan.skipped.is_empty(), "skipped: {:?}", plan.skipped);
        // 120 http ports + 30 grpc ports.
        assert_eq!(plan.services.len(), 150);
    }

    #[test]
    fn updates_change_their_object() {
        let gen = ClusterGen::new(&small()).expect("shape fits");
        let (objects, _) = gen.objects();
        let name = |o: &Value| {
            (
                o["kind"].as_str().unwrap().to_owned(),
                o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                o["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        };
        let by_name: BTreeMap<_, _> = objects.iter().map(|o| (name(o), o)).collect();
        let mut kinds = Vec::new();
        for u in 0..30 {
            let (kind, o) = gen.update(u);
            let before = by_name
                .get(&name(&o))
                .expect("update of an existing object");
            assert_ne!(**before, o, "update {u} ({kind:?}) changes nothing");
            if o["kind"] == "EndpointSlice" {
                assert!(o["endpoints"].as_array().unwrap().len() <= ENDPOINTS_PER_SLICE);
            }
            kinds.push(kind);
        }
        assert_eq!(
            &kinds[..3],
            &[
                UpdateKind::EndpointAdded,
                UpdateKind::PodLabel,
                UpdateKind::PolicyChanged
            ]
        );
    }

    #[test]
    fn summary_is_nearest_rank() {
        let d: Vec<Duration> = (1..=200).rev().map(Duration::from_micros).collect();
        let s = Summary::of(&d);
        assert_eq!(s.n, 200);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.p99_us, 198.0);
        assert_eq!(s.max_us, 200.0);
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn memory_parses_proc_status() {
        let m = Memory::parse("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n");
        assert_eq!(
            m,
            Memory {
                rss_kib: 1024,
                hwm_kib: 2048
            }
        );
        assert!(Memory::now().rss_kib > 0);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let zero = ScaleApiOptions {
            services: 0,
            ..small()
        };
        assert!(matches!(
            ClusterGen::new(&zero),
            Err(ScaleApiError::Shape {
                option: "services",
                ..
            })
        ));
        let crowded = ScaleApiOptions {
            nodes: 1,
            endpoints: 5_000_000,
            ..small()
        };
        assert!(matches!(
            ClusterGen::new(&crowded),
            Err(ScaleApiError::Shape {
                option: "endpoints",
                ..
            })
        ));
    }
}
