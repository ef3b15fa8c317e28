//! [`ClusterState::to_yaml`]: the state back as a cluster file, e.g. for the agent's checkpoint
//! of the last state seen from the API server.
//!
//! Every object becomes one YAML document with `apiVersion` and `kind` first, in the order of
//! the state's fields (Nodes, Namespaces, Pods, Services, EndpointSlices, NetworkPolicies,
//! HostNetworkPolicies), so [`parse_str`](super::parse_str) reads it back to an equal state.

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::ClusterState;

/// Why a state could not be written as YAML.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {object} as YAML: {source}; this is a bug in sluice, please report it")]
pub struct ToYamlError {
    /// `Kind namespace/name` of the object.
    pub object: String,
    /// The serializer's error.
    #[source]
    pub source: serde_yaml::Error,
}

fn document<T>(object: &T, out: &mut String) -> Result<(), ToYamlError>
where
    T: Serialize
        + k8s_openapi::Resource
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    let meta = object.metadata();
    let label = || {
        format!(
            "{} {}/{}",
            T::KIND,
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        )
    };
    let error = |source| ToYamlError {
        object: label(),
        source,
    };
    let value = serde_yaml::to_value(object).map_err(error)?;
    // apiVersion and kind first (k8s-openapi types write them; HostNetworkPolicy does not).
    let mut mapping = Mapping::new();
    mapping.insert("apiVersion".into(), T::API_VERSION.into());
    mapping.insert("kind".into(), T::KIND.into());
    if let Value::Mapping(fields) = value {
        for (key, value) in fields {
            if key.as_str() != Some("apiVersion") && key.as_str() != Some("kind") {
                mapping.insert(key, value);
            }
        }
    }
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(&Value::Mapping(mapping)).map_err(error)?);
    Ok(())
}

impl ClusterState {
    /// Every object as one YAML document (`---` separated), `apiVersion`/`kind` included;
    /// [`parse_str`](super::parse_str) of the text gives back an equal state (given a state
    /// that `parse_str` accepts: e.g. every Pod's `spec.nodeName` names a Node of the state).
    pub fn to_yaml(&self) -> Result<String, ToYamlError> {
        let mut out = String::new();
        for o in &self.nodes {
            document(&**o, &mut out)?;
        }
        for o in &self.namespaces {
            document(&**o, &mut out)?;
        }
        for o in &self.pods {
            document(&**o, &mut out)?;
        }
        for o in &self.services {
            document(&**o, &mut out)?;
        }
        for o in &self.endpoint_slices {
            document(&**o, &mut out)?;
        }
        for o in &self.network_policies {
            document(&**o, &mut out)?;
        }
        for o in &self.host_policies {
            document(&**o, &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::cluster::{parse_str, ClusterState};

    const HOST_POLICY: &str = "\
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: ssh-only, annotations: {policy.sluice.io/audit: \"false\"}}
spec:
  nodeSelector: {matchLabels: {pool: workers}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
    ports: [{port: 22, protocol: TCP}, {port: 30000, endPort: 32767, protocol: UDP}]
";

    fn round_trip(text: &str, origin: &str) -> ClusterState {
        let state = parse_str(text, origin).expect("fixture parses");
        let yaml = state.to_yaml().expect("state writes");
        let again = parse_str(&yaml, "checkpoint")
            .unwrap_or_else(|e| panic!("{origin}: checkpoint does not parse: {e}\n{yaml}"));
        assert_eq!(again, state, "{origin}: round trip changed the state");
        state
    }

    #[test]
    fn every_testbed_cluster_file_round_trips() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters");
        let mut files = 0;
        let mut objects = 0;
        for entry in std::fs::read_dir(&dir).expect("testbed/clusters exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let state = round_trip(&text, &path.display().to_string());
            files += 1;
            objects += state.nodes.len()
                + state.pods.len()
                + state.services.len()
                + state.endpoint_slices.len()
                + state.network_policies.len();
        }
        assert!(
            files >= 5,
            "only {files} fixture files found in {}",
            dir.display()
        );
        assert!(objects > 20, "fixtures hold only {objects} objects");
    }

    #[test]
    fn host_policies_get_api_version_and_kind_and_round_trip() {
        let policy = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testbed/clusters/policy.yaml"),
        )
        .expect("policy fixture");
        let state = round_trip(&format!("{policy}{HOST_POLICY}"), "policy+host");
        assert_eq!(state.host_policies.len(), 1);
        let yaml = state.to_yaml().expect("writes");
        let doc = yaml
            .split("---\n")
            .find(|d| d.contains("ssh-only"))
            .expect("host policy document");
        assert!(
            doc.starts_with("apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\n"),
            "{doc}"
        );
    }

    #[test]
    fn an_empty_state_is_an_empty_file() {
        let yaml = ClusterState::default().to_yaml().expect("writes");
        assert_eq!(yaml, "");
        assert_eq!(
            parse_str(&yaml, "empty").expect("parses"),
            ClusterState::default()
        );
    }
}
