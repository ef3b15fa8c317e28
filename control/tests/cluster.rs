//! Cluster state from real Kubernetes object YAML: the testbed's cluster files, kubectl dumps,
//! validation errors, EndpointSlice derivation and the polling file source.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use control::cluster::{
    load_file, parse_str, ClusterError, ClusterState, FileSource, ENDPOINTSLICE_CONTROLLER,
    MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;

fn clusters_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testbed/clusters")
}

fn parse(text: &str) -> ClusterState {
    match parse_str(text, "cluster.yaml") {
        Ok(state) => state,
        Err(e) => panic!("expected the text to parse, got: {e}"),
    }
}

/// The error message for `text`, which must fail to parse.
fn error_of(text: &str) -> String {
    match parse_str(text, "cluster.yaml") {
        Ok(state) => panic!("expected an error, parsed: {state:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error message {message:?} does not mention {part:?}"
        );
    }
}

const NODE1: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels:
    topology.kubernetes.io/zone: zone-a
spec:
  podCIDR: 10.244.1.0/24
status:
  addresses:
  - type: InternalIP
    address: 172.18.0.11
";

fn pod(name: &str, labels: &str, ip: Option<&str>) -> String {
    let status = ip.map_or(String::new(), |ip| format!("status:\n  podIP: {ip}\n"));
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n  \
         nodeName: node1\n  containers:\n  - name: c\n    image: busybox\n    ports:\n    - name: \
         http\n      containerPort: 8080\n{status}"
    )
}

fn service(name: &str, selector: &str, target_port: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: \
         10.96.0.10\n  selector: {selector}\n  ports:\n  - name: web\n    port: 80\n    \
         targetPort: {target_port}\n"
    )
}

fn derived_for<'a>(
    slices: &'a [std::sync::Arc<EndpointSlice>],
    service: &str,
) -> Vec<&'a EndpointSlice> {
    slices
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == Some(service)
        })
        .map(|s| &**s)
        .collect()
}

fn addresses(slice: &EndpointSlice) -> Vec<&str> {
    slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter().map(String::as_str))
        .collect()
}

// ---------------------------------------------------------------- the testbed's files

#[test]
fn demo_file_parses_into_one_node_two_pods_and_svc_b() {
    let state = load_file(&clusters_dir().join("demo.yaml")).expect("demo.yaml parses");
    assert_eq!(state.nodes.len(), 1);
    assert_eq!(state.namespaces.len(), 1);
    assert_eq!(state.services.len(), 1);
    let node = state.node_info("node1").expect("node1 is usable");
    assert_eq!(node.name, "node1");
    assert_eq!(node.pod_cidr, "10.244.1.0/24".parse().expect("cidr"));
    assert_eq!(node.gateway, Ipv4Addr::new(10, 244, 1, 1));
    assert_eq!(node.internal_ip, Ipv4Addr::new(172, 18, 0, 11));
    let pods: Vec<String> = state.pods_on("node1").map(ClusterState::pod_key).collect();
    assert_eq!(pods, ["default/pod-a", "default/pod-b"]);

    let slices = state.effective_endpoint_slices();
    let svc_b = derived_for(&slices, "svc-b");
    assert_eq!(svc_b.len(), 1, "one derived slice for svc-b: {slices:?}");
    assert_eq!(addresses(svc_b[0]), ["10.244.1.11"]);
    let ports = svc_b[0].ports.as_deref().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(8080));
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
}

#[test]
fn two_node_file_has_two_usable_nodes_and_a_cross_node_service() {
    let state = load_file(&clusters_dir().join("two-node.yaml")).expect("two-node.yaml parses");
    let node1 = state.node_info("node1").expect("node1");
    let node2 = state.node_info("node2").expect("node2");
    assert_eq!(node1.internal_ip, Ipv4Addr::new(172, 18, 0, 11));
    assert_eq!(node2.internal_ip, Ipv4Addr::new(172, 18, 0, 12));
    assert_eq!(node2.pod_cidr, "10.244.2.0/24".parse().expect("cidr"));
    assert_eq!(node2.gateway, Ipv4Addr::new(10, 244, 2, 1));
    assert_eq!(state.pods_on("node1").count(), 2);
    assert_eq!(state.pods_on("node2").count(), 1);

    let slices = state.effective_endpoint_slices();
    let web = derived_for(&slices, "web");
    assert_eq!(web.len(), 1);
    assert_eq!(addresses(web[0]), ["10.244.1.11", "10.244.2.10"]);
    let nodes: Vec<_> = web[0]
        .endpoints
        .iter()
        .map(|e| e.node_name.as_deref().expect("nodeName"))
        .collect();
    assert_eq!(nodes, ["node1", "node2"]);
    // targetPort: http resolved through the pods' container ports.
    assert_eq!(web[0].ports.as_deref().expect("ports")[0].port, Some(8080));
}

#[test]
fn kubectl_dump_parses_with_server_fields_and_skipped_kinds() {
    let state =
        load_file(&clusters_dir().join("kubectl-get-all.yaml")).expect("kubectl dump parses");
    assert_eq!(state.nodes.len(), 1);
    assert_eq!(state.namespaces.len(), 1);
    assert_eq!(state.pods.len(), 1, "Deployment and ReplicaSet are skipped");
    assert_eq!(state.services.len(), 2);
    assert_eq!(state.endpoint_slices.len(), 2);
    let node = state.node_info("talos-cp-1").expect("node");
    assert_eq!(node.gateway, Ipv4Addr::new(10, 244, 0, 1));
    assert_eq!(node.internal_ip, Ipv4Addr::new(192, 168, 122, 10));
    // Every Service is covered by a slice in the dump: nothing is derived.
    assert_eq!(state.effective_endpoint_slices(), state.endpoint_slices);
}

#[test]
fn derived_slice_matches_what_the_controller_wrote_in_the_dump() {
    let mut state =
        load_file(&clusters_dir().join("kubectl-get-all.yaml")).expect("kubectl dump parses");
    let is_kube_dns = |s: &EndpointSlice| s.metadata.name.as_deref() == Some("kube-dns-m7r4q");
    let written = state
        .endpoint_slices
        .iter()
        .find(|s| is_kube_dns(s))
        .cloned()
        .expect("controller-written slice in the dump");
    state.endpoint_slices.retain(|s| !is_kube_dns(s));
    let slices = state.effective_endpoint_slices();
    let derived = derived_for(&slices, "kube-dns");
    assert_eq!(derived.len(), 1);
    assert_eq!(derived[0].address_type, written.address_type);
    assert_eq!(derived[0].endpoints, written.endpoints);
    let mut derived_ports = derived[0].ports.clone().expect("ports");
    let mut written_ports = written.ports.clone().expect("ports");
    let by_name = |p: &k8s_openapi::api::discovery::v1::EndpointPort| p.name.clone();
    derived_ports.sort_by_key(by_name);
    written_ports.sort_by_key(by_name);
    assert_eq!(derived_ports, written_ports);
}

// ---------------------------------------------------------------- stream shapes

#[test]
fn kubectl_list_documents_and_empty_documents_are_read() {
    let text = format!(
        "---\n# only a comment\n---\napiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \
         \"\"\nitems:\n- {}\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p1\n    \
         namespace: prod\n  spec:\n    nodeName: node1\n    containers:\n    - name: c\n      \
         image: busybox\n---\n",
        NODE1.trim_end().replace('\n', "\n  ")
    );
    let state = parse(&text);
    assert_eq!(state.nodes.len(), 1);
    assert_eq!(state.pods.len(), 1);
    assert_eq!(ClusterState::pod_key(&state.pods[0]), "prod/p1");
}

#[test]
fn typed_list_kinds_like_pod_list_are_read() {
    let text = "apiVersion: v1\nkind: ServiceList\nitems:\n- apiVersion: v1\n  kind: Service\n  \
                metadata:\n    name: s\n  spec:\n    ports:\n    - port: 53\n      protocol: UDP\n";
    let state = parse(text);
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        state.services[0].metadata.namespace.as_deref(),
        Some("default"),
        "namespace defaults to default"
    );
}

#[test]
fn unknown_kinds_are_skipped() {
    let text = format!(
        "{NODE1}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  \
         replicas: \"not even valid\"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: \
         cm\ndata:\n  a: b\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  \
         kind: ReplicaSet\n  metadata:\n    name: rs\n"
    );
    let state = parse(&text);
    assert_eq!(state.nodes.len(), 1);
    assert!(state.pods.is_empty() && state.services.is_empty());
}

#[test]
fn objects_are_sorted_by_namespace_and_name() {
    let text = format!(
        "{NODE1}{}{}{}",
        pod("zeta", "{}", None),
        pod("alpha", "{}", None),
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: omega\n  namespace: a-first\n"
    );
    let state = parse(&text);
    let keys: Vec<_> = state
        .pods
        .iter()
        .map(|p| ClusterState::pod_key(p))
        .collect();
    assert_eq!(keys, ["a-first/omega", "default/alpha", "default/zeta"]);
}

// ---------------------------------------------------------------- errors

#[test]
fn type_error_names_document_object_and_field_path() {
    let text = format!(
        "{NODE1}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n---\napiVersion: \
         v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: x\n    \
         ports:\n    - containerPort: x\n"
    );
    assert_eq!(
        error_of(&text),
        "cluster.yaml: document 3 (Pod default/web): spec.containers[0].ports[0].containerPort: \
         invalid type: string \"x\", expected i32"
    );
}

#[test]
fn broken_yaml_syntax_gives_line_and_column() {
    let text = format!("{NODE1}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n");
    let error = parse_str(&text, "cluster.yaml").expect_err("broken YAML");
    match &error {
        ClusterError::Yaml { document, line, .. } => {
            assert_eq!(*document, 2);
            assert!(*line >= 17, "line {line} is inside the second document");
        }
        other => panic!("expected a YAML error, got {other:?}"),
    }
    assert_mentions(&error.to_string(), &["cluster.yaml", "document 2", "line "]);
}

#[test]
fn missing_name_is_an_error() {
    let message = error_of(&format!(
        "{NODE1}---\napiVersion: v1\nkind: Service\nmetadata: {{}}\n"
    ));
    assert_mentions(
        &message,
        &[
            "document 2",
            "Service default/<unnamed>",
            "metadata.name",
            "missing",
        ],
    );
}

#[test]
fn node_pod_cidr_must_be_an_ipv4_network() {
    for (cidr, why) in [
        ("fd00::/64", "IPv6"),
        ("10.244.1.0/33", "not a CIDR"),
        ("banana", "not a CIDR"),
        ("10.244.1.7/24", "host bits"),
    ] {
        let message = error_of(&NODE1.replace("10.244.1.0/24", cidr));
        assert_mentions(&message, &["document 1", "Node node1", "spec.podCIDR", why]);
    }
}

#[test]
fn node_needs_an_ipv4_internal_ip() {
    let external_only = NODE1.replace("InternalIP", "ExternalIP");
    let ipv6_only = NODE1.replace("172.18.0.11", "fd00::11");
    let no_status = NODE1.split("status:").next().expect("prefix").to_owned();
    for text in [external_only, ipv6_only, no_status] {
        let message = error_of(&text);
        assert_mentions(
            &message,
            &["document 1", "Node node1", "status.addresses", "InternalIP"],
        );
    }
    let garbage = error_of(&NODE1.replace("172.18.0.11", "172.18.0.300"));
    assert_mentions(
        &garbage,
        &["Node node1", "status.addresses[0].address", "not an IP"],
    );
}

#[test]
fn pod_node_name_must_refer_to_a_node_in_the_file() {
    let text = format!(
        "{NODE1}{}",
        pod("web", "{}", None).replace("node1", "node9")
    );
    let message = error_of(&text);
    assert_mentions(
        &message,
        &["document 2", "Pod default/web", "spec.nodeName", "node9"],
    );
}

#[test]
fn duplicate_objects_are_an_error() {
    let text = format!(
        "{NODE1}{}{}",
        pod("web", "{}", None),
        pod("web", "{app: x}", None)
    );
    let message = error_of(&text);
    assert_mentions(
        &message,
        &["document 3", "Pod default/web", "duplicate", "document 2"],
    );
    // Same name in another namespace or of another kind is not a duplicate.
    let text = format!(
        "{NODE1}{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: other\n{}",
        pod("web", "{}", None),
        service("web", "{app: x}", "80")
    );
    assert_eq!(parse(&text).pods.len(), 2);
}

#[test]
fn service_cluster_ip_must_be_ipv4_unless_none() {
    let bad = service("s", "{app: x}", "80").replace("10.96.0.10", "fd00::10");
    let message = error_of(&bad);
    assert_mentions(
        &message,
        &["document 1", "Service default/s", "spec.clusterIP", "IPv6"],
    );
    let headless = service("s", "{app: x}", "80").replace("10.96.0.10", "None");
    assert_eq!(parse(&headless).services.len(), 1);
}

#[test]
fn ports_must_be_in_range() {
    let cases = [
        (service("s", "{}", "80").replace("port: 80", "port: 0"), "spec.ports[0].port"),
        (service("s", "{}", "70000"), "spec.ports[0].targetPort"),
        (
            format!("{NODE1}{}", pod("p", "{}", None).replace("8080", "65536")),
            "spec.containers[0].ports[0].containerPort",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: e\n\
             addressType: IPv4\nendpoints: []\nports:\n- port: -1\n"
                .to_owned(),
            "ports[0].port",
        ),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: np\nspec:\n  \
             podSelector: {}\n  ingress:\n  - ports:\n    - port: 99999\n"
                .to_owned(),
            "spec.ingress[0].ports[0].port",
        ),
    ];
    for (text, field) in cases {
        let message = error_of(&text);
        assert_mentions(&message, &["cluster.yaml: document", field, "out of range"]);
    }
}

#[test]
fn wrong_api_version_missing_kind_and_non_objects_are_errors() {
    let wrong = error_of(&NODE1.replace("apiVersion: v1", "apiVersion: v2"));
    assert_mentions(
        &wrong,
        &["document 1", "Node node1", "apiVersion", "v1", "v2"],
    );
    let no_kind = error_of("apiVersion: v1\nmetadata:\n  name: x\n");
    assert_mentions(&no_kind, &["document 1", "kind", "missing"]);
    let scalar = error_of(&format!("{NODE1}---\njust a string\n"));
    assert_mentions(&scalar, &["document 2", "expected a Kubernetes object"]);
}

#[test]
fn cluster_scoped_objects_must_not_have_a_namespace() {
    let message = error_of(&NODE1.replace("name: node1", "name: node1\n  namespace: default"));
    assert_mentions(
        &message,
        &["Node node1", "metadata.namespace", "cluster-scoped"],
    );
}

#[test]
fn missing_file_error_names_the_path() {
    let path = clusters_dir().join("no-such-cluster.yaml");
    let message = load_file(&path).expect_err("missing file").to_string();
    assert_mentions(&message, &["no-such-cluster.yaml", "cannot read"]);
}

// ---------------------------------------------------------------- EndpointSlice derivation

#[test]
fn derived_slice_has_matching_pods_with_ips_only() {
    let text = format!(
        "{NODE1}{}{}{}{}{}",
        pod("match-1", "{app: web, tier: x}", Some("10.244.1.5")),
        pod("match-2", "{app: web}", Some("10.244.1.6")),
        pod("other", "{app: db}", Some("10.244.1.7")),
        pod("no-ip", "{app: web}", None),
        service("web", "{app: web}", "8080"),
    );
    let slices = parse(&text).effective_endpoint_slices();
    let web = derived_for(&slices, "web");
    assert_eq!(web.len(), 1);
    let slice = web[0];
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(addresses(slice), ["10.244.1.5", "10.244.1.6"]);
    assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
    let labels = slice.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(ENDPOINTSLICE_CONTROLLER)
    );
    let endpoint = &slice.endpoints[0];
    let target = endpoint.target_ref.as_ref().expect("targetRef");
    assert_eq!(target.kind.as_deref(), Some("Pod"));
    assert_eq!(target.name.as_deref(), Some("match-1"));
    assert_eq!(endpoint.node_name.as_deref(), Some("node1"));
    assert_eq!(endpoint.zone.as_deref(), Some("zone-a"));
    let conditions = endpoint.conditions.as_ref().expect("conditions");
    assert_eq!(
        conditions.ready,
        Some(true),
        "no Ready condition counts as ready"
    );
    assert_eq!(conditions.terminating, Some(false));
    assert_eq!(slice.ports.as_deref().expect("ports")[0].port, Some(8080));
}

#[test]
fn derived_readiness_follows_the_pod_ready_condition() {
    let not_ready = format!(
        "{}  conditions:\n  - type: Ready\n    status: \"False\"\n",
        pod("p", "{app: web}", Some("10.244.1.5"))
    );
    let text = format!("{NODE1}{not_ready}{}", service("web", "{app: web}", "80"));
    let slices = parse(&text).effective_endpoint_slices();
    let conditions = derived_for(&slices, "web")[0].endpoints[0]
        .conditions
        .clone()
        .expect("conditions");
    assert_eq!(conditions.ready, Some(false));
    assert_eq!(conditions.serving, Some(false));
}

#[test]
fn named_target_port_resolves_per_pod_and_unresolved_pods_lose_that_port() {
    let other_port =
        pod("renamed", "{app: web}", Some("10.244.1.7")).replace("name: http", "name: web");
    let text = format!(
        "{NODE1}{}{other_port}{}",
        pod("named", "{app: web}", Some("10.244.1.6")),
        service("web", "{app: web}", "http"),
    );
    let slices = parse(&text).effective_endpoint_slices();
    let web = derived_for(&slices, "web");
    assert_eq!(web.len(), 2, "one slice per distinct port list: {web:?}");
    let resolved = web
        .iter()
        .find(|s| addresses(s) == ["10.244.1.6"])
        .expect("slice of the pod with port http");
    assert_eq!(
        resolved.ports.as_deref().expect("ports")[0].port,
        Some(8080)
    );
    let unresolved = web
        .iter()
        .find(|s| addresses(s) == ["10.244.1.7"])
        .expect("slice of the pod without port http");
    assert_eq!(unresolved.ports.as_deref(), Some(&[][..]));
}

#[test]
fn service_selecting_nothing_gets_an_empty_placeholder_slice() {
    let text = format!(
        "{NODE1}{}{}",
        pod("p", "{app: db}", Some("10.244.1.5")),
        service("web", "{app: web}", "80")
    );
    let slices = parse(&text).effective_endpoint_slices();
    let web = derived_for(&slices, "web");
    assert_eq!(web.len(), 1);
    assert!(web[0].endpoints.is_empty());
}

#[test]
fn service_without_selector_gets_no_slice() {
    let text = service("ext", "{}", "80");
    assert!(parse(&text).effective_endpoint_slices().is_empty());
}

#[test]
fn slice_in_the_file_wins_over_derivation() {
    let text = format!(
        "{NODE1}{}{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: web-abcde\n  labels:\n    kubernetes.io/service-name: web\naddressType: \
         IPv4\nendpoints:\n- addresses: [10.9.9.9]\nports:\n- name: web\n  port: 9999\n",
        pod("p", "{app: web}", Some("10.244.1.5")),
        service("web", "{app: web}", "80")
    );
    let slices = parse(&text).effective_endpoint_slices();
    let web = derived_for(&slices, "web");
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].metadata.name.as_deref(), Some("web-abcde"));
    assert_eq!(addresses(web[0]), ["10.9.9.9"]);
}

// ---------------------------------------------------------------- FileSource

#[test]
fn file_source_reports_changes_errors_and_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.yaml");
    let good = std::fs::read_to_string(clusters_dir().join("demo.yaml")).expect("demo.yaml");
    std::fs::write(&path, &good).expect("write");
    let mut source = FileSource::new(&path, Duration::ZERO);

    let first = source
        .poll()
        .expect("first poll reads")
        .expect("demo parses");
    assert_eq!(first.pods.len(), 2);
    assert!(source.poll().is_none(), "unchanged file reports nothing");

    let three_pods = format!("{good}{}", pod("pod-c", "{app: c}", Some("10.244.1.12")));
    std::fs::write(&path, &three_pods).expect("write");
    let changed = source
        .poll()
        .expect("change is reported")
        .expect("still parses");
    assert_eq!(changed.pods.len(), 3);

    std::fs::write(&path, format!("{three_pods}---\nkind: [broken\n")).expect("write");
    let broken = source.poll().expect("broken edit is reported");
    assert!(
        matches!(broken, Err(ClusterError::Yaml { .. })),
        "{broken:?}"
    );
    assert!(
        source.poll().is_none(),
        "same broken content is reported once"
    );

    std::fs::write(&path, &three_pods).expect("write");
    let fixed = source
        .poll()
        .expect("fix is reported")
        .expect("parses again");
    assert_eq!(fixed, changed);

    std::fs::remove_file(&path).expect("remove");
    let missing = source.poll().expect("removal is reported");
    let message = missing.expect_err("missing file").to_string();
    assert_mentions(&message, &["cluster.yaml", "cannot read"]);
}

#[test]
fn file_source_reads_at_most_once_per_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, NODE1).expect("write");
    let mut source = FileSource::new(&path, Duration::from_secs(5));
    let start = Instant::now();
    assert!(matches!(source.poll_at(start), Some(Ok(_))));
    std::fs::write(&path, NODE1.replace("node1", "node2")).expect("write");
    assert!(
        source.poll_at(start + Duration::from_secs(1)).is_none(),
        "too early to read"
    );
    let later = source
        .poll_at(start + Duration::from_secs(5))
        .expect("read after interval");
    assert!(later.expect("parses").node("node2").is_some());
}

// ---------------------------------------------------------------- robustness

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_str_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = parse_str(&text, "fuzz.yaml");
    }

    #[test]
    fn parse_str_never_panics_on_mutated_demo_yaml(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, "[ -~\n]{0,4}"), 1..8)
    ) {
        let demo = include_str!("../../testbed/clusters/demo.yaml");
        let mut text: Vec<char> = demo.chars().collect();
        for (at, op, insert) in edits {
            let i = at.index(text.len().max(1)).min(text.len());
            match op {
                0 => { text.drain(i..(i + 4).min(text.len())); }
                1 => { text.splice(i..i, insert.chars()); }
                _ => { text.splice(i..(i + insert.len()).min(text.len()), insert.chars()); }
            }
        }
        let text: String = text.into_iter().collect();
        let _ = parse_str(&text, "demo.yaml");
    }
}
