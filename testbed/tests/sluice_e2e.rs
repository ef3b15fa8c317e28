//! End-to-end tests of the sluice agent (`sluice run`) on the testbed: real pods (network
//! namespaces networked by `sluice-cni`), real AF_XDP workers, traffic from ordinary tools
//! (`ping`, Python sockets), and the agent's own counters read over its local API.
//!
//! Root only; build the binaries first: `cargo build -p control --bins`.
//!
//! Every test brings up its own instance of `testbed/clusters/demo.yaml` (node1 with pods
//! default/pod-a and default/pod-b, node IP 172.18.0.11, external client 172.18.0.250) under a
//! unique instance name (pid + counter) and its own temporary state root; the `Testbed` drop
//! removes everything, also when a test panics. Counters are asserted as deltas (after - before),
//! read once the workers have published them. Every command runs under `timeout`, every wait is
//! bounded. Traffic-heavy tests hold [`HEAVY`] so that two of them never share the two vCPUs.
use std::{
    net::Ipv4Addr,
    process::{Command, Output},
    sync::Mutex,
    time::{Duration, Instant},
};

use control::status::Status;
use testbed::Testbed;

mod common;
use common::{
    cluster, drops, hold, in_node, in_pod, ping, pod_ip, python, replace_file, require_root,
    settled_status, status, status_when, tcp_transfer, text, timed, try_ping_within, udp_datagrams,
    unexpected_drops, Env, Proc, COUNTERS_SETTLE, MAX_PAYLOAD_PER_PACKET, STATUS_TIMEOUT,
};

/// Instance names here are `e{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'e';
const NODE: &str = "node1";
const POD_A: &str = "default/pod-a";
const POD_B: &str = "default/pod-b";
const DEMO: &str = "demo.yaml";
/// The demo cluster's pod gateway (first address of node1's pod CIDR 10.244.1.0/24).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// node1's InternalIP in the demo cluster.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);

/// Held by tests that move a lot of traffic (the machine has 2 vCPUs).
static HEAVY: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Counters of node1's agent.

/// The XDP program's counter `name` on the host side of `pod`'s veth.
fn xdp_counter(s: &Status, tb: &Testbed, pod: &str, name: &str) -> u64 {
    let ifname = &tb.pod(pod).expect("pod").host_ifname;
    let iface = s
        .interfaces
        .iter()
        .find(|i| &i.name == ifname)
        .unwrap_or_else(|| panic!("status lists no interface {ifname} for {pod}"));
    iface
        .xdp
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("interface {ifname} has no XDP counter {name:?}"))
}

fn worker_counter(w: &control::status::WorkerStatus, name: &str) -> u64 {
    w.counters
        .iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| *v)
}

/// Counter growth, for assertion messages.
struct Delta<'a> {
    before: &'a Status,
    after: &'a Status,
}

impl<'a> Delta<'a> {
    fn new(before: &'a Status, after: &'a Status) -> Self {
        Self { before, after }
    }
    fn total(&self, name: &str) -> u64 {
        self.after.total(name) - self.before.total(name)
    }
    fn drops(&self, reason: &str) -> u64 {
        drops(self.after, reason) - drops(self.before, reason)
    }
    /// Drop reasons that grew, except `ipv6_unsupported` (see [`unexpected_drops`]).
    fn unexpected_drops(&self) -> Vec<(String, u64)> {
        unexpected_drops(self.before, self.after, &[])
    }
    fn xdp(&self, tb: &Testbed, pod: &str, name: &str) -> u64 {
        xdp_counter(self.after, tb, pod, name) - xdp_counter(self.before, tb, pod, name)
    }
}

// ---------------------------------------------------------------------------------------------
// Commands in the testbed's namespaces.

fn assert_pod_ping(tb: &Testbed, from: &str, to: &str, count: u32) {
    let ip = pod_ip(tb, to);
    let out = ping(tb, from, ip, count);
    assert!(
        out.status.success(),
        "ping {from} -> {to} ({ip}) failed:\n{}",
        text(&out)
    );
}

fn ping_node_from_external(tb: &Testbed) -> Output {
    let ip = NODE_IP.to_string();
    tb.exec_in_external(&timed(
        "15",
        &["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", &ip],
    ))
    .expect("ping from the external client runs")
}

/// `ip -d link show dev IF` in the node namespace.
fn link_details(tb: &Testbed, ifname: &str) -> String {
    let out = in_node(tb, NODE, &["ip", "-d", "link", "show", "dev", ifname]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `ip -d link show` reports an XDP program (`prog/xdp`, `xdp`, `xdpgeneric`,
/// `xdpdrv`, `xdpoffload` attachment lines).
fn has_xdp(details: &str) -> bool {
    details
        .split_whitespace()
        .any(|word| word.starts_with("xdp") || word.starts_with("prog/xdp"))
}

fn pod_ifnames(tb: &Testbed) -> Vec<String> {
    [POD_A, POD_B]
        .iter()
        .map(|p| tb.pod(p).expect("pod").host_ifname.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn ping_between_pods_goes_through_the_workers() {
    require_root!();
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    for ifname in pod_ifnames(&tb) {
        assert!(
            has_xdp(&link_details(&tb, &ifname)),
            "no XDP program on {ifname} while the agent runs:\n{}",
            link_details(&tb, &ifname)
        );
    }
    let before = settled_status(&tb, NODE);
    assert_pod_ping(&tb, POD_A, POD_B, 5);
    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        s.total("forwarded") >= before.total("forwarded") + 10
    });
    let d = Delta::new(&before, &after);
    assert!(
        d.total("forwarded") >= 10,
        "5 echo requests + 5 replies, forwarded grew by {}:\n{}",
        d.total("forwarded"),
        after.render()
    );
    // The pods' neighbour entries for the gateway were made by the testbed's own traffic or
    // this ping; either way at least one ARP reply has been sent since the agent started.
    assert!(
        after.total("arp_replies") >= 1,
        "no ARP reply for the gateway:\n{}",
        after.render()
    );
    for pod in [POD_A, POD_B] {
        assert!(
            d.xdp(&tb, pod, "redirected") >= 5,
            "XDP on {pod}'s interface redirected {} frames (>= 5 expected):\n{}",
            d.xdp(&tb, pod, "redirected"),
            after.render()
        );
    }
    assert_eq!(
        d.unexpected_drops(),
        Vec::<(String, u64)>::new(),
        "unexpected drops:\n{}",
        after.render()
    );
}

#[test]
fn tcp_between_pods() {
    require_root!();
    let _heavy = hold(&HEAVY);
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 1);
    const BYTES: u64 = 20 * 1024 * 1024;
    let before = settled_status(&tb, NODE);
    let received = tcp_transfer(&tb, POD_A, POD_B, BYTES);
    assert_eq!(received, BYTES, "the sink received a different byte count");
    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        s.total("forwarded") >= before.total("forwarded") + BYTES / MAX_PAYLOAD_PER_PACKET
    });
    let d = Delta::new(&before, &after);
    assert!(
        d.total("forwarded") >= BYTES / MAX_PAYLOAD_PER_PACKET,
        "{BYTES} bytes need at least {} data packets; forwarded grew by {}:\n{}",
        BYTES / MAX_PAYLOAD_PER_PACKET,
        d.total("forwarded"),
        after.render()
    );
    assert!(
        d.xdp(&tb, POD_A, "redirected") >= BYTES / MAX_PAYLOAD_PER_PACKET,
        "the sender's data did not all pass through XDP redirect:\n{}",
        after.render()
    );
}

#[test]
fn udp_between_pods() {
    require_root!();
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 1);
    const DATAGRAMS: u64 = 300;
    let before = settled_status(&tb, NODE);
    let received = udp_datagrams(&tb, POD_A, POD_B, DATAGRAMS, 1000);
    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        s.total("forwarded") >= before.total("forwarded") + DATAGRAMS
    });
    let d = Delta::new(&before, &after);
    assert_eq!(
        received,
        DATAGRAMS,
        "datagrams lost; agent:\n{}",
        after.render()
    );
    assert!(
        d.total("forwarded") >= DATAGRAMS,
        "forwarded grew by {} for {DATAGRAMS} datagrams:\n{}",
        d.total("forwarded"),
        after.render()
    );
    assert!(
        d.xdp(&tb, POD_A, "redirected") >= DATAGRAMS,
        "XDP on pod-a's interface redirected {}:\n{}",
        d.xdp(&tb, POD_A, "redirected"),
        after.render()
    );
    assert_eq!(
        d.unexpected_drops(),
        Vec::<(String, u64)>::new(),
        "unexpected drops:\n{}",
        after.render()
    );
}

/// Prints "ready", accepts one connection on port argv[1], sends back "hello from <own
/// address>" and the peer's address, closes.
const HELLO_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(20)
print("ready", flush=True)
c, peer = s.accept()
c.sendall(("hello from %s to %s" % (c.getsockname()[0], peer[0])).encode())
c.close()
"#;

/// Connects to argv[1]:argv[2] and prints what the server says.
const HELLO_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(c.recv(200).decode(), flush=True)
"#;

/// The demo's Service svc-b (10.96.0.20:80 -> pod-b's 8080) reaches pod-b: its EndpointSlice,
/// derived by the agent from pod-b's `status.podIP` in demo.yaml, is the address pod-b really
/// has, because the testbed passes that podIP to the CNI (`IP=`).
#[test]
fn demo_service_reaches_the_pod_at_its_file_address() {
    require_root!();
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    assert_eq!(
        pod_ip(&tb, POD_A),
        Ipv4Addr::new(10, 244, 1, 10),
        "demo.yaml podIP"
    );
    assert_eq!(
        pod_ip(&tb, POD_B),
        Ipv4Addr::new(10, 244, 1, 11),
        "demo.yaml podIP"
    );
    let (server, ready) =
        Proc::start_in_pod(&tb, POD_B, "30", &[python(), "-c", HELLO_SERVER, "8080"]);
    assert_eq!(ready, "ready", "server in {POD_B} did not start");
    let out = in_pod(
        &tb,
        POD_A,
        "15",
        &[python(), "-c", HELLO_CLIENT, "10.96.0.20", "80"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from 10.244.1.11 to 10.244.1.10",
        "pod-a -> svc-b ClusterIP:\n{}",
        text(&out)
    );
    let (_, err, status) = server.finish();
    assert!(status.success(), "server: {status} {err}");
}

#[test]
fn ttl_expiry_gets_icmp_time_exceeded() {
    require_root!();
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 1);
    let before = settled_status(&tb, NODE);
    let to = pod_ip(&tb, POD_B).to_string();
    let out = in_pod(
        &tb,
        POD_A,
        "10",
        &["ping", "-n", "-c", "1", "-t", "1", "-W", "2", &to],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("From {GATEWAY}")) && stdout.contains("Time to live exceeded"),
        "expected 'Time to live exceeded' from the gateway {GATEWAY}:\n{}",
        text(&out)
    );
    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        s.total("icmp_errors_sent") > before.total("icmp_errors_sent")
    });
    let d = Delta::new(&before, &after);
    assert_eq!(
        d.total("icmp_errors_sent"),
        1,
        "one TTL-1 echo request, one ICMP error:\n{}",
        after.render()
    );
    assert_eq!(
        d.total("forwarded"),
        0,
        "the expired packet was forwarded anyway:\n{}",
        after.render()
    );
}

#[test]
fn fail_open_when_agent_stops() {
    require_root!();
    let env = Env::new();
    let mut tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 2);
    let out = ping_node_from_external(&tb);
    assert!(
        out.status.success(),
        "node {NODE_IP} does not answer the external client while the agent runs:\n{}",
        text(&out)
    );
    let ifnames = pod_ifnames(&tb);
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        tb.stop_agent(NODE, signal)
            .unwrap_or_else(|e| panic!("stopping the agent with {name}: {e}"));
        assert!(
            !tb.agent_alive(NODE).expect("node1"),
            "agent alive after {name}"
        );
        for ifname in &ifnames {
            let details = link_details(&tb, ifname);
            assert!(
                !has_xdp(&details),
                "an XDP program is still attached to {ifname} after {name}:\n{details}"
            );
        }
        let out = ping_node_from_external(&tb);
        assert!(
            out.status.success(),
            "node {NODE_IP} does not answer the external client after {name}:\n{}",
            text(&out)
        );

        let started = Instant::now();
        tb.start_agent(NODE)
            .unwrap_or_else(|e| panic!("restarting the agent after {name}: {e}"));
        let s = status_when(&tb, NODE, Duration::from_secs(5), |s| {
            ifnames
                .iter()
                .all(|i| s.interfaces.iter().any(|x| &x.name == i))
        });
        for ifname in &ifnames {
            assert!(
                s.interfaces.iter().any(|x| &x.name == ifname),
                "restarted agent (after {name}) does not list {ifname}:\n{}",
                s.render()
            );
        }
        let attempts = try_ping_within(&tb, POD_A, POD_B, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("after {name} and a restart: {e}"));
        eprintln!(
            "after {name}: restarted agent forwards pod-to-pod {:?} after start (ping attempt {attempts})",
            started.elapsed()
        );
        for ifname in &ifnames {
            assert!(
                has_xdp(&link_details(&tb, ifname)),
                "restarted agent did not attach XDP to {ifname}"
            );
        }
        let s = settled_status(&tb, NODE);
        assert!(
            xdp_counter(&s, &tb, POD_A, "redirected") >= 1,
            "pod-a's ping did not go through the restarted agent's XDP redirect:\n{}",
            s.render()
        );
    }
}

#[test]
fn agent_survives_broken_cluster_file() {
    require_root!();
    let env = Env::new();
    let good = std::fs::read_to_string(cluster(DEMO)).expect("read demo.yaml");
    let copy = env.dir.path().join("cluster.yaml");
    std::fs::write(&copy, &good).expect("write the cluster copy");
    let tb = env.up(&copy, 1);
    assert_pod_ping(&tb, POD_A, POD_B, 1);
    let s = status(&tb, NODE);
    assert_eq!(s.source_error, None, "fresh agent reports a source error");
    let generation_before = s.generation;

    // Document 6 (after the five of demo.yaml) has an unclosed flow mapping.
    let broken_doc = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: broken\n";
    let broken = format!("{good}{broken_doc}");
    let broken_line = good.lines().count() + 4;
    replace_file(&copy, &broken);
    let s = status_when(&tb, NODE, Duration::from_secs(3), |s| {
        s.source_error
            .as_deref()
            .is_some_and(|e| e.contains("document 6"))
    });
    let error = s.source_error.clone().unwrap_or_else(|| {
        panic!(
            "no source error 3 s after breaking the file:\n{}",
            s.render()
        )
    });
    eprintln!("source_error: {error}");
    assert!(
        error.contains("document 6") && error.contains("line"),
        "the error should name the document and line (about line {broken_line}): {error}"
    );
    assert!(
        error.contains(&copy.display().to_string()),
        "the error should name the file {}: {error}",
        copy.display()
    );
    assert_pod_ping(&tb, POD_A, POD_B, 2);

    replace_file(&copy, &good);
    let s = status_when(&tb, NODE, Duration::from_secs(3), |s| {
        s.source_error.is_none()
    });
    assert_eq!(
        s.source_error, None,
        "the fixed file still reports an error 3 s later"
    );
    assert!(
        s.generation > generation_before,
        "generation {} did not grow past {generation_before} after the fix",
        s.generation
    );
    assert_pod_ping(&tb, POD_A, POD_B, 1);
}

#[test]
fn two_workers_forward() {
    require_root!();
    let _heavy = hold(&HEAVY);
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 2);
    let s = status(&tb, NODE);
    assert_eq!(s.workers.len(), 2, "two workers:\n{}", s.render());
    for ifname in pod_ifnames(&tb) {
        let iface = s
            .interfaces
            .iter()
            .find(|i| i.name == ifname)
            .unwrap_or_else(|| panic!("no interface {ifname}:\n{}", s.render()));
        let mut workers: Vec<usize> = iface.queues.iter().map(|q| q.worker).collect();
        workers.sort_unstable();
        assert_eq!(
            workers,
            vec![0, 1],
            "{ifname} should have 2 queues, one per worker:\n{}",
            s.render()
        );
    }
    assert_pod_ping(&tb, POD_A, POD_B, 5);
    const BYTES: u64 = 10 * 1024 * 1024;
    let before = settled_status(&tb, NODE);
    assert_eq!(tcp_transfer(&tb, POD_A, POD_B, BYTES), BYTES);
    assert_pod_ping(&tb, POD_B, POD_A, 5);
    // Workers publish when idle: wait for the traffic to show, then for every worker's view
    // to settle.
    status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        s.total("forwarded") >= before.total("forwarded") + BYTES / MAX_PAYLOAD_PER_PACKET
    });
    let after = settled_status(&tb, NODE);
    for name in ["rx_packets", "tx_packets", "forwarded", "dropped"] {
        let sum: u64 = after.workers.iter().map(|w| worker_counter(w, name)).sum();
        assert_eq!(
            sum,
            after.total(name),
            "sum over workers of {name} differs from the total:\n{}",
            after.render()
        );
    }
    let d = Delta::new(&before, &after);
    assert!(
        d.total("forwarded") >= BYTES / MAX_PAYLOAD_PER_PACKET,
        "forwarded grew by {}:\n{}",
        d.total("forwarded"),
        after.render()
    );
    for w in &after.workers {
        let b = before
            .workers
            .iter()
            .find(|x| x.id == w.id)
            .expect("same workers");
        eprintln!(
            "worker {} (core {:?}): rx_packets +{} forwarded +{}",
            w.id,
            w.core,
            worker_counter(w, "rx_packets") - worker_counter(b, "rx_packets"),
            worker_counter(w, "forwarded") - worker_counter(b, "forwarded"),
        );
    }
}

/// Sends malformed frames out of the pod's eth0 on an AF_PACKET socket:
/// argv: dst_mac src_ip dst_ip n_short n_truncated n_badsum n_ipv6 n_arp.
const RAW_FRAMES: &str = r#"
import socket, struct, sys
dst = bytes.fromhex(sys.argv[1].replace(":", ""))
src = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
sip, dip = socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3])
n_short, n_trunc, n_badsum, n_ipv6, n_arp = (int(x) for x in sys.argv[4:9])

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

def eth(dst_mac, ethertype):
    return dst_mac + src + struct.pack("!H", ethertype)

icmp = struct.pack("!BBHHH", 8, 0, 0, 0x5e5e, 1)
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0, sip, dip)
good = csum(hdr)
bad_hdr = hdr[:10] + struct.pack("!H", good ^ 0x5a5a) + hdr[12:]

frames = []
# Ethernet header only, ethertype IPv4, nothing after.
frames += [eth(dst, 0x0800)] * n_short
# An IPv4 header cut after 10 bytes (version/IHL and protocol readable).
frames += [eth(dst, 0x0800) + hdr[:10]] * n_trunc
# A full ICMP echo request whose IPv4 header checksum is wrong.
frames += [eth(dst, 0x0800) + bad_hdr + icmp] * n_badsum
# IPv6 (no next header), fe80::1 -> ff02::1.
v6 = struct.pack("!IHBB", 6 << 28, 0, 59, 64) + bytes.fromhex("fe80" + "00" * 13 + "01") + bytes.fromhex("ff02" + "00" * 13 + "01")
frames += [eth(dst, 0x86DD) + v6] * n_ipv6
# ARP request for 10.244.1.77, which is not the gateway.
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src, sip, b"\0" * 6, socket.inet_aton("10.244.1.77"))
frames += [eth(b"\xff" * 6, 0x0806) + arp] * n_arp

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for f in frames:
    s.send(f)
print("sent", len(frames), flush=True)
"#;

#[test]
fn malformed_frames_are_counted_not_fatal() {
    require_root!();
    let env = Env::new();
    let mut tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 1);
    let before = settled_status(&tb, NODE);
    let host_mac = before
        .interfaces
        .iter()
        .find(|i| i.pod.as_deref() == Some(POD_A))
        .map(|i| i.mac.clone())
        .unwrap_or_else(|| panic!("no interface for {POD_A}:\n{}", before.render()));
    let (a_ip, b_ip) = (
        pod_ip(&tb, POD_A).to_string(),
        pod_ip(&tb, POD_B).to_string(),
    );
    // Distinct counts, so that a frame counted under the wrong reason shows.
    let (n_short, n_trunc, n_badsum, n_ipv6, n_arp) = (3u64, 4u64, 5u64, 6u64, 7u64);
    let counts = [n_short, n_trunc, n_badsum, n_ipv6, n_arp].map(|n| n.to_string());
    let mut argv = vec![python(), "-c", RAW_FRAMES, &host_mac, &a_ip, &b_ip];
    argv.extend(counts.iter().map(String::as_str));
    let out = in_pod(&tb, POD_A, "20", &argv);
    assert!(out.status.success(), "raw frame sender:\n{}", text(&out));

    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| {
        drops(s, "arp_not_for_gateway") >= drops(&before, "arp_not_for_gateway") + n_arp
            && drops(s, "ipv6_unsupported") >= drops(&before, "ipv6_unsupported") + n_ipv6
            && drops(s, "ipv4_checksum") >= drops(&before, "ipv4_checksum") + n_badsum
            && drops(s, "frame_too_short") >= drops(&before, "frame_too_short") + n_trunc
    });
    let d = Delta::new(&before, &after);
    let shown = after.render();
    // A frame too short for the XDP program to read the IPv4 header never reaches a worker:
    // the program leaves it to the kernel and counts it as pass_short.
    assert_eq!(
        d.xdp(&tb, POD_A, "pass_short"),
        n_short,
        "bare Ethernet headers:\n{shown}"
    );
    assert_eq!(
        d.drops("frame_too_short"),
        n_trunc,
        "truncated IPv4 headers:\n{shown}"
    );
    assert_eq!(
        d.drops("ipv4_checksum"),
        n_badsum,
        "bad IPv4 checksums:\n{shown}"
    );
    // The pod's own kernel may send IPv6 (router solicitations, MLD) at any time.
    assert!(
        d.drops("ipv6_unsupported") >= n_ipv6,
        "IPv6 frames:\n{shown}"
    );
    eprintln!(
        "ipv6_unsupported grew by {} for {n_ipv6} frames sent",
        d.drops("ipv6_unsupported")
    );
    assert_eq!(
        d.drops("arp_not_for_gateway"),
        n_arp,
        "ARP requests for another address:\n{shown}"
    );
    assert_eq!(
        d.total("forwarded"),
        0,
        "a malformed frame was forwarded:\n{shown}"
    );
    assert!(
        tb.agent_alive(NODE).expect("node1"),
        "the agent died on malformed frames"
    );
    assert_pod_ping(&tb, POD_A, POD_B, 3);
}

/// `/metrics` in the node's namespace and the `Histograms` API: the latency histograms fill
/// with the traffic just sent, every counter is exported, probes answer.
#[test]
fn metrics_and_latency_histograms_follow_traffic() {
    require_root!();
    let env = Env::new();
    let tb = env.up(&cluster(DEMO), 1);
    assert_pod_ping(&tb, POD_A, POD_B, 10);
    let after = status_when(&tb, NODE, COUNTERS_SETTLE, |s| s.total("forwarded") >= 20);
    // Histograms over the local API, decoded as any HdrHistogram reader would.
    let resp = control::api::call(
        &tb.node(NODE).expect("node1").agent_socket,
        &control::api::Request::Histograms,
        STATUS_TIMEOUT,
    )
    .expect("Histograms request");
    let h = resp.histograms.expect("histograms in the answer");
    assert!(h.tsc_hz > 1_000_000, "TSC frequency {}", h.tsc_hz);
    assert_eq!(h.workers.len(), 1);
    let decode = |b64: &str| -> hdrhistogram::Histogram<u64> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut &bytes[..])
            .expect("HdrHistogram V2")
    };
    let packets = decode(&h.merged.packet_ns);
    let batches = decode(&h.merged.batch_ns);
    assert!(
        packets.len() >= 20,
        "packet histogram holds {} packets after 20 forwarded (rx {}):\n{}",
        packets.len(),
        after.total("rx_packets"),
        after.render()
    );
    assert_eq!(
        packets.len(),
        decode(&h.workers[0].packet_ns).len(),
        "merged == the one worker"
    );
    assert!(!batches.is_empty() && batches.len() <= packets.len());
    assert!(packets.value_at_quantile(0.5) > 0 && packets.max() < 1_000_000_000);
    // /metrics, /healthz and /readyz in the node's network namespace.
    let node_ns = tb.node(NODE).expect("node").netns.clone();
    let curl = |path: &str| -> Output {
        Command::new("timeout")
            .args([
                "-s",
                "KILL",
                "10",
                "ip",
                "netns",
                "exec",
                &node_ns,
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://127.0.0.1:9962{path}"))
            .output()
            .expect("curl")
    };
    let m = String::from_utf8_lossy(&curl("/metrics").stdout).into_owned();
    assert!(m.trim_end().ends_with("200"), "metrics answer:\n{m}");
    let value = |key: &str| -> Option<f64> {
        m.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
    };
    let forwarded = value("sluice_forwarded_total{worker=\"0\"} ").expect("forwarded exported");
    assert!(forwarded >= 20.0, "forwarded {forwarded}");
    let count = value("sluice_pipeline_packet_duration_seconds_count{worker=\"0\"} ")
        .expect("histogram exported");
    assert!(count >= 20.0, "packet histogram count {count}");
    for r in ["no_route", "ipv6_unsupported", "source_not_owned"] {
        assert!(
            m.contains(&format!("reason=\"{r}\"")),
            "drop reason {r} missing from /metrics"
        );
    }
    for probe in ["/healthz", "/readyz"] {
        let out = String::from_utf8_lossy(&curl(probe).stdout).into_owned();
        assert!(out.trim_end().ends_with("200"), "{probe}: {out}");
    }
    // `sluice status --brief`, like `cilium status --brief`: OK, exit status 0.
    let sluice = env.options(&cluster(DEMO), 1).sluice_bin;
    let state_dir = tb.node(NODE).expect("node").state_dir.clone();
    let out = Command::new("timeout")
        .args(["-s", "KILL", "10"])
        .arg(&sluice)
        .args(["status", "--brief", "--state-dir"])
        .arg(&state_dir)
        .output()
        .expect("sluice status --brief");
    assert!(out.status.success(), "status --brief: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    assert!(String::from_utf8_lossy(&curl("/nope").stdout)
        .trim_end()
        .ends_with("404"));
}
