//! `control::kube::KubeSource` against the in-process API server (`control::kube::fake`): first
//! sync, batching, deletes, 410 relists, dropped watches, an API server that goes down, bad
//! objects, the Node annotation, the checkpoint YAML of a served state, and the RBAC file.
//! No root needed; every wait is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use control::cluster::{parse_str, ChangedKinds, ClusterState};
use control::kube::fake::{cluster_objects, FakeApi, Kind as FakeKind, Verb};
use control::kube::{KubeOptions, KubeSource, SourceEvent, API_CALLS};
use serde_json::{json, Value};

mod kube_support;
use kube_support::health_where;

/// Longest wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(15);
const BATCH: Duration = Duration::from_millis(30);

const FIXTURE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {kubernetes.io/hostname: node1}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node2, labels: {kubernetes.io/hostname: node2, pool: workers}}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {kubernetes.io/metadata.name: default}}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {kubernetes.io/metadata.name: prod}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web}}
spec:
  nodeName: node1
  containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080, protocol: TCP}]}]
status: {phase: Running, podIP: 10.244.1.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: prod, labels: {app: web}}
spec:
  nodeName: node2
  containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080, protocol: TCP}]}]
status: {phase: Running, podIP: 10.244.2.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  nodeName: node1
  containers: [{name: c, image: busybox}]
status: {phase: Running, podIP: 10.244.1.4}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.1.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: prod
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.3]
  conditions: {ready: true}
  nodeName: node1
  targetRef: {kind: Pod, namespace: prod, name: web-1}
- addresses: [10.244.2.3]
  conditions: {ready: true}
  nodeName: node2
  targetRef: {kind: Pod, namespace: prod, name: web-2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}, podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http, protocol: TCP}]
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: workers-ssh}
spec:
  nodeSelector: {matchLabels: {pool: workers}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
    ports: [{port: 22, protocol: TCP}]
"#;

fn fixture() -> ClusterState {
    parse_str(FIXTURE, "FIXTURE").expect("fixture parses")
}

/// Logs of every test in this binary (the source logs from its own thread, so the subscriber
/// is global); tests look for their own object names.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(buffer))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    })
}

struct LogWriter(&'static Mutex<Vec<u8>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        std::io::stderr().write_all(bytes)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(
        &logs()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned()
}

fn logs_mention(text: &str) -> bool {
    log_text().contains(text)
}

fn serve(state: &ClusterState) -> FakeApi {
    let api = FakeApi::start("127.0.0.1:0").expect("fake API server starts");
    api.sync(cluster_objects(state).expect("objects serialize"))
        .expect("fake accepts the fixture");
    api
}

fn options(url: String) -> KubeOptions {
    KubeOptions {
        api_server: Some(url),
        batch: BATCH,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
        ..KubeOptions::new("node1")
    }
}

fn start(url: String) -> KubeSource {
    logs();
    KubeSource::start(options(url)).expect("source starts")
}

/// The next `State` within `limit` (health events skipped), with the time it was received.
fn next_state(source: &KubeSource, limit: Duration) -> Option<(ClusterState, Instant, Instant)> {
    next_state_kinds(source, limit).map(|(s, f, r, _)| (s, f, r))
}

/// [`next_state`] with the kinds the source says changed.
fn next_state_kinds(
    source: &KubeSource,
    limit: Duration,
) -> Option<(ClusterState, Instant, Instant, ChangedKinds)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match source.recv_timeout(left)? {
            SourceEvent::State {
                state,
                first_change,
                changed,
            } => return Some((state, first_change, Instant::now(), changed)),
            SourceEvent::Health(_) => {}
        }
    }
}

/// States until one satisfies `done` (within `limit`): the API may deliver a change in steps.
fn state_where(
    source: &KubeSource,
    limit: Duration,
    done: impl Fn(&ClusterState) -> bool,
) -> ClusterState {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match next_state(source, left) {
            Some((state, _, _)) if done(&state) => return state,
            Some((state, _, _)) => last = Some(state),
            None => break,
        }
    }
    panic!("no matching state within {limit:?}; last state: {last:#?}");
}

/// The state without what the API server adds (resourceVersion, uid, creationTimestamp).
fn unserved(mut state: ClusterState) -> ClusterState {
    fn clear(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
        meta.resource_version = None;
        meta.uid = None;
        meta.creation_timestamp = None;
    }
    state
        .nodes
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .namespaces
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .pods
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .services
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .endpoint_slices
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .network_policies
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
        .host_policies
        .iter_mut()
        .for_each(|o| clear(&mut std::sync::Arc::make_mut(o).metadata));
    state
}

fn pod_names(state: &ClusterState) -> Vec<String> {
    state
        .pods
        .iter()
        .map(|p| ClusterState::pod_key(p))
        .collect()
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "extra"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

#[test]
fn first_full_sync_equals_the_served_objects_and_checkpoints_round_trip() {
    let expected = fixture();
    let api = serve(&expected);
    // Handed to another proxy: kube-proxy's rule leaves it out.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "other", "namespace": "prod",
                     "labels": {"service.kubernetes.io/service-proxy-name": "elsewhere"}},
        "spec": {"clusterIP": "10.96.1.99", "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .expect("apply");
    let started = Instant::now();
    let source = start(api.url());
    let (state, first_change, received) = next_state(&source, WAIT).expect("first state");
    assert!(first_change >= started && first_change <= received);
    assert!(state
        .nodes
        .iter()
        .all(|n| n.metadata.resource_version.is_some()));
    assert_eq!(unserved(state.clone()), expected);

    let health = source.health();
    assert!(health.connected && health.all_synced, "{health:?}");
    assert_eq!(health.kinds_synced.len(), 7, "{health:?}");
    assert_eq!((health.relists, health.skipped_objects), (0, 0));
    assert_eq!(api.request_count(FakeKind::Service, Verb::List), 1);

    // The checkpoint of a served state (resourceVersion, uid, creationTimestamp included) reads
    // back to the same state.
    let yaml = state.to_yaml().expect("checkpoint writes");
    assert_eq!(
        parse_str(&yaml, "checkpoint").expect("checkpoint parses"),
        state
    );

    // Nothing else comes while nothing changes (bookmarks are not changes).
    assert!(next_state(&source, Duration::from_millis(1500)).is_none());
}

/// What [`Proxy`] does with a request, by its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward,
    /// Forward after this long.
    Delay(Duration),
    /// Answer `404 page not found` (plain text, as the real API server for a resource it does
    /// not serve) without forwarding.
    NotFound,
}

type Rule = Arc<dyn Fn(&str) -> Action + Send + Sync>;

/// A TCP proxy in front of the fake server that treats requests by a rule on their head (to
/// make one kind's list slow, or a kind absent). Threads end when the test's sockets close or
/// the proxy is dropped; every read has a timeout.
struct Proxy {
    url: String,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr, rule: Rule) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_accept = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop_accept.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        pipe(client, server, Arc::clone(&rule), Arc::clone(&stop_accept));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { url, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pipe(client: TcpStream, server: TcpStream, rule: Rule, stop: Arc<AtomicBool>) {
    let copy =
        move |mut from: TcpStream, mut to: TcpStream, rule: Option<Rule>, stop: Arc<AtomicBool>| {
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::SeqCst) {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let action = rule
                            .as_ref()
                            .map_or(Action::Forward, |r| r(&String::from_utf8_lossy(&buf[..n])));
                        match action {
                            Action::Forward => {}
                            Action::Delay(delay) => std::thread::sleep(delay),
                            Action::NotFound => {
                                let body = "404 page not found\n";
                                let answer = format!(
                                    "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; \
                                 charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if from.write_all(answer.as_bytes()).is_err() {
                                    break;
                                }
                                continue;
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        };
    let (c2, s2) = (
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    let stop2 = Arc::clone(&stop);
    std::thread::spawn(move || copy(client, server, Some(rule), stop));
    std::thread::spawn(move || copy(s2, c2, None, stop2));
}

#[test]
fn no_state_before_every_kind_listed() {
    let expected = fixture();
    let api = serve(&expected);
    let delay = Duration::from_millis(1500);
    let proxy = Proxy::start(
        api.addr(),
        Arc::new(move |head: &str| {
            if head.starts_with("GET /api/v1/pods?") && !head.contains("watch=true") {
                Action::Delay(delay)
            } else {
                Action::Forward
            }
        }),
    );
    let started = Instant::now();
    let source = start(proxy.url.clone());
    // The other six kinds list at once; the Pod list is held back.
    let health = health_where(&source, WAIT, |h| h.kinds_synced.len() == 6);
    assert!(
        !health.kinds_synced.contains(&"Pod".to_owned()),
        "{health:?}"
    );
    assert!(!health.all_synced);
    let (state, _, received) = next_state(&source, WAIT).expect("state once pods listed");
    assert!(
        received.duration_since(started) >= delay,
        "a state came {:?} after start, before the Pod list (held {delay:?}) finished",
        received.duration_since(started)
    );
    assert_eq!(unserved(state), expected);
    assert!(source.health().all_synced);
}

#[test]
fn updates_arrive_within_the_batch_window_and_are_coalesced() {
    let api = serve(&fixture());
    let batch = Duration::from_millis(250);
    logs();
    let source = KubeSource::start(KubeOptions {
        batch,
        ..options(api.url())
    })
    .expect("source starts");
    let (_, _, _, kinds) = next_state_kinds(&source, WAIT).expect("first state");
    assert_eq!(kinds, ChangedKinds::ALL, "the first state: every kind");

    let changed = Instant::now();
    for i in 0..5 {
        api.apply(pod(
            "default",
            &format!("extra-{i}"),
            "node2",
            &format!("10.244.2.{}", 10 + i),
        ))
        .expect("apply");
    }
    let (state, first_change, received, kinds) = next_state_kinds(&source, WAIT).expect("update");
    assert_eq!(
        kinds,
        ChangedKinds::PODS,
        "only Pods changed: the agent rebuilds only what Pods feed"
    );
    let latency = received.duration_since(changed);
    assert!(first_change >= changed);
    assert!(
        received.duration_since(first_change) >= batch,
        "sent {:?} after the first change, before the batch window ended",
        received.duration_since(first_change)
    );
    assert!(
        latency < batch + Duration::from_secs(2),
        "update took {latency:?}"
    );
    let extra: Vec<_> = pod_names(&state)
        .into_iter()
        .filter(|p| p.starts_with("default/extra-"))
        .collect();
    assert_eq!(
        extra.len(),
        5,
        "five changes in one window make one state: {extra:?}"
    );
    assert!(
        next_state(&source, batch * 3).is_none(),
        "one state per window"
    );

    // The default window (30 ms): one change is seen well within a second.
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    let changed = Instant::now();
    api.apply(pod("default", "late", "node1", "10.244.1.50"))
        .expect("apply");
    let (state, _, received) = next_state(&source, WAIT).expect("update");
    assert!(pod_names(&state).contains(&"default/late".to_owned()));
    let latency = received.duration_since(changed);
    assert!(latency < Duration::from_secs(1), "update took {latency:?}");
}

#[test]
fn deletions_prune() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    api.delete(FakeKind::Pod, Some("prod"), "web-2")
        .expect("delete");
    api.delete(FakeKind::HostNetworkPolicy, None, "workers-ssh")
        .expect("delete");
    let state = state_where(&source, WAIT, |s| s.host_policies.is_empty());
    assert_eq!(pod_names(&state), ["default/client", "prod/web-1"]);
    assert!(state.host_policies.is_empty());
    assert_eq!(state.services.len(), 1);
}

#[test]
fn compaction_410_relists_to_the_right_state() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    let lists_before = api.request_count(FakeKind::Pod, Verb::List);

    // Watches broken and slow to come back; meanwhile changes, then the history forgotten: the
    // watches resume from versions older than the compaction, get 410 Gone and relist. The
    // changes are never seen as watch events, only through the relist.
    api.set_delay(Duration::from_millis(300));
    api.drop_watches();
    api.delete(FakeKind::Pod, Some("prod"), "web-1")
        .expect("delete");
    api.apply(pod("prod", "web-3", "node2", "10.244.2.9"))
        .expect("apply");
    api.compact();

    let state = state_where(&source, WAIT, |s| {
        pod_names(s) == ["default/client", "prod/web-2", "prod/web-3"]
    });
    api.set_delay(Duration::ZERO);
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(state.services.len(), 1);
    let health = health_where(&source, WAIT, |h| h.relists >= 1);
    assert!(health.connected, "{health:?}");
    assert!(api.request_count(FakeKind::Pod, Verb::List) > lists_before);
    assert!(logs_mention(
        "Pod watcher: error returned by apiserver during watch: too old"
    ));
}

#[test]
fn dropped_watches_resume_without_loss_and_without_relisting() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    let lists_before: u64 = FakeKind::ALL
        .iter()
        .map(|k| api.request_count(*k, Verb::List))
        .sum();

    for round in 0..3 {
        api.drop_watches();
        // Changes while the watches reconnect.
        api.apply(pod(
            "default",
            &format!("r{round}"),
            "node1",
            &format!("10.244.1.{}", 20 + round),
        ))
        .expect("apply");
        api.delete(
            FakeKind::Namespace,
            None,
            if round == 0 { "prod" } else { "default" },
        )
        .ok();
    }
    let state = state_where(&source, WAIT, |s| {
        let pods = pod_names(s);
        ["default/r0", "default/r1", "default/r2"]
            .iter()
            .all(|p| pods.contains(&(*p).to_owned()))
            && s.namespaces.is_empty()
    });
    assert!(state.namespaces.is_empty());
    let lists_after: u64 = FakeKind::ALL
        .iter()
        .map(|k| api.request_count(*k, Verb::List))
        .sum();
    assert_eq!(lists_after, lists_before, "resumed watches must not relist");
    assert_eq!(source.health().relists, 0);
}

#[test]
fn server_down_keeps_quiet_then_a_full_resync_prunes_only_what_is_gone() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    assert!(source.health().connected);

    api.set_down(true);
    let mut saw_disconnected = false;
    let deadline = Instant::now() + WAIT;
    while !saw_disconnected && Instant::now() < deadline {
        match source.recv_timeout(Duration::from_millis(100)) {
            Some(SourceEvent::Health(h)) => saw_disconnected = !h.connected,
            Some(SourceEvent::State { .. }) => panic!("a state while the server is down"),
            None => {}
        }
    }
    assert!(saw_disconnected, "no Health{{connected: false}} event");
    let health = source.health();
    assert!(
        !health.connected && health.last_error.is_some(),
        "{health:?}"
    );

    // While down: one pod deleted, one added, a service changed; history compacted so the
    // reconnect is a full relist.
    api.delete(FakeKind::Pod, Some("prod"), "web-2")
        .expect("delete");
    api.apply(pod("prod", "web-9", "node1", "10.244.1.9"))
        .expect("apply");
    api.compact();
    assert!(
        next_state(&source, Duration::from_millis(1500)).is_none(),
        "no state while the server is down"
    );

    api.set_down(false);
    let state = state_where(&source, WAIT, |s| {
        pod_names(s) == ["default/client", "prod/web-1", "prod/web-9"]
    });
    // Everything else is kept.
    let mut expected = fixture();
    expected
        .pods
        .retain(|p| p.metadata.name.as_deref() != Some("web-2"));
    let unserved_state = unserved(state);
    assert_eq!(unserved_state.nodes, expected.nodes);
    assert_eq!(unserved_state.services, expected.services);
    assert_eq!(unserved_state.endpoint_slices, expected.endpoint_slices);
    assert_eq!(unserved_state.network_policies, expected.network_policies);
    assert_eq!(unserved_state.host_policies, expected.host_policies);
    let health = health_where(&source, WAIT, |h| h.connected);
    assert!(health.relists >= 1 && health.all_synced, "{health:?}");
}

#[test]
fn bad_objects_are_skipped_with_a_warning_and_counted() {
    let api = serve(&fixture());
    // A wrong type, a wrong type in metadata, a missing port number (decodes as 0), an unknown
    // protocol, and an unknown field in a HostNetworkPolicy spec (refused by its decoder).
    api.insert_raw(
        FakeKind::Pod,
        json!({"metadata": {"name": "bad-port-type", "namespace": "prod"},
               "spec": {"nodeName": "node1",
                        "containers": [{"name": "c", "ports": [{"containerPort": "x"}]}]}}),
    );
    api.insert_raw(
        FakeKind::Pod,
        json!({"metadata": {"name": "bad-labels", "namespace": "prod", "labels": 5}}),
    );
    api.insert_raw(
        FakeKind::Service,
        json!({"metadata": {"name": "bad-port", "namespace": "prod"},
               "spec": {"clusterIP": "10.96.1.77", "ports": [{"protocol": "TCP"}]}}),
    );
    api.insert_raw(
        FakeKind::Service,
        json!({"metadata": {"name": "bad-protocol", "namespace": "prod"},
               "spec": {"clusterIP": "10.96.1.78", "ports": [{"port": 443, "protocol": "QUIC"}]}}),
    );
    api.insert_raw(
        FakeKind::HostNetworkPolicy,
        json!({"metadata": {"name": "bad-egress"}, "spec": {"egress": []}}),
    );
    let source = start(api.url());
    let (state, _, _) = next_state(&source, WAIT).expect("first state despite bad objects");
    assert_eq!(
        unserved(state),
        fixture(),
        "the good objects are all applied"
    );
    assert_eq!(source.health().skipped_objects, 5);
    let logs = log_text();
    for name in [
        "prod/bad-port-type",
        "prod/bad-labels",
        "prod/bad-port",
        "prod/bad-protocol",
        "HostNetworkPolicy bad-egress",
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains("skipping") && l.contains(name))
            .unwrap_or_else(|| panic!("no warning naming {name}"));
        assert!(line.contains("WARN"), "{line}");
    }
    assert!(
        logs.contains("spec.containers[0].ports[0].containerPort"),
        "warning names the field path"
    );
    assert!(logs.contains("spec.ports[0].protocol: unknown value \"QUIC\""));

    // A good object after the bad ones still arrives, and a good object turned bad goes.
    api.apply(pod("prod", "after", "node1", "10.244.1.33"))
        .expect("apply");
    api.insert_raw(
        FakeKind::Pod,
        json!({"metadata": {"name": "web-1", "namespace": "prod"}, "spec": {"containers": 7}}),
    );
    let state = state_where(&source, WAIT, |s| {
        let pods = pod_names(s);
        pods.contains(&"prod/after".to_owned()) && !pods.contains(&"prod/web-1".to_owned())
    });
    assert_eq!(
        pod_names(&state),
        ["default/client", "prod/after", "prod/web-2"]
    );
    assert_eq!(source.health().skipped_objects, 6);
}

#[test]
fn annotate_node_patches_and_retries_while_the_server_is_down() {
    let api = serve(&fixture());
    api.set_down(true);
    let source = start(api.url());
    source.annotate_node("sluice.io/wireguard-public-key", "a2V5MQ==");
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        api.get(FakeKind::Node, None, "node1").expect("node1")["metadata"]["annotations"].is_null(),
        "no PATCH can land while down"
    );
    api.set_down(false);

    let deadline = Instant::now() + WAIT;
    let annotation = || {
        api.get(FakeKind::Node, None, "node1").expect("node1")["metadata"]["annotations"]
            ["sluice.io/wireguard-public-key"]
            .as_str()
            .map(str::to_owned)
    };
    while annotation().is_none() {
        assert!(Instant::now() < deadline, "annotation never landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(annotation().as_deref(), Some("a2V5MQ=="));
    let patches = api.patches();
    let ok: Vec<_> = patches.iter().filter(|p| p.status == 200).collect();
    assert_eq!(ok.len(), 1, "{patches:#?}");
    assert_eq!(ok[0].name, "node1");
    assert_eq!(ok[0].content_type, "application/merge-patch+json");
    assert_eq!(
        ok[0].body,
        json!({"metadata": {"annotations": {"sluice.io/wireguard-public-key": "a2V5MQ=="}}})
    );

    // The same value again: nothing to do. A new value: one more PATCH.
    source.annotate_node("sluice.io/wireguard-public-key", "a2V5MQ==");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.patches().len(), patches.len(), "idempotent");
    source.annotate_node("sluice.io/wireguard-public-key", "a2V5Mg==");
    while annotation().as_deref() != Some("a2V5Mg==") {
        assert!(Instant::now() < deadline, "second annotation never landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The Node's other fields are untouched.
    let state = state_where(&source, WAIT, |s| {
        s.node("node1")
            .and_then(|n| n.metadata.annotations.as_ref())
            .is_some_and(|a| {
                a.get("sluice.io/wireguard-public-key").map(String::as_str) == Some("a2V5Mg==")
            })
    });
    assert!(state.node_info("node1").is_ok());
}

#[test]
fn bad_configuration_is_an_error_naming_what_to_fix() {
    let err = KubeSource::start(KubeOptions {
        api_server: Some("http://[not a url".to_owned()),
        ..KubeOptions::new("n")
    })
    .expect_err("bad URL");
    assert!(err.to_string().contains("[not a url"), "{err}");
    let err = KubeSource::start(KubeOptions {
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
        ..KubeOptions::new("n")
    })
    .expect_err("missing kubeconfig");
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

#[test]
fn dropping_the_source_stops_its_watches() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    let deadline = Instant::now() + WAIT;
    while api.open_watches() < 7 {
        assert!(Instant::now() < deadline, "watches never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    drop(source);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "drop took {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + WAIT;
    while api.open_watches() > 0 {
        assert!(Instant::now() < deadline, "watches still open after drop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_absent_host_policy_crd_counts_as_synced_and_empty_until_installed() {
    let api = serve(&fixture());
    let installed = Arc::new(AtomicBool::new(false));
    let installed_rule = Arc::clone(&installed);
    let proxy = Proxy::start(
        api.addr(),
        Arc::new(move |head: &str| {
            if head.starts_with("GET /apis/policy.sluice.io/")
                && !installed_rule.load(Ordering::SeqCst)
            {
                Action::NotFound
            } else {
                Action::Forward
            }
        }),
    );
    let source = start(proxy.url.clone());
    let (state, _, _) = next_state(&source, WAIT).expect("a state without the CRD");
    assert!(state.host_policies.is_empty());
    let mut expected = fixture();
    expected.host_policies.clear();
    assert_eq!(unserved(state), expected);
    let health = source.health();
    assert!(health.all_synced && health.connected, "{health:?}");
    assert!(health
        .kinds_synced
        .contains(&"HostNetworkPolicy".to_owned()));

    // Retried every retry_max (400 ms here), warned about once.
    std::thread::sleep(Duration::from_millis(1000));
    let warnings = log_text()
        .lines()
        .filter(|l| {
            l.contains("WARN")
                && l.contains("does not serve policy.sluice.io/v1alpha1/hostnetworkpolicies")
        })
        .count();
    assert_eq!(
        warnings, 1,
        "one warning about the missing CRD, not one per retry"
    );
    assert!(
        api.request_count(FakeKind::HostNetworkPolicy, Verb::List) == 0,
        "the proxy answered every HostNetworkPolicy list"
    );

    // The CRD appears: its objects arrive with the next retry.
    installed.store(true, Ordering::SeqCst);
    let state = state_where(&source, WAIT, |s| s.host_policies.len() == 1);
    assert_eq!(unserved(state), fixture());
}

#[test]
fn server_errors_count_as_disconnected_and_client_errors_do_not() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");

    // 503 to every request (watches broken so the watchers ask again).
    api.set_error_status(Some(503));
    api.drop_watches();
    let health = health_where(&source, WAIT, |h| !h.connected);
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{health:?}"
    );
    api.apply(pod("default", "while-503", "node1", "10.244.1.60"))
        .expect("apply");
    assert!(
        next_state(&source, Duration::from_millis(800)).is_none(),
        "no state while every request fails"
    );

    // 403 (say, RBAC removed): the server answers, so it is connected, with the error kept.
    api.set_error_status(Some(403));
    let health = health_where(&source, WAIT, |h| h.connected);
    assert!(health.last_error.is_some(), "{health:?}");

    api.set_error_status(None);
    let state = state_where(&source, WAIT, |s| {
        pod_names(s).contains(&"default/while-503".to_owned())
    });
    assert_eq!(state.pods.len(), 4);
    assert!(source.health().connected);
}

#[test]
fn an_agent_that_does_not_read_loses_no_change() {
    let api = serve(&fixture());
    let source = start(api.url());
    next_state(&source, WAIT).expect("first state");
    // More separate batches than the queue holds, none read meanwhile.
    for i in 0..30 {
        api.apply(pod(
            "default",
            &format!("q{i}"),
            "node1",
            &format!("10.244.1.{}", 100 + i),
        ))
        .expect("apply");
        std::thread::sleep(BATCH + Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut states = Vec::new();
    while let Some(event) = source.try_recv() {
        if let SourceEvent::State { state, .. } = event {
            states.push(state);
        }
    }
    assert!(states.len() <= 16, "{} states queued", states.len());
    // The state pending while the queue was full comes once there is room.
    let last = match next_state(&source, Duration::from_secs(2)) {
        Some((state, _, _)) => state,
        None => states.pop().expect("some state"),
    };
    let queued = pod_names(&last)
        .iter()
        .filter(|p| p.starts_with("default/q"))
        .count();
    assert_eq!(queued, 30, "the last state holds every change");
}

// ---- RBAC ----

/// Calls of `calls` that the ClusterRoles bound to a ServiceAccount in `yaml` do not grant.
fn ungranted(yaml: &str, calls: &[control::kube::ApiCall]) -> Vec<String> {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("rbac.yaml is YAML"))
        .filter(|d: &serde_yaml::Value| !d.is_null())
        .collect();
    let kind = |d: &serde_yaml::Value| d["kind"].as_str().unwrap_or("").to_owned();
    let bound: Vec<String> = docs
        .iter()
        .filter(|d| kind(d) == "ClusterRoleBinding" && d["roleRef"]["kind"] == "ClusterRole")
        .filter(|d| {
            d["subjects"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|s| s["kind"] == "ServiceAccount"))
        })
        .filter_map(|d| d["roleRef"]["name"].as_str().map(str::to_owned))
        .collect();
    let rules: Vec<&serde_yaml::Value> = docs
        .iter()
        .filter(|d| kind(d) == "ClusterRole")
        .filter(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| bound.iter().any(|b| b == n))
        })
        .filter_map(|d| d["rules"].as_sequence())
        .flatten()
        .collect();
    let has = |list: &serde_yaml::Value, item: &str| {
        list.as_sequence().is_some_and(|l| {
            l.iter()
                .any(|v| v.as_str() == Some(item) || v.as_str() == Some("*"))
        })
    };
    calls
        .iter()
        .filter(|c| {
            !rules.iter().any(|r| {
                has(&r["apiGroups"], c.group)
                    && has(&r["resources"], c.resource)
                    && has(&r["verbs"], c.verb)
            })
        })
        .map(|c| format!("{} {}/{}", c.verb, c.group, c.resource))
        .collect()
}

#[test]
fn rbac_yaml_grants_every_api_call() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let yaml = std::fs::read_to_string(&path).expect("deploy/rbac.yaml");
    assert_eq!(
        ungranted(&yaml, API_CALLS),
        Vec::<String>::new(),
        "{}",
        path.display()
    );

    // The check itself: a verb removed, or the binding gone, is noticed.
    let without_patch = yaml.replace(
        "verbs: [get, list, watch, patch]",
        "verbs: [get, list, watch]",
    );
    assert_ne!(without_patch, yaml, "fixture edit applies");
    assert_eq!(ungranted(&without_patch, API_CALLS), ["patch /nodes"]);
    let unbound = yaml.replace("kind: ClusterRoleBinding", "kind: Unrelated");
    assert_eq!(ungranted(&unbound, API_CALLS).len(), API_CALLS.len());
}
