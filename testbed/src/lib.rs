//! The sluice testbed: a cluster made of network namespaces, built from the same cluster file the
//! agent reads (`--source file:`), so a demo, an end-to-end test and a replay of
//! `kubectl get -o yaml` are the same thing.
//!
//! ```text
//!   sl-I-ext (external client, .250)        sl-I-fab: bridge sTAGbr
//!        eth0 ---- sTAGx ----------------------+------------------- sTAGn1 ---- eth0  sl-I-node2 ...
//!                                              +-- sTAGn0 ---- eth0 (InternalIP/24)  sl-I-node1
//!                                                                  lxc... --veth-- eth0  sl-I-node1-ns-pod
//! ```
//!
//! - One namespace per Node (uplink `eth0` with the InternalIP, `ip_forward=1`), one per Pod
//!   (by `spec.nodeName`), a fabric namespace with a bridge joining the uplinks, and an external
//!   client namespace on the same bridge. All node InternalIPs share one /24.
//! - Pods are networked only by the CNI plugin (`sluice-cni ADD`, run in the node namespace as a
//!   container runtime would), and released by `DEL` on teardown.
//! - [`Mode::Sluice`] starts `sluice run` in each node namespace and waits for its CNI config and
//!   socket (the uplink gets one queue per worker); [`Mode::Kernel`] is the baseline: the testbed
//!   answers the plugin itself and lets the node's kernel route, with the kernel's vxlan device
//!   between nodes (see [`kernel`]). In sluice mode, a Node annotated
//!   `sluice.io/testbed-dataplane: kernel` is such a kernel node among sluice nodes
//!   ([`NodeKind`]), for interop with the kernel's vxlan device (`clusters/mixed.yaml`);
//!   `kernel-wireguard` is such a node whose vxlan packets travel in a wireguard-go tunnel
//!   ([`wireguard`], `clusters/wireguard-mixed.yaml`).
//! - WireGuard ([`Encryption`]): a Node's testbed-only private key annotation is written to its
//!   state directory as `wireguard.key` before anything runs on the node; with
//!   [`Encryption::Wireguard`] sluice agents get `--encryption wireguard`, and in
//!   [`Mode::Kernel`] every node becomes a kernel-wireguard node (the wireguard-go baseline).
//!
//! Invariants: every name carries the instance name ([`names`]); everything is recorded in
//! `STATE_ROOT/INSTANCE/state.json` before it is created; a [`Testbed`] returned by
//! [`Testbed::up`] tears everything down when dropped (unless [`Testbed::keep`]), and a failed
//! `up` leaves nothing behind. Processes are stopped by pid only.
pub mod agent;
pub mod cmd;
pub mod cni;
pub mod kernel;
pub mod names;
pub mod nft;
pub mod plan;
pub mod state;
pub mod wireguard;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use control::api::CNI_CONF_NAME;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use crate::{
    agent::AgentError, cmd::CmdError, cni::CniError, kernel::KernelError, names::NameError,
    plan::PlanError, state::StateError, wireguard::WireguardError,
};
use crate::{
    names::Names,
    plan::{Plan, PlanPod},
    state::{Attachment, State},
};

/// Default root of the instances' state directories.
pub const DEFAULT_STATE_ROOT: &str = "/run/sluice-testbed";
/// Name of the node uplink inside each node namespace.
pub const UPLINK: &str = "eth0";
/// MTU of the fabric veths (the kernel's default for veth).
pub const FABRIC_MTU: u32 = 1500;
/// Binary names looked up next to the running executable.
pub const SLUICE_BIN_NAME: &str = "sluice";
pub const CNI_BIN_NAME: &str = "sluice-cni";

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("cluster file {path}: {source}")]
    ClusterFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "testbed instance {instance} already exists ({dir} or its namespaces are present): run \
         `sluice-testbed down` for it first"
    )]
    AlreadyExists { instance: String, dir: PathBuf },
    #[error("no testbed instance {instance}: {dir} does not exist (was it brought up with another --instance?)")]
    NotFound { instance: String, dir: PathBuf },
    #[error("{what} {path} does not exist: {hint}")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Wireguard(#[from] WireguardError),
    #[error(
        "cluster file {path}: node {node} runs WireGuard ({kind} node, encryption {encryption}) \
         but has no annotation {annotation}: give it a key pair (`wg genkey | tee private | wg \
         pubkey`) in {annotation} and {public}, or bring the testbed up without encryption",
        annotation = plan::WG_PRIVATE_KEY_ANNOTATION,
        public = control::wg::PUBLIC_KEY_ANNOTATION
    )]
    NoWgKey {
        path: PathBuf,
        node: String,
        kind: &'static str,
        encryption: &'static str,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("testbed instance {instance} has no pod {key} (pods: {known}); pods are named namespace/name")]
    UnknownPod {
        instance: String,
        key: String,
        known: String,
    },
    #[error("testbed instance {instance} has no node {node} (nodes: {known})")]
    UnknownNode {
        instance: String,
        node: String,
        known: String,
    },
    #[error("node {node} has no running sluice agent")]
    NoAgent { node: String },
    #[error("the sluice agent of node {node} is already running (pid {pid}); stop it first")]
    AgentRunning { node: String, pid: u32 },
    #[error(
        "hot restart of node {node}: the new agent is ready but the old one (pid {pid}) did not \
         exit by itself (killed); see both agents' lines in the node's agent.log"
    )]
    HandoverLeftOldAgent { node: String, pid: u32 },
    #[error("testbed instance {instance} runs in kernel mode: it has no sluice agents")]
    NotSluiceMode { instance: String },
    #[error(
        "node {node} is a {kind} node (annotation {}: {kind}): it has no sluice agent",
        plan::DATAPLANE_ANNOTATION
    )]
    KernelNode { node: String, kind: &'static str },
    #[error(
        "agent cluster file given for node {node}, which is not a sluice node of {path} \
         (sluice nodes: {known})"
    )]
    AgentFileNode {
        node: String,
        path: PathBuf,
        known: String,
    },
    #[error("empty command: give a program to run")]
    EmptyCommand,
    #[error("running `{command}`: {source}")]
    Exec {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tearing down testbed instance {instance} left things behind (run `down` again):\n{problems}")]
    Teardown { instance: String, problems: String },
}

/// Who moves pod packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Mode {
    /// A sluice agent per node, with this many workers.
    Sluice { workers: u32 },
    /// No agent: kernel routing in the node namespaces (the baseline).
    Kernel,
}

/// What moves one node's pod packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A sluice agent (in [`Mode::Sluice`]).
    #[default]
    Sluice,
    /// No agent: kernel routing and the kernel's vxlan device ([`kernel`]). Every node in
    /// [`Mode::Kernel`]; in sluice mode, a node annotated [`plan::DATAPLANE_ANNOTATION`]`: kernel`.
    Kernel,
    /// A kernel node whose vxlan packets to other nodes travel in a wireguard-go tunnel
    /// ([`wireguard`]): annotated [`plan::DATAPLANE_ANNOTATION`]`: kernel-wireguard`, or every
    /// node in [`Mode::Kernel`] with [`Encryption::Wireguard`].
    #[serde(rename = "kernel-wireguard")]
    KernelWireguard,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Sluice => "sluice",
            NodeKind::Kernel => "kernel",
            NodeKind::KernelWireguard => "kernel-wireguard",
        }
    }

    /// Whether the node's kernel routes its pods (no sluice agent).
    pub fn is_kernel(self) -> bool {
        matches!(self, NodeKind::Kernel | NodeKind::KernelWireguard)
    }
}

/// Whether pod traffic between nodes is encrypted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// VXLAN in clear (the default).
    #[default]
    None,
    /// WireGuard between nodes (UDP 51871): sluice agents run with `--encryption wireguard`;
    /// in [`Mode::Kernel`] every node is a [`NodeKind::KernelWireguard`] node.
    Wireguard,
}

impl Encryption {
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Wireguard => "wireguard",
        }
    }
}

/// Where the sluice agents read the cluster state from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AgentSource {
    /// `--source file:` the instance's cluster file (or the node's
    /// [`UpOptions::agent_cluster_files`] entry), re-read on change.
    #[default]
    File,
    /// `--source kubernetes --api-server URL`: an API server (in tests, `sluice-fake-apiserver`
    /// serving the same objects, for instance in the external client's namespace, which every
    /// node reaches over the fabric). The server must answer by the time the agents start: with
    /// no checkpoint in its state directory, an agent is ready only after its first full sync.
    Kubernetes { api_server: String },
}

impl AgentSource {
    /// The `sluice run` arguments that select this source, when it is not the file
    /// ([`agent::start`] adds `--source file:` only when the arguments have no `--source`).
    pub fn agent_args(&self) -> Vec<String> {
        match self {
            AgentSource::File => Vec::new(),
            AgentSource::Kubernetes { api_server } => vec![
                "--source".into(),
                "kubernetes".into(),
                "--api-server".into(),
                api_server.clone(),
            ],
        }
    }
}

/// What [`Testbed::up`] builds and with which binaries.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub cluster_file: PathBuf,
    /// Defaults to a name derived from the cluster file's canonical path.
    pub instance: Option<String>,
    pub mode: Mode,
    pub sluice_bin: PathBuf,
    pub cni_bin: PathBuf,
    pub state_root: PathBuf,
    /// Appended to every `sluice run` command line.
    pub agent_args: Vec<String>,
    /// Per node name: the file its agent reads (`--source file:`) instead of the cluster file,
    /// so a test can change one agent's view of the cluster (nodes joining and leaving) while
    /// the testbed itself stays as built.
    pub agent_cluster_files: BTreeMap<String, PathBuf>,
    /// [`Encryption::None`] by default. Every node that then runs WireGuard needs its keys in
    /// the cluster file ([`plan::WG_PRIVATE_KEY_ANNOTATION`]).
    pub encryption: Encryption,
    /// [`AgentSource::File`] by default. Recorded as agent arguments, so agents started again
    /// ([`Testbed::start_agent`]) read the same source.
    pub source: AgentSource,
}

impl UpOptions {
    /// Sluice mode with one worker; binaries looked up in the directory of the running
    /// executable, then its parent (where `cargo test` executables find the workspace's
    /// binaries: `target/debug/deps/..` -> `target/debug/`); state under [`DEFAULT_STATE_ROOT`].
    pub fn new(cluster_file: impl Into<PathBuf>) -> Self {
        Self {
            cluster_file: cluster_file.into(),
            instance: None,
            mode: Mode::Sluice { workers: 1 },
            sluice_bin: find_next_to_exe(SLUICE_BIN_NAME),
            cni_bin: find_next_to_exe(CNI_BIN_NAME),
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            agent_args: Vec::new(),
            agent_cluster_files: BTreeMap::new(),
            encryption: Encryption::None,
            source: AgentSource::File,
        }
    }
}

/// `name` in the running executable's directory or its parent, whichever has it (the former if
/// neither does, so the error names a sensible path).
pub fn find_next_to_exe(name: &str) -> PathBuf {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return PathBuf::from(name);
    };
    let candidates = [Some(dir.join(name)), dir.parent().map(|p| p.join(name))];
    candidates
        .iter()
        .flatten()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| dir.join(name))
}

/// One node of a running testbed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHandle {
    pub name: String,
    pub netns: String,
    /// The uplink inside the node namespace (`eth0`).
    pub uplink: String,
    /// The node's InternalIP (on the uplink, /24).
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    /// The pods' gateway: first address of the pod CIDR.
    pub gateway: Ipv4Addr,
    /// `STATE_ROOT/INSTANCE/NODE`: the agent's `--state-dir`.
    pub state_dir: PathBuf,
    /// `STATE_DIR/net.d`: the CNI config directory.
    pub cni_conf_dir: PathBuf,
    pub agent_socket: PathBuf,
    pub agent_pid: Option<u32>,
    /// Absent in state files written before node kinds existed: sluice.
    #[serde(default)]
    pub kind: NodeKind,
    /// The file the agent reads, when not the instance's cluster file
    /// ([`UpOptions::agent_cluster_files`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cluster_file: Option<PathBuf>,
    /// A kernel-wireguard node's wireguard-go ([`wireguard`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<wireguard::Tunnel>,
}

/// One pod of a running testbed, as its CNI ADD made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodHandle {
    /// `namespace/name`.
    pub key: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub container_id: String,
    /// Host side of the pod's veth, in the node namespace.
    pub host_ifname: String,
}

/// A running testbed instance. See the crate doc for what tears it down.
pub struct Testbed {
    state: State,
    dir: PathBuf,
    names: Names,
    /// Agents started by this process (reaped on stop); others are known by pid only.
    agents: HashMap<String, Child>,
    kernel_servers: Vec<kernel::KernelServer>,
    /// wireguard-go processes started by this process, by node (reaped on stop).
    tunnels: HashMap<String, Child>,
    teardown_on_drop: bool,
}

impl Testbed {
    /// Builds the cluster described by `opts.cluster_file`. On error, everything created so far
    /// is torn down. Refuses an instance that already exists.
    pub fn up(opts: UpOptions) -> Result<Testbed, TestbedError> {
        let cluster_file = std::fs::canonicalize(&opts.cluster_file).map_err(|source| {
            TestbedError::ClusterFile {
                path: opts.cluster_file.clone(),
                source,
            }
        })?;
        let plan = plan::load(&cluster_file)?;
        let instance = match &opts.instance {
            Some(name) => {
                names::validate_instance(name)?;
                name.clone()
            }
            None => names::instance_for_path(&cluster_file),
        };
        let names = Names::new(&instance);
        let mut agent_files = BTreeMap::new();
        for (node, file) in &opts.agent_cluster_files {
            let sluice_nodes = || {
                plan.nodes
                    .iter()
                    .filter(|n| node_kind(opts.mode, opts.encryption, n.kind) == NodeKind::Sluice)
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
            };
            if !sluice_nodes().contains(&node.as_str()) {
                return Err(TestbedError::AgentFileNode {
                    node: node.clone(),
                    path: cluster_file.clone(),
                    known: sluice_nodes().join(", "),
                });
            }
            let canonical =
                std::fs::canonicalize(file).map_err(|source| TestbedError::ClusterFile {
                    path: file.clone(),
                    source,
                })?;
            agent_files.insert(node.clone(), canonical);
        }
        for node in &plan.nodes {
            let kind = node_kind(opts.mode, opts.encryption, node.kind);
            let runs_wireguard = kind == NodeKind::KernelWireguard
                || (kind == NodeKind::Sluice && opts.encryption == Encryption::Wireguard);
            if runs_wireguard && node.wireguard.private_key.is_none() {
                return Err(TestbedError::NoWgKey {
                    path: cluster_file.clone(),
                    node: node.name.clone(),
                    kind: kind.as_str(),
                    encryption: opts.encryption.as_str(),
                });
            }
        }
        // Every name is computed (and checked) before anything is created.
        for pod in &plan.pods {
            names.pod_netns(&pod.node, &pod.namespace, &pod.name)?;
        }
        let cni_bin = existing_binary(
            "CNI plugin",
            &opts.cni_bin,
            "build it with `cargo build -p control --bin sluice-cni` or pass --cni",
        )?;
        let sluice_bin = match opts.mode {
            Mode::Sluice { .. } => existing_binary(
                "sluice agent",
                &opts.sluice_bin,
                "build it with `cargo build -p control --bin sluice` or pass --sluice",
            )?,
            Mode::Kernel => opts.sluice_bin.clone(),
        };
        let dir = opts.state_root.join(&instance);
        let exists = || TestbedError::AlreadyExists {
            instance: instance.clone(),
            dir: dir.clone(),
        };
        if cmd::netns_exists(&names.fabric_netns()) {
            return Err(exists());
        }
        std::fs::create_dir_all(&opts.state_root).map_err(|source| TestbedError::Io {
            what: "creating the state root",
            path: opts.state_root.clone(),
            source,
        })?;
        // Creating the directory claims the instance (atomically, against a concurrent `up`).
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
            Err(source) => {
                return Err(TestbedError::Io {
                    what: "creating the state directory",
                    path: dir,
                    source,
                })
            }
        }
        let state = State {
            version: state::STATE_VERSION,
            instance: instance.clone(),
            cluster_file,
            mode: opts.mode,
            sluice_bin,
            cni_bin,
            agent_args: [opts.source.agent_args(), opts.agent_args.clone()].concat(),
            encryption: opts.encryption,
            fabric_netns: names.fabric_netns(),
            external_netns: names.external_netns(),
            external_ip: None,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            attachments: Vec::new(),
            pods: Vec::new(),
        };
        let mut testbed = Testbed {
            state,
            dir,
            names,
            agents: HashMap::new(),
            kernel_servers: Vec::new(),
            tunnels: HashMap::new(),
            teardown_on_drop: true,
        };
        testbed.save()?;
        testbed.build(&plan, &agent_files)?;
        Ok(testbed)
    }

    /// Opens an existing instance from its `state.json`. The handle does not tear the instance
    /// down when dropped; call [`Testbed::down`] for that.
    pub fn open(state_root: &Path, instance: &str) -> Result<Testbed, TestbedError> {
        names::validate_instance(instance)?;
        let dir = state_root.join(instance);
        let path = dir.join(state::STATE_FILE);
        if !path.exists() {
            return Err(TestbedError::NotFound {
                instance: instance.to_string(),
                dir,
            });
        }
        let state = state::load(&path)?;
        Ok(Testbed {
            names: Names::new(&state.instance),
            state,
            dir,
            agents: HashMap::new(),
            kernel_servers: Vec::new(),
            tunnels: HashMap::new(),
            teardown_on_drop: false,
        })
    }

    /// The instance name `up` derives for a cluster file (when no `--instance` is given).
    pub fn instance_for_file(path: &Path) -> Result<String, TestbedError> {
        let canonical =
            std::fs::canonicalize(path).map_err(|source| TestbedError::ClusterFile {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(names::instance_for_path(&canonical))
    }

    /// Leaves the instance running when this handle goes away (agents keep running).
    pub fn keep(mut self) {
        self.teardown_on_drop = false;
    }

    /// Runs CNI DEL for every pod, stops the agents, deletes all namespaces and the state
    /// directory. Works on half-built instances; DEL failures are warnings (the namespaces go
    /// anyway), anything left behind is an error.
    pub fn down(mut self) -> Result<(), TestbedError> {
        self.teardown_on_drop = false;
        self.teardown()
    }

    pub fn instance(&self) -> &str {
        &self.state.instance
    }
    pub fn mode(&self) -> Mode {
        self.state.mode
    }
    pub fn encryption(&self) -> Encryption {
        self.state.encryption
    }
    pub fn cluster_file(&self) -> &Path {
        &self.state.cluster_file
    }
    /// `STATE_ROOT/INSTANCE`.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }
    pub fn fabric_netns(&self) -> &str {
        &self.state.fabric_netns
    }
    pub fn external_netns(&self) -> &str {
        &self.state.external_netns
    }
    /// The external client's address (`.250` of the nodes' /24), once created.
    pub fn external_ip(&self) -> Option<Ipv4Addr> {
        self.state.external_ip
    }
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.state.nodes
    }
    pub fn pods(&self) -> &[PodHandle] {
        &self.state.pods
    }

    pub fn node(&self, name: &str) -> Result<&NodeHandle, TestbedError> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| TestbedError::UnknownNode {
                instance: self.state.instance.clone(),
                node: name.to_string(),
                known: self
                    .state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, key: &str) -> Result<&PodHandle, TestbedError> {
        self.state
            .pods
            .iter()
            .find(|p| p.key == key)
            .ok_or_else(|| TestbedError::UnknownPod {
                instance: self.state.instance.clone(),
                key: key.to_string(),
                known: self
                    .state
                    .pods
                    .iter()
                    .map(|p| p.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A command running `argv` in the pod's namespace, to configure and run as the caller
    /// likes (for long-running servers whose output nobody reads, use this with null stdio).
    pub fn pod_command(&self, key: &str, argv: &[&str]) -> Result<Command, TestbedError> {
        let pod = self.pod(key)?;
        netns_command(&pod.netns, argv)
    }

    /// Runs `argv` in the pod's namespace to completion, capturing its output.
    pub fn exec_in_pod(&self, key: &str, argv: &[&str]) -> Result<Output, TestbedError> {
        output(self.pod_command(key, argv)?)
    }

    /// Starts `argv` in the pod's namespace: stdin null, stdout and stderr piped (read them, or
    /// a chatty program blocks once the pipe is full; [`Testbed::pod_command`] gives control).
    pub fn spawn_in_pod(&self, key: &str, argv: &[&str]) -> Result<Child, TestbedError> {
        let mut command = self.pod_command(key, argv)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command.spawn().map_err(|source| TestbedError::Exec {
            command: cmd::describe(&command),
            source,
        })
    }

    /// Runs `argv` in the node's namespace to completion, capturing its output.
    pub fn exec_in_node(&self, node: &str, argv: &[&str]) -> Result<Output, TestbedError> {
        let node = self.node(node)?;
        output(netns_command(&node.netns, argv)?)
    }

    /// Runs `argv` in the external client's namespace to completion, capturing its output.
    pub fn exec_in_external(&self, argv: &[&str]) -> Result<Output, TestbedError> {
        output(netns_command(&self.state.external_netns, argv)?)
    }

    /// Sends `signal` to the node's agent (by pid) and waits until it has exited (SIGKILL after
    /// [`agent::STOP_GRACE`]).
    pub fn stop_agent(&mut self, node: &str, signal: i32) -> Result<(), TestbedError> {
        let index = self.node_index(node)?;
        let handle = &self.state.nodes[index];
        let pid = handle.agent_pid.ok_or_else(|| TestbedError::NoAgent {
            node: node.to_string(),
        })?;
        agent::stop(
            node,
            pid,
            self.agents.get_mut(node),
            &self.state.sluice_bin,
            signal,
        )?;
        self.agents.remove(node);
        self.state.nodes[index].agent_pid = None;
        self.save()
    }

    /// Starts the node's agent again and waits until it is ready (config written, socket
    /// answering).
    pub fn start_agent(&mut self, node: &str) -> Result<(), TestbedError> {
        let child = self.spawn_agent(node, false)?;
        let index = self.node_index(node)?;
        self.state.nodes[index].agent_pid = Some(child.id());
        self.agents.insert(node.to_string(), child);
        self.save()
    }

    /// A hot restart: starts a second agent for the node while its agent runs. The new one
    /// takes the running one's dataplane over (`sluice run` does it by itself when an agent
    /// serves the state directory's `handover.sock`), is waited for until ready, and the old
    /// one must then exit by itself (it is reaped; SIGKILL after [`agent::STOP_GRACE`] counts
    /// as a failure). Returns the instants the new agent was seen ready and the old one gone.
    pub fn hot_restart_agent(
        &mut self,
        node: &str,
    ) -> Result<(std::time::Instant, std::time::Instant), TestbedError> {
        let index = self.node_index(node)?;
        let old_pid = self.state.nodes[index]
            .agent_pid
            .ok_or_else(|| TestbedError::NoAgent {
                node: node.to_string(),
            })?;
        let mut old_child = self.agents.remove(node);
        let new_child = match self.spawn_agent(node, true) {
            Ok(c) => c,
            Err(e) => {
                if let Some(c) = old_child {
                    self.agents.insert(node.to_string(), c);
                }
                return Err(e);
            }
        };
        let ready = std::time::Instant::now();
        self.state.nodes[index].agent_pid = Some(new_child.id());
        self.agents.insert(node.to_string(), new_child);
        self.save()?;
        let deadline = std::time::Instant::now() + agent::STOP_GRACE;
        loop {
            let gone = match old_child.as_mut() {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => !agent::runs_binary(old_pid, &self.state.sluice_bin),
            };
            if gone {
                return Ok((ready, std::time::Instant::now()));
            }
            if std::time::Instant::now() >= deadline {
                let sluice_bin = self.state.sluice_bin.clone();
                agent::stop(
                    node,
                    old_pid,
                    old_child.as_mut(),
                    &sluice_bin,
                    libc::SIGKILL,
                )?;
                return Err(TestbedError::HandoverLeftOldAgent {
                    node: node.to_string(),
                    pid: old_pid,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Starts the node's agent process and waits until it is ready; `alongside`: while its
    /// current agent runs (a hot restart), else refused when one runs.
    fn spawn_agent(&mut self, node: &str, alongside: bool) -> Result<Child, TestbedError> {
        let Mode::Sluice { workers } = self.state.mode else {
            return Err(TestbedError::NotSluiceMode {
                instance: self.state.instance.clone(),
            });
        };
        let index = self.node_index(node)?;
        let handle = &self.state.nodes[index];
        if handle.kind.is_kernel() {
            return Err(TestbedError::KernelNode {
                node: node.to_string(),
                kind: handle.kind.as_str(),
            });
        }
        if let (Some(pid), false) = (handle.agent_pid, alongside) {
            let alive = match self.agents.get_mut(node) {
                Some(child) => matches!(child.try_wait(), Ok(None)),
                None => agent::runs_binary(pid, &self.state.sluice_bin),
            };
            if alive {
                return Err(TestbedError::AgentRunning {
                    node: node.to_string(),
                    pid,
                });
            }
        }
        // Agents of different nodes share this one machine: spread their workers over the
        // cores (node i's worker w on core ncpus-1-((i*workers+w) % ncpus)) instead of every
        // agent's `--cores auto` putting worker 0 of every node on the same last core.
        let mut extra_args = self.state.agent_args.clone();
        if self.state.encryption == Encryption::Wireguard
            && !extra_args.iter().any(|a| a.starts_with("--encryption"))
        {
            extra_args.push("--encryption".into());
            extra_args.push(Encryption::Wireguard.as_str().into());
        }
        if !extra_args.iter().any(|a| a.starts_with("--cores")) {
            let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let cores: Vec<String> = (0..workers as usize)
                .map(|w| (ncpus - 1 - ((index * workers as usize + w) % ncpus)).to_string())
                .collect();
            extra_args.push("--cores".into());
            extra_args.push(cores.join(","));
        }
        let child = agent::start(&agent::AgentSpec {
            node: &handle.name,
            netns: &handle.netns,
            sluice_bin: &self.state.sluice_bin,
            cluster_file: handle
                .agent_cluster_file
                .as_deref()
                .unwrap_or(&self.state.cluster_file),
            state_dir: &handle.state_dir,
            cni_conf_dir: &handle.cni_conf_dir,
            workers,
            extra_args: &extra_args,
        })?;
        Ok(child)
    }

    /// Whether the node's agent process is alive.
    pub fn agent_alive(&mut self, node: &str) -> Result<bool, TestbedError> {
        let index = self.node_index(node)?;
        let Some(pid) = self.state.nodes[index].agent_pid else {
            return Ok(false);
        };
        Ok(match self.agents.get_mut(node) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => agent::runs_binary(pid, &self.state.sluice_bin),
        })
    }

    fn node_index(&self, node: &str) -> Result<usize, TestbedError> {
        self.node(node)?;
        Ok(self
            .state
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_default())
    }

    fn save(&self) -> Result<(), TestbedError> {
        state::save(&self.dir.join(state::STATE_FILE), &self.state)?;
        Ok(())
    }

    /// Records a namespace, then creates it (with `lo` up).
    fn create_netns(&mut self, name: &str) -> Result<(), TestbedError> {
        self.state.namespaces.push(name.to_string());
        self.save()?;
        cmd::netns_add(name)?;
        Ok(())
    }

    fn build(
        &mut self,
        plan: &Plan,
        agent_files: &BTreeMap<String, PathBuf>,
    ) -> Result<(), TestbedError> {
        let fabric = self.state.fabric_netns.clone();
        let bridge = self.names.bridge();
        self.create_netns(&fabric)?;
        cmd::ip_in(&fabric, &["link", "add", &bridge, "type", "bridge"])?;
        cmd::ip_in(&fabric, &["link", "set", &bridge, "up"])?;

        let external = self.state.external_netns.clone();
        self.create_netns(&external)?;
        self.uplink(&external, &self.names.external_veth(), plan.external_ip, 1)?;
        // A veth hands its peer frames whose TCP/UDP checksum is still partial (offload). The
        // dataplane forwards what AF_XDP gives it, so the external client (the stand-in for a
        // host behind a real NIC, which always delivers full checksums) computes them itself,
        // as the CNI plugin does for pods.
        cmd::run(
            "ip",
            &[
                "netns", "exec", &external, "ethtool", "-K", UPLINK, "tx", "off",
            ],
        )?;
        self.state.external_ip = Some(plan.external_ip);
        self.save()?;

        for (index, node) in plan.nodes.iter().enumerate() {
            let netns = self.names.node_netns(&node.name)?;
            let kind = node_kind(self.state.mode, self.state.encryption, node.kind);
            // Every worker gets a queue on a sluice node's uplink.
            let queues = match (self.state.mode, kind) {
                (Mode::Sluice { workers }, NodeKind::Sluice) => workers.max(1),
                _ => 1,
            };
            self.create_netns(&netns)?;
            self.uplink(&netns, &self.names.fabric_veth(index), node.ip, queues)?;
            cmd::sysctl_in(&netns, "net.ipv4.ip_forward", "1")?;
            let state_dir = self.dir.join(names::sanitize(&node.name));
            let cni_conf_dir = state_dir.join("net.d");
            std::fs::create_dir_all(&cni_conf_dir).map_err(|source| TestbedError::Io {
                what: "creating the node's CNI config directory",
                path: cni_conf_dir.clone(),
                source,
            })?;
            self.state.nodes.push(NodeHandle {
                name: node.name.clone(),
                netns,
                uplink: UPLINK.to_string(),
                ip: node.ip,
                pod_cidr: node.pod_cidr,
                gateway: node.gateway,
                agent_socket: state_dir.join(control::api::SOCKET_NAME),
                state_dir,
                cni_conf_dir,
                agent_pid: None,
                kind,
                agent_cluster_file: agent_files.get(&node.name).cloned(),
                wireguard: None,
            });
            self.save()?;
            if let Some(key) = &node.wireguard.private_key {
                let state_dir = &self.state.nodes[index].state_dir;
                wireguard::write_key_file(&node.name, state_dir, key)?;
            }
        }

        for node in self.state.nodes.iter().filter(|n| n.kind.is_kernel()) {
            let mtu = match node.kind {
                NodeKind::KernelWireguard => wireguard::pod_mtu(FABRIC_MTU),
                _ => kernel::pod_mtu(FABRIC_MTU),
            };
            let conf = kernel::conf(node.pod_cidr, node.gateway, &node.state_dir, mtu);
            let path = node.cni_conf_dir.join(CNI_CONF_NAME);
            let json = serde_json::to_vec_pretty(&conf).map_err(|e| TestbedError::Io {
                what: "encoding the CNI config",
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            std::fs::write(&path, json).map_err(|source| TestbedError::Io {
                what: "writing the CNI config",
                path: path.clone(),
                source,
            })?;
        }
        self.start_tunnels(plan)?;
        if self.state.nodes.iter().any(|n| n.kind.is_kernel()) {
            // Peers are all nodes, sluice ones included, with the VTEP MACs the agents use.
            let overlay: Vec<kernel::OverlayNode<'_>> = self
                .state
                .nodes
                .iter()
                .zip(&plan.nodes)
                .map(|(n, p)| kernel::OverlayNode {
                    netns: &n.netns,
                    ip: n.ip,
                    pod_cidr: n.pod_cidr,
                    vtep_mac: &p.vtep_mac,
                    kind: n.kind,
                })
                .collect();
            kernel::link_nodes(&overlay, UPLINK, FABRIC_MTU)?;
            self.start_kernel_servers()?;
        }
        let sluice_nodes: Vec<String> = self
            .state
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Sluice)
            .map(|n| n.name.clone())
            .collect();
        for node in sluice_nodes {
            self.start_agent(&node)?;
        }

        // Pods with an address from the file first: a pod the IPAM picks for (round-robin from
        // .2, or after the last request) must not take an address a later pod asks for.
        let (requesting, picked): (Vec<&PlanPod>, Vec<&PlanPod>) =
            plan.pods.iter().partition(|p| p.requested_ip.is_some());
        for pod in requesting.into_iter().chain(picked) {
            self.add_pod(pod)?;
        }
        // Listed (state, `status`) in the file's order, as before.
        let order = |key: &str| plan.pods.iter().position(|p| p.key() == key);
        self.state.pods.sort_by_key(|p| order(&p.key));
        self.save()
    }

    /// A veth from the fabric bridge to `eth0` in `netns`, with `ip/24` on it and `queues` rx
    /// and tx queues on the `eth0` side.
    fn uplink(
        &self,
        netns: &str,
        fabric_side: &str,
        ip: Ipv4Addr,
        queues: u32,
    ) -> Result<(), TestbedError> {
        let fabric = &self.state.fabric_netns;
        let bridge = self.names.bridge();
        let queues = queues.to_string();
        cmd::ip_in(
            fabric,
            // The kernel makes the queues active (not just possible) only when the device
            // being created is given a count, so both sides get one.
            &[
                "link",
                "add",
                fabric_side,
                "numrxqueues",
                &queues,
                "numtxqueues",
                &queues,
                "type",
                "veth",
                "peer",
                "name",
                UPLINK,
                "netns",
                netns,
                "numrxqueues",
                &queues,
                "numtxqueues",
                &queues,
            ],
        )?;
        cmd::ip_in(
            fabric,
            &["link", "set", fabric_side, "master", &bridge, "up"],
        )?;
        let address = format!("{ip}/{}", plan::FABRIC_PREFIX_LEN);
        cmd::ip_in(netns, &["addr", "add", &address, "dev", UPLINK])?;
        cmd::ip_in(netns, &["link", "set", UPLINK, "up"])?;
        Ok(())
    }

    /// Starts and configures wireguard-go on every kernel-wireguard node ([`wireguard`]), with
    /// every other node that has a public key as a peer. Each pid is recorded before waiting.
    fn start_tunnels(&mut self, plan: &Plan) -> Result<(), TestbedError> {
        let bin = wireguard::find_in_path(wireguard::WIREGUARD_GO);
        for index in 0..self.state.nodes.len() {
            let node = self.state.nodes[index].clone();
            if node.kind != NodeKind::KernelWireguard {
                continue;
            }
            let bin = bin.clone().ok_or_else(|| WireguardError::NotInstalled {
                node: node.name.clone(),
            })?;
            let ifname = self.names.wg_interface(index);
            self.state.nodes[index].wireguard = Some(wireguard::Tunnel {
                ifname: ifname.clone(),
                bin: bin.clone(),
                pid: None,
            });
            self.save()?;
            let log = node.state_dir.join("wireguard-go.log");
            let mut child = wireguard::spawn(&node.name, &node.netns, &bin, &ifname, &log)?;
            if let Some(t) = self.state.nodes[index].wireguard.as_mut() {
                t.pid = Some(child.id());
            }
            let ready = wireguard::wait_ready(&node.name, &node.netns, &ifname, &log, &mut child);
            self.tunnels.insert(node.name.clone(), child);
            self.save()?;
            ready?;
            let peers: Vec<wireguard::Peer> = plan
                .nodes
                .iter()
                .filter(|p| p.name != node.name)
                .filter_map(|p| {
                    Some(wireguard::Peer {
                        ip: p.ip,
                        public_key: p.wireguard.public_key.clone()?,
                    })
                })
                .collect();
            wireguard::configure(
                &node.name,
                &node.netns,
                &ifname,
                &control::wg::keys::key_path(&node.state_dir),
                &peers,
                FABRIC_MTU,
            )?;
        }
        Ok(())
    }

    fn start_kernel_servers(&mut self) -> Result<(), TestbedError> {
        if !self.kernel_servers.is_empty() {
            return Ok(());
        }
        for node in self.state.nodes.iter().filter(|n| n.kind.is_kernel()) {
            let server =
                kernel::KernelServer::start(&node.agent_socket, &node.netns, node.gateway)?;
            self.kernel_servers.push(server);
        }
        Ok(())
    }

    fn add_pod(&mut self, pod: &PlanPod) -> Result<(), TestbedError> {
        let node = self.node(&pod.node)?.clone();
        let netns = self
            .names
            .pod_netns(&node.name, &pod.namespace, &pod.name)?;
        self.create_netns(&netns)?;
        let attachment = Attachment {
            key: pod.key(),
            node: node.name.clone(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            netns: netns.clone(),
            container_id: self.names.container_id(&pod.namespace, &pod.name),
        };
        self.state.attachments.push(attachment.clone());
        self.save()?;
        let conf_path = node.cni_conf_dir.join(CNI_CONF_NAME);
        let conf = std::fs::read(&conf_path).map_err(|source| TestbedError::Io {
            what: "reading the node's CNI config",
            path: conf_path,
            source,
        })?;
        let added = cni::add(&cni::Invocation {
            requested_ip: pod.requested_ip,
            ..self.invocation(&node, &attachment, &conf)
        })?;
        self.state.pods.push(PodHandle {
            key: attachment.key,
            node: node.name,
            netns,
            ip: added.ip,
            container_id: attachment.container_id,
            host_ifname: added.host_ifname,
        });
        self.save()
    }

    fn invocation<'a>(
        &'a self,
        node: &'a NodeHandle,
        attachment: &'a Attachment,
        conf: &'a [u8],
    ) -> cni::Invocation<'a> {
        cni::Invocation {
            plugin: &self.state.cni_bin,
            node_netns: &node.netns,
            conf,
            container_id: &attachment.container_id,
            pod_netns: &attachment.netns,
            pod_namespace: &attachment.pod_namespace,
            pod_name: &attachment.pod_name,
            requested_ip: None,
        }
    }

    /// Best effort, in reverse order of creation; see [`Testbed::down`].
    fn teardown(&mut self) -> Result<(), TestbedError> {
        let mut warnings = Vec::new();
        let mut problems = Vec::new();

        let kernel_nodes: Vec<NodeHandle> = self
            .state
            .nodes
            .iter()
            .filter(|n| n.kind.is_kernel() || self.state.mode == Mode::Kernel)
            .cloned()
            .collect();
        if !self.state.attachments.is_empty() && !kernel_nodes.is_empty() {
            // The plugin talks to the agent socket on DEL too.
            if self.kernel_servers.is_empty() {
                for node in kernel_nodes.iter().filter(|n| cmd::netns_exists(&n.netns)) {
                    match kernel::KernelServer::start(&node.agent_socket, &node.netns, node.gateway)
                    {
                        Ok(server) => self.kernel_servers.push(server),
                        Err(e) => warnings.push(e.to_string()),
                    }
                }
            }
        }
        for attachment in self.state.attachments.iter().rev() {
            let Some(node) = self.state.nodes.iter().find(|n| n.name == attachment.node) else {
                continue;
            };
            if !cmd::netns_exists(&node.netns) {
                continue;
            }
            let conf_path = node.cni_conf_dir.join(CNI_CONF_NAME);
            match std::fs::read(&conf_path) {
                Ok(conf) => {
                    if let Err(e) = cni::del(&self.invocation(node, attachment, &conf)) {
                        warnings.push(e.to_string());
                    }
                }
                Err(e) => warnings.push(format!(
                    "no CNI DEL for pod {}: cannot read {}: {e}",
                    attachment.key,
                    conf_path.display()
                )),
            }
        }
        self.kernel_servers.clear();

        for index in 0..self.state.nodes.len() {
            let node = &self.state.nodes[index];
            let Some(pid) = node.agent_pid else { continue };
            let name = node.name.clone();
            match agent::stop(
                &name,
                pid,
                self.agents.get_mut(&name),
                &self.state.sluice_bin,
                libc::SIGTERM,
            ) {
                Ok(()) => {
                    self.agents.remove(&name);
                    self.state.nodes[index].agent_pid = None;
                }
                Err(e) => problems.push(e.to_string()),
            }
        }

        for index in 0..self.state.nodes.len() {
            let node = &self.state.nodes[index];
            let Some(tunnel) = node.wireguard.clone() else {
                continue;
            };
            let Some(pid) = tunnel.pid else { continue };
            let name = node.name.clone();
            match wireguard::stop(&name, &tunnel, pid, self.tunnels.get_mut(&name)) {
                Ok(()) => {
                    self.tunnels.remove(&name);
                    if let Some(t) = self.state.nodes[index].wireguard.as_mut() {
                        t.pid = None;
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }

        let mut remaining = Vec::new();
        for netns in self.state.namespaces.iter().rev() {
            if let Err(e) = cmd::netns_del(netns) {
                problems.push(e.to_string());
                remaining.push(netns.clone());
            }
        }
        remaining.reverse();
        self.state.namespaces = remaining;

        for warning in &warnings {
            eprintln!("sluice-testbed: warning: {warning}");
        }
        if problems.is_empty() {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(TestbedError::Teardown {
                    instance: self.state.instance.clone(),
                    problems: format!("removing {}: {e}", self.dir.display()),
                }),
            }
        } else {
            // Keep the record of what is left so that `down` can be run again.
            if let Err(e) = self.save() {
                problems.push(e.to_string());
            }
            Err(TestbedError::Teardown {
                instance: self.state.instance.clone(),
                problems: problems.join("\n"),
            })
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.teardown_on_drop {
            self.teardown_on_drop = false;
            if let Err(e) = self.teardown() {
                eprintln!("sluice-testbed: {e}");
            }
        }
    }
}

/// A node's kind: in sluice mode, what the cluster file says; in [`Mode::Kernel`], every node is
/// a kernel node, with a wireguard-go tunnel when the file says so or encryption is on.
fn node_kind(mode: Mode, encryption: Encryption, planned: NodeKind) -> NodeKind {
    match mode {
        Mode::Kernel
            if planned == NodeKind::KernelWireguard || encryption == Encryption::Wireguard =>
        {
            NodeKind::KernelWireguard
        }
        Mode::Kernel => NodeKind::Kernel,
        Mode::Sluice { .. } => planned,
    }
}

fn existing_binary(
    what: &'static str,
    path: &Path,
    hint: &'static str,
) -> Result<PathBuf, TestbedError> {
    if !path.is_file() {
        return Err(TestbedError::MissingBinary {
            what,
            path: path.to_path_buf(),
            hint,
        });
    }
    std::fs::canonicalize(path).map_err(|source| TestbedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn netns_command(netns: &str, argv: &[&str]) -> Result<Command, TestbedError> {
    if argv.is_empty() {
        return Err(TestbedError::EmptyCommand);
    }
    Ok(cmd::in_netns(netns, argv))
}

fn output(mut command: Command) -> Result<Output, TestbedError> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Exec {
            command: cmd::describe(&command),
            source,
        })
}
