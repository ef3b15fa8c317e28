//! EndpointSlices for Services whose slices a cluster file leaves out, built as Kubernetes'
//! endpointslice controller builds them (`pkg/controller/endpointslice`, `reconciler.go` and
//! `utils.go`, v1.33), so a hand-written file and a `kubectl get -o yaml` dump translate alike.
//!
//! What is the same as the controller:
//! - only Services with a non-empty `spec.selector` get slices; pods in the Service's namespace
//!   whose labels contain every selector pair are candidates;
//! - a pod is left out when it has no IPv4 pod IP or is terminal (`status.phase` Succeeded or
//!   Failed); a pod being deleted (`metadata.deletionTimestamp`) stays, with `terminating: true`
//!   and `ready: false`;
//! - `serving` is the pod's Ready condition, `ready` is `serving && !terminating`, and both are
//!   true when `spec.publishNotReadyAddresses` is set;
//! - ports come from the Service's ports; `targetPort` is a number, or a name looked up among the
//!   pod's container ports (and restartable init containers, i.e. sidecars) with the same name
//!   and protocol; absent means the Service port. When a named port does not resolve for a pod,
//!   that port is left out *for that pod* (the controller logs and skips it): pods are grouped by
//!   their resolved port list, one slice (of at most 100 endpoints) per distinct list;
//! - a Service that selects no pods gets one empty placeholder slice;
//! - endpoints carry `nodeName`, `zone` (the node's `topology.kubernetes.io/zone` label),
//!   `hostname` (when `spec.hostname` is set and `spec.subdomain` names the Service) and a
//!   `targetRef` to the pod; slices carry the `kubernetes.io/service-name` and
//!   `endpointslice.kubernetes.io/managed-by` labels and an owner reference to the Service.
//!
//! What differs:
//! - a pod with no Ready condition at all counts as ready (the controller says not ready): files
//!   are often written by hand without `status.conditions`, and such a pod is meant to serve;
//! - slice names are deterministic, `<service>-derived-<n>`, instead of `generateName` suffixes;
//! - only `addressType: IPv4` slices are derived (sluice is IPv4-only).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::parse::DEFAULT_NAMESPACE;
use super::ClusterState;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller that manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The endpointslice controller's value for [`MANAGED_BY_LABEL`]; derived slices carry it too.
pub const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// The controller's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl ClusterState {
    /// The EndpointSlices of the file plus, for every Service with a selector and no slice in the
    /// file (by [`SERVICE_NAME_LABEL`]), the slices the endpointslice controller would build.
    /// Sorted by (namespace, name).
    pub fn effective_endpoint_slices(&self) -> Vec<Arc<EndpointSlice>> {
        let covered: HashSet<(&str, &str)> = self
            .endpoint_slices
            .iter()
            .filter_map(|slice| {
                let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
                Some((namespace_of(&slice.metadata), service.as_str()))
            })
            .collect();
        let mut slices = self.endpoint_slices.clone();
        for service in &self.services {
            let key = (
                namespace_of(&service.metadata),
                service.metadata.name.as_deref().unwrap_or(""),
            );
            if !covered.contains(&key) {
                slices.extend(self.derived_slices(service).into_iter().map(Arc::new));
            }
        }
        slices.sort_by(|a, b| sort_key(&a.metadata).cmp(&sort_key(&b.metadata)));
        slices
    }

    /// The controller's slices for one Service; empty when the Service has no selector.
    pub(crate) fn derived_slices(&self, service: &Service) -> Vec<EndpointSlice> {
        let Some(spec) = &service.spec else {
            return Vec::new();
        };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        let namespace = namespace_of(&service.metadata);
        let service_name = service.metadata.name.as_deref().unwrap_or("");
        let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
        let service_ports = spec.ports.as_deref().unwrap_or_default();

        // Endpoints grouped by their resolved port list, in order of first appearance.
        let mut groups: Vec<(Vec<EndpointPort>, Vec<Endpoint>)> = Vec::new();
        for pod in &self.pods {
            if namespace_of(&pod.metadata) != namespace || !selects(selector, pod) {
                continue;
            }
            let Some(endpoint) = self.endpoint_for(pod, service_name, publish_not_ready) else {
                continue;
            };
            let ports: Vec<EndpointPort> = service_ports
                .iter()
                .filter_map(|sp| endpoint_port(pod, sp))
                .collect();
            match groups.iter_mut().find(|(p, _)| *p == ports) {
                Some((_, endpoints)) => endpoints.push(endpoint),
                None => groups.push((ports, vec![endpoint])),
            }
        }

        let mut slices = Vec::new();
        if groups.is_empty() {
            // The controller keeps one placeholder slice for a Service that selects nothing.
            slices.push(new_slice(service, slices.len(), None, Vec::new()));
        }
        for (ports, endpoints) in groups {
            for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
                let index = slices.len();
                slices.push(new_slice(
                    service,
                    index,
                    Some(ports.clone()),
                    chunk.to_vec(),
                ));
            }
        }
        slices
    }

    fn endpoint_for(
        &self,
        pod: &Pod,
        service_name: &str,
        publish_not_ready: bool,
    ) -> Option<Endpoint> {
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let address = pod_ipv4(pod)?;
        let serving = pod_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = publish_not_ready || (serving && !terminating);
        let spec = pod.spec.as_ref();
        let node_name = spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let zone = node_name
            .as_deref()
            .and_then(|n| {
                self.nodes
                    .iter()
                    .find(|node| node.metadata.name.as_deref() == Some(n))
            })
            .and_then(|node: &Arc<Node>| node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
            .filter(|z| !z.is_empty());
        let hostname = spec
            .filter(|s| s.subdomain.as_deref() == Some(service_name))
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty());
        Some(Endpoint {
            addresses: vec![address],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(publish_not_ready || serving),
                terminating: Some(terminating),
            }),
            hostname,
            node_name,
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                namespace: Some(namespace_of(&pod.metadata).to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                ..ObjectReference::default()
            }),
            zone,
            ..Endpoint::default()
        })
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn sort_key(meta: &ObjectMeta) -> (&str, &str) {
    (namespace_of(meta), meta.name.as_deref().unwrap_or(""))
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The pod's IPv4 address: `status.podIP`, else the first IPv4 in `status.podIPs`.
fn pod_ipv4(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let candidates = status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().flatten().map(|p| &p.ip));
    candidates
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .map(|ip| ip.to_string())
}

/// The pod's Ready condition; true when the pod has none (see the module doc).
fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

fn protocol(p: Option<&str>) -> &str {
    p.filter(|p| !p.is_empty()).unwrap_or("TCP")
}

/// The controller's `FindPort` plus the `EndpointPort` it builds; `None` when a named target
/// port is not among the pod's container ports.
fn endpoint_port(pod: &Pod, service_port: &ServicePort) -> Option<EndpointPort> {
    let wanted_protocol = protocol(service_port.protocol.as_deref());
    let number = match &service_port.target_port {
        None => service_port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && protocol(p.protocol.as_deref()) == wanted_protocol
                })?
                .container_port
        }
    };
    Some(EndpointPort {
        name: Some(service_port.name.clone().unwrap_or_default()),
        port: Some(number),
        protocol: Some(wanted_protocol.to_owned()),
        app_protocol: service_port.app_protocol.clone(),
    })
}

fn new_slice(
    service: &Service,
    index: usize,
    ports: Option<Vec<EndpointPort>>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let service_name = service.metadata.name.clone().unwrap_or_default();
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME_LABEL.to_owned(), service_name.clone());
    labels.insert(
        MANAGED_BY_LABEL.to_owned(),
        ENDPOINTSLICE_CONTROLLER.to_owned(),
    );
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service_name}-derived-{index}")),
            namespace: Some(namespace_of(&service.metadata).to_owned()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Service".to_owned(),
                name: service_name,
                uid: service.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints,
        ports,
    }
}
