//! Unit tests of the pieces behind the public API; file-level behaviour is in
//! `control/tests/cluster.rs`.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn parse(text: &str) -> ClusterState {
    match parse_str(text, "unit.yaml") {
        Ok(state) => state,
        Err(e) => panic!("expected the text to parse, got: {e}"),
    }
}

fn node(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {spec}\nstatus:\n  \
         addresses:\n  - type: InternalIPv6Hostname\n    address: x\n  - type: InternalIP\n    \
         address: fd00::1\n  - type: InternalIP\n    address: 172.18.0.5\n"
    )
}

#[test]
fn location_display_names_file_document_item_and_object() {
    let at = Location {
        origin: "c.yaml".into(),
        document: 2,
        item: Some(4),
        object: Some("Pod ns/p".into()),
    };
    assert_eq!(at.to_string(), "c.yaml: document 2 items[4] (Pod ns/p)");
    let bare = Location {
        item: None,
        object: None,
        ..at
    };
    assert_eq!(bare.to_string(), "c.yaml: document 2");
}

#[test]
fn first_host_needs_room_for_gateway_and_pods() {
    let net = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
    assert_eq!(
        first_host(net("10.244.1.0/24")),
        Some(Ipv4Addr::new(10, 244, 1, 1))
    );
    assert_eq!(
        first_host(net("10.0.0.4/30")),
        Some(Ipv4Addr::new(10, 0, 0, 5))
    );
    assert_eq!(first_host(net("10.0.0.4/31")), None);
    assert_eq!(first_host(net("10.0.0.4/32")), None);
}

#[test]
fn node_info_takes_first_ipv4_internal_ip_and_falls_back_to_pod_cidrs() {
    let state = parse(&node("n", "{podCIDRs: [\"fd00:10::/64\", 10.244.7.0/24]}"));
    let info = state.node_info("n").expect("usable node");
    assert_eq!(
        info.pod_cidr,
        "10.244.7.0/24".parse::<Ipv4Net>().expect("cidr")
    );
    assert_eq!(info.gateway, Ipv4Addr::new(10, 244, 7, 1));
    assert_eq!(info.internal_ip, Ipv4Addr::new(172, 18, 0, 5));
}

#[test]
fn node_info_errors_name_the_node_and_what_is_missing() {
    let state = parse(&format!(
        "{}{}",
        node("no-cidr", "{}"),
        node("tiny", "{podCIDR: 10.0.0.8/31}")
    ));
    let missing = state
        .node_info("ghost")
        .expect_err("no such node")
        .to_string();
    assert!(
        missing.contains("ghost") && missing.contains("not in the cluster state"),
        "{missing}"
    );
    let no_cidr = state
        .node_info("no-cidr")
        .expect_err("no podCIDR")
        .to_string();
    assert!(
        no_cidr.contains("no-cidr") && no_cidr.contains("spec.podCIDR"),
        "{no_cidr}"
    );
    let tiny = state.node_info("tiny").expect_err("/31").to_string();
    assert!(
        tiny.contains("10.0.0.8/31") && tiny.contains("/30"),
        "{tiny}"
    );
}

#[test]
fn pod_key_defaults_the_namespace() {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    };
    assert_eq!(ClusterState::pod_key(&pod), "default/p");
}

#[test]
fn pods_on_filters_by_node_name() {
    let text = format!(
        "{}{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p1}}\nspec: {{nodeName: a}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p2}}\nspec: {{nodeName: b}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: unscheduled}}\n",
        node("a", "{}"),
        node("b", "{}")
    );
    let state = parse(&text);
    let on_a: Vec<_> = state.pods_on("a").map(ClusterState::pod_key).collect();
    assert_eq!(on_a, ["default/p1"]);
    assert_eq!(state.pods_on("c").count(), 0);
}

/// A pod on no node with the given extra metadata/spec/status YAML (flow style).
fn pod(name: &str, extra_meta: &str, spec: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}{extra_meta}}}\n\
         spec: {spec}\nstatus: {status}\n"
    )
}

const SERVICE: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
    spec: {selector: {app: web}, ports: [{name: dns, port: 53, protocol: UDP, targetPort: dns}]}\n";

const UDP_DNS_CONTAINER: &str =
    "{containers: [{name: c, ports: [{name: dns, containerPort: 5353, protocol: UDP}]}]}";

#[test]
fn derivation_skips_terminal_pods_and_marks_terminating_ones() {
    let text = format!(
        "{}{}{}{SERVICE}",
        pod(
            "done",
            "",
            UDP_DNS_CONTAINER,
            "{podIP: 10.0.0.1, phase: Succeeded}"
        ),
        pod(
            "leaving",
            ", deletionTimestamp: \"2026-11-25T10:00:00Z\"",
            UDP_DNS_CONTAINER,
            "{podIP: 10.0.0.2, phase: Running}"
        ),
        pod(
            "running",
            "",
            UDP_DNS_CONTAINER,
            "{podIP: 10.0.0.3, phase: Running}"
        ),
    );
    let slices = parse(&text).effective_endpoint_slices();
    assert_eq!(slices.len(), 1);
    let endpoints = &slices[0].endpoints;
    let names: Vec<_> = endpoints
        .iter()
        .map(|e| {
            e.target_ref
                .as_ref()
                .and_then(|t| t.name.as_deref())
                .unwrap_or("")
        })
        .collect();
    assert_eq!(names, ["leaving", "running"]);
    let leaving = endpoints[0].conditions.as_ref().expect("conditions");
    assert_eq!(
        (leaving.ready, leaving.serving, leaving.terminating),
        (Some(false), Some(true), Some(true))
    );
    let ports = slices[0].ports.as_deref().expect("ports");
    assert_eq!(ports[0].port, Some(5353));
    assert_eq!(ports[0].protocol.as_deref(), Some("UDP"));
}

#[test]
fn named_port_must_match_protocol_too() {
    let tcp_dns = UDP_DNS_CONTAINER.replace("UDP", "TCP");
    let text = format!("{}{SERVICE}", pod("p", "", &tcp_dns, "{podIP: 10.0.0.1}"));
    let slices = parse(&text).effective_endpoint_slices();
    assert_eq!(slices.len(), 1);
    assert_eq!(
        slices[0].endpoints.len(),
        1,
        "the pod stays, without the port"
    );
    assert_eq!(slices[0].ports.as_deref(), Some(&[][..]));
}

#[test]
fn publish_not_ready_addresses_makes_endpoints_ready() {
    let service = SERVICE.replace("spec: {", "spec: {publishNotReadyAddresses: true, ");
    let text = format!(
        "{}{service}",
        pod(
            "p",
            "",
            UDP_DNS_CONTAINER,
            "{podIP: 10.0.0.1, conditions: [{type: Ready, status: \"False\"}]}"
        )
    );
    let slices = parse(&text).effective_endpoint_slices();
    let conditions = slices[0].endpoints[0]
        .conditions
        .as_ref()
        .expect("conditions");
    assert_eq!(
        (conditions.ready, conditions.serving),
        (Some(true), Some(true))
    );
}

#[test]
fn derived_slices_hold_at_most_max_endpoints_each() {
    let mut text = String::from(SERVICE);
    let count = MAX_ENDPOINTS_PER_SLICE + 5;
    for i in 0..count {
        let status = format!("{{podIP: 10.0.{}.{}}}", i / 200, i % 200 + 1);
        text.push_str(&pod(&format!("p{i:03}"), "", UDP_DNS_CONTAINER, &status));
    }
    let slices = parse(&text).effective_endpoint_slices();
    let sizes: Vec<_> = slices.iter().map(|s| s.endpoints.len()).collect();
    assert_eq!(sizes, [MAX_ENDPOINTS_PER_SLICE, 5]);
    let names: Vec<_> = slices
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["web-derived-0", "web-derived-1"]);
}

#[test]
fn file_source_ignores_rewrites_with_identical_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    let text = node("n", "{}");
    std::fs::write(&path, &text).expect("write");
    let mut source = FileSource::new(&path, Duration::ZERO);
    assert!(matches!(source.poll(), Some(Ok(_))));
    std::fs::write(&path, &text).expect("rewrite");
    assert!(source.poll().is_none(), "same bytes, new mtime: no change");
    assert_eq!(source.path(), path.as_path());
    assert_eq!(source.poll_interval(), Duration::ZERO);
}

#[test]
fn not_utf8_file_is_a_read_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("latin1.yaml");
    std::fs::write(&path, b"kind: \xff\n").expect("write");
    let message = load_file(&path).expect_err("not UTF-8").to_string();
    assert!(
        message.contains("latin1.yaml") && message.contains("UTF-8"),
        "{message}"
    );
}

#[test]
fn changed_kinds_name_the_tables_they_feed() {
    use super::ChangedKinds as K;
    assert!(K::ENDPOINT_SLICES.services() && !K::ENDPOINT_SLICES.policy());
    assert!(K::SERVICES.services() && !K::SERVICES.policy());
    assert!(!K::NETWORK_POLICIES.services() && K::NETWORK_POLICIES.policy());
    assert!(!K::HOST_POLICIES.services() && K::HOST_POLICIES.policy());
    assert!(!K::NAMESPACES.services() && K::NAMESPACES.policy());
    for both in [K::PODS, K::NODES, K::ALL] {
        assert!(both.services() && both.policy());
    }
    assert!(!K::NONE.services() && !K::NONE.policy() && K::NONE.is_empty());
    let u = K::PODS.union(K::SERVICES);
    assert!(u.contains(K::PODS) && u.contains(K::SERVICES) && !u.contains(K::NODES));
}
