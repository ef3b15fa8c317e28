//! The kernel baseline for Services, end to end (root): a kernel-mode testbed of
//! `testbed/clusters/services.yaml` with kube-proxy-shaped nftables rules in both node
//! namespaces (`testbed::kernel::install_services`), and real exchanges through them:
//! - TCP to the `web` ClusterIP reaches backends on both nodes (distribution observed), UDP to
//!   its named `dns` port is answered;
//! - the Service without endpoints is rejected (connection refused, not a timeout);
//! - NodePort (`externalTrafficPolicy: Cluster`) from the external client reaches a backend;
//!   the LoadBalancer IP (`Local`) sent to node1 reaches only node1's backend.
//!
//! Every process is started by this test and bounded by `timeout`; the testbed (namespaces,
//! veths) is torn down when its handle drops, also on panic; the state root is a directory of
//! this process, removed on drop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testbed::{Mode, Testbed, UpOptions};

const WEB_CLUSTER_IP: &str = "10.96.1.10";
const NOTHING_CLUSTER_IP: &str = "10.96.1.14";
const LB_IP: &str = "192.168.100.10";
const NODE1_IP: &str = "172.18.0.11";

struct StateRoot(PathBuf);

impl StateRoot {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-perf-svc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("state root");
        Self(dir)
    }
}

impl Drop for StateRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process started by this test, killed by its pid on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Answers every TCP connection on 8080 and every UDP datagram on 5353 with `name`, for at most
/// 30 s.
const SERVER: &str = r#"
import socket, sys, threading, time
name = sys.argv[1].encode()
deadline = time.time() + 30
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353)); s.settimeout(0.5)
    while time.time() < deadline:
        try:
            _, peer = s.recvfrom(2048); s.sendto(name, peer)
        except socket.timeout:
            pass
threading.Thread(target=udp, daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(64); t.settimeout(0.5)
while time.time() < deadline:
    try:
        c, _ = t.accept()
    except socket.timeout:
        continue
    c.sendall(name); c.close()
"#;

/// `python3 CLIENT MODE ADDR PORT COUNT`: prints one line per attempt, the answer or the error
/// class. Retries refused attempts during the first 5 s (servers starting) unless the sixth
/// argument is `no-retry`.
const CLIENT: &str = r#"
import socket, sys, time
mode, addr, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def once():
    if mode == "tcp":
        s = socket.create_connection((addr, port), timeout=2)
        data = s.recv(100); s.close(); return data.decode()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.sendto(b"q", (addr, port)); data, _ = s.recvfrom(100); s.close(); return data.decode()
start = time.time()
for i in range(count):
    while True:
        try:
            print(once()); break
        except ConnectionRefusedError:
            if sys.argv[5:] != ["no-retry"] and time.time() - start < 5:
                time.sleep(0.1); continue
            print("refused"); break
        except socket.timeout:
            print("timeout"); break
        except OSError as e:
            print("error:%s" % e.errno); break
sys.stdout.flush()
"#;

fn answers(out: std::process::Output) -> BTreeMap<String, usize> {
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        *counts.entry(line.trim().to_string()).or_insert(0) += 1;
    }
    counts
}

fn client_argv<'a>(mode: &'a str, addr: &'a str, port: &'a str, count: &'a str) -> Vec<&'a str> {
    vec![
        "timeout",
        "60",
        python(),
        "-c",
        CLIENT,
        mode,
        addr,
        port,
        count,
    ]
}

#[test]
fn kernel_services_answer_clusterip_nodeport_and_loadbalancer() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    let root = StateRoot::new();
    let cluster =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters/services.yaml");
    let mut opts = UpOptions::new(&cluster);
    if !opts.cni_bin.is_file() {
        eprintln!(
            "skipping: {} missing (cargo build -p control --bin sluice-cni)",
            opts.cni_bin.display()
        );
        return;
    }
    opts.mode = Mode::Kernel;
    opts.state_root = root.0.clone();
    opts.instance = Some(format!("psvc-{}", std::process::id()));
    let tb = Testbed::up(opts).expect("kernel-mode testbed of services.yaml");

    // The file's podIPs are what the CNI hands out, so agents reading the file agree.
    let file = control::cluster::load_file(&cluster).expect("services.yaml parses");
    for pod in &file.pods {
        let key = control::cluster::ClusterState::pod_key(pod);
        let in_file = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let built = tb.pod(&key).expect("pod exists").ip.to_string();
        assert_eq!(in_file.as_deref(), Some(built.as_str()), "{key}");
    }
    let loaded = testbed::kernel::install_services(&tb).expect("nftables rules load");
    let nodes: Vec<&str> = loaded.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["node1", "node2"]);
    for n in &loaded {
        let listed = testbed::nft::list(&n.netns).expect("nft list");
        assert!(listed.contains("map service-ips"), "{listed}");
        assert!(
            listed.contains(&format!("{WEB_CLUSTER_IP} . tcp . 80")),
            "{listed}"
        );
        // The plan used the addresses the CNI gave the pods.
        let web2 = tb.pod("default/web-2").expect("web-2").ip;
        assert!(listed.contains(&format!("dnat to {web2}:8080")), "{listed}");
    }

    let mut servers = Vec::new();
    for pod in ["default/web-1", "default/web-2"] {
        let name = pod.trim_start_matches("default/");
        let mut cmd = tb
            .pod_command(pod, &["timeout", "40", python(), "-c", SERVER, name])
            .expect("server command");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        servers.push(Server(cmd.spawn().expect("server starts")));
    }
    let started = Instant::now();
    // Both servers listen before anything goes through the Service.
    for pod in ["default/web-1", "default/web-2"] {
        let ip = tb.pod(pod).expect("pod").ip.to_string();
        let ready = answers(
            tb.exec_in_pod("default/client", &client_argv("tcp", &ip, "8080", "1"))
                .expect("client runs"),
        );
        assert_eq!(
            ready.get(pod.trim_start_matches("default/")),
            Some(&1),
            "{pod} at {ip}:8080 never answered: {ready:?}"
        );
    }

    // ClusterIP, TCP: both nodes' backends answer.
    let tcp = answers(
        tb.exec_in_pod(
            "default/client",
            &client_argv("tcp", WEB_CLUSTER_IP, "80", "40"),
        )
        .expect("client runs"),
    );
    assert_eq!(
        tcp.keys().cloned().collect::<Vec<_>>(),
        ["web-1", "web-2"],
        "40 connections to {WEB_CLUSTER_IP}:80: {tcp:?}"
    );
    // ClusterIP, UDP, named targetPort (dns -> 5353).
    let udp = answers(
        tb.exec_in_pod(
            "default/client",
            &client_argv("udp", WEB_CLUSTER_IP, "53", "10"),
        )
        .expect("client runs"),
    );
    assert_eq!(
        udp.iter()
            .filter(|(k, _)| k.starts_with("web-"))
            .map(|(_, v)| v)
            .sum::<usize>(),
        10,
        "{udp:?}"
    );
    // No endpoints: rejected at once (ICMP port unreachable -> refused), not a timeout.
    let mut argv = client_argv("tcp", NOTHING_CLUSTER_IP, "80", "3");
    argv.push("no-retry");
    let nothing = answers(
        tb.exec_in_pod("default/client", &argv)
            .expect("client runs"),
    );
    assert_eq!(nothing.get("refused"), Some(&3), "{nothing:?}");

    // NodePort from outside (externalTrafficPolicy Cluster): some backend answers.
    let nodeport = answers(
        tb.exec_in_external(&client_argv("tcp", NODE1_IP, "30080", "20"))
            .expect("external client runs"),
    );
    assert_eq!(
        nodeport
            .iter()
            .filter(|(k, _)| k.starts_with("web-"))
            .map(|(_, v)| v)
            .sum::<usize>(),
        20,
        "{nodeport:?}"
    );
    // LoadBalancer IP routed to node1 (externalTrafficPolicy Local): node1's backend only.
    let route = tb
        .exec_in_external(&[
            "ip",
            "route",
            "replace",
            &format!("{LB_IP}/32"),
            "via",
            NODE1_IP,
        ])
        .expect("ip runs");
    assert!(route.status.success(), "{route:?}");
    let lb = answers(
        tb.exec_in_external(&client_argv("tcp", LB_IP, "80", "20"))
            .expect("external client runs"),
    );
    assert_eq!(lb.get("web-1"), Some(&20), "{lb:?}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the checks outlived the servers' bound"
    );
    drop(servers);
    tb.down().expect("testbed down");
}
