//! End-to-end tests of the overlay between nodes: VXLAN done by the sluice workers, between two
//! sluice nodes (`clusters/two-node.yaml`) and between a sluice node and a kernel node running the
//! kernel's own vxlan device (`clusters/mixed.yaml`), with ordinary tools (`ping`, Python
//! sockets, `tcpdump`) and the agents' counters read over their local API.
//!
//! Root only; build the binaries first: `cargo build -p control --bins`.
//!
//! Every test brings up its own instance under a unique name (pid + counter) and a temporary
//! state root; the `Testbed` drop removes everything, also when a test panics. Each test runs two
//! nodes, so the tests hold [`SERIAL`] and run one at a time on the two vCPUs. Counters are
//! asserted as deltas, every command runs under `timeout`, every wait is bounded.
//!
//! The first packet towards a node whose uplink neighbour is not resolved yet becomes an ARP
//! request (counted `neighbor_unresolved`), so traffic starts after a bounded "first ping gets
//! through" wait.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use control::status::Status;
use testbed::{names::Names, NodeKind, Testbed};

mod common;
use common::{
    cluster, drops, hold, in_node, in_pod, ping, ping_within, pod_ip, replace_file, require_root,
    settled_status, status, status_when, tcp_transfer, text, timed, udp_datagrams, Env, Proc,
    COUNTERS_SETTLE, MAX_PAYLOAD_PER_PACKET,
};

/// Instance names here are `o{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'o';
const NODE1: &str = "node1";
const NODE2: &str = "node2";
/// On node1 in both cluster files.
const POD_A1: &str = "default/pod-a1";
/// On node2 in both cluster files.
const POD_B1: &str = "default/pod-b1";
/// node1's pod gateway (first address of 10.244.1.0/24).
const GATEWAY1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE1_IP: &str = "172.18.0.11";
const NODE2_IP: &str = "172.18.0.12";
/// At most this many first packets may wait for ARP (one per direction and retry).
const MAX_UNRESOLVED: u64 = 4;
/// How long the first packet between two nodes may take to get through (ARP on both uplinks).
const FIRST_PING_WITHIN: Duration = Duration::from_secs(10);
const TWO_NODE: &str = "two-node.yaml";
const MIXED: &str = "mixed.yaml";

/// Every test here runs two nodes' worth of agents and traffic: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Drop reasons that grew between two readings, except `ipv6_unsupported` and up to
/// [`MAX_UNRESOLVED`] `neighbor_unresolved`.
fn unexpected_drops(before: &Status, after: &Status) -> Vec<(String, u64)> {
    common::unexpected_drops(before, after, &[("neighbor_unresolved", MAX_UNRESOLVED)])
}

/// Pings `count` times and asserts every echo was answered.
fn assert_ping_all(tb: &Testbed, from: &str, to: &str, count: u32) {
    let ip = pod_ip(tb, to);
    let out = ping(tb, from, ip, count);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{count} received")),
        "ping {from} -> {to} ({ip}): not all {count} answered:\n{}",
        text(&out)
    );
}

/// rx and tx packets of the kernel vxlan device in a kernel node.
fn vxlan_device_packets(tb: &Testbed, node: &str) -> (u64, u64) {
    let out = in_node(
        tb,
        node,
        &["ip", "-s", "-j", "link", "show", testbed::kernel::VXLAN_DEV],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let stats = &json[0]["stats64"];
    let get = |dir: &str| {
        stats[dir]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no {dir} packets in {json}"))
    };
    (get("rx"), get("tx"))
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn sluice_to_sluice_ping_tcp_udp() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let workers = 2;
    let tb = env.up(&cluster(TWO_NODE), workers);

    // Every worker has a queue on each node's uplink.
    for node in [NODE1, NODE2] {
        let s = status(&tb, node);
        let uplink = s
            .interfaces
            .iter()
            .find(|i| i.name == testbed::UPLINK)
            .unwrap_or_else(|| panic!("{node} lists no uplink:\n{}", s.render()));
        let mut owners: Vec<usize> = uplink.queues.iter().map(|q| q.worker).collect();
        owners.sort_unstable();
        assert_eq!(
            owners,
            (0..workers as usize).collect::<Vec<_>>(),
            "{node}'s uplink has one queue per worker:\n{}",
            s.render()
        );
    }

    let attempts = ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    eprintln!("first ping node1 -> node2 after {attempts} attempt(s)");
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);

    let before1 = settled_status(&tb, NODE1);
    let before2 = settled_status(&tb, NODE2);
    let pings = 5;
    assert_ping_all(&tb, POD_A1, POD_B1, pings);
    assert_ping_all(&tb, POD_B1, POD_A1, pings);

    let bytes = 10 * 1024 * 1024;
    assert_eq!(
        tcp_transfer(&tb, POD_A1, POD_B1, bytes),
        bytes,
        "TCP node1 -> node2 not byte-exact"
    );
    let datagrams = 300;
    let arrived = udp_datagrams(&tb, POD_A1, POD_B1, datagrams, 1000);
    assert_eq!(
        arrived, datagrams,
        "UDP node1 -> node2: {arrived} of {datagrams} arrived"
    );

    // node1 -> node2: the echo requests, the TCP data, the datagrams.
    let sent = u64::from(pings) + bytes / MAX_PAYLOAD_PER_PACKET + datagrams;
    let after1 = status_when(&tb, NODE1, COUNTERS_SETTLE, |s| {
        s.total("encapsulated") >= before1.total("encapsulated") + sent
    });
    let after2 = status_when(&tb, NODE2, COUNTERS_SETTLE, |s| {
        s.total("decapsulated") >= before2.total("decapsulated") + sent
    });
    let encapsulated = after1.total("encapsulated") - before1.total("encapsulated");
    let decapsulated = after2.total("decapsulated") - before2.total("decapsulated");
    eprintln!(
        "node1 encapsulated {encapsulated}, node2 decapsulated {decapsulated} (sent >= {sent})"
    );
    assert!(
        encapsulated >= sent,
        "node1 encapsulated {encapsulated} < {sent} packets sent:\n{}",
        after1.render()
    );
    assert!(
        decapsulated >= sent,
        "node2 decapsulated {decapsulated} < {sent} packets sent:\n{}",
        after2.render()
    );
    // The replies went the other way through the overlay too.
    let back = after2.total("encapsulated") - before2.total("encapsulated");
    assert!(
        back >= u64::from(pings) * 2,
        "node2 encapsulated only {back}"
    );
    for (node, before, after) in [(NODE1, &before1, &after1), (NODE2, &before2, &after2)] {
        let unexpected = unexpected_drops(before, after);
        assert!(
            unexpected.is_empty(),
            "{node}: unexpected drops {unexpected:?}:\n{}",
            after.render()
        );
    }
}

#[test]
fn sluice_and_kernel_vxlan_interoperate() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = env.up(&cluster(MIXED), 1);
    assert_eq!(tb.node(NODE1).expect("node1").kind, NodeKind::Sluice);
    let kernel = tb.node(NODE2).expect("node2");
    assert_eq!(kernel.kind, NodeKind::Kernel);
    assert_eq!(kernel.agent_pid, None, "a kernel node runs no agent");
    // The kernel node's VTEP MAC follows the agents' scheme (0a:58 + the InternalIP).
    let link = in_node(
        &tb,
        NODE2,
        &["ip", "-j", "link", "show", testbed::kernel::VXLAN_DEV],
    );
    let link: serde_json::Value = serde_json::from_slice(&link.stdout).expect("ip -j");
    assert_eq!(link[0]["address"], "0a:58:ac:12:00:0c", "{link}");
    // Its pods have Flannel's MTU.
    let mtu = in_pod(&tb, POD_B1, "10", &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1450");

    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);
    let before = settled_status(&tb, NODE1);
    let (rx_before, tx_before) = vxlan_device_packets(&tb, NODE2);

    let pings = 5;
    assert_ping_all(&tb, POD_A1, POD_B1, pings);
    assert_ping_all(&tb, POD_B1, POD_A1, pings);
    let bytes = 4 * 1024 * 1024;
    assert_eq!(
        tcp_transfer(&tb, POD_A1, POD_B1, bytes),
        bytes,
        "TCP sluice -> kernel"
    );
    assert_eq!(
        tcp_transfer(&tb, POD_B1, POD_A1, bytes),
        bytes,
        "TCP kernel -> sluice"
    );
    let datagrams = 200;
    assert_eq!(
        udp_datagrams(&tb, POD_A1, POD_B1, datagrams, 1000),
        datagrams,
        "UDP sluice -> kernel"
    );
    assert_eq!(
        udp_datagrams(&tb, POD_B1, POD_A1, datagrams, 1000),
        datagrams,
        "UDP kernel -> sluice"
    );

    let (rx_after, tx_after) = vxlan_device_packets(&tb, NODE2);
    let one_way = u64::from(pings * 2) + datagrams;
    assert!(
        rx_after - rx_before >= one_way + bytes / MAX_PAYLOAD_PER_PACKET,
        "the kernel vxlan device received {} packets",
        rx_after - rx_before
    );
    assert!(
        tx_after - tx_before >= one_way + bytes / MAX_PAYLOAD_PER_PACKET,
        "the kernel vxlan device sent {} packets",
        tx_after - tx_before
    );
    let after = status_when(&tb, NODE1, COUNTERS_SETTLE, |s| {
        s.total("decapsulated") >= before.total("decapsulated") + one_way
    });
    assert!(
        after.total("decapsulated") - before.total("decapsulated") >= one_way
            && after.total("encapsulated") - before.total("encapsulated") >= one_way,
        "node1's workers did the sluice side:\n{}",
        after.render()
    );
    let unexpected = unexpected_drops(&before, &after);
    assert!(
        unexpected.is_empty(),
        "node1: unexpected drops {unexpected:?}:\n{}",
        after.render()
    );
}

#[test]
fn capture_on_the_fabric_is_well_formed_vxlan() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = env.up(&cluster(TWO_NODE), 1);
    // Neighbours resolved first, so that the capture sees the echoes and nothing else.
    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    let bridge = Names::new(tb.instance()).bridge();
    // tcpdump decodes UDP 8472 as OTV by default (IANA gave 8472 to OTV): ask for VXLAN.
    let child = Command::new("ip")
        .args(["netns", "exec", tb.fabric_netns()])
        .args(timed(
            "20",
            &[
                "tcpdump", "-i", &bridge, "-nn", "-l", "-c", "4", "-T", "vxlan", "udp", "port",
                "8472",
            ],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump starts");
    let mut capture = Proc::new(child);
    // tcpdump says "listening on" on stderr once the capture runs.
    let mut stderr = BufReader::new(capture.child.stderr.take().expect("piped stderr"));
    let mut said = String::new();
    for _ in 0..5 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        said.push_str(&line);
        if line.contains("listening on") {
            break;
        }
    }
    assert!(
        said.contains("listening on"),
        "tcpdump did not start: {said}"
    );

    let (a1, b1) = (pod_ip(&tb, POD_A1), pod_ip(&tb, POD_B1));
    let out = ping(&tb, POD_A1, b1, 2);
    assert!(out.status.success(), "ping during capture:\n{}", text(&out));
    let (captured, _, status) = capture.finish();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    eprintln!("{captured}{rest}");
    assert!(status.success(), "tcpdump ({status}): {said}{rest}");

    // Each packet is two lines: the outer UDP with the VXLAN header, then the inner frame.
    let lines: Vec<&str> = captured.lines().collect();
    assert_eq!(lines.len(), 8, "4 packets of 2 lines:\n{captured}");
    let vxlan = "VXLAN, flags [I] (0x08), vni 1";
    for (i, pair) in lines.chunks(2).enumerate() {
        let (outer, inner) = (pair[0], pair[1]);
        let (src, dst, icmp) = if i % 2 == 0 {
            ((NODE1_IP, a1), (NODE2_IP, b1), "ICMP echo request")
        } else {
            ((NODE2_IP, b1), (NODE1_IP, a1), "ICMP echo reply")
        };
        assert!(
            outer.contains(&format!("IP {}.", src.0))
                && outer.contains(&format!("> {}.8472: {vxlan}", dst.0)),
            "packet {i}: outer {outer:?} is not VXLAN {} -> {}",
            src.0,
            dst.0
        );
        assert!(
            inner.contains(&format!("IP {} > {}: {icmp}", src.1, dst.1)),
            "packet {i}: inner {inner:?} is not {icmp} {} -> {}",
            src.1,
            dst.1
        );
    }
}

/// The documents of a multi-document YAML file except the Node named `name` and the pods bound
/// to it (as after the node is deleted; a file with a pod on a missing node is refused).
fn without_node(yaml: &str, name: &str) -> String {
    let docs: Vec<&str> = yaml.split("\n---\n").collect();
    let is_the_node =
        |d: &str| d.contains("\nkind: Node\n") && d.contains(&format!("\n  name: {name}\n"));
    let bound = |d: &str| d.contains(&format!("\n  nodeName: {name}\n"));
    let kept: Vec<&str> = docs
        .iter()
        .copied()
        .filter(|d| !is_the_node(d) && !bound(d))
        .collect();
    assert_eq!(
        docs.iter().filter(|d| is_the_node(d)).count(),
        1,
        "exactly one Node {name}"
    );
    assert!(docs.iter().any(|d| bound(d)), "pods on {name}");
    kept.join("\n---\n")
}

#[test]
fn node_join_and_leave_while_traffic_runs() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let full = std::fs::read_to_string(cluster(TWO_NODE)).expect("read two-node.yaml");
    let alone = without_node(&full, NODE2);
    // The testbed builds both nodes; node1's agent reads its own copy, which we edit.
    let view = env.dir.path().join("node1-view.yaml");
    std::fs::write(&view, &alone).expect("write node1's view");
    let mut opts = env.options(&cluster(TWO_NODE), 1);
    opts.agent_cluster_files = BTreeMap::from([(NODE1.to_string(), view.clone())]);
    let mut tb = env.up_with(opts);
    assert_eq!(
        tb.node(NODE1).expect("node1").agent_cluster_file.as_deref(),
        Some(std::fs::canonicalize(&view).expect("canonical").as_path())
    );
    let s = status(&tb, NODE1);
    assert_eq!(s.source_error, None, "node1's view is a valid file");
    let b1 = pod_ip(&tb, POD_B1).to_string();

    // Traffic for the whole test: 10 echoes a second from pod-a1 to pod-b1.
    let pinger = tb
        .spawn_in_pod(
            POD_A1,
            &timed(
                "60",
                &["ping", "-n", "-i", "0.1", "-c", "500", "-W", "1", &b1],
            ),
        )
        .expect("background ping starts");
    let pinger = Proc::new(pinger);

    // 1. node2 unknown to node1: no route.
    let before = status(&tb, NODE1);
    let s = status_when(&tb, NODE1, Duration::from_secs(5), |s| {
        drops(s, "no_route") >= drops(&before, "no_route") + 5
    });
    assert!(
        drops(&s, "no_route") >= drops(&before, "no_route") + 5,
        "traffic to an unknown node's pods is not dropped as no_route:\n{}",
        s.render()
    );
    assert_eq!(s.total("encapsulated"), before.total("encapsulated"));

    // 2. node2 joins: the traffic flows within a bounded wait.
    let joined_at = Instant::now();
    replace_file(&view, &full);
    let s = status_when(&tb, NODE1, Duration::from_secs(10), |s| {
        s.total("decapsulated") >= before.total("decapsulated") + 5
    });
    assert!(
        s.total("decapsulated") >= before.total("decapsulated") + 5,
        "no echo replies came back through the overlay 10 s after node2 joined:\n{}",
        s.render()
    );
    eprintln!("traffic flows {:?} after node2 joined", joined_at.elapsed());
    ping_within(&tb, POD_A1, POD_B1, Duration::from_secs(5));
    assert!(tb.agent_alive(NODE1).expect("node1"), "agent died on join");

    // 3. node2 leaves again: back to no_route, nothing encapsulated any more.
    let joined = status(&tb, NODE1);
    replace_file(&view, &alone);
    let s = status_when(&tb, NODE1, Duration::from_secs(10), |s| {
        drops(s, "no_route") >= drops(&joined, "no_route") + 5
    });
    assert!(
        drops(&s, "no_route") >= drops(&joined, "no_route") + 5,
        "traffic to the departed node's pods is not dropped as no_route 10 s later:\n{}",
        s.render()
    );
    let left = settled_status(&tb, NODE1);
    thread::sleep(Duration::from_secs(1));
    let later = status(&tb, NODE1);
    assert_eq!(
        later.total("encapsulated"),
        left.total("encapsulated"),
        "still encapsulating towards a node that left"
    );
    assert!(
        drops(&later, "no_route") > drops(&left, "no_route"),
        "the traffic kept running and kept being dropped"
    );
    assert!(tb.agent_alive(NODE1).expect("node1"), "agent died on leave");
    assert_eq!(status(&tb, NODE1).source_error, None);

    // SIGINT makes ping print its summary and exit (`timeout` passes the signal on).
    let pid = libc::pid_t::try_from(pinger.child.id()).expect("pid fits");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child's.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let (out, _, _) = pinger.finish();
    let summary = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("(no summary)")
        .to_string();
    eprintln!("background ping: {summary}");
    assert!(
        summary.contains(" received") && !summary.contains(" 0 received"),
        "the background ping got no replies at all: {summary}"
    );
}

#[test]
fn oversize_with_df_gets_fragmentation_needed() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let tb = env.up(&cluster(TWO_NODE), 1);
    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    // The pod's own stack refuses packets above its 1390-byte MTU, and a veth drops frames
    // above its peer's MTU before XDP sees them: raise both ends of pod-a1's veth to 1500.
    let host_ifname = tb.pod(POD_A1).expect("pod").host_ifname.clone();
    let out = in_pod(
        &tb,
        POD_A1,
        "10",
        &["ip", "link", "set", "eth0", "mtu", "1500"],
    );
    assert!(out.status.success(), "pod MTU:\n{}", text(&out));
    in_node(
        &tb,
        NODE1,
        &["ip", "link", "set", &host_ifname, "mtu", "1500"],
    );
    let before = settled_status(&tb, NODE1);
    // 1460 bytes of ICMP payload: a 1488-byte inner packet, 1538 bytes on the 1500-byte uplink.
    let b1 = pod_ip(&tb, POD_B1).to_string();
    let out = in_pod(
        &tb,
        POD_A1,
        "15",
        &[
            "ping", "-n", "-M", "do", "-s", "1460", "-c", "1", "-W", "2", &b1,
        ],
    );
    let shown = text(&out);
    assert!(
        shown.contains(&format!(
            "From {GATEWAY1} icmp_seq=1 Frag needed and DF set (mtu = 1450)"
        )),
        "no fragmentation-needed from the gateway:\n{shown}"
    );
    let after = status_when(&tb, NODE1, COUNTERS_SETTLE, |s| {
        s.total("icmp_errors_sent") > before.total("icmp_errors_sent")
    });
    assert!(
        after.total("icmp_errors_sent") > before.total("icmp_errors_sent"),
        "icmp_errors_sent did not grow:\n{}",
        after.render()
    );
    assert_eq!(
        after.total("encapsulated"),
        before.total("encapsulated"),
        "the oversize packet went out anyway"
    );
    // The pod learnt the path MTU: a packet that fits gets through.
    let out = in_pod(
        &tb,
        POD_A1,
        "15",
        &[
            "ping", "-n", "-M", "do", "-s", "1300", "-c", "1", "-W", "2", &b1,
        ],
    );
    assert!(out.status.success(), "1300-byte ping:\n{}", text(&out));
}
