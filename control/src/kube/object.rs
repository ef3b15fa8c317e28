//! The watched kinds and their objects: served JSON decoded leniently (never fails), then turned
//! into the typed k8s-openapi struct one object at a time.
//!
//! The watcher decodes every list page and watch event into a [`LenientObject`], a
//! `DynamicObject` whose decode cannot fail: it keeps the raw JSON body and reads from
//! `metadata` only what the watcher itself needs (name, namespace, resourceVersion), falling back
//! field by field when `metadata` is malformed. A `DynamicObject` would fail the whole list page
//! (and so the whole kind's sync) on one object with, say, `metadata.labels: 5`. The typed
//! decode ([`decode`]) then happens per object, so one bad object is skipped with a warning
//! naming it and its field path, and the rest of the list or stream is applied.
//!
//! After the typed decode every object goes through the same checks as the cluster file
//! (`cluster::validate`: IPv4 InternalIP on Nodes, IPv4 cluster IPs, port ranges, ...), so a
//! [`ClusterState`](crate::cluster::ClusterState) from the API keeps the invariants that the
//! translation code relies on; an object failing them is skipped like an undecodable one. So is
//! one with an unknown value in an enum field sluice reads (protocols, Service type and traffic
//! policies, policy types, address type): k8s-openapi holds those as strings, so they decode.
//! Missing required fields decode to their defaults in k8s-openapi (`port: 0`, `name: ""`); the
//! checks catch the ones sluice reads (port numbers, addresses, names).
//! `metadata.managedFields` is dropped (sluice never reads it; it is often most of the object).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use ::kube::core::{ApiResource, DynamicResourceScope};
use ::kube::Resource;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::cluster::{validate, ClusterError, Location};
use crate::policy::HostNetworkPolicy;

/// Label that hands a Service to another proxy; kube-proxy (and sluice) skip such Services.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A kind the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Node (all of them: routes, VTEPs and WireGuard peers need every node).
    Node,
    /// `v1` Namespace (all: namespace selectors of policies).
    Namespace,
    /// `v1` Pod (all: policy identities need every pod's labels and IP).
    Pod,
    /// `v1` Service, without those labelled `service.kubernetes.io/service-proxy-name`.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice (all).
    EndpointSlice,
    /// `networking.k8s.io/v1` NetworkPolicy (all).
    NetworkPolicy,
    /// `policy.sluice.io/v1alpha1` HostNetworkPolicy (cluster-scoped CRD; may be absent).
    HostNetworkPolicy,
}

impl Kind {
    /// This kind as a [`crate::cluster::ChangedKinds`] member.
    pub fn changed(self) -> crate::cluster::ChangedKinds {
        use crate::cluster::ChangedKinds as C;
        match self {
            Kind::Node => C::NODES,
            Kind::Namespace => C::NAMESPACES,
            Kind::Pod => C::PODS,
            Kind::Service => C::SERVICES,
            Kind::EndpointSlice => C::ENDPOINT_SLICES,
            Kind::NetworkPolicy => C::NETWORK_POLICIES,
            Kind::HostNetworkPolicy => C::HOST_POLICIES,
        }
    }

    /// Every watched kind, in the order of [`ClusterState`](crate::cluster::ClusterState)'s fields.
    pub const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::HostNetworkPolicy,
    ];

    /// Position in [`Kind::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The kind's name (`Pod`, `HostNetworkPolicy`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::HostNetworkPolicy => crate::policy::host::HOST_POLICY_KIND,
        }
    }

    /// Group, version, kind and plural of the kind, taken from its k8s-openapi type.
    pub fn api_resource(self) -> ApiResource {
        match self {
            Kind::Node => ApiResource::erase::<Node>(&()),
            Kind::Namespace => ApiResource::erase::<Namespace>(&()),
            Kind::Pod => ApiResource::erase::<Pod>(&()),
            Kind::Service => ApiResource::erase::<Service>(&()),
            Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            Kind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
            Kind::HostNetworkPolicy => ApiResource::erase::<HostNetworkPolicy>(&()),
        }
    }

    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace | Kind::HostNetworkPolicy)
    }

    /// The label selector of the kind's list and watch calls, if any (kube-proxy's rule for
    /// Services). No kind is narrowed by field: every one is needed cluster-wide.
    pub fn label_selector(self) -> Option<&'static str> {
        match self {
            Kind::Service => Some("!service.kubernetes.io/service-proxy-name"),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A served object whose decode never fails: the raw JSON plus the metadata the watcher needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LenientObject {
    /// `metadata`, or as much of it as decodes (name, namespace, resourceVersion, uid).
    pub metadata: ObjectMeta,
    /// The whole object as served.
    pub body: Value,
}

impl<'de> Deserialize<'de> for LenientObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let body = Value::deserialize(deserializer)?;
        Ok(LenientObject::new(body))
    }
}

impl LenientObject {
    /// Wraps a served object, reading its metadata as leniently as possible.
    pub fn new(body: Value) -> Self {
        let raw_meta = body.get("metadata").cloned().unwrap_or(Value::Null);
        let metadata = ObjectMeta::deserialize(&raw_meta).unwrap_or_else(|_| {
            let text = |field: &str| {
                raw_meta
                    .get(field)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            ObjectMeta {
                name: text("name"),
                namespace: text("namespace"),
                resource_version: text("resourceVersion"),
                uid: text("uid"),
                ..ObjectMeta::default()
            }
        });
        LenientObject { metadata, body }
    }

    /// (namespace or "", name): the object's key in a store.
    pub(crate) fn key(&self) -> Key {
        Key {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl Resource for LenientObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Where an object sits in a kind's store; orders like `ClusterState`'s vectors.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub namespace: String,
    pub name: String,
}

/// A decoded, checked object of one of the watched kinds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Object {
    Node(Arc<Node>),
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    NetworkPolicy(Arc<NetworkPolicy>),
    HostNetworkPolicy(Arc<HostNetworkPolicy>),
}

/// Why an object was skipped: the field path (may be empty) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skip {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "." {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// `Pod ns/name` or `Node name`, for warnings.
pub(crate) fn label(kind: Kind, key: &Key) -> String {
    let name = if key.name.is_empty() {
        "<unnamed>"
    } else {
        &key.name
    };
    if kind.namespaced() {
        format!("{kind} {}/{name}", key.namespace)
    } else {
        format!("{kind} {name}")
    }
}

/// The typed, checked object, or why it is skipped.
pub(crate) fn decode(kind: Kind, raw: &LenientObject) -> Result<Object, Skip> {
    let mut body = raw.body.clone();
    let Some(fields) = body.as_object_mut() else {
        return Err(Skip {
            field: String::new(),
            reason: "not a JSON object".to_owned(),
        });
    };
    if let Some(Value::Object(meta)) = fields.get_mut("metadata") {
        meta.remove("managedFields");
    }
    // List items come without apiVersion/kind; the checkpoint and the typed decode want them.
    let resource = kind.api_resource();
    fields.insert("apiVersion".to_owned(), Value::String(resource.api_version));
    fields.insert("kind".to_owned(), Value::String(resource.kind));

    let at = Location {
        origin: "API server".to_owned(),
        document: 0,
        item: None,
        object: Some(label(kind, &raw.key())),
    };
    let object = match kind {
        Kind::Node => {
            let node: Node = typed(kind, body)?;
            checked(validate::node(&node, &at))?;
            Object::Node(Arc::new(node))
        }
        Kind::Namespace => Object::Namespace(Arc::new(typed(kind, body)?)),
        Kind::Pod => {
            let pod: Pod = typed(kind, body)?;
            checked(validate::pod(&pod, &at))?;
            enums::pod(&pod)?;
            Object::Pod(Arc::new(pod))
        }
        Kind::Service => {
            let service: Service = typed(kind, body)?;
            checked(validate::service(&service, &at))?;
            enums::service(&service)?;
            Object::Service(Arc::new(service))
        }
        Kind::EndpointSlice => {
            let slice: EndpointSlice = typed(kind, body)?;
            checked(validate::endpoint_slice(&slice, &at))?;
            enums::endpoint_slice(&slice)?;
            Object::EndpointSlice(Arc::new(slice))
        }
        Kind::NetworkPolicy => {
            let policy: NetworkPolicy = typed(kind, body)?;
            checked(validate::network_policy(&policy, &at))?;
            enums::network_policy(&policy)?;
            Object::NetworkPolicy(Arc::new(policy))
        }
        Kind::HostNetworkPolicy => {
            let policy: HostNetworkPolicy = typed(kind, body)?;
            checked(validate::host_policy(&policy, &at))?;
            enums::host_policy(&policy)?;
            Object::HostNetworkPolicy(Arc::new(policy))
        }
    };
    Ok(object)
}

/// Typed decode with the field path of the first error, plus the metadata rules of the file
/// reader: a name, and a namespace exactly when the kind is namespaced.
fn typed<T>(kind: Kind, body: Value) -> Result<T, Skip>
where
    T: DeserializeOwned + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    let object: T = serde_path_to_error::deserialize(body).map_err(|e| Skip {
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })?;
    let meta = object.metadata();
    if meta.name.as_deref().unwrap_or("").is_empty() {
        return Err(Skip {
            field: "metadata.name".to_owned(),
            reason: "missing".to_owned(),
        });
    }
    let has_namespace = meta.namespace.as_deref().is_some_and(|ns| !ns.is_empty());
    if has_namespace != kind.namespaced() {
        return Err(Skip {
            field: "metadata.namespace".to_owned(),
            reason: if kind.namespaced() {
                format!("missing; {kind} is namespaced")
            } else {
                format!("set, but {kind} is cluster-scoped")
            },
        });
    }
    Ok(object)
}

fn checked(result: Result<(), ClusterError>) -> Result<(), Skip> {
    result.map_err(|e| match e {
        ClusterError::Invalid { field, reason, .. }
        | ClusterError::Decode { field, reason, .. } => Skip { field, reason },
        other => Skip {
            field: String::new(),
            reason: other.to_string(),
        },
    })
}

/// Enum fields sluice's translation reads. k8s-openapi holds them as strings, so an unknown
/// value (a typo in a CRD, a value from a newer API) decodes; it is refused here instead of
/// reaching the translation with a meaning nobody chose.
mod enums {
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort,
    };

    use super::Skip;
    use crate::policy::HostNetworkPolicy;

    const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

    fn one_of(field: String, value: Option<&str>, allowed: &[&str]) -> Result<(), Skip> {
        match value {
            Some(v) if !allowed.contains(&v) => Err(Skip {
                field,
                reason: format!("unknown value {v:?}; expected one of {allowed:?}"),
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn pod(pod: &Pod) -> Result<(), Skip> {
        let Some(spec) = &pod.spec else { return Ok(()) };
        for (c, container) in spec.containers.iter().enumerate() {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                one_of(
                    format!("spec.containers[{c}].ports[{p}].protocol"),
                    port.protocol.as_deref(),
                    PROTOCOLS,
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn service(service: &Service) -> Result<(), Skip> {
        let Some(spec) = &service.spec else {
            return Ok(());
        };
        one_of(
            "spec.type".to_owned(),
            spec.type_.as_deref(),
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        )?;
        one_of(
            "spec.externalTrafficPolicy".to_owned(),
            spec.external_traffic_policy.as_deref(),
            &["Cluster", "Local"],
        )?;
        one_of(
            "spec.internalTrafficPolicy".to_owned(),
            spec.internal_traffic_policy.as_deref(),
            &["Cluster", "Local"],
        )?;
        one_of(
            "spec.sessionAffinity".to_owned(),
            spec.session_affinity.as_deref(),
            &["None", "ClientIP"],
        )?;
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            one_of(
                format!("spec.ports[{i}].protocol"),
                port.protocol.as_deref(),
                PROTOCOLS,
            )?;
        }
        Ok(())
    }

    pub(super) fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Skip> {
        one_of(
            "addressType".to_owned(),
            Some(slice.address_type.as_str()),
            &["IPv4", "IPv6", "FQDN"],
        )?;
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            one_of(
                format!("ports[{i}].protocol"),
                port.protocol.as_deref(),
                PROTOCOLS,
            )?;
        }
        Ok(())
    }

    fn rules<'a>(
        prefix: &str,
        rules: impl Iterator<Item = &'a Option<Vec<NetworkPolicyPort>>>,
    ) -> Result<(), Skip> {
        for (r, ports) in rules.enumerate() {
            for (p, port) in ports.iter().flatten().enumerate() {
                one_of(
                    format!("{prefix}[{r}].ports[{p}].protocol"),
                    port.protocol.as_deref(),
                    PROTOCOLS,
                )?;
            }
        }
        Ok(())
    }

    fn ingress_ports(
        rules: &[NetworkPolicyIngressRule],
    ) -> impl Iterator<Item = &Option<Vec<NetworkPolicyPort>>> {
        rules.iter().map(|r| &r.ports)
    }

    pub(super) fn network_policy(policy: &NetworkPolicy) -> Result<(), Skip> {
        let Some(spec) = &policy.spec else {
            return Ok(());
        };
        for (i, t) in spec.policy_types.iter().flatten().enumerate() {
            one_of(
                format!("spec.policyTypes[{i}]"),
                Some(t),
                &["Ingress", "Egress"],
            )?;
        }
        rules(
            "spec.ingress",
            ingress_ports(spec.ingress.as_deref().unwrap_or_default()),
        )?;
        rules(
            "spec.egress",
            spec.egress.iter().flatten().map(|r| &r.ports),
        )
    }

    pub(super) fn host_policy(policy: &HostNetworkPolicy) -> Result<(), Skip> {
        let Some(spec) = &policy.spec else {
            return Ok(());
        };
        rules(
            "spec.ingress",
            ingress_ports(spec.ingress.as_deref().unwrap_or_default()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lenient_object_keeps_what_the_watcher_needs_from_broken_metadata() {
        let raw: LenientObject = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "7", "labels": 5},
            "spec": "garbage"
        }))
        .expect("lenient decode never fails on an object");
        assert_eq!(raw.metadata.name.as_deref(), Some("web"));
        assert_eq!(raw.metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(raw.metadata.resource_version.as_deref(), Some("7"));
        let skip = decode(Kind::Pod, &raw).expect_err("labels: 5 cannot decode");
        assert_eq!(skip.field, "metadata.labels");
    }

    #[test]
    fn decode_names_the_field_of_a_missing_required_value() {
        let raw = LenientObject::new(json!({
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"ports": [{"protocol": "TCP"}]}
        }));
        let skip = decode(Kind::Service, &raw).expect_err("port is required");
        assert!(skip.field.starts_with("spec.ports"), "{skip}");
        assert!(skip.reason.contains("port"), "{skip}");
    }

    #[test]
    fn decode_applies_the_cluster_file_checks_and_drops_managed_fields() {
        let node = LenientObject::new(json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"}]}
        }));
        let skip = decode(Kind::Node, &node).expect_err("no InternalIP");
        assert_eq!(skip.field, "status.addresses");

        let ns = LenientObject::new(json!({
            "metadata": {"name": "prod", "managedFields": [{"manager": "kubectl"}]}
        }));
        let Ok(Object::Namespace(ns)) = decode(Kind::Namespace, &ns) else {
            panic!("a namespace decodes");
        };
        assert!(ns.metadata.managed_fields.is_none());
    }

    #[test]
    fn decode_refuses_unknown_enum_values() {
        let service = LenientObject::new(json!({
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"},
                                                      {"port": 81, "protocol": "QUIC"}]}
        }));
        let skip = decode(Kind::Service, &service).expect_err("QUIC is no protocol");
        assert_eq!(skip.field, "spec.ports[1].protocol");
        assert!(skip.reason.contains("QUIC"), "{skip}");

        let policy = LenientObject::new(json!({
            "metadata": {"name": "p", "namespace": "prod"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Sideways"]}
        }));
        let skip = decode(Kind::NetworkPolicy, &policy).expect_err("Sideways");
        assert_eq!(skip.field, "spec.policyTypes[1]");

        let slice = LenientObject::new(json!({
            "metadata": {"name": "s", "namespace": "prod"}, "endpoints": []
        }));
        let skip = decode(Kind::EndpointSlice, &slice).expect_err("addressType missing");
        assert_eq!(skip.field, "addressType");

        let good = LenientObject::new(json!({
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "SCTP"}]}
        }));
        assert!(decode(Kind::Service, &good).is_ok());
    }

    #[test]
    fn decode_refuses_a_namespace_on_a_cluster_scoped_kind() {
        let raw = LenientObject::new(json!({"metadata": {"name": "n", "namespace": "x"}}));
        let skip = decode(Kind::Namespace, &raw).expect_err("cluster-scoped");
        assert_eq!(skip.field, "metadata.namespace");
    }

    #[test]
    fn only_services_are_narrowed_by_label() {
        for kind in Kind::ALL {
            let selector = kind.label_selector();
            assert_eq!(selector.is_some(), kind == Kind::Service, "{kind}");
        }
        assert_eq!(
            Kind::Service.label_selector(),
            Some(format!("!{SERVICE_PROXY_NAME_LABEL}").as_str())
        );
        assert_eq!(
            Kind::HostNetworkPolicy.api_resource().plural,
            "hostnetworkpolicies"
        );
        assert_eq!(
            Kind::HostNetworkPolicy.api_resource().api_version,
            "policy.sluice.io/v1alpha1"
        );
    }
}
