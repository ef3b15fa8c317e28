//! `sluice-cni` as the container runtime runs it: the real binary, env variables, config on
//! stdin, result or error JSON on stdout. The privileged tests create their own network
//! namespaces (unique per test, removed on drop) and talk to a fake agent on a Unix socket.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use control::api::{Endpoint, Request, Response};
use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_sluice-cni");
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
    };
}

/// What the plugin printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
    fn assert_ok(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
    }
    /// Asserts the spec's error shape and returns the code.
    fn error_code(&self) -> u64 {
        assert_eq!(
            self.code,
            Some(1),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        let err = self.json();
        assert!(err["cniVersion"].is_string(), "{err}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
        assert!(err["details"].is_string(), "{err}");
        err["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {err}"))
    }
}

/// Runs the plugin with exactly `vars` (plus PATH) and `stdin`; killed after 30 s.
fn plugin(vars: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut command = Command::new(PLUGIN);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        command.env(k, v);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-cni");
    let mut input = child.stdin.take().expect("stdin");
    // The plugin may exit before reading (VERSION, bad env): a broken pipe is fine.
    let _ = input.write_all(stdin);
    drop(input);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice-cni did not finish within 30 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().expect("output");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Temporary data dir, agent socket path and config.
struct Setup {
    dir: tempfile::TempDir,
    cidr: String,
    gateway: Ipv4Addr,
    mtu: u32,
    queues: u32,
}

impl Setup {
    fn new(cidr: &str, gateway: Ipv4Addr) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            cidr: cidr.into(),
            gateway,
            mtu: 1400,
            queues: 3,
        }
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("sluice.sock")
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }
    fn conf_version(&self, version: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": version,
            "name": "sluice",
            "type": "sluice-cni",
            "mtu": self.mtu,
            "podCIDR": self.cidr,
            "gateway": self.gateway,
            "agentSocket": self.socket(),
            "dataDir": self.data_dir(),
            "queues": self.queues,
            "runtimeConfig": {"bandwidth": {}},
            "args": {"cni": {"ips": []}},
        }))
        .expect("conf")
    }
    fn conf(&self) -> Vec<u8> {
        self.conf_version("1.0.0")
    }
    /// Address files in the data dir.
    fn allocated(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.data_dir()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect();
        names.sort();
        names
    }
}

fn vars<'a>(command: &'a str, container_id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

/// A network namespace made for one test; deleted on drop, with the host veth of `container_id`.
struct Netns {
    name: String,
    host_ifname: String,
}

impl Netns {
    fn new(container_id: &str) -> Self {
        let name = unique("sluicecni");
        sh("ip", &["netns", "add", &name]);
        Self {
            name,
            host_ifname: control::cni::names::host_ifname(container_id),
        }
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
    /// Runs `ip netns exec NAME ARGS` and returns stdout.
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.host_ifname])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().expect("spawn");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn host_link_exists(ifname: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ip")
        .success()
}

/// Answers `{"ok":true}` (or the given response) to every request and records it; stops on
/// drop, at the latest after 60 s.
struct FakeAgent {
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).expect("bind fake agent");
        listener.set_nonblocking(true).expect("nonblocking");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (requests2, stop2) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                if let Ok(request) = serde_json::from_str::<Request>(line.trim_end()) {
                    requests2.lock().expect("lock").push(request);
                }
                let mut answer = serde_json::to_vec(&Response::ok()).expect("answer");
                answer.push(b'\n');
                let _ = (&stream).write_all(&answer);
            }
        });
        Self {
            requests,
            stop,
            thread: Some(thread),
        }
    }
    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Without root.

#[test]
fn version_lists_supported_versions() {
    let run = plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    run.assert_ok();
    assert_eq!(
        run.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}

#[test]
fn bad_json_on_stdin_is_decode_failure() {
    let run = plugin(
        &vars("ADD", "c1", "/var/run/netns/none"),
        b"{\"cniVersion\": \"1.0.0\",",
    );
    assert_eq!(run.error_code(), 6);
}

#[test]
fn missing_env_variables_are_code_4() {
    let setup = Setup::new("10.250.0.0/24", Ipv4Addr::new(10, 250, 0, 1));
    let conf = setup.conf();
    let full = vars("ADD", "c1", "/var/run/netns/none");
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let without: Vec<_> = full
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let run = plugin(&without, &conf);
        assert_eq!(run.error_code(), 4, "without {missing}");
        assert!(
            run.json()["msg"]
                .as_str()
                .is_some_and(|m| m.contains(missing)),
            "{}",
            run.stdout
        );
    }
}

#[test]
fn unsupported_cni_version_is_code_1() {
    let setup = Setup::new("10.250.0.0/24", Ipv4Addr::new(10, 250, 0, 1));
    let run = plugin(
        &vars("ADD", "c1", "/var/run/netns/none"),
        &setup.conf_version("0.2.0"),
    );
    assert_eq!(run.error_code(), 1);
    assert!(
        run.json()["details"]
            .as_str()
            .is_some_and(|d| d.contains("1.0.0")),
        "{}",
        run.stdout
    );
}

#[test]
fn invalid_network_config_is_code_7() {
    let setup = Setup::new("10.250.0.0/24", Ipv4Addr::new(10, 99, 0, 1));
    let run = plugin(&vars("ADD", "c1", "/var/run/netns/none"), &setup.conf());
    assert_eq!(run.error_code(), 7);
    assert_eq!(run.json()["cniVersion"], "1.0.0");
}

#[test]
fn del_of_unknown_container_succeeds_without_agent_or_netns() {
    let setup = Setup::new("10.250.0.0/24", Ipv4Addr::new(10, 250, 0, 1));
    let id = unique("never-added-");
    for netns in ["", "/var/run/netns/does-not-exist"] {
        let run = plugin(&vars("DEL", &id, netns), &setup.conf());
        run.assert_ok();
        assert_eq!(run.stdout, "", "DEL prints nothing on success");
    }
}

// ---------------------------------------------------------------------------------------------
// With root: real namespaces and veths.

#[test]
fn add_check_del_against_a_real_netns() {
    require_root!();
    let setup = Setup::new("10.251.3.0/24", Ipv4Addr::new(10, 251, 3, 1));
    let agent = FakeAgent::start(&setup.socket());
    let id = unique("cnitest-");
    let ns = Netns::new(&id);
    let netns = ns.path();

    let run = plugin(&vars("ADD", &id, &netns), &setup.conf());
    run.assert_ok();
    let result = run.json();
    let host = ns.host_ifname.clone();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], netns.as_str());
    assert_eq!(
        result["ips"],
        json!([{"address": "10.251.3.2/32", "gateway": "10.251.3.1", "interface": 1}])
    );
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.251.3.1"}])
    );
    assert_eq!(result["dns"], json!({}));

    // The pod side as the kernel sees it.
    let addr: Value =
        serde_json::from_str(&ns.exec(&["ip", "-j", "-4", "addr", "show", "dev", "eth0"]))
            .expect("json");
    let info = &addr[0]["addr_info"][0];
    assert_eq!(
        (info["local"].as_str(), info["prefixlen"].as_u64()),
        (Some("10.251.3.2"), Some(32))
    );
    let link: Value =
        serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show", "dev", "eth0"])).expect("json");
    assert_eq!(link[0]["address"], result["interfaces"][1]["mac"]);
    let routes: Value =
        serde_json::from_str(&ns.exec(&["ip", "-j", "-4", "route", "show"])).expect("json");
    let routes = routes.as_array().expect("routes");
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.251.3.1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "10.251.3.1" && r["scope"] == "link" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert_eq!(ns.exec(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "1400");
    let queues = ns.exec(&["ls", "/sys/class/net/eth0/queues"]);
    let rx = queues
        .split_whitespace()
        .filter(|q| q.starts_with("rx-"))
        .count();
    let tx = queues
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .count();
    assert_eq!((rx, tx), (3, 3), "{queues}");
    let lo: Value =
        serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show", "dev", "lo"])).expect("json");
    assert!(
        lo[0]["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP")),
        "{lo}"
    );
    // The host side.
    let host_link: Value =
        serde_json::from_str(&sh("ip", &["-j", "-d", "link", "show", "dev", &host])).expect("json");
    assert_eq!(host_link[0]["mtu"], 1400);
    assert_eq!(host_link[0]["num_rx_queues"], 3);
    assert_eq!(host_link[0]["address"], result["interfaces"][0]["mac"]);
    assert!(
        host_link[0]["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP")),
        "{host_link}"
    );

    // The agent heard of it.
    let expected = Endpoint {
        container_id: id.clone(),
        pod_ifname: "eth0".into(),
        pod_namespace: "shop".into(),
        pod_name: "cart-7".into(),
        host_ifname: host.clone(),
        ip: Ipv4Addr::new(10, 251, 3, 2),
        mac: result["interfaces"][1]["mac"]
            .as_str()
            .expect("mac")
            .to_string(),
        netns: netns.clone(),
    };
    assert_eq!(
        agent.requests(),
        vec![Request::EndpointAdd { endpoint: expected }]
    );
    assert_eq!(setup.allocated(), vec!["10.251.3.2".to_string()]);

    // ADD again (runtime retry): same address.
    let again = plugin(&vars("ADD", &id, &netns), &setup.conf());
    again.assert_ok();
    assert_eq!(again.json()["ips"], result["ips"]);

    // CHECK passes with the prevResult the runtime would pass.
    let mut conf: Value = serde_json::from_slice(&setup.conf()).expect("conf");
    conf["prevResult"] = result.clone();
    let check = plugin(
        &vars("CHECK", &id, &netns),
        &serde_json::to_vec(&conf).expect("vec"),
    );
    check.assert_ok();
    assert_eq!(check.stdout, "");

    // CHECK notices a lost address.
    ns.exec(&["ip", "addr", "del", "10.251.3.2/32", "dev", "eth0"]);
    let broken = plugin(&vars("CHECK", &id, &netns), &setup.conf());
    assert_eq!(broken.error_code(), 102);
    assert!(
        broken.json()["msg"]
            .as_str()
            .is_some_and(|m| m.contains("10.251.3.2/32")),
        "{}",
        broken.stdout
    );

    // DEL removes the veth and frees the address; a second DEL is fine.
    let del = plugin(&vars("DEL", &id, &netns), &setup.conf());
    del.assert_ok();
    assert!(!host_link_exists(&host), "{host} still exists after DEL");
    assert_eq!(setup.allocated(), Vec::<String>::new());
    assert_eq!(
        agent.requests().last(),
        Some(&Request::EndpointDel {
            container_id: id.clone()
        })
    );
    plugin(&vars("DEL", &id, &netns), &setup.conf()).assert_ok();
}

#[test]
fn add_without_agent_is_try_again_later_and_leaves_nothing() {
    require_root!();
    let setup = Setup::new("10.251.4.0/24", Ipv4Addr::new(10, 251, 4, 1));
    let id = unique("cnitest-");
    let ns = Netns::new(&id);
    let run = plugin(&vars("ADD", &id, &ns.path()), &setup.conf());
    assert_eq!(run.error_code(), 11);
    let msg = run.json()["msg"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(&setup.socket().display().to_string()), "{msg}");
    assert!(!host_link_exists(&ns.host_ifname), "veth left behind");
    let links: Value = serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show"])).expect("json");
    let names: Vec<_> = links
        .as_array()
        .expect("links")
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .collect();
    assert_eq!(names, vec!["lo"], "pod side left behind");
    assert_eq!(setup.allocated(), Vec::<String>::new());
}

#[test]
fn add_on_exhausted_pool_is_code_100() {
    require_root!();
    // A /30 has one usable address after network, gateway and broadcast.
    let setup = Setup::new("10.251.5.0/30", Ipv4Addr::new(10, 251, 5, 1));
    let _agent = FakeAgent::start(&setup.socket());
    let (first, second) = (unique("cnitest-"), unique("cnitest-"));
    let (ns1, ns2) = (Netns::new(&first), Netns::new(&second));
    let run = plugin(&vars("ADD", &first, &ns1.path()), &setup.conf());
    run.assert_ok();
    assert_eq!(run.json()["ips"][0]["address"], "10.251.5.2/32");
    let run = plugin(&vars("ADD", &second, &ns2.path()), &setup.conf());
    assert_eq!(run.error_code(), 100);
    assert!(
        run.json()["msg"]
            .as_str()
            .is_some_and(|m| m.contains("10.251.5.0/30")),
        "{}",
        run.stdout
    );
    assert!(!host_link_exists(&ns2.host_ifname));
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    require_root!();
    const PODS: usize = 4;
    let setup = Arc::new(Setup::new("10.251.6.0/24", Ipv4Addr::new(10, 251, 6, 1)));
    let agent = FakeAgent::start(&setup.socket());
    let pods: Vec<(String, Netns)> = (0..PODS)
        .map(|_| {
            let id = unique("cnitest-");
            let ns = Netns::new(&id);
            (id, ns)
        })
        .collect();
    let handles: Vec<_> = pods
        .iter()
        .map(|(id, ns)| {
            let (id, path, setup) = (id.clone(), ns.path(), Arc::clone(&setup));
            thread::spawn(move || plugin(&vars("ADD", &id, &path), &setup.conf()))
        })
        .collect();
    let mut addresses: Vec<String> = handles
        .into_iter()
        .map(|h| {
            let run = h.join().expect("thread");
            run.assert_ok();
            run.json()["ips"][0]["address"]
                .as_str()
                .expect("address")
                .to_string()
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), PODS, "{addresses:?}");
    assert_eq!(setup.allocated().len(), PODS);
    assert_eq!(agent.requests().len(), PODS);
}

#[test]
fn del_after_the_netns_is_gone_frees_the_address() {
    require_root!();
    let setup = Setup::new("10.251.7.0/24", Ipv4Addr::new(10, 251, 7, 1));
    let _agent = FakeAgent::start(&setup.socket());
    let id = unique("cnitest-");
    let ns = Netns::new(&id);
    let path = ns.path();
    plugin(&vars("ADD", &id, &path), &setup.conf()).assert_ok();
    let host = ns.host_ifname.clone();
    drop(ns); // the namespace and the veth pair are gone, as after a crashed pod sandbox
    let run = plugin(&vars("DEL", &id, &path), &setup.conf());
    run.assert_ok();
    assert!(!host_link_exists(&host));
    assert_eq!(setup.allocated(), Vec::<String>::new());
}
