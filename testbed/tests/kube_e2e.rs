//! End-to-end tests of `sluice run --source kubernetes` (issue 8) in the testbed: the agents
//! of a two-node instance read the cluster from `sluice-fake-apiserver` (the list/watch API
//! server of `control::kube::fake` as a process), which runs in the instance's external client
//! namespace (`sl-INSTANCE-ext`, 172.18.0.250 on the fabric, which every node reaches over its
//! uplink) and serves a copy of the same cluster file the testbed is built from.
//!
//! ```text
//!  test ──curl /fake/{apply,delete,down,compact,insert-raw,patches}──┐   (ip netns exec ext)
//!                                                                     v
//!  sl-I-ext: sluice-fake-apiserver 0.0.0.0:6443 ──list/watch── 172.18.0.250 ── fabric ──┬── node1 agent
//!                    (serves served.yaml)                                                └── node2 agent
//! ```
//!
//! What is checked: the first sync (pods ping across nodes, a ClusterIP answers, status shows
//! the API connected and synced, the checkpoint is written); a Service and an EndpointSlice
//! added and changed through the API take effect and feed the programming-latency histogram; an
//! outage (status says so, traffic keeps flowing on the last snapshot, a Service deleted
//! meanwhile is pruned only after the resync, the rest stays, `relists` grows); a restart with
//! the API server down forwards from the checkpoint before any sync, then syncs; a hot restart
//! (API server up, then down) loses none of a paced stream, forwards the handed-over state and
//! then syncs and watches; the WireGuard
//! public key reaches the other node only through each agent's PATCH of its own Node; an invalid
//! object is skipped with a warning and counted while everything else keeps working.
//!
//! Root only; build the binaries first: `cargo build -p control --bins` (`sluice-fake-apiserver`
//! is this crate's and built with the tests).
//!
//! The API server must answer by the time the agents start (an agent without a checkpoint is
//! ready only after its first full sync), but its namespace is created by [`Testbed::up`]: a
//! starter thread waits (bounded) for the namespace and starts the server in it, bound to
//! 0.0.0.0 so that it does not depend on the address being configured yet; the agents retry
//! their first connections until it answers. The server is killed by pid when dropped.
//!
//! Every test brings up its own instance under a unique name (pid + counter) and a temporary
//! state root; the `Testbed` drop removes everything, also when a test panics. Two nodes with one
//! worker each; the tests hold [`SERIAL`]. Every command runs under `timeout`, every wait is
//! bounded.
use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use control::status::{ApiStatus, Status};
use serde_json::{json, Value};
use testbed::{names::Names, AgentSource, Encryption, Testbed};

mod common;
use common::{
    cluster, hold, ping, ping_within, pod_ip, probe_name, python, require_root, ring_losses,
    status, status_when, text, timed, unique_instance, Env, PacedStream, Proc, NAME_SERVER,
};

/// Instance names here are `k{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'k';
const SERVICES: &str = "services.yaml";
const WIREGUARD: &str = "wireguard.yaml";
const WORKERS: u32 = 1;
const NODE1: &str = "node1";
const NODE2: &str = "node2";
/// The external client's address (`.250` of the nodes' /24), where the API server listens.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 250);
const API_PORT: u16 = 6443;

/// `services.yaml`: client and web-1 on node1, web-2 on node2.
const CLIENT: &str = "default/client";
const WEB1: &str = "default/web-1";
const WEB2: &str = "default/web-2";
const WEB1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
const WEB2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const HTTP_PORT: u16 = 8080;
/// `web`: 80/TCP -> http (8080) of web-1 and web-2.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
/// `web-sticky`: 80/TCP -> http of web-1 and web-2 (ClientIP affinity); deleted in the outage.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
/// Not in the fixture: added through the API.
const ADDED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 30);

/// `wireguard.yaml`: pod-a1 on node1, pod-b1 on node2.
const POD_A1: &str = "default/pod-a1";
const POD_B1: &str = "default/pod-b1";

/// How long the starter thread waits for the external namespace, and the server to answer.
const API_START_WITHIN: Duration = Duration::from_secs(60);
/// The first sync (or a resync after an outage: the watchers' backoff reaches 30 s).
const SYNC_WITHIN: Duration = Duration::from_secs(60);
/// A change made through the API reaching the workers.
const APPLY_WITHIN: Duration = Duration::from_secs(15);
/// The source noticing that the API server went away.
const NOTICE_WITHIN: Duration = Duration::from_secs(30);
/// First packets between the nodes wait for ARP.
const FIRST_PING_WITHIN: Duration = Duration::from_secs(15);
/// Servers end on their own after this long (longer than any test here).
const SERVER_SECONDS: u32 = 300;

/// Two nodes: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// The fake API server in the external client's namespace.

/// `sluice-fake-apiserver` in a namespace that [`Testbed::up`] is about to create; killed by
/// pid (and reaped) when dropped.
struct FakeApiServer {
    netns: String,
    log: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    stop: Arc<AtomicBool>,
    starter: Option<JoinHandle<Result<(), String>>>,
}

impl FakeApiServer {
    /// Starts a thread that waits for `netns` to exist and be enterable, then runs the server
    /// in it on 0.0.0.0:[`API_PORT`] serving `served` (re-read on change), its output in `log`,
    /// and waits until it answers. [`FakeApiServer::wait_started`] collects the outcome.
    fn start_when_netns_exists(netns: &str, served: &Path, log: &Path) -> Self {
        let child = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let starter = {
            let (netns, served, log) = (netns.to_string(), served.to_path_buf(), log.to_path_buf());
            let (child, stop) = (Arc::clone(&child), Arc::clone(&stop));
            thread::spawn(move || start_server(&netns, &served, &log, &child, &stop))
        };
        Self {
            netns: netns.to_string(),
            log: log.to_path_buf(),
            child,
            stop,
            starter: Some(starter),
        }
    }

    /// Waits for the starter thread; panics with the server's log when it failed.
    fn wait_started(&mut self) {
        let Some(starter) = self.starter.take() else {
            return;
        };
        match starter.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("sluice-fake-apiserver: {e}\n{}", self.log_text()),
            Err(_) => panic!("the fake API server's starter thread panicked"),
        }
    }

    fn log_text(&self) -> String {
        format!(
            "{}:\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// `METHOD http://127.0.0.1:6443PATH` from inside the namespace: (status, body).
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let url = format!("http://127.0.0.1:{API_PORT}{path}");
        let mut command = Command::new("timeout");
        command.args(["-s", "KILL", "10", "ip", "netns", "exec", &self.netns]);
        command.args(["curl", "-s", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(body) = body {
            command
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(body.to_string());
        }
        let out = command
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (answer, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
        let code = code.trim().parse().unwrap_or_else(|_| {
            panic!("{method} {url}: no HTTP status from curl:\n{}", text(&out))
        });
        (code, answer.to_string())
    }

    /// A control endpoint (`/fake/...`) that must answer 200.
    fn control(&self, method: &str, path: &str, body: Option<&Value>) -> String {
        let (code, answer) = self.request(method, path, body);
        assert_eq!(code, 200, "{method} {path}: {answer}");
        answer
    }

    fn set_down(&self, on: bool) {
        self.control("POST", &format!("/fake/down?on={on}"), None);
    }

    fn apply(&self, object: &Value) {
        self.control("POST", "/fake/apply", Some(object));
    }

    /// The recorded PATCH requests (`/fake/patches`).
    fn patches(&self) -> Vec<Value> {
        let answer = self.control("GET", "/fake/patches", None);
        let value: Value = serde_json::from_str(&answer).expect("patches JSON");
        value["patches"].as_array().cloned().unwrap_or_default()
    }
}

/// The starter thread of [`FakeApiServer`].
fn start_server(
    netns: &str,
    served: &Path,
    log: &Path,
    slot: &Mutex<Option<Child>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let deadline = Instant::now() + API_START_WITHIN;
    let waited = || {
        if stop.load(Ordering::Relaxed) {
            return Err("stopped before the server answered".to_string());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "did not answer in {netns} within {API_START_WITHIN:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
        Ok(())
    };
    // The namespace file appears before it is mounted: wait until it can be entered.
    while !(Path::new("/run/netns").join(netns).exists()
        && Command::new("ip")
            .args(["netns", "exec", netns, "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()))
    {
        waited()?;
    }
    let out = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let bin = env!("CARGO_BIN_EXE_sluice-fake-apiserver");
    // `ip netns exec` execs the server: the child's pid is the server's.
    let child = Command::new("ip")
        .args(["netns", "exec", netns, bin, "--listen"])
        .arg(format!("0.0.0.0:{API_PORT}"))
        .arg("--cluster")
        .arg(served)
        .args(["--poll-ms", "100"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {bin} in {netns}: {e}"))?;
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    loop {
        if let Some(child) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited early ({status})"));
            }
        }
        let answered = Command::new("timeout")
            .args([
                "-s", "KILL", "5", "ip", "netns", "exec", netns, "curl", "-s",
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{API_PORT}/version"))
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.stdout == b"200");
        if answered {
            return Ok(());
        }
        waited()?;
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(starter) = self.starter.take() {
            let _ = starter.join();
        }
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An instance whose agents read the fake API server.

/// Field order is drop order: the testbed (agents first), then the API server, then the
/// directory.
struct KubeBed {
    tb: Testbed,
    api: FakeApiServer,
    /// Holds the cluster files, the state root and the server's log until the end.
    _env: Env,
}

impl KubeBed {
    /// Builds the instance of `fixture` with agents pointed at an API server serving `served`
    /// (the fixture itself when `None`), and waits until every agent has synced.
    fn up(fixture: &str, served: Option<&str>, encryption: Encryption) -> Self {
        let env = Env::new();
        let fixture_text = std::fs::read_to_string(cluster(fixture)).expect("read fixture");
        std::fs::write(env.cluster_file(), &fixture_text).expect("write cluster file");
        let served_path = env.dir.path().join("served.yaml");
        std::fs::write(&served_path, served.unwrap_or(&fixture_text)).expect("write served file");
        let instance = unique_instance();
        let mut api = FakeApiServer::start_when_netns_exists(
            &Names::new(&instance).external_netns(),
            &served_path,
            &env.dir.path().join("fake-apiserver.log"),
        );
        let mut opts = env.options(&env.cluster_file(), WORKERS);
        opts.instance = Some(instance);
        opts.encryption = encryption;
        opts.source = AgentSource::Kubernetes {
            api_server: format!("http://{EXTERNAL_IP}:{API_PORT}"),
        };
        let tb = env.up_with(opts);
        api.wait_started();
        let bed = KubeBed { tb, api, _env: env };
        for node in [NODE1, NODE2] {
            let s = bed.api_status_when(node, SYNC_WITHIN, |a| a.connected && a.all_synced);
            let a = api_of(&s);
            assert!(
                a.connected && a.all_synced,
                "{node} did not sync with the API server: {a:?}\n{}",
                bed.agent_log(node)
            );
            assert_eq!(s.source, "kubernetes", "{node}'s source");
        }
        bed
    }

    /// [`KubeBed::up`] of `services.yaml`, the web servers started, and the cross-node path
    /// and the `web` ClusterIP answering.
    fn up_serving_web() -> (Self, Vec<Proc>) {
        let bed = Self::up(SERVICES, None, Encryption::None);
        let servers = bed.start_web_servers();
        ping_within(&bed.tb, CLIENT, WEB2, FIRST_PING_WITHIN);
        let answer = bed.probe_until(CLIENT, WEB_VIP, 80, APPLY_WITHIN, is_web);
        assert!(
            is_web(&answer),
            "ClusterIP {WEB_VIP}:80 from client: {answer:?}"
        );
        (bed, servers)
    }

    /// Waits (bounded) until `node` has synced every kind and its status carries no source
    /// note (the checkpoint's or the hand-over's); panics with its log otherwise.
    fn synced_without_note(&self, node: &str, when: &str) {
        let s = self.api_status_when(node, SYNC_WITHIN, |a| a.connected && a.all_synced);
        assert!(
            api_of(&s).all_synced,
            "{node} did not sync {when}: {:?}\n{}",
            s.api,
            self.agent_log(node)
        );
        let s = status_when(&self.tb, node, APPLY_WITHIN, |s| s.source_error.is_none());
        assert_eq!(
            s.source_error, None,
            "{node}: the note outlived the sync {when}"
        );
    }

    /// Applies [`added_service`] at [`ADDED_VIP`] with `backend` through the API and waits
    /// (bounded) until the client's connections to it reach that backend.
    fn add_service_answering(&self, backend: (&str, Ipv4Addr, &str), what: &str) {
        let name = backend.0;
        self.api.apply(&added_service(ADDED_VIP, backend));
        let answer = self.probe_until(CLIENT, ADDED_VIP, 80, APPLY_WITHIN, |a| {
            a.as_deref() == Ok(name)
        });
        assert_eq!(
            answer.as_deref(),
            Ok(name),
            "{what}: {ADDED_VIP} does not answer from {name}:\n{}",
            self.agent_log(NODE1)
        );
    }

    fn api_status_when(
        &self,
        node: &str,
        within: Duration,
        done: impl Fn(&ApiStatus) -> bool,
    ) -> Status {
        status_when(&self.tb, node, within, |s| {
            s.api.as_ref().is_some_and(&done)
        })
    }

    fn agent_log(&self, node: &str) -> String {
        let path = self
            .tb
            .node(node)
            .expect("node")
            .state_dir
            .join("agent.log");
        std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
    }

    /// The node's checkpoint once `ok` holds (the agent rewrites it in the background, at most
    /// every few seconds), or as it is after a bounded wait.
    fn checkpoint_when(&self, node: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let c = std::fs::read_to_string(self.checkpoint(node)).unwrap_or_default();
            if ok(&c) || Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn checkpoint(&self, node: &str) -> PathBuf {
        self.tb
            .node(node)
            .expect("node")
            .state_dir
            .join("last-good-cluster.yaml")
    }

    /// The backends' servers (web-1, web-2 of `services.yaml`).
    fn start_web_servers(&self) -> Vec<Proc> {
        [(WEB1, "web-1"), (WEB2, "web-2")]
            .into_iter()
            .map(|(pod, name)| {
                let seconds = SERVER_SECONDS.to_string();
                let port = HTTP_PORT.to_string();
                let (server, ready) = Proc::start_in_pod(
                    &self.tb,
                    pod,
                    &(SERVER_SECONDS + 10).to_string(),
                    &[python(), "-c", NAME_SERVER, name, &port, &seconds],
                );
                assert_eq!(ready, "ready", "server in {pod} did not start");
                server
            })
            .collect()
    }

    fn probe(&self, from: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
        probe_name(&self.tb, from, ip, port)
    }

    /// Probes until `want` holds (bounded); the last answer either way.
    fn probe_until(
        &self,
        from: &str,
        ip: Ipv4Addr,
        port: u16,
        within: Duration,
        want: impl Fn(&Result<String, String>) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let answer = self.probe(from, ip, port);
            if want(&answer) || Instant::now() >= deadline {
                return answer;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn api_of(s: &Status) -> &ApiStatus {
    s.api
        .as_ref()
        .unwrap_or_else(|| panic!("{}'s status has no api section: {}", s.node, s.render()))
}

fn is_web(answer: &Result<String, String>) -> bool {
    matches!(answer.as_deref(), Ok("web-1" | "web-2"))
}

/// `sluice_network_programming_duration_seconds_count` from the node's `/metrics`.
fn programming_count(tb: &Testbed, node: &str) -> u64 {
    let out = tb
        .exec_in_node(
            node,
            &timed("10", &["curl", "-s", "http://127.0.0.1:9962/metrics"]),
        )
        .expect("curl /metrics");
    let metrics = String::from_utf8_lossy(&out.stdout);
    metrics
        .lines()
        .find(|l| l.starts_with("sluice_network_programming_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("{node}'s /metrics has no programming count:\n{metrics}"))
}

/// A selector-less Service with `ip` 80/TCP -> 8080, and its EndpointSlice holding `backend`
/// (as the endpointslice controller would write them for a Service with endpoints).
fn added_service(ip: Ipv4Addr, backend: (&str, Ipv4Addr, &str)) -> Value {
    let (pod, pod_ip, node) = backend;
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "added", "namespace": "default"},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": ip.to_string(),
                    "clusterIPs": [ip.to_string()],
                    "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "TCP"}]
                }
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "added-1",
                    "namespace": "default",
                    "labels": {
                        "kubernetes.io/service-name": "added",
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                    }
                },
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": [pod_ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": node,
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}
                }],
                "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}]
            }
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// The first full sync programs what the file source would: pods ping across nodes, a ClusterIP
/// answers, status shows the API connected and synced, and the checkpoint is written.
#[test]
fn agents_sync_from_the_api_server_and_forward() {
    require_root!();
    let _serial = hold(&SERIAL);
    let bed = KubeBed::up(SERVICES, None, Encryption::None);
    let tb = &bed.tb;
    let _servers = bed.start_web_servers();
    ping_within(tb, CLIENT, WEB2, FIRST_PING_WITHIN);
    let out = ping(tb, CLIENT, pod_ip(tb, WEB2), 3);
    assert!(out.status.success(), "client -> web-2:\n{}", text(&out));
    let answer = bed.probe_until(CLIENT, WEB_VIP, 80, APPLY_WITHIN, is_web);
    assert!(
        is_web(&answer),
        "ClusterIP {WEB_VIP}:80 from client: {answer:?}"
    );
    for node in [NODE1, NODE2] {
        let s = status(tb, node);
        let a = api_of(&s);
        assert!(
            a.connected && a.all_synced && a.last_error.is_none(),
            "{node}: {a:?}"
        );
        assert_eq!(a.kinds_synced.len(), 7, "{node}'s synced kinds: {a:?}");
        assert_eq!(a.skipped_objects, 0, "{node}: {a:?}");
        assert!(s.generation > 0, "{node}'s generation");
        let checkpoint = std::fs::read_to_string(bed.checkpoint(node))
            .unwrap_or_else(|e| panic!("{node}'s checkpoint: {e}"));
        assert!(
            checkpoint.contains("web-sticky") && checkpoint.contains("10.244.2.2"),
            "{node}'s checkpoint lacks the served objects:\n{checkpoint}"
        );
    }
    // Both agents listed and watched every kind.
    let counters: Value =
        serde_json::from_str(&bed.api.control("GET", "/fake/counters", None)).expect("JSON");
    let count = |kind: &str, verb: &str| -> u64 {
        counters["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["kind"] == kind && c["verb"] == verb)
            .and_then(|c| c["count"].as_u64())
            .unwrap_or(0)
    };
    for kind in [
        "Node",
        "Namespace",
        "Pod",
        "Service",
        "EndpointSlice",
        "NetworkPolicy",
        "HostNetworkPolicy",
    ] {
        for verb in ["list", "watch"] {
            assert!(
                count(kind, verb) >= 2,
                "{kind} {verb}: {} requests from two agents: {counters}",
                count(kind, verb)
            );
        }
    }
}

/// A Service with its EndpointSlice applied through the API starts answering; a changed
/// EndpointSlice moves it to the other backend; both changes feed the programming histogram.
#[test]
fn services_added_and_changed_through_the_api_take_effect() {
    require_root!();
    let _serial = hold(&SERIAL);
    let bed = KubeBed::up(SERVICES, None, Encryption::None);
    let tb = &bed.tb;
    let _servers = bed.start_web_servers();
    assert!(is_web(&bed.probe_until(
        CLIENT,
        WEB_VIP,
        80,
        APPLY_WITHIN,
        is_web
    )));
    let before = bed.probe(CLIENT, ADDED_VIP, 80);
    assert!(
        before.is_err(),
        "{ADDED_VIP} answered before it existed: {before:?}"
    );
    let counts_before = [programming_count(tb, NODE1), programming_count(tb, NODE2)];
    let generation_before = status(tb, NODE1).generation;

    bed.add_service_answering(
        ("web-2", WEB2_IP, NODE2),
        "the Service added through the API does not answer",
    );
    assert!(status(tb, NODE1).generation > generation_before);
    for (node, before) in [NODE1, NODE2].into_iter().zip(counts_before) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut count = programming_count(tb, node);
        while count <= before && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
            count = programming_count(tb, node);
        }
        assert!(
            count > before,
            "{node}'s programming count {before} -> {count}"
        );
    }

    // The EndpointSlice now holds web-1 (node1) instead.
    let count_before = programming_count(tb, NODE1);
    bed.add_service_answering(
        ("web-1", WEB1_IP, NODE1),
        "the changed slice did not take effect",
    );
    for _ in 0..5 {
        let again = bed.probe(CLIENT, ADDED_VIP, 80);
        assert_eq!(
            again.as_deref(),
            Ok("web-1"),
            "a new connection went elsewhere"
        );
    }
    assert!(programming_count(tb, NODE1) > count_before);
}

/// While the API server is down: status says so, traffic flows on the last snapshot, and a
/// Service deleted meanwhile keeps answering until the resync; after it the Service is gone,
/// the rest is intact and `relists` grew.
#[test]
fn an_outage_keeps_forwarding_and_the_resync_prunes_only_what_is_gone() {
    require_root!();
    let _serial = hold(&SERIAL);
    let (bed, _servers) = KubeBed::up_serving_web();
    let tb = &bed.tb;
    assert!(is_web(&bed.probe_until(
        CLIENT,
        STICKY_VIP,
        80,
        APPLY_WITHIN,
        is_web
    )));
    let relists_before: Vec<u64> = [NODE1, NODE2]
        .iter()
        .map(|n| api_of(&status(tb, n)).relists)
        .collect();

    bed.api.set_down(true);
    let went_down = Instant::now();
    for node in [NODE1, NODE2] {
        let s = bed.api_status_when(node, NOTICE_WITHIN, |a| !a.connected);
        let a = api_of(&s);
        assert!(
            !a.connected && a.last_error.is_some(),
            "{node} still says connected {:?} after the server went down: {a:?}",
            went_down.elapsed()
        );
        eprintln!(
            "{node} noticed the outage after {:?}: {a:?}",
            went_down.elapsed()
        );
    }
    let generation_down = status(tb, NODE1).generation;
    let out = ping(tb, CLIENT, pod_ip(tb, WEB2), 3);
    assert!(
        out.status.success(),
        "ping during the outage:\n{}",
        text(&out)
    );
    assert!(
        is_web(&bed.probe(CLIENT, WEB_VIP, 80)),
        "ClusterIP during the outage"
    );

    // Deleted while down, and the history compacted: the reconnect is a full relist.
    bed.api.control(
        "POST",
        "/fake/delete?kind=Service&namespace=default&name=web-sticky",
        None,
    );
    bed.api.control("POST", "/fake/compact", None);
    thread::sleep(Duration::from_secs(2));
    let sticky = bed.probe(CLIENT, STICKY_VIP, 80);
    assert!(
        is_web(&sticky),
        "web-sticky stopped answering before the agents could know it is gone: {sticky:?}"
    );
    assert_eq!(
        status(tb, NODE1).generation,
        generation_down,
        "a new state while down"
    );

    bed.api.set_down(false);
    let came_back = Instant::now();
    for (node, before) in [NODE1, NODE2].into_iter().zip(&relists_before) {
        let s = bed.api_status_when(node, SYNC_WITHIN, |a| {
            a.connected && a.all_synced && a.relists > *before
        });
        let a = api_of(&s);
        assert!(
            a.connected && a.all_synced && a.relists > *before,
            "{node} did not resync within {SYNC_WITHIN:?} (relists before {before}): {a:?}\n{}",
            bed.agent_log(node)
        );
        eprintln!(
            "{node} resynced {:?} after the server came back: {a:?}",
            came_back.elapsed()
        );
    }
    let gone = bed.probe_until(CLIENT, STICKY_VIP, 80, APPLY_WITHIN, |a| a.is_err());
    assert!(gone.is_err(), "the deleted Service still answers: {gone:?}");
    assert!(
        is_web(&bed.probe(CLIENT, WEB_VIP, 80)),
        "web went with web-sticky"
    );
    let out = ping(tb, CLIENT, pod_ip(tb, WEB2), 3);
    assert!(
        out.status.success(),
        "ping after the resync:\n{}",
        text(&out)
    );
    let checkpoint = bed.checkpoint_when(NODE1, |c| {
        !c.contains("web-sticky") && c.contains("name: web\n")
    });
    assert!(
        !checkpoint.contains("web-sticky") && checkpoint.contains("name: web\n"),
        "the checkpoint after the resync:\n{checkpoint}"
    );
}

/// An agent restarted while the API server is down forwards from its checkpoint before any sync,
/// and syncs once the server is back.
#[test]
fn a_restart_during_an_outage_forwards_from_the_checkpoint() {
    require_root!();
    let _serial = hold(&SERIAL);
    let (mut bed, _servers) = KubeBed::up_serving_web();
    // A change through the API (which also writes the checkpoint: the first sync alone does
    // not yet, see `agents_sync_from_the_api_server_and_forward`).
    bed.add_service_answering(
        ("web-2", WEB2_IP, NODE2),
        "the added Service before the restart",
    );
    let checkpoint = bed.checkpoint_when(NODE1, |c| c.contains(&ADDED_VIP.to_string()));
    assert!(checkpoint.contains(&ADDED_VIP.to_string()), "{checkpoint}");

    bed.api.set_down(true);
    bed.tb
        .stop_agent(NODE1, libc::SIGTERM)
        .expect("stop node1's agent");
    let restarted = Instant::now();
    bed.tb
        .start_agent(NODE1)
        .unwrap_or_else(|e| panic!("node1's agent did not start with the API server down: {e}"));
    eprintln!("node1's agent ready {:?} after start", restarted.elapsed());
    let s = status(&bed.tb, NODE1);
    let a = api_of(&s);
    assert!(
        !a.connected && !a.all_synced,
        "node1 synced with a server that is down: {a:?}"
    );
    assert!(
        s.source_error
            .as_deref()
            .is_some_and(|e| e.contains("checkpoint")),
        "status does not say it forwards from the checkpoint: {:?}",
        s.source_error
    );
    ping_within(&bed.tb, CLIENT, WEB2, FIRST_PING_WITHIN);
    let answer = bed.probe_until(CLIENT, WEB_VIP, 80, APPLY_WITHIN, is_web);
    assert!(is_web(&answer), "ClusterIP from the checkpoint: {answer:?}");
    let answer = bed.probe(CLIENT, ADDED_VIP, 80);
    assert_eq!(
        answer.as_deref(),
        Ok("web-2"),
        "the Service added through the API, from the checkpoint"
    );
    let s = status(&bed.tb, NODE1);
    assert!(
        !api_of(&s).all_synced,
        "the server is still down: forwarding came from the checkpoint, not a sync"
    );

    bed.api.set_down(false);
    let s = bed.api_status_when(NODE1, SYNC_WITHIN, |a| a.connected && a.all_synced);
    let a = api_of(&s);
    assert!(
        a.connected && a.all_synced,
        "node1 did not sync after the server came back: {a:?}\n{}",
        bed.agent_log(NODE1)
    );
    let s = status_when(&bed.tb, NODE1, APPLY_WITHIN, |s| s.source_error.is_none());
    assert_eq!(
        s.source_error, None,
        "the checkpoint note outlived the sync"
    );
    let out = ping(&bed.tb, CLIENT, pod_ip(&bed.tb, WEB2), 3);
    assert!(out.status.success(), "ping after the sync:\n{}", text(&out));
    assert!(is_web(&bed.probe(CLIENT, WEB_VIP, 80)));
}

/// A hot restart of an agent that reads the API server: a paced stream across it loses nothing,
/// the next agent forwards the handed-over state at once, then syncs and watches (a Service
/// added afterwards answers). A second hot restart while the API server is down forwards on the
/// handed-over state (the added Service included), says so, and syncs once the server is back,
/// pruning nothing.
#[test]
fn a_hot_restart_with_the_api_source_loses_nothing_and_watches_on() {
    require_root!();
    let _serial = hold(&SERIAL);
    let (mut bed, _servers) = KubeBed::up_serving_web();
    let agent_pid = |bed: &KubeBed| bed.tb.node(NODE1).expect("node1").agent_pid;
    let hot_restart = |bed: &mut KubeBed, what: &str| {
        let before = agent_pid(bed);
        let stream = PacedStream::start(&bed.tb, CLIENT, WEB2, 2000);
        thread::sleep(Duration::from_millis(400));
        bed.tb
            .hot_restart_agent(NODE1)
            .unwrap_or_else(|e| panic!("hot restart {what}: {e}\n{}", bed.agent_log(NODE1)));
        assert_ne!(agent_pid(bed), before, "a new agent runs ({what})");
        let sent = stream.datagrams;
        let (received, err) = stream.finish();
        assert_eq!(
            received,
            sent,
            "datagrams received across the hot restart {what} ({err}); where frames were \
             dropped:\n{}\n{}",
            ring_losses(&bed.tb, &[NODE1, NODE2]),
            bed.agent_log(NODE1)
        );
    };

    hot_restart(&mut bed, "with the API server up");
    let log = bed.agent_log(NODE1);
    assert!(
        log.contains("took over the running agent's dataplane"),
        "not a hot restart:\n{log}"
    );
    bed.synced_without_note(NODE1, "after the hot restart");
    // The next agent watches: a Service added through the API now answers.
    bed.add_service_answering(
        ("web-2", WEB2_IP, NODE2),
        "a Service added after the hot restart",
    );

    bed.api.set_down(true);
    hot_restart(&mut bed, "with the API server down");
    let s = status(&bed.tb, NODE1);
    let a = api_of(&s);
    assert!(!a.all_synced, "synced with a server that is down: {a:?}");
    assert!(
        s.source_error
            .as_deref()
            .is_some_and(|e| e.contains("handed over")),
        "status does not say it forwards the handed-over state: {:?}",
        s.source_error
    );
    assert!(is_web(&bed.probe(CLIENT, WEB_VIP, 80)), "ClusterIP");
    assert_eq!(
        bed.probe(CLIENT, ADDED_VIP, 80).as_deref(),
        Ok("web-2"),
        "the Service added through the API, handed over"
    );

    bed.api.set_down(false);
    bed.synced_without_note(NODE1, "after the server came back");
    assert_eq!(
        bed.probe(CLIENT, ADDED_VIP, 80).as_deref(),
        Ok("web-2"),
        "the resync pruned a Service that is still there"
    );
    assert!(
        is_web(&bed.probe(CLIENT, WEB_VIP, 80)),
        "ClusterIP after the resync"
    );
}

/// With WireGuard, the served Nodes carry no public keys: each agent patches its own Node with
/// its key, the other agent learns it through its watch, and pods reach each other encrypted.
#[test]
fn agents_publish_their_wireguard_keys_on_their_nodes() {
    require_root!();
    let _serial = hold(&SERIAL);
    let fixture = std::fs::read_to_string(cluster(WIREGUARD)).expect("read fixture");
    let served: String = fixture
        .lines()
        .filter(|l| !l.contains(control::wg::keys::PUBLIC_KEY_ANNOTATION))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!served.contains("wg-pub-key") && served.contains("testbed-wg-private-key"));
    let bed = KubeBed::up(WIREGUARD, Some(&served), Encryption::Wireguard);
    let tb = &bed.tb;

    let keys: Vec<(&str, String)> = [NODE1, NODE2]
        .into_iter()
        .map(|node| {
            let s = status(tb, node);
            let w = s
                .wireguard
                .unwrap_or_else(|| panic!("{node} has no wireguard status"));
            (node, w.public_key)
        })
        .collect();
    let deadline = Instant::now() + APPLY_WITHIN;
    let patched = |patches: &[Value], node: &str, key: &str| {
        patches.iter().any(|p| {
            p["kind"] == "Node"
                && p["name"] == node
                && p["status"] == 200
                && p["body"]["metadata"]["annotations"][control::wg::keys::PUBLIC_KEY_ANNOTATION]
                    == key
        })
    };
    let mut patches = bed.api.patches();
    while !keys.iter().all(|(n, k)| patched(&patches, n, k)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        patches = bed.api.patches();
    }
    for (node, key) in &keys {
        assert!(
            patched(&patches, node, key),
            "no PATCH of Node {node} with its key {key}: {patches:?}"
        );
        let (code, body) = bed
            .api
            .request("GET", &format!("/api/v1/nodes/{node}"), None);
        assert_eq!(code, 200, "{body}");
        let served: Value = serde_json::from_str(&body).expect("Node JSON");
        assert_eq!(
            served["metadata"]["annotations"][control::wg::keys::PUBLIC_KEY_ANNOTATION],
            key.as_str(),
            "the served Node {node} after the patch"
        );
    }

    // Each agent learned the other's key only from the API: sessions, then encrypted traffic.
    let peers_within = Instant::now() + SYNC_WITHIN;
    for (node, other) in [(NODE1, NODE2), (NODE2, NODE1)] {
        let other_key = &keys.iter().find(|(n, _)| *n == other).expect("key").1;
        let s = status_when(
            tb,
            node,
            peers_within.saturating_duration_since(Instant::now()),
            |s| {
                s.wireguard.as_ref().is_some_and(|w| {
                    w.peers
                        .iter()
                        .any(|p| p.node == other && &p.public_key == other_key)
                })
            },
        );
        let w = s.wireguard.expect("wireguard status");
        assert!(
            w.peers
                .iter()
                .any(|p| p.node == other && &p.public_key == other_key),
            "{node} has no peer {other} with the patched key: {w:?}"
        );
    }
    ping_within(tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    let before = status(tb, NODE1).total("encrypted");
    let out = ping(tb, POD_A1, pod_ip(tb, POD_B1), 5);
    assert!(out.status.success(), "pod-a1 -> pod-b1:\n{}", text(&out));
    let s = status_when(tb, NODE1, Duration::from_secs(3), |s| {
        s.total("encrypted") >= before + 5
    });
    assert!(
        s.total("encrypted") >= before + 5,
        "node1 sealed {} packets for 5 pings",
        s.total("encrypted") - before
    );
    let w = s.wireguard.expect("wireguard status");
    let p = w
        .peers
        .iter()
        .find(|p| p.node == NODE2)
        .expect("peer node2");
    assert!(
        p.has_session && p.tx_packets >= 5,
        "node1's peer node2: {p:?}"
    );
}

/// A Service with fields of the wrong type is skipped (counted, warned about by name); the
/// agents keep forwarding and keep applying later changes.
#[test]
fn an_invalid_object_is_skipped_and_the_rest_keeps_working() {
    require_root!();
    let _serial = hold(&SERIAL);
    let mut bed = KubeBed::up(SERVICES, None, Encryption::None);
    let _servers = bed.start_web_servers();
    assert!(is_web(&bed.probe_until(
        CLIENT,
        WEB_VIP,
        80,
        APPLY_WITHIN,
        is_web
    )));
    let skipped_before: Vec<u64> = [NODE1, NODE2]
        .iter()
        .map(|n| api_of(&status(&bed.tb, n)).skipped_objects)
        .collect();

    let bad = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bad-types", "namespace": "default", "labels": 7},
        "spec": {"clusterIP": "10.96.1.77", "selector": "app=web",
                 "ports": [{"port": "eighty", "protocol": "TCP"}]}
    });
    bed.api
        .control("POST", "/fake/insert-raw?kind=Service", Some(&bad));
    for (node, before) in [NODE1, NODE2].into_iter().zip(&skipped_before) {
        let s = bed.api_status_when(node, APPLY_WITHIN, |a| a.skipped_objects > *before);
        let a = api_of(&s);
        assert!(
            a.skipped_objects > *before,
            "{node} did not count the bad Service: {a:?}"
        );
        assert!(a.connected && a.all_synced, "{node}: {a:?}");
        let log = bed.agent_log(node);
        let warning = log
            .lines()
            .find(|l| l.contains("default/bad-types"))
            .unwrap_or_else(|| panic!("{node}'s log does not name default/bad-types:\n{log}"));
        assert!(warning.contains("WARN"), "{node}: {warning}");
        assert!(
            bed.tb.agent_alive(node).expect("node"),
            "{node}'s agent died"
        );
    }
    assert!(
        is_web(&bed.probe(CLIENT, WEB_VIP, 80)),
        "web after the bad object"
    );
    assert!(
        bed.probe(CLIENT, Ipv4Addr::new(10, 96, 1, 77), 80).is_err(),
        "the bad Service was programmed"
    );
    // A good change after the bad object still arrives.
    bed.add_service_answering(
        ("web-2", WEB2_IP, NODE2),
        "a good Service after the bad one",
    );
    let a = api_of(&status(&bed.tb, NODE1)).clone();
    assert!(
        a.connected && a.all_synced,
        "node1 after the bad object: {a:?}"
    );
}
