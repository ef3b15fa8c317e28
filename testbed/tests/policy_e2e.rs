//! End-to-end tests of network policy (issue 6) on the two-node testbed of
//! `testbed/clusters/policy.yaml`: the upstream NetworkPolicy e2e model (kubernetes
//! `test/e2e/network/netpol`): namespaces x, y, z with pods a, b, c each, spread over two sluice
//! nodes, every pod serving 80 and 81 on TCP and UDP.
//!
//! - **Connectivity matrix** ([`connectivity_matrix`]): for each [`Scenario`] (policies drawn
//!   from upstream's `network_policy.go`), the policies are written into the cluster file the
//!   agents read, the agents are waited for, and every pod probes every pod on the scenario's
//!   ports (TCP: connect + one line and its answer; UDP: one datagram and its echo; 500 ms, a
//!   failed probe is tried once more), all sources at once, so a 9 x 9 x 2 matrix takes a few
//!   seconds. The expected matrix comes from hand-written rules per scenario
//!   ([`Scenario::reaches`]), not from the code under test; a test without root
//!   ([`scenario_expectations_agree_with_reference_evaluator`]) checks that sluice's reference
//!   evaluator (`control::policy::reference`) agrees with them. A mismatch prints expected,
//!   observed and the difference as tables (upstream's "reachability" printout).
//! - **Policy changes under open connections** ([`policy_changes_with_open_connections`]):
//!   flows opened before any policy isolated their pods are not tracked, so a policy that now
//!   denies them drops their next packets (`policy_denied_ingress`); flows opened under an
//!   isolating policy are tracked and judged again on every rule change (kept, or cut:
//!   `policy_cut`).
//! - **Audit mode**, per policy and agent-wide ([`audit_annotation_forwards_and_counts`],
//!   [`audit_agent_flag_forwards_and_counts`]): everything gets through, the agents count
//!   `policy_audit_ingress` / `policy_audit_egress` (`sluice status` totals).
//! - **Host firewall** ([`host_firewall_failsafe_and_removal`]): servers in the node namespaces
//!   probed from the external client, `sluice status`'s policy section.
//!
//! The testbed tests need root (otherwise they print "skipping: needs root"); build the binaries
//! first: `cargo build -p control --bins`. The checks of the test's own machinery (fixture,
//! expectations against the reference evaluator, the matrix comparison) run anywhere.
//!
//! Every test brings up its own instance (`p{pid}n{counter}z`) with a temporary state root and a
//! copy of the fixture that the agents read (`--source file:`, polled every 500 ms); applying
//! policies is replacing that copy by rename ([`Cluster::apply`]), and it is applied once every
//! agent has accepted exactly that content (the agent's last-good copy of its cluster file
//! equals it) and every worker runs the snapshot published with it. The `Testbed` drop removes
//! every namespace and interface, also when a test panics; servers and clients are killed by pid
//! when dropped and end on their own (`signal.alarm`) whatever happens. Every command runs under
//! `timeout`, every wait is bounded. Two nodes with two workers each are all the two vCPUs can
//! take, so the tests hold [`SERIAL`].
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{ChildStdin, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use control::{
    cluster,
    policy::{Evaluator, PolicyOptions, Verdict},
    status::Status,
};
use serde::Deserialize;
use testbed::Testbed;

mod common;
use common::{
    hold, python, replace_file, require_root, settled_status, status, text, timed, Env, Proc,
};

/// Instance names here are `p{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'p';
const FIXTURE: &str = "policy.yaml";
const WORKERS: u32 = 2;
const NODE1: &str = "node1";
const NODE2: &str = "node2";
const NODES: [&str; 2] = [NODE1, NODE2];
const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
/// The external client's address (`.250` of the nodes' /24).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 250);

/// Servers and clients end on their own after this long (longer than any test here).
const PROGRAM_SECONDS: u32 = 400;
/// How long an agent may take to notice a changed cluster file and publish it (the file is
/// polled every 500 ms).
const APPLY_WITHIN: Duration = Duration::from_secs(10);
/// The first probes wait for neighbours (ARP) between the nodes: the all-allowed matrix is
/// retried this long before a test starts.
const WARM_UP_WITHIN: Duration = Duration::from_secs(30);
/// One probe's wait (connect, answer); a failed probe is tried once more with [`RETRY_SECONDS`].
const PROBE_SECONDS: f64 = 0.5;
const RETRY_SECONDS: f64 = 1.0;
/// An open connection's wait for its answer ([`Holder::round`]). Generous: an allowed held
/// connection gets no second try (a timed-out TCP request leaves its answer in flight), and on a
/// loaded machine (other agents busy-polling the two vCPUs) an answer took over a second.
const HOLD_ANSWER_SECONDS: f64 = 2.5;
/// The agent's copy of the last cluster file it accepted, in its state directory
/// (`control::agent`'s `last_good_path`, written just before it publishes the new state).
const LAST_GOOD_FILE: &str = "last-good-cluster.yaml";

/// Two nodes, two workers each, nine pods: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// The model: pods and ports of `clusters/policy.yaml`.

/// A pod of the fixture: `ns/name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Pod {
    ns: &'static str,
    name: &'static str,
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const POD_NAMES: [&str; 3] = ["a", "b", "c"];

const XA: Pod = Pod::new("x", "a");
const XB: Pod = Pod::new("x", "b");
const YA: Pod = Pod::new("y", "a");
const YB: Pod = Pod::new("y", "b");
const YC: Pod = Pod::new("y", "c");
const ZA: Pod = Pod::new("z", "a");
const ZB: Pod = Pod::new("z", "b");

impl Pod {
    const fn new(ns: &'static str, name: &'static str) -> Self {
        Self { ns, name }
    }

    /// Every pod, x/a .. z/c.
    fn all() -> Vec<Pod> {
        NAMESPACES
            .iter()
            .flat_map(|ns| POD_NAMES.iter().map(move |name| Pod::new(ns, name)))
            .collect()
    }

    /// The fixture's pod number: 3 * namespace + pod.
    fn index(self) -> usize {
        let ns = NAMESPACES.iter().position(|n| *n == self.ns).unwrap_or(0);
        let pod = POD_NAMES.iter().position(|n| *n == self.name).unwrap_or(0);
        ns * POD_NAMES.len() + pod
    }

    /// `ns/name`, the testbed's pod key and what the pod's server answers.
    fn key(self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    /// The fixture's node: even pod numbers on node1, odd on node2.
    fn node(self) -> &'static str {
        NODES[self.index() % 2]
    }

    /// The fixture's podIP: `10.244.<node>.<10 + number>`.
    fn ip(self) -> Ipv4Addr {
        let i = self.index();
        Ipv4Addr::new(10, 244, (i % 2 + 1) as u8, 10 + i as u8)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Proto {
    Tcp,
    Udp,
}

/// A destination port: what the matrix has one table for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Port {
    proto: Proto,
    port: u16,
}

const TCP_80: Port = Port::tcp(80);
const TCP_81: Port = Port::tcp(81);
const UDP_80: Port = Port::udp(80);
const UDP_81: Port = Port::udp(81);
/// What every pod's server answers on.
const SERVED_TCP: &str = "80,81";
const SERVED_UDP: &str = "80,81";

impl Port {
    const fn tcp(port: u16) -> Self {
        Self {
            proto: Proto::Tcp,
            port,
        }
    }
    const fn udp(port: u16) -> Self {
        Self {
            proto: Proto::Udp,
            port,
        }
    }
    fn protocol_number(self) -> u8 {
        match self.proto {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    fn arg(self) -> &'static str {
        match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
    fn label(self) -> String {
        format!("{}/{}", self.arg().to_uppercase(), self.port)
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios: policies and the hand-written rule saying what they allow.

/// Policies for the x/y/z model and what they allow, by hand.
struct Scenario {
    name: &'static str,
    /// The upstream e2e test (`test/e2e/network/netpol/network_policy.go`) it follows.
    upstream: &'static str,
    /// NetworkPolicy documents (`---` separated), appended to the fixture.
    objects: &'static str,
    /// The matrix's ports.
    ports: &'static [Port],
    /// Whether `from` reaches `to` on `port`, written from the policies by hand. Never asked
    /// for a pod and itself (always reachable: the packets never leave the pod).
    reaches: fn(Pod, Pod, Port) -> bool,
}

const DEFAULT_DENY_INGRESS_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "default-deny-ingress",
        upstream: "should support a 'default-deny-ingress' policy",
        objects: DEFAULT_DENY_INGRESS_X,
        ports: &[TCP_80, UDP_81],
        reaches: |_, to, _| to.ns != "x",
    },
    Scenario {
        name: "pod-selector-within-namespace",
        upstream: "should enforce policy to allow traffic from pods within server namespace \
                   based on PodSelector",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-allows-x-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |from, to, _| to != XA || from == XB,
    },
    Scenario {
        name: "namespace-selector-match-expressions",
        upstream: "should enforce policy to allow traffic only from a different namespace, \
                   based on NamespaceSelector with MatchExpressions",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-match-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: [y]}]
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |from, to, _| to != XA || from.ns == "y",
    },
    Scenario {
        name: "namespace-and-pod-selector",
        upstream: "should enforce policy based on PodSelector and NamespaceSelector",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-pod-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |from, to, _| to != XA || from == YB,
    },
    Scenario {
        name: "ports",
        upstream: "should enforce policy based on Ports (here 80 allowed, 81 denied)",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-on-port-80-from-ns-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80}]
"#,
        ports: &[TCP_80, TCP_81, UDP_80],
        // `protocol` defaults to TCP: UDP 80 is not allowed either.
        reaches: |from, to, port| to != XA || (from.ns == "y" && port == TCP_80),
    },
    Scenario {
        name: "named-port",
        upstream: "should allow ingress access on one named port",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-ingress-on-named-ports, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: serve-81-tcp}, {port: serve-80-udp, protocol: UDP}]
"#,
        ports: &[TCP_80, TCP_81, UDP_80, UDP_81],
        reaches: |_, to, port| to.ns != "x" || port == TCP_81 || port == UDP_80,
    },
    Scenario {
        name: "default-deny-egress-allow-to-namespace",
        upstream: "should enforce egress policy allowing traffic to a server in a different \
                   namespace based on NamespaceSelector (on top of a default-deny-egress)",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress-to-ns-y, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |from, to, _| from.ns != "x" || to.ns == "y",
    },
    Scenario {
        name: "ipblock-except",
        upstream: "should enforce except clause while egress access to server in CIDR block \
                   (plus an ingress ipBlock with except: x/b from node1's pods but y/b)",
        // y/b is 10.244.1.14, on node1.
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-egress-all-pods-but-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.14/32]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-b-ingress-from-node1-pods-but-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.14/32]}
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |from, to, _| {
            !(from == XA && to == YB) && (to != XB || (from.node() == NODE1 && from != YB))
        },
    },
    Scenario {
        name: "stacked-policies",
        upstream: "should enforce multiple, stacked policies with overlapping podSelectors",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-80-to-x-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-81-to-x, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81}]
"#,
        ports: &[TCP_80, TCP_81, UDP_81],
        reaches: |from, to, port| {
            to.ns != "x" || (from.ns == "y" && (port == TCP_81 || (port == TCP_80 && to == XA)))
        },
    },
    Scenario {
        name: "allow-all",
        upstream: "should support allow-all policy (on top of a default-deny-ingress)",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]
  policyTypes: [Ingress]
"#,
        ports: &[TCP_80, UDP_81],
        reaches: |_, _, _| true,
    },
];

/// Ports of the all-allowed matrix (warm-up, and after the policies are gone again).
const BASELINE_PORTS: &[Port] = &[TCP_80, UDP_81];

/// Whether a probe should get through, per (from, to, port).
type Matrix = BTreeMap<(Pod, Pod, Port), bool>;

/// The expected matrix of `reaches` over `ports`; a pod always reaches itself.
fn expected(ports: &[Port], reaches: impl Fn(Pod, Pod, Port) -> bool) -> Matrix {
    let mut m = Matrix::new();
    for from in Pod::all() {
        for to in Pod::all() {
            for &port in ports {
                m.insert((from, to, port), from == to || reaches(from, to, port));
            }
        }
    }
    m
}

/// The fixture's text.
fn fixture() -> String {
    let path = common::cluster(FIXTURE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The cluster file for `objects`: the fixture, a comment naming the step (so every step is a
/// new file content, which the agent re-reads) and the objects.
fn cluster_text(base: &str, step: &str, objects: &str) -> String {
    format!("{base}---\n# policy_e2e step: {step}\n{objects}")
}

/// What `control::policy::reference` says about the matrix of `objects`: reachable unless denied
/// (an audit verdict is forwarded).
fn reference_matrix(objects: &str, audit_all: bool, ports: &[Port]) -> Matrix {
    let text = cluster_text(&fixture(), "reference", objects);
    let state = cluster::parse_str(&text, "policy_e2e reference")
        .unwrap_or_else(|e| panic!("the fixture with the scenario's objects: {e}"));
    let opts = PolicyOptions {
        audit: audit_all,
        ..PolicyOptions::default()
    };
    let evaluator = Evaluator::new(&state, &opts);
    assert!(
        evaluator.warnings().is_empty(),
        "the reference evaluator warns about the objects: {:?}",
        evaluator.warnings()
    );
    let mut m = Matrix::new();
    for from in Pod::all() {
        for to in Pod::all() {
            for &port in ports {
                let trace =
                    evaluator.evaluate(from.ip(), to.ip(), port.protocol_number(), port.port);
                m.insert((from, to, port), trace.verdict != Verdict::Deny);
            }
        }
    }
    m
}

/// The cells where two matrices differ, as `from -> to PORT: left vs right`.
fn differences(left: &Matrix, right: &Matrix) -> Vec<String> {
    left.iter()
        .filter(|(k, v)| right.get(k) != Some(v))
        .map(|((from, to, port), v)| {
            format!(
                "{} -> {} {}: {v} vs {:?}",
                from.key(),
                to.key(),
                port.label(),
                right.get(&(*from, *to, *port))
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reachability tables, upstream's printout: rows are sources, columns destinations.

/// One table per port: `.` reachable, `X` not (or, for the comparison, `X` where observed
/// differs from expected).
fn render_table(title: &str, ports: &[Port], cell: impl Fn(Pod, Pod, Port) -> char) -> String {
    let pods = Pod::all();
    let mut out = String::new();
    for &port in ports {
        let _ = writeln!(out, "{title} {}:", port.label());
        let header: String = pods.iter().map(|to| format!(" {:4}", to.key())).collect();
        let _ = writeln!(out, "{:5}{}", "-", header.trim_end());
        for &from in &pods {
            let row: String = pods
                .iter()
                .map(|&to| format!(" {:4}", cell(from, to, port)))
                .collect();
            let _ = writeln!(out, "{:5}{}", from.key(), row.trim_end());
        }
    }
    out
}

/// `Err` with expected, observed and comparison tables (and the failed probes' errors) when an
/// observed cell differs from the expected one.
fn compare(what: &str, ports: &[Port], expect: &Matrix, seen: &Observed) -> Result<(), String> {
    let wrong: Vec<_> = expect
        .iter()
        .filter(|(k, &want)| seen.get(k).map(|o| o.ok) != Some(want))
        .collect();
    if wrong.is_empty() {
        return Ok(());
    }
    let dot = |b: bool| if b { '.' } else { 'X' };
    let mut out = format!(
        "{what}: {} of {} probes differ from the expectation\n",
        wrong.len(),
        expect.len()
    );
    out += &render_table("expected", ports, |f, t, p| {
        dot(expect.get(&(f, t, p)).copied().unwrap_or(false))
    });
    out += &render_table("observed", ports, |f, t, p| {
        dot(seen.get(&(f, t, p)).is_some_and(|o| o.ok))
    });
    out += &render_table("comparison (X: differs)", ports, |f, t, p| {
        dot(expect.get(&(f, t, p)).copied() == seen.get(&(f, t, p)).map(|o| o.ok))
    });
    for ((from, to, port), want) in wrong {
        let tries = seen
            .get(&(*from, *to, *port))
            .map_or_else(|| "not probed".to_string(), |o| o.tries.join(", "));
        let _ = writeln!(
            out,
            "  {} -> {} {}: expected {}, saw {}",
            from.key(),
            to.key(),
            port.label(),
            if *want { "reachable" } else { "unreachable" },
            if tries.is_empty() {
                "an answer".into()
            } else {
                tries
            },
        );
    }
    Err(out)
}

// ---------------------------------------------------------------------------------------------
// Python programs.

/// argv: name, seconds, TCP ports, UDP ports (comma-separated). Prints "ready"; answers every
/// line on a TCP connection and every datagram with `name`. Ends after `seconds` (SIGALRM).
const SERVER: &str = r#"
import signal, socket, sys, threading, time
name, seconds = sys.argv[1], int(sys.argv[2])
tcp_ports = [int(p) for p in sys.argv[3].split(",") if p]
udp_ports = [int(p) for p in sys.argv[4].split(",") if p]
signal.alarm(seconds)
answer = (name + "\n").encode()
def conn(c):
    try:
        f = c.makefile("rb")
        for _ in f:
            c.sendall(answer)
    except OSError:
        pass
    finally:
        c.close()
def tcp(t):
    while True:
        c, _ = t.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
def udp(u):
    while True:
        _, a = u.recvfrom(2048)
        u.sendto(answer, a)
for p in tcp_ports:
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", p))
    t.listen(256)
    threading.Thread(target=tcp, args=(t,), daemon=True).start()
for p in udp_ports:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", p))
    threading.Thread(target=udp, args=(u,), daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// argv: timeout, retry timeout, then targets `proto,host,port,name`. Probes every target at
/// once (a thread each): TCP connect + a line + its answer, or UDP one datagram + its answer; the
/// answer must be `name`. A failed probe is tried once more. Prints a JSON list, one
/// {ok, tries} per target (tries: why each failed attempt failed).
const PROBER: &str = r#"
import json, socket, sys, threading
timeouts = [float(sys.argv[1]), float(sys.argv[2])]
targets = sys.argv[3:]
results = [None] * len(targets)
def once(proto, host, port, timeout):
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=timeout)
        try:
            s.sendall(b"probe\n")
            return s.makefile("rb").readline().decode().strip()
        finally:
            s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(b"probe", (host, port))
        data, _ = s.recvfrom(2048)
        return data.decode().strip()
    finally:
        s.close()
def probe(i, target):
    proto, host, port, want = target.split(",")
    tries = []
    for timeout in timeouts:
        try:
            got = once(proto, host, int(port), timeout)
            if got == want:
                results[i] = {"ok": True, "tries": tries}
                return
            tries.append("answer %r" % got)
        except Exception as e:
            tries.append(type(e).__name__)
    results[i] = {"ok": False, "tries": tries}
threads = [threading.Thread(target=probe, args=(i, t)) for i, t in enumerate(targets)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
"#;

/// argv: seconds, answer timeout, then connections `proto,host,port,name`. Opens them all (TCP
/// connections; one UDP socket each, so one flow each), prints "ready", then for every "round"
/// line on stdin sends a line/datagram on each and prints a JSON list: "ok" when `name`
/// answered, else why not ("closed", an exception's class name, "answer ..."). Ends at EOF or
/// after `seconds`.
const HOLDER: &str = r#"
import json, signal, socket, sys
seconds, timeout = int(sys.argv[1]), float(sys.argv[2])
signal.alarm(seconds)
conns = []
for target in sys.argv[3:]:
    proto, host, port, want = target.split(",")
    addr = (host, int(port))
    if proto == "tcp":
        s = socket.create_connection(addr, timeout=timeout)
        conns.append((proto, s, s.makefile("rb"), addr, want))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        conns.append((proto, s, None, addr, want))
def once(c):
    proto, s, f, addr, want = c
    try:
        if proto == "tcp":
            s.sendall(b"hold\n")
            got = f.readline().decode().strip()
            if not got:
                return "closed"
        else:
            s.sendto(b"hold", addr)
            data, _ = s.recvfrom(2048)
            got = data.decode().strip()
        return "ok" if got == want else "answer %r" % got
    except Exception as e:
        return type(e).__name__
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "round":
        break
    print(json.dumps([once(c) for c in conns]), flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// Running them.

/// A long-running Python program: SIGTERM by pid when dropped (`timeout` passes it on), then
/// [`Proc`]'s drop kills and reaps what is left.
struct Server {
    proc: Option<Proc>,
    what: String,
}

impl Server {
    /// Starts the [`SERVER`] answering `name` in the namespace `netns`.
    fn start(netns: &str, name: &str, tcp_ports: &str, udp_ports: &str) -> Self {
        let seconds = PROGRAM_SECONDS.to_string();
        let limit = (PROGRAM_SECONDS + 5).to_string();
        let argv = timed(
            &limit,
            &[python(), "-c", SERVER, name, &seconds, tcp_ports, udp_ports],
        );
        let mut command = testbed::cmd::in_netns(netns, &argv);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("server {name} in {netns}");
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

/// A server in every pod, on 80 and 81, TCP and UDP, answering its pod key.
fn pod_servers(tb: &Testbed) -> Vec<Server> {
    Pod::all()
        .into_iter()
        .map(|pod| {
            let netns = &tb.pod(&pod.key()).expect("pod").netns;
            Server::start(netns, &pod.key(), SERVED_TCP, SERVED_UDP)
        })
        .collect()
}

/// Where a probe starts.
#[derive(Clone, Debug)]
enum Origin {
    Pod(Pod),
    Node(&'static str),
    External,
}

impl Origin {
    fn netns(&self, tb: &Testbed) -> String {
        match self {
            Origin::Pod(p) => tb.pod(&p.key()).expect("pod").netns.clone(),
            Origin::Node(n) => tb.node(n).expect("node").netns.clone(),
            Origin::External => tb.external_netns().to_string(),
        }
    }
}

/// Something to probe: `host:port`, answered by the server called `name`.
#[derive(Clone, Debug)]
struct Target {
    host: Ipv4Addr,
    port: Port,
    name: String,
}

impl Target {
    fn arg(&self) -> String {
        format!(
            "{},{},{},{}",
            self.port.arg(),
            self.host,
            self.port.port,
            self.name
        )
    }
}

/// One probe's result.
#[derive(Clone, Debug, Deserialize)]
struct Outcome {
    ok: bool,
    /// Why each failed attempt failed.
    tries: Vec<String>,
}

/// Runs one [`PROBER`] per origin, all at once, and returns each one's outcomes (in target
/// order).
fn probe_all(tb: &Testbed, batches: &[(Origin, Vec<Target>)]) -> Vec<Vec<Outcome>> {
    let (t0, t1) = (PROBE_SECONDS.to_string(), RETRY_SECONDS.to_string());
    // Each probe waits at most twice per attempt (connect, answer).
    let limit = (2.0 * (PROBE_SECONDS + RETRY_SECONDS) + 10.0)
        .ceil()
        .to_string();
    let mut running = Vec::new();
    for (origin, targets) in batches {
        let args: Vec<String> = targets.iter().map(Target::arg).collect();
        let mut argv = timed(&limit, &[python(), "-c", PROBER, &t0, &t1]);
        argv.extend(args.iter().map(String::as_str));
        let mut command = testbed::cmd::in_netns(&origin.netns(tb), &argv);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting the prober in {origin:?}: {e}"));
        running.push((origin, targets.len(), child));
    }
    running
        .into_iter()
        .map(|(origin, n, child)| {
            let out = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("prober in {origin:?}: {e}"));
            assert!(
                out.status.success(),
                "prober in {origin:?}:\n{}",
                text(&out)
            );
            let outcomes: Vec<Outcome> = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("prober output in {origin:?} ({e}):\n{}", text(&out)));
            assert_eq!(outcomes.len(), n, "one outcome per target");
            outcomes
        })
        .collect()
}

/// Outcomes per (from, to, port).
type Observed = BTreeMap<(Pod, Pod, Port), Outcome>;

/// Every pod probes every pod on `ports`.
fn probe_matrix(tb: &Testbed, ports: &[Port]) -> Observed {
    let pods = Pod::all();
    let mut keys = Vec::new();
    let batches: Vec<(Origin, Vec<Target>)> = pods
        .iter()
        .map(|&from| {
            let mut targets = Vec::new();
            for &to in &pods {
                for &port in ports {
                    keys.push((from, to, port));
                    targets.push(Target {
                        host: to.ip(),
                        port,
                        name: to.key(),
                    });
                }
            }
            (Origin::Pod(from), targets)
        })
        .collect();
    let started = Instant::now();
    let outcomes = probe_all(tb, &batches);
    eprintln!(
        "probed {} pod pairs x {} ports in {:?}",
        pods.len() * pods.len(),
        ports.len(),
        started.elapsed()
    );
    keys.into_iter()
        .zip(outcomes.into_iter().flatten())
        .collect()
}

/// Probes the matrix and compares it with `expect`.
fn check_matrix(tb: &Testbed, what: &str, ports: &[Port], expect: &Matrix) -> Result<(), String> {
    compare(what, ports, expect, &probe_matrix(tb, ports))
}

/// Probes the all-allowed matrix until it holds (bounded): the first packets between the
/// nodes wait for neighbour resolution.
fn warm_up(tb: &Testbed) {
    let expect = expected(BASELINE_PORTS, |_, _, _| true);
    let deadline = Instant::now() + WARM_UP_WITHIN;
    loop {
        match check_matrix(tb, "no policy (warm-up)", BASELINE_PORTS, &expect) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{e}"),
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The test's cluster: the testbed and the file its agents read.
struct Cluster {
    env: Env,
    base: String,
    tb: Testbed,
}

impl Cluster {
    /// The fixture with `objects`, on two sluice nodes with `agent_args`; checks the pods'
    /// addresses and the workers.
    fn up(objects: &str, agent_args: &[&str]) -> Self {
        let base = fixture();
        let env = Env::with_cluster(&cluster_text(&base, "initial", objects));
        let mut opts = env.options(&env.cluster_file(), WORKERS);
        opts.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
        let tb = env.up_with(opts);
        for pod in Pod::all() {
            let handle = tb.pod(&pod.key()).expect("pod");
            assert_eq!(
                (handle.ip, handle.node.as_str()),
                (pod.ip(), pod.node()),
                "{}: the pod has policy.yaml's podIP and node",
                pod.key()
            );
        }
        for node in NODES {
            let s = status(&tb, node);
            assert_eq!(s.workers.len(), WORKERS as usize, "{node}:\n{}", s.render());
        }
        Self { env, base, tb }
    }

    /// Replaces the agents' cluster file with the fixture plus `objects` and waits until every
    /// agent has taken it: its last-good copy is exactly the new file, and every worker runs the
    /// snapshot published with it (or a later one).
    fn apply(&self, step: &str, objects: &str) {
        let content = cluster_text(&self.base, step, objects);
        replace_file(&self.env.cluster_file(), &content);
        let started = Instant::now();
        for node in NODES {
            let last_good = self
                .tb
                .node(node)
                .expect("node")
                .state_dir
                .join(LAST_GOOD_FILE);
            let deadline = Instant::now() + APPLY_WITHIN;
            while std::fs::read_to_string(&last_good).ok().as_deref() != Some(content.as_str()) {
                if Instant::now() >= deadline {
                    let s = status(&self.tb, node);
                    panic!(
                        "step {step}: {node}'s agent did not take the new cluster file within \
                         {APPLY_WITHIN:?} ({} is another content); its source error: {:?}",
                        last_good.display(),
                        s.source_error
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
            let published = status(&self.tb, node).generation;
            let s = common::status_when(&self.tb, node, APPLY_WITHIN, |s| {
                s.workers.iter().all(|w| w.generation >= published)
            });
            assert!(
                s.workers.iter().all(|w| w.generation >= published),
                "step {step}: {node}'s workers did not pick up generation {published} within \
                 {APPLY_WITHIN:?}:\n{}",
                s.render()
            );
            assert_eq!(s.source_error, None, "step {step}: {node}");
        }
        eprintln!(
            "step {step}: applied on both nodes in {:?}",
            started.elapsed()
        );
    }
}

/// Both nodes' settled status.
fn settled(tb: &Testbed) -> [Status; 2] {
    NODES.map(|n| settled_status(tb, n))
}

/// How much the named counter (a total of the workers' counters) grew on each node.
fn growth(before: &[Status; 2], after: &[Status; 2], counter: &str) -> [u64; 2] {
    [0, 1].map(|i| after[i].total(counter) - before[i].total(counter))
}

/// How much a drop reason grew on each node.
fn drop_growth(before: &[Status; 2], after: &[Status; 2], reason: &str) -> [u64; 2] {
    [0, 1].map(|i| common::drops(&after[i], reason) - common::drops(&before[i], reason))
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// The hand-written expectation of every scenario (and of the audit tests) is what sluice's
/// reference evaluator says on the same objects. No root needed.
#[test]
fn scenario_expectations_agree_with_reference_evaluator() {
    let mut failures = Vec::new();
    for s in SCENARIOS {
        let hand = expected(s.ports, s.reaches);
        let reference = reference_matrix(s.objects, false, s.ports);
        let diff = differences(&hand, &reference);
        if !diff.is_empty() {
            failures.push(format!(
                "scenario {} (hand-written vs reference):\n  {}",
                s.name,
                diff.join("\n  ")
            ));
        }
    }
    for (name, objects, audit_all, reaches) in [
        (
            "audit annotation",
            AUDIT_ANNOTATED,
            false,
            audit_annotated_reaches as fn(_, _, _) -> _,
        ),
        ("--policy-audit", AUDIT_AGENT_WIDE, true, |_, _, _| true),
    ] {
        let hand = expected(AUDIT_PORTS, reaches);
        let diff = differences(&hand, &reference_matrix(objects, audit_all, AUDIT_PORTS));
        if !diff.is_empty() {
            failures.push(format!("{name}:\n  {}", diff.join("\n  ")));
        }
    }
    // Host policy: the reference evaluator agrees with the host firewall test's expectations.
    let text = cluster_text(&fixture(), "reference", HOST_POLICY);
    let state = cluster::parse_str(&text, "policy_e2e host").expect("fixture with host policy");
    let evaluator = Evaluator::new(&state, &PolicyOptions::default());
    for (to, port, want) in [
        (NODE1_IP, 22, true),
        (NODE1_IP, HOST_ALLOWED_PORT, true),
        (NODE1_IP, HOST_DENIED_PORT, false),
        (NODE2_IP, HOST_DENIED_PORT, true),
    ] {
        let v = evaluator.evaluate(EXTERNAL_IP, to, 6, port).verdict;
        if (v != Verdict::Deny) != want {
            failures.push(format!(
                "host policy: external -> {to}:{port}/TCP: reference says {v:?}, expected {}",
                if want { "reachable" } else { "denied" }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Item 1: the connectivity matrix of every [`Scenario`] (TCP and UDP, both nodes, 81 probes
/// per port), then no policy again (all reachable).
#[test]
fn connectivity_matrix() {
    require_root!();
    let _serial = hold(&SERIAL);
    let cluster = Cluster::up("", &[]);
    let _servers = pod_servers(&cluster.tb);
    warm_up(&cluster.tb);
    let mut failures = Vec::new();
    for s in SCENARIOS {
        cluster.apply(s.name, s.objects);
        let expect = expected(s.ports, s.reaches);
        let what = format!("scenario {} ({})", s.name, s.upstream);
        if let Err(e) = check_matrix(&cluster.tb, &what, s.ports, &expect) {
            eprintln!("{e}");
            failures.push(e);
        }
    }
    cluster.apply("no-policy-again", "");
    let expect = expected(BASELINE_PORTS, |_, _, _| true);
    if let Err(e) = check_matrix(&cluster.tb, "no policy again", BASELINE_PORTS, &expect) {
        failures.push(e);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An open connection (TCP or UDP) and its client.
struct Holder {
    proc: Proc,
    stdin: Option<ChildStdin>,
    labels: Vec<String>,
}

impl Holder {
    /// Opens `targets` from `from` (each a connection, or a UDP socket for one flow).
    fn start(tb: &Testbed, from: Pod, targets: &[(Pod, Port)]) -> Self {
        let args: Vec<String> = targets
            .iter()
            .map(|(to, port)| {
                Target {
                    host: to.ip(),
                    port: *port,
                    name: to.key(),
                }
                .arg()
            })
            .collect();
        let (seconds, answer) = (PROGRAM_SECONDS.to_string(), HOLD_ANSWER_SECONDS.to_string());
        let limit = (PROGRAM_SECONDS + 5).to_string();
        let mut argv = timed(&limit, &[python(), "-c", HOLDER, &seconds, &answer]);
        argv.extend(args.iter().map(String::as_str));
        let mut command: Command = testbed::cmd::in_netns(&Origin::Pod(from).netns(tb), &argv);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting the holder in {}: {e}", from.key()));
        let stdin = child.stdin.take();
        let mut proc = Proc::new(child);
        let ready = proc.line();
        let labels = targets
            .iter()
            .map(|(to, port)| format!("{} -> {} {}", from.key(), to.key(), port.label()))
            .collect();
        if ready != "ready" {
            drop(stdin);
            let (out, err, status) = proc.finish();
            panic!(
                "the holder in {} did not connect ({status}): {ready}{out}\n{err}",
                from.key()
            );
        }
        Self {
            proc,
            stdin,
            labels,
        }
    }

    /// One request on every open connection: (connection, "ok" or why not).
    fn round(&mut self) -> Vec<(String, String)> {
        let stdin = self.stdin.as_mut().expect("holder's stdin");
        stdin
            .write_all(b"round\n")
            .and_then(|()| stdin.flush())
            .expect("asking the holder for a round");
        let line = self.proc.line();
        let results: Vec<String> =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("holder's round {line:?}: {e}"));
        assert_eq!(
            results.len(),
            self.labels.len(),
            "one result per connection"
        );
        self.labels.iter().cloned().zip(results).collect()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // EOF ends its loop; the Proc's drop kills whatever is left.
        drop(self.stdin.take());
    }
}

/// A policy that touches none of the held connections: z/c takes no ingress at all.
const UNRELATED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: z-c-no-ingress, namespace: z}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Ingress]
"#;

/// Another one: y/c sends nothing.
const UNRELATED_2: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: y-c-no-egress, namespace: y}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
"#;

/// x takes ingress from y only.
const X_FROM_Y: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-from-ns-y, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#;

/// Only x/a takes ingress from y; x/b and x/c take none.
const X_A_FROM_Y: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-from-ns-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#;

/// `objects` joined into one stream.
fn objects(parts: &[&str]) -> String {
    parts.join("---\n")
}

/// One request per (from, to, port), each on a new connection, all at once: (label, answered).
fn new_connections(tb: &Testbed, pairs: &[(Pod, Pod, Port)]) -> Vec<(String, bool)> {
    let batches: Vec<(Origin, Vec<Target>)> = pairs
        .iter()
        .map(|(from, to, port)| {
            (
                Origin::Pod(*from),
                vec![Target {
                    host: to.ip(),
                    port: *port,
                    name: to.key(),
                }],
            )
        })
        .collect();
    let out = probe_all(tb, &batches);
    pairs
        .iter()
        .zip(out)
        .map(|((f, t, p), o)| {
            (
                format!("{} -> {} {}", f.key(), t.key(), p.label()),
                o.first().is_some_and(|o| o.ok),
            )
        })
        .collect()
}

/// What happened to each held connection in a round, if anything is expected of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Passes,
    Stopped,
    /// Either.
    Any,
}

/// One round on `holder`'s connections; each must do what `expect(label)` says. On a mismatch
/// the panic shows the round and every counter and drop reason that grew on each node meanwhile.
fn check_round(tb: &Testbed, step: &str, holder: &mut Holder, expect: impl Fn(&str) -> Held) {
    // Not settled: the round follows the change as closely as the test can make it.
    let before = NODES.map(|n| status(tb, n));
    let round = holder.round();
    let wrong: Vec<_> = round
        .iter()
        .filter(|(label, result)| match expect(label) {
            Held::Passes => result != "ok",
            Held::Stopped => result == "ok",
            Held::Any => false,
        })
        .map(|(label, result)| format!("{label}: {result}, expected {:?}", expect(label)))
        .collect();
    if wrong.is_empty() {
        return;
    }
    let after = settled(tb);
    let mut grew = String::new();
    for i in 0..NODES.len() {
        let counters: Vec<_> = after[i]
            .totals
            .iter()
            .map(|(k, v)| (k, v - before[i].total(k)))
            .filter(|(_, d)| *d > 0)
            .collect();
        let drops = common::unexpected_drops(&before[i], &after[i], &[]);
        let _ = writeln!(
            grew,
            "  {}: counters {counters:?}\n    drops {drops:?}",
            NODES[i]
        );
    }
    panic!(
        "{step}: held connections: {}\nround: {round:?}\nduring the round:\n{grew}",
        wrong.join("; ")
    );
}

/// Asserts that each new connection opens exactly when `opens(label)`.
fn assert_new(step: &str, seen: &[(String, bool)], opens: impl Fn(&str) -> bool) {
    for (label, ok) in seen {
        assert_eq!(
            *ok,
            opens(label),
            "{step}: new connection {label} (all: {seen:?})"
        );
    }
}

/// Item 2: policy changes while connections are open, TCP and UDP, same node and across nodes.
///
/// Part 1, flows opened while nothing isolates their pods (untracked): from y/a (node2) to
/// x/a (node1), z/a (node1), z/b (node2). An unrelated policy leaves them all usable; a
/// default-deny-ingress in x stops the ones to x/a (the next request gets no answer, counted as
/// `policy_denied_ingress`) while the others and new connections to z keep working.
///
/// Part 2, flows opened while a policy isolates and allows them (tracked, judged): from y/a to
/// x/a and x/b (node2) while x takes ingress from y. An unrelated change keeps them usable
/// (they are judged again and still allowed); narrowing the rule to x/a cuts the flows to x/b
/// (`policy_cut`) and keeps those to x/a; removing the policies opens x/b again.
#[test]
fn policy_changes_with_open_connections() {
    require_root!();
    let _serial = hold(&SERIAL);
    let cluster = Cluster::up("", &[]);
    let tb = &cluster.tb;
    let _servers = pod_servers(tb);
    warm_up(tb);
    let zc = Pod::new("z", "c");

    // Part 1.
    let mut untracked = Holder::start(
        tb,
        YA,
        &[(XA, TCP_80), (XA, UDP_81), (ZA, TCP_80), (ZB, UDP_81)],
    );
    check_round(tb, "no policy", &mut untracked, |_| Held::Passes);
    cluster.apply("unrelated", UNRELATED);
    // The unrelated policy is in force (so that "still usable" means something).
    assert_new(
        "unrelated",
        &new_connections(tb, &[(YA, zc, TCP_80)]),
        |_| false,
    );
    check_round(tb, "unrelated", &mut untracked, |_| Held::Passes);

    let before = settled(tb);
    cluster.apply("deny-x", &objects(&[UNRELATED, DEFAULT_DENY_INGRESS_X]));
    check_round(tb, "deny-x", &mut untracked, |l| {
        if l.contains("-> x/") {
            Held::Stopped
        } else {
            Held::Passes
        }
    });
    let fresh = new_connections(
        tb,
        &[
            (YA, ZA, TCP_80),
            (YA, ZB, UDP_81),
            (YA, XA, TCP_80),
            (YA, XA, UDP_81),
        ],
    );
    assert_new("deny-x", &fresh, |l| !l.contains("-> x/"));
    let after = settled(tb);
    let denied = drop_growth(&before, &after, "policy_denied_ingress");
    assert!(
        denied[0] > 0,
        "deny-x: x/a's node counts the dropped packets as policy_denied_ingress (node1, node2: \
         {denied:?})"
    );
    drop(untracked);

    // Part 2.
    cluster.apply("x-from-y", &objects(&[UNRELATED, X_FROM_Y]));
    assert_new(
        "x-from-y",
        &new_connections(tb, &[(YA, XB, TCP_80), (ZA, XB, TCP_80)]),
        |l| l.starts_with("y/"),
    );
    let mut tracked = Holder::start(
        tb,
        YA,
        &[(XA, TCP_80), (XA, UDP_81), (XB, TCP_80), (XB, UDP_81)],
    );
    check_round(tb, "x-from-y", &mut tracked, |_| Held::Passes);
    cluster.apply(
        "x-from-y-unrelated",
        &objects(&[UNRELATED, UNRELATED_2, X_FROM_Y]),
    );
    assert_new(
        "x-from-y-unrelated",
        &new_connections(tb, &[(YC, ZA, TCP_80)]),
        |_| false,
    );
    check_round(tb, "x-from-y-unrelated", &mut tracked, |_| Held::Passes);

    let before = settled(tb);
    cluster.apply(
        "x-a-from-y",
        &objects(&[UNRELATED, X_A_FROM_Y, DEFAULT_DENY_INGRESS_X]),
    );
    check_round(tb, "x-a-from-y", &mut tracked, |l| {
        if l.contains("-> x/a") {
            Held::Passes
        } else {
            Held::Stopped
        }
    });
    assert_new(
        "x-a-from-y",
        &new_connections(tb, &[(YA, XA, TCP_80), (YA, XB, TCP_80), (YA, XB, UDP_81)]),
        |l| l.contains("-> x/a"),
    );
    let after = settled(tb);
    let cut = growth(&before, &after, "policy_cut");
    eprintln!("x-a-from-y: policy_cut grew by {cut:?} (node1, node2)");
    assert!(
        cut[1] >= 2,
        "x-a-from-y: the TCP and UDP flows to x/b (both ends on node2) are cut and counted as \
         policy_cut (node1, node2: {cut:?})"
    );

    cluster.apply("no-policy", "");
    assert_new(
        "no-policy",
        &new_connections(tb, &[(YA, XB, TCP_80), (YA, XB, UDP_81), (ZA, XB, TCP_80)]),
        |_| true,
    );
    // The flows to x/a were never cut. (Those to x/b: a cut UDP flow may pass again, as a new
    // flow, now that nothing denies it; the cut TCP connection's client gave up on its socket.)
    check_round(tb, "no-policy", &mut tracked, |l| {
        if l.contains("-> x/a") {
            Held::Passes
        } else {
            Held::Any
        }
    });
}

/// Ports of the audit matrices.
const AUDIT_PORTS: &[Port] = &[TCP_80, UDP_81];

/// Audit-mode policies that would deny ingress to x and egress from y/c, and an enforcing one
/// denying ingress to z.
const AUDIT_ANNOTATED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: x-default-deny-ingress-audit
  namespace: x
  annotations: {policy.sluice.io/audit: "true"}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: y-c-no-egress-audit
  namespace: y
  annotations: {policy.sluice.io/audit: "true"}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: z-default-deny-ingress, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

fn audit_annotated_reaches(_: Pod, to: Pod, _: Port) -> bool {
    to.ns != "z"
}

/// Without `--policy-audit` these deny ingress to z and egress from x.
const AUDIT_AGENT_WIDE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: z-default-deny-ingress, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#;

/// Checks an audit run: the matrix, and that audits were counted (ingress and egress) and no
/// packet was dropped by policy unless `enforced_ingress_drops`.
fn check_audit(tb: &Testbed, what: &str, reaches: fn(Pod, Pod, Port) -> bool, enforced: bool) {
    let before = settled(tb);
    let expect = expected(AUDIT_PORTS, reaches);
    let result = check_matrix(tb, what, AUDIT_PORTS, &expect);
    let after = settled(tb);
    let audit_in = growth(&before, &after, "policy_audit_ingress");
    let audit_out = growth(&before, &after, "policy_audit_egress");
    let denied_in = drop_growth(&before, &after, "policy_denied_ingress");
    let denied_out = drop_growth(&before, &after, "policy_denied_egress");
    eprintln!(
        "{what}: policy_audit_ingress +{audit_in:?}, policy_audit_egress +{audit_out:?}, \
         policy_denied_ingress +{denied_in:?}, policy_denied_egress +{denied_out:?} (node1, node2)"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every pod outside x probes every x pod: 6 sources x 3 destinations (x pods on both nodes).
    assert!(
        audit_in.iter().all(|n| *n > 0),
        "{what}: audits of ingress counted on both nodes (node1, node2: {audit_in:?})"
    );
    assert!(
        audit_out.iter().sum::<u64>() > 0,
        "{what}: audits of egress counted (node1, node2: {audit_out:?})"
    );
    assert_eq!(
        denied_out,
        [0, 0],
        "{what}: nothing dropped by egress policy"
    );
    if enforced {
        assert!(
            denied_in.iter().sum::<u64>() > 0,
            "{what}: the enforcing policy still drops (node1, node2: {denied_in:?})"
        );
    } else {
        assert_eq!(
            denied_in,
            [0, 0],
            "{what}: nothing dropped by ingress policy"
        );
    }
}

/// Item 3a: policies annotated `policy.sluice.io/audit: "true"` forward what they would deny
/// and count it (`policy_audit_ingress`, `policy_audit_egress`); an enforcing policy next to
/// them still drops.
#[test]
fn audit_annotation_forwards_and_counts() {
    require_root!();
    let _serial = hold(&SERIAL);
    let cluster = Cluster::up("", &[]);
    let tb = &cluster.tb;
    let _servers = pod_servers(tb);
    warm_up(tb);
    cluster.apply("audit-annotated", AUDIT_ANNOTATED);
    check_audit(tb, "audit annotation", audit_annotated_reaches, true);
}

/// Item 3b: with the agent-wide `--policy-audit`, policies that deny ingress to z and egress
/// from x forward everything and count audits.
#[test]
fn audit_agent_flag_forwards_and_counts() {
    require_root!();
    let _serial = hold(&SERIAL);
    let cluster = Cluster::up("", &["--policy-audit"]);
    let tb = &cluster.tb;
    let _servers = pod_servers(tb);
    warm_up(tb);
    cluster.apply("audit-agent-wide", AUDIT_AGENT_WIDE);
    for node in NODES {
        let p = status(tb, node).policy;
        assert!(
            p.as_ref().is_some_and(|p| p.audit),
            "{node}'s status shows agent-wide audit mode: {p:?}"
        );
    }
    check_audit(tb, "--policy-audit", |_, _, _| true, false);
}

const HOST_ALLOWED_PORT: u16 = 8080;
const HOST_DENIED_PORT: u16 = 9090;
/// The external client's server, for the node's own outbound connection.
const EXTERNAL_PORT: u16 = 7000;

/// node1 takes only TCP 8080 from the external client (plus the failsafe ports).
const HOST_POLICY: &str = r#"
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: node1-8080-from-external-only}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
  ingress:
  - from: [{ipBlock: {cidr: 172.18.0.250/32}}]
    ports: [{port: 8080, protocol: TCP}]
"#;

/// The host firewall probes: external -> node1:22, :8080, :9090 and node2:9090; node1 ->
/// external:7000. Returns (label, reachable).
fn host_probes(tb: &Testbed) -> Vec<(String, bool)> {
    let target = |host: Ipv4Addr, port: u16, name: &str| Target {
        host,
        port: Port::tcp(port),
        name: name.to_string(),
    };
    let batches = vec![
        (
            Origin::External,
            vec![
                target(NODE1_IP, 22, NODE1),
                target(NODE1_IP, HOST_ALLOWED_PORT, NODE1),
                target(NODE1_IP, HOST_DENIED_PORT, NODE1),
                target(NODE2_IP, HOST_DENIED_PORT, NODE2),
            ],
        ),
        (
            Origin::Node(NODE1),
            vec![target(EXTERNAL_IP, EXTERNAL_PORT, "external")],
        ),
    ];
    let out = probe_all(tb, &batches);
    batches
        .iter()
        .zip(out)
        .flat_map(|((origin, targets), outcomes)| {
            targets
                .iter()
                .zip(outcomes)
                .map(move |(t, o)| (format!("{origin:?} -> {}:{}", t.host, t.port.port), o.ok))
        })
        .collect()
}

/// (a host policy selects the node, its host firewall runs) per node, from `sluice status`.
fn host_firewall(tb: &Testbed) -> [(bool, bool); 2] {
    NODES.map(|n| {
        let s = status(tb, n);
        let p = s
            .policy
            .unwrap_or_else(|| panic!("{n}'s status has no policy section"));
        (p.host_isolated, p.host_firewall)
    })
}

/// Item 4: a HostNetworkPolicy selecting node1 that allows only TCP 8080 from the external
/// client: node1's SSH port (failsafe) and 8080 stay reachable, 9090 does not, node2 (not
/// selected) stays open, node1's own outbound connection works, pods still reach each other
/// across the nodes; removing the policy opens 9090 again.
#[test]
fn host_firewall_failsafe_and_removal() {
    require_root!();
    let _serial = hold(&SERIAL);
    let cluster = Cluster::up("", &[]);
    let tb = &cluster.tb;
    let _pod_servers = pod_servers(tb);
    let ports = format!("22,{HOST_ALLOWED_PORT},{HOST_DENIED_PORT}");
    let _node_servers: Vec<Server> = NODES
        .iter()
        .map(|n| Server::start(&tb.node(n).expect("node").netns, n, &ports, ""))
        .collect();
    let _external = Server::start(
        tb.external_netns(),
        "external",
        &EXTERNAL_PORT.to_string(),
        "",
    );
    warm_up(tb);
    let open = host_probes(tb);
    assert!(
        open.iter().all(|(_, ok)| *ok),
        "without a host policy: {open:?}"
    );

    let before = settled(tb);
    cluster.apply("host-policy", HOST_POLICY);
    assert_eq!(
        host_firewall(tb),
        [(true, true), (false, false)],
        "(host policy selects, host firewall runs) on node1 and node2"
    );
    let closed = host_probes(tb);
    for (label, ok) in &closed {
        let want = !label.ends_with(&format!("{NODE1_IP}:{HOST_DENIED_PORT}"));
        assert_eq!(*ok, want, "{label} with the host policy: {closed:?}");
    }
    let after = settled(tb);
    let denied = drop_growth(&before, &after, "host_policy_denied");
    assert!(
        denied[0] > 0,
        "node1 counts host_policy_denied (node1, node2: {denied:?})"
    );
    // Pod traffic between the nodes (VXLAN: failsafe from nodes) is not the host firewall's.
    let expect = expected(BASELINE_PORTS, |_, _, _| true);
    if let Err(e) = check_matrix(tb, "pods with the host policy", BASELINE_PORTS, &expect) {
        panic!("{e}");
    }

    cluster.apply("host-policy-removed", "");
    assert_eq!(
        host_firewall(tb),
        [(false, false), (false, false)],
        "(host policy selects, host firewall runs) on node1 and node2 without the policy"
    );
    let reopened = host_probes(tb);
    assert!(
        reopened.iter().all(|(_, ok)| *ok),
        "after the host policy is removed: {reopened:?}"
    );
}

/// A hot restart of a node whose host firewall runs (issue 8): the new agent takes the uplink's
/// XDP program, its TC egress program and TCX link, the firewall maps and the re-injection
/// sockets over; the same probes give the same answers right after, and the new agent itself
/// judges (its `host_policy_denied` grows). The node's own outbound connection needs the TC
/// program recording its flow.
#[test]
fn host_firewall_survives_a_hot_restart() {
    require_root!();
    let _serial = hold(&SERIAL);
    let mut cluster = Cluster::up("", &[]);
    let ports = format!("22,{HOST_ALLOWED_PORT},{HOST_DENIED_PORT}");
    let _pod_servers = pod_servers(&cluster.tb);
    let _node_servers: Vec<Server> = NODES
        .iter()
        .map(|n| Server::start(&cluster.tb.node(n).expect("node").netns, n, &ports, ""))
        .collect();
    let _external = Server::start(
        cluster.tb.external_netns(),
        "external",
        &EXTERNAL_PORT.to_string(),
        "",
    );
    warm_up(&cluster.tb);
    cluster.apply("host-policy", HOST_POLICY);
    assert_eq!(host_firewall(&cluster.tb), [(true, true), (false, false)]);
    let closed = host_probes(&cluster.tb);
    let want = |label: &str| !label.ends_with(&format!("{NODE1_IP}:{HOST_DENIED_PORT}"));
    for (label, ok) in &closed {
        assert_eq!(*ok, want(label), "{label} before the restart: {closed:?}");
    }
    let old_pid = cluster.tb.node(NODE1).expect("node1").agent_pid;
    cluster
        .tb
        .hot_restart_agent(NODE1)
        .unwrap_or_else(|e| panic!("hot restart of node1: {e}"));
    assert_ne!(cluster.tb.node(NODE1).expect("node1").agent_pid, old_pid);
    let tb = &cluster.tb;
    assert_eq!(
        host_firewall(tb),
        [(true, true), (false, false)],
        "the new agent runs node1's host firewall"
    );
    let before = settled(tb);
    let again = host_probes(tb);
    for (label, ok) in &again {
        assert_eq!(*ok, want(label), "{label} after the hot restart: {again:?}");
    }
    let after = settled(tb);
    assert!(
        drop_growth(&before, &after, "host_policy_denied")[0] > 0,
        "the new agent's workers judge node1's traffic"
    );
    let expect = expected(BASELINE_PORTS, |_, _, _| true);
    if let Err(e) = check_matrix(tb, "pods after the hot restart", BASELINE_PORTS, &expect) {
        panic!("{e}");
    }
}

/// The fixture's text is what the tests assume: every pod at its address on its node.
#[test]
fn fixture_matches_the_model() {
    let state = cluster::parse_str(&fixture(), FIXTURE).expect("policy.yaml parses");
    let pods: Vec<(String, String, Option<String>)> = state
        .pods
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default()
                ),
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                p.status.as_ref().and_then(|s| s.pod_ip.clone()),
            )
        })
        .collect();
    let model: Vec<(String, String, Option<String>)> = Pod::all()
        .into_iter()
        .map(|p| (p.key(), p.node().to_string(), Some(p.ip().to_string())))
        .collect();
    assert_eq!(pods, model);
    let named: Vec<String> = state
        .pods
        .first()
        .and_then(|p| p.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| p.name.clone())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        named,
        [
            "serve-80-tcp",
            "serve-81-tcp",
            "serve-80-udp",
            "serve-81-udp"
        ],
        "named container ports"
    );
}

/// The comparison finds every differing cell and prints the three tables; equal matrices pass.
#[test]
fn comparison_reports_every_mismatch() {
    let ports = [TCP_80, UDP_81];
    let expect = expected(&ports, |_, to, _| to.ns != "x");
    let mut seen: Observed = expect
        .iter()
        .map(|(k, &ok)| {
            let tries = if ok {
                vec![]
            } else {
                vec!["timeout".into(); 2]
            };
            (*k, Outcome { ok, tries })
        })
        .collect();
    assert_eq!(compare("same", &ports, &expect, &seen), Ok(()));
    // y/a reaches x/a on UDP 81 although it should not; z/b does not reach y/c on TCP 80.
    seen.insert(
        (YA, XA, UDP_81),
        Outcome {
            ok: true,
            tries: vec![],
        },
    );
    seen.insert(
        (ZB, Pod::new("y", "c"), TCP_80),
        Outcome {
            ok: false,
            tries: vec!["timeout".into(), "ConnectionRefusedError".into()],
        },
    );
    let report = compare("two wrong", &ports, &expect, &seen).expect_err("mismatches found");
    assert!(
        report.starts_with("two wrong: 2 of 162 probes differ"),
        "{report}"
    );
    for table in [
        "expected TCP/80:",
        "observed UDP/81:",
        "comparison (X: differs) TCP/80:",
    ] {
        assert!(report.contains(table), "{table} in:\n{report}");
    }
    assert!(
        report.contains("y/a -> x/a UDP/81: expected unreachable, saw an answer"),
        "{report}"
    );
    assert!(
        report
            .contains("z/b -> y/c TCP/80: expected reachable, saw timeout, ConnectionRefusedError"),
        "{report}"
    );
    // The comparison table marks exactly the two cells.
    let comparison: String = report.split("comparison (X: differs)").skip(1).collect();
    assert_eq!(comparison.matches('X').count(), 2, "{report}");
    eprintln!("{report}");
}
