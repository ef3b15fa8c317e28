//! `translate`: Services and EndpointSlices to a [`ServicePlan`] for one node (see the module doc
//! of [`crate::services`] for the rules and where they come from).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    maglev, Backend, BackendState, Frontend, FrontendKind, Protocol, Rotation, Scope,
    SelectionMode, ServiceEntry, ServiceOptions, ServicePlan, SessionAffinity,
    DEFAULT_AFFINITY_TIMEOUT_SECONDS, SERVICE_PROXY_NAME_LABEL,
};
use crate::cluster::{ClusterState, DEFAULT_NAMESPACE, INTERNAL_IP, SERVICE_NAME_LABEL};

const EXTERNAL_IP: &str = "ExternalIP";
/// Backends per service port the dataplane indexes (`u16`).
const MAX_BACKENDS: u16 = u16::MAX;

/// Translates every Service of `cluster` for node `this_node`: frontends (ClusterIP, NodePort on
/// this node's addresses, LoadBalancer ingress IPs, externalIPs), backends per service port from
/// [`ClusterState::effective_endpoint_slices`], rotations and Maglev tables. Never fails: what
/// cannot be served is listed in [`ServicePlan::skipped`] with the reason.
pub fn translate(cluster: &ClusterState, this_node: &str, opts: &ServiceOptions) -> ServicePlan {
    translate_cached(cluster, this_node, opts, &mut Cache::new())
}

/// What [`translate_cached`] keeps across states: each Service's translation with the objects
/// it was made from, and the Maglev tables.
///
/// A Service is translated again only when its object (compared by pointer: the sources share
/// unchanged objects between states, see [`ClusterState`]), one of its EndpointSlices (the
/// slices are regrouped by a pointer walk, see `SliceGroups`), this node's addresses or the
/// options changed; otherwise its entries are
/// reused as they were, Maglev tables included (shared, not copied). So a one-object change at
/// 10,000 Services costs one Service's translation plus the plan's assembly (sorting and
/// indexing the entries), not 10,000 translations. Derived slices (Services without
/// EndpointSlices, file source) are new objects each time: those Services are always
/// translated again.
#[derive(Debug, Default)]
pub struct Cache {
    maglev: maglev::Cache,
    /// (node, node addresses, options) the memo was made for; a change clears it.
    context: Option<(String, Vec<Ipv4Addr>, ServiceOptions)>,
    /// By the Service object's pointer (the memo holds the object, so the pointer stays its).
    memo: crate::FastMap<usize, Memo>,
    /// The EndpointSlices of the last state, grouped by Service.
    groups: SliceGroups,
    /// The last call's Services (pointers) and plan, returned as it is when no Service and no
    /// slice changed and no Service's endpoints were derived from Pods (a Pod-only change).
    last: Option<(Vec<usize>, ServicePlan)>,
    /// Services translated again by the last call (the rest were reused).
    pub last_translated: usize,
}

/// (namespace, Service name): the Service a slice belongs to (`kubernetes.io/service-name`).
type GroupKey = (String, String);

/// The last state's EndpointSlices, grouped by Service, and kept up to date by walking each new
/// state's slices beside the last ones: slices at the same place with the same pointer cost a
/// pointer comparison, so a state with one slice changed regroups one slice, not 10,000.
#[derive(Debug, Default)]
struct SliceGroups {
    /// The last state's slices, in its order, with their group (`None`: no service label).
    at: Vec<(Arc<EndpointSlice>, Option<GroupKey>)>,
    /// Each Service's slices, sorted by name.
    groups: crate::FastMap<GroupKey, Vec<Arc<EndpointSlice>>>,
}

impl SliceGroups {
    fn key_of(slice: &EndpointSlice) -> Option<GroupKey> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some((namespace_of(&slice.metadata).to_owned(), service.clone()))
    }

    fn add(
        &mut self,
        slice: &Arc<EndpointSlice>,
        changed: &mut crate::FastSet<GroupKey>,
    ) -> Option<GroupKey> {
        let key = Self::key_of(slice)?;
        let group = self.groups.entry(key.clone()).or_default();
        group.push(Arc::clone(slice));
        group.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        changed.insert(key.clone());
        Some(key)
    }

    fn remove(
        &mut self,
        (slice, key): (Arc<EndpointSlice>, Option<GroupKey>),
        changed: &mut crate::FastSet<GroupKey>,
    ) {
        let Some(key) = key else { return };
        if let Some(group) = self.groups.get_mut(&key) {
            if let Some(i) = group.iter().position(|s| Arc::ptr_eq(s, &slice)) {
                group.remove(i);
            }
            if group.is_empty() {
                self.groups.remove(&key);
            }
        }
        changed.insert(key);
    }

    /// Brings the groups to `slices`; returns the groups that changed.
    fn update(&mut self, slices: &[Arc<EndpointSlice>]) -> crate::FastSet<GroupKey> {
        let mut changed = crate::FastSet::default();
        let old = std::mem::take(&mut self.at);
        let mut old = old.into_iter().peekable();
        let mut at = Vec::with_capacity(slices.len());
        for slice in slices {
            // The last state's slices before this one (by name) or an older version of it are
            // gone. The walk is right in any order; sorted states only make it short.
            while let Some((o, _)) = old.peek() {
                if Arc::ptr_eq(o, slice)
                    || crate::cluster::name_order(&o.metadata, &slice.metadata).is_gt()
                {
                    break;
                }
                if let Some(gone) = old.next() {
                    self.remove(gone, &mut changed);
                }
            }
            if old.peek().is_some_and(|(o, _)| Arc::ptr_eq(o, slice)) {
                if let Some(kept) = old.next() {
                    at.push(kept);
                }
                continue;
            }
            let key = self.add(slice, &mut changed);
            at.push((Arc::clone(slice), key));
        }
        for gone in old {
            self.remove(gone, &mut changed);
        }
        self.at = at;
        changed
    }
}

#[derive(Debug)]
struct Memo {
    service: Arc<Service>,
    /// The Service's group key; `None`: its slices were derived (always translated again).
    key: Option<GroupKey>,
    entries: Vec<(Arc<ServiceEntry>, Arc<[PendingFrontend]>)>,
    skipped: Vec<(String, String)>,
    /// The Maglev cache's tables the entries were made from: held so the cache keeps them
    /// while this Service is unchanged (see [`maglev::Cache::sweep`]).
    _tables: Vec<Arc<[u16]>>,
    used: bool,
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maglev tables held (for the scale benchmark and tests).
    pub fn maglev_tables(&self) -> usize {
        self.maglev.len()
    }
}

/// [`translate`], reusing what `cache` holds of the Services that did not change (the agent
/// keeps one cache across states; the plan is the same either way).
pub fn translate_cached(
    cluster: &ClusterState,
    this_node: &str,
    opts: &ServiceOptions,
    cache: &mut Cache,
) -> ServicePlan {
    let node_addresses = node_addresses(cluster, this_node);
    let context = (this_node.to_owned(), node_addresses.clone(), opts.clone());
    if cache.context.as_ref() != Some(&context) {
        cache.memo.clear();
        cache.last = None;
        cache.context = Some(context);
    }
    // The EndpointSlices of each Service (as `ClusterState::effective_endpoint_slices`, without
    // building its whole list): the Service's own slices by name, else slices derived from its
    // selector and the Pods.
    let changed = cache.groups.update(&cluster.endpoint_slices);
    if let Some((services, plan)) = &cache.last {
        let same_services = services.len() == cluster.services.len()
            && services
                .iter()
                .zip(&cluster.services)
                .all(|(&a, b)| a == Arc::as_ptr(b) as usize);
        if changed.is_empty() && same_services {
            cache.last_translated = 0;
            return plan.clone();
        }
    }
    cache.last = None;
    let mut derived_any = false;
    let Cache {
        maglev: maglev_cache,
        memo,
        last_translated,
        groups,
        ..
    } = cache;
    *last_translated = 0;
    let mut out = Builder {
        this_node,
        node_addresses: &node_addresses,
        opts,
        cache: maglev_cache,
        entries: Vec::with_capacity(cluster.services.len()),
        skipped: Vec::new(),
        held: Vec::new(),
    };
    for service in &cluster.services {
        let ptr = Arc::as_ptr(service) as usize;
        // Unchanged: the same object, whose slices' group did not change.
        let hit = memo.get_mut(&ptr).filter(|m| {
            Arc::ptr_eq(&m.service, service) && m.key.as_ref().is_some_and(|k| !changed.contains(k))
        });
        if let Some(m) = hit {
            m.used = true;
            out.entries.extend(m.entries.iter().cloned());
            out.skipped.extend(m.skipped.iter().cloned());
            continue;
        }
        let key = (
            namespace_of(&service.metadata).to_owned(),
            service.metadata.name.clone().unwrap_or_default(),
        );
        let derived: Vec<Arc<EndpointSlice>>;
        let (service_slices, key): (&[Arc<EndpointSlice>], Option<GroupKey>) =
            match groups.groups.get(&key) {
                Some(group) => (group, Some(key)),
                None => {
                    derived = cluster
                        .derived_slices(service)
                        .into_iter()
                        .map(Arc::new)
                        .collect();
                    // Without slices of its own the Service's endpoints come from the Pods,
                    // which the groups do not follow: never reused.
                    derived_any = true;
                    (&derived, None)
                }
            };
        *last_translated += 1;
        let (entries_before, skipped_before) = (out.entries.len(), out.skipped.len());
        let refs: Vec<&EndpointSlice> = service_slices.iter().map(|s| &**s).collect();
        out.service(service, &refs);
        // In the plan's order within the Service, so the plan is usually sorted as assembled.
        out.entries[entries_before..].sort_by(|(a, _), (b, _)| {
            (&a.port_name, a.protocol, a.port).cmp(&(&b.port_name, b.protocol, b.port))
        });
        memo.insert(
            ptr,
            Memo {
                service: Arc::clone(service),
                key,
                entries: out.entries[entries_before..].to_vec(),
                skipped: out.skipped[skipped_before..].to_vec(),
                _tables: std::mem::take(&mut out.held),
                used: true,
            },
        );
    }
    // Services gone since the last call; then the Maglev tables no Service holds.
    let held = memo.len();
    memo.retain(|_, m| std::mem::take(&mut m.used));
    let plan = out.finish();
    if *last_translated > 0 || memo.len() != held {
        maglev_cache.sweep();
    }
    if !derived_any {
        let services = cluster
            .services
            .iter()
            .map(|s| Arc::as_ptr(s) as usize)
            .collect();
        cache.last = Some((services, plan.clone()));
    }
    plan
}

/// A frontend before service indices are known.
#[derive(Debug, Clone)]
struct PendingFrontend {
    address: Ipv4Addr,
    port: u16,
    kind: FrontendKind,
    scope: Scope,
    external_traffic_local: bool,
}

struct Builder<'a> {
    this_node: &'a str,
    node_addresses: &'a [Ipv4Addr],
    opts: &'a ServiceOptions,
    cache: &'a mut maglev::Cache,
    entries: Vec<(Arc<ServiceEntry>, Arc<[PendingFrontend]>)>,
    skipped: Vec<(String, String)>,
    /// Maglev cache tables used by the Service being translated.
    held: Vec<Arc<[u16]>>,
}

impl Builder<'_> {
    fn skip(&mut self, service: &str, reason: String) {
        self.skipped.push((service.to_owned(), reason));
    }

    fn service(&mut self, service: &Service, slices: &[&EndpointSlice]) {
        let namespace = namespace_of(&service.metadata);
        let name = service.metadata.name.as_deref().unwrap_or("");
        let key = format!("{namespace}/{name}");
        if let Some(proxy) = service
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        {
            self.skip(
                &key,
                format!(
                    "labelled {SERVICE_PROXY_NAME_LABEL}={proxy}: served by that proxy, not \
                     sluice (kube-proxy ignores it too); remove the label for sluice to serve it"
                ),
            );
            return;
        }
        let Some(spec) = &service.spec else {
            self.skip(&key, "has no spec".to_owned());
            return;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        match service_type {
            "ClusterIP" | "NodePort" | "LoadBalancer" => {}
            "ExternalName" => {
                self.skip(
                    &key,
                    "type ExternalName: a DNS alias (CNAME) answered by cluster DNS, nothing to \
                     proxy"
                        .to_owned(),
                );
                return;
            }
            other => {
                self.skip(
                    &key,
                    format!(
                        "spec.type {other:?} is unknown; use ClusterIP, NodePort, LoadBalancer \
                         or ExternalName"
                    ),
                );
                return;
            }
        }
        let cluster_ip = match spec.cluster_ip.as_deref().unwrap_or("") {
            "None" => {
                self.skip(
                    &key,
                    "headless (clusterIP: None): cluster DNS returns the pod addresses, nothing \
                     to proxy"
                        .to_owned(),
                );
                return;
            }
            "" => {
                self.skip(
                    &key,
                    "spec.clusterIP is not set (not allocated yet); set it in the cluster file"
                        .to_owned(),
                );
                return;
            }
            ip => {
                match ip.parse::<Ipv4Addr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        self.skip(
                        &key,
                        format!("spec.clusterIP {ip:?} is not an IPv4 address (sluice is IPv4-only)"),
                    );
                        return;
                    }
                }
            }
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() {
            self.skip(&key, "has no spec.ports".to_owned());
            return;
        }
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let timeout_seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
            SessionAffinity { timeout_seconds }
        });
        let health_check_node_port = if external_local {
            spec.health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
        } else {
            None
        };
        let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);

        for service_port in ports {
            let port_label = port_label(service_port);
            let protocol = match service_port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" | "" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    self.skip(
                        &key,
                        format!(
                            "port {port_label}: protocol {other} is not supported (TCP and UDP \
                             only); its packets are dropped with a counted reason"
                        ),
                    );
                    continue;
                }
            };
            let Some(port) = u16::try_from(service_port.port).ok().filter(|p| *p != 0) else {
                self.skip(
                    &key,
                    format!(
                        "port {port_label}: port {} is not in 1..=65535",
                        service_port.port
                    ),
                );
                continue;
            };
            let port_name = service_port.name.clone().unwrap_or_default();
            let backends = backends(
                slices,
                &port_name,
                protocol,
                publish_not_ready,
                self.this_node,
            );
            if backends.len() > usize::from(MAX_BACKENDS) {
                self.skip(
                    &key,
                    format!(
                        "port {port_label}: {} endpoints; at most {MAX_BACKENDS} per service \
                         port are supported",
                        backends.len()
                    ),
                );
                continue;
            }
            let cluster = self.rotation(&key, &port_label, &backends, false);
            let local = (external_local || internal_local)
                .then(|| self.rotation(&key, &port_label, &backends, true));
            let frontends =
                self.frontends(&key, &port_label, service, service_port, cluster_ip, port);
            let frontends = frontends
                .into_iter()
                .map(|(address, port, kind)| {
                    let local_scope = if kind.is_external() {
                        external_local
                    } else {
                        internal_local
                    };
                    PendingFrontend {
                        address,
                        port,
                        kind,
                        scope: if local_scope {
                            Scope::Local
                        } else {
                            Scope::Cluster
                        },
                        external_traffic_local: kind.is_external() && external_local,
                    }
                })
                .collect();
            self.entries.push((
                Arc::new(ServiceEntry {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    port_name,
                    port,
                    protocol,
                    cluster_ip,
                    backends,
                    cluster,
                    local,
                    affinity,
                    external_traffic_local: external_local,
                    internal_traffic_local: internal_local,
                    health_check_node_port,
                }),
                frontends,
            ));
        }
    }

    /// `(address, port, kind)` of every frontend of one service port.
    fn frontends(
        &mut self,
        key: &str,
        port_label: &str,
        service: &Service,
        service_port: &ServicePort,
        cluster_ip: Ipv4Addr,
        port: u16,
    ) -> Vec<(Ipv4Addr, u16, FrontendKind)> {
        let mut out = vec![(cluster_ip, port, FrontendKind::ClusterIp)];
        let Some(spec) = &service.spec else {
            return out;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if matches!(service_type, "NodePort" | "LoadBalancer") {
            match service_port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => {
                    if self.node_addresses.is_empty() {
                        self.skip(
                            key,
                            format!(
                                "port {port_label}: nodePort {node_port}: node {:?} has no IPv4 \
                                 address in the cluster state to serve it on",
                                self.this_node
                            ),
                        );
                    }
                    for &address in self.node_addresses {
                        out.push((address, node_port, FrontendKind::NodePort));
                    }
                }
                Some(_) => self.skip(
                    key,
                    format!(
                        "port {port_label}: nodePort {:?} is not in 1..=65535",
                        service_port.node_port
                    ),
                ),
                // LoadBalancer with allocateLoadBalancerNodePorts: false, or not allocated.
                None => {}
            }
        }
        if service_type == "LoadBalancer" {
            let ingresses = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for ingress in ingresses.into_iter().flatten() {
                let Some(ip) = ingress.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                    continue; // hostname-only ingress: nothing to answer locally
                };
                if ingress.ip_mode.as_deref() == Some("Proxy") {
                    self.skip(
                        key,
                        format!(
                            "port {port_label}: load balancer ingress {ip} has ipMode Proxy: the \
                             load balancer forwards to node ports, so it is not served locally \
                             (as kube-proxy)"
                        ),
                    );
                    continue;
                }
                match ip.parse::<Ipv4Addr>() {
                    Ok(address) => out.push((address, port, FrontendKind::LoadBalancer)),
                    Err(_) => self.skip(
                        key,
                        format!(
                            "port {port_label}: status.loadBalancer.ingress ip {ip:?} is not \
                             IPv4 (sluice is IPv4-only)"
                        ),
                    ),
                }
            }
        }
        for ip in spec.external_ips.iter().flatten() {
            match ip.parse::<Ipv4Addr>() {
                Ok(address) => out.push((address, port, FrontendKind::ExternalIp)),
                Err(_) => self.skip(
                    key,
                    format!(
                        "port {port_label}: spec.externalIPs entry {ip:?} is not IPv4 (sluice is \
                         IPv4-only)"
                    ),
                ),
            }
        }
        out
    }

    /// The rotation of one scope: Active backends, else Terminating ones; and its Maglev table.
    fn rotation(
        &mut self,
        key: &str,
        port_label: &str,
        backends: &[Backend],
        local_only: bool,
    ) -> Rotation {
        let pick = |state: BackendState| -> Vec<u32> {
            backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.state == state && (b.local || !local_only))
                .filter_map(|(i, _)| u32::try_from(i).ok())
                .collect()
        };
        let mut members = pick(BackendState::Active);
        let mut terminating_fallback = false;
        if members.is_empty() {
            members = pick(BackendState::Terminating);
            terminating_fallback = !members.is_empty();
        }
        let maglev: Arc<[u16]> = match self.opts.selection() {
            SelectionMode::Random => Arc::from([]),
            SelectionMode::Maglev => {
                let keys: Vec<String> = members
                    .iter()
                    .filter_map(|&i| backends.get(i as usize).map(Backend::key))
                    .collect();
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                match self.cache.table(&refs, self.opts.maglev_table_size()) {
                    Ok(table) => {
                        // Entries name members; the rotation's name backends. When the members
                        // are all the backends in order (the usual case) they are the same
                        // and the cache's table is shared as it is. Backend indices fit u16:
                        // `service` skips ports with more backends.
                        let all_in_order =
                            members.iter().enumerate().all(|(i, &m)| m as usize == i);
                        let remapped: Arc<[u16]> = if all_in_order {
                            Arc::clone(&table)
                        } else {
                            table
                                .iter()
                                .filter_map(|owner| members.get(usize::from(*owner)))
                                .map(|&m| m as u16)
                                .collect()
                        };
                        self.held.push(table);
                        remapped
                    }
                    Err(e) => {
                        self.skip(key, format!("port {port_label}: {e}"));
                        Arc::from([])
                    }
                }
            }
        };
        Rotation {
            backends: members,
            terminating_fallback,
            maglev,
        }
    }

    fn finish(self) -> ServicePlan {
        let Builder {
            mut entries,
            mut skipped,
            ..
        } = self;
        let order = |a: &ServiceEntry, b: &ServiceEntry| {
            (&a.namespace, &a.name, &a.port_name, a.protocol, a.port).cmp(&(
                &b.namespace,
                &b.name,
                &b.port_name,
                b.protocol,
                b.port,
            ))
        };
        // Usually in order already (the state's Services are sorted, a Service's entries are
        // sorted when made): checking is cheaper than sorting.
        if !entries.is_sorted_by(|(a, _), (b, _)| order(a, b).is_le()) {
            entries.sort_by(|(a, _), (b, _)| order(a, b));
        }
        let mut frontends = Vec::new();
        let mut services = Vec::with_capacity(entries.len());
        for (index, (entry, pending)) in entries.into_iter().enumerate() {
            for p in pending.iter() {
                frontends.push(Frontend {
                    address: p.address,
                    port: p.port,
                    protocol: entry.protocol,
                    kind: p.kind,
                    service: index,
                    scope: p.scope,
                    external_traffic_local: p.external_traffic_local,
                });
            }
            services.push(entry);
        }
        // Same key twice (two Services claiming one externalIP:port, or a NodePort on an
        // address that is also a ClusterIP): the first Service in (namespace, name) order wins.
        frontends.sort_by_key(|f| (f.address, f.port, f.protocol, f.service, f.kind));
        let mut unique: Vec<Frontend> = Vec::with_capacity(frontends.len());
        for f in frontends {
            match unique.last() {
                Some(last)
                    if (last.address, last.port, last.protocol)
                        == (f.address, f.port, f.protocol) =>
                {
                    let winner = services
                        .get(last.service)
                        .map(|e| e.service_key())
                        .unwrap_or_default();
                    let key = services
                        .get(f.service)
                        .map(|e| e.service_key())
                        .unwrap_or_default();
                    if winner != key || last.kind != f.kind {
                        skipped.push((
                            key,
                            format!(
                                "{} frontend {}:{}/{} is already taken by {} ({}); give one of \
                                 them another address or port",
                                f.kind.as_str(),
                                f.address,
                                f.port,
                                f.protocol,
                                winner,
                                last.kind.as_str()
                            ),
                        ));
                    }
                }
                _ => unique.push(f),
            }
        }
        skipped.sort();
        skipped.dedup();
        ServicePlan {
            frontends: unique,
            services,
            skipped,
        }
    }
}

/// `name` (`port/PROTO`) or `port/PROTO` for reasons.
fn port_label(port: &ServicePort) -> String {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match port.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => format!("{name} ({}/{protocol})", port.port),
        None => format!("{}/{protocol}", port.port),
    }
}

/// Backends of one service port from its slices, sorted by (address, port), duplicates merged
/// (keeping the best state).
fn backends(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    publish_not_ready: bool,
    this_node: &str,
) -> Vec<Backend> {
    let mut by_address: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        // kube-proxy matches a slice port to a service port by name (and protocol).
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(address) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let node_name = endpoint.node_name.clone().filter(|n| !n.is_empty());
            let backend = Backend {
                address,
                port,
                local: node_name.as_deref() == Some(this_node),
                node_name,
                state: state_of(endpoint, publish_not_ready),
            };
            match by_address.get(&(address, port)) {
                Some(existing) if existing.state <= backend.state => {}
                _ => {
                    by_address.insert((address, port), backend);
                }
            }
        }
    }
    by_address.into_values().collect()
}

/// kube-proxy's reading of endpoint conditions: `ready` and `serving` nil mean true,
/// `terminating` nil means false.
fn state_of(endpoint: &Endpoint, publish_not_ready: bool) -> BackendState {
    if publish_not_ready {
        return BackendState::Active;
    }
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        BackendState::Active
    } else if serving && terminating {
        BackendState::Terminating
    } else {
        BackendState::NotServing
    }
}

/// This node's IPv4 `InternalIP` and `ExternalIP` addresses, sorted: NodePorts answer on every
/// one of them.
fn node_addresses(cluster: &ClusterState, this_node: &str) -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = cluster
        .node(this_node)
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == INTERNAL_IP || a.type_ == EXTERNAL_IP)
        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}
