//! `sluice service list`: a [`ServiceListing`] is the agent's [`ServicePlan`] turned into plain,
//! serialisable data (what the local API sends), and [`render`] prints it as a table in the
//! style of `cilium service list`: one row per frontend (ID, Frontend, Service Type), its
//! backends numbered with their state and their share of the Maglev table.
//!
//! Design decision: the listing is computed from the plan alone (no I/O, no agent state), so it
//! is tested from Service/EndpointSlice YAML without an agent. Enums travel as their lower-case
//! names (`as_str()`), so the CLI can read a listing back without the plan's types.
//!
//! Frontend IDs are positions in [`ServicePlan::frontends`] (sorted by address, port,
//! protocol) plus one: stable for a given plan, not across plans (unlike Cilium's allocated
//! IDs).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{FrontendKind, Rotation, Scope, SelectionMode, ServiceEntry, ServicePlan};

/// Everything `sluice service list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceListing {
    /// Snapshot generation that last changed the plan (the agent's `services_generation`).
    pub generation: u64,
    /// `maglev` or `random`.
    pub selection: String,
    /// Entries in every Maglev table (also reported with `random`, where no table is built).
    pub maglev_table_size: u32,
    /// One per service port, in the plan's order (namespace, name, port name, protocol, port).
    pub services: Vec<ServicePortListing>,
    /// Services (or parts) left out, with the reason.
    pub skipped: Vec<SkippedListing>,
}

/// One port of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortListing {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name` (empty when unnamed).
    pub port_name: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub cluster_ip: Ipv4Addr,
    /// `sessionAffinity: ClientIP` timeout; absent without affinity.
    pub affinity_timeout_seconds: Option<u32>,
    /// `Cluster` or `Local`.
    pub external_traffic_policy: String,
    /// `Cluster` or `Local`.
    pub internal_traffic_policy: String,
    pub health_check_node_port: Option<u16>,
    pub frontends: Vec<FrontendListing>,
    pub backends: Vec<BackendListing>,
    /// Rotation over every node's backends.
    pub cluster_rotation: RotationListing,
    /// Rotation over this node's backends (present when either traffic policy is `Local`).
    pub local_rotation: Option<RotationListing>,
}

/// One address the dataplane answers for a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendListing {
    /// Position in the plan's frontends plus one.
    pub id: usize,
    pub address: Ipv4Addr,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `clusterip`, `nodeport`, `loadbalancer` or `externalip`.
    pub kind: String,
    /// `cluster` or `local`: the rotation new flows use.
    pub scope: String,
    /// Client address kept, local backends only (`externalTrafficPolicy: Local`).
    pub external_traffic_local: bool,
}

/// One backend of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendListing {
    pub address: Ipv4Addr,
    pub port: u16,
    /// The endpoint's `nodeName`.
    pub node: Option<String>,
    /// On this node.
    pub local: bool,
    /// `active`, `terminating` or `not-serving`.
    pub state: String,
    pub in_cluster_rotation: bool,
    pub in_local_rotation: bool,
    /// Entries of the cluster rotation's Maglev table pointing at this backend.
    pub cluster_maglev_entries: u32,
    /// Entries of the local rotation's Maglev table pointing at this backend.
    pub local_maglev_entries: u32,
}

/// The backends new flows of one scope may go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationListing {
    /// Backends in the rotation.
    pub backends: usize,
    /// The rotation holds Terminating backends because no Active one exists.
    pub terminating_fallback: bool,
    /// Entries of its Maglev table (0 with `random` selection or no backend).
    pub maglev_entries: usize,
}

/// A Service (or part of one) that is not served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedListing {
    /// `namespace/name`.
    pub service: String,
    pub reason: String,
}

/// The listing of `plan`, which the agent computed at snapshot generation `generation`, with
/// Maglev table size `maglev_table_size` and backend selection `selection`.
pub fn listing(
    plan: &ServicePlan,
    generation: u64,
    maglev_table_size: u32,
    selection: SelectionMode,
) -> ServiceListing {
    let services = plan
        .services
        .iter()
        .enumerate()
        .map(|(index, entry)| service_port(plan, index, entry))
        .collect();
    ServiceListing {
        generation,
        selection: selection_name(selection).to_owned(),
        maglev_table_size,
        services,
        skipped: plan
            .skipped
            .iter()
            .map(|(service, reason)| SkippedListing {
                service: service.clone(),
                reason: reason.clone(),
            })
            .collect(),
    }
}

fn selection_name(selection: SelectionMode) -> &'static str {
    match selection {
        SelectionMode::Maglev => "maglev",
        SelectionMode::Random => "random",
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Cluster => "cluster",
        Scope::Local => "local",
    }
}

fn policy_name(local: bool) -> &'static str {
    if local {
        "Local"
    } else {
        "Cluster"
    }
}

fn service_port(plan: &ServicePlan, index: usize, entry: &ServiceEntry) -> ServicePortListing {
    let frontends = plan
        .frontends
        .iter()
        .enumerate()
        .filter(|(_, f)| f.service == index)
        .map(|(i, f)| FrontendListing {
            id: i + 1,
            address: f.address,
            port: f.port,
            protocol: f.protocol.as_str().to_owned(),
            kind: f.kind.as_str().to_owned(),
            scope: scope_name(f.scope).to_owned(),
            external_traffic_local: f.external_traffic_local,
        })
        .collect();
    let local = entry.local.as_ref();
    let backends = entry
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            BackendListing {
                address: b.address,
                port: b.port,
                node: b.node_name.clone(),
                local: b.local,
                state: b.state.as_str().to_owned(),
                in_cluster_rotation: entry.cluster.backends.contains(&i),
                in_local_rotation: local.is_some_and(|r| r.backends.contains(&i)),
                cluster_maglev_entries: entries_of(&entry.cluster, i),
                local_maglev_entries: local.map_or(0, |r| entries_of(r, i)),
            }
        })
        .collect();
    ServicePortListing {
        namespace: entry.namespace.clone(),
        name: entry.name.clone(),
        port_name: entry.port_name.clone(),
        port: entry.port,
        protocol: entry.protocol.as_str().to_owned(),
        cluster_ip: entry.cluster_ip,
        affinity_timeout_seconds: entry.affinity.map(|a| a.timeout_seconds),
        external_traffic_policy: policy_name(entry.external_traffic_local).to_owned(),
        internal_traffic_policy: policy_name(entry.internal_traffic_local).to_owned(),
        health_check_node_port: entry.health_check_node_port,
        frontends,
        backends,
        cluster_rotation: rotation(&entry.cluster),
        local_rotation: local.map(rotation),
    }
}

fn entries_of(rotation: &Rotation, backend: u32) -> u32 {
    let n = rotation
        .maglev
        .iter()
        .filter(|&&b| u32::from(b) == backend)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn rotation(r: &Rotation) -> RotationListing {
    RotationListing {
        backends: r.backends.len(),
        terminating_fallback: r.terminating_fallback,
        maglev_entries: r.maglev.len(),
    }
}

/// The Kubernetes-style name of a frontend kind for the "Service Type" column.
fn type_name(kind: &str) -> &str {
    const KINDS: [FrontendKind; 4] = [
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::LoadBalancer,
        FrontendKind::ExternalIp,
    ];
    match KINDS.iter().find(|k| k.as_str() == kind) {
        Some(FrontendKind::ClusterIp) => "ClusterIP",
        Some(FrontendKind::NodePort) => "NodePort",
        Some(FrontendKind::LoadBalancer) => "LoadBalancer",
        Some(FrontendKind::ExternalIp) => "ExternalIP",
        None => kind,
    }
}

/// The backend column of one frontend: the backends its scope may use (all of them for
/// `cluster`, this node's for `local`), numbered by their position among the service port's
/// backends, each with its state and, when it is in the scope's rotation and a Maglev table
/// exists, its share of the table.
fn backend_cells(service: &ServicePortListing, frontend: &FrontendListing) -> Vec<String> {
    let local_scope = frontend.scope == scope_name(Scope::Local);
    let (rotation, fallback) = if local_scope {
        match &service.local_rotation {
            Some(r) => (r, r.terminating_fallback),
            None => (&service.cluster_rotation, false),
        }
    } else {
        (
            &service.cluster_rotation,
            service.cluster_rotation.terminating_fallback,
        )
    };
    let mut cells = Vec::new();
    for (i, b) in service.backends.iter().enumerate() {
        if local_scope && !b.local {
            continue;
        }
        let (in_rotation, entries) = if local_scope {
            (b.in_local_rotation, b.local_maglev_entries)
        } else {
            (b.in_cluster_rotation, b.cluster_maglev_entries)
        };
        let mut notes = vec![b.state.clone()];
        if in_rotation && fallback {
            notes.push("fallback".to_owned());
        }
        if in_rotation && rotation.maglev_entries > 0 {
            notes.push(format!(
                "{:.1}%",
                f64::from(entries) * 100.0 / rotation.maglev_entries as f64
            ));
        }
        cells.push(format!(
            "{} => {}:{}/{} ({})",
            i + 1,
            b.address,
            b.port,
            frontend.protocol,
            notes.join(", ")
        ));
    }
    if rotation.backends == 0 {
        cells.push(if local_scope {
            "(no local backend: new flows are dropped)".to_owned()
        } else {
            "(no backend: new flows get a TCP RST / ICMP port unreachable)".to_owned()
        });
    }
    cells
}

/// The listing as a table for humans, in the style of `cilium service list`, followed by each
/// service port's affinity, traffic policies and healthCheckNodePort when not the defaults, the
/// generation and selection, and the skipped Services with their reasons.
pub fn render(listing: &ServiceListing) -> String {
    let mut rows: Vec<(usize, [String; 4], Vec<String>)> = Vec::new();
    for service in &listing.services {
        let service_name = if service.port_name.is_empty() {
            format!("{}/{}", service.namespace, service.name)
        } else {
            format!(
                "{}/{}:{}",
                service.namespace, service.name, service.port_name
            )
        };
        for f in &service.frontends {
            let mut service_type = type_name(&f.kind).to_owned();
            if f.scope == scope_name(Scope::Local) {
                service_type.push_str(" (Local)");
            }
            rows.push((
                f.id,
                [
                    f.id.to_string(),
                    format!("{}:{}/{}", f.address, f.port, f.protocol),
                    service_type,
                    service_name.clone(),
                ],
                backend_cells(service, f),
            ));
        }
    }
    rows.sort_by_key(|(id, _, _)| *id);
    let headers = ["ID", "Frontend", "Service Type", "Service"];
    let mut widths = headers.map(str::len);
    for (_, cells, _) in &rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 4], backend: &str| {
        let mut s = String::new();
        for (c, w) in cells.iter().zip(widths) {
            let _ = write!(s, "{c:<w$}   ");
        }
        s.push_str(backend);
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, headers, "Backend");
    for (_, cells, backends) in &rows {
        let mut first = true;
        for b in backends.iter() {
            if first {
                line(&mut out, cells.each_ref().map(String::as_str), b);
                first = false;
            } else {
                line(&mut out, ["", "", "", ""], b);
            }
        }
    }
    if rows.is_empty() {
        out.push_str("(no service frontends)\n");
    }

    let mut details = Vec::new();
    for s in &listing.services {
        let mut notes = Vec::new();
        if let Some(t) = s.affinity_timeout_seconds {
            notes.push(format!("sessionAffinity ClientIP {t}s"));
        }
        if s.external_traffic_policy != policy_name(false) {
            notes.push(format!(
                "externalTrafficPolicy {}",
                s.external_traffic_policy
            ));
        }
        if s.internal_traffic_policy != policy_name(false) {
            notes.push(format!(
                "internalTrafficPolicy {}",
                s.internal_traffic_policy
            ));
        }
        if let Some(p) = s.health_check_node_port {
            notes.push(format!("healthCheckNodePort {p}"));
        }
        if !notes.is_empty() {
            details.push(format!(
                "  {}/{} {}/{}: {}",
                s.namespace,
                s.name,
                s.port,
                s.protocol,
                notes.join(", ")
            ));
        }
    }
    let details: BTreeSet<String> = details.into_iter().collect();
    if !details.is_empty() {
        out.push_str("\nService options:\n");
        for d in details {
            out.push_str(&d);
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "\nGeneration {}, backend selection {} (Maglev table {} entries)",
        listing.generation, listing.selection, listing.maglev_table_size
    );
    if !listing.skipped.is_empty() {
        out.push_str("Skipped:\n");
        for s in &listing.skipped {
            let _ = writeln!(out, "  {}: {}", s.service, s.reason);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::parse_str;
    use crate::services::{translate, ServiceOptions};

    const NODES: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node1
spec:
  podCIDR: 10.244.1.0/24
status:
  addresses:
  - type: InternalIP
    address: 172.18.0.11
---
apiVersion: v1
kind: Node
metadata:
  name: node2
spec:
  podCIDR: 10.244.2.0/24
status:
  addresses:
  - type: InternalIP
    address: 172.18.0.12
";

    const OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  sessionAffinity: ClientIP
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.2.8]
  nodeName: node2
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata:
  name: dns
  namespace: kube-system
spec:
  clusterIP: 10.96.0.53
  ports:
  - port: 53
    protocol: UDP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: kube-system
  labels:
    kubernetes.io/service-name: dns
addressType: IPv4
ports:
- port: 5353
  protocol: UDP
endpoints:
- addresses: [10.244.2.3]
  nodeName: node2
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata:
  name: alias
spec:
  type: ExternalName
  externalName: example.com
";

    fn plan(options: &ServiceOptions) -> ServicePlan {
        let text = format!("{NODES}---\n{OBJECTS}");
        match parse_str(&text, "cluster.yaml") {
            Ok(state) => translate(&state, "node1", options),
            Err(e) => panic!("fixture does not parse: {e}"),
        }
    }

    fn maglev_listing() -> ServiceListing {
        let options = match ServiceOptions::new(251, SelectionMode::Maglev) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        listing(&plan(&options), 7, 251, SelectionMode::Maglev)
    }

    fn web(listing: &ServiceListing) -> &ServicePortListing {
        match listing.services.iter().find(|s| s.name == "web") {
            Some(s) => s,
            None => panic!("no web in {listing:?}"),
        }
    }

    #[test]
    fn listing_fields_follow_the_plan() {
        let l = maglev_listing();
        assert_eq!(l.generation, 7);
        assert_eq!(l.selection, "maglev");
        assert_eq!(l.maglev_table_size, 251);
        let names: Vec<String> = l
            .services
            .iter()
            .map(|s| format!("{}/{}:{}", s.namespace, s.name, s.port_name))
            .collect();
        assert_eq!(names, ["default/web:http", "kube-system/dns:"]);

        let w = web(&l);
        assert_eq!((w.port, w.protocol.as_str()), (80, "TCP"));
        assert_eq!(w.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(w.affinity_timeout_seconds, Some(10_800));
        assert_eq!(w.external_traffic_policy, "Local");
        assert_eq!(w.internal_traffic_policy, "Cluster");
        assert_eq!(w.health_check_node_port, Some(32100));

        let fronts: Vec<String> = w
            .frontends
            .iter()
            .map(|f| {
                format!(
                    "{} {}:{}/{} {} {} {}",
                    f.id, f.address, f.port, f.protocol, f.kind, f.scope, f.external_traffic_local
                )
            })
            .collect();
        // Plan order: 10.96.0.10 (id 1), 10.96.0.53 (id 2, dns), 172.18.0.11 (id 3).
        assert_eq!(
            fronts,
            [
                "1 10.96.0.10:80/TCP clusterip cluster false",
                "3 172.18.0.11:30080/TCP nodeport local true",
            ]
        );

        let backs: Vec<String> = w
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}:{} {} {} {} c={} l={} {}/{}",
                    b.address,
                    b.port,
                    b.node.as_deref().unwrap_or("-"),
                    b.local,
                    b.state,
                    b.in_cluster_rotation,
                    b.in_local_rotation,
                    b.cluster_maglev_entries,
                    b.local_maglev_entries
                )
            })
            .collect();
        let shares: Vec<u32> = w
            .backends
            .iter()
            .map(|b| b.cluster_maglev_entries)
            .collect();
        assert_eq!(shares.iter().sum::<u32>(), 251, "{backs:?}");
        assert!(shares[0].abs_diff(shares[1]) <= 1, "fair split: {shares:?}");
        assert_eq!(
            backs,
            [
                format!(
                    "10.244.1.5:8080 node1 true active c=true l=true {}/251",
                    shares[0]
                ),
                format!(
                    "10.244.2.7:8080 node2 false active c=true l=false {}/0",
                    shares[1]
                ),
                "10.244.2.8:8080 node2 false terminating c=false l=false 0/0".to_owned(),
            ]
        );
        assert_eq!(
            w.cluster_rotation,
            RotationListing {
                backends: 2,
                terminating_fallback: false,
                maglev_entries: 251
            }
        );
        assert_eq!(
            w.local_rotation,
            Some(RotationListing {
                backends: 1,
                terminating_fallback: false,
                maglev_entries: 251
            })
        );

        let dns = &l.services[1];
        assert_eq!(dns.cluster_rotation.backends, 1);
        assert!(dns.cluster_rotation.terminating_fallback);
        assert_eq!(dns.local_rotation, None);
        assert_eq!(dns.backends[0].cluster_maglev_entries, 251);

        assert_eq!(l.skipped.len(), 1, "{:?}", l.skipped);
        assert_eq!(l.skipped[0].service, "default/alias");
        assert!(l.skipped[0].reason.contains("ExternalName"));
    }

    #[test]
    fn listing_json_round_trips_with_stable_field_names() {
        let l = maglev_listing();
        let value = match serde_json::to_value(&l) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(value["generation"], 7);
        assert_eq!(value["selection"], "maglev");
        let w = &value["services"][0];
        assert_eq!(w["cluster_ip"], "10.96.0.10");
        assert_eq!(w["external_traffic_policy"], "Local");
        assert_eq!(w["health_check_node_port"], 32100);
        assert_eq!(w["affinity_timeout_seconds"], 10_800);
        assert_eq!(w["frontends"][1]["kind"], "nodeport");
        assert_eq!(w["frontends"][1]["address"], "172.18.0.11");
        assert_eq!(w["backends"][2]["state"], "terminating");
        assert_eq!(w["backends"][0]["node"], "node1");
        assert_eq!(w["local_rotation"]["backends"], 1);
        assert_eq!(
            value["services"][1]["local_rotation"],
            serde_json::Value::Null
        );
        assert_eq!(value["skipped"][0]["service"], "default/alias");
        let back: Result<ServiceListing, _> = serde_json::from_value(value);
        assert_eq!(back.ok().as_ref(), Some(&l));
    }

    #[test]
    fn render_shows_one_row_per_frontend_with_backend_states_and_shares() {
        let l = maglev_listing();
        let w = web(&l);
        let (a, b) = (
            f64::from(w.backends[0].cluster_maglev_entries) * 100.0 / 251.0,
            f64::from(w.backends[1].cluster_maglev_entries) * 100.0 / 251.0,
        );
        let text = render(&l);
        let lines: Vec<&str> = text.lines().collect();
        let expected = [
            "ID   Frontend                Service Type       Service            Backend".to_owned(),
            format!(
                "1    10.96.0.10:80/TCP       ClusterIP          default/web:http   1 => 10.244.1.5:8080/TCP (active, {a:.1}%)"
            ),
            format!(
                "                                                                   2 => 10.244.2.7:8080/TCP (active, {b:.1}%)"
            ),
            "                                                                   3 => 10.244.2.8:8080/TCP (terminating)".to_owned(),
            "2    10.96.0.53:53/UDP       ClusterIP          kube-system/dns    1 => 10.244.2.3:5353/UDP (terminating, fallback, 100.0%)".to_owned(),
            "3    172.18.0.11:30080/TCP   NodePort (Local)   default/web:http   1 => 10.244.1.5:8080/TCP (active, 100.0%)".to_owned(),
            String::new(),
            "Service options:".to_owned(),
            "  default/web 80/TCP: sessionAffinity ClientIP 10800s, externalTrafficPolicy Local, healthCheckNodePort 32100".to_owned(),
            String::new(),
            "Generation 7, backend selection maglev (Maglev table 251 entries)".to_owned(),
            "Skipped:".to_owned(),
        ];
        assert_eq!(lines[..expected.len()], expected, "\n{text}");
        assert!(lines[expected.len()].starts_with("  default/alias: type ExternalName"));
        assert_eq!(lines.len(), expected.len() + 1, "\n{text}");
    }

    #[test]
    fn render_with_random_selection_has_no_shares_and_flags_empty_rotations() {
        let options = match ServiceOptions::new(251, SelectionMode::Random) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        let mut p = plan(&options);
        // Drop every backend of web: its rows say new flows are rejected.
        let web = std::sync::Arc::make_mut(&mut p.services[0]);
        web.backends.clear();
        web.cluster = Rotation::default();
        web.local = Some(Rotation::default());
        let l = listing(&p, 3, 251, SelectionMode::Random);
        assert_eq!(l.selection, "random");
        assert!(l.services[1].backends[0].cluster_maglev_entries == 0);
        let text = render(&l);
        assert!(
            text.contains("kube-system/dns    1 => 10.244.2.3:5353/UDP (terminating, fallback)\n"),
            "\n{text}"
        );
        let rejected = text
            .lines()
            .filter(|l| {
                l.ends_with("(no backend: new flows get a TCP RST / ICMP port unreachable)")
            })
            .count();
        assert_eq!(rejected, 1, "the clusterip row of web:\n{text}");
        let dropped = text
            .lines()
            .filter(|l| l.ends_with("(no local backend: new flows are dropped)"))
            .count();
        assert_eq!(dropped, 1, "the eTP=Local nodeport row of web:\n{text}");
        assert!(text.contains("backend selection random"), "\n{text}");
    }

    #[test]
    fn empty_plan_renders_a_placeholder() {
        let l = listing(&ServicePlan::default(), 0, 16381, SelectionMode::Maglev);
        let text = render(&l);
        assert!(text.contains("(no service frontends)"), "\n{text}");
        assert!(!text.contains("Skipped"), "\n{text}");
    }
}
