//! `STATE_ROOT/INSTANCE/state.json`: what an instance consists of, written before each thing is
//! created (so a crashed `up` can still be torn down) and after each thing is known.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Encryption, Mode, NodeHandle, PodHandle};

/// Bumped when the layout changes incompatibly.
pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a testbed state file: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has state version {found}, this sluice-testbed reads {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CNI attachment: recorded before ADD, so that teardown runs DEL even after a failed ADD (as
/// the CNI spec asks of runtimes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub key: String,
    pub node: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub netns: String,
    pub container_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub instance: String,
    pub cluster_file: PathBuf,
    pub mode: Mode,
    pub sluice_bin: PathBuf,
    pub cni_bin: PathBuf,
    pub agent_args: Vec<String>,
    /// Absent in state files written before encryption existed: none.
    #[serde(default)]
    pub encryption: Encryption,
    pub fabric_netns: String,
    pub external_netns: String,
    pub external_ip: Option<Ipv4Addr>,
    /// Every namespace this instance created (or was about to create), in creation order.
    pub namespaces: Vec<String>,
    pub nodes: Vec<NodeHandle>,
    pub attachments: Vec<Attachment>,
    pub pods: Vec<PodHandle>,
}

pub fn load(path: &Path) -> Result<State, StateError> {
    let bytes = std::fs::read(path).map_err(|source| StateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let state: State = serde_json::from_slice(&bytes).map_err(|source| StateError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            found: state.version,
        });
    }
    Ok(state)
}

/// Writes `state` atomically (temporary file, then rename).
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    let write = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|e| write(std::io::Error::other(e)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKind;

    fn sample() -> State {
        State {
            version: STATE_VERSION,
            instance: "t".into(),
            cluster_file: "/c.yaml".into(),
            mode: Mode::Sluice { workers: 2 },
            sluice_bin: "/bin/sluice".into(),
            cni_bin: "/bin/sluice-cni".into(),
            agent_args: vec!["--x".into()],
            encryption: Encryption::Wireguard,
            fabric_netns: "sl-t-fab".into(),
            external_netns: "sl-t-ext".into(),
            external_ip: Some(Ipv4Addr::new(10, 0, 0, 250)),
            namespaces: vec!["sl-t-fab".into()],
            nodes: vec![NodeHandle {
                name: "n1".into(),
                netns: "sl-t-n1".into(),
                uplink: "eth0".into(),
                ip: Ipv4Addr::new(10, 0, 0, 1),
                pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
                gateway: Ipv4Addr::new(10, 244, 1, 1),
                state_dir: "/run/x/n1".into(),
                cni_conf_dir: "/run/x/n1/net.d".into(),
                agent_socket: "/run/x/n1/sluice.sock".into(),
                agent_pid: Some(42),
                kind: NodeKind::KernelWireguard,
                agent_cluster_file: None,
                wireguard: Some(crate::wireguard::Tunnel {
                    ifname: "sabcdefw0".into(),
                    bin: "/usr/bin/wireguard-go".into(),
                    pid: Some(43),
                }),
            }],
            attachments: vec![],
            pods: vec![PodHandle {
                key: "default/a".into(),
                node: "n1".into(),
                netns: "sl-t-n1-default-a".into(),
                ip: Ipv4Addr::new(10, 244, 1, 5),
                container_id: "abc".into(),
                host_ifname: "lxc1".into(),
            }],
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample()).expect("save");
        let back = load(&path).expect("load");
        assert_eq!(back.mode, Mode::Sluice { workers: 2 });
        assert_eq!(back.encryption, Encryption::Wireguard);
        assert_eq!(back.nodes, sample().nodes);
        assert_eq!(back.pods, sample().pods);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn nodes_without_a_kind_are_sluice_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(STATE_FILE);
        save(&path, &sample()).expect("save");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(json["nodes"][0]["kind"], "kernel-wireguard", "{json}");
        let node = json["nodes"][0].as_object_mut().expect("node object");
        node.remove("kind");
        node.remove("wireguard");
        json.as_object_mut()
            .expect("state object")
            .remove("encryption");
        std::fs::write(&path, serde_json::to_vec(&json).expect("encode")).expect("write");
        let back = load(&path).expect("a state file without node kinds loads");
        assert_eq!(back.nodes[0].kind, NodeKind::Sluice);
        assert_eq!(back.nodes[0].wireguard, None);
        assert_eq!(
            back.encryption,
            Encryption::None,
            "older files: no encryption"
        );
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(STATE_FILE);
        let mut old = sample();
        old.version = STATE_VERSION + 1;
        save(&path, &old).expect("save");
        assert!(matches!(load(&path), Err(StateError::Version { .. })));
        std::fs::write(&path, b"{").expect("write");
        assert!(matches!(load(&path), Err(StateError::Decode { .. })));
    }
}
