//! End-to-end tests of sluice's WireGuard (issue 7, parts 4, 6 and 7): agents run with
//! `--encryption wireguard` on the testbed, pods exchange ping, TCP and UDP across nodes, and the
//! tests read what each side says (`sluice wg peers --json`, `sluice status`, `wg show` on a
//! wireguard-go node) and what the fabric carries (a capture on node1's fabric veth).
//!
//! - Two sluice nodes (`clusters/wireguard.yaml`), with one and with two workers: traffic both
//!   ways, handshakes on both agents, `encrypted`/`decrypted` counters, only UDP 51871 between
//!   the node addresses on the fabric, no pod address or payload marker; a clear VXLAN packet
//!   from node2's address is accepted (not strict).
//! - Mixed (`clusters/wireguard-mixed.yaml`: node1 sluice, node2 the kernel's vxlan over
//!   wireguard-go): sluice initiates at start; wireguard-go initiates once its peer is removed
//!   and re-added (its sessions gone); an agent restart handshakes again; traffic resumes after
//!   each.
//! - Wrong key: node1's agent reads a copy of the mixed file in which node2's public key is not
//!   wireguard-go's: no session either way; strict drops pod traffic as `wg_no_session`, non
//!   strict sends it in clear VXLAN (it reaches node2's pod; the replies stay in wireguard-go).
//! - Strict mode on two sluice nodes: encrypted traffic flows, clear VXLAN from node2's address
//!   is dropped as `wg_cleartext`.
//!
//! Root only; build the binaries first (`cargo build -p control --bins`); needs Debian's
//! `wireguard-go` and `wireguard-tools` for the mixed tests. Every test brings up its own
//! instance (unique name: pid + counter) under a temporary state root, and the `Testbed` drop
//! removes everything (agents and wireguard-go stopped by pid), also when a test panics. Tests
//! hold [`SERIAL`] (two nodes' worth of traffic on 2 vCPUs); every command runs under `timeout`,
//! every wait is bounded.
use std::{
    net::Ipv4Addr,
    process::Command,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use control::status::{Status, WgPeerStatus, WgStatus};
use testbed::{names::Names, wireguard::WG_PORT, Encryption, NodeKind, Testbed};

mod common;
use common::{
    cluster, drops, hold, in_node, in_pod, inspect_fabric, ping_within, pod_ip, python,
    require_root, settled_status, status_when, tcp_transfer, text, timed, try_ping_within,
    udp_datagrams, unexpected_drops, Env, FabricCapture, Proc, MAX_PAYLOAD_PER_PACKET,
};

/// Instance names here are `g{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'g';
const NODE1: &str = "node1";
const NODE2: &str = "node2";
const POD_A1: &str = "default/pod-a1";
const POD_B1: &str = "default/pod-b1";
const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
const WIREGUARD: &str = "wireguard.yaml";
const MIXED: &str = "wireguard-mixed.yaml";
/// node1's and node2's public keys in `clusters/wireguard-mixed.yaml`.
const MIXED_NODE1_PUBLIC: &str = "4BFAjuptqOrSN7p6xq/wXGh2FlB2EhwsrKxHs/g0byY=";
const MIXED_NODE2_PUBLIC: &str = "cJ6wwy3ztYMbqm2Ydg9w9nh8D7NRJEfojEOmDz8VD3g=";
/// A valid public key that is nobody's in the mixed file (node2's in `wireguard.yaml`).
const STRANGER_PUBLIC: &str = "+1HBB8avFFxPdmma/CYyzkkGlRmq6s1ekHOrSdeRmkM=";
/// The VXLAN port and VNI of every node (sluice's and the kernel nodes' defaults).
const VXLAN_PORT: u16 = 8472;
/// The first packet waits for ARP and the first handshake.
const FIRST_PING_WITHIN: Duration = Duration::from_secs(15);
/// How long a handshake may take once a side wants one (wireguard-go retries every 5 s).
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(12);
/// `latest_handshake_s_ago` right after a handshake we caused.
const FRESH_S: u64 = 3;
/// 16 bytes, the most `ping -p` repeats.
const MARKER: &[u8; 16] = b"sluice-wg-marker";
/// TCP bytes each way.
const TCP_BYTES: u64 = 2 * 1024 * 1024;
/// UDP datagrams each way (1000 bytes each).
const DATAGRAMS: u64 = 200;
/// Pings with the marker each way.
const PINGS: u64 = 5;

/// Two nodes' worth of traffic (and wireguard-go): one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// What the agents and wireguard-go say.

/// `sluice wg peers --state-dir STATE --json` for `node`'s agent, decoded.
fn wg_peers(tb: &Testbed, node: &str) -> WgStatus {
    let state_dir = tb.node(node).expect("node").state_dir.display().to_string();
    let bin = testbed::find_next_to_exe(testbed::SLUICE_BIN_NAME);
    let bin = bin.display().to_string();
    let argv = timed(
        "15",
        &[&bin, "wg", "peers", "--state-dir", &state_dir, "--json"],
    );
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("run sluice wg peers");
    assert!(
        out.status.success(),
        "sluice wg peers on {node}:\n{}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sluice wg peers --json on {node} is not a WgStatus ({e}):\n{}",
            text(&out)
        )
    })
}

fn peer<'a>(w: &'a WgStatus, node: &str) -> &'a WgPeerStatus {
    w.peers
        .iter()
        .find(|p| p.node == node)
        .unwrap_or_else(|| panic!("no peer {node} in {w:?}"))
}

/// Polls `node`'s `sluice wg peers` until `done` holds (bounded); returns the last answer.
fn wg_peers_when(
    tb: &Testbed,
    node: &str,
    within: Duration,
    done: impl Fn(&WgStatus) -> bool,
) -> WgStatus {
    let deadline = Instant::now() + within;
    loop {
        let w = wg_peers(tb, node);
        if done(&w) || Instant::now() >= deadline {
            return w;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for `node`'s agent to have a session with `with` and asserts that its handshake
/// happened after `since` (give or take a second of rounding).
fn assert_session(tb: &Testbed, node: &str, with: &str, since: Instant) -> WgStatus {
    let w = wg_peers_when(tb, node, HANDSHAKE_WITHIN, |w| {
        let p = peer(w, with);
        p.has_session && p.latest_handshake_s_ago.is_some()
    });
    let p = peer(&w, with);
    let max_age = since.elapsed().as_secs() + 1;
    assert!(
        p.has_session && p.latest_handshake_s_ago.is_some_and(|s| s <= max_age),
        "{node} has no session with {with} from the last {max_age} s: {w:?}"
    );
    w
}

/// A worker counter summed over workers.
fn total(s: &Status, name: &str) -> u64 {
    s.totals
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("status has no counter {name:?}: {:?}", s.totals))
}

/// Growth of counter `name` between two readings.
fn grew(before: &Status, after: &Status, name: &str) -> u64 {
    total(after, name) - total(before, name)
}

fn tunnel_ifname(tb: &Testbed, node: &str) -> String {
    tb.node(node)
        .expect("node")
        .wireguard
        .as_ref()
        .unwrap_or_else(|| panic!("{node} has no wireguard-go recorded"))
        .ifname
        .clone()
}

/// `wg show IFNAME latest-handshakes` on the wireguard-go node: unix seconds of the latest
/// handshake with `peer_key` (0: never).
fn wg_go_handshake(tb: &Testbed, node: &str, peer_key: &str) -> u64 {
    let ifname = tunnel_ifname(tb, node);
    let out = in_node(tb, node, &["wg", "show", &ifname, "latest-handshakes"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(key, _)| *key == peer_key)
        .and_then(|(_, at)| at.trim().parse().ok())
        .unwrap_or_else(|| panic!("`wg show {ifname}` on {node} lists no {peer_key}: {listing}"))
}

/// Polls wireguard-go's latest handshake with `peer_key` until it is later than `after`.
fn wg_go_handshake_after(tb: &Testbed, node: &str, peer_key: &str, after: u64) -> u64 {
    let deadline = Instant::now() + HANDSHAKE_WITHIN;
    loop {
        let at = wg_go_handshake(tb, node, peer_key);
        if at > after || Instant::now() >= deadline {
            return at;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// `count` pings from the pod `from` to `to` with [`MARKER`] as payload; all must be answered.
fn marker_ping(tb: &Testbed, from: &str, to: &str, count: u64) {
    let pattern: String = MARKER.iter().map(|b| format!("{b:02x}")).collect();
    let (count, to_ip) = (count.to_string(), pod_ip(tb, to).to_string());
    let out = in_pod(
        tb,
        from,
        "20",
        &[
            "ping", "-n", "-c", &count, "-i", "0.2", "-W", "2", "-p", &pattern, &to_ip,
        ],
    );
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("{count} received")),
        "ping {from} -> {to} with the marker:\n{}",
        text(&out)
    );
}

/// Pings with the marker, [`TCP_BYTES`] of TCP and [`DATAGRAMS`] UDP datagrams, each both ways
/// between `a` and `b`; everything must arrive (UDP: 98 %). Returns the UDP datagrams received
/// by (b, a).
fn exchange(tb: &Testbed, a: &str, b: &str) -> (u64, u64) {
    marker_ping(tb, a, b, PINGS);
    marker_ping(tb, b, a, PINGS);
    assert_eq!(
        tcp_transfer(tb, a, b, TCP_BYTES),
        TCP_BYTES,
        "TCP {a} -> {b}"
    );
    assert_eq!(
        tcp_transfer(tb, b, a, TCP_BYTES),
        TCP_BYTES,
        "TCP {b} -> {a}"
    );
    let mut got = [0; 2];
    for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
        got[i] = udp_datagrams(tb, from, to, DATAGRAMS, 1000);
        assert!(
            got[i] * 100 >= DATAGRAMS * 98,
            "UDP {from} -> {to}: {} of {DATAGRAMS} datagrams arrived",
            got[i]
        );
    }
    (got[0], got[1])
}

/// The least number of packets one node sends to (and receives from) the other in [`exchange`]:
/// its pings and replies, its TCP data, the UDP that arrived.
fn exchange_packets_at_least(udp_out: u64) -> u64 {
    2 * PINGS + TCP_BYTES.div_ceil(MAX_PAYLOAD_PER_PACKET) + udp_out
}

fn capture_file(env: &Env, name: &str) -> std::path::PathBuf {
    env.dir.path().join(format!("{name}.frames"))
}

/// Node1's fabric veth (the bridge side of its uplink).
fn node1_fabric_veth(tb: &Testbed) -> String {
    Names::new(tb.instance()).fabric_veth(0)
}

/// Asserts that the fabric carried at least `at_least` WireGuard messages and nothing else
/// between the nodes, and no pod address or payload in clear.
fn assert_only_wireguard(frames: &[Vec<u8>], tb: &Testbed, at_least: u64) {
    let report = inspect_fabric(
        frames,
        (pod_ip(tb, POD_A1), pod_ip(tb, POD_B1)),
        (NODE1_IP, NODE2_IP),
        MARKER,
    );
    eprintln!(
        "fabric: {} frames, {} WireGuard, other IPv4 {:?}",
        frames.len(),
        report.wireguard,
        report.other_ipv4
    );
    assert!(
        report.wireguard as u64 >= at_least,
        "only {} WireGuard frames captured, want >= {at_least}",
        report.wireguard
    );
    assert!(
        report.other_ipv4.is_empty(),
        "IPv4 on the fabric other than UDP {WG_PORT} between the nodes: {:?}",
        report.other_ipv4
    );
    assert!(
        report.leaks.is_empty(),
        "clear text on the fabric: {:?}",
        report.leaks
    );
}

// ---------------------------------------------------------------------------------------------
// Clear VXLAN from a node's address.

/// Sends argv[4] VXLAN packets (VNI 1) from a UDP socket bound to argv[1] to argv[2]:argv[3],
/// each carrying Ethernet (dst argv[7], src argv[8]) / IPv4 argv[5] -> argv[6] / UDP to port
/// argv[9] with the payload "SEQ argv[10]", 10 ms apart. Prints "sent".
const INJECT_VXLAN: &str = r#"
import socket, struct, sys, time
src, dst, vport, count, isrc, idst, dmac, smac, dport = sys.argv[1:10]
marker = sys.argv[10].encode()
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
for i in range(int(count)):
    payload = b"%d " % i + marker
    udp = struct.pack("!HHHH", 40000, int(dport), 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i + 1, 0, 64, 17, 0,
                     socket.inet_aton(isrc), socket.inet_aton(idst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00"
    vxlan = struct.pack("!II", 0x08000000, 1 << 8)
    s.sendto(vxlan + eth + ip + udp, (dst, int(vport)))
    time.sleep(0.01)
print("sent", flush=True)
"#;

/// Prints "ready", then counts datagrams on UDP port argv[1] that end in argv[2] until the
/// socket is quiet for argv[3] seconds; prints the count.
const MARKED_SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[3]))
marker = sys.argv[2].encode()
print("ready", flush=True)
n = 0
while True:
    try:
        b, _ = s.recvfrom(2048)
    except socket.timeout:
        break
    if b.endswith(marker):
        n += 1
print(n, flush=True)
"#;

/// The VTEP MAC sluice derives from a node address (`0a:58:` + the address).
fn vtep_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Sends `count` clear VXLAN packets from node2's address (a socket in node2's namespace) to
/// node1's VXLAN port, each carrying UDP from pod-b1 to pod-a1 port 5203; returns how many
/// reached a sink in pod-a1.
fn inject_clear_vxlan(tb: &Testbed, count: u32) -> u64 {
    let marker = "clear-vxlan-from-node2";
    let (sink, ready) = Proc::start_in_pod(
        tb,
        POD_A1,
        "30",
        &[python(), "-c", MARKED_SINK, "5203", marker, "2"],
    );
    assert_eq!(ready, "ready", "UDP sink in {POD_A1} did not start");
    let (node1, node2) = (NODE1_IP.to_string(), NODE2_IP.to_string());
    let (b1, a1) = (
        pod_ip(tb, POD_B1).to_string(),
        pod_ip(tb, POD_A1).to_string(),
    );
    let (port, count) = (VXLAN_PORT.to_string(), count.to_string());
    let (dmac, smac) = (vtep_mac(NODE1_IP), vtep_mac(NODE2_IP));
    let out = in_node(
        tb,
        NODE2,
        &[
            python(),
            "-c",
            INJECT_VXLAN,
            &node2,
            &node1,
            &port,
            &count,
            &b1,
            &a1,
            &dmac,
            &smac,
            "5203",
            marker,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent");
    let (rest, err, status) = sink.finish();
    rest.trim()
        .parse()
        .unwrap_or_else(|_| panic!("UDP sink output {rest:?} ({status}), stderr:\n{err}"))
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Test 1 with `workers` workers per agent.
fn two_sluice_nodes(workers: u32) {
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut opts = env.options(&cluster(WIREGUARD), workers);
    opts.encryption = Encryption::Wireguard;
    let started = Instant::now();
    let tb = env.up_with(opts);
    for node in [NODE1, NODE2] {
        assert_eq!(
            tb.node(node).expect("node").kind,
            NodeKind::Sluice,
            "{node}"
        );
    }

    // Both agents initiate at start: sessions before any pod traffic.
    for (node, other) in [(NODE1, NODE2), (NODE2, NODE1)] {
        let w = assert_session(&tb, node, other, started);
        assert_eq!(w.listen_port, WG_PORT, "{node}");
        assert!(!w.strict, "{node} is not strict");
        assert_eq!(w.peers.len(), 1, "{node}'s peers: {w:?}");
        assert_eq!(
            peer(&w, other).endpoint,
            format!("{}:{WG_PORT}", node_ip(other))
        );
    }
    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);

    let before = [settled_status(&tb, NODE1), settled_status(&tb, NODE2)];
    let peers_before = [wg_peers(&tb, NODE1), wg_peers(&tb, NODE2)];
    let capture = FabricCapture::start(&tb, &node1_fabric_veth(&tb), &capture_file(&env, "two"));
    let (udp_to_b, udp_to_a) = exchange(&tb, POD_A1, POD_B1);
    let frames = capture.stop();
    let after = [settled_status(&tb, NODE1), settled_status(&tb, NODE2)];

    // Counters: every packet one node sent to the other was sealed, every one it got opened.
    for (i, (node, other, udp_out, udp_in)) in [
        (NODE1, NODE2, udp_to_b, udp_to_a),
        (NODE2, NODE1, udp_to_a, udp_to_b),
    ]
    .into_iter()
    .enumerate()
    {
        let (b, a) = (&before[i], &after[i]);
        let encrypted = grew(b, a, "encrypted");
        let decrypted = grew(b, a, "decrypted");
        eprintln!(
            "{node} ({workers} workers): encrypted +{encrypted}, decrypted +{decrypted}, per \
             worker {:?}",
            a.workers
                .iter()
                .map(|w| w
                    .counters
                    .iter()
                    .filter(|(k, _)| k.ends_with("crypted"))
                    .collect())
                .collect::<Vec<Vec<_>>>()
        );
        assert!(
            encrypted >= exchange_packets_at_least(udp_out),
            "{node} encrypted only {encrypted} packets"
        );
        assert!(
            decrypted >= exchange_packets_at_least(udp_in),
            "{node} decrypted only {decrypted} packets"
        );
        assert_eq!(
            grew(b, a, "encapsulated"),
            encrypted,
            "{node}: every VXLAN packet to {other} was sealed"
        );
        assert_eq!(a.workers.len(), workers as usize, "{node}'s workers");
        let unexpected = unexpected_drops(b, a, &[]);
        assert!(unexpected.is_empty(), "{node} dropped {unexpected:?}");
        let w = a
            .wireguard
            .as_ref()
            .expect("status has a wireguard section");
        let (p0, p1) = (peer(&peers_before[i], other), peer(w, other));
        assert!(
            p1.tx_packets - p0.tx_packets >= encrypted
                && p1.rx_packets - p0.rx_packets >= decrypted,
            "{node}'s peer counters did not follow the workers' ({encrypted} sealed, {decrypted} \
             opened): {p0:?} -> {p1:?}"
        );
    }
    assert_only_wireguard(
        &frames,
        &tb,
        exchange_packets_at_least(udp_to_b) + exchange_packets_at_least(udp_to_a),
    );

    // Not strict: a clear VXLAN packet from node2's address is still accepted and delivered.
    let before = settled_status(&tb, NODE1);
    let delivered = inject_clear_vxlan(&tb, 10);
    let after = settled_status(&tb, NODE1);
    assert_eq!(
        delivered, 10,
        "clear VXLAN from node2 reaches pod-a1 when not strict"
    );
    assert_eq!(
        drops(&after, "wg_cleartext") - drops(&before, "wg_cleartext"),
        0
    );
    assert!(grew(&before, &after, "decapsulated") >= 10);
}

fn node_ip(node: &str) -> Ipv4Addr {
    if node == NODE1 {
        NODE1_IP
    } else {
        NODE2_IP
    }
}

#[test]
fn two_sluice_nodes_one_worker_encrypt_everything_between_them() {
    require_root!();
    two_sluice_nodes(1);
}

#[test]
fn two_sluice_nodes_two_workers_encrypt_everything_between_them() {
    require_root!();
    two_sluice_nodes(2);
}

#[test]
fn sluice_and_wireguard_go_handshake_from_either_side_and_carry_traffic() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut opts = env.options(&cluster(MIXED), 1);
    opts.encryption = Encryption::Wireguard;
    let started = Instant::now();
    let mut tb = env.up_with(opts);
    assert_eq!(
        tb.node(NODE2).expect("node2").kind,
        NodeKind::KernelWireguard
    );
    let wg2 = tunnel_ifname(&tb, NODE2);

    // (a) sluice initiates at start: a session before any pod traffic, on both sides.
    let w = assert_session(&tb, NODE1, NODE2, started);
    assert!(w.initiations_sent >= 1, "{w:?}");
    assert_eq!(peer(&w, NODE2).public_key, MIXED_NODE2_PUBLIC);
    let first = wg_go_handshake_after(&tb, NODE2, MIXED_NODE1_PUBLIC, 0);
    assert!(
        first > 0,
        "wireguard-go on node2 saw no handshake from sluice"
    );

    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    let before = settled_status(&tb, NODE1);
    let capture = FabricCapture::start(&tb, &node1_fabric_veth(&tb), &capture_file(&env, "mixed"));
    let (udp_to_b, udp_to_a) = exchange(&tb, POD_A1, POD_B1);
    let frames = capture.stop();
    let after = settled_status(&tb, NODE1);
    let encrypted = grew(&before, &after, "encrypted");
    let decrypted = grew(&before, &after, "decrypted");
    eprintln!("node1: encrypted +{encrypted}, decrypted +{decrypted}");
    assert!(
        encrypted >= exchange_packets_at_least(udp_to_b),
        "{encrypted}"
    );
    assert!(
        decrypted >= exchange_packets_at_least(udp_to_a),
        "{decrypted}"
    );
    assert_eq!(grew(&before, &after, "encapsulated"), encrypted);
    let unexpected = unexpected_drops(&before, &after, &[]);
    assert!(unexpected.is_empty(), "node1 dropped {unexpected:?}");
    assert_only_wireguard(
        &frames,
        &tb,
        exchange_packets_at_least(udp_to_b) + exchange_packets_at_least(udp_to_a),
    );

    // (b) wireguard-go initiates: removing and re-adding its peer drops its sessions, so the
    // next packet from node2's pod makes it send an initiation; sluice only answers.
    thread::sleep(Duration::from_millis(1100)); // `wg show` counts whole seconds
    let w0 = wg_peers(&tb, NODE1);
    in_node(
        &tb,
        NODE2,
        &["wg", "set", &wg2, "peer", MIXED_NODE1_PUBLIC, "remove"],
    );
    let endpoint = format!("{NODE1_IP}:{WG_PORT}");
    let allowed = format!("{NODE1_IP}/32");
    in_node(
        &tb,
        NODE2,
        &[
            "wg",
            "set",
            &wg2,
            "peer",
            MIXED_NODE1_PUBLIC,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ],
    );
    assert_eq!(
        wg_go_handshake(&tb, NODE2, MIXED_NODE1_PUBLIC),
        0,
        "re-added peer starts without a session"
    );
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);
    let second = wg_go_handshake_after(&tb, NODE2, MIXED_NODE1_PUBLIC, first);
    assert!(
        second > first,
        "no new handshake on node2 ({first} -> {second})"
    );
    let w1 = wg_peers_when(&tb, NODE1, HANDSHAKE_WITHIN, |w| {
        w.handshakes_completed > w0.handshakes_completed
    });
    assert!(
        w1.handshakes_completed > w0.handshakes_completed,
        "sluice completed no handshake: {w0:?} -> {w1:?}"
    );
    assert_eq!(
        w1.initiations_sent, w0.initiations_sent,
        "wireguard-go initiated, sluice only responded"
    );
    let p = peer(&w1, NODE2);
    assert!(
        p.has_session && p.latest_handshake_s_ago.is_some_and(|s| s <= FRESH_S),
        "{p:?}"
    );
    marker_ping(&tb, POD_A1, POD_B1, 3);
    assert_eq!(udp_datagrams(&tb, POD_B1, POD_A1, 50, 500), 50);

    // (c) The agent restarts (sessions lost with it); node2's pod sent traffic before it
    // stops. The new agent handshakes again and traffic resumes both ways.
    marker_ping(&tb, POD_B1, POD_A1, 2);
    thread::sleep(Duration::from_millis(1100));
    tb.stop_agent(NODE1, libc::SIGTERM)
        .expect("stop node1's agent");
    let restarted = Instant::now();
    tb.start_agent(NODE1).expect("start node1's agent again");
    let w2 = assert_session(&tb, NODE1, NODE2, restarted);
    let third = wg_go_handshake_after(&tb, NODE2, MIXED_NODE1_PUBLIC, second);
    assert!(
        third > second,
        "no handshake after the restart ({second} -> {third})"
    );
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);
    marker_ping(&tb, POD_A1, POD_B1, 3);
    assert_eq!(tcp_transfer(&tb, POD_B1, POD_A1, 256 * 1024), 256 * 1024);
    let after = wg_peers(&tb, NODE1);
    assert!(
        peer(&after, NODE2).rx_packets > peer(&w2, NODE2).rx_packets,
        "{after:?}"
    );
}

/// `clusters/wireguard-mixed.yaml` for node1's agent with node2's public key replaced by one
/// that wireguard-go does not have; the testbed itself builds from the real file.
fn wrong_key_env(strict: bool) -> (Env, testbed::UpOptions) {
    let env = Env::new();
    let yaml = std::fs::read_to_string(cluster(MIXED)).expect("read the mixed cluster file");
    assert_eq!(yaml.matches(MIXED_NODE2_PUBLIC).count(), 1);
    let agent_file = env.dir.path().join("node1-view.yaml");
    std::fs::write(
        &agent_file,
        yaml.replace(MIXED_NODE2_PUBLIC, STRANGER_PUBLIC),
    )
    .expect("write node1's view");
    let mut opts = env.options(&cluster(MIXED), 1);
    opts.encryption = Encryption::Wireguard;
    opts.agent_cluster_files.insert(NODE1.into(), agent_file);
    if strict {
        opts.agent_args.push("--wg-strict".into());
    }
    (env, opts)
}

/// No session either way with the wrong key; returns node1's WireGuard status after both sides
/// tried.
fn assert_no_session(tb: &Testbed) -> WgStatus {
    // sluice's initiations go to a key wireguard-go does not have...
    let w = wg_peers_when(tb, NODE1, HANDSHAKE_WITHIN, |w| w.initiations_sent >= 1);
    assert!(w.initiations_sent >= 1, "{w:?}");
    assert_eq!(peer(&w, NODE2).public_key, STRANGER_PUBLIC);
    // ...and wireguard-go's (triggered by node2's pod) come from a key sluice does not know.
    let _ = try_ping_within(tb, POD_B1, POD_A1, Duration::from_secs(1));
    let w = wg_peers_when(tb, NODE1, HANDSHAKE_WITHIN, |w| w.handshake_failures >= 1);
    eprintln!("node1 with the wrong key for node2: {w:?}");
    assert!(
        w.handshake_failures >= 1,
        "wireguard-go's initiation refused: {w:?}"
    );
    assert_eq!(w.handshakes_completed, 0, "{w:?}");
    let p = peer(&w, NODE2);
    assert!(
        !p.has_session && p.latest_handshake_s_ago.is_none(),
        "{p:?}"
    );
    assert_eq!(
        wg_go_handshake(tb, NODE2, MIXED_NODE1_PUBLIC),
        0,
        "node2 never handshook"
    );
    w
}

#[test]
fn wrong_key_gives_no_session_strict_drops_and_non_strict_sends_in_clear() {
    require_root!();
    let _serial = hold(&SERIAL);

    // Strict: pod traffic to node2 is dropped and counted, nothing crosses the fabric.
    let (env, opts) = wrong_key_env(true);
    let tb = env.up_with(opts);
    let w = assert_no_session(&tb);
    assert!(w.strict);
    // A first round lets node1's workers resolve node2's MAC (until then a packet to node2 is
    // dropped as neighbor_unresolved, before the session check).
    assert_eq!(udp_datagrams(&tb, POD_A1, POD_B1, 10, 100), 0);
    let before = settled_status(&tb, NODE1);
    let capture = FabricCapture::start(&tb, &node1_fabric_veth(&tb), &capture_file(&env, "strict"));
    let got = udp_datagrams(&tb, POD_A1, POD_B1, 50, 1000);
    let frames = capture.stop();
    let after = settled_status(&tb, NODE1);
    assert_eq!(got, 0, "strict: nothing reaches node2 without a session");
    assert_eq!(
        unexpected_drops(&before, &after, &[]),
        vec![("wg_no_session".to_string(), 50)],
        "strict: every datagram to node2 dropped as wg_no_session, nothing else"
    );
    assert_eq!(grew(&before, &after, "encapsulated"), 0);
    assert_eq!(grew(&before, &after, "encrypted"), 0);
    let report = inspect_fabric(
        &frames,
        (pod_ip(&tb, POD_A1), pod_ip(&tb, POD_B1)),
        (NODE1_IP, NODE2_IP),
        MARKER,
    );
    assert_eq!(report.clear_vxlan, 0, "{report:?}");
    assert!(report.leaks.is_empty(), "{report:?}");
    drop(tb);

    // Not strict: node1 sends its pods' packets in clear VXLAN (they reach pod-b1); node2's
    // kernel routes the replies into wireguard-go, which has no session: they never arrive.
    let (env, opts) = wrong_key_env(false);
    let tb = env.up_with(opts);
    let w = assert_no_session(&tb);
    assert!(!w.strict);
    // As above: node1's workers resolve node2's MAC first.
    let warm_up = udp_datagrams(&tb, POD_A1, POD_B1, 10, 100);
    assert!(warm_up > 0, "no clear datagram reached node2 at all");
    let before = settled_status(&tb, NODE1);
    let capture = FabricCapture::start(&tb, &node1_fabric_veth(&tb), &capture_file(&env, "clear"));
    let to_b = udp_datagrams(&tb, POD_A1, POD_B1, 50, 1000);
    let to_a = udp_datagrams(&tb, POD_B1, POD_A1, 50, 1000);
    let frames = capture.stop();
    let after = settled_status(&tb, NODE1);
    eprintln!("not strict, wrong key: a1 -> b1 {to_b} of 50, b1 -> a1 {to_a} of 50");
    assert_eq!(to_b, 50, "clear VXLAN from sluice reaches the kernel node");
    assert_eq!(to_a, 0, "wireguard-go without a session sends nothing");
    let unexpected = unexpected_drops(&before, &after, &[]);
    assert!(
        unexpected.is_empty(),
        "not strict: node1 dropped {unexpected:?}"
    );
    assert!(grew(&before, &after, "encapsulated") >= 50);
    assert_eq!(grew(&before, &after, "encrypted"), 0);
    let report = inspect_fabric(
        &frames,
        (pod_ip(&tb, POD_A1), pod_ip(&tb, POD_B1)),
        (NODE1_IP, NODE2_IP),
        MARKER,
    );
    assert!(report.clear_vxlan >= 50, "{report:?}");
    assert!(
        report
            .leaks
            .iter()
            .any(|l| l.ends_with("pod address pair a->b"))
            && report.leaks.iter().any(|l| l.ends_with("UDP payload")),
        "the clear VXLAN shows the pods and the payload: {report:?}"
    );
}

#[test]
fn strict_mode_encrypts_and_drops_clear_vxlan_from_a_peer() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut opts = env.options(&cluster(WIREGUARD), 1);
    opts.encryption = Encryption::Wireguard;
    opts.agent_args.push("--wg-strict".into());
    let started = Instant::now();
    let tb = env.up_with(opts);
    for (node, other) in [(NODE1, NODE2), (NODE2, NODE1)] {
        let w = assert_session(&tb, node, other, started);
        assert!(w.strict, "{node} runs strict");
    }
    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);

    let before = settled_status(&tb, NODE1);
    marker_ping(&tb, POD_A1, POD_B1, PINGS);
    assert_eq!(tcp_transfer(&tb, POD_B1, POD_A1, 512 * 1024), 512 * 1024);
    let after = settled_status(&tb, NODE1);
    assert!(grew(&before, &after, "encrypted") >= PINGS);
    assert!(grew(&before, &after, "decrypted") >= PINGS + (512 * 1024 / MAX_PAYLOAD_PER_PACKET));
    assert_eq!(
        drops(&after, "wg_no_session"),
        drops(&before, "wg_no_session")
    );

    let before = after;
    let delivered = inject_clear_vxlan(&tb, 10);
    let after = status_when(&tb, NODE1, Duration::from_secs(5), |s| {
        drops(s, "wg_cleartext") >= drops(&before, "wg_cleartext") + 10
    });
    assert_eq!(
        delivered, 0,
        "strict: clear VXLAN from node2 is not delivered"
    );
    assert_eq!(
        drops(&after, "wg_cleartext") - drops(&before, "wg_cleartext"),
        10,
        "every clear VXLAN packet counted once as wg_cleartext"
    );
    assert_eq!(grew(&before, &after, "decapsulated"), 0);
    // Encrypted traffic still flows.
    marker_ping(&tb, POD_B1, POD_A1, 2);
}
