//! The command logic with a recording [`NetOps`] and a fake agent on a Unix socket: no root
//! needed. The same paths against the real kernel are in `control/tests/cni.rs`.
use std::{
    cell::RefCell,
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use super::{netops::PodLink, *};
use crate::api::Response;

/// Records links and fails at a chosen step.
#[derive(Default)]
struct FakeNet {
    /// (netns or "" for the node, ifname)
    links: RefCell<BTreeSet<(String, String)>>,
    configured: RefCell<Option<(Ipv4Addr, Ipv4Addr)>>,
    fail_at: Option<&'static str>,
    veths: RefCell<Vec<VethSpec>>,
}

fn ns_key(netns: Option<&Path>) -> String {
    netns.map(|p| p.display().to_string()).unwrap_or_default()
}

fn fake_error(step: &str) -> NetError {
    NetError::Failed {
        command: format!("fake {step}"),
        status: "exit status: 2".into(),
        stderr: "injected".into(),
    }
}

impl FakeNet {
    fn failing_at(step: &'static str) -> Self {
        Self {
            fail_at: Some(step),
            ..Self::default()
        }
    }
    fn step(&self, name: &str) -> Result<(), NetError> {
        if self.fail_at == Some(name) {
            return Err(fake_error(name));
        }
        Ok(())
    }
    fn has(&self, netns: Option<&Path>, ifname: &str) -> bool {
        self.links
            .borrow()
            .contains(&(ns_key(netns), ifname.to_string()))
    }
}

impl NetOps for FakeNet {
    fn link_exists(&self, netns: Option<&Path>, ifname: &str) -> Result<bool, NetError> {
        self.step("link_exists")?;
        Ok(self.has(netns, ifname))
    }
    fn create_veth(&self, spec: &VethSpec) -> Result<(), NetError> {
        // Like `ip link add` followed by a failing `ip link set up`: the pair exists.
        self.links
            .borrow_mut()
            .insert((String::new(), spec.host_ifname.clone()));
        self.links
            .borrow_mut()
            .insert((ns_key(Some(&spec.netns)), spec.pod_ifname.clone()));
        self.veths.borrow_mut().push(spec.clone());
        self.step("create_veth")
    }
    fn delete_link(&self, ifname: &str) -> Result<(), NetError> {
        self.step("delete_link")?;
        let mut links = self.links.borrow_mut();
        links.remove(&(String::new(), ifname.to_string()));
        // The peer of a deleted veth goes too.
        if let Some(spec) = self.veths.borrow().iter().find(|s| s.host_ifname == ifname) {
            links.remove(&(ns_key(Some(&spec.netns)), spec.pod_ifname.clone()));
        }
        Ok(())
    }
    fn configure_pod(
        &self,
        _netns: &Path,
        _ifname: &str,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        self.step("configure_pod")?;
        *self.configured.borrow_mut() = Some((ip, gateway));
        Ok(())
    }
    fn mac(&self, netns: Option<&Path>, _ifname: &str) -> Result<String, NetError> {
        self.step("mac")?;
        Ok(if netns.is_some() {
            "02:00:00:00:00:02".into()
        } else {
            "02:00:00:00:00:01".into()
        })
    }
    fn pod_link(&self, _netns: &Path, _ifname: &str) -> Result<PodLink, NetError> {
        self.step("pod_link")?;
        let configured = *self.configured.borrow();
        Ok(PodLink {
            mac: "02:00:00:00:00:02".into(),
            up: true,
            addresses: configured.map(|(ip, _)| vec![(ip, 32)]).unwrap_or_default(),
            default_gateway: configured.map(|(_, gw)| gw),
        })
    }
}

/// Answers every request with `answer` and records it, until dropped (at most 60 s).
struct FakeAgent {
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: &Path, answer: Response) -> Self {
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
                let mut out = serde_json::to_vec(&answer).expect("answer");
                out.push(b'\n');
                let _ = (&stream).write_all(&out);
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

struct Fixture {
    dir: tempfile::TempDir,
    netns: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let netns = dir.path().join("netns");
        std::fs::write(&netns, b"").expect("stand-in netns file");
        Self { dir, netns }
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("sluice.sock")
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }
    fn conf(&self, version: &str, cidr: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": version,
            "name": "sluice",
            "type": "sluice-cni",
            "mtu": 1450,
            "podCIDR": cidr,
            "gateway": "10.244.1.1",
            "agentSocket": self.socket(),
            "dataDir": self.data_dir(),
            "queues": 2,
            "runtimeConfig": {"portMappings": []},
            "args": {"cni": {}},
        }))
        .expect("conf")
    }
    fn env(&self, command: Command, container_id: &str) -> Env {
        Env {
            command,
            container_id: container_id.into(),
            netns: Some(self.netns.clone()),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            requested_ip: None,
        }
    }
    fn pool(&self) -> Pool {
        Pool::new(
            self.data_dir(),
            "10.244.1.0/24".parse().expect("cidr"),
            Ipv4Addr::new(10, 244, 1, 1),
        )
        .expect("pool")
    }
}

fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn env_needs_command_container_id_ifname_and_netns() {
    let err = Env::from_lookup(lookup(&[])).expect_err("no command");
    assert_eq!(
        (err.code, err.msg.as_str()),
        (code::INVALID_ENV, "CNI_COMMAND is not set")
    );
    let err = Env::from_lookup(lookup(&[("CNI_COMMAND", "ADD")])).expect_err("no id");
    assert_eq!(
        (err.code, err.msg.as_str()),
        (code::INVALID_ENV, "CNI_CONTAINERID is not set")
    );
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_IFNAME", "eth0"),
    ];
    let err = Env::from_lookup(lookup(&base)).expect_err("no netns");
    assert_eq!(
        (err.code, err.msg.as_str()),
        (code::INVALID_ENV, "CNI_NETNS is not set")
    );
    let err = Env::from_lookup(lookup(&[("CNI_COMMAND", "GC")])).expect_err("unknown command");
    assert_eq!(err.code, code::INVALID_ENV);
    let err = Env::from_lookup(lookup(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "a/b"),
    ]))
    .expect_err("bad id");
    assert_eq!(err.code, code::INVALID_ENV);
}

#[test]
fn env_del_accepts_missing_or_empty_netns_and_parses_cni_args() {
    let vars = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", ""),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=u",
        ),
    ];
    let env = Env::from_lookup(lookup(&vars)).expect("env");
    assert_eq!(env.command, Command::Del);
    assert_eq!(env.netns, None);
    assert_eq!(
        (env.pod_namespace.as_str(), env.pod_name.as_str()),
        ("kube-system", "coredns-1")
    );
    let bad = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "novalue"),
    ];
    assert_eq!(
        Env::from_lookup(lookup(&bad)).expect_err("bad args").code,
        code::INVALID_ENV
    );
}

#[test]
fn env_reads_the_requested_ip_from_cni_args() {
    let with_args = |args: &'static str| {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", args),
        ];
        Env::from_lookup(lookup(&vars))
    };
    let env = with_args("IgnoreUnknown=1;K8S_POD_NAME=web-0;IP=10.244.1.10").expect("env");
    assert_eq!(env.requested_ip, Some(Ipv4Addr::new(10, 244, 1, 10)));
    assert_eq!(env.pod_name, "web-0");
    // As host-local: an empty value requests nothing; no IP key requests nothing.
    assert_eq!(with_args("IP=").expect("empty").requested_ip, None);
    assert_eq!(
        with_args("K8S_POD_NAME=a").expect("none").requested_ip,
        None
    );
    // The same address twice is one request.
    assert_eq!(
        with_args("IP=10.244.1.10;IP=10.244.1.10")
            .expect("same twice")
            .requested_ip,
        Some(Ipv4Addr::new(10, 244, 1, 10))
    );
    for (args, named) in [
        ("IP=10.244.1.300", "\"10.244.1.300\""),
        ("IP=web-0", "\"web-0\""),
        ("IP=10.244.1.10/24", "\"10.244.1.10/24\""),
        ("IP=fd00::10", "IPv6"),
        ("IP=10.244.1.10;IP=10.244.1.11", "10.244.1.11"),
    ] {
        let err = with_args(args).expect_err(args);
        assert_eq!(err.code, code::INVALID_ENV, "{args}: {err}");
        assert!(err.msg.contains(named), "{args}: {err}");
        assert!(err.msg.contains("CNI_ARGS"), "{args}: {err}");
    }
}

#[test]
fn add_gives_the_requested_address() {
    let f = Fixture::new();
    let agent = FakeAgent::start(&f.socket(), Response::ok());
    let net = FakeNet::default();
    let conf = f.conf("1.0.0", "10.244.1.0/24");
    let mut env = f.env(Command::Add, "c1");
    let want = Ipv4Addr::new(10, 244, 1, 10);
    env.requested_ip = Some(want);
    let result = run(&env, &conf, &net).expect("add").expect("result");
    assert_eq!(result["ips"][0]["address"], "10.244.1.10/32");
    assert_eq!(
        *net.configured.borrow(),
        Some((want, Ipv4Addr::new(10, 244, 1, 1)))
    );
    assert!(
        matches!(&agent.requests()[..], [Request::EndpointAdd { endpoint }] if endpoint.ip == want),
        "{:?}",
        agent.requests()
    );
    // ADD again with the same request is idempotent; CHECK with it agrees.
    let again = run(&env, &conf, &net).expect("add again").expect("result");
    assert_eq!(again["ips"][0]["address"], "10.244.1.10/32");
    let mut check = f.env(Command::Check, "c1");
    check.requested_ip = Some(want);
    run(&check, &conf, &net).expect("check");
    check.requested_ip = Some(Ipv4Addr::new(10, 244, 1, 11));
    let err = run(&check, &conf, &net).expect_err("check with another IP=");
    assert_eq!(err.code, code::CHECK_FAILED);
    assert!(
        err.msg.contains("10.244.1.11") && err.msg.contains("10.244.1.10"),
        "{err}"
    );
    // Another pod without a request gets the next address after the requested one.
    let other = run(&f.env(Command::Add, "c2"), &conf, &net)
        .expect("add c2")
        .expect("result");
    assert_eq!(other["ips"][0]["address"], "10.244.1.11/32");
}

#[test]
fn add_of_an_unusable_requested_address_fails_and_leaves_nothing() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let conf = f.conf("1.0.0", "10.244.1.0/24");
    let net = FakeNet::default();
    run(&f.env(Command::Add, "holder"), &conf, &net).expect("holder gets .2");
    for (ip, code, words) in [
        ([10, 244, 1, 2], code::ADDRESS_UNAVAILABLE, "\"holder\""),
        (
            [10, 244, 2, 10],
            code::INVALID_ENV,
            "10.244.1.1-10.244.1.254",
        ),
        (
            [10, 244, 1, 255],
            code::INVALID_ENV,
            "failed to allocate all requested IPs",
        ),
        ([10, 244, 1, 1], code::INVALID_ENV, "gateway"),
    ] {
        let ip = Ipv4Addr::from(ip);
        let mut env = f.env(Command::Add, "c1");
        env.requested_ip = Some(ip);
        let err = run(&env, &conf, &net).expect_err("unusable");
        assert_eq!(err.code, code, "{ip}: {err}");
        assert!(err.msg.contains(&ip.to_string()), "{ip}: {err}");
        assert!(err.msg.contains(words), "{ip}: {err}");
        // No veth for c1, no address for c1; the holder keeps .2.
        assert!(!net.has(None, &names::host_ifname("c1")), "{ip}");
        assert_eq!(f.pool().lookup("c1", "eth0").expect("lookup"), None, "{ip}");
    }
    assert_eq!(
        f.pool().lookup("holder", "eth0").expect("lookup"),
        Some(Ipv4Addr::new(10, 244, 1, 2))
    );
}

#[test]
fn config_errors_have_the_spec_codes() {
    let f = Fixture::new();
    assert_eq!(
        NetConf::parse(b"{not json").expect_err("syntax").code,
        code::DECODE_FAILURE
    );
    assert_eq!(
        NetConf::parse(&f.conf("0.2.0", "10.244.1.0/24"))
            .expect_err("version")
            .code,
        code::INCOMPATIBLE_VERSION
    );
    assert_eq!(
        NetConf::parse(br#"{"cniVersion":"1.0.0"}"#)
            .expect_err("fields")
            .code,
        code::INVALID_CONFIG
    );
    assert_eq!(
        NetConf::parse(br#"{"name":"x"}"#)
            .expect_err("no version")
            .code,
        code::INVALID_CONFIG
    );
    let err = NetConf::parse(&f.conf("1.0.0", "10.244.1.0/33")).expect_err("cidr");
    assert_eq!(err.code, code::INVALID_CONFIG);
    assert!(err.msg.contains("10.244.1.0/33"), "{err}");
    let err = NetConf::parse(&f.conf("1.0.0", "10.9.0.0/24")).expect_err("gateway outside");
    assert_eq!(err.code, code::INVALID_CONFIG);
    let mut conf: Value = serde_json::from_slice(&f.conf("1.0.0", "10.244.1.0/24")).expect("json");
    conf["queues"] = json!(0);
    let err = NetConf::parse(&serde_json::to_vec(&conf).expect("vec")).expect_err("queues");
    assert!(err.msg.contains("queues 0"), "{err}");
}

#[test]
fn config_ignores_unknown_fields_and_keeps_prev_result() {
    let f = Fixture::new();
    let mut conf: Value = serde_json::from_slice(&f.conf("1.0.0", "10.244.1.0/24")).expect("json");
    conf["prevResult"] = json!({"ips": [{"address": "10.244.1.2/32"}]});
    let parsed = NetConf::parse(&serde_json::to_vec(&conf).expect("vec")).expect("parse");
    assert_eq!(
        parsed.pod_cidr,
        "10.244.1.0/24".parse::<Ipv4Net>().expect("cidr")
    );
    assert_eq!(
        parsed.prev_result,
        Some(json!({"ips": [{"address": "10.244.1.2/32"}]}))
    );
}

#[test]
fn add_creates_veth_configures_pod_tells_agent_and_prints_result() {
    let f = Fixture::new();
    let agent = FakeAgent::start(&f.socket(), Response::ok());
    let net = FakeNet::default();
    let result = run(
        &f.env(Command::Add, "c1"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &net,
    )
    .expect("add")
    .expect("result");
    let host = names::host_ifname("c1");
    let netns = f.netns.display().to_string();
    assert_eq!(
        result,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host, "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": netns},
            ],
            "ips": [{"address": "10.244.1.2/32", "gateway": "10.244.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {},
        })
    );
    let veths = net.veths.borrow().clone();
    assert_eq!(
        veths,
        vec![VethSpec {
            host_ifname: host.clone(),
            pod_ifname: "eth0".into(),
            netns: f.netns.clone(),
            mtu: 1450,
            queues: 2
        }]
    );
    assert_eq!(
        *net.configured.borrow(),
        Some((Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 1)))
    );
    let expected = Endpoint {
        container_id: "c1".into(),
        pod_ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "web-0".into(),
        host_ifname: host,
        ip: Ipv4Addr::new(10, 244, 1, 2),
        mac: "02:00:00:00:00:02".into(),
        netns,
    };
    assert_eq!(
        agent.requests(),
        vec![Request::EndpointAdd { endpoint: expected }]
    );
    // CHECK agrees with what ADD did.
    run(
        &f.env(Command::Check, "c1"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &net,
    )
    .expect("check");
}

#[test]
fn add_result_in_an_older_version_carries_ip_version() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let result = run(
        &f.env(Command::Add, "c1"),
        &f.conf("0.4.0", "10.244.1.0/24"),
        &FakeNet::default(),
    )
    .expect("add")
    .expect("result");
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(result["ips"][0]["version"], "4");
}

#[test]
fn add_without_agent_fails_with_try_again_later_and_undoes() {
    let f = Fixture::new();
    let net = FakeNet::default();
    let err = run(
        &f.env(Command::Add, "c1"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &net,
    )
    .expect_err("no agent");
    assert_eq!(err.code, code::TRY_AGAIN_LATER);
    assert!(err.msg.contains(&f.socket().display().to_string()), "{err}");
    assert!(
        net.links.borrow().is_empty(),
        "left behind: {:?}",
        net.links.borrow()
    );
    assert_eq!(f.pool().lookup("c1", "eth0").expect("lookup"), None);
}

#[test]
fn add_refused_by_agent_fails_with_try_again_later() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::error("workers not started"));
    let net = FakeNet::default();
    let err = run(
        &f.env(Command::Add, "c1"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &net,
    )
    .expect_err("refused");
    assert_eq!(err.code, code::TRY_AGAIN_LATER);
    assert!(err.details.contains("workers not started"), "{err}");
    assert!(net.links.borrow().is_empty());
    assert_eq!(f.pool().allocations().expect("list"), vec![]);
}

#[test]
fn add_failing_at_any_interface_step_undoes_veth_and_address() {
    for step in ["create_veth", "configure_pod", "mac"] {
        let f = Fixture::new();
        let _agent = FakeAgent::start(&f.socket(), Response::ok());
        let net = FakeNet::failing_at(step);
        let err = run(
            &f.env(Command::Add, "c1"),
            &f.conf("1.0.0", "10.244.1.0/24"),
            &net,
        )
        .expect_err(step);
        assert_eq!(err.code, code::INTERFACE_SETUP, "{step}: {err}");
        assert!(err.details.contains("injected"), "{step}: {err}");
        assert!(
            net.links.borrow().is_empty(),
            "{step} left {:?}",
            net.links.borrow()
        );
        assert_eq!(f.pool().allocations().expect("list"), vec![], "{step}");
    }
}

#[test]
fn add_replaces_a_leftover_host_veth_and_keeps_the_address() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let net = FakeNet::default();
    let conf = f.conf("1.0.0", "10.244.1.0/24");
    let first = run(&f.env(Command::Add, "c1"), &conf, &net)
        .expect("add")
        .expect("result");
    let second = run(&f.env(Command::Add, "c1"), &conf, &net)
        .expect("add again")
        .expect("result");
    assert_eq!(first["ips"], second["ips"]);
    assert_eq!(net.veths.borrow().len(), 2);
    assert_eq!(net.links.borrow().len(), 2);
}

#[test]
fn add_in_a_missing_netns_is_container_unknown_and_allocates_nothing() {
    let f = Fixture::new();
    let mut env = f.env(Command::Add, "c1");
    env.netns = Some(f.dir.path().join("gone"));
    let err = run(&env, &f.conf("1.0.0", "10.244.1.0/24"), &FakeNet::default()).expect_err("netns");
    assert_eq!(err.code, code::UNKNOWN_CONTAINER);
    assert_eq!(f.pool().allocations().expect("list"), vec![]);
}

#[test]
fn add_on_an_exhausted_pool_is_code_100() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let conf = f.conf("1.0.0", "10.244.1.0/30");
    run(&f.env(Command::Add, "c1"), &conf, &FakeNet::default()).expect("first");
    let err = run(&f.env(Command::Add, "c2"), &conf, &FakeNet::default()).expect_err("second");
    assert_eq!(err.code, code::POOL_EXHAUSTED);
    assert!(err.msg.contains("10.244.1.0/30"), "{err}");
}

#[test]
fn del_with_agent_down_still_removes_veth_and_address() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", "10.244.1.0/24");
    let net = FakeNet::default();
    {
        let _agent = FakeAgent::start(&f.socket(), Response::ok());
        run(&f.env(Command::Add, "c1"), &conf, &net).expect("add");
    }
    std::fs::remove_file(f.socket()).expect("agent gone");
    let mut env = f.env(Command::Del, "c1");
    env.netns = None;
    assert_eq!(run(&env, &conf, &net).expect("del"), None);
    assert!(net.links.borrow().is_empty());
    assert_eq!(f.pool().allocations().expect("list"), vec![]);
    // Again, and for a container never seen.
    run(&env, &conf, &net).expect("second del");
    run(&f.env(Command::Del, "never-added"), &conf, &net).expect("unknown del");
}

#[test]
fn del_tells_the_agent() {
    let f = Fixture::new();
    let agent = FakeAgent::start(&f.socket(), Response::ok());
    run(
        &f.env(Command::Del, "c9"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &FakeNet::default(),
    )
    .expect("del");
    assert_eq!(
        agent.requests(),
        vec![Request::EndpointDel {
            container_id: "c9".into()
        }]
    );
}

#[test]
fn check_reports_what_is_missing() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let conf = f.conf("1.0.0", "10.244.1.0/24");
    let net = FakeNet::default();
    let err = run(&f.env(Command::Check, "c1"), &conf, &net).expect_err("nothing allocated");
    assert_eq!(err.code, code::CHECK_FAILED);
    assert!(err.msg.contains("no address"), "{err}");
    run(&f.env(Command::Add, "c1"), &conf, &net).expect("add");
    net.links
        .borrow_mut()
        .remove(&(String::new(), names::host_ifname("c1")));
    let err = run(&f.env(Command::Check, "c1"), &conf, &net).expect_err("host veth gone");
    assert!(err.msg.contains("host veth"), "{err}");
    let err = run(
        &f.env(Command::Check, "c1"),
        &f.conf("0.3.1", "10.244.1.0/24"),
        &net,
    )
    .expect_err("0.3.1");
    assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
}

#[test]
fn check_compares_prev_result() {
    let f = Fixture::new();
    let _agent = FakeAgent::start(&f.socket(), Response::ok());
    let net = FakeNet::default();
    run(
        &f.env(Command::Add, "c1"),
        &f.conf("1.0.0", "10.244.1.0/24"),
        &net,
    )
    .expect("add");
    let mut conf: Value = serde_json::from_slice(&f.conf("1.0.0", "10.244.1.0/24")).expect("json");
    conf["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.99/32"}]});
    let err = run(
        &f.env(Command::Check, "c1"),
        &serde_json::to_vec(&conf).expect("vec"),
        &net,
    )
    .expect_err("prev");
    assert!(err.msg.contains("10.244.1.2/32"), "{err}");
}

#[test]
fn execute_renders_errors_as_spec_json_in_the_config_version() {
    let f = Fixture::new();
    let netns = f.netns.display().to_string();
    let vars = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", &netns),
    ];
    let out = execute(
        lookup(&vars),
        &mut &f.conf("0.4.0", "10.244.1.0/24")[..],
        &FakeNet::default(),
    );
    assert_eq!(out.exit_code, 1);
    let err: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(err["cniVersion"], "0.4.0");
    assert_eq!(err["code"], code::TRY_AGAIN_LATER);
    assert!(
        err["details"].as_str().is_some_and(|d| !d.is_empty()),
        "{err}"
    );

    let out = execute(
        lookup(&[("CNI_COMMAND", "VERSION")]),
        &mut &b""[..],
        &FakeNet::default(),
    );
    assert_eq!(out.exit_code, 0);
    let version: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(
        version,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}
