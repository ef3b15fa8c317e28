//! Multi-document YAML to [`ClusterState`]: document splitting, `kind: List` unwrapping, typed
//! decoding with field paths, per-object validation, duplicate and cross-object checks.
//!
//! Decoding goes through `serde_yaml::Value` first: the YAML parser reports syntax errors with
//! line and column, then the typed decode (k8s-openapi's own `Deserialize`) reports type errors
//! with the field path (`serde_path_to_error`). Type errors therefore carry a field path but no
//! line number; the document index and object name locate them instead.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use super::error::{ClusterError, Location};
use super::validate;
use super::ClusterState;

/// The namespace an object without `metadata.namespace` lands in, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds sluice reads; everything else in a file is skipped with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Node,
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    HostNetworkPolicy,
}

impl Kind {
    fn from_kind(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Node" => Kind::Node,
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "NetworkPolicy" => Kind::NetworkPolicy,
            crate::policy::host::HOST_POLICY_KIND => Kind::HostNetworkPolicy,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
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

    fn api_version(self) -> &'static str {
        use k8s_openapi::Resource;
        match self {
            Kind::Node => Node::API_VERSION,
            Kind::Namespace => Namespace::API_VERSION,
            Kind::Pod => Pod::API_VERSION,
            Kind::Service => Service::API_VERSION,
            Kind::EndpointSlice => EndpointSlice::API_VERSION,
            Kind::NetworkPolicy => NetworkPolicy::API_VERSION,
            Kind::HostNetworkPolicy => crate::policy::HostNetworkPolicy::API_VERSION,
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace | Kind::HostNetworkPolicy)
    }
}

/// Parses a multi-document YAML text; `origin` names it in errors (normally the file path).
pub fn parse_str(text: &str, origin: &str) -> Result<ClusterState, ClusterError> {
    let mut builder = Builder {
        origin,
        state: ClusterState::default(),
        seen: HashMap::new(),
        pod_locations: Vec::new(),
    };
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let mut value = Value::deserialize(document).map_err(|e| yaml_error(origin, index, &e))?;
        value
            .apply_merge()
            .map_err(|e| yaml_error(origin, index, &e))?;
        builder.add_document(index, value)?;
    }
    builder.finish()
}

fn yaml_error(origin: &str, document: usize, error: &serde_yaml::Error) -> ClusterError {
    let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut reason = error.to_string();
    if line > 0 && !reason.contains(" at line ") {
        reason = format!("{reason} at line {line} column {column}");
    }
    ClusterError::Yaml {
        origin: origin.to_owned(),
        document,
        line,
        column,
        reason,
    }
}

struct Builder<'a> {
    origin: &'a str,
    state: ClusterState,
    /// (kind, namespace or "", name) -> document that defined it first.
    seen: HashMap<(Kind, String, String), usize>,
    /// Where each entry of `state.pods` came from, same order (for the `spec.nodeName` check).
    pod_locations: Vec<Location>,
}

impl Builder<'_> {
    fn location(&self, document: usize, item: Option<usize>) -> Location {
        Location {
            origin: self.origin.to_owned(),
            document,
            item,
            object: None,
        }
    }

    fn add_document(&mut self, document: usize, value: Value) -> Result<(), ClusterError> {
        let at = self.location(document, None);
        let mapping = match &value {
            // An empty document (`---` followed by nothing, or only comments).
            Value::Null => return Ok(()),
            Value::Mapping(m) => m,
            other => return Err(not_an_object(&at, "", other)),
        };
        let kind = mapping.get("kind").and_then(Value::as_str).unwrap_or("");
        let is_list = kind == "List" || (kind.ends_with("List") && mapping.contains_key("items"));
        if !is_list {
            return self.add_object(at, value);
        }
        match mapping.get("items") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let at = self.location(document, Some(i));
                    self.add_object(at, item.clone())?;
                }
                Ok(())
            }
            Some(other) => Err(not_an_object(&at, "items", other)),
        }
    }

    fn add_object(&mut self, mut at: Location, value: Value) -> Result<(), ClusterError> {
        let Value::Mapping(mapping) = &value else {
            return Err(not_an_object(&at, "", &value));
        };
        let kind_name = match mapping.get("kind") {
            Some(Value::String(k)) => k.clone(),
            None | Some(Value::Null) => return Err(ClusterError::invalid(
                &at,
                "kind",
                "missing; every object needs apiVersion and kind (e.g. apiVersion: v1, kind: Pod)",
            )),
            Some(other) => {
                return Err(ClusterError::invalid(
                    &at,
                    "kind",
                    format!("expected a string, found {}", describe(other)),
                ))
            }
        };
        let Some(kind) = Kind::from_kind(&kind_name) else {
            tracing::warn!(
                origin = %at.origin,
                document = at.document,
                item = ?at.item,
                kind = %kind_name,
                "skipping object of kind {kind_name} in {at}: sluice reads only Node, Namespace, \
                 Pod, Service, EndpointSlice, NetworkPolicy and HostNetworkPolicy"
            );
            return Ok(());
        };

        let meta = mapping.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        at.object = Some(object_label(kind, namespace, name));

        match mapping.get("apiVersion") {
            Some(Value::String(v)) if v == kind.api_version() => {}
            Some(Value::String(v)) => {
                return Err(ClusterError::invalid(
                    &at,
                    "apiVersion",
                    format!(
                        "{} must have apiVersion {}, found {v:?}",
                        kind.name(),
                        kind.api_version()
                    ),
                ))
            }
            _ => {
                return Err(ClusterError::invalid(
                    &at,
                    "apiVersion",
                    format!(
                        "missing; {} needs apiVersion: {}",
                        kind.name(),
                        kind.api_version()
                    ),
                ))
            }
        }

        match kind {
            Kind::Node => {
                let node: Node = self.decode(&at, value, kind)?;
                validate::node(&node, &at)?;
                self.remember(kind, &node.metadata, &at)?;
                self.state.nodes.push(Arc::new(node));
            }
            Kind::Namespace => {
                let ns: Namespace = self.decode(&at, value, kind)?;
                self.remember(kind, &ns.metadata, &at)?;
                self.state.namespaces.push(Arc::new(ns));
            }
            Kind::Pod => {
                let pod: Pod = self.decode(&at, value, kind)?;
                validate::pod(&pod, &at)?;
                self.remember(kind, &pod.metadata, &at)?;
                self.state.pods.push(Arc::new(pod));
                self.pod_locations.push(at);
            }
            Kind::Service => {
                let service: Service = self.decode(&at, value, kind)?;
                validate::service(&service, &at)?;
                self.remember(kind, &service.metadata, &at)?;
                self.state.services.push(Arc::new(service));
            }
            Kind::EndpointSlice => {
                let slice: EndpointSlice = self.decode(&at, value, kind)?;
                validate::endpoint_slice(&slice, &at)?;
                self.remember(kind, &slice.metadata, &at)?;
                self.state.endpoint_slices.push(Arc::new(slice));
            }
            Kind::NetworkPolicy => {
                let policy: NetworkPolicy = self.decode(&at, value, kind)?;
                validate::network_policy(&policy, &at)?;
                self.remember(kind, &policy.metadata, &at)?;
                self.state.network_policies.push(Arc::new(policy));
            }
            Kind::HostNetworkPolicy => {
                let policy: crate::policy::HostNetworkPolicy = self.decode(&at, value, kind)?;
                validate::host_policy(&policy, &at)?;
                self.remember(kind, &policy.metadata, &at)?;
                self.state.host_policies.push(Arc::new(policy));
            }
        }
        Ok(())
    }

    /// Typed decode with the field path of the first error; checks `metadata.name` and applies
    /// the default namespace.
    fn decode<T>(&self, at: &Location, value: Value, kind: Kind) -> Result<T, ClusterError>
    where
        T: DeserializeOwned + Metadata<Ty = ObjectMeta>,
    {
        let mut object: T =
            serde_path_to_error::deserialize(value).map_err(|e| ClusterError::Decode {
                at: Box::new(at.clone()),
                field: e.path().to_string(),
                reason: e.inner().to_string(),
            })?;
        let meta = object.metadata_mut();
        if meta.name.as_deref().unwrap_or("").is_empty() {
            return Err(ClusterError::invalid(
                at,
                "metadata.name",
                "missing; every object needs a name",
            ));
        }
        if kind.namespaced() {
            if meta.namespace.as_deref().unwrap_or("").is_empty() {
                meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
            }
        } else if meta.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
            return Err(ClusterError::invalid(
                at,
                "metadata.namespace",
                format!(
                    "{} is cluster-scoped and has no namespace; remove metadata.namespace",
                    kind.name()
                ),
            ));
        }
        Ok(object)
    }

    fn remember(
        &mut self,
        kind: Kind,
        meta: &ObjectMeta,
        at: &Location,
    ) -> Result<(), ClusterError> {
        let key = (
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        if let Some(&first_document) = self.seen.get(&key) {
            return Err(ClusterError::Duplicate {
                at: Box::new(at.clone()),
                first_document,
            });
        }
        self.seen.insert(key, at.document);
        Ok(())
    }

    fn finish(self) -> Result<ClusterState, ClusterError> {
        let Builder {
            mut state,
            seen,
            pod_locations,
            ..
        } = self;
        for (pod, at) in state.pods.iter().zip(&pod_locations) {
            let node_name = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("");
            if node_name.is_empty()
                || seen.contains_key(&(Kind::Node, String::new(), node_name.to_owned()))
            {
                continue;
            }
            return Err(ClusterError::invalid(
                at,
                "spec.nodeName",
                format!(
                    "refers to Node {node_name:?}, which is not in the cluster file; add the Node \
                     or fix the name"
                ),
            ));
        }
        state.sort();
        Ok(state)
    }
}

fn object_label(kind: Kind, namespace: &str, name: &str) -> String {
    let name = if name.is_empty() { "<unnamed>" } else { name };
    if kind.namespaced() {
        format!("{} {namespace}/{name}", kind.name())
    } else {
        format!("{} {name}", kind.name())
    }
}

fn not_an_object(at: &Location, field: &str, value: &Value) -> ClusterError {
    ClusterError::Decode {
        at: Box::new(at.clone()),
        field: field.to_owned(),
        reason: format!(
            "expected a Kubernetes object (a mapping with apiVersion, kind and metadata), found {}",
            describe(value)
        ),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
