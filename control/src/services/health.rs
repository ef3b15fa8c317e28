//! healthCheckNodePort: what kube-proxy's `pkg/proxy/healthcheck/service_health.go` serves.
//! For every Service with `externalTrafficPolicy: Local` and a `spec.healthCheckNodePort`, an
//! HTTP server on `<bind address>:<port>` (kube-proxy: `0.0.0.0` when `nodePortAddresses` is
//! unset) tells external load balancers whether this node has a local endpoint:
//!
//! ```text
//! GET <anything>  ->  200 OK (N > 0) | 503 Service Unavailable (N == 0)
//!   Content-Type: application/json
//!   X-Content-Type-Options: nosniff
//!   X-Load-Balancing-Endpoint-Weight: N
//!   {"service":{"namespace":"default","name":"web"},"localEndpoints":N,"serviceProxyHealthy":true}
//! ```
//!
//! N is counted as kube-proxy's `EndpointsMap.LocalReadyEndpoints`: distinct *addresses* of
//! endpoints on this node that are ready (terminating ones do not count, "the health check
//! signal should fail if there are only terminating endpoints on a node"), over all ports of
//! the Service, so 10.0.0.1:80 and 10.0.0.1:443 are one endpoint. In the plan that is
//! [`BackendState::Active`] and [`Backend::local`] (`publishNotReadyAddresses` makes every
//! endpoint Active, as kube-proxy treats them as ready).
//!
//! Design: one thread serves every port with non-blocking listeners and connections driven by
//! `poll(2)`; [`HealthServer::update`] reconciles the listeners against a plan (opens new
//! ports, closes removed ones, changes counts in place without reopening) under a mutex that
//! the thread takes only briefly. Limits: at most [`MAX_CONNECTIONS`] open client connections
//! (more wait in the listen backlog), requests up to [`REQUEST_MAX_BYTES`], and each connection
//! closed after the client timeout, so a slow client cannot hold the server.
//! `serviceProxyHealthy` is always `true`: the agent answers only while its control loop runs.
//! A port that cannot be bound is reported and retried on the next update (kube-proxy does the
//! same on its next sync).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BackendState, ServicePlan};

/// How long a client may take to send its request and read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Client connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head read; a longer one closes the connection.
pub const REQUEST_MAX_BYTES: usize = 8 * 1024;
/// Connections accepted per listener per poll round (fairness between ports).
const ACCEPT_BATCH: usize = 16;
/// How long [`HealthServer::update`] waits for the serving thread to drop closed listeners.
const UPDATE_SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest poll when no connection has a deadline sooner.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Errors of the healthCheckNodePort server.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "healthCheckNodePort {port} of Service {service}: cannot listen on {address}:{port}: \
         {source}; free the port (another process holds it) or give the Service another \
         spec.healthCheckNodePort"
    )]
    Bind {
        service: String,
        address: Ipv4Addr,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error(
        "healthCheckNodePort {port} of Service {service} is also claimed by Service {owner}, \
         which is answered on it; give one of them another spec.healthCheckNodePort"
    )]
    Conflict {
        service: String,
        owner: String,
        port: u16,
    },
    #[error("healthCheckNodePort server: creating its wake-up socket pair: {source}")]
    Wake {
        #[source]
        source: io::Error,
    },
    #[error("healthCheckNodePort server: starting its thread: {source}")]
    Spawn {
        #[source]
        source: io::Error,
    },
}

/// One health check to serve: a Service's port and its local ready endpoint count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Distinct addresses of this node's ready endpoints of the Service.
    pub local_endpoints: usize,
}

impl HealthCheck {
    /// `namespace/name`.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A port being served, as [`HealthServer::ports`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPort {
    pub check: HealthCheck,
    /// Which bind opened the listener (increases with every bind): equal across updates when
    /// the listener was kept open.
    pub listener_id: u64,
}

/// The health checks `plan` asks for, sorted by port, one per Service (all ports of a Service
/// share its `healthCheckNodePort`). A port claimed by two Services goes to the first in plan
/// order; the other is reported as [`HealthError::Conflict`].
pub fn health_checks(plan: &ServicePlan) -> (Vec<HealthCheck>, Vec<HealthError>) {
    // (namespace, name) -> (port, distinct local ready addresses).
    let mut by_service: BTreeMap<(&str, &str), (u16, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
    for entry in &plan.services {
        let Some(port) = entry.health_check_node_port else {
            continue;
        };
        let (_, addresses) = by_service
            .entry((entry.namespace.as_str(), entry.name.as_str()))
            .or_insert_with(|| (port, BTreeSet::new()));
        addresses.extend(
            entry
                .backends
                .iter()
                .filter(|b| b.local && b.state == BackendState::Active)
                .map(|b| b.address),
        );
    }
    let mut checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    let mut errors = Vec::new();
    for ((namespace, name), (port, addresses)) in by_service {
        if let Some(owner) = checks.get(&port) {
            errors.push(HealthError::Conflict {
                service: format!("{namespace}/{name}"),
                owner: owner.service_key(),
                port,
            });
            continue;
        }
        checks.insert(
            port,
            HealthCheck {
                port,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                local_endpoints: addresses.len(),
            },
        );
    }
    (checks.into_values().collect(), errors)
}

struct Instance {
    check: HealthCheck,
    listener: TcpListener,
    listener_id: u64,
}

#[derive(Default)]
struct State {
    ports: BTreeMap<u16, Instance>,
    next_listener_id: u64,
    /// Bumped by every update; the thread copies it into `epoch_seen` each time it starts a
    /// new poll round (so listeners closed before the bump are no longer polled).
    epoch_requested: u64,
    epoch_seen: u64,
}

struct Shared {
    state: Mutex<State>,
    synced: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The healthCheckNodePort listeners of one node and the thread serving them.
pub struct HealthServer {
    shared: Arc<Shared>,
    bind_address: Ipv4Addr,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Starts the serving thread with no port open. Ports are opened on `bind_address`
    /// (`0.0.0.0` in the agent, as kube-proxy); a client gets `client_timeout` to send its
    /// request and read the answer.
    pub fn start(bind_address: Ipv4Addr, client_timeout: Duration) -> Result<Self, HealthError> {
        let (wake, wake_rx) = UnixStream::pair().map_err(|source| HealthError::Wake { source })?;
        wake.set_nonblocking(true)
            .and_then(|()| wake_rx.set_nonblocking(true))
            .map_err(|source| HealthError::Wake { source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            synced: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sluice-health".into())
            .spawn(move || serve(&thread_shared, &wake_rx, client_timeout))
            .map_err(|source| HealthError::Spawn { source })?;
        Ok(Self {
            shared,
            bind_address,
            wake,
            thread: Some(thread),
        })
    }

    /// Reconciles the listeners with `plan`: closes ports no longer asked for (or now another
    /// Service's), opens new ones, and changes the counts of kept ones in place. Returns the
    /// ports that could not be served (bind failures, conflicts); the others are applied
    /// anyway. When it returns, closed ports refuse connections.
    pub fn update(&mut self, plan: &ServicePlan) -> Vec<HealthError> {
        let (checks, mut errors) = health_checks(plan);
        let target = {
            let mut state = self.shared.lock();
            state.ports.retain(|port, instance| {
                let keep = checks.iter().any(|c| {
                    c.port == *port
                        && c.namespace == instance.check.namespace
                        && c.name == instance.check.name
                });
                if !keep {
                    tracing::info!(port, service = %instance.check.service_key(), "closing healthCheckNodePort");
                }
                keep
            });
            for check in checks {
                if let Some(instance) = state.ports.get_mut(&check.port) {
                    instance.check.local_endpoints = check.local_endpoints;
                    continue;
                }
                match self.bind(check.port) {
                    Ok(listener) => {
                        tracing::info!(port = check.port, service = %check.service_key(), local_endpoints = check.local_endpoints, "serving healthCheckNodePort");
                        state.next_listener_id += 1;
                        let listener_id = state.next_listener_id;
                        state.ports.insert(
                            check.port,
                            Instance {
                                check,
                                listener,
                                listener_id,
                            },
                        );
                    }
                    Err(source) => errors.push(HealthError::Bind {
                        service: check.service_key(),
                        address: self.bind_address,
                        port: check.port,
                        source,
                    }),
                }
            }
            state.epoch_requested += 1;
            state.epoch_requested
        };
        self.wake_thread();
        // Wait until the thread polls the new set: a listener it was polling holds its socket
        // open (the kernel keeps a file reference per poll wait) until that poll returns.
        let state = self.shared.lock();
        let _ = self
            .shared
            .synced
            .wait_timeout_while(state, UPDATE_SYNC_TIMEOUT, |s| {
                s.epoch_seen < target && self.thread.as_ref().is_some_and(|t| !t.is_finished())
            });
        errors
    }

    /// The ports being served, by port.
    pub fn ports(&self) -> Vec<ServedPort> {
        self.shared
            .lock()
            .ports
            .values()
            .map(|i| ServedPort {
                check: i.check.clone(),
                listener_id: i.listener_id,
            })
            .collect()
    }

    /// Closes every port and stops the thread (also done on drop).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wake_thread();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.lock().ports.clear();
    }

    fn bind(&self, port: u16) -> io::Result<TcpListener> {
        // std sets SO_REUSEADDR, so a port closed a moment ago can be opened again.
        let listener = TcpListener::bind(SocketAddrV4::new(self.bind_address, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    fn wake_thread(&self) {
        // A full socket buffer already means a pending wake-up.
        let _ = (&self.wake).write(&[1]);
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One client connection: read the request head, then write the answer, then close.
struct Conn {
    stream: TcpStream,
    port: u16,
    request: Vec<u8>,
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
    done: bool,
}

/// The body kube-proxy writes (field order as kube-proxy's).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The HTTP answer for `check` (`head`: no body, as HTTP wants for HEAD).
fn answer(check: &HealthCheck, head: bool) -> Vec<u8> {
    let body = serde_json::to_string_pretty(&Body {
        service: ServiceName {
            namespace: &check.namespace,
            name: &check.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    })
    .unwrap_or_default();
    let status = if check.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: \
         nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n",
        check.local_endpoints,
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn head_end(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
}

impl Conn {
    /// Reads what is there; once the head is complete, answers from the current state.
    fn progress(&mut self, shared: &Shared) {
        if self.answer.is_none() {
            let mut buf = [0u8; 1024];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => {
                        self.done = true;
                        return;
                    }
                    Ok(n) => {
                        self.request
                            .extend_from_slice(buf.get(..n).unwrap_or_default());
                        if head_end(&self.request) {
                            break;
                        }
                        if self.request.len() > REQUEST_MAX_BYTES {
                            self.done = true;
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.done = true;
                        return;
                    }
                }
            }
            let head = self.request.starts_with(b"HEAD ");
            let check = shared.lock().ports.get(&self.port).map(|i| i.check.clone());
            match check {
                Some(check) => self.answer = Some((answer(&check, head), 0)),
                // The port was closed while this client waited: nothing to say.
                None => {
                    self.done = true;
                    return;
                }
            }
        }
        if let Some((bytes, written)) = &mut self.answer {
            while *written < bytes.len() {
                match self.stream.write(bytes.get(*written..).unwrap_or_default()) {
                    Ok(0) => {
                        self.done = true;
                        return;
                    }
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.done = true;
                        return;
                    }
                }
            }
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.done = true;
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// The serving thread: poll the wake-up socket, the listeners and the connections.
fn serve(shared: &Shared, wake: &UnixStream, client_timeout: Duration) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        fds.clear();
        fds.push(pollfd(wake.as_raw_fd(), libc::POLLIN));
        {
            let mut state = shared.lock();
            state.epoch_seen = state.epoch_requested;
            shared.synced.notify_all();
            if conns.len() < MAX_CONNECTIONS {
                fds.extend(
                    state
                        .ports
                        .values()
                        .map(|i| pollfd(i.listener.as_raw_fd(), libc::POLLIN)),
                );
            }
        }
        let listeners = fds.len() - 1;
        fds.extend(conns.iter().map(|c| {
            let events = if c.answer.is_some() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            pollfd(c.stream.as_raw_fd(), events)
        }));
        let now = Instant::now();
        let timeout = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE_POLL)
            .min(IDLE_POLL);
        let timeout_ms = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs for
        // the duration of the call; poll only writes their `revents`.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready < 0 {
            // EINTR: go round again; anything else is not expected from poll with valid args.
            continue;
        }
        let mut sink = [0u8; 64];
        while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}

        let accept = fds.iter().skip(1).take(listeners).any(|f| f.revents != 0);
        for (conn, fd) in conns.iter_mut().zip(fds.iter().skip(1 + listeners)) {
            if fd.revents != 0 {
                conn.progress(shared);
            }
        }
        if accept {
            accept_all(shared, &mut conns, client_timeout);
        }
        let now = Instant::now();
        conns.retain(|c| !c.done && c.deadline > now);
    }
}

/// Accepts what the listeners have (up to [`ACCEPT_BATCH`] each, [`MAX_CONNECTIONS`] in all)
/// and tries to answer at once.
fn accept_all(shared: &Shared, conns: &mut Vec<Conn>, client_timeout: Duration) {
    let mut accepted = Vec::new();
    {
        let state = shared.lock();
        for (port, instance) in &state.ports {
            for _ in 0..ACCEPT_BATCH {
                if conns.len() + accepted.len() >= MAX_CONNECTIONS {
                    break;
                }
                match instance.listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_ok() {
                            accepted.push(Conn {
                                stream,
                                port: *port,
                                request: Vec::new(),
                                answer: None,
                                deadline: Instant::now() + client_timeout,
                                done: false,
                            });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
    for mut conn in accepted {
        conn.progress(shared);
        if !conn.done {
            conns.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::parse_str;
    use crate::services::{translate, ServiceOptions};
    use std::net::SocketAddr;

    const NODES: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.244.1.0/24}
status:
  addresses: [{type: InternalIP, address: 172.18.0.11}]
---
apiVersion: v1
kind: Node
metadata: {name: node2}
spec: {podCIDR: 10.244.2.0/24}
status:
  addresses: [{type: InternalIP, address: 172.18.0.12}]
";

    /// An endpoint line of a slice: (address, node, ready, serving, terminating).
    type Ep = (&'static str, &'static str, bool, bool, bool);

    /// A LoadBalancer Service `name` with eTP Local, health port `hc`, two ports (http, https),
    /// and one slice with `endpoints` for both ports.
    fn objects(name: &str, etp: &str, hc: u16, endpoints: &[Ep]) -> String {
        let mut eps = String::new();
        for (address, node, ready, serving, terminating) in endpoints {
            eps.push_str(&format!(
                "- addresses: [{address}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, \
                 serving: {serving}, terminating: {terminating}}}\n"
            ));
        }
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.{last}
  externalTrafficPolicy: {etp}
  healthCheckNodePort: {hc}
  ports:
  - {{name: http, port: 80, nodePort: {np1}}}
  - {{name: https, port: 443, nodePort: {np2}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: https, port: 8443, protocol: TCP}}]
endpoints:
{eps}",
            last = 10 + name.bytes().map(u32::from).sum::<u32>() % 200,
            np1 = 30000 + hc % 1000,
            np2 = 31000 + hc % 1000,
        )
    }

    fn plan(docs: &[String]) -> ServicePlan {
        let text = format!("{NODES}---\n{}", docs.join("---\n"));
        match parse_str(&text, "cluster.yaml") {
            Ok(state) => translate(&state, "node1", &ServiceOptions::default()),
            Err(e) => panic!("fixture does not parse: {e}\n{text}"),
        }
    }

    const LOCAL_READY: Ep = ("10.244.1.5", "node1", true, true, false);
    const LOCAL_READY_2: Ep = ("10.244.1.6", "node1", true, true, false);
    const LOCAL_TERMINATING: Ep = ("10.244.1.7", "node1", false, true, true);
    const LOCAL_NOT_READY: Ep = ("10.244.1.8", "node1", false, false, false);
    const REMOTE_READY: Ep = ("10.244.2.5", "node2", true, true, false);

    /// A port that was free a moment ago on loopback.
    fn free_port() -> u16 {
        match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(a) => a.port(),
            Err(e) => panic!("no free port: {e}"),
        }
    }

    fn server() -> HealthServer {
        match HealthServer::start(Ipv4Addr::LOCALHOST, Duration::from_millis(500)) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn get(port: u16) -> io::Result<Reply> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nUser-Agent: test\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let Some((head, body)) = raw.split_once("\r\n\r\n") else {
            return Err(io::Error::other(format!("no head in {raw:?}")));
        };
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Reply {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    fn must_get(port: u16) -> Reply {
        match get(port) {
            Ok(r) => r,
            Err(e) => panic!("GET on port {port}: {e}"),
        }
    }

    fn body_json(reply: &Reply) -> serde_json::Value {
        match serde_json::from_str(&reply.body) {
            Ok(v) => v,
            Err(e) => panic!("body {:?} is not JSON: {e}", reply.body),
        }
    }

    #[test]
    fn counts_distinct_local_ready_addresses_over_all_ports() {
        let p = plan(&[
            objects(
                "web",
                "Local",
                32001,
                &[
                    LOCAL_READY,
                    LOCAL_READY_2,
                    LOCAL_TERMINATING,
                    LOCAL_NOT_READY,
                    REMOTE_READY,
                ],
            ),
            objects("cluster", "Cluster", 32002, &[LOCAL_READY]),
            objects("empty", "Local", 32003, &[REMOTE_READY]),
        ]);
        let (checks, errors) = health_checks(&p);
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<(u16, String, usize)> = checks
            .iter()
            .map(|c| (c.port, c.service_key(), c.local_endpoints))
            .collect();
        // Two ports each, but one endpoint per address; eTP Cluster has no health check.
        assert_eq!(
            got,
            [
                (32001, "shop/web".to_owned(), 2),
                (32003, "shop/empty".to_owned(), 0),
            ]
        );
    }

    #[test]
    fn a_port_claimed_twice_goes_to_the_first_service() {
        let p = plan(&[
            objects("alpha", "Local", 32010, &[LOCAL_READY]),
            objects("beta", "Local", 32010, &[LOCAL_READY]),
        ]);
        let (checks, errors) = health_checks(&p);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].service_key(), "shop/alpha");
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].contains("32010")
                && messages[0].contains("shop/beta")
                && messages[0].contains("shop/alpha"),
            "{messages:?}"
        );
    }

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let (up, down) = (free_port(), free_port());
        let mut s = server();
        let errors = s.update(&plan(&[
            objects("web", "Local", up, &[LOCAL_READY, LOCAL_TERMINATING]),
            objects("idle", "Local", down, &[LOCAL_TERMINATING, REMOTE_READY]),
        ]));
        assert!(errors.is_empty(), "{errors:?}");

        let r = must_get(up);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("1"));
        assert_eq!(
            r.header("Content-Length"),
            Some(r.body.len().to_string().as_str())
        );
        assert_eq!(
            body_json(&r),
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 1,
                "serviceProxyHealthy": true
            })
        );

        let r = must_get(down);
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(body_json(&r)["localEndpoints"], 0);
        assert_eq!(body_json(&r)["service"]["name"], "idle");
    }

    #[test]
    fn count_changes_without_reopening_and_removed_ports_close() {
        let (web_port, old_port) = (free_port(), free_port());
        let mut s = server();
        let errors = s.update(&plan(&[
            objects("web", "Local", web_port, &[LOCAL_READY]),
            objects("old", "Local", old_port, &[LOCAL_READY]),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(must_get(web_port).status, 200);
        assert_eq!(must_get(old_port).status, 200);
        let before = s.ports();
        assert_eq!(before.len(), 2);

        // web: two ready local endpoints now; old: gone.
        let errors = s.update(&plan(&[objects(
            "web",
            "Local",
            web_port,
            &[LOCAL_READY, LOCAL_READY_2],
        )]));
        assert!(errors.is_empty(), "{errors:?}");
        let after = s.ports();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].check.port, web_port);
        assert_eq!(after[0].check.local_endpoints, 2);
        let web_before = before.iter().find(|p| p.check.port == web_port);
        assert_eq!(
            web_before.map(|p| p.listener_id),
            Some(after[0].listener_id),
            "web's listener was reopened"
        );
        let r = must_get(web_port);
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("2"));
        assert_eq!(body_json(&r)["localEndpoints"], 2);
        let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, old_port));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "port {old_port} still open: {refused:?}"
        );

        // The last local endpoint goes: 503, still the same listener.
        let errors = s.update(&plan(&[objects(
            "web",
            "Local",
            web_port,
            &[LOCAL_TERMINATING],
        )]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(must_get(web_port).status, 503);
        assert_eq!(s.ports()[0].listener_id, after[0].listener_id);

        // eTP back to Cluster: no health check, port closed.
        let errors = s.update(&plan(&[objects(
            "web",
            "Cluster",
            web_port,
            &[LOCAL_READY],
        )]));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(s.ports().is_empty());
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, web_port)).is_err());
    }

    #[test]
    fn bind_conflict_is_reported_and_retried() {
        let taken = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let port = match taken.local_addr() {
            Ok(a) => a.port(),
            Err(e) => panic!("{e}"),
        };
        let free = free_port();
        let mut s = server();
        let p = plan(&[
            objects("web", "Local", port, &[LOCAL_READY]),
            objects("api", "Local", free, &[LOCAL_READY]),
        ]);
        let errors = s.update(&p);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            matches!(&errors[0], HealthError::Bind { port: p, service, .. }
                if *p == port && service == "shop/web"),
            "{errors:?}"
        );
        let message = errors[0].to_string();
        assert!(
            message.contains(&port.to_string()) && message.contains("shop/web"),
            "{message}"
        );
        // The other Service is served all the same.
        assert_eq!(must_get(free).status, 200);

        // Once the port is free, the next update opens it.
        drop(taken);
        let errors = s.update(&p);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(must_get(port).status, 200);
    }

    #[test]
    fn a_slow_client_does_not_block_others_and_is_cut_off() {
        let port = free_port();
        let mut s = server();
        let errors = s.update(&plan(&[objects("web", "Local", port, &[LOCAL_READY])]));
        assert!(errors.is_empty(), "{errors:?}");
        let mut slow = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let _ = slow.write_all(b"GET / HTTP/1.1\r\n"); // never finishes its head
        let started = Instant::now();
        assert_eq!(must_get(port).status, 200);
        assert!(started.elapsed() < Duration::from_millis(400));
        // The server closes the slow connection after its 500 ms client timeout.
        let _ = slow.set_read_timeout(Some(Duration::from_secs(5)));
        let mut rest = Vec::new();
        let read = slow.read_to_end(&mut rest);
        assert!(matches!(read, Ok(0)), "{read:?} {rest:?}");
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(400)..Duration::from_secs(4)).contains(&waited),
            "closed after {waited:?}"
        );
    }

    #[test]
    fn head_requests_get_headers_only_and_stop_closes_everything() {
        let port = free_port();
        let mut s = server();
        let errors = s.update(&plan(&[objects("web", "Local", port, &[LOCAL_READY])]));
        assert!(errors.is_empty(), "{errors:?}");
        let mut c = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = c.write_all(b"HEAD / HTTP/1.1\r\n\r\n");
        let mut raw = String::new();
        let _ = c.read_to_string(&mut raw);
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
        assert!(raw.ends_with("\r\n\r\n"), "HEAD answer has a body: {raw:?}");
        s.stop();
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }
}
