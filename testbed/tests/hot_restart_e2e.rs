//! End-to-end tests of the hot restart (issue 8, part 4) on `testbed/clusters/services.yaml`:
//! a second `sluice run` started for node1 while its agent runs takes the dataplane over through
//! `<state-dir>/handover.sock` (UMEM, AF_XDP sockets, XDP links and maps, flows), and the old
//! agent exits by itself.
//!
//! What would fail without each part:
//! - flows: connections through the ClusterIP whose *server* speaks first after the restart;
//!   without the handed-over conntrack its packets are not translated back to the ClusterIP and
//!   the client's kernel refuses them;
//! - sockets and XDP links: a paced UDP stream across the nodes during the restart loses
//!   nothing, and the XDP programs on node1's interfaces keep their ids;
//! - refusal: an agent that cannot continue the workers (another `--workers`) is refused with the
//!   reason and the running agent forwards on;
//! - rollback: an agent that fails after adopting the workers (a fault hook) hands the dataplane
//!   back; the running agent loses nothing and can still hand over later.
//!
//! Root only; build the binaries first: `cargo build -p control --bins`. Each test brings up its
//! own instance (pid + counter) in a temporary state root; the `Testbed` drop removes
//! everything, also when a test panics. Two nodes with two workers each are all two vCPUs take:
//! the tests hold [`SERIAL`]. Every command runs under `timeout`, every wait is bounded.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write as _},
    net::Ipv4Addr,
    process::Stdio,
    sync::Mutex,
    time::{Duration, Instant},
};

use testbed::Testbed;

mod common;
use common::{
    cluster, hold, ping, pod_ip, probe_name, python, replace_file, require_root, ring_losses,
    status, status_when, text, timed, Env, PacedStream, Proc, NAME_SERVER, STATUS_TIMEOUT,
};

/// Instance names here are `h{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'h';
const WORKERS: u32 = 2;
const NODE1: &str = "node1";
const NODE2: &str = "node2";
const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const CLIENT: &str = "default/client";
const WEB1: &str = "default/web-1";
const WEB2: &str = "default/web-2";
/// `web`: ClusterIP, port 80 -> 8080 on web-1 (node1) and web-2 (node2).
const WEB_CLUSTER_IP: &str = "10.96.1.10";
/// `web-sticky`: 80/TCP -> http (8080) of web-1 and web-2, sessionAffinity ClientIP.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
/// `web-lb`'s healthCheckNodePort (eTP Local): served by the agent itself.
const LB_HEALTH_PORT: &str = "32081";
/// Connections held across the restart (Maglev spreads them over both backends).
const CONNECTIONS: &str = "8";

static SERIAL: Mutex<()> = Mutex::new(());

/// argv: port, go file. Prints "ready"; for every connection: answers each line upper-cased;
/// after the first line, once the go file exists, sends "pushed" unasked (the server speaks
/// first after the restart).
const SERVER: &str = r#"
import os, signal, socket, sys, threading, time
signal.alarm(90)
port, go = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(64)
print("ready", flush=True)
def serve(c):
    f = c.makefile("rb")
    first = True
    while True:
        line = f.readline()
        if not line:
            return
        c.sendall(line.upper())
        if first:
            first = False
            while not os.path.exists(go):
                time.sleep(0.01)
            c.sendall(b"PUSHED\n")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// argv: host, port, n. Opens n connections, one round ("a" -> "A") on each, prints "held";
/// then at a line on stdin reads the pushed line and does a second round ("b" -> "B") on each,
/// printing one word per connection: "ok" or what went wrong.
const CLIENT_SCRIPT: &str = r#"
import signal, socket, sys
signal.alarm(90)
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rb")
    s.sendall(b"a\n")
    assert f.readline() == b"A\n"
    conns.append((s, f))
print("held", flush=True)
sys.stdin.readline()
out = []
for s, f in conns:
    try:
        s.settimeout(10)
        pushed = f.readline()
        s.sendall(b"b\n")
        answer = f.readline()
        out.append("ok" if (pushed, answer) == (b"PUSHED\n", b"B\n") else repr((pushed, answer)))
    except Exception as e:
        out.append(type(e).__name__)
print(" ".join(out), flush=True)
"#;

/// GET on a port from the external client; the HTTP status, or the error.
const HTTP_STATUS: &str = r#"
import http.client, sys
try:
    c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=3)
    c.request("GET", "/")
    print(c.getresponse().status, flush=True)
except Exception as e:
    print(type(e).__name__, flush=True)
"#;

/// The ids of the XDP programs attached in node1's namespace, one per interface.
fn xdp_programs(tb: &Testbed) -> BTreeSet<String> {
    let out = tb
        .exec_in_node(NODE1, &["ip", "-d", "-o", "link", "show"])
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim().split('@').next()?.to_owned();
            let id = l.split("prog/xdp id ").nth(1)?.split_whitespace().next()?;
            Some(format!("{name}={id}"))
        })
        .collect()
}

fn agent_log(tb: &Testbed) -> String {
    let dir = &tb.node(NODE1).expect("node1").state_dir;
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

fn health_status(tb: &Testbed) -> String {
    let out = tb
        .exec_in_external(&timed(
            "10",
            &[
                python(),
                "-c",
                HTTP_STATUS,
                &NODE1_IP.to_string(),
                LB_HEALTH_PORT,
            ],
        ))
        .expect("GET runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_hot_restart_keeps_connections_loses_no_packet_and_keeps_the_programs() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut tb = env.up(&cluster("services.yaml"), WORKERS);
    let go = env.dir.path().join("go");
    let go_arg = go.to_string_lossy().into_owned();
    let mut servers = Vec::new();
    for pod in [WEB1, WEB2] {
        let (p, ready) =
            Proc::start_in_pod(&tb, pod, "95", &[python(), "-c", SERVER, "8080", &go_arg]);
        assert_eq!(ready, "ready", "server in {pod}");
        servers.push(p);
    }
    let mut client = tb
        .pod_command(
            CLIENT,
            &timed(
                "95",
                &[
                    python(),
                    "-c",
                    CLIENT_SCRIPT,
                    WEB_CLUSTER_IP,
                    "80",
                    CONNECTIONS,
                ],
            ),
        )
        .expect("client command")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    let mut client_out = BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    client_out.read_line(&mut line).expect("client output");
    assert_eq!(line.trim(), "held", "connections through the ClusterIP");
    assert_eq!(health_status(&tb), "200", "healthCheckNodePort before");

    // A paced stream from node1 to node2 across both restarts.
    let stream = PacedStream::start(&tb, CLIENT, WEB2, 5000);

    let programs = xdp_programs(&tb);
    assert!(
        programs.len() >= 4,
        "the uplink and node1's three pods carry XDP programs: {programs:?}"
    );
    std::thread::sleep(Duration::from_millis(800));
    let mut pids = vec![tb.node(NODE1).expect("node1").agent_pid.expect("pid")];
    for round in 0..2 {
        let started = Instant::now();
        let (ready, exited) = tb
            .hot_restart_agent(NODE1)
            .unwrap_or_else(|e| panic!("hot restart {round}: {e}\n{}", agent_log(&tb)));
        eprintln!(
            "hot restart {round}: ready after {:?}, old agent gone after {:?}",
            ready - started,
            exited - started
        );
        let pid = tb.node(NODE1).expect("node1").agent_pid.expect("new pid");
        assert!(!pids.contains(&pid), "a new agent process");
        assert!(!pid_alive(pids[pids.len() - 1]), "the old agent exited");
        pids.push(pid);
        assert_eq!(
            xdp_programs(&tb),
            programs,
            "the same XDP programs stay attached (hot restart {round})"
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    let log = agent_log(&tb);
    for l in log
        .lines()
        .filter(|l| l.contains("took over") || l.contains("runs the dataplane"))
    {
        eprintln!("{l}");
    }
    assert_eq!(
        log.matches("took over the running agent's dataplane")
            .count(),
        2,
        "{log}"
    );

    // The stream: nothing lost across two restarts.
    let sent = stream.datagrams;
    let (received, err) = stream.finish();
    assert_eq!(
        received,
        sent,
        "datagrams received across two hot restarts ({err}); where frames were dropped:\n{}",
        ring_losses(&tb, &[NODE1, NODE2])
    );

    // Connections: the servers speak first, through the handed-over flows.
    std::fs::write(&go, b"").expect("go file");
    let mut stdin = client.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("tell the client");
    let mut result = String::new();
    client_out.read_line(&mut result).expect("client result");
    let _ = client.wait();
    let words: Vec<&str> = result.split_whitespace().collect();
    assert_eq!(
        words,
        vec!["ok"; CONNECTIONS.parse::<usize>().expect("count")],
        "every connection held across the restarts answers both ways"
    );

    // The agent's own listeners come back once the old agent has let go of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut health = health_status(&tb);
    while health != "200" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        health = health_status(&tb);
    }
    assert_eq!(health, "200", "healthCheckNodePort after the restarts");
    let client_ip = pod_ip(&tb, CLIENT);
    assert!(client_ip.is_private());
    let p = ping(&tb, CLIENT, pod_ip(&tb, WEB2), 3);
    assert!(p.status.success(), "ping after the restarts:\n{}", text(&p));
    drop(servers);
}

#[test]
fn an_agent_that_cannot_continue_the_workers_is_refused_and_the_running_one_forwards_on() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let opts = env.options(&cluster("services.yaml"), WORKERS);
    let sluice = opts.sluice_bin.to_string_lossy().into_owned();
    let tb = env.up_with(opts);
    let node = tb.node(NODE1).expect("node1").clone();
    let old_pid = node.agent_pid.expect("pid");
    let source = format!("file:{}", tb.cluster_file().display());
    let state_dir = node.state_dir.to_string_lossy().into_owned();
    let cni_dir = node.cni_conf_dir.to_string_lossy().into_owned();
    let out = tb
        .exec_in_node(
            NODE1,
            &timed(
                "30",
                &[
                    &sluice,
                    "run",
                    "--source",
                    &source,
                    "--node",
                    NODE1,
                    "--state-dir",
                    &state_dir,
                    "--cni-conf-dir",
                    &cni_dir,
                    "--workers",
                    "1",
                ],
            ),
        )
        .expect("second agent runs");
    let said = text(&out);
    assert!(
        !out.status.success(),
        "the second agent must give up:\n{said}"
    );
    assert!(
        said.contains("refused a hot restart") && said.contains("--workers 2 here, 1"),
        "the reason is named:\n{said}"
    );
    assert!(pid_alive(old_pid), "the running agent runs on");
    let status = control::api::call(
        &node.agent_socket,
        &control::api::Request::Status,
        STATUS_TIMEOUT,
    )
    .expect("the running agent still answers");
    assert!(status.ok);
    let p = ping(&tb, CLIENT, pod_ip(&tb, WEB2), 3);
    assert!(p.status.success(), "still forwarding:\n{}", text(&p));
}

/// A hot restart that fails after the next agent's workers adopted the running agent's (the
/// fault hook [`control::agent::HANDOVER_FAULT_ENV`]: 300 ms with the workers adopted, then
/// `Ack::Failed`) rolls back: the running agent takes its dataplane back and forwards on with
/// its XDP programs unchanged, a paced stream across the attempt loses nothing (what arrived
/// waited in the rx rings), its API answers again, and a later hot restart still succeeds.
#[test]
fn a_hot_restart_that_fails_after_the_hand_over_rolls_back_and_loses_nothing() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let opts = env.options(&cluster("services.yaml"), WORKERS);
    let sluice = opts.sluice_bin.to_string_lossy().into_owned();
    let mut tb = env.up_with(opts);
    let node = tb.node(NODE1).expect("node1").clone();
    let old_pid = node.agent_pid.expect("pid");

    // Next hops resolved first: the first packet to an unresolved one becomes its ARP request.
    let p = ping(&tb, CLIENT, pod_ip(&tb, WEB2), 2);
    assert!(p.status.success(), "ping before:\n{}", text(&p));
    let stream = PacedStream::start(&tb, CLIENT, WEB2, 3000);
    let programs = xdp_programs(&tb);
    assert!(programs.len() >= 4, "{programs:?}");
    std::thread::sleep(Duration::from_millis(500));

    let source_arg = format!("file:{}", tb.cluster_file().display());
    let state_dir = node.state_dir.to_string_lossy().into_owned();
    let cni_dir = node.cni_conf_dir.to_string_lossy().into_owned();
    let fault = format!("{}=300", control::agent::HANDOVER_FAULT_ENV);
    let out = tb
        .exec_in_node(
            NODE1,
            &timed(
                "30",
                &[
                    "env",
                    &fault,
                    &sluice,
                    "run",
                    "--source",
                    &source_arg,
                    "--node",
                    NODE1,
                    "--state-dir",
                    &state_dir,
                    "--cni-conf-dir",
                    &cni_dir,
                    "--workers",
                    &WORKERS.to_string(),
                ],
            ),
        )
        .expect("second agent runs");
    let said = text(&out);
    assert!(!out.status.success(), "the second agent fails:\n{said}");
    assert!(
        said.contains("hot restart failed on purpose"),
        "it says why:\n{said}"
    );
    assert!(pid_alive(old_pid), "the running agent runs on");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let log = agent_log(&tb);
        let status = control::api::call(
            &node.agent_socket,
            &control::api::Request::Status,
            STATUS_TIMEOUT,
        );
        if log.contains("the next agent gave up; taking the dataplane back") {
            if let Ok(s) = status {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the running agent takes its dataplane back and answers again:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.ok, "{status:?}");
    assert_eq!(xdp_programs(&tb), programs, "the same XDP programs");

    let sent = stream.datagrams;
    let (received, err) = stream.finish();
    assert_eq!(
        received,
        sent,
        "datagrams received across the failed hot restart ({err}); where frames were dropped:\n{}",
        ring_losses(&tb, &[NODE1, NODE2])
    );

    // The rolled-back agent can still hand over.
    tb.hot_restart_agent(NODE1)
        .unwrap_or_else(|e| panic!("hot restart after the rollback: {e}\n{}", agent_log(&tb)));
    assert!(
        !pid_alive(old_pid),
        "the old agent exited after the real hand-over"
    );
    assert_eq!(xdp_programs(&tb), programs, "the same XDP programs");
    let p = ping(&tb, CLIENT, pod_ip(&tb, WEB2), 3);
    assert!(p.status.success(), "ping after both:\n{}", text(&p));
}

/// Asks `web-sticky` from the client until the answer (a backend's name) is `want`'s, bounded;
/// the last answer either way.
fn sticky_until(tb: &Testbed, want: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = probe_name(tb, CLIENT, STICKY_VIP, 80);
        if answer.as_deref().is_ok_and(&want) || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Session affinity survives a hot restart, also where a fresh choice would differ. The client
/// is placed on the hash's choice of {web-1, web-2}, moved to the other backend while the
/// Service selects only that one, and stays there when both are selected again (its entry is
/// in the rotation). After a hot restart it is still there: had the entries not been carried
/// over, the next agent would have placed it afresh, on the first choice.
#[test]
fn a_hot_restart_keeps_session_affinity_where_a_fresh_choice_would_differ() {
    require_root!();
    let _serial = hold(&SERIAL);
    // A copy of the fixture, rewritten below, with labels that tell the backends apart
    // (nothing selects by them yet).
    let env = Env::new();
    let file = env.cluster_file();
    let mut base = std::fs::read_to_string(cluster("services.yaml")).expect("the fixture");
    for name in ["web-1", "web-2"] {
        let pod = format!("  name: {name}\n  namespace: default\n  labels:\n    app: web\n");
        assert!(base.contains(&pod), "{name} in the fixture");
        base = base.replace(&pod, &format!("{pod}    backend: {name}\n"));
    }
    std::fs::write(&file, &base).expect("write the cluster file");
    let opts = env.options(&file, WORKERS);
    let mut tb = env.up_with(opts);
    let seconds = "120";
    let _servers: Vec<Proc> = [(WEB1, "web-1"), (WEB2, "web-2")]
        .into_iter()
        .map(|(pod, name)| {
            let (server, ready) = Proc::start_in_pod(
                &tb,
                pod,
                "130",
                &[python(), "-c", NAME_SERVER, name, "8080", seconds],
            );
            assert_eq!(ready, "ready", "server in {pod}");
            server
        })
        .collect();
    let first = sticky_until(&tb, |_| true).expect("web-sticky answers");
    let other = if first == "web-1" { "web-2" } else { "web-1" };

    // Only the other backend: the client's entry is out of the rotation, it moves.
    let selector = "  selector:\n    app: web\n  sessionAffinity: ClientIP\n";
    assert!(
        base.contains(selector),
        "web-sticky's selector in the fixture"
    );
    replace_file(
        &file,
        &base.replace(
            selector,
            &format!(
                "  selector:\n    app: web\n    backend: {other}\n  sessionAffinity: ClientIP\n"
            ),
        ),
    );
    let moved = sticky_until(&tb, |b| b == other);
    assert_eq!(
        moved.as_deref(),
        Ok(other),
        "only {other} is selected: {:?}\n{}",
        status(&tb, NODE1).source_error,
        agent_log(&tb)
    );

    // Both again: the entry holds, where a fresh choice would be `first`.
    let generation = status(&tb, NODE1).generation;
    replace_file(&file, &base);
    let s = status_when(&tb, NODE1, Duration::from_secs(15), |s| {
        s.generation > generation
    });
    assert!(s.generation > generation, "both backends selected again");
    for _ in 0..5 {
        assert_eq!(
            probe_name(&tb, CLIENT, STICKY_VIP, 80).as_deref(),
            Ok(other),
            "the client's entry holds while its backend is in the rotation"
        );
    }

    tb.hot_restart_agent(NODE1)
        .unwrap_or_else(|e| panic!("hot restart: {e}\n{}", agent_log(&tb)));
    for _ in 0..5 {
        assert_eq!(
            probe_name(&tb, CLIENT, STICKY_VIP, 80).as_deref(),
            Ok(other),
            "after the hot restart, the client stays on {other} ({first} would be a fresh \
             choice):\n{}",
            agent_log(&tb)
        );
    }
    let log = agent_log(&tb);
    assert!(
        log.contains("session-affinity entries taken over"),
        "the next agent says it took the entries over:\n{log}"
    );
}

/// node1's and node2's agents, each with a WireGuard session to the other (strict mode: no
/// session is a counted drop, never clear text).
fn wg_sessions_ready(tb: &Testbed, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let ok = ["node1", "node2"].iter().all(|n| {
            common::try_status(tb, n).is_ok_and(|s| {
                s.wireguard
                    .is_some_and(|w| w.peers.iter().all(|p| p.has_session) && !w.peers.is_empty())
            })
        });
        if ok || Instant::now() >= deadline {
            return ok;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_hot_restart_with_wireguard_keeps_the_sessions_and_loses_nothing() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut opts = env.options(&cluster("wireguard.yaml"), 1);
    opts.encryption = testbed::Encryption::Wireguard;
    opts.agent_args.push("--wg-strict".into());
    let mut tb = env.up_with(opts);
    assert!(
        wg_sessions_ready(&tb, Duration::from_secs(15)),
        "sessions both ways"
    );
    let (a1, b1) = ("default/pod-a1", "default/pod-b1");
    common::ping_within(&tb, a1, b1, Duration::from_secs(15));

    // Strict mode: a datagram sent while a side has no session is dropped (wg_no_session),
    // so the stream's count shows any moment without one.
    let stream = PacedStream::start(&tb, a1, b1, 4000);
    std::thread::sleep(Duration::from_millis(800));
    // The sender's side, then the receiver's (its replay windows and receive keys travel).
    let mut restarted = Vec::new();
    for node in ["node1", "node2"] {
        tb.hot_restart_agent(node)
            .unwrap_or_else(|e| panic!("hot restart of {node}: {e}"));
        restarted.push(Instant::now());
        std::thread::sleep(Duration::from_millis(800));
    }
    let sent = stream.datagrams;
    let (received, err) = stream.finish();
    assert_eq!(
        received,
        sent,
        "datagrams received, encrypted, across hot restarts of both ends ({err}); where frames \
         were dropped:\n{}",
        ring_losses(&tb, &[NODE1, NODE2])
    );
    for (node, at) in ["node1", "node2"].iter().zip(&restarted) {
        let s = common::status(&tb, node);
        assert_eq!(common::drops(&s, "wg_no_session"), 0, "{node}: {s:?}");
        assert_eq!(common::drops(&s, "wg_replay"), 0, "{node}");
        let w = s.wireguard.expect("wireguard on");
        let max_age = at.elapsed().as_secs() + 1;
        assert!(
            w.peers
                .iter()
                .all(|p| p.has_session && p.latest_handshake_s_ago.is_some_and(|a| a <= max_age)),
            "{node}: a fresh handshake after its restart (within {max_age} s): {w:?}"
        );
    }
    common::ping_within(&tb, a1, b1, Duration::from_secs(5));
}
