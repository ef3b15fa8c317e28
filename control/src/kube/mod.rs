//! `--source kubernetes`: kube-rs watchers that produce the same
//! [`ClusterState`](crate::cluster::ClusterState) as the cluster file, so one translation path
//! serves both sources.
//!
//! ```text
//!  API server ──list/watch (7 watchers)──> LenientObject ──decode+check──> per-kind stores
//!  (in-cluster, kubeconfig,                      (object.rs)                 (store.rs)
//!   or --api-server URL)                                                        │ batch window
//!                                   agent loop <──SourceEvent::State / Health───┘ (run.rs)
//!  agent ──annotate_node(key, value)──> merge-PATCH of the own Node, retried until it lands
//! ```
//!
//! Design decisions and their limits:
//! - **One thread, one `current_thread` tokio runtime** ([`KubeSource::start`]); the agent polls
//!   [`KubeSource::try_recv`] from its own loop, as it polls the file source.
//! - **Everything is watched cluster-wide.** Pods and Nodes of *all* nodes are needed (policy
//!   identities are pod labels and IPs cluster-wide; routes, VTEPs and WireGuard peers are every
//!   node), so no kind is narrowed by field selector. Only Services are narrowed, by kube-proxy's
//!   label rule `!service.kubernetes.io/service-proxy-name`. The own Node is written (its
//!   annotation), never watched separately.
//! - **Complete states only.** No [`SourceEvent::State`] is sent before every kind has finished
//!   its first list; a relist (410 Gone, outage) replaces that kind's store at `InitDone`, so
//!   objects deleted during an outage are pruned exactly then and nothing else is.
//!   A `HostNetworkPolicy` list answered with 404 (CRD not installed) makes that kind synced and
//!   empty, with one warning, and is retried every `retry_max`.
//! - **Lists are consistent reads** (kube's default `MostRecent` semantic, not
//!   `resourceVersion=0`): a relist after an outage must not come from a stale cache, since it
//!   decides what is pruned. Bookmarks are on; pages of 500.
//! - **Errors never end a watcher**: each is logged (warn on the first of a run, then debug),
//!   reflected in [`ApiHealth`], and followed by an exponential backoff with jitter between
//!   `retry_min` and `retry_max` (client-go's 800 ms .. 30 s by default), reset by progress. A
//!   410 Gone relists at once (the second in a row waits). A watch refused with 410 at start
//!   restarts the watcher (kube's would retry the stale version forever). kube's client-level
//!   retry of 429/503/504 is off: it hides an outage inside one request for minutes (and a
//!   429's `Retry-After` is therefore not honoured, only the backoff).
//! - **Bad objects are skipped**, one at a time, with a warning naming kind/namespace/name and
//!   the field path ([`object`]); an update that turns an object bad removes it from the state.
//! - **TLS and credentials are kube-rs's** (rustls on ring): CA data or file, bearer token, token
//!   file (re-read every minute, as client-go), client certificate, `tls-server-name`. The server
//!   certificate is verified for the host of the URL used, so `--api-server
//!   https://127.0.0.1:7445` (KubePrism) needs a certificate naming 127.0.0.1 (Talos' does) or a
//!   kubeconfig `tls-server-name`. Errors carry their causes (kube's and hyper's messages drop
//!   them: "client error (Connect)") and say which URL and whose credentials or CA to check; a
//!   401 counts as connected, with the error kept.
//! - **Connectivity** is "did the API server answer the last request": a transport error or a
//!   5xx makes it `connected: false`; any answer makes it true again. While disconnected the
//!   source asks for its own Node every `retry_min` (a resumed watch with nothing new says
//!   nothing, so the watchers alone cannot tell that the server is back).
//!
//! [`API_CALLS`] lists every call this module makes; `deploy/rbac.yaml` grants them (a test
//! checks it).

pub mod fake;
pub mod object;
mod run;
mod store;

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use object::{Kind, SERVICE_PROXY_NAME_LABEL};

use crate::cluster::ClusterState;

/// How to reach the API server and how to batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// Explicit API server URL, e.g. `https://127.0.0.1:7445` (KubePrism) or
    /// `http://127.0.0.1:PORT` (tests). Credentials still come from the kubeconfig or the
    /// in-cluster service account when there is one.
    pub api_server: Option<String>,
    /// Kubeconfig file; else the in-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of the agent's pod; the Node that
    /// [`KubeSource::annotate_node`] patches).
    pub node: String,
    /// Changes within this window after the first one are sent as one state.
    pub batch: Duration,
    /// First retry delay after an error (doubles per failure, with jitter).
    pub retry_min: Duration,
    /// Longest retry delay; also the retry period of an absent CRD.
    pub retry_max: Duration,
}

/// Default [`KubeOptions::batch`].
pub const DEFAULT_BATCH: Duration = Duration::from_millis(30);
/// Default [`KubeOptions::retry_min`] (client-go's reflector).
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(800);
/// Default [`KubeOptions::retry_max`] (client-go's reflector).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

impl KubeOptions {
    /// Options for node `node` with the default batch window and retry delays, config inferred.
    pub fn new(node: impl Into<String>) -> Self {
        KubeOptions {
            api_server: None,
            kubeconfig: None,
            node: node.into(),
            batch: DEFAULT_BATCH,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

/// What the source tells the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A complete, consistent state: only sent once every kind has finished its first list, and
    /// after a relist only once that kind's relist finished.
    State {
        /// Every watched object (minus skipped ones), sorted as [`ClusterState`] requires.
        state: ClusterState,
        /// When the first change folded into this state was seen (for the programming-latency
        /// histogram).
        first_change: std::time::Instant,
        /// The kinds that changed since the previous state sent (all of them in the first).
        changed: crate::cluster::ChangedKinds,
    },
    /// Connectivity or sync progress changed (for status).
    Health(ApiHealth),
}

/// The source's view of the API server, for `sluice status` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiHealth {
    /// The API server answered the last request.
    pub connected: bool,
    /// When `connected` last changed (start-up counts as a change).
    pub since: SystemTime,
    /// The last error, kept after recovery (for status).
    pub last_error: Option<String>,
    /// Kinds that have finished a list (names as in [`Kind::name`]).
    pub kinds_synced: Vec<String>,
    /// Every kind has finished a list: states are being sent.
    pub all_synced: bool,
    /// Lists completed by a kind that had synced before (410 Gone, outages).
    pub relists: u64,
    /// Objects skipped because they did not decode or failed sluice's checks.
    pub skipped_objects: u64,
}

impl ApiHealth {
    fn starting() -> Self {
        ApiHealth {
            connected: false,
            since: SystemTime::now(),
            last_error: None,
            kinds_synced: Vec::new(),
            all_synced: false,
            relists: 0,
            skipped_objects: 0,
        }
    }
}

/// A Kubernetes API call the source makes, for the RBAC check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource (plural).
    pub resource: &'static str,
    /// Verb as RBAC names it.
    pub verb: &'static str,
}

const fn call(group: &'static str, resource: &'static str, verb: &'static str) -> ApiCall {
    ApiCall {
        group,
        resource,
        verb,
    }
}

/// Every call of this module: list + watch of each [`Kind`], get (the reconnect probe) and patch
/// ([`KubeSource::annotate_node`]) of the own Node. `deploy/rbac.yaml` must grant them all.
pub const API_CALLS: &[ApiCall] = &[
    call("", "nodes", "list"),
    call("", "nodes", "watch"),
    call("", "nodes", "get"),
    call("", "nodes", "patch"),
    call("", "namespaces", "list"),
    call("", "namespaces", "watch"),
    call("", "pods", "list"),
    call("", "pods", "watch"),
    call("", "services", "list"),
    call("", "services", "watch"),
    call("discovery.k8s.io", "endpointslices", "list"),
    call("discovery.k8s.io", "endpointslices", "watch"),
    call("networking.k8s.io", "networkpolicies", "list"),
    call("networking.k8s.io", "networkpolicies", "watch"),
    call("policy.sluice.io", "hostnetworkpolicies", "list"),
    call("policy.sluice.io", "hostnetworkpolicies", "watch"),
];

/// Errors starting the source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file could not be read or used.
    #[error("cannot use kubeconfig {}: {reason}; check --kubeconfig", path.display())]
    Kubeconfig {
        /// The file given.
        path: PathBuf,
        /// What kube said.
        reason: String,
    },
    /// No configuration found (no --api-server, not in a pod, no kubeconfig).
    #[error(
        "cannot find how to reach the Kubernetes API: {reason}; run inside a pod with a service \
         account, set $KUBECONFIG, or pass --kubeconfig or --api-server"
    )]
    NoConfig {
        /// What kube said.
        reason: String,
    },
    /// The API server URL does not parse.
    #[error("API server URL {url:?} is invalid: {reason}; expected e.g. https://127.0.0.1:7445")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The HTTP client could not be built (TLS material, proxy settings).
    #[error("cannot build the Kubernetes client for {url}: {reason}; check the kubeconfig's certificates")]
    Client {
        /// The API server URL.
        url: String,
        /// What kube said.
        reason: String,
    },
    /// The source's thread or runtime could not be started.
    #[error("cannot start the Kubernetes source thread: {reason}")]
    Thread {
        /// What the OS said.
        reason: String,
    },
}

/// The running source: a thread with the watchers, read by the agent with
/// [`try_recv`](Self::try_recv).
pub struct KubeSource {
    events: Receiver<SourceEvent>,
    annotations: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    health: Arc<Mutex<ApiHealth>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long [`KubeSource::start`] waits for the client configuration (exec credential plugins
/// can be slow).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dropping a [`KubeSource`] waits for its thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

impl KubeSource {
    /// Builds the client (explicit URL, kubeconfig, in-cluster or inferred config) and starts
    /// the watchers on their own thread. Errors are configuration errors only: an unreachable
    /// API server is not an error here but `Health { connected: false }` and retries.
    pub fn start(opts: KubeOptions) -> Result<KubeSource, KubeError> {
        let (events_tx, events) = std::sync::mpsc::sync_channel(run::EVENT_QUEUE);
        let (annotations, annotations_rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let health = Arc::new(Mutex::new(ApiHealth::starting()));
        let shared = Arc::clone(&health);
        let thread = std::thread::Builder::new()
            .name("sluice-kube".to_owned())
            .spawn(move || {
                run::thread_main(
                    opts,
                    run::Channels {
                        events: events_tx,
                        annotations: annotations_rx,
                        stop: stop_rx,
                        ready: ready_tx,
                        health: shared,
                    },
                );
                let _ = done_tx.send(());
            })
            .map_err(|e| KubeError::Thread {
                reason: e.to_string(),
            })?;
        let mut source = KubeSource {
            events,
            annotations,
            health,
            stop: Some(stop),
            done,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(source),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Disconnected) => {
                source.shutdown();
                Err(KubeError::Thread {
                    reason: "the thread ended while configuring the client (see the log above)"
                        .to_owned(),
                })
            }
            Err(RecvTimeoutError::Timeout) => {
                source.shutdown();
                Err(KubeError::Thread {
                    reason: format!(
                        "the client configuration did not finish within {START_TIMEOUT:?}"
                    ),
                })
            }
        }
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<SourceEvent> {
        self.events.try_recv().ok()
    }

    /// The next event, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<SourceEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Sets annotation `key` to `value` on this node's Node object (a JSON merge PATCH), retried
    /// with backoff until the API server accepts it. Setting the value already set is a no-op.
    pub fn annotate_node(&self, key: &str, value: &str) {
        if self
            .annotations
            .send((key.to_owned(), value.to_owned()))
            .is_err()
        {
            tracing::warn!(
                key,
                "cannot annotate the Node: the Kubernetes source has stopped"
            );
        }
    }

    /// The current health (always up to date, unlike the `Health` events, which can be dropped
    /// when the agent does not read them).
    pub fn health(&self) -> ApiHealth {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            match self.done.recv_timeout(STOP_TIMEOUT) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    let _ = thread.join();
                }
                Err(RecvTimeoutError::Timeout) => tracing::warn!(
                    "the Kubernetes source thread did not stop within {STOP_TIMEOUT:?}; leaving it"
                ),
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_calls_cover_list_and_watch_of_every_kind() {
        for kind in Kind::ALL {
            let resource = kind.api_resource();
            for verb in ["list", "watch"] {
                assert!(
                    API_CALLS.iter().any(|c| c.group == resource.group
                        && c.resource == resource.plural
                        && c.verb == verb),
                    "{kind} {verb} missing from API_CALLS"
                );
            }
        }
        assert_eq!(API_CALLS.len(), Kind::ALL.len() * 2 + 2);
    }
}
