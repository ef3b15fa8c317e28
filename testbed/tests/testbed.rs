//! End-to-end tests of the testbed in kernel mode (no sluice agent) with the real `sluice-cni`
//! plugin. Root only. Build the plugin first: `cargo build -p control --bin sluice-cni`.
//!
//! Every test uses its own instance name (pid + counter) and its own state root, and removes
//! everything even when it panics (the `Testbed` drop, or an `InstanceGuard`).
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use testbed::{Mode, Testbed, TestbedError};

mod common;
use common::{require_root, unique_instance, Env};

/// Instance names here are `t{pid}n{counter}z`.
const INSTANCE_PREFIX: char = 't';

/// A Node document with one InternalIP.
fn node_doc(name: &str, pod_cidr: &str, ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Node
metadata:
  name: {name}
spec:
  podCIDR: {pod_cidr}
status:
  addresses:
    - type: InternalIP
      address: {ip}
"#
    )
}

/// A Pod document `namespace/name` bound to `node`.
fn pod_doc(namespace: &str, name: &str, node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
spec:
  nodeName: {node}
  containers:
    - name: c
      image: busybox
"#
    )
}

/// A Pod document like [`pod_doc`] whose file gives it `status.podIP: ip`.
fn pod_doc_at(namespace: &str, name: &str, node: &str, ip: &str) -> String {
    format!("{}status:\n  podIP: {ip}\n", pod_doc(namespace, name, node))
}

/// node1 (172.31.9.11) with default/pod-a and default/pod-b.
fn one_node() -> String {
    [
        node_doc("node1", "10.244.1.0/24", "172.31.9.11"),
        pod_doc("default", "pod-a", "node1"),
        pod_doc("default", "pod-b", "node1"),
    ]
    .join("---")
}

/// node1 (172.31.9.11) with default/pod-a, node2 (`node2_ip`) with other/pod-c.
fn two_nodes(node2_ip: &str) -> String {
    [
        node_doc("node1", "10.244.1.0/24", "172.31.9.11"),
        node_doc("node2", "10.244.2.0/24", node2_ip),
        pod_doc("default", "pod-a", "node1"),
        pod_doc("other", "pod-c", "node2"),
    ]
    .join("---")
}

/// A directory holding `yaml` as the cluster file (and the state root), and a unique instance
/// name for it.
fn kernel_case(yaml: &str) -> (Env, String) {
    (Env::with_cluster(yaml), unique_instance())
}

/// Tears an instance down on drop, for tests that `keep()` one.
struct InstanceGuard {
    state_root: PathBuf,
    instance: String,
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Ok(testbed) = Testbed::open(&self.state_root, &self.instance) {
            let _ = testbed.down();
        }
    }
}

fn namespaces_of(instance: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("sl-{instance}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn assert_nothing_left(instance: &str, state_root: &Path) {
    assert_eq!(
        namespaces_of(instance),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    assert!(
        !state_root.join(instance).exists(),
        "state directory left behind"
    );
}

fn ping(testbed: &Testbed, from: &str, to: std::net::Ipv4Addr) -> Output {
    testbed
        .exec_in_pod(from, &["ping", "-c", "3", "-W", "1", &to.to_string()])
        .expect("ping runs")
}

/// Asserts that `out` (of `what`) exited successfully, showing its stdout otherwise.
fn assert_succeeded(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn kernel_mode_pods_ping_each_other_and_down_leaves_nothing() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let testbed = Testbed::up(env.kernel_options(&instance)).expect("up");

    assert_eq!(testbed.nodes().len(), 1);
    let node = &testbed.nodes()[0];
    assert_eq!(node.netns, format!("sl-{instance}-node1"));
    assert_eq!(node.ip.to_string(), "172.31.9.11");
    let keys: Vec<&str> = testbed.pods().iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["default/pod-a", "default/pod-b"]);
    let a = testbed.pod("default/pod-a").expect("pod-a").clone();
    let b = testbed.pod("default/pod-b").expect("pod-b").clone();
    assert!(
        node.pod_cidr.contains(&a.ip) && node.pod_cidr.contains(&b.ip),
        "{a:?} {b:?}"
    );
    assert_ne!(a.ip, b.ip);
    assert_ne!(a.host_ifname, b.host_ifname);
    assert_eq!(
        testbed.external_ip().map(|ip| ip.to_string()).as_deref(),
        Some("172.31.9.250")
    );

    // Pod to pod through the node's kernel routing.
    let out = ping(&testbed, "default/pod-a", b.ip);
    assert_succeeded(&out, "ping pod-a -> pod-b");
    let out = ping(&testbed, "default/pod-b", a.ip);
    assert_succeeded(&out, "ping pod-b -> pod-a");
    // The fabric: the node reaches the external client.
    let out = testbed
        .exec_in_node("node1", &["ping", "-c", "1", "-W", "1", "172.31.9.250"])
        .expect("ping runs");
    assert_succeeded(&out, "node1 -> external");
    let out = testbed
        .exec_in_external(&["ping", "-c", "1", "-W", "1", "172.31.9.11"])
        .expect("runs");
    assert_succeeded(&out, "external -> node1");

    let root = env.state_root();
    assert!(root.join(&instance).join("state.json").is_file());
    testbed.down().expect("down");
    assert_nothing_left(&instance, &root);
}

#[test]
fn pods_get_their_file_address_and_the_others_an_ipam_pick() {
    require_root!();
    // a-picked sorts first and has no podIP: were it created first, the IPAM's first pick (.2)
    // would be the address b-at-2 asks for.
    let yaml = [
        node_doc("node1", "10.244.1.0/24", "172.31.9.11"),
        pod_doc("default", "a-picked", "node1"),
        pod_doc_at("default", "b-at-2", "node1", "10.244.1.2"),
        pod_doc_at("default", "c-at-10", "node1", "10.244.1.10"),
        // Outside node1's podCIDR: the IPAM picks, as a cluster's CNI would.
        pod_doc_at("default", "d-elsewhere", "node1", "10.244.9.9"),
    ]
    .join("---");
    let (env, instance) = kernel_case(&yaml);
    let testbed = Testbed::up(env.kernel_options(&instance)).expect("up");
    let listed: Vec<(&str, String)> = testbed
        .pods()
        .iter()
        .map(|p| (p.key.as_str(), p.ip.to_string()))
        .collect();
    // In the file's order; requests as given; the picks continue after the last request
    // (host-local's round-robin: a request moves last_reserved_ip).
    assert_eq!(
        listed,
        [
            ("default/a-picked", "10.244.1.11".to_string()),
            ("default/b-at-2", "10.244.1.2".to_string()),
            ("default/c-at-10", "10.244.1.10".to_string()),
            ("default/d-elsewhere", "10.244.1.12".to_string()),
        ]
    );
    // The addresses are real: on the pods' interfaces, and reachable.
    let out = testbed
        .exec_in_pod(
            "default/c-at-10",
            &["ip", "-4", "-o", "addr", "show", "eth0"],
        )
        .expect("ip addr runs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.244.1.10/32"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ping(
        &testbed,
        "default/b-at-2",
        "10.244.1.10".parse().expect("ip"),
    );
    assert_succeeded(&out, "ping b-at-2 -> c-at-10");
    let out = ping(
        &testbed,
        "default/a-picked",
        "10.244.1.2".parse().expect("ip"),
    );
    assert_succeeded(&out, "ping a-picked -> b-at-2");
    // The saved state (what `status` prints) has the same addresses.
    let root = env.state_root();
    let reopened = Testbed::open(&root, &instance).expect("open");
    let saved: Vec<(String, String)> = reopened
        .pods()
        .iter()
        .map(|p| (p.key.clone(), p.ip.to_string()))
        .collect();
    assert_eq!(
        saved,
        listed
            .iter()
            .map(|(k, ip)| (k.to_string(), ip.clone()))
            .collect::<Vec<_>>()
    );
    drop(reopened); // an opened handle does not tear down
    testbed.down().expect("down");
    assert_nothing_left(&instance, &root);
}

#[test]
fn a_file_address_the_cni_cannot_give_fails_before_anything_is_built() {
    require_root!();
    let yaml = [
        node_doc("node1", "10.244.1.0/24", "172.31.9.11"),
        pod_doc_at("default", "on-gateway", "node1", "10.244.1.1"),
    ]
    .join("---");
    let (env, instance) = kernel_case(&yaml);
    let Err(err) = Testbed::up(env.kernel_options(&instance)) else {
        panic!("up accepted a pod whose podIP is the gateway");
    };
    assert!(matches!(err, TestbedError::Plan(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("default/on-gateway")
            && text.contains("10.244.1.1")
            && text.contains("gateway"),
        "{text}"
    );
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn kernel_mode_routes_between_nodes_over_vxlan() {
    require_root!();
    let (env, instance) = kernel_case(&two_nodes("172.31.9.12"));
    let testbed = Testbed::up(env.kernel_options(&instance)).expect("up");
    let a = testbed.pod("default/pod-a").expect("pod-a").clone();
    let c = testbed.pod("other/pod-c").expect("pod-c").clone();
    assert_eq!((a.node.as_str(), c.node.as_str()), ("node1", "node2"));
    assert_eq!(c.netns, format!("sl-{instance}-node2-other-pod-c"));
    assert!(c.ip.to_string().starts_with("10.244.2."), "{c:?}");
    let out = ping(&testbed, "default/pod-a", c.ip);
    assert_succeeded(&out, "cross-node ping");
    let out = ping(&testbed, "other/pod-c", a.ip);
    assert_succeeded(&out, "cross-node ping back");
    // The packets went through the overlay device, not some other path.
    let out = testbed
        .exec_in_node(
            "node2",
            &["cat", "/sys/class/net/sluice-vx/statistics/rx_packets"],
        )
        .expect("cat runs");
    let rx: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a counter");
    assert!(rx >= 3, "node2's vxlan device received {rx} packets");
    testbed.down().expect("down");
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn nodes_outside_one_subnet_are_refused_before_anything_is_created() {
    require_root!();
    let (env, instance) = kernel_case(&two_nodes("172.31.10.12"));
    let err = Testbed::up(env.kernel_options(&instance))
        .err()
        .expect("two subnets");
    assert!(matches!(err, TestbedError::Plan(_)), "{err}");
    assert!(err.to_string().contains("node2"), "{err}");
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn failing_cni_leaves_nothing_behind() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let mut opts = env.kernel_options(&instance);
    opts.cni_bin = PathBuf::from("/bin/false");
    let err = Testbed::up(opts)
        .err()
        .expect("up with /bin/false as plugin fails");
    assert!(matches!(err, TestbedError::Cni(_)), "{err}");
    assert!(
        err.to_string().contains("default/pod-a"),
        "error names the pod: {err}"
    );
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn missing_plugin_is_refused_before_anything_is_created() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let mut opts = env.kernel_options(&instance);
    opts.cni_bin = env.dir.path().join("no-such-plugin");
    let err = Testbed::up(opts).err().expect("missing plugin");
    assert!(matches!(err, TestbedError::MissingBinary { .. }), "{err}");
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn up_twice_with_the_same_instance_is_refused() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let first = Testbed::up(env.kernel_options(&instance)).expect("first up");
    let err = Testbed::up(env.kernel_options(&instance))
        .err()
        .expect("second up is refused");
    assert!(matches!(err, TestbedError::AlreadyExists { .. }), "{err}");
    assert!(
        err.to_string().contains("down"),
        "tells the user what to do: {err}"
    );
    // The refused `up` did not touch the first instance.
    let b = first.pod("default/pod-b").expect("pod-b").ip;
    assert!(
        ping(&first, "default/pod-a", b).status.success(),
        "first instance still works"
    );
    first.down().expect("down");
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn dropping_the_testbed_tears_it_down() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let testbed = Testbed::up(env.kernel_options(&instance)).expect("up");
    assert!(!namespaces_of(&instance).is_empty());
    drop(testbed);
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn kept_instance_is_reopened_from_its_state_and_torn_down() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let root = env.state_root();
    let _guard = InstanceGuard {
        state_root: root.clone(),
        instance: instance.clone(),
    };
    let testbed = Testbed::up(env.kernel_options(&instance)).expect("up");
    let pods = testbed.pods().to_vec();
    testbed.keep();
    assert_eq!(
        namespaces_of(&instance).len(),
        5,
        "fab, ext, node1, pod-a, pod-b"
    );

    let reopened = Testbed::open(&root, &instance).expect("open");
    assert_eq!(reopened.pods(), pods.as_slice());
    assert_eq!(reopened.mode(), Mode::Kernel);
    let out = reopened.exec_in_pod(
        "default/pod-b",
        &["ping", "-c", "1", "-W", "1", &pods[0].ip.to_string()],
    );
    assert!(out.expect("runs").status.success());
    let err = reopened
        .exec_in_pod("default/nope", &["true"])
        .expect_err("unknown pod");
    assert!(
        err.to_string().contains("default/pod-a"),
        "lists known pods: {err}"
    );
    drop(reopened);
    assert!(
        !namespaces_of(&instance).is_empty(),
        "an opened handle does not tear down on drop"
    );

    Testbed::open(&root, &instance)
        .expect("open")
        .down()
        .expect("down");
    assert_nothing_left(&instance, &root);
}

#[test]
fn cli_up_status_exec_down() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let root = env.state_root();
    let _guard = InstanceGuard {
        state_root: root.clone(),
        instance: instance.clone(),
    };
    let cni = env.kernel_options(&instance).cni_bin;
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice-testbed"))
            .arg("--state-root")
            .arg(&root)
            .args(args)
            .output()
            .expect("sluice-testbed runs")
    };
    let file = env.cluster_file();
    let file = file.to_str().expect("utf-8 path");
    let cni = cni.to_str().expect("utf-8 path");

    let up_args = [
        "up",
        file,
        "--instance",
        &instance,
        "--mode",
        "kernel",
        "--cni",
        cni,
    ];
    let up = cli(&up_args);
    assert!(
        up.status.success(),
        "up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let again = cli(&up_args);
    assert!(!again.status.success(), "second up refused");

    let status = cli(&["status", "--instance", &instance]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("default/pod-a") && text.contains("node1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("node1") && l.contains(" kernel ")),
        "status shows node1's kind: {text}"
    );

    let exec_in_pod_a = |argv: &[&str]| {
        let exec = ["exec", "default/pod-a", "--instance", &instance, "--"];
        cli(&[&exec[..], argv].concat())
    };
    let exec = exec_in_pod_a(&["sh", "-c", "exit 7"]);
    assert_eq!(exec.status.code(), Some(7), "exit code passes through");
    let exec = exec_in_pod_a(&["ip", "-4", "-o", "addr", "show", "eth0"]);
    let shown = String::from_utf8_lossy(&exec.stdout);
    let a = Testbed::open(&root, &instance)
        .expect("open")
        .pod("default/pod-a")
        .expect("pod")
        .ip;
    assert!(
        exec.status.success() && shown.contains(&a.to_string()),
        "{shown}"
    );

    let down = cli(&["down", "--instance", &instance]);
    assert!(
        down.status.success(),
        "down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_nothing_left(&instance, &root);
    let down = cli(&["down", "--instance", &instance]);
    assert!(
        down.status.success(),
        "down of a missing instance is a no-op"
    );
}

/// A stand-in agent for the lifecycle tests of sluice mode (start, readiness, stop, restart): it
/// writes the CNI config and answers every request with ok. It moves no packets.
const FAKE_AGENT: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
state, confdir = opt("--state-dir"), opt("--cni-conf-dir")
print("fake agent", " ".join(args), flush=True)
sock_path = os.path.join(state, "sluice.sock")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sock_path)
listener.listen(8)
conf = {"cniVersion": "1.0.0", "name": "sluice", "type": "sluice-cni", "mtu": 1500,
        "podCIDR": "10.244.1.0/24", "gateway": "10.244.1.1", "agentSocket": sock_path,
        "dataDir": os.path.join(state, "ipam"), "queues": 1}
with open(os.path.join(confdir, "05-sluice.conf"), "w") as f:
    json.dump(conf, f)
while True:
    conn, _ = listener.accept()
    conn.makefile().readline()
    conn.sendall(b'{"ok":true}\n')
    conn.close()
"#;

fn fake_agent(env: &Env, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = env.dir.path().join("fake-sluice");
    std::fs::write(&path, body).expect("write fake agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn sluice_mode_agent_lifecycle_with_a_stand_in_agent() {
    require_root!();
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipping: needs python3 for the stand-in agent");
        return;
    }
    let (env, instance) = kernel_case(&one_node());
    let mut opts = env.kernel_options(&instance);
    opts.mode = Mode::Sluice { workers: 2 };
    opts.sluice_bin = fake_agent(&env, FAKE_AGENT);
    let mut testbed = Testbed::up(opts).expect("up with the stand-in agent");
    let node = testbed.nodes()[0].clone();
    let first_pid = node.agent_pid.expect("agent pid recorded");
    assert!(testbed.agent_alive("node1").expect("node1"));
    assert_eq!(
        testbed.pods().len(),
        2,
        "CNI ADD went through the agent socket"
    );
    let log = std::fs::read_to_string(node.state_dir.join("agent.log")).expect("agent log");
    for arg in [
        "run --source file:",
        "--node node1",
        "--workers 2",
        "--cni-conf-dir",
    ] {
        assert!(log.contains(arg), "agent command line lacks {arg:?}: {log}");
    }
    // The agent runs inside the node namespace.
    let agent_ns = std::fs::read_link(format!("/proc/{first_pid}/ns/net")).expect("agent netns");
    let node_ns = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.netns,
            "readlink",
            "/proc/self/ns/net",
        ])
        .output()
        .expect("readlink");
    assert_eq!(
        agent_ns.to_string_lossy(),
        String::from_utf8_lossy(&node_ns.stdout).trim()
    );

    let err = testbed.start_agent("node1").expect_err("already running");
    assert!(matches!(err, TestbedError::AgentRunning { .. }), "{err}");
    testbed.stop_agent("node1", libc::SIGKILL).expect("stop");
    assert!(!testbed.agent_alive("node1").expect("node1"));
    assert_eq!(testbed.nodes()[0].agent_pid, None);
    assert!(
        std::fs::metadata(format!("/proc/{first_pid}")).is_err(),
        "process gone"
    );
    testbed.start_agent("node1").expect("restart");
    let second_pid = testbed.nodes()[0].agent_pid.expect("new pid");
    assert_ne!(first_pid, second_pid);
    assert!(testbed.agent_alive("node1").expect("node1"));

    testbed.down().expect("down");
    assert!(
        std::fs::metadata(format!("/proc/{second_pid}")).is_err(),
        "down stopped the agent"
    );
    assert_nothing_left(&instance, &env.state_root());
}

#[test]
fn sluice_mode_agent_that_exits_early_fails_up_with_its_log() {
    require_root!();
    let (env, instance) = kernel_case(&one_node());
    let mut opts = env.kernel_options(&instance);
    opts.mode = Mode::Sluice { workers: 1 };
    opts.sluice_bin = fake_agent(&env, "#!/bin/sh\necho \"agent boom: $*\" >&2\nexit 3\n");
    let err = Testbed::up(opts).err().expect("agent exits");
    let text = err.to_string();
    assert!(matches!(err, TestbedError::Agent(_)), "{text}");
    assert!(
        text.contains("agent boom: run --source file:") && text.contains("exited early"),
        "{text}"
    );
    assert_nothing_left(&instance, &env.state_root());
}
