//! `control::kube::KubeSource` over HTTPS with the credentials a real deployment has, end to end
//! against the fake API server (`control::kube::fake`) serving TLS and requiring authentication:
//!
//! - KubePrism-like TLS (`https://127.0.0.1:PORT`, a server certificate signed by the cluster CA
//!   with the SANs Talos gives it) with a bearer token and with a client certificate;
//! - `--kubeconfig`: `certificate-authority-data` + `token`, `client-certificate-data` +
//!   `client-key-data` (Talos' admin kubeconfig), a CA file and a token file named relative to the
//!   kubeconfig, `tls-server-name`; a wrong CA, a certificate for another name, a refused token or
//!   client certificate (health says which, the source keeps retrying); a kubeconfig that is not
//!   YAML or has no current context (`KubeError::Kubeconfig` naming the file);
//! - the in-cluster config of a DaemonSet pod (`KUBERNETES_SERVICE_HOST`/`PORT` and the service
//!   account files under the fixed `/var/run/secrets/kubernetes.io/serviceaccount`), alone and with
//!   `--api-server` pointing at KubePrism, and the token file's reload after a rotation. kube-rs
//!   reads those fixed paths, so these tests run their body in a child process of this binary with
//!   its own mount namespace and a tmpfs over `/var/run/secrets` (or `/var/run`): root only (CI
//!   runs as root); elsewhere they print why they are skipped. Nothing on the machine changes.
//!
//! Certificates are made at test time (rcgen). Network: loopback only; every wait is bounded.

use std::ffi::CStr;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use base64::Engine as _;
use control::cluster::{parse_str, ClusterState};
use control::kube::fake::{cluster_objects, tls_config, FakeApi, FakeApiBuilder, FakeApiError};
use control::kube::{KubeError, KubeOptions, KubeSource, SourceEvent};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};

mod kube_support;
use kube_support::health_where;

/// Longest wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(15);
/// kube-rs re-reads a token file when its copy is within 10 s of a minute old.
const TOKEN_RELOAD: Duration = Duration::from_secs(50);
/// The service account's token (what kubelet projects into the pod).
const SA_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.sluice-test-service-account";
/// The SANs of a Talos API server certificate that matter here: KubePrism is reached as
/// 127.0.0.1 or localhost (Talos adds both), in-cluster clients use the Service name.
const TALOS_SANS: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

const FIXTURE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {kubernetes.io/hostname: node1}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {kubernetes.io/metadata.name: prod}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web}}
spec:
  nodeName: node1
  containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080, protocol: TCP}]}]
status: {phase: Running, podIP: 10.244.1.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.1.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
"#;

// ---------------------------------------------------------------------------------------------
// Certificates, servers, kubeconfigs

/// A cluster CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn sign(
        &self,
        sans: &[&str],
        common_name: &str,
        organization: Option<&str>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Pair {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("SANs parse");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(organization) = organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, organization);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf signs");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// The API server's serving certificate for `sans` (IP addresses or DNS names).
    fn server(&self, sans: &[&str]) -> Pair {
        self.sign(
            sans,
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate as Talos' admin kubeconfig has (`O=system:masters`).
    fn client(&self, user: &str) -> Pair {
        self.sign(
            &[],
            user,
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// An HTTPS fake with a certificate for `sans` signed by `ca`; `client_ca` verifies client
/// certificates. Authentication is added by the caller.
fn https(ca: &Ca, sans: &[&str], client_ca: Option<&Ca>) -> FakeApiBuilder {
    let server = ca.server(sans);
    let client_ca = client_ca.map(Ca::pem);
    let config = tls_config(
        server.cert.as_bytes(),
        server.key.as_bytes(),
        client_ca.as_deref().map(str::as_bytes),
    )
    .expect("TLS config");
    FakeApi::builder().tls(config)
}

fn fixture() -> ClusterState {
    parse_str(FIXTURE, "FIXTURE").expect("fixture parses")
}

/// Starts `builder` on `addr` serving the fixture.
fn serve_on(builder: FakeApiBuilder, addr: &str) -> FakeApi {
    let api = builder.start(addr).expect("fake API server starts");
    api.sync(cluster_objects(&fixture()).expect("objects serialize"))
        .expect("fake accepts the fixture");
    api
}

fn serve(builder: FakeApiBuilder) -> FakeApi {
    serve_on(builder, "127.0.0.1:0")
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A kubeconfig with one cluster (`server` plus `cluster`'s fields), one user and a current
/// context naming both.
fn kubeconfig(server: &str, cluster: Value, user: Value) -> String {
    let mut cluster = cluster;
    cluster["server"] = server.into();
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "admin@test", "user": user}],
        "contexts": [{"name": "admin@test", "context": {"cluster": "test", "user": "admin@test"}}],
        "current-context": "admin@test",
    });
    serde_yaml::to_string(&doc).expect("kubeconfig serializes")
}

/// A kubeconfig user with inline client certificate and key, as Talos' admin kubeconfig.
fn client_certificate(pair: &Pair) -> Value {
    json!({"client-certificate-data": b64(&pair.cert), "client-key-data": b64(&pair.key)})
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}

fn init_logs() {
    static LOGS: Once = Once::new();
    LOGS.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_max_level(tracing::Level::INFO)
            .try_init();
    });
}

fn options(kubeconfig: Option<PathBuf>, api_server: Option<String>) -> KubeOptions {
    KubeOptions {
        kubeconfig,
        api_server,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
        ..KubeOptions::new("node1")
    }
}

fn start(opts: KubeOptions) -> KubeSource {
    init_logs();
    KubeSource::start(opts).expect("source starts")
}

/// The next `State` within `limit` (health events skipped).
fn next_state(source: &KubeSource, limit: Duration) -> Option<ClusterState> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match source.recv_timeout(left)? {
            SourceEvent::State { state, .. } => return Some(state),
            SourceEvent::Health(_) => {}
        }
    }
}

/// Fails unless the first state arrives within [`WAIT`] and holds the fixture's objects.
fn assert_first_sync(source: &KubeSource, what: &str) {
    let state = next_state(source, WAIT)
        .unwrap_or_else(|| panic!("{what}: no first state; health {:?}", source.health()));
    let nodes: Vec<_> = state
        .nodes
        .iter()
        .map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(nodes, [Some("node1".to_owned())], "{what}");
    let pods: Vec<_> = state
        .pods
        .iter()
        .map(|p| ClusterState::pod_key(p))
        .collect();
    assert_eq!(pods, ["prod/web-1"], "{what}");
    assert_eq!(state.services.len(), 1, "{what}");
    assert!(source.health().all_synced, "{what}: {:?}", source.health());
}

/// Waits for an error containing every one of `parts`; then checks that no state came.
fn assert_fails_with(source: &KubeSource, connected: bool, parts: &[&str]) -> String {
    let health = health_where(source, WAIT, |h| {
        h.connected == connected
            && h.last_error
                .as_deref()
                .is_some_and(|e| parts.iter().all(|p| e.contains(p)))
    });
    assert!(
        next_state(source, Duration::from_millis(300)).is_none(),
        "a state despite {health:?}"
    );
    assert!(!source.health().all_synced);
    health.last_error.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// TLS and kubeconfig credentials

#[test]
fn kubeprism_tls_with_a_bearer_token_from_the_kubeconfig() {
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, TALOS_SANS, None).bearer_token(SA_TOKEN));
    assert!(api.url().starts_with("https://127.0.0.1:"), "{}", api.url());
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_data = json!({"certificate-authority-data": b64(&ca.pem())});
    let path = write(
        dir.path(),
        "kubeconfig",
        &kubeconfig(&api.url(), ca_data.clone(), json!({"token": SA_TOKEN})),
    );
    let source = start(options(Some(path), None));
    assert_first_sync(&source, "CA data + token");
    let counts = api.auth_counts();
    assert!(
        counts.bearer_token >= 7 && counts.unauthorized == 0,
        "{counts:?}"
    );
    drop(source);

    // A token the server does not accept: it answers 401, so the source is connected (the
    // server is there) but never synced, and says whose credentials were refused.
    let wrong = write(
        dir.path(),
        "wrong-token",
        &kubeconfig(&api.url(), ca_data, json!({"token": "revoked"})),
    );
    let source = start(options(Some(wrong.clone()), None));
    let error = assert_fails_with(&source, true, &["401", "refused the credentials"]);
    assert!(error.contains(&wrong.display().to_string()), "{error}");
    assert!(api.auth_counts().unauthorized > 0);
}

#[test]
fn kubeconfig_client_certificate_data_as_in_the_talos_admin_kubeconfig() {
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, TALOS_SANS, Some(&ca)).client_certificates());
    let admin = ca.client("admin");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_data = json!({"certificate-authority-data": b64(&ca.pem())});
    let path = write(
        dir.path(),
        "talosconfig-kubeconfig",
        &kubeconfig(&api.url(), ca_data.clone(), client_certificate(&admin)),
    );
    let source = start(options(Some(path), None));
    assert_first_sync(&source, "client certificate");
    let counts = api.auth_counts();
    assert!(
        counts.client_certificate >= 7 && counts.bearer_token == 0 && counts.unauthorized == 0,
        "{counts:?}"
    );
    drop(source);

    // No credentials at all: 401.
    let anonymous = write(
        dir.path(),
        "anonymous",
        &kubeconfig(&api.url(), ca_data.clone(), json!({})),
    );
    let source = start(options(Some(anonymous), None));
    assert_fails_with(&source, true, &["401"]);
    drop(source);

    // A client certificate from another CA: the TLS handshake is refused.
    let stranger = Ca::new("someone-else").client("admin");
    let refused = write(
        dir.path(),
        "foreign-client-cert",
        &kubeconfig(&api.url(), ca_data, client_certificate(&stranger)),
    );
    let source = start(options(Some(refused.clone()), None));
    let error = assert_fails_with(&source, false, &["refused the TLS handshake"]);
    assert!(error.contains(&refused.display().to_string()), "{error}");
}

#[test]
fn kubeconfig_with_ca_and_token_files_relative_to_it() {
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, TALOS_SANS, None).bearer_token(SA_TOKEN));
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("pki")).expect("mkdir");
    write(dir.path(), "pki/ca.crt", &ca.pem());
    write(dir.path(), "pki/token", SA_TOKEN);
    let path = write(
        dir.path(),
        "kubeconfig",
        &kubeconfig(
            &api.url(),
            json!({"certificate-authority": "pki/ca.crt"}),
            json!({"tokenFile": "pki/token"}),
        ),
    );
    // Started from elsewhere: the files are found next to the kubeconfig, not in the cwd.
    assert_ne!(std::env::current_dir().ok().as_deref(), Some(dir.path()));
    let source = start(options(Some(path), None));
    assert_first_sync(&source, "CA file + token file");
    assert!(api.auth_counts().bearer_token >= 7);
}

#[test]
fn a_kubeconfig_naming_the_wrong_ca_reports_the_tls_error_and_keeps_retrying() {
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, TALOS_SANS, None).bearer_token(SA_TOKEN));
    let dir = tempfile::tempdir().expect("tempdir");
    let other = Ca::new("not-the-cluster-ca");
    let path = write(
        dir.path(),
        "kubeconfig",
        &kubeconfig(
            &api.url(),
            json!({"certificate-authority-data": b64(&other.pem())}),
            json!({"token": SA_TOKEN}),
        ),
    );
    let source = start(options(Some(path.clone()), None));
    let error = assert_fails_with(
        &source,
        false,
        &["invalid peer certificate", "UnknownIssuer"],
    );
    for part in [
        api.url().as_str(),
        &path.display().to_string(),
        "certificate-authority",
    ] {
        assert!(error.contains(part), "{part:?} missing from {error}");
    }
    // Still retrying, not panicked: the thread answers health and stops on drop.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!source.health().connected);
    assert_eq!(api.auth_counts().bearer_token, 0, "no request got past TLS");
    let t = Instant::now();
    drop(source);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[test]
fn the_certificate_must_name_the_host_or_the_tls_server_name() {
    // A certificate for `localhost` only (no IP SAN), as older Talos had.
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, &["localhost"], None).bearer_token(SA_TOKEN));
    let port = api.addr().port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |name: &str, server: String, tls_server_name: Option<&str>| {
        let mut cluster = json!({"certificate-authority-data": b64(&ca.pem())});
        if let Some(name) = tls_server_name {
            cluster["tls-server-name"] = name.into();
        }
        write(
            dir.path(),
            name,
            &kubeconfig(&server, cluster, json!({"token": SA_TOKEN})),
        )
    };

    let by_ip = start(options(
        Some(config("by-ip", format!("https://127.0.0.1:{port}"), None)),
        None,
    ));
    assert_fails_with(
        &by_ip,
        false,
        &["not valid for name \"127.0.0.1\"", "tls-server-name"],
    );
    drop(by_ip);

    let by_name = start(options(
        Some(config("by-name", format!("https://localhost:{port}"), None)),
        None,
    ));
    assert_first_sync(&by_name, "https://localhost");
    drop(by_name);

    // The IP URL with tls-server-name: verified for that name.
    let named = config(
        "tls-server-name",
        format!("https://127.0.0.1:{port}"),
        Some("localhost"),
    );
    let source = start(options(Some(named.clone()), None));
    assert_first_sync(&source, "tls-server-name");
    drop(source);

    // --api-server overriding the kubeconfig's URL keeps its CA, token and tls-server-name.
    let elsewhere = config(
        "elsewhere",
        "https://127.0.0.1:1".to_owned(),
        Some("localhost"),
    );
    let source = start(options(
        Some(elsewhere),
        Some(format!("https://127.0.0.1:{port}")),
    ));
    assert_first_sync(&source, "--api-server over a kubeconfig");
}

#[test]
fn plain_http_against_the_tls_port_is_told_to_use_https() {
    let ca = Ca::new("kubernetes");
    let api = serve(https(&ca, TALOS_SANS, None));
    let url = format!("http://{}", api.addr());
    let source = start(options(None, Some(url.clone())));
    // Go's 400 for plain HTTP on a TLS port: an answer, so connected.
    let error = assert_fails_with(&source, true, &["400", "use https://"]);
    assert!(error.contains(&url), "{error}");
}

#[test]
fn a_kubeconfig_that_is_not_yaml_or_has_no_current_context_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_yaml = write(dir.path(), "not-yaml", "clusters: [ {{ this is not yaml\n");
    let mut no_context: Value =
        serde_yaml::from_str(&kubeconfig("https://127.0.0.1:1", json!({}), json!({})))
            .expect("kubeconfig parses");
    no_context
        .as_object_mut()
        .expect("a mapping")
        .remove("current-context");
    let no_context = write(
        dir.path(),
        "no-context",
        &serde_yaml::to_string(&no_context).expect("serializes"),
    );
    let empty = write(dir.path(), "empty", "");
    for path in [not_yaml, no_context, empty] {
        let err = KubeSource::start(options(Some(path.clone()), None))
            .expect_err("an unusable kubeconfig");
        match &err {
            KubeError::Kubeconfig { path: named, .. } => assert_eq!(named, &path),
            other => panic!("{} gave {other:?}", path.display()),
        }
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("--kubeconfig"),
            "{text}"
        );
    }
}

#[test]
fn unusable_tls_material_for_the_fake_names_the_part() {
    let ca = Ca::new("kubernetes");
    let server = ca.server(TALOS_SANS);
    let (cert, key) = (server.cert.as_bytes(), server.key.as_bytes());
    let no_ca: Option<&[u8]> = None;
    let cases = [
        ("certificate chain", &b"not PEM"[..], key, no_ca),
        ("private key", cert, &b""[..], no_ca),
        ("client CA", cert, key, Some(&b"no CA here"[..])),
    ];
    for (part, cert, key, client_ca) in cases {
        match tls_config(cert, key, client_ca) {
            Err(FakeApiError::Tls { what, .. }) => assert_eq!(what, part),
            Err(other) => panic!("{part}: {other}"),
            Ok(_) => panic!("{part}: accepted"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-cluster: a pod's service account, in a private mount namespace

/// Set in the child process: the test to run there.
const POD_TEST_ENV: &str = "SLUICE_TEST_POD";
/// The fake API server's port, for the child.
const API_PORT_ENV: &str = "SLUICE_TEST_API_PORT";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A port nothing listens on (bound, then closed).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs `body` as a pod would see the world: in a child process of this test binary, in its
/// own mount namespace with a fresh tmpfs holding the service account, with
/// `KUBERNETES_SERVICE_HOST=127.0.0.1`, `KUBERNETES_SERVICE_PORT=service_port`, no kubeconfig
/// and an empty `$HOME`. The child's `body` gets the port for its fake API server and the CA to
/// write; it fails the parent test by failing.
fn in_pod(test: &str, service_port: u16, api_port: u16, body: impl FnOnce(u16)) {
    if std::env::var(POD_TEST_ENV).as_deref() == Ok(test) {
        enter_private_mounts();
        body(api_port_from_env());
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "skipped {test}: needs root for a private mount namespace over {SERVICE_ACCOUNT_DIR} \
             (kube-rs reads that fixed path); CI runs as root"
        );
        return;
    }
    let home = tempfile::tempdir().expect("tempdir");
    // Output to files, read after the child ends (a full pipe would block a chatty child).
    let stdout_file = tempfile::tempfile().expect("temp file");
    let stderr_file = tempfile::tempfile().expect("temp file");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(POD_TEST_ENV, test)
        .env(API_PORT_ENV, api_port.to_string())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", service_port.to_string())
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .stdout(Stdio::from(stdout_file.try_clone().expect("dup")))
        .stderr(Stdio::from(stderr_file.try_clone().expect("dup")))
        .spawn()
        .expect("child test process starts");
    let deadline = Instant::now() + TOKEN_RELOAD + 4 * WAIT;
    while child.try_wait().expect("child status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().expect("child status");
    let read = |mut file: std::fs::File| {
        let mut text = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut text);
        text
    };
    let (stdout, stderr) = (read(stdout_file), read(stderr_file));
    assert!(
        status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test} in its pod-like child failed ({status}):\n--- stdout\n{stdout}\n\
         --- stderr\n{stderr}"
    );
}

fn api_port_from_env() -> u16 {
    std::env::var(API_PORT_ENV)
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("the parent passes the API port")
}

/// A private mount namespace for this thread (and the threads it starts) with a tmpfs over
/// `/var/run/secrets` (or `/var/run` when that does not exist), holding an empty
/// service-account directory.
fn enter_private_mounts() {
    fn check(what: &str, rc: libc::c_int) {
        assert!(
            rc == 0,
            "{what}: {} (needs root: CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        );
    }
    let target: &CStr = if Path::new("/var/run/secrets").is_dir() {
        c"/var/run/secrets"
    } else {
        c"/var/run"
    };
    // SAFETY: unshare takes flags only; it detaches this thread's mount table (CLONE_NEWNS
    // implies CLONE_FS, which a thread may unshare), so threads started later inherit it.
    check("unshare(CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    });
    // SAFETY: NUL-terminated string literals; null filesystem type and data are allowed for a
    // propagation change. Private propagation keeps the tmpfs below out of the host.
    check("mount --make-rprivate /", unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    });
    // SAFETY: as above; the data is a NUL-terminated option string.
    check("mount tmpfs", unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"mode=0755".as_ptr().cast(),
        )
    });
    std::fs::create_dir_all(SERVICE_ACCOUNT_DIR).expect("service account directory");
}

/// Writes the service account as kubelet projects it (token without a newline).
fn write_service_account(ca: &Ca, token: &str) {
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    write(dir, "ca.crt", &ca.pem());
    write(dir, "namespace", "kube-system");
    write(dir, "token", token);
}

/// In the pod-like child: a fake API server on `port` (TLS with Talos' SANs,
/// accepting `token`) and the service account files for that CA and token.
fn pod_cluster(port: u16, token: &str) -> FakeApi {
    let ca = Ca::new("kubernetes");
    let api = serve_on(
        https(&ca, TALOS_SANS, None).bearer_token(token),
        &format!("127.0.0.1:{port}"),
    );
    write_service_account(&ca, token);
    api
}

#[test]
fn in_cluster_service_account_over_tls() {
    let api_port = free_port();
    in_pod(
        "in_cluster_service_account_over_tls",
        api_port,
        api_port,
        |port| {
            let api = pod_cluster(port, SA_TOKEN);
            // No --api-server, no --kubeconfig: inferred, as in a DaemonSet pod.
            let source = start(options(None, None));
            assert_first_sync(&source, "in-cluster");
            assert!(api.auth_counts().bearer_token >= 7);
            drop(source);

            // A ca.crt of another CA: the TLS error names the service account.
            write(
                Path::new(SERVICE_ACCOUNT_DIR),
                "ca.crt",
                &Ca::new("other").pem(),
            );
            let source = start(options(None, None));
            let error = assert_fails_with(&source, false, &["UnknownIssuer"]);
            assert!(error.contains(SERVICE_ACCOUNT_DIR), "{error}");
        },
    );
}

#[test]
fn in_cluster_credentials_with_the_kubeprism_url() {
    // The Talos DaemonSet: the service account's token and CA, but --api-server
    // https://127.0.0.1:7445 (KubePrism) instead of the Service address, where nothing listens.
    let service_port = free_port();
    let api_port = free_port();
    in_pod(
        "in_cluster_credentials_with_the_kubeprism_url",
        service_port,
        api_port,
        |port| {
            let api = pod_cluster(port, SA_TOKEN);
            for url in [
                format!("https://127.0.0.1:{port}"),
                format!("https://localhost:{port}"),
            ] {
                let source = start(options(None, Some(url.clone())));
                assert_first_sync(&source, &url);
            }
            assert!(api.auth_counts().bearer_token >= 14);
            assert_eq!(api.auth_counts().unauthorized, 0);
        },
    );
}

#[test]
fn in_cluster_token_rotation_is_read_within_a_minute() {
    let api_port = free_port();
    in_pod(
        "in_cluster_token_rotation_is_read_within_a_minute",
        api_port,
        api_port,
        |port| {
            let api = pod_cluster(port, "first");
            let source = start(options(None, None));
            assert_first_sync(&source, "first token");

            // kubelet rotates the token; the server stops accepting the old one.
            write(Path::new(SERVICE_ACCOUNT_DIR), "token", "second");
            api.set_bearer_tokens(&["second"]);
            api.drop_watches();
            health_where(&source, WAIT, |h| {
                h.last_error.as_deref().is_some_and(|e| e.contains("401"))
            });
            api.apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "after-rotation", "namespace": "prod"},
                "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": "10.244.1.9"},
            }))
            .expect("apply");
            let deadline = Instant::now() + TOKEN_RELOAD + WAIT;
            loop {
                let left = deadline
                    .checked_duration_since(Instant::now())
                    .unwrap_or_else(|| {
                        panic!(
                            "the new token was never used: {:?}, {:?}",
                            api.auth_counts(),
                            source.health()
                        )
                    });
                if let Some(state) = next_state(&source, left) {
                    if state
                        .pods
                        .iter()
                        .any(|p| p.metadata.name.as_deref() == Some("after-rotation"))
                    {
                        break;
                    }
                }
            }
        },
    );
}
