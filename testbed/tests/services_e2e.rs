//! End-to-end tests of Services (issue 5) on the two-node testbed of
//! `testbed/clusters/services.yaml`: sluice agents with two workers each (so flows are steered
//! between workers), Python servers in the backend pods that answer every request with their
//! name and the peer address they saw, Python clients in the client pod, in a backend pod and in
//! the external client's namespace (172.18.0.250), and the agents' counters and service listing
//! read over their local API (and `sluice service list`).
//!
//! Root only; build the binaries first: `cargo build -p control --bins`.
//!
//! Every test brings up its own instance under a unique name (pid + counter) and a temporary
//! state root; the `Testbed` drop removes everything, also when a test panics. Servers are
//! stopped by pid when dropped and end on their own after [`SERVER_SECONDS`] (`signal.alarm`)
//! whatever happens. Two nodes with two workers each are all the two vCPUs can take, so the tests
//! hold [`SERIAL`]. Counters are asserted as deltas; every command runs under `timeout`, every
//! wait is bounded.
//!
//! The test that changes Services while traffic runs gives the agents (both read the instance's
//! cluster file, `--source file:`, polled) a copy of the fixture in a temporary directory and
//! replaces it by rename.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::Ipv4Addr,
    process::{ChildStdin, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use control::{
    api::{self, Request},
    services::listing::{ServiceListing, ServicePortListing},
    status::Status,
};
use serde::Deserialize;
use testbed::Testbed;

mod common;
use common::{
    cluster, drops, hold, ping, ping_within, pod_ip, python, replace_file, require_root,
    settled_status, status_when, text, timed, Env, Proc, COUNTERS_SETTLE, STATUS_TIMEOUT,
};

/// Instance names here are `v{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'v';
const SERVICES: &str = "services.yaml";
const WORKERS: u32 = 2;
const NODE1: &str = "node1";
const NODE2: &str = "node2";
const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
/// The external client's address (`.250` of the nodes' /24).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 250);
/// What a backend sees as the source of a connection from itself through its own Service.
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

const CLIENT: &str = "default/client";
const WEB1: &str = "default/web-1";
const WEB2: &str = "default/web-2";
/// The fixture's pod addresses (its explicit EndpointSlices rely on them; checked first).
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const WEB1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
const WEB2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// The backends' server names (what they answer).
const WEB1_NAME: &str = "web-1";
const WEB2_NAME: &str = "web-2";
/// The backends' ports: `http` and `dns` of the web pods.
const HTTP_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;

/// `web`: http 80/TCP, dns 53/UDP; backends web-1 (node1) and web-2 (node2).
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
/// `web-sticky`: sessionAffinity ClientIP.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
/// `nothing`: 80/TCP, no endpoints.
const NOTHING_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 14);
/// `nothing-udp`: 53/UDP, no endpoints.
const NOTHING_UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 17);
/// `web-nodeport` (eTP Cluster).
const WEB_NODEPORT: u16 = 30080;
/// `web-lb`: LoadBalancer, eTP Local, healthCheckNodePort 32081; local backends on both nodes.
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
const LB_HEALTH_PORT: u16 = 32081;
/// `web-local1`: eTP Local, its only backend is web-1 (node1); healthCheckNodePort 32082.
const LOCAL1_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
const LOCAL1_NODEPORT: u16 = 30082;
const LOCAL1_HEALTH_PORT: u16 = 32082;

/// Added by [`endpoint_changes_while_traffic_runs`] to its copy of the fixture: selector-less
/// Services whose EndpointSlices the test rewrites.
const DRAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 20);
const CHURN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 21);

/// Servers end on their own after this long (longer than any test here).
const SERVER_SECONDS: u32 = 170;
/// First packets between the nodes wait for ARP.
const FIRST_PING_WITHIN: Duration = Duration::from_secs(10);
/// How long an agent may take to notice a changed cluster file and publish the new plan.
const APPLY_WITHIN: Duration = Duration::from_secs(10);
/// A refused connection is answered by the node, not after a retransmission timeout.
const REFUSED_WITHIN_MS: f64 = 500.0;

/// Two nodes, two workers each: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Python programs.

/// argv: name, TCP port, UDP port. Prints "ready"; answers every line on a TCP connection and
/// every datagram with `name peer_ip peer_port`. Ends after argv[4] seconds (SIGALRM) at most.
const SERVER: &str = r#"
import signal, socket, sys, threading
name, tcp_port, udp_port, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
signal.alarm(seconds)
def conn(c, a):
    try:
        f = c.makefile("rb")
        for _ in f:
            c.sendall(f"{name} {a[0]} {a[1]}\n".encode())
    except OSError:
        pass
    finally:
        c.close()
def udp(u):
    while True:
        d, a = u.recvfrom(2048)
        u.sendto(f"{name} {a[0]} {a[1]}".encode(), a)
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", tcp_port))
t.listen(128)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", udp_port))
threading.Thread(target=udp, args=(u,), daemon=True).start()
print("ready", flush=True)
while True:
    c, a = t.accept()
    threading.Thread(target=conn, args=(c, a), daemon=True).start()
"#;

/// argv: tcp|udp|udp-connected, host, port, count, timeout seconds. `count` requests, each on a
/// new socket (new source port); prints one JSON list: {name, peer, from, ms} per answer or
/// {error, ms} (the exception's class name).
const CLIENT_SCRIPT: &str = r#"
import json, socket, sys, time
proto, host, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
out = []
for i in range(count):
    t0 = time.monotonic()
    try:
        if proto == "tcp":
            s = socket.create_connection((host, port), timeout=timeout)
            s.sendall(b"hi\n")
            data = s.makefile("rb").readline()
            frm = s.getpeername()[0]
        elif proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(b"hi", (host, port))
            data, a = s.recvfrom(2048)
            frm = a[0]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.connect((host, port))
            s.send(b"hi")
            data = s.recv(2048)
            frm = host
        s.close()
        w = data.decode().split()
        if len(w) != 3:
            raise ValueError("bad answer %r" % data)
        r = {"name": w[0], "peer": w[1], "from": frm}
    except Exception as e:
        r = {"error": type(e).__name__}
    r["ms"] = (time.monotonic() - t0) * 1000
    out.append(r)
print(json.dumps(out), flush=True)
"#;

/// argv: host, port. GET / and print {status, body} as JSON.
const HEALTH_SCRIPT: &str = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
c.request("GET", "/")
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read())}), flush=True)
"#;

/// argv: host, port, n, seconds. Opens n TCP connections and keeps them; one round (a line on
/// each connection, its answer read) at start and for every "round" line on stdin; prints each
/// round as a JSON list of server names (or the exception's class name, or "closed"). Ends at
/// EOF on stdin or after `seconds`.
const HOLDER: &str = r#"
import json, signal, socket, sys
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
signal.alarm(seconds)
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=3)
    conns.append((s, s.makefile("rb")))
def one_round():
    out = []
    for s, f in conns:
        try:
            s.sendall(b"x\n")
            w = f.readline().decode().split()
            out.append(w[0] if len(w) == 3 else "closed")
        except Exception as e:
            out.append(type(e).__name__)
    print(json.dumps(out), flush=True)
one_round()
for line in sys.stdin:
    if line.strip() != "round":
        break
    one_round()
"#;

// ---------------------------------------------------------------------------------------------
// Running them.

/// A long-running Python program: SIGTERM by pid when dropped (`timeout` passes it on to
/// Python), then [`Proc`]'s drop kills and reaps what is left.
struct Server {
    proc: Option<Proc>,
    what: String,
}

impl Server {
    fn start(mut command: Command, what: String) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let mut proc = Proc::new(child);
        let first = proc.line();
        let server = Self {
            proc: Some(proc),
            what,
        };
        assert_eq!(first, "ready", "{} did not start", server.what);
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(proc) = self.proc.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(proc.child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let (_, err, status) = proc.finish();
        if !err.trim().is_empty() {
            eprintln!("{} ({status}) said on stderr:\n{err}", self.what);
        }
    }
}

/// `argv` in the external client's namespace (for long-running programs).
fn external_command(tb: &Testbed, argv: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", tb.external_netns()])
        .args(argv);
    command
}

/// The echo server (`SERVER`) named `name` on `tcp`/`udp` in `pod`.
fn server_in_pod(tb: &Testbed, pod: &str, name: &str, tcp: u16, udp: u16) -> Server {
    let (tcp, udp, seconds) = (tcp.to_string(), udp.to_string(), SERVER_SECONDS.to_string());
    let limit = (SERVER_SECONDS + 5).to_string();
    let argv = timed(
        &limit,
        &[python(), "-c", SERVER, name, &tcp, &udp, &seconds],
    );
    let command = tb
        .pod_command(pod, &argv)
        .unwrap_or_else(|e| panic!("server in {pod}: {e}"));
    Server::start(command, format!("server {name} in {pod}"))
}

/// Servers on the web pods' `http` and `dns` ports.
fn web_servers(tb: &Testbed) -> Vec<Server> {
    vec![
        server_in_pod(tb, WEB1, WEB1_NAME, HTTP_PORT, DNS_PORT),
        server_in_pod(tb, WEB2, WEB2_NAME, HTTP_PORT, DNS_PORT),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Origin<'a> {
    Pod(&'a str),
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    /// A connected UDP socket: an ICMP port unreachable becomes ConnectionRefusedError.
    UdpConnected,
}

impl Proto {
    fn arg(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::UdpConnected => "udp-connected",
        }
    }
}

/// One request of [`CLIENT_SCRIPT`].
#[derive(Debug, Deserialize)]
struct Answer {
    /// The server that answered.
    name: Option<String>,
    /// The source address the server saw.
    peer: Option<Ipv4Addr>,
    /// The address the answer came from (TCP: the connected peer).
    from: Option<Ipv4Addr>,
    /// The exception's class name when there was no answer.
    error: Option<String>,
    ms: f64,
}

/// `count` requests, each on a new socket, from `origin` to `host:port`.
fn requests(
    tb: &Testbed,
    origin: Origin<'_>,
    proto: Proto,
    host: Ipv4Addr,
    port: u16,
    count: u32,
    timeout_seconds: f64,
) -> Vec<Answer> {
    let (host, port_s, count_s) = (host.to_string(), port.to_string(), count.to_string());
    let timeout_s = timeout_seconds.to_string();
    // Every request bounded by its socket timeout (a TCP request has two waits).
    let limit = (f64::from(count) * (2.0 * timeout_seconds + 0.5) + 10.0)
        .ceil()
        .to_string();
    let argv = timed(
        &limit,
        &[
            python(),
            "-c",
            CLIENT_SCRIPT,
            proto.arg(),
            &host,
            &port_s,
            &count_s,
            &timeout_s,
        ],
    );
    let out = match origin {
        Origin::Pod(pod) => tb.exec_in_pod(pod, &argv),
        Origin::External => tb.exec_in_external(&argv),
    }
    .unwrap_or_else(|e| panic!("client in {origin:?}: {e}"));
    assert!(
        out.status.success(),
        "client {origin:?} -> {host}:{port} ({proto:?}):\n{}",
        text(&out)
    );
    let answers: Vec<Answer> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client output ({e}):\n{}", text(&out)));
    assert_eq!(answers.len(), count as usize, "one result per request");
    answers
}

/// Answers per server name, failures as `error:CLASS`.
fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        let key = match (&a.name, &a.error) {
            (Some(name), _) => name.clone(),
            (None, Some(e)) => format!("error:{e}"),
            (None, None) => "error:?".into(),
        };
        *t.entry(key).or_insert(0) += 1;
    }
    t
}

/// The peer addresses each server saw.
fn peers(answers: &[Answer]) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut p: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for a in answers {
        if let (Some(name), Some(peer)) = (&a.name, a.peer) {
            let seen = p.entry(name.clone()).or_default();
            if !seen.contains(&peer) {
                seen.push(peer);
            }
        }
    }
    p
}

fn assert_all_answered(what: &str, answers: &[Answer]) {
    assert!(
        answers.iter().all(|a| a.name.is_some()),
        "{what}: not every request was answered: {:?}",
        tally(answers)
    );
}

/// Every answer from server `name` saw exactly the source `peer`.
fn assert_peer(what: &str, answers: &[Answer], name: &str, peer: Ipv4Addr) {
    let seen = peers(answers);
    assert_eq!(
        seen.get(name).map(Vec::as_slice),
        Some(&[peer][..]),
        "{what}: {name} should see the source {peer}; servers saw {seen:?}"
    );
}

/// GET on a healthCheckNodePort from the external client: (HTTP status, JSON body).
fn health(tb: &Testbed, node_ip: Ipv4Addr, port: u16) -> (u16, serde_json::Value) {
    let (host, port) = (node_ip.to_string(), port.to_string());
    let out = tb
        .exec_in_external(&timed("15", &[python(), "-c", HEALTH_SCRIPT, &host, &port]))
        .expect("health check runs");
    assert!(out.status.success(), "GET {host}:{port}:\n{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("health output ({e}):\n{}", text(&out)));
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or_else(|| panic!("no status in {v}"));
    (status, v["body"].clone())
}

// ---------------------------------------------------------------------------------------------
// The agents.

fn listing(tb: &Testbed, node: &str) -> ServiceListing {
    let socket = &tb.node(node).expect("node").agent_socket;
    api::call(socket, &Request::Services, STATUS_TIMEOUT)
        .unwrap_or_else(|e| panic!("services call to {node}'s agent: {e}"))
        .services
        .unwrap_or_else(|| panic!("{node}'s agent sent no service listing"))
}

/// The listing once `done` holds (bounded); the last one either way.
fn listing_when(
    tb: &Testbed,
    node: &str,
    within: Duration,
    done: impl Fn(&ServiceListing) -> bool,
) -> ServiceListing {
    let deadline = Instant::now() + within;
    loop {
        let l = listing(tb, node);
        if done(&l) || Instant::now() >= deadline {
            return l;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The service port `name:port_name` of `default` in a listing.
fn service_port<'a>(l: &'a ServiceListing, name: &str, port_name: &str) -> &'a ServicePortListing {
    l.services
        .iter()
        .find(|s| s.namespace == "default" && s.name == name && s.port_name == port_name)
        .unwrap_or_else(|| panic!("the listing has no default/{name}:{port_name}: {l:#?}"))
}

/// A backend as the tests compare it: address, port, node, local, state, in the cluster rotation.
type BackendRow<'a> = (Ipv4Addr, u16, Option<&'a str>, bool, &'a str, bool);

/// (address, state) of each backend of a service port.
fn backend_states(s: &ServicePortListing) -> Vec<(Ipv4Addr, String)> {
    s.backends
        .iter()
        .map(|b| (b.address, b.state.clone()))
        .collect()
}

/// Both nodes' status once the counters settled.
fn settled(tb: &Testbed) -> (Status, Status) {
    (settled_status(tb, NODE1), settled_status(tb, NODE2))
}

/// Common start of every test: the fixture's addresses hold, neighbours are resolved both ways
/// between the nodes, servers run in both web pods.
fn prepare(tb: &Testbed) -> Vec<Server> {
    for (pod, ip) in [(CLIENT, CLIENT_IP), (WEB1, WEB1_IP), (WEB2, WEB2_IP)] {
        assert_eq!(
            pod_ip(tb, pod),
            ip,
            "{pod}: the pod has services.yaml's podIP (the testbed passes it as CNI_ARGS IP=)"
        );
    }
    for s in [NODE1, NODE2] {
        let st = common::status(tb, s);
        assert_eq!(st.workers.len(), WORKERS as usize, "{s}:\n{}", st.render());
    }
    ping_within(tb, CLIENT, WEB2, FIRST_PING_WITHIN);
    ping_within(tb, WEB2, WEB1, FIRST_PING_WITHIN);
    web_servers(tb)
}

fn up(env: &Env, file: &std::path::Path) -> Testbed {
    env.up(file, WORKERS)
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Items 1, 4 and 9: ClusterIP TCP spread over backends on both nodes, UDP `dns` answered from
/// the ClusterIP, session affinity, a backend reaching its own Service (hairpin).
#[test]
fn clusterip_spread_udp_affinity_and_hairpin() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = up(&env, &cluster(SERVICES));
    let _servers = prepare(&tb);
    let (before1, before2) = settled(&tb);

    // 1. 60 connections from the client pod: both backends get a share, both see the pod.
    let tcp = requests(&tb, Origin::Pod(CLIENT), Proto::Tcp, WEB_VIP, 80, 60, 3.0);
    let counts = tally(&tcp);
    eprintln!("ClusterIP TCP: {counts:?}");
    assert_all_answered("client -> web ClusterIP TCP", &tcp);
    for name in [WEB1_NAME, WEB2_NAME] {
        assert!(
            counts.get(name).copied().unwrap_or(0) >= 6,
            "{name} got less than a tenth of 60 connections: {counts:?}"
        );
        assert_peer("ClusterIP TCP", &tcp, name, CLIENT_IP);
    }
    assert!(
        tcp.iter().all(|a| a.from == Some(WEB_VIP)),
        "connected to the ClusterIP"
    );

    // UDP to the `dns` port: answered, and every answer comes from the ClusterIP.
    let udp = requests(&tb, Origin::Pod(CLIENT), Proto::Udp, WEB_VIP, 53, 20, 3.0);
    let counts = tally(&udp);
    eprintln!("ClusterIP UDP: {counts:?}");
    assert_all_answered("client -> web ClusterIP UDP dns", &udp);
    let sources: Vec<Option<Ipv4Addr>> = udp.iter().map(|a| a.from).collect();
    assert!(
        sources.iter().all(|s| *s == Some(WEB_VIP)),
        "UDP answers must come from {WEB_VIP}: {sources:?}"
    );
    assert!(
        counts.len() == 2,
        "20 UDP flows reach both backends: {counts:?}"
    );
    for name in [WEB1_NAME, WEB2_NAME] {
        assert_peer("ClusterIP UDP", &udp, name, CLIENT_IP);
    }

    // 4. Session affinity: 20 connections from one client, one backend.
    let sticky = requests(
        &tb,
        Origin::Pod(CLIENT),
        Proto::Tcp,
        STICKY_VIP,
        80,
        20,
        3.0,
    );
    let counts = tally(&sticky);
    eprintln!("web-sticky: {counts:?}");
    assert_all_answered("client -> web-sticky", &sticky);
    assert_eq!(
        counts.len(),
        1,
        "ClientIP affinity: one backend for all: {counts:?}"
    );

    // 9. Hairpin: web-1 through its own Service; reaching itself it sees the hairpin address.
    let hairpin = requests(&tb, Origin::Pod(WEB1), Proto::Tcp, WEB_VIP, 80, 30, 3.0);
    let counts = tally(&hairpin);
    eprintln!("web-1 -> web: {counts:?}, peers {:?}", peers(&hairpin));
    assert_all_answered("web-1 -> web ClusterIP", &hairpin);
    assert!(
        counts.contains_key(WEB1_NAME),
        "30 connections, none to web-1 itself: {counts:?}"
    );
    assert_peer("hairpin", &hairpin, WEB1_NAME, HAIRPIN_IP);
    if counts.contains_key(WEB2_NAME) {
        assert_peer("web-1 -> web-2", &hairpin, WEB2_NAME, WEB1_IP);
    }

    let after1 = status_when(&tb, NODE1, COUNTERS_SETTLE, |_| false);
    let after2 = settled_status(&tb, NODE2);
    for (node, before, after) in [(NODE1, &before1, &after1), (NODE2, &before2, &after2)] {
        let unexpected = common::unexpected_drops(before, after, &[("neighbor_unresolved", 4)]);
        assert!(
            unexpected.is_empty(),
            "{node}: unexpected drops {unexpected:?}:\n{}",
            after.render()
        );
    }
    // Both of node1's workers owned some of the 60+ client flows, and frames that arrived on
    // the worker that does not own their flow were handed to the owner (and all arrived).
    let per_worker = |s: &Status, name: &str| -> Vec<u64> {
        s.workers
            .iter()
            .map(|w| {
                w.counters
                    .iter()
                    .find(|(k, _)| k == name)
                    .map_or(0, |(_, v)| *v)
            })
            .collect()
    };
    let grew = |name: &str| -> Vec<u64> {
        per_worker(&after1, name)
            .iter()
            .zip(per_worker(&before1, name))
            .map(|(a, b)| a - b)
            .collect()
    };
    let new_flows = grew("lb_new_flows");
    assert_eq!(new_flows.len(), 2, "node1 runs two workers");
    assert!(
        new_flows.iter().all(|&n| n >= 5),
        "both workers own service flows: {new_flows:?}"
    );
    let (out, inn) = (grew("handoff_out"), grew("handoff_in"));
    assert!(
        out.iter().sum::<u64>() > 0,
        "frames were handed over: {out:?}"
    );
    assert_eq!(
        out.iter().sum::<u64>(),
        inn.iter().sum::<u64>(),
        "every handed frame arrived"
    );
}

/// Items 2, 3 and 10: NodePort from outside on both nodes (local backend sees the client,
/// remote one the node: SNAT), a pod on node1 to node2's NodePort, the LoadBalancer IP with
/// externalTrafficPolicy Local, drops on a node without a local backend, healthCheckNodePort.
#[test]
fn nodeport_loadbalancer_and_health_checks() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = up(&env, &cluster(SERVICES));
    let _servers = prepare(&tb);
    assert_eq!(tb.external_ip(), Some(EXTERNAL_IP));

    // 2. NodePort from the external client on both node addresses.
    for (node_ip, local, remote) in [
        (NODE1_IP, WEB1_NAME, WEB2_NAME),
        (NODE2_IP, WEB2_NAME, WEB1_NAME),
    ] {
        let what = format!("external -> {node_ip}:{WEB_NODEPORT}");
        let a = requests(
            &tb,
            Origin::External,
            Proto::Tcp,
            node_ip,
            WEB_NODEPORT,
            40,
            3.0,
        );
        eprintln!("{what}: {:?}, peers {:?}", tally(&a), peers(&a));
        assert_all_answered(&what, &a);
        assert!(
            tally(&a).len() == 2,
            "{what}: 40 connections reach both backends: {:?}",
            tally(&a)
        );
        assert_peer(&what, &a, local, EXTERNAL_IP);
        assert_peer(&what, &a, remote, node_ip);
        assert!(a.iter().all(|x| x.from == Some(node_ip)));
    }

    // 10. A pod on node1 to the NodePort on node2's address; replies come back over the tunnel.
    let what = format!("client (node1) -> {NODE2_IP}:{WEB_NODEPORT}");
    let a = requests(
        &tb,
        Origin::Pod(CLIENT),
        Proto::Tcp,
        NODE2_IP,
        WEB_NODEPORT,
        20,
        3.0,
    );
    eprintln!("{what}: {:?}, peers {:?}", tally(&a), peers(&a));
    assert_all_answered(&what, &a);
    // node2 SNATs to its own address towards its remote backend; the local one sees the pod.
    if tally(&a).contains_key(WEB1_NAME) {
        assert_peer(&what, &a, WEB1_NAME, NODE2_IP);
    }
    if tally(&a).contains_key(WEB2_NAME) {
        assert_peer(&what, &a, WEB2_NAME, CLIENT_IP);
    }

    // 3. The LoadBalancer IP through node1 (eTP Local): web-1 only, client address kept.
    let lb = LB_IP.to_string();
    let gw = NODE1_IP.to_string();
    let out = tb
        .exec_in_external(&timed(
            "10",
            &["ip", "route", "replace", &format!("{lb}/32"), "via", &gw],
        ))
        .expect("ip route runs");
    assert!(out.status.success(), "route to the LB IP:\n{}", text(&out));
    let a = requests(&tb, Origin::External, Proto::Tcp, LB_IP, 80, 20, 3.0);
    eprintln!("external -> {LB_IP}:80 via node1: {:?}", tally(&a));
    assert_all_answered("LB IP via node1", &a);
    assert_eq!(tally(&a).len(), 1, "eTP Local: node1's own backend only");
    assert_peer("LB IP via node1", &a, WEB1_NAME, EXTERNAL_IP);

    // web-local1 (eTP Local, backend web-1 only): node1 serves it, node2 drops it.
    let a = requests(
        &tb,
        Origin::External,
        Proto::Tcp,
        NODE1_IP,
        LOCAL1_NODEPORT,
        10,
        3.0,
    );
    assert_all_answered("web-local1 NodePort on node1", &a);
    assert_peer("web-local1 NodePort on node1", &a, WEB1_NAME, EXTERNAL_IP);
    // Through node2, by its NodePort and by the LB IP routed to it: dropped, not rejected.
    let lb = LOCAL1_LB_IP.to_string();
    let gw = NODE2_IP.to_string();
    let out = tb
        .exec_in_external(&timed(
            "10",
            &["ip", "route", "replace", &format!("{lb}/32"), "via", &gw],
        ))
        .expect("ip route runs");
    assert!(out.status.success(), "route to the LB IP:\n{}", text(&out));
    let before2 = settled_status(&tb, NODE2);
    let attempts = 3;
    for (addr, port) in [(NODE2_IP, LOCAL1_NODEPORT), (LOCAL1_LB_IP, 80)] {
        let a = requests(&tb, Origin::External, Proto::Tcp, addr, port, attempts, 1.0);
        eprintln!("web-local1 {addr}:{port} via node2: {:?}", tally(&a));
        assert!(
            a.iter().all(|x| x.error.as_deref() == Some("TimeoutError")),
            "node2 has no local backend for web-local1 ({addr}:{port}): SYNs dropped, \
             connects time out: {a:?}"
        );
    }
    let want = 2 * u64::from(attempts);
    let after2 = status_when(&tb, NODE2, COUNTERS_SETTLE, |s| {
        drops(s, "service_no_local_backend") >= drops(&before2, "service_no_local_backend") + want
    });
    let grown =
        drops(&after2, "service_no_local_backend") - drops(&before2, "service_no_local_backend");
    assert!(
        grown >= want,
        "node2's service_no_local_backend grew by {grown}, want >= {want}:\n{}",
        after2.render()
    );

    // healthCheckNodePort: 200 with the local endpoint count, 503 on a node without any.
    for (node_ip, port, code, local) in [
        (NODE1_IP, LB_HEALTH_PORT, 200, 1),
        (NODE2_IP, LB_HEALTH_PORT, 200, 1),
        (NODE1_IP, LOCAL1_HEALTH_PORT, 200, 1),
        (NODE2_IP, LOCAL1_HEALTH_PORT, 503, 0),
    ] {
        let (status, body) = health(&tb, node_ip, port);
        assert_eq!(
            (status, body["localEndpoints"].as_u64()),
            (code, Some(local)),
            "GET {node_ip}:{port}: {body}"
        );
    }
}

/// Items 7, 8 and 11: no endpoints (TCP RST at once, UDP ICMP port unreachable, counted),
/// masquerade to outside the cluster, and `sluice service list` against the running agents.
#[test]
fn no_backend_masquerade_and_service_list() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = up(&env, &cluster(SERVICES));
    let _servers = prepare(&tb);

    // 7. No endpoints.
    let before = settled_status(&tb, NODE1);
    let tcp = requests(
        &tb,
        Origin::Pod(CLIENT),
        Proto::Tcp,
        NOTHING_VIP,
        80,
        5,
        3.0,
    );
    eprintln!("nothing TCP: {tcp:?}");
    assert!(
        tcp.iter()
            .all(|a| a.error.as_deref() == Some("ConnectionRefusedError")
                && a.ms < REFUSED_WITHIN_MS),
        "TCP to a Service without endpoints is refused at once: {tcp:?}"
    );
    let udp = requests(
        &tb,
        Origin::Pod(CLIENT),
        Proto::UdpConnected,
        NOTHING_UDP_VIP,
        53,
        5,
        3.0,
    );
    eprintln!("nothing-udp: {udp:?}");
    assert!(
        udp.iter()
            .all(|a| a.error.as_deref() == Some("ConnectionRefusedError")
                && a.ms < REFUSED_WITHIN_MS),
        "UDP to a Service without endpoints gets port unreachable at once: {udp:?}"
    );
    let after = status_when(&tb, NODE1, COUNTERS_SETTLE, |s| {
        drops(s, "service_no_backend") >= drops(&before, "service_no_backend") + 10
    });
    let grown = drops(&after, "service_no_backend") - drops(&before, "service_no_backend");
    assert!(
        grown >= 10,
        "service_no_backend grew by {grown} for 10 requests:\n{}",
        after.render()
    );
    // A ClusterIP on a port it does not serve: refused too.
    let other = requests(&tb, Origin::Pod(CLIENT), Proto::Tcp, WEB_VIP, 8081, 2, 3.0);
    assert!(
        other
            .iter()
            .all(|a| a.error.as_deref() == Some("ConnectionRefusedError")),
        "unknown port of a ClusterIP: {other:?}"
    );

    // 8. Masquerade: pods to a server outside the cluster are seen as their node.
    let (port, seconds) = ("9090", SERVER_SECONDS.to_string());
    let limit = (SERVER_SECONDS + 5).to_string();
    let _outside = Server::start(
        external_command(
            &tb,
            &timed(
                &limit,
                &[python(), "-c", SERVER, "outside", port, "9091", &seconds],
            ),
        ),
        "server in the external namespace".into(),
    );
    for (pod, node_ip) in [(CLIENT, NODE1_IP), (WEB2, NODE2_IP)] {
        let what = format!("{pod} -> {EXTERNAL_IP}:{port}");
        let a = requests(&tb, Origin::Pod(pod), Proto::Tcp, EXTERNAL_IP, 9090, 5, 3.0);
        assert_all_answered(&what, &a);
        assert_peer(&what, &a, "outside", node_ip);
        let u = requests(&tb, Origin::Pod(pod), Proto::Udp, EXTERNAL_IP, 9091, 5, 3.0);
        assert_all_answered(&format!("{what} UDP"), &u);
        assert_peer(&format!("{what} UDP"), &u, "outside", node_ip);
        assert!(u.iter().all(|x| x.from == Some(EXTERNAL_IP)));
    }
    let out = ping(&tb, CLIENT, EXTERNAL_IP, 3);
    let shown = text(&out);
    assert!(
        out.status.success() && shown.contains("3 received"),
        "ping client -> {EXTERNAL_IP}:\n{shown}"
    );

    // 11. The listing over the API and from the CLI.
    let l1 = listing(&tb, NODE1);
    let web = service_port(&l1, "web", "http");
    assert_eq!(
        (web.cluster_ip, web.port, web.protocol.as_str()),
        (WEB_VIP, 80, "TCP")
    );
    let fronts: Vec<(Ipv4Addr, u16, &str)> = web
        .frontends
        .iter()
        .map(|f| (f.address, f.port, f.kind.as_str()))
        .collect();
    assert_eq!(fronts, [(WEB_VIP, 80, "clusterip")]);
    let backends: Vec<BackendRow<'_>> = web
        .backends
        .iter()
        .map(|b| {
            (
                b.address,
                b.port,
                b.node.as_deref(),
                b.local,
                b.state.as_str(),
                b.in_cluster_rotation,
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            (WEB1_IP, HTTP_PORT, Some(NODE1), true, "active", true),
            (WEB2_IP, HTTP_PORT, Some(NODE2), false, "active", true),
        ]
    );
    let np = service_port(&l1, "web-nodeport", "http");
    assert!(
        np.frontends
            .iter()
            .any(|f| (f.address, f.port, f.kind.as_str()) == (NODE1_IP, WEB_NODEPORT, "nodeport")),
        "node1 serves its NodePort: {:?}",
        np.frontends
    );
    assert!(
        np.frontends.iter().all(|f| f.address != NODE2_IP),
        "node1 does not answer for node2's address: {:?}",
        np.frontends
    );
    let lb = service_port(&l1, "web-lb", "http");
    assert_eq!(lb.health_check_node_port, Some(LB_HEALTH_PORT));
    assert_eq!(lb.external_traffic_policy, "Local");
    assert!(
        lb.frontends.iter().any(|f| f.address == LB_IP
            && f.kind == "loadbalancer"
            && f.external_traffic_local
            && f.scope == "local"),
        "{:?}",
        lb.frontends
    );
    assert_eq!(
        service_port(&l1, "web-sticky", "http").affinity_timeout_seconds,
        Some(60)
    );
    let nothing = service_port(&l1, "nothing", "http");
    assert!(nothing.backends.is_empty() && nothing.cluster_rotation.backends == 0);
    let l2 = listing(&tb, NODE2);
    let local1 = service_port(&l2, "web-local1", "http");
    assert_eq!(
        local1.local_rotation.as_ref().map(|r| r.backends),
        Some(0),
        "node2 has no local backend for web-local1: {local1:?}"
    );
    assert_eq!(backend_states(local1), [(WEB1_IP, "active".to_string())]);

    let sluice = testbed::find_next_to_exe(testbed::SLUICE_BIN_NAME);
    let state_dir = tb.node(NODE1).expect("node1").state_dir.clone();
    let cli = |json: bool| {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "15"])
            .arg(&sluice)
            .args(["service", "list", "--state-dir"]);
        c.arg(&state_dir);
        if json {
            c.arg("--json");
        }
        let out = c.output().expect("sluice service list runs");
        assert!(out.status.success(), "sluice service list:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_cli: ServiceListing =
        serde_json::from_str(&cli(true)).expect("`sluice service list --json` is a listing");
    assert_eq!(from_cli, l1, "the CLI shows what the API answers");
    let table = cli(false);
    eprintln!("{table}");
    let row = table
        .lines()
        .position(|l| l.contains(&format!("{WEB_VIP}:80/TCP")))
        .unwrap_or_else(|| panic!("no row for {WEB_VIP}:80/TCP:\n{table}"));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[row].contains("ClusterIP")
            && lines[row].contains("default/web:http")
            && lines[row].contains(&format!("1 => {WEB1_IP}:{HTTP_PORT}/TCP (active"))
            && lines
                .get(row + 1)
                .is_some_and(|l| l.contains(&format!("2 => {WEB2_IP}:{HTTP_PORT}/TCP (active"))),
        "table rows for web:\n{table}"
    );
    assert!(
        table.contains(&format!("{NOTHING_VIP}:80/TCP"))
            && table.contains("(no backend: new flows get a TCP RST / ICMP port unreachable)"),
        "{table}"
    );
}

// ---------------------------------------------------------------------------------------------
// Changing Services while traffic runs.

/// (address, node, pod, ready, serving, terminating).
type Endpoint<'a> = (Ipv4Addr, &'a str, &'a str, bool, bool, bool);

/// A selector-less ClusterIP Service `name` on `vip` port 80/TCP -> 8080.
fn service_doc(name: &str, vip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {vip}
  clusterIPs:
    - {vip}
  ipFamilies:
    - IPv4
  ports:
    - name: http
      port: 80
      targetPort: {HTTP_PORT}
      protocol: TCP
"
    )
}

/// The EndpointSlice of `service` with `endpoints`.
fn slice_doc(service: &str, endpoints: &[Endpoint<'_>]) -> String {
    let mut doc = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports:
  - name: http
    port: {HTTP_PORT}
    protocol: TCP
endpoints:
"
    );
    if endpoints.is_empty() {
        doc = doc.replace("endpoints:\n", "endpoints: []\n");
    }
    for (ip, node, pod, ready, serving, terminating) in endpoints {
        doc.push_str(&format!(
            "  - addresses:
      - {ip}
    conditions:
      ready: {ready}
      serving: {serving}
      terminating: {terminating}
    nodeName: {node}
    targetRef:
      kind: Pod
      namespace: default
      name: {pod}
"
        ));
    }
    doc
}

const DRAIN: &str = "web-drain";
const CHURN: &str = "web-churn";

/// The fixture plus `web-drain` and `web-churn` with the given endpoints.
fn cluster_with(fixture: &str, drain: &[Endpoint<'_>], churn: &[Endpoint<'_>]) -> String {
    let mut docs = vec![fixture.trim_end().to_string()];
    docs.push(service_doc(DRAIN, DRAIN_VIP));
    docs.push(slice_doc(DRAIN, drain));
    docs.push(service_doc(CHURN, CHURN_VIP));
    docs.push(slice_doc(CHURN, churn));
    docs.join("\n---\n")
}

/// Writes the new file and waits until both agents list `service`'s backends as `want`.
fn apply(
    tb: &Testbed,
    file: &std::path::Path,
    yaml: &str,
    service: &str,
    want: &[(Ipv4Addr, &str)],
) {
    replace_file(file, yaml);
    let want: Vec<(Ipv4Addr, String)> = want.iter().map(|(a, s)| (*a, s.to_string())).collect();
    for node in [NODE1, NODE2] {
        let l = listing_when(tb, node, APPLY_WITHIN, |l| {
            l.services
                .iter()
                .find(|s| s.name == service)
                .is_some_and(|s| backend_states(s) == want)
        });
        assert_eq!(
            backend_states(service_port(&l, service, "http")),
            want,
            "{node}'s agent did not apply the change to {service} within {APPLY_WITHIN:?}"
        );
    }
}

/// A [`HOLDER`] in a pod: long-lived connections, one round of requests on each per call.
struct Holder {
    server: Server,
    stdin: ChildStdin,
}

impl Holder {
    /// Opens `n` connections from `pod` to `vip:80`; the backend names of the first round.
    fn start(tb: &Testbed, pod: &str, vip: Ipv4Addr, n: u32) -> (Self, Vec<String>) {
        let (vip, n, seconds) = (vip.to_string(), n.to_string(), "100".to_string());
        let argv = timed("105", &[python(), "-c", HOLDER, &vip, "80", &n, &seconds]);
        let mut command = tb.pod_command(pod, &argv).expect("holder command");
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("holder starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut proc = Proc::new(child);
        let first = proc.line();
        let holder = Self {
            server: Server {
                proc: Some(proc),
                what: format!("connection holder in {pod}"),
            },
            stdin,
        };
        let names = parse_round(&first);
        (holder, names)
    }

    fn round(&mut self) -> Vec<String> {
        writeln!(self.stdin, "round").expect("holder reads its stdin");
        self.stdin.flush().expect("flush");
        let line = self
            .server
            .proc
            .as_mut()
            .map(Proc::line)
            .unwrap_or_default();
        parse_round(&line)
    }
}

fn parse_round(line: &str) -> Vec<String> {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("holder round {line:?}: {e}"))
}

/// Items 5 and 6: terminating backends take new connections only when no ready one is left
/// (never a not-serving one); a backend removed while long-lived connections run leaves the
/// connections to the survivor working, takes no new ones, and its own connections are reset.
#[test]
fn endpoint_changes_while_traffic_runs() {
    require_root!();
    let _serial = hold(&SERIAL);
    let fixture = std::fs::read_to_string(cluster(SERVICES)).expect("read services.yaml");
    let ready1: Endpoint = (WEB1_IP, NODE1, "web-1", true, true, false);
    let ready2: Endpoint = (WEB2_IP, NODE2, "web-2", true, true, false);
    let terminating1: Endpoint = (WEB1_IP, NODE1, "web-1", false, true, true);
    let terminating2: Endpoint = (WEB2_IP, NODE2, "web-2", false, true, true);
    let not_serving1: Endpoint = (WEB1_IP, NODE1, "web-1", false, false, true);
    let not_serving2: Endpoint = (WEB2_IP, NODE2, "web-2", false, false, false);
    let both = [ready1, ready2];
    let env = Env::with_cluster(&cluster_with(&fixture, &both, &both));
    let file = env.cluster_file();
    let mut tb = up(&env, &file);
    let _servers = prepare(&tb);
    let new_conns = |vip| {
        let a = requests(&tb, Origin::Pod(CLIENT), Proto::Tcp, vip, 80, 20, 3.0);
        assert_all_answered(&format!("client -> {vip}"), &a);
        tally(&a)
    };

    // 5. Terminating backends.
    let t = new_conns(DRAIN_VIP);
    assert_eq!(
        t.len(),
        2,
        "two ready backends share new connections: {t:?}"
    );
    // No ready backend: the serving+terminating one (web-2) takes all; web-1 is not serving.
    apply(
        &tb,
        &file,
        &cluster_with(&fixture, &[not_serving1, terminating2], &both),
        DRAIN,
        &[(WEB1_IP, "not-serving"), (WEB2_IP, "terminating")],
    );
    let l = listing(&tb, NODE1);
    assert!(
        service_port(&l, DRAIN, "http")
            .cluster_rotation
            .terminating_fallback,
        "rotation falls back to terminating backends"
    );
    let t = new_conns(DRAIN_VIP);
    assert_eq!(
        t,
        BTreeMap::from([(WEB2_NAME.to_string(), 20)]),
        "only the serving terminating backend"
    );
    // The other way round.
    apply(
        &tb,
        &file,
        &cluster_with(&fixture, &[terminating1, not_serving2], &both),
        DRAIN,
        &[(WEB1_IP, "terminating"), (WEB2_IP, "not-serving")],
    );
    let t = new_conns(DRAIN_VIP);
    assert_eq!(t, BTreeMap::from([(WEB1_NAME.to_string(), 20)]));
    // A ready backend beats a terminating one.
    apply(
        &tb,
        &file,
        &cluster_with(&fixture, &[terminating1, ready2], &both),
        DRAIN,
        &[(WEB1_IP, "terminating"), (WEB2_IP, "active")],
    );
    let t = new_conns(DRAIN_VIP);
    assert_eq!(t, BTreeMap::from([(WEB2_NAME.to_string(), 20)]));

    // 6. Backend removal while long-lived connections run.
    let drained = [terminating1, ready2];
    let (mut holder, first) = Holder::start(&tb, CLIENT, CHURN_VIP, 12);
    eprintln!("long-lived connections to web-churn: {first:?}");
    assert!(
        first.iter().all(|n| n == WEB1_NAME || n == WEB2_NAME),
        "every long-lived connection answered: {first:?}"
    );
    let on_web1: Vec<usize> = (0..first.len())
        .filter(|&i| first[i] == WEB1_NAME)
        .collect();
    assert!(
        !on_web1.is_empty(),
        "12 connections, none to web-1 (the survivor): {first:?}"
    );
    let round = holder.round();
    assert_eq!(round, first, "connections stay with their backend");
    replace_file(&file, &cluster_with(&fixture, &drained, &[ready1]));
    // Rounds keep going while the agents pick the change up.
    let deadline = Instant::now() + APPLY_WITHIN;
    let mut rounds = Vec::new();
    let want = vec![(WEB1_IP, "active".to_string())];
    loop {
        rounds.push(holder.round());
        let applied = [NODE1, NODE2]
            .iter()
            .all(|node| backend_states(service_port(&listing(&tb, node), CHURN, "http")) == want);
        if applied || Instant::now() >= deadline {
            assert!(
                applied,
                "web-2 not removed from web-churn within {APPLY_WITHIN:?}"
            );
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        rounds.push(holder.round());
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{} rounds during and after the removal; last {:?}",
        rounds.len(),
        rounds.last()
    );
    for (r, names) in rounds.iter().enumerate() {
        for &i in &on_web1 {
            assert_eq!(
                names.get(i).map(String::as_str),
                Some(WEB1_NAME),
                "round {r}: connection {i} to the surviving backend broke: {names:?}"
            );
        }
    }
    let t = new_conns(CHURN_VIP);
    assert_eq!(
        t,
        BTreeMap::from([(WEB1_NAME.to_string(), 20)]),
        "new connections only to the remaining backend"
    );
    // Connections to the removed backend: their flows are forgotten and balanced again (as
    // Cilium), so the next segment reaches web-1, which has no such connection and resets
    // it: none answers as web-2 any more.
    let last = holder.round();
    let removed: Vec<&String> = (0..first.len())
        .filter(|i| first[*i] == WEB2_NAME)
        .map(|i| &last[i])
        .collect();
    eprintln!("connections to the removed web-2 now answer: {removed:?}");
    assert!(
        removed.iter().all(|r| r.as_str() != WEB2_NAME),
        "a connection to the removed backend still reaches it: {removed:?}"
    );
    drop(holder);
    for node in [NODE1, NODE2] {
        assert!(tb.agent_alive(node).expect("node"), "{node}'s agent died");
    }
}
