//! The testbed's WireGuard pieces (issue 7, part 6): `kernel-wireguard` nodes, the kernel's vxlan
//! device carried by a wireguard-go tunnel configured with `wg` (testbed `wireguard` module), and
//! the node keys of the cluster file (`clusters/wireguard.yaml`).
//!
//! Root only (and the CNI plugin built: `cargo build -p control --bin sluice-cni`); needs Debian's
//! `wireguard-go` and `wireguard-tools`. Every test brings up its own instance under a unique
//! name (pid + counter) and a temporary state root; the `Testbed` drop stops wireguard-go (by pid)
//! and removes everything, also when a test panics. Tests hold [`SERIAL`]; every command runs
//! under `timeout`, the capture has its own deadline.
//!
//! The sluice side (`--encryption wireguard` agents, `clusters/wireguard-mixed.yaml`) is not
//! tested here: it needs the agents' WireGuard data path.
use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    sync::Mutex,
    time::{Duration, Instant},
};

use testbed::{names::Names, wireguard, Encryption, NodeKind, Testbed, TestbedError, UpOptions};

mod common;
use common::{
    cluster, hold, in_node, in_pod, inspect_fabric, ping_within, pod_ip, require_root,
    tcp_transfer, text, udp_datagrams, Env, FabricCapture,
};

/// Instance names here are `w{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 'w';
const NODE1: &str = "node1";
const NODE2: &str = "node2";
const POD_A1: &str = "default/pod-a1";
const POD_B1: &str = "default/pod-b1";
const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
/// Keys of `clusters/wireguard.yaml`.
const NODE1_PRIVATE: &str = "IMtFMu88FJkTORctIv3UxbXBgmI94VGJBOplTqCTwlg=";
const NODE1_PUBLIC: &str = "F67yS5yg5sxofTAV8scCul69HAKGFpYLBa5wbwTvJH0=";
const NODE2_PUBLIC: &str = "+1HBB8avFFxPdmma/CYyzkkGlRmq6s1ekHOrSdeRmkM=";
const WIREGUARD: &str = "wireguard.yaml";
/// The first packet waits for ARP and the first handshake.
const FIRST_PING_WITHIN: Duration = Duration::from_secs(15);
/// 16 bytes, the most `ping -p` repeats.
const MARKER: &[u8; 16] = b"sluice-wg-marker";

/// Two nodes' worth of wireguard-go and traffic: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `clusters/wireguard.yaml` with both nodes annotated `kernel-wireguard`.
fn two_kernel_wireguard_nodes() -> Env {
    let yaml = std::fs::read_to_string(cluster(WIREGUARD)).expect("read wireguard.yaml");
    let keyed = "  annotations:\n    network.sluice.io/wg-pub-key";
    assert_eq!(yaml.matches(keyed).count(), 2, "both nodes have keys");
    let yaml = yaml.replace(
        keyed,
        "  annotations:\n    sluice.io/testbed-dataplane: kernel-wireguard\n    \
         network.sluice.io/wg-pub-key",
    );
    Env::with_cluster(&yaml)
}

fn tunnel(tb: &Testbed, node: &str) -> wireguard::Tunnel {
    tb.node(node)
        .expect("node")
        .wireguard
        .clone()
        .unwrap_or_else(|| panic!("{node} has no wireguard-go recorded"))
}

/// `ip route get` in a node, optionally with a mark: the output device.
fn route_dev(tb: &Testbed, node: &str, to: Ipv4Addr, mark: Option<&str>) -> String {
    let to = to.to_string();
    let mut argv = vec!["ip", "-o", "route", "get", &to];
    if let Some(mark) = mark {
        argv.extend(["mark", mark]);
    }
    let out = String::from_utf8_lossy(&in_node(tb, node, &argv).stdout).into_owned();
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "dev")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no dev in `ip route get {to}` on {node}: {out}"))
        .to_string()
}

/// `wg show IFNAME latest-handshakes` in `node`: (peer public key, unix seconds) per line.
fn latest_handshakes(tb: &Testbed, node: &str, ifname: &str) -> Vec<(String, u64)> {
    let out = in_node(tb, node, &["wg", "show", ifname, "latest-handshakes"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (key, seconds) = line.split_once('\t')?;
            Some((key.to_string(), seconds.trim().parse().ok()?))
        })
        .collect()
}

/// `count` pings from the pod `from` to `to` with [`MARKER`] as payload; all must be answered.
fn marker_ping(tb: &Testbed, from: &str, to: Ipv4Addr, count: u32) {
    let pattern: String = MARKER.iter().map(|b| format!("{b:02x}")).collect();
    let (count, to) = (count.to_string(), to.to_string());
    let out = in_pod(
        tb,
        from,
        "20",
        &[
            "ping", "-n", "-c", &count, "-i", "0.2", "-W", "2", "-p", &pattern, &to,
        ],
    );
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("{count} received")),
        "ping {from} -> {to} with the marker:\n{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn kernel_wireguard_nodes_carry_ping_tcp_udp_and_the_fabric_sees_only_wireguard() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = two_kernel_wireguard_nodes();
    let opts = env.kernel_options(&common::unique_instance());
    let tb = env.up_with(opts);

    // Nodes, keys and tunnels as the file says.
    let names = Names::new(tb.instance());
    let mut pids = Vec::new();
    for (index, node) in [NODE1, NODE2].into_iter().enumerate() {
        let handle = tb.node(node).expect("node");
        assert_eq!(handle.kind, NodeKind::KernelWireguard, "{node}");
        let t = tunnel(&tb, node);
        assert_eq!(t.ifname, names.wg_interface(index));
        let pid = t
            .pid
            .unwrap_or_else(|| panic!("{node}: no wireguard-go pid"));
        assert!(
            testbed::agent::runs_binary(pid, &t.bin),
            "{node}: pid {pid} runs {}",
            t.bin.display()
        );
        pids.push((pid, t.bin.clone(), wireguard::socket_path(&t.ifname)));
        let key_file = handle.state_dir.join("wireguard.key");
        let mode = std::fs::metadata(&key_file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
        let link = in_node(&tb, node, &["ip", "-j", "link", "show", &t.ifname]);
        let link: serde_json::Value = serde_json::from_slice(&link.stdout).expect("ip -j");
        assert_eq!(link[0]["mtu"], 1440, "{node}'s tunnel: {link}");
        let vx = in_node(
            &tb,
            node,
            &["ip", "-j", "link", "show", testbed::kernel::VXLAN_DEV],
        );
        let vx: serde_json::Value = serde_json::from_slice(&vx.stdout).expect("ip -j");
        assert_eq!(vx[0]["mtu"], 1390, "{node}'s vxlan device: {vx}");
        let pod_mtu = in_pod(
            &tb,
            if index == 0 { POD_A1 } else { POD_B1 },
            "10",
            &["cat", "/sys/class/net/eth0/mtu"],
        );
        assert_eq!(String::from_utf8_lossy(&pod_mtu.stdout).trim(), "1390");
    }
    let node1_key = std::fs::read_to_string(
        tb.node(NODE1)
            .expect("node1")
            .state_dir
            .join("wireguard.key"),
    )
    .expect("read node1's key");
    assert_eq!(node1_key, format!("{NODE1_PRIVATE}\n"));

    // Policy routing: the vxlan device's packets go into the tunnel, wireguard-go's out of eth0.
    let wg1 = tunnel(&tb, NODE1).ifname;
    assert_eq!(route_dev(&tb, NODE1, NODE2_IP, None), wg1);
    assert_eq!(
        route_dev(&tb, NODE1, NODE2_IP, Some(wireguard::FWMARK)),
        testbed::UPLINK
    );
    assert_eq!(
        route_dev(&tb, NODE2, NODE1_IP, None),
        tunnel(&tb, NODE2).ifname
    );

    // Before any traffic: no handshake yet.
    let before = latest_handshakes(&tb, NODE1, &wg1);
    assert_eq!(
        before,
        vec![(NODE2_PUBLIC.to_string(), 0)],
        "peer listed, no handshake yet"
    );

    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    for (node, peer) in [(NODE1, NODE2_PUBLIC), (NODE2, NODE1_PUBLIC)] {
        let ifname = tunnel(&tb, node).ifname;
        let seen = latest_handshakes(&tb, node, &ifname);
        assert!(
            seen.iter().any(|(key, at)| key == peer && *at > 0),
            "{node}: no handshake with {peer}: {seen:?}"
        );
    }

    // Traffic both ways while the fabric side of node1's uplink is captured.
    let capture_file = env.dir.path().join("fabric.frames");
    let capture = FabricCapture::start(&tb, &names.fabric_veth(0), &capture_file);
    let (a1, b1) = (pod_ip(&tb, POD_A1), pod_ip(&tb, POD_B1));
    marker_ping(&tb, POD_A1, b1, 5);
    let bytes = 256 * 1024;
    assert_eq!(
        tcp_transfer(&tb, POD_A1, POD_B1, bytes),
        bytes,
        "TCP a1 -> b1"
    );
    assert_eq!(
        tcp_transfer(&tb, POD_B1, POD_A1, bytes),
        bytes,
        "TCP b1 -> a1"
    );
    let datagrams = 200;
    for (from, to) in [(POD_A1, POD_B1), (POD_B1, POD_A1)] {
        let got = udp_datagrams(&tb, from, to, datagrams, 1000);
        assert!(
            got * 100 >= datagrams * 98,
            "UDP {from} -> {to}: {got} of {datagrams} datagrams arrived"
        );
    }
    let frames = capture.stop();

    let report = inspect_fabric(&frames, (a1, b1), (NODE1_IP, NODE2_IP), MARKER);
    eprintln!(
        "fabric: {} frames, {} WireGuard, other IPv4 {:?}",
        frames.len(),
        report.wireguard,
        report.other_ipv4
    );
    // At least the pings (10), the TCP data (2 x 256 KiB at < 1400 B a packet) and the UDP.
    let at_least = 10 + 2 * 256 * 1024 / 1400 + 2 * 196;
    assert!(
        report.wireguard >= at_least as usize,
        "only {} WireGuard frames captured, want >= {at_least}",
        report.wireguard
    );
    assert!(
        report.other_ipv4.is_empty(),
        "IPv4 on the fabric other than UDP {} between the nodes: {:?}",
        wireguard::WG_PORT,
        report.other_ipv4
    );
    assert!(
        report.leaks.is_empty(),
        "clear text on the fabric: {:?}",
        report.leaks
    );

    // Down stops wireguard-go (by pid) and removes its control socket.
    tb.down().expect("down");
    for (pid, bin, socket) in pids {
        assert!(
            !testbed::agent::runs_binary(pid, &bin),
            "wireguard-go {pid} still runs"
        );
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

#[test]
fn kernel_mode_with_wireguard_encryption_runs_every_node_over_wireguard_go() {
    require_root!();
    let _serial = hold(&SERIAL);
    let env = Env::new();
    let mut opts = env.kernel_options(&common::unique_instance());
    opts.cluster_file = cluster(WIREGUARD);
    opts.encryption = Encryption::Wireguard;
    let tb = env.up_with(opts);
    assert_eq!(tb.encryption(), Encryption::Wireguard);
    for node in [NODE1, NODE2] {
        assert_eq!(tb.node(node).expect("node").kind, NodeKind::KernelWireguard);
    }
    let wg2 = tunnel(&tb, NODE2).ifname;
    assert_eq!(route_dev(&tb, NODE2, NODE1_IP, None), wg2);
    ping_within(&tb, POD_B1, POD_A1, FIRST_PING_WITHIN);
    let seen = latest_handshakes(&tb, NODE2, &wg2);
    assert!(
        seen.iter().any(|(key, at)| key == NODE1_PUBLIC && *at > 0),
        "node2: no handshake with node1: {seen:?}"
    );
    // The same pair in kernel mode without encryption: plain kernel nodes, no tunnels, and the
    // capture check of the other test sees the clear VXLAN (so it can fail).
    drop(tb);
    let mut opts = env.kernel_options(&common::unique_instance());
    opts.cluster_file = cluster(WIREGUARD);
    let tb = env.up_with(opts);
    let node1 = tb.node(NODE1).expect("node1");
    assert_eq!(node1.kind, NodeKind::Kernel);
    assert_eq!(node1.wireguard, None);
    ping_within(&tb, POD_A1, POD_B1, FIRST_PING_WITHIN);
    let capture_file = env.dir.path().join("clear.frames");
    let capture = FabricCapture::start(
        &tb,
        &Names::new(tb.instance()).fabric_veth(0),
        &capture_file,
    );
    let (a1, b1) = (pod_ip(&tb, POD_A1), pod_ip(&tb, POD_B1));
    marker_ping(&tb, POD_A1, b1, 2);
    let report = inspect_fabric(&capture.stop(), (a1, b1), (NODE1_IP, NODE2_IP), MARKER);
    assert_eq!(report.wireguard, 0, "{report:?}");
    assert!(report.other_ipv4.len() >= 4, "clear VXLAN seen: {report:?}");
    for leak in [
        "pod address pair a->b",
        "pod address pair b->a",
        "ping marker",
    ] {
        assert!(
            report.leaks.iter().any(|l| l.ends_with(leak)),
            "{leak} not found in clear VXLAN: {report:?}"
        );
    }
}

#[test]
fn encryption_without_keys_is_refused_before_anything_is_built() {
    // No root needed: the keys are checked before anything is created.
    let env = Env::new();
    let mut opts = UpOptions::new(cluster("two-node.yaml"));
    opts.instance = Some(common::unique_instance());
    opts.state_root = env.state_root();
    opts.encryption = Encryption::Wireguard;
    let started = Instant::now();
    let err = Testbed::up(opts).err().expect("no keys in two-node.yaml");
    assert!(
        matches!(err, TestbedError::NoWgKey { ref node, kind: "sluice", .. } if node == "node1"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("node1") && message.contains("sluice.io/testbed-wg-private-key"),
        "{message}"
    );
    assert!(!env.state_root().exists(), "nothing created");
    assert!(started.elapsed() < Duration::from_secs(10));
}
