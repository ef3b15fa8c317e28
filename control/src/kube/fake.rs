//! An in-process Kubernetes API server for tests: list/watch over HTTP/1.1 (plain or HTTPS)
//! with real object JSON, and knobs to make it misbehave the way a real one does.
//!
//! ```text
//!  test / sluice-fake-apiserver ──apply/delete/insert_raw/compact/drop_watches/set_delay/set_down──┐
//!                                                                                                  v
//!  kube-rs Client ──HTTP/1.1──> accept thread ──> one thread per connection ──> Store { objects,
//!   (list, watch, get, patch)  [TLS, then bearer   (keep-alive, chunked watch)     event history,
//!                               token or client                                    list snapshots }
//!                               certificate: 401]
//! ```
//!
//! What it serves, as the real API does (paths, JSON shapes, status codes):
//! - kinds `v1` Node, Namespace, Pod, Service; `discovery.k8s.io/v1` EndpointSlice;
//!   `networking.k8s.io/v1` NetworkPolicy; `policy.sluice.io/v1alpha1` HostNetworkPolicy
//!   (cluster-scoped, `hostnetworkpolicies`), under `/api/v1/...` and `/apis/GROUP/VERSION/...`,
//!   all-namespaces and `namespaces/NS/...` forms; `GET /version`, `/api`, `/apis`, `/api/v1`,
//!   `/apis/GROUP/VERSION` (discovery, minimal);
//! - objects are `serde_json::Value`s; every write bumps one global counter (etcd's revision)
//!   written into `metadata.resourceVersion`; `uid` and `creationTimestamp` are set on create and
//!   kept on update; an update that changes nothing is a no-op (no new version, no event);
//! - **list**: `labelSelector` (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
//!   comma-joined), `fieldSelector` (`metadata.name`, `metadata.namespace` for every kind;
//!   `spec.nodeName`, `status.phase`, `status.podIP` for Pods; `=`, `==`, `!=`; other fields are
//!   refused with 400 as the real server does), `limit` + `continue` paging over a snapshot taken
//!   at the first page (consistent pages; the token names the snapshot, its resourceVersion and
//!   the offset; a token whose resourceVersion is older than the compaction point, or whose
//!   snapshot was evicted, gets `410 Gone`, reason `Expired`), `resourceVersion` with
//!   `resourceVersionMatch=Exact` answered from the history (410 when compacted away), anything
//!   else answered with the current state. List items carry no `apiVersion`/`kind` (as the
//!   real server's typed lists);
//! - **watch** (`watch=true`): chunked newline-delimited `{"type":..,"object":..}` events after
//!   `resourceVersion` (absent or `0`: synthetic ADDED events for the current state first); a
//!   resourceVersion older than the compaction point gets a `200` stream holding one `ERROR`
//!   event with a 410 `Status` (as the real server); label/field selectors turn a MODIFIED that
//!   enters/leaves the selection into ADDED/DELETED; `allowWatchBookmarks=true` gives a BOOKMARK
//!   (object of the kind with only `metadata.resourceVersion`) every
//!   [`bookmark interval`](FakeApi::set_bookmark_interval) (1 s by default);
//!   `sendInitialEvents=true` sends the current state as ADDED then a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"` (kube-rs streaming lists); the stream ends cleanly after
//!   `timeoutSeconds` (default 300 s, capped by [`FakeApi::set_max_watch_timeout`], 1800 s by
//!   default);
//! - **get** of one object; **patch** with `application/merge-patch+json` (RFC 7386),
//!   `application/strategic-merge-patch+json` and `application/apply-patch+yaml` (JSON bodies),
//!   both treated as a merge patch (enough for labels/annotations; no list merge keys, no field
//!   managers); `application/json-patch+json` gets 415. Every PATCH is recorded
//!   ([`FakeApi::patches`]). POST/PUT/DELETE of objects over HTTP are not served (405): tests
//!   write through [`FakeApi::apply`] / [`FakeApi::delete`].
//!
//! Faults: [`compact`](FakeApi::compact), [`drop_watches`](FakeApi::drop_watches),
//! [`set_delay`](FakeApi::set_delay) (every Kubernetes response waits that long before its head),
//! [`set_down`](FakeApi::set_down) (every open connection is closed; new requests are read and
//! the connection closed without a response, so clients see "connection closed before message
//! completed", like an API server behind a load balancer whose backend died; the `/fake/`
//! control endpoints keep answering), [`insert_raw`](FakeApi::insert_raw) (objects the typed
//! decoder refuses), [`set_error_status`](FakeApi::set_error_status) (every Kubernetes request
//! answered with a 5xx/429 `Status`), [`set_served`](FakeApi::set_served) (a kind answers 404, as
//! a CRD that is not installed). [`request_count`](FakeApi::request_count) counts requests per kind and verb.
//!
//! Security ([`FakeApi::builder`]): plain HTTP by default; [`FakeApiBuilder::tls`] serves HTTPS
//! with a rustls configuration ([`tls_config`] builds one from PEM, optionally verifying client
//! certificates against a CA). Authentication is off by default; with
//! [`FakeApiBuilder::bearer_token`] and/or [`FakeApiBuilder::client_certificates`], a
//! Kubernetes request needs a verified client certificate or `Authorization: Bearer` with an
//! accepted token (x509 first, as the real server's union authenticator), else it gets the real
//! server's `401 Unauthorized` `Status`. [`FakeApi::auth_counts`] says which credential each
//! request used. The `/fake/` control endpoints need no credentials.
//!
//! Control endpoints (for the `sluice-fake-apiserver` binary and harnesses in other processes;
//! not Kubernetes paths): `POST /fake/apply` (body: an object or a `List`), `POST
//! /fake/insert-raw?kind=Pod` (body: any JSON), `POST /fake/delete?kind=Pod&namespace=NS&name=N`,
//! `POST /fake/compact`, `POST /fake/drop-watches`, `POST /fake/delay?ms=N`, `POST
//! /fake/down?on=true|false`, `POST /fake/error?code=503` (`0` clears), `POST
//! /fake/served?kind=HostNetworkPolicy&on=false`, `GET /fake/counters`, `GET /fake/patches`.
//!
//! Limits: one history of at most [`MAX_HISTORY_EVENTS`] events (older ones are compacted
//! automatically, as etcd does), at most [`MAX_LIST_SNAPSHOTS`] paged lists in flight, HTTP/1.1
//! only (no h2 over TLS), no authorization (an authenticated request may do anything), no request
//! bodies in chunked encoding, no `json-patch`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::cluster::ClusterState;

/// Events kept for watches; older ones are forgotten (watches from before them get 410).
pub const MAX_HISTORY_EVENTS: usize = 200_000;
/// Paged lists whose snapshot is kept for `continue` tokens; the oldest is evicted first.
pub const MAX_LIST_SNAPSHOTS: usize = 64;
/// Watch duration when the client gives no `timeoutSeconds`.
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest request head (request line + headers) read.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body read.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How long [`FakeApi`]'s drop waits for connection threads to end.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// The kinds the fake server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Node (cluster-scoped).
    Node,
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// `policy.sluice.io/v1alpha1` HostNetworkPolicy (cluster-scoped).
    HostNetworkPolicy,
}

impl Kind {
    /// Every served kind.
    pub const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::HostNetworkPolicy,
    ];

    /// The `kind` field: `Pod`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::HostNetworkPolicy => "HostNetworkPolicy",
        }
    }

    /// API group, `""` for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Node | Kind::Namespace | Kind::Pod | Kind::Service => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::HostNetworkPolicy => "policy.sluice.io",
        }
    }

    /// API version within the group: `v1`.
    pub fn version(self) -> &'static str {
        match self {
            Kind::HostNetworkPolicy => "v1alpha1",
            _ => "v1",
        }
    }

    /// The `apiVersion` field: `v1`, `discovery.k8s.io/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Namespace | Kind::Pod | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::HostNetworkPolicy => "policy.sluice.io/v1alpha1",
        }
    }

    /// The resource name in paths: `pods`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::HostNetworkPolicy => "hostnetworkpolicies",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace | Kind::HostNetworkPolicy)
    }

    /// The kind whose `kind` field is `name` (exact spelling).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn from_path(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }
}

/// What a request asked for, for [`FakeApi::request_count`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    /// A list (every page counts).
    List,
    /// A watch (counted when the request arrives, before its stream).
    Watch,
    /// A GET of one object.
    Get,
    /// A PATCH of one object.
    Patch,
}

impl Verb {
    /// Lower-case name: `list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Get => "get",
            Verb::Patch => "patch",
        }
    }
}

/// One PATCH request as received (whether or not it applied).
#[derive(Debug, Clone, PartialEq)]
pub struct PatchRecord {
    /// The kind in the path.
    pub kind: Kind,
    /// The namespace in the path, for namespaced kinds.
    pub namespace: Option<String>,
    /// The object name in the path.
    pub name: String,
    /// The request's `Content-Type`.
    pub content_type: String,
    /// The body (`Value::Null` when it was not JSON).
    pub body: Value,
    /// The HTTP status answered.
    pub status: u16,
}

/// Errors of the fake API server's handle.
#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    /// The listening socket could not be opened.
    #[error("fake API server: cannot listen on {addr}: {source}; pick a free address (port 0 lets the system choose)")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("fake API server: cannot start its {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// An applied object lacks a field the server needs.
    #[error("fake API server: object {object} has no {field}; give apiVersion, kind and metadata.name (use insert_raw for deliberately broken objects)")]
    MissingField {
        /// The object as far as it is known (`Pod default/web`, or its JSON start).
        object: String,
        /// The missing field path.
        field: &'static str,
    },
    /// An applied object is of a kind the server does not serve.
    #[error("fake API server: kind {kind:?} with apiVersion {api_version:?} is not served; served: v1 Node/Namespace/Pod/Service, discovery.k8s.io/v1 EndpointSlice, networking.k8s.io/v1 NetworkPolicy, policy.sluice.io/v1alpha1 HostNetworkPolicy")]
    UnknownKind {
        /// The `kind` field.
        kind: String,
        /// The `apiVersion` field.
        api_version: String,
    },
    /// A deleted object does not exist.
    #[error("fake API server: {kind} {key} not found; nothing deleted")]
    NotFound {
        /// The kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
    },
    /// TLS material for [`tls_config`] is unusable.
    #[error("fake API server: TLS {what}: {reason}; give PEM (a certificate chain starting with the server's, its PKCS#8/PKCS#1/SEC1 key, a CA certificate)")]
    Tls {
        /// Which part: `certificate chain`, `private key`, `client CA`, `configuration`.
        what: &'static str,
        /// What rustls said.
        reason: String,
    },
    /// An object of a cluster state could not be turned into JSON.
    #[error("fake API server: {kind} {name} from the cluster state does not serialize to JSON: {source}")]
    Serialize {
        /// The kind.
        kind: &'static str,
        /// The object name.
        name: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// How a [`FakeApi`] is secured: see [`FakeApi::builder`].
#[derive(Clone, Default)]
pub struct FakeApiBuilder {
    tls: Option<Arc<rustls::ServerConfig>>,
    tokens: Vec<String>,
    client_certificates: bool,
}

impl FakeApiBuilder {
    /// Serves HTTPS with `config` (whose client verifier decides whether clients may present
    /// certificates; see [`tls_config`]). [`FakeApi::url`] is then `https://`.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Requires authentication and accepts `Authorization: Bearer TOKEN` with this token (can be
    /// given several times; [`FakeApi::set_bearer_tokens`] changes them later).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.tokens.push(token.into());
        self
    }

    /// Requires authentication and accepts a client certificate that the TLS configuration
    /// verified (needs [`tls`](Self::tls) with a client CA).
    pub fn client_certificates(mut self) -> Self {
        self.client_certificates = true;
        self
    }

    /// Starts serving on `addr` (`127.0.0.1:0` picks a free port).
    pub fn start(self, addr: &str) -> Result<FakeApi, FakeApiError> {
        FakeApi::start_with(addr, self)
    }
}

/// A rustls configuration for [`FakeApiBuilder::tls`] from PEM: `cert_chain_pem` (the server
/// certificate first, then intermediates) and its `key_pem`. With `client_ca_pem`, client
/// certificates are verified against that CA; they stay optional at the TLS level (a client
/// without one can still send a token), as on the real API server. ALPN offers `http/1.1` only.
pub fn tls_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, FakeApiError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let tls_error = |what: &'static str, reason: &dyn std::fmt::Display| FakeApiError::Tls {
        what,
        reason: reason.to_string(),
    };
    let certs =
        |what: &'static str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, FakeApiError> {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_error(what, &e))?;
            if certs.is_empty() {
                return Err(tls_error(what, &"no CERTIFICATE block"));
            }
            Ok(certs)
        };
    let chain = certs("certificate chain", cert_chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls_error("private key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("configuration", &e))?;
    let builder = match client_ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs("client CA", pem)? {
                roots.add(cert).map_err(|e| tls_error("client CA", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls_error("client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| tls_error("private key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Kubernetes requests by the credential that authenticated them ([`FakeApi::auth_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthCounts {
    /// Authenticated by a verified client certificate.
    pub client_certificate: u64,
    /// Authenticated by an accepted bearer token.
    pub bearer_token: u64,
    /// Answered `401 Unauthorized`.
    pub unauthorized: u64,
}

/// A running fake API server; stopped (threads ended, bounded wait) on drop.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

type ObjKey = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct HistoryEvent {
    rv: u64,
    kind: Kind,
    key: ObjKey,
    ty: EventType,
    /// The object after the change (for DELETED: its last state, with the deletion's version).
    object: Value,
    /// The object before the change (None for ADDED).
    previous: Option<Value>,
}

struct ListSnapshot {
    id: u64,
    rv: u64,
    /// Shared with the requests paging through it: a page copies only its own items.
    items: Arc<Vec<Value>>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    compacted_rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<HistoryEvent>,
    snapshots: VecDeque<ListSnapshot>,
    next_snapshot: u64,
    next_uid: u64,
    next_raw: u64,
}

struct Conn {
    stream: TcpStream,
    watching: bool,
}

/// A connection's byte stream: the socket, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref(),
        }
    }

    /// The client presented a certificate that the TLS configuration verified.
    fn client_certificate(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls.conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Who may use the Kubernetes endpoints.
struct Authn {
    /// Set at start: every Kubernetes request needs a credential.
    required: bool,
    client_certificates: bool,
    tokens: Mutex<Vec<String>>,
    counts: Mutex<AuthCounts>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    stop: AtomicBool,
    down: AtomicBool,
    delay_ms: AtomicU64,
    /// Bit `1 << kind as u8` set: that kind answers 404 (as a CRD that is not installed).
    unserved: AtomicU64,
    /// Non-zero: every Kubernetes request is answered with a `Status` of this code.
    error_status: AtomicU64,
    bookmark_ms: AtomicU64,
    max_watch_ms: AtomicU64,
    watch_generation: AtomicU64,
    counters: Mutex<BTreeMap<(Kind, Verb), u64>>,
    patches: Mutex<Vec<PatchRecord>>,
    conns: Mutex<HashMap<u64, Conn>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    authn: Authn,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeApi {
    /// Starts serving plain HTTP without authentication on `addr` (`127.0.0.1:0` picks a free
    /// port).
    pub fn start(addr: &str) -> Result<FakeApi, FakeApiError> {
        FakeApi::builder().start(addr)
    }

    /// A server with TLS and/or authentication: `FakeApi::builder().tls(config)
    /// .bearer_token("t").start("127.0.0.1:0")`.
    pub fn builder() -> FakeApiBuilder {
        FakeApiBuilder::default()
    }

    fn start_with(addr: &str, security: FakeApiBuilder) -> Result<FakeApi, FakeApiError> {
        let listener = TcpListener::bind(addr).map_err(|source| FakeApiError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| FakeApiError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            unserved: AtomicU64::new(0),
            error_status: AtomicU64::new(0),
            bookmark_ms: AtomicU64::new(1000),
            max_watch_ms: AtomicU64::new(1_800_000),
            watch_generation: AtomicU64::new(0),
            counters: Mutex::new(BTreeMap::new()),
            patches: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            addr: local,
            authn: Authn {
                required: !security.tokens.is_empty() || security.client_certificates,
                client_certificates: security.client_certificates,
                tokens: Mutex::new(security.tokens),
                counts: Mutex::new(AuthCounts::default()),
            },
            tls: security.tls,
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || accept_loop(&accept_shared, &listener))
            .map_err(|source| FakeApiError::Spawn {
                what: "accept",
                source,
            })?;
        Ok(FakeApi {
            shared,
            addr: local,
            accept_thread: Some(accept_thread),
        })
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS): the `cluster_url` for a `kube::Config`.
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Replaces the accepted bearer tokens (a rotation); no effect on a server started without
    /// authentication.
    pub fn set_bearer_tokens(&self, tokens: &[&str]) {
        *lock(&self.shared.authn.tokens) = tokens.iter().map(|t| (*t).to_owned()).collect();
    }

    /// Kubernetes requests so far by the credential that authenticated them (all zero without
    /// authentication).
    pub fn auth_counts(&self) -> AuthCounts {
        *lock(&self.shared.authn.counts)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or updates `object` (needs `apiVersion`, `kind`, `metadata.name`; a namespaced
    /// object without `metadata.namespace` goes to `default`). Returns its resourceVersion; an
    /// update that changes nothing returns the current one and emits no event.
    pub fn apply(&self, object: Value) -> Result<u64, FakeApiError> {
        let (kind, key, object) = normalize(object)?;
        let rv = lock(&self.shared.store).put(kind, key, object, true);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Stores `object` as a `kind` object without checking it (missing fields, unknown enum
    /// values, wrong types: what a typed decoder must skip). `metadata.resourceVersion` (and
    /// `uid`, `creationTimestamp` when missing) are set when `metadata` is an object; the key is
    /// `metadata.name` when it is a string, else a generated `raw-N`. Emits ADDED/MODIFIED.
    pub fn insert_raw(&self, kind: Kind, object: Value) -> u64 {
        let rv = {
            let mut store = lock(&self.shared.store);
            let meta = object.get("metadata");
            let name = match meta.and_then(|m| m.get("name")).and_then(Value::as_str) {
                Some(name) => name.to_owned(),
                None => {
                    store.next_raw += 1;
                    format!("raw-{}", store.next_raw)
                }
            };
            let namespace = meta
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            store.put(kind, (kind, namespace, name), object, false)
        };
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object (DELETED event); `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<u64, FakeApiError> {
        let ns = if kind.namespaced() {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        let key = (kind, ns.to_owned(), name.to_owned());
        let rv = lock(&self.shared.store)
            .remove(&key)
            .ok_or_else(|| FakeApiError::NotFound {
                kind: kind.name(),
                key: display_key(&key),
            })?;
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Makes the stored objects exactly `objects` (each as for [`apply`](Self::apply)):
    /// changed ones are updated, new ones added, the others deleted. Returns the resourceVersion.
    pub fn sync(&self, objects: Vec<Value>) -> Result<u64, FakeApiError> {
        let mut desired = BTreeMap::new();
        for object in objects {
            let (kind, key, object) = normalize(object)?;
            desired.insert(key, (kind, object));
        }
        let rv = {
            let mut store = lock(&self.shared.store);
            let gone: Vec<ObjKey> = store
                .objects
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                store.remove(&key);
            }
            for (key, (kind, object)) in desired {
                store.put(kind, key, object, true);
            }
            store.rv
        };
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Forgets the event history and every paged-list snapshot: watches and `continue` tokens
    /// from older versions get 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.compacted_rv = store.rv;
        store.history.clear();
        store.snapshots.clear();
        drop(store);
        self.shared.changed.notify_all();
    }

    /// Closes every open watch stream abruptly (no final chunk), as a dropped connection.
    pub fn drop_watches(&self) {
        self.shared.watch_generation.fetch_add(1, Ordering::SeqCst);
        for conn in lock(&self.shared.conns).values() {
            if conn.watching {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
    }

    /// Every Kubernetes response (list, watch head, get, patch, discovery) waits `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Down: every open connection is closed now, and each new request is read and its
    /// connection closed without a response (control endpoints under `/fake/` still answer).
    pub fn set_down(&self, down: bool) {
        self.shared.set_down(down, None);
    }

    /// Whether `kind` is served; an unserved kind answers 404 to every request and is missing
    /// from discovery, as a CRD that is not installed (all kinds are served by default).
    pub fn set_served(&self, kind: Kind, served: bool) {
        let bit = 1u64 << (kind as u8);
        if served {
            self.shared.unserved.fetch_and(!bit, Ordering::SeqCst);
        } else {
            self.shared.unserved.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// `Some(code)`: every Kubernetes request (not `/fake/`) is answered with a `Status` of that
    /// code (e.g. 500, 503, 429) instead of being served; `None` serves again.
    pub fn set_error_status(&self, code: Option<u16>) {
        self.shared
            .error_status
            .store(code.map_or(0, u64::from), Ordering::SeqCst);
    }

    /// Interval between BOOKMARK events of watches that allow them (1 s by default).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.bookmark_ms.store(ms, Ordering::SeqCst);
    }

    /// Longest watch stream: larger `timeoutSeconds` are cut to this (1800 s by default).
    pub fn set_max_watch_timeout(&self, max: Duration) {
        let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self.shared.max_watch_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests of `verb` on `kind` so far.
    pub fn request_count(&self, kind: Kind, verb: Verb) -> u64 {
        lock(&self.shared.counters)
            .get(&(kind, verb))
            .copied()
            .unwrap_or(0)
    }

    /// Every PATCH received so far, oldest first.
    pub fn patches(&self) -> Vec<PatchRecord> {
        lock(&self.shared.patches).clone()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// The stored object, if any (`namespace` ignored for cluster-scoped kinds).
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        lock(&self.shared.store)
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored object of `kind`, sorted by (namespace, name).
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        lock(&self.shared.store)
            .objects
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Open connections (watches included).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Open watch streams.
    pub fn open_watches(&self) -> usize {
        lock(&self.shared.conns)
            .values()
            .filter(|c| c.watching)
            .count()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for conn in lock(&self.shared.conns).values() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        // Wake the accept loop, which sees `stop` and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let deadline = Instant::now() + STOP_WAIT;
        if let Some(handle) = self.accept_thread.take() {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        let handles = std::mem::take(&mut *lock(&self.shared.threads));
        for handle in handles {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

/// The objects of a cluster state as API JSON (with `apiVersion`/`kind`), for
/// [`FakeApi::sync`].
pub fn cluster_objects(state: &ClusterState) -> Result<Vec<Value>, FakeApiError> {
    fn push<T: serde::Serialize>(
        out: &mut Vec<Value>,
        kind: Kind,
        items: &[T],
        name: impl Fn(&T) -> String,
    ) -> Result<(), FakeApiError> {
        for item in items {
            let mut value =
                serde_json::to_value(item).map_err(|source| FakeApiError::Serialize {
                    kind: kind.name(),
                    name: name(item),
                    source,
                })?;
            if let Some(map) = value.as_object_mut() {
                map.insert("apiVersion".into(), kind.api_version().into());
                map.insert("kind".into(), kind.name().into());
            }
            out.push(value);
        }
        Ok(())
    }
    let mut out = Vec::new();
    let n = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.name.clone().unwrap_or_default()
    };
    push(&mut out, Kind::Node, &state.nodes, |o| n(&o.metadata))?;
    push(&mut out, Kind::Namespace, &state.namespaces, |o| {
        n(&o.metadata)
    })?;
    push(&mut out, Kind::Pod, &state.pods, |o| n(&o.metadata))?;
    push(&mut out, Kind::Service, &state.services, |o| n(&o.metadata))?;
    push(&mut out, Kind::EndpointSlice, &state.endpoint_slices, |o| {
        n(&o.metadata)
    })?;
    push(
        &mut out,
        Kind::NetworkPolicy,
        &state.network_policies,
        |o| n(&o.metadata),
    )?;
    push(
        &mut out,
        Kind::HostNetworkPolicy,
        &state.host_policies,
        |o| n(&o.metadata),
    )?;
    Ok(out)
}

fn display_key(key: &ObjKey) -> String {
    if key.1.is_empty() {
        key.2.clone()
    } else {
        format!("{}/{}", key.1, key.2)
    }
}

/// Checks an applied object and returns its kind and key (namespace defaulted).
fn normalize(mut object: Value) -> Result<(Kind, ObjKey, Value), FakeApiError> {
    let describe = |o: &Value| {
        let mut s = o.to_string();
        s.truncate(80);
        s
    };
    let kind_name = object
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| FakeApiError::MissingField {
            object: describe(&object),
            field: "kind",
        })?
        .to_owned();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| FakeApiError::MissingField {
            object: describe(&object),
            field: "apiVersion",
        })?
        .to_owned();
    let kind = Kind::from_name(&kind_name)
        .filter(|k| k.api_version() == api_version)
        .ok_or_else(|| FakeApiError::UnknownKind {
            kind: kind_name.clone(),
            api_version: api_version.clone(),
        })?;
    let described = describe(&object);
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| FakeApiError::MissingField {
            object: described.clone(),
            field: "metadata",
        })?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(FakeApiError::MissingField {
            object: described,
            field: "metadata.name",
        })?
        .to_owned();
    let ns = if kind.namespaced() {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    Ok((kind, (kind, ns, name), object))
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn set_meta(object: &mut Value, field: &str, value: Value) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(field.to_owned(), value);
    }
}

/// The object without `metadata.resourceVersion` (to see whether an update changes anything).
fn without_rv(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    o
}

impl Store {
    /// Creates or updates; `identity`: keep the stored uid/creationTimestamp over the given ones.
    fn put(&mut self, kind: Kind, key: ObjKey, mut object: Value, identity: bool) -> u64 {
        let previous = self.objects.get(&key).cloned();
        if let Some(prev) = &previous {
            for field in ["uid", "creationTimestamp"] {
                let given = meta_str(&object, field).is_some();
                if identity || !given {
                    if let Some(v) = prev.get("metadata").and_then(|m| m.get(field)) {
                        set_meta(&mut object, field, v.clone());
                    }
                }
            }
            if without_rv(prev) == without_rv(&object) {
                return self.rv;
            }
        } else {
            if meta_str(&object, "uid").is_none() {
                self.next_uid += 1;
                let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
                set_meta(&mut object, "uid", uid.into());
            }
            if meta_str(&object, "creationTimestamp").is_none() {
                set_meta(&mut object, "creationTimestamp", rfc3339_now().into());
            }
        }
        self.rv += 1;
        let rv = self.rv;
        set_meta(&mut object, "resourceVersion", rv.to_string().into());
        let ty = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.objects.insert(key.clone(), object.clone());
        self.record(HistoryEvent {
            rv,
            kind,
            key,
            ty,
            object,
            previous,
        });
        rv
    }

    fn remove(&mut self, key: &ObjKey) -> Option<u64> {
        let previous = self.objects.remove(key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut object = previous.clone();
        set_meta(&mut object, "resourceVersion", rv.to_string().into());
        self.record(HistoryEvent {
            rv,
            kind: key.0,
            key: key.clone(),
            ty: EventType::Deleted,
            object,
            previous: Some(previous),
        });
        Some(rv)
    }

    fn record(&mut self, event: HistoryEvent) {
        self.history.push_back(event);
        while self.history.len() > MAX_HISTORY_EVENTS {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = self.compacted_rv.max(old.rv);
            }
        }
    }

    /// The objects of `kind` as they were at `rv` (`None` when the history no longer reaches).
    fn state_at(&self, kind: Kind, rv: u64) -> Option<BTreeMap<ObjKey, Value>> {
        if rv < self.compacted_rv {
            return None;
        }
        let mut state: BTreeMap<ObjKey, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for event in self.history.iter().rev() {
            if event.rv <= rv {
                break;
            }
            if event.kind != kind {
                continue;
            }
            match &event.previous {
                Some(prev) => {
                    state.insert(event.key.clone(), prev.clone());
                }
                None => {
                    state.remove(&event.key);
                }
            }
        }
        Some(state)
    }

    /// History events after `rv` (index of the first one).
    fn first_after(&self, rv: u64) -> usize {
        self.history.partition_point(|e| e.rv <= rv)
    }
}

/// Now as RFC 3339 (`2026-11-25T19:40:00Z`), the format of `creationTimestamp`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut reqs = Vec::new();
    for part in split_top(s) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let set_op = |part: &str, op: &str| -> Option<(String, Vec<String>)> {
            let idx = part.find(op)?;
            let key = part[..idx].trim();
            let rest = part[idx + op.len()..].trim();
            let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
            Some((
                key.to_owned(),
                inner.split(',').map(|v| v.trim().to_owned()).collect(),
            ))
        };
        if let Some(key) = part.strip_prefix('!') {
            reqs.push(LabelReq::NotExists(key.trim().to_owned()));
        } else if let Some((k, v)) = set_op(part, " notin ") {
            reqs.push(LabelReq::NotIn(k, v));
        } else if let Some((k, v)) = set_op(part, " in ") {
            reqs.push(LabelReq::In(k, v));
        } else if let Some((k, v)) = part.split_once("!=") {
            reqs.push(LabelReq::NotIn(
                k.trim().to_owned(),
                vec![v.trim().to_owned()],
            ));
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            reqs.push(LabelReq::In(k.trim().to_owned(), vec![v.trim().to_owned()]));
        } else if part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            reqs.push(LabelReq::Exists(part.to_owned()));
        } else {
            return Err(format!("unable to parse requirement: {part:?}"));
        }
    }
    Ok(reqs)
}

fn field_supported(kind: Kind, path: &str) -> bool {
    matches!(path, "metadata.name" | "metadata.namespace")
        || (kind == Kind::Pod && matches!(path, "spec.nodeName" | "status.phase" | "status.podIP"))
}

fn parse_field_selector(kind: Kind, s: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (path, value, equal) = if let Some((p, v)) = part.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (p, v, true)
        } else {
            return Err(format!("invalid selector: {part:?}; expected field=value"));
        };
        let path = path.trim();
        if !field_supported(kind, path) {
            return Err(format!(
                "field label not supported: {path} (for {})",
                kind.plural()
            ));
        }
        reqs.push(FieldReq {
            path: path.to_owned(),
            value: value.trim().to_owned(),
            equal,
        });
    }
    Ok(reqs)
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if meta_str(object, "namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        let labels = object.get("metadata").and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        });
        labels_ok
            && self.fields.iter().all(|req| {
                let mut cur = Some(object);
                for seg in req.path.split('.') {
                    cur = cur.and_then(|c| c.get(seg));
                }
                let v = cur.and_then(Value::as_str).unwrap_or("");
                (v == req.value) == req.equal
            })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one request; `Ok(None)` on a clean end of the connection.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_owned());
    let mut head_bytes = 0usize;
    let mut line = Vec::new();
    // Skip empty lines between requests (RFC 9112 §2.2).
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_HEAD_BYTES as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        head_bytes += n;
        if head_bytes > MAX_HEAD_BYTES {
            return Err(bad("request head too large"));
        }
        if !line.iter().all(|b| b.is_ascii_whitespace()) {
            break;
        }
    }
    let request_line = String::from_utf8_lossy(&line).trim().to_owned();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(bad("malformed request line"));
    };
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_HEAD_BYTES as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(bad("connection closed inside the request head"));
        }
        head_bytes += n;
        if head_bytes > MAX_HEAD_BYTES {
            return Err(bad("request head too large"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            break;
        }
        if let Some((k, v)) = text.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let (path, query_str) = target.split_once('?').unwrap_or((target, ""));
    let query = query_str
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let mut req = Request {
        method: method.to_owned(),
        path: percent_decode(path),
        query,
        headers,
        body: Vec::new(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return Err(bad("chunked request bodies are not supported"));
    }
    let len: usize = req
        .header("content-length")
        .map(|v| v.parse().map_err(|_| bad("bad Content-Length")))
        .transpose()?
        .unwrap_or(0);
    if len > MAX_BODY_BYTES {
        return Err(bad("request body too large"));
    }
    req.body = vec![0; len];
    reader.read_exact(&mut req.body)?;
    Ok(Some(req))
}

struct Response {
    status: u16,
    body: Value,
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_response(stream: &mut impl Write, resp: &Response, close: bool) -> io::Result<()> {
    let body = resp.body.to_string();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-cache, private\r\n{}\r\n",
        resp.status,
        reason_phrase(resp.status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Go's answer to plain HTTP on an HTTPS port.
const PLAIN_HTTP_ON_TLS_RESPONSE: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

/// Whether the first byte the client sent is a letter (`GET`, `PATCH`) rather than a TLS
/// record type. Waits for that byte.
fn starts_like_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first), Ok(1) if first[0].is_ascii_alphabetic())
}

/// Answers [`PLAIN_HTTP_ON_TLS_RESPONSE`] after reading the request head, then half-closes and
/// waits (briefly) for the client to close: closing with unread bytes would reset the connection
/// under the answer.
fn answer_plain_http_on_tls(mut stream: &TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD_BYTES {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if stream.write_all(PLAIN_HTTP_ON_TLS_RESPONSE).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// Whether the client closed its end (EOF or an error on a non-blocking peek). Only called by
/// the connection's own thread while it streams, so switching the socket mode is safe.
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

fn write_chunk(stream: &mut impl Write, data: &[u8]) -> io::Result<()> {
    stream.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    stream.write_all(data)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

/// A `Status` object (`kind: Status`), as the API returns for errors.
fn status(code: u16, reason: &str, message: &str) -> Response {
    Response {
        status: code,
        body: status_value(code, reason, message),
    }
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn ok(body: Value) -> Response {
    Response { status: 200, body }
}

// ---------------------------------------------------------------------------------------------
// Threads

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else {
            // Out of file descriptors and the like: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        lock(&shared.conns).insert(
            id,
            Conn {
                stream: clone,
                watching: false,
            },
        );
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("fake-api-conn-{id}"))
            .spawn(move || {
                serve_connection(&conn_shared, id, stream);
                lock(&conn_shared.conns).remove(&id);
            });
        let mut threads = lock(&shared.threads);
        threads.retain(|h| !h.is_finished());
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(_) => {
                lock(&shared.conns).remove(&id);
            }
        }
    }
}

fn serve_connection(shared: &Arc<Shared>, id: u64, tcp: TcpStream) {
    let stream = match &shared.tls {
        None => Stream::Plain(tcp),
        // Plain HTTP on the TLS port gets a plain 400, as from Go's net/http (the real API
        // server); a TLS record starts with a binary content type instead.
        Some(_) if starts_like_http(&tcp) => {
            answer_plain_http_on_tls(&tcp);
            return;
        }
        Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
            // The handshake runs inside the first read.
            Ok(conn) => Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))),
            Err(_) => return,
        },
    };
    // Requests are read through the buffer and answered on the stream under it (one request
    // at a time: the buffer holds at most the start of the next one).
    let mut reader = BufReader::new(stream);
    while !shared.stop.load(Ordering::SeqCst) {
        let req = match read_request(&mut reader) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                // A TLS handshake the client aborted is InvalidData too; the 400 then fails.
                if e.kind() == io::ErrorKind::InvalidData {
                    let resp = status(400, "BadRequest", &format!("bad request: {e}"));
                    let _ = write_response(reader.get_mut(), &resp, true);
                }
                return;
            }
        };
        let writer = reader.get_mut();
        let close = req.wants_close();
        if let Some(control) = req.path.strip_prefix("/fake/") {
            let resp = shared.control(id, control, &req);
            if write_response(writer, &resp, close).is_err() || close {
                return;
            }
            continue;
        }
        if shared.down.load(Ordering::SeqCst) {
            let _ = writer.tcp().shutdown(Shutdown::Both);
            return;
        }
        shared.sleep_delay();
        if shared.down.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            let _ = writer.tcp().shutdown(Shutdown::Both);
            return;
        }
        let routed = if shared.authenticated(&req, writer) {
            shared.route(&req)
        } else {
            Routed::Response(status(401, "Unauthorized", "Unauthorized"))
        };
        match routed {
            Routed::Response(resp) => {
                if write_response(writer, &resp, close).is_err() || close {
                    return;
                }
            }
            Routed::Watch(watch) => {
                if let Some(conn) = lock(&shared.conns).get_mut(&id) {
                    conn.watching = true;
                }
                let generation = shared.watch_generation.load(Ordering::SeqCst);
                match shared.stream_watch(writer, &watch, generation) {
                    Ok(()) if !close => {}
                    _ => return,
                }
                if let Some(conn) = lock(&shared.conns).get_mut(&id) {
                    conn.watching = false;
                }
            }
        }
    }
}

enum Routed {
    Response(Response),
    Watch(WatchRequest),
}

struct WatchRequest {
    kind: Kind,
    filter: Filter,
    /// `None`: start with the current state (absent or `0`).
    resource_version: Option<u64>,
    bookmarks: bool,
    send_initial_events: bool,
    timeout: Duration,
}

/// A parsed resource path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::from_path(group, version, plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    Some(Target {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

fn not_found_status(kind: Kind, name: &str) -> Response {
    let message = format!("{} \"{name}\" not found", kind.plural());
    let mut resp = status(404, "NotFound", &message);
    resp.body["details"] = json!({"name": name, "kind": kind.plural()});
    resp
}

fn parse_bool(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

fn encode_continue(snapshot: u64, rv: u64, offset: usize) -> String {
    let token = json!({"snapshot": snapshot, "rv": rv, "start": offset}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Option<(u64, u64, usize)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v.get("snapshot")?.as_u64()?,
        v.get("rv")?.as_u64()?,
        usize::try_from(v.get("start")?.as_u64()?).ok()?,
    ))
}

const EXPIRED_MESSAGE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";

impl Shared {
    /// Whether `req` on `stream` may be served: a verified client certificate (when accepted),
    /// else an accepted bearer token; counted in [`AuthCounts`].
    fn authenticated(&self, req: &Request, stream: &Stream) -> bool {
        let authn = &self.authn;
        if !authn.required {
            return true;
        }
        let by_certificate = authn.client_certificates && stream.client_certificate();
        let by_token = !by_certificate
            && req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|token| lock(&authn.tokens).iter().any(|t| t == token));
        let mut counts = lock(&authn.counts);
        if by_certificate {
            counts.client_certificate += 1;
        } else if by_token {
            counts.bearer_token += 1;
        } else {
            counts.unauthorized += 1;
        }
        by_certificate || by_token
    }

    fn count(&self, kind: Kind, verb: Verb) {
        *lock(&self.counters).entry((kind, verb)).or_insert(0) += 1;
    }

    fn sleep_delay(&self) {
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
        let end = Instant::now() + delay;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(20)));
        }
    }

    fn set_down(&self, down: bool, except: Option<u64>) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for (id, conn) in lock(&self.conns).iter() {
                if Some(*id) != except {
                    let _ = conn.stream.shutdown(Shutdown::Both);
                }
            }
            self.changed.notify_all();
        }
    }

    fn served(&self, kind: Kind) -> bool {
        self.unserved.load(Ordering::SeqCst) & (1u64 << (kind as u8)) == 0
    }

    fn route(&self, req: &Request) -> Routed {
        let path = req.path.trim_end_matches('/');
        let injected = self.error_status.load(Ordering::SeqCst);
        if injected != 0 {
            // Counted like served requests, so tests can see a client's retries.
            if let Some(target) = parse_target(path) {
                let verb = match (req.method.as_str(), target.name.is_some()) {
                    ("PATCH", _) => Some(Verb::Patch),
                    ("GET", true) => Some(Verb::Get),
                    ("GET", false) if parse_bool(req.param("watch")) => Some(Verb::Watch),
                    ("GET", false) => Some(Verb::List),
                    _ => None,
                };
                if let Some(verb) = verb {
                    self.count(target.kind, verb);
                }
            }
            let code = u16::try_from(injected).unwrap_or(500);
            let reason = match code {
                429 => "TooManyRequests",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            };
            return Routed::Response(status(
                code,
                reason,
                &format!("injected by the fake API server (set_error_status {code})"),
            ));
        }
        if req.method == "GET" {
            if let Some(resp) = self.discovery(path) {
                return Routed::Response(resp);
            }
        }
        let Some(target) = parse_target(path).filter(|t| self.served(t.kind)) else {
            return Routed::Response(status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ));
        };
        match (req.method.as_str(), &target.name) {
            ("GET", None) => {
                let filter = match self.filter(req, &target) {
                    Ok(f) => f,
                    Err(resp) => return Routed::Response(resp),
                };
                if parse_bool(req.param("watch")) {
                    self.count(target.kind, Verb::Watch);
                    let rv = req.param("resourceVersion").unwrap_or("");
                    let resource_version = match rv {
                        "" | "0" => None,
                        rv => match rv.parse::<u64>() {
                            Ok(rv) => Some(rv),
                            Err(_) => {
                                return Routed::Response(status(
                                    400,
                                    "BadRequest",
                                    &format!("invalid resourceVersion {rv:?}"),
                                ))
                            }
                        },
                    };
                    let max = Duration::from_millis(self.max_watch_ms.load(Ordering::SeqCst));
                    let timeout = req
                        .param("timeoutSeconds")
                        .and_then(|s| s.parse::<u64>().ok())
                        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs)
                        .min(max);
                    Routed::Watch(WatchRequest {
                        kind: target.kind,
                        filter,
                        resource_version,
                        bookmarks: parse_bool(req.param("allowWatchBookmarks")),
                        send_initial_events: parse_bool(req.param("sendInitialEvents")),
                        timeout,
                    })
                } else {
                    self.count(target.kind, Verb::List);
                    Routed::Response(self.list(req, target.kind, &filter))
                }
            }
            ("GET", Some(name)) => {
                self.count(target.kind, Verb::Get);
                Routed::Response(self.get_one(&target, name))
            }
            ("PATCH", Some(name)) => {
                self.count(target.kind, Verb::Patch);
                Routed::Response(self.patch(req, &target, name))
            }
            (method, _) => Routed::Response(status(
                405,
                "MethodNotAllowed",
                &format!(
                    "the fake API server does not serve {method} on {path}; it serves GET (list, watch, get) and PATCH"
                ),
            )),
        }
    }

    fn filter(&self, req: &Request, target: &Target) -> Result<Filter, Response> {
        let labels = parse_label_selector(req.param("labelSelector").unwrap_or(""))
            .map_err(|e| status(400, "BadRequest", &e))?;
        let fields = parse_field_selector(target.kind, req.param("fieldSelector").unwrap_or(""))
            .map_err(|e| status(400, "BadRequest", &e))?;
        Ok(Filter {
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn discovery(&self, path: &str) -> Option<Response> {
        let resources = |group: &str, version: &str| -> Vec<Value> {
            Kind::ALL
                .into_iter()
                .filter(|k| k.group() == group && k.version() == version && self.served(*k))
                .map(|k| {
                    json!({
                        "name": k.plural(),
                        "singularName": k.name().to_ascii_lowercase(),
                        "namespaced": k.namespaced(),
                        "kind": k.name(),
                        "verbs": ["get", "list", "watch", "patch"],
                    })
                })
                .collect()
        };
        let resp = match path {
            "/version" => json!({
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-sluice-fake",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
            "/api" => json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.addr.to_string()}
                ],
            }),
            "/apis" => {
                let mut groups: Vec<Value> = Vec::new();
                for k in Kind::ALL {
                    if k.group().is_empty()
                        || !self.served(k)
                        || groups.iter().any(|g| g["name"] == k.group())
                    {
                        continue;
                    }
                    let gv = json!({"groupVersion": k.api_version(), "version": k.version()});
                    groups.push(json!({
                        "name": k.group(),
                        "versions": [gv.clone()],
                        "preferredVersion": gv,
                    }));
                }
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
            }
            "/api/v1" => json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "v1",
                "resources": resources("", "v1"),
            }),
            _ => {
                let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
                let ["apis", group, version] = segs.as_slice() else {
                    return None;
                };
                let list = resources(group, version);
                if list.is_empty() {
                    return Some(status(
                        404,
                        "NotFound",
                        &format!("the server could not find the requested resource ({path})"),
                    ));
                }
                json!({
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": format!("{group}/{version}"),
                    "resources": list,
                })
            }
        };
        Some(ok(resp))
    }

    fn list(&self, req: &Request, kind: Kind, filter: &Filter) -> Response {
        let limit = req
            .param("limit")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let mut store = lock(&self.store);
        let (snapshot_id, rv, items, start) = match req.param("continue").filter(|c| !c.is_empty())
        {
            Some(token) => {
                let Some((id, rv, start)) = decode_continue(token) else {
                    return status(400, "BadRequest", "invalid continue token");
                };
                if rv < store.compacted_rv {
                    return status(410, "Expired", EXPIRED_MESSAGE);
                }
                let Some(snap) = store.snapshots.iter().find(|s| s.id == id && s.rv == rv) else {
                    return status(410, "Expired", EXPIRED_MESSAGE);
                };
                (Some(id), rv, Arc::clone(&snap.items), start)
            }
            None => {
                let exact = req.param("resourceVersionMatch") == Some("Exact");
                let asked = req
                    .param("resourceVersion")
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|rv| *rv > 0);
                let (rv, state) = match asked {
                    Some(rv) if exact && rv < store.rv => match store.state_at(kind, rv) {
                        Some(state) => (rv, state),
                        None => {
                            return status(
                                410,
                                "Expired",
                                &format!("too old resource version: {rv} ({})", store.compacted_rv),
                            )
                        }
                    },
                    _ => {
                        let state = store
                            .objects
                            .iter()
                            .filter(|(k, _)| k.0 == kind)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        (store.rv, state)
                    }
                };
                let items: Vec<Value> = state
                    .into_values()
                    .filter(|o| filter.matches(o))
                    .map(|mut o| {
                        if let Some(map) = o.as_object_mut() {
                            map.remove("apiVersion");
                            map.remove("kind");
                        }
                        o
                    })
                    .collect();
                (None, rv, Arc::new(items), 0)
            }
        };
        let end = limit.map_or(items.len(), |l| start.saturating_add(l).min(items.len()));
        let page: Vec<Value> = items.get(start..end).unwrap_or_default().to_vec();
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), rv.to_string().into());
        if end < items.len() {
            let id = match snapshot_id {
                Some(id) => id,
                None => {
                    store.next_snapshot += 1;
                    let id = store.next_snapshot;
                    store.snapshots.push_back(ListSnapshot {
                        id,
                        rv,
                        items: Arc::clone(&items),
                    });
                    while store.snapshots.len() > MAX_LIST_SNAPSHOTS {
                        store.snapshots.pop_front();
                    }
                    id
                }
            };
            metadata.insert("continue".into(), encode_continue(id, rv, end).into());
            metadata.insert("remainingItemCount".into(), (items.len() - end).into());
        } else if let Some(id) = snapshot_id {
            store.snapshots.retain(|s| s.id != id);
        }
        ok(json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": page,
        }))
    }

    fn key_of(target: &Target, name: &str) -> ObjKey {
        let ns = if target.kind.namespaced() {
            target.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        (target.kind, ns, name.to_owned())
    }

    fn get_one(&self, target: &Target, name: &str) -> Response {
        if target.kind.namespaced() && target.namespace.is_none() {
            return status(
                404,
                "NotFound",
                &format!(
                    "{} is namespaced: use /namespaces/NS/{}/{name}",
                    target.kind.plural(),
                    target.kind.plural()
                ),
            );
        }
        match lock(&self.store).objects.get(&Self::key_of(target, name)) {
            Some(o) => ok(o.clone()),
            None => not_found_status(target.kind, name),
        }
    }

    fn patch(&self, req: &Request, target: &Target, name: &str) -> Response {
        let content_type = req
            .header("content-type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let body: Option<Value> = serde_json::from_slice(&req.body).ok();
        let resp = self.apply_patch(&content_type, body.as_ref(), target, name);
        lock(&self.patches).push(PatchRecord {
            kind: target.kind,
            namespace: target.namespace.clone(),
            name: name.to_owned(),
            content_type,
            body: body.unwrap_or(Value::Null),
            status: resp.status,
        });
        resp
    }

    fn apply_patch(
        &self,
        content_type: &str,
        body: Option<&Value>,
        target: &Target,
        name: &str,
    ) -> Response {
        match content_type {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {}
            other => {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake API server does not take {other:?} patches; use application/merge-patch+json"),
                )
            }
        }
        let Some(patch) = body.filter(|b| b.is_object()) else {
            return status(
                400,
                "BadRequest",
                "the patch body is not a JSON object (YAML apply patches must be sent as JSON)",
            );
        };
        if target.kind.namespaced() && target.namespace.is_none() {
            return not_found_status(target.kind, name);
        }
        let key = Self::key_of(target, name);
        let resp = {
            let mut store = lock(&self.store);
            let Some(current) = store.objects.get(&key).cloned() else {
                return not_found_status(target.kind, name);
            };
            let mut merged = current.clone();
            merge_patch(&mut merged, patch);
            // Identity fields cannot be changed by a patch.
            for field in ["name", "namespace", "uid", "creationTimestamp"] {
                match current.get("metadata").and_then(|m| m.get(field)) {
                    Some(v) => set_meta(&mut merged, field, v.clone()),
                    None => {
                        if let Some(meta) =
                            merged.get_mut("metadata").and_then(Value::as_object_mut)
                        {
                            meta.remove(field);
                        }
                    }
                }
            }
            if let Some(map) = merged.as_object_mut() {
                map.insert("apiVersion".into(), target.kind.api_version().into());
                map.insert("kind".into(), target.kind.name().into());
            }
            store.put(target.kind, key.clone(), merged, true);
            match store.objects.get(&key) {
                Some(o) => ok(o.clone()),
                None => not_found_status(target.kind, name),
            }
        };
        self.changed.notify_all();
        resp
    }

    /// Streams a watch until its timeout, a stop, a compaction behind it, or a write error.
    fn stream_watch(
        &self,
        out: &mut Stream,
        watch: &WatchRequest,
        generation: u64,
    ) -> io::Result<()> {
        let started = Instant::now();
        let deadline = started + watch.timeout;
        out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache, private\r\n\r\n",
        )?;
        out.flush()?;
        let send = |out: &mut Stream, ty: &str, object: &Value| -> io::Result<()> {
            let mut line = json!({"type": ty, "object": object}).to_string();
            line.push('\n');
            write_chunk(out, line.as_bytes())
        };
        let bookmark = |rv: u64, initial_end: bool| -> Value {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"kind": watch.kind.name(), "apiVersion": watch.kind.api_version(), "metadata": meta})
        };
        let gone = |rv: u64, compacted: u64| {
            status_value(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({compacted})"),
            )
        };
        // Where the stream starts.
        let (mut pos, initial) = {
            let store = lock(&self.store);
            match watch.resource_version {
                Some(rv) if rv < store.compacted_rv => {
                    let status = gone(rv, store.compacted_rv);
                    drop(store);
                    send(out, "ERROR", &status)?;
                    return write_chunk(out, b"");
                }
                Some(rv) => (rv, Vec::new()),
                None => {
                    let initial: Vec<Value> = store
                        .objects
                        .iter()
                        .filter(|(k, o)| k.0 == watch.kind && watch.filter.matches(o))
                        .map(|(_, o)| o.clone())
                        .collect();
                    (store.rv, initial)
                }
            }
        };
        for object in &initial {
            send(out, "ADDED", object)?;
        }
        if watch.send_initial_events && watch.bookmarks {
            send(out, "BOOKMARK", &bookmark(pos, true))?;
        }
        let interval = Duration::from_millis(self.bookmark_ms.load(Ordering::SeqCst));
        let mut next_bookmark = Instant::now() + interval;
        loop {
            if self.stop.load(Ordering::SeqCst)
                || self.down.load(Ordering::SeqCst)
                || self.watch_generation.load(Ordering::SeqCst) != generation
            {
                // Abrupt end: no final chunk.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "watch dropped",
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let (events, current_rv) = {
                let mut store = lock(&self.store);
                if pos < store.compacted_rv {
                    let status = gone(pos, store.compacted_rv);
                    drop(store);
                    send(out, "ERROR", &status)?;
                    break;
                }
                let mut first = store.first_after(pos);
                if first == store.history.len() {
                    let wait = deadline.min(next_bookmark).saturating_duration_since(now);
                    store = self
                        .changed
                        .wait_timeout(store, wait.max(Duration::from_millis(1)))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                    if pos < store.compacted_rv {
                        continue;
                    }
                    first = store.first_after(pos);
                }
                let events: Vec<(EventType, Value)> = store
                    .history
                    .range(first..)
                    .filter(|e| e.kind == watch.kind)
                    .filter_map(|e| translate(e, &watch.filter))
                    .collect();
                (events, store.rv)
            };
            pos = pos.max(current_rv);
            for (ty, object) in &events {
                send(out, ty.as_str(), object)?;
            }
            // The bookmark interval is also the tick at which a silent stream checks whether
            // its client went away (a watch without bookmarks and events never writes).
            if Instant::now() >= next_bookmark {
                if watch.bookmarks {
                    send(out, "BOOKMARK", &bookmark(pos, false))?;
                } else if peer_closed(out.tcp()) {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "watch client went away",
                    ));
                }
                next_bookmark = Instant::now() + interval;
            }
        }
        write_chunk(out, b"")
    }

    fn control(&self, conn: u64, path: &str, req: &Request) -> Response {
        let body: Option<Value> = serde_json::from_slice(&req.body).ok();
        let done = || ok(json!({"resourceVersion": lock(&self.store).rv.to_string()}));
        let bad = |msg: String| status(400, "BadRequest", &msg);
        let kind_param = || {
            let name = req.param("kind").unwrap_or("");
            Kind::from_name(name).ok_or_else(|| {
                bad(format!(
                    "unknown kind {name:?}; give ?kind= one of Node, Namespace, Pod, Service, EndpointSlice, NetworkPolicy, HostNetworkPolicy"
                ))
            })
        };
        let result: Result<Response, Response> = (|| match (req.method.as_str(), path) {
            ("POST", "apply") => {
                let body = body.ok_or_else(|| bad("body is not JSON".into()))?;
                let objects = match body.get("items").and_then(Value::as_array) {
                    Some(items) => items.clone(),
                    None => vec![body],
                };
                for object in objects {
                    let (kind, key, object) = normalize(object).map_err(|e| bad(e.to_string()))?;
                    lock(&self.store).put(kind, key, object, true);
                }
                self.changed.notify_all();
                Ok(done())
            }
            ("POST", "insert-raw") => {
                let kind = kind_param()?;
                let object = body.ok_or_else(|| bad("body is not JSON".into()))?;
                let mut store = lock(&self.store);
                let meta = object.get("metadata");
                let name = match meta.and_then(|m| m.get("name")).and_then(Value::as_str) {
                    Some(n) => n.to_owned(),
                    None => {
                        store.next_raw += 1;
                        format!("raw-{}", store.next_raw)
                    }
                };
                let ns = meta
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                store.put(kind, (kind, ns, name), object, false);
                drop(store);
                self.changed.notify_all();
                Ok(done())
            }
            ("POST", "delete") => {
                let kind = kind_param()?;
                let name = req.param("name").ok_or_else(|| bad("give ?name=".into()))?;
                let ns = if kind.namespaced() {
                    req.param("namespace").unwrap_or("default")
                } else {
                    ""
                };
                let key = (kind, ns.to_owned(), name.to_owned());
                if lock(&self.store).remove(&key).is_none() {
                    return Err(not_found_status(kind, name));
                }
                self.changed.notify_all();
                Ok(done())
            }
            ("POST", "compact") => {
                let mut store = lock(&self.store);
                store.compacted_rv = store.rv;
                store.history.clear();
                store.snapshots.clear();
                drop(store);
                self.changed.notify_all();
                Ok(done())
            }
            ("POST", "drop-watches") => {
                self.watch_generation.fetch_add(1, Ordering::SeqCst);
                for conn in lock(&self.conns).values() {
                    if conn.watching {
                        let _ = conn.stream.shutdown(Shutdown::Both);
                    }
                }
                self.changed.notify_all();
                Ok(done())
            }
            ("POST", "delay") => {
                let ms = req
                    .param("ms")
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("give ?ms=MILLISECONDS".into()))?;
                self.delay_ms.store(ms, Ordering::SeqCst);
                Ok(done())
            }
            ("POST", "error") => {
                let code = req
                    .param("code")
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| bad("give ?code=HTTP_STATUS (0 serves again)".into()))?;
                self.error_status.store(u64::from(code), Ordering::SeqCst);
                Ok(done())
            }
            ("POST", "served") => {
                let kind = kind_param()?;
                let bit = 1u64 << (kind as u8);
                match req.param("on") {
                    Some("true" | "1") => self.unserved.fetch_and(!bit, Ordering::SeqCst),
                    Some("false" | "0") => self.unserved.fetch_or(bit, Ordering::SeqCst),
                    _ => return Err(bad("give ?on=true or ?on=false".into())),
                };
                Ok(done())
            }
            ("POST", "down") => {
                let on = match req.param("on") {
                    Some("true" | "1") => true,
                    Some("false" | "0") => false,
                    _ => return Err(bad("give ?on=true or ?on=false".into())),
                };
                self.set_down(on, Some(conn));
                Ok(done())
            }
            ("GET", "counters") => {
                let counters: Vec<Value> = lock(&self.counters)
                    .iter()
                    .map(|((k, v), n)| json!({"kind": k.name(), "verb": v.as_str(), "count": n}))
                    .collect();
                Ok(ok(json!({"counters": counters})))
            }
            ("GET", "patches") => {
                let patches: Vec<Value> = lock(&self.patches)
                    .iter()
                    .map(|p| {
                        json!({"kind": p.kind.name(), "namespace": p.namespace, "name": p.name,
                               "contentType": p.content_type, "body": p.body, "status": p.status})
                    })
                    .collect();
                Ok(ok(json!({"patches": patches})))
            }
            (method, path) => Err(status(
                404,
                "NotFound",
                &format!("no control endpoint {method} /fake/{path}"),
            )),
        })();
        result.unwrap_or_else(|e| e)
    }
}

/// The event a watch with `filter` sees for `event`, if any.
fn translate(event: &HistoryEvent, filter: &Filter) -> Option<(EventType, Value)> {
    let now = filter.matches(&event.object);
    match event.ty {
        EventType::Added => now.then(|| (EventType::Added, event.object.clone())),
        EventType::Deleted => now.then(|| (EventType::Deleted, event.object.clone())),
        EventType::Modified => {
            let before = event.previous.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some((EventType::Modified, event.object.clone())),
                (false, true) => Some((EventType::Added, event.object.clone())),
                (true, false) => Some((EventType::Deleted, event.object.clone())),
                (false, false) => None,
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(map) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        let mut target = json!({"a": [1, 2]});
        merge_patch(&mut target, &json!({"a": [3], "n": {"x": 1}}));
        assert_eq!(target, json!({"a": [3], "n": {"x": 1}}));
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let sel = |s: &str| Filter {
            labels: parse_label_selector(s).expect("selector parses"),
            ..Filter::default()
        };
        assert!(sel("app").matches(&obj));
        assert!(!sel("!app").matches(&obj));
        assert!(sel("app=web,tier==front").matches(&obj));
        assert!(!sel("app!=web").matches(&obj));
        assert!(sel("app in (db, web),env notin (prod)").matches(&obj));
        assert!(!sel("app notin (web)").matches(&obj));
        assert!(sel("").matches(&obj));
        assert!(parse_label_selector("a b c").is_err());
    }

    #[test]
    fn field_selectors_refuse_unsupported_fields() {
        assert!(parse_field_selector(Kind::Pod, "spec.nodeName=n1").is_ok());
        assert!(parse_field_selector(Kind::Service, "spec.nodeName=n1").is_err());
        let f = Filter {
            fields: parse_field_selector(Kind::Pod, "spec.nodeName=n1,metadata.name!=b")
                .expect("parses"),
            ..Filter::default()
        };
        assert!(f.matches(&json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}})));
        assert!(!f.matches(&json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n1"}})));
        assert!(!f.matches(&json!({"metadata": {"name": "a"}, "spec": {}})));
    }

    #[test]
    fn paths_parse_like_the_api() {
        let t = parse_target("/api/v1/namespaces/kube-system/pods/web").expect("parses");
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Pod, Some("kube-system"), Some("web"))
        );
        let t = parse_target("/api/v1/namespaces/kube-system").expect("parses");
        assert_eq!(
            (t.kind, t.name.as_deref()),
            (Kind::Namespace, Some("kube-system"))
        );
        let t =
            parse_target("/apis/policy.sluice.io/v1alpha1/hostnetworkpolicies").expect("parses");
        assert_eq!(t.kind, Kind::HostNetworkPolicy);
        assert!(parse_target("/apis/discovery.k8s.io/v1beta1/endpointslices").is_none());
        assert!(parse_target("/api/v1/namespaces/x/nodes").is_none());
    }

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(
            decode_continue(&encode_continue(3, 17, 500)),
            Some((3, 17, 500))
        );
        assert_eq!(decode_continue("not base64!"), None);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("app%3Dweb%2Ctier+x"), "app=web,tier x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn history_reconstructs_past_states() {
        let mut store = Store::default();
        let key = |n: &str| (Kind::Pod, "default".to_owned(), n.to_owned());
        let pod = |n: &str, v: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "namespace": "default", "labels": {"v": v}}});
        let rv1 = store.put(Kind::Pod, key("a"), pod("a", "1"), true);
        store.put(Kind::Pod, key("a"), pod("a", "2"), true);
        store.put(Kind::Pod, key("b"), pod("b", "1"), true);
        store.remove(&key("a"));
        let at1 = store.state_at(Kind::Pod, rv1).expect("history reaches");
        assert_eq!(at1.len(), 1);
        assert_eq!(at1[&key("a")]["metadata"]["labels"]["v"], "1");
        store.compacted_rv = store.rv;
        assert!(store.state_at(Kind::Pod, rv1).is_none());
    }
}
