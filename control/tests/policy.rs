//! NetworkPolicy / HostNetworkPolicy compiler tests, no root needed.
//!
//! 1. The table of cases in `control::policy::xyz` (Kubernetes docs and upstream e2e scenarios on
//!    the upstream x/y/z model, host policies, audit, bad objects): every probe goes through the
//!    compiled tables of both nodes (`PolicyTable::check` / `check_host`) AND the reference
//!    evaluator, and both must give the expected verdict.
//! 2. Random clusters, policies and connections (seeded, deterministic): the compiled table of
//!    each node and the reference evaluator must agree checkpoint by checkpoint.
//! 3. The CLI's explanation text for the docs example.

use std::net::Ipv4Addr;

use control::cluster::{parse_str, ClusterState};
use control::policy::reference::{self, Checkpoint};
use control::policy::xyz::{self, Case, CASES, NODES};
use control::policy::{compile, Evaluator, PolicyOptions, Verdict};
use dataplane::policy::{policy_port, PolicyTable, PolicyVerdict};

fn verdict(v: PolicyVerdict) -> Verdict {
    match v {
        PolicyVerdict::Allow => Verdict::Allow,
        PolicyVerdict::Audit(_) => Verdict::Audit,
        PolicyVerdict::Deny(_) => Verdict::Deny,
    }
}

fn state_of(case: &Case) -> ClusterState {
    let text = format!("{}---\n{}", xyz::cluster_yaml(), case.objects);
    match parse_str(&text, case.name) {
        Ok(s) => s,
        Err(e) => panic!("case {}: objects do not parse: {e}", case.name),
    }
}

fn tables(state: &ClusterState, opts: &PolicyOptions) -> Vec<(&'static str, PolicyTable)> {
    NODES
        .iter()
        .map(|(node, ..)| match compile(state, node, opts, 1) {
            Ok(c) => (*node, c.table),
            Err(e) => panic!("compile for {node}: {e}"),
        })
        .collect()
}

/// The compiled verdict for a whole connection: the worst of every node's `check` and the
/// destination node's `check_host` (when the destination is a node address).
fn compiled_verdict(
    tables: &[(&str, PolicyTable)],
    node_ips: &[(&str, Ipv4Addr)],
    is_pod: bool,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let port = policy_port(protocol, port);
    let mut worst = Verdict::Allow;
    for (node, table) in tables {
        worst = worst.max(verdict(table.check(src, dst, protocol, port)));
        let host_dst = node_ips.iter().any(|(n, ip)| n == node && *ip == dst);
        if host_dst && !is_pod {
            worst = worst.max(verdict(table.check_host(src, protocol, port)));
        }
    }
    worst
}

#[test]
fn every_case_of_the_table_through_the_compiler_and_the_reference() {
    let node_ips: Vec<(&str, Ipv4Addr)> = NODES
        .iter()
        .filter_map(|(n, ip, ..)| Some((*n, ip.parse().ok()?)))
        .collect();
    let mut names = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in CASES {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        let state = state_of(case);
        let opts = PolicyOptions {
            audit: case.audit_all,
            ..PolicyOptions::default()
        };
        let tables = tables(&state, &opts);
        let eval = Evaluator::new(&state, &opts);
        let warnings: Vec<String> = eval.warnings().iter().map(ToString::to_string).collect();
        match case.warning {
            Some(w) => {
                if !warnings.iter().any(|x| x.contains(w)) {
                    failures.push(format!(
                        "{}: expected a warning with {w:?}, got {warnings:?}",
                        case.name
                    ));
                }
            }
            None => {
                if !warnings.is_empty() {
                    failures.push(format!("{}: unexpected warnings {warnings:?}", case.name));
                }
            }
        }
        for probe in case.probes {
            probes += 1;
            let (Some(src), Some(dst)) = (xyz::addr_of(probe.from), xyz::addr_of(probe.to)) else {
                panic!("{}: probe {probe:?} names an unknown pod", case.name);
            };
            let trace = eval.evaluate(src, dst, probe.protocol, probe.port);
            let is_pod = trace.to.pod.is_some();
            let compiled = compiled_verdict(
                &tables,
                &node_ips,
                is_pod,
                src,
                dst,
                probe.protocol,
                probe.port,
            );
            let what = format!(
                "{}: {} -> {} {}/{}",
                case.name,
                probe.from,
                probe.to,
                probe.port,
                reference::proto_name(probe.protocol)
            );
            if trace.verdict != probe.expect {
                failures.push(format!(
                    "{what}: reference says {:?}, expected {:?}\n{}",
                    trace.verdict,
                    probe.expect,
                    trace.render()
                ));
            }
            if compiled != probe.expect {
                failures.push(format!(
                    "{what}: compiled table says {compiled:?}, expected {:?}\n{}",
                    probe.expect,
                    trace.render()
                ));
            }
        }
    }
    assert!(probes > 150, "the table shrank to {probes} probes");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_trace_explains_the_docs_example() {
    let Some(case) = CASES.iter().find(|c| c.name == "test-network-policy") else {
        panic!("case missing")
    };
    let state = state_of(case);
    let opts = PolicyOptions::default();
    let Ok(compiled) = compile(&state, "node1", &opts, 7) else {
        panic!("compile")
    };
    // y/c (node2) -> x/a (node1) on 6379: allowed by the namespaceSelector peer (from[1]).
    let report = reference::trace(
        &state,
        &opts,
        &compiled.table,
        "node1",
        "y/c",
        "x/a",
        6,
        6379,
    );
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    let text = report.render();
    assert!(text.contains("verdict: ALLOWED"), "{text}");
    assert!(
        text.contains("ingress x/a [on node1]: isolated by x/test-network-policy; allowed by x/test-network-policy ingress[0] from[1] ports[0]"),
        "{text}"
    );
    assert!(
        text.contains("egress  y/c [on node2]: not isolated"),
        "{text}"
    );
    assert!(
        text.contains("dataplane on node1: allowed (policy generation 7)"),
        "{text}"
    );

    // x/a -> y/a on 80: denied by x/a's egress (only 10.0.0.0/24:5978 allowed).
    let report = reference::trace(&state, &opts, &compiled.table, "node1", "x/a", "y/a", 6, 80);
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    let text = report.render();
    assert!(text.contains("verdict: DENIED (egress of x/a)"), "{text}");
    assert!(
        text.contains("egress  x/a [on node1]: isolated by x/test-network-policy; no rule allows y/a (10.244.2.13) port 80/TCP -> denied"),
        "{text}"
    );
    assert!(
        text.contains(
            "dataplane on node1: denied (policy generation 7), drop reason policy_denied_egress"
        ),
        "{text}"
    );
    let d = report.dataplane.as_ref();
    assert_eq!(
        d.map(|d| (d.verdict, d.reference)),
        Some((Verdict::Deny, Verdict::Deny))
    );
    // JSON round trip (the API's wire format).
    let json = serde_json::to_string(&report).unwrap_or_default();
    let back: Result<reference::TraceReport, _> = serde_json::from_str(&json);
    assert_eq!(back.ok().as_ref(), Some(&report));

    // Errors: unknown pod, not an endpoint, bad port.
    let e = reference::trace(
        &state,
        &opts,
        &compiled.table,
        "node1",
        "x/zz",
        "x/a",
        6,
        80,
    );
    assert!(
        e.as_ref()
            .err()
            .map(ToString::to_string)
            .is_some_and(|m| m.contains("pod x/zz is not in the cluster state")),
        "{e:?}"
    );
    let e = reference::trace(
        &state,
        &opts,
        &compiled.table,
        "node1",
        "frontend",
        "x/a",
        6,
        80,
    );
    assert!(e.is_err(), "{e:?}");
    for bad in ["0", "70000", "80/icmp", "http", ""] {
        let e = reference::parse_port_spec(bad);
        assert!(
            e.as_ref()
                .err()
                .map(ToString::to_string)
                .is_some_and(|m| m.contains("N/udp")),
            "{bad}: {e:?}"
        );
    }
    assert_eq!(reference::parse_port_spec("53/udp").ok(), Some((17, 53)));
    assert_eq!(reference::parse_port_spec("443").ok(), Some((6, 443)));
    assert_eq!(reference::parse_port_spec("9/SCTP").ok(), Some((132, 9)));
}

#[test]
fn host_trace_names_the_failsafe_port() {
    let Some(case) = CASES.iter().find(|c| c.name == "host-deny-all-and-audit") else {
        panic!("case missing")
    };
    let state = state_of(case);
    let opts = PolicyOptions::default();
    let Ok(compiled) = compile(&state, "node1", &opts, 3) else {
        panic!("compile")
    };
    assert!(compiled.host_isolated);
    let report = reference::trace(
        &state,
        &opts,
        &compiled.table,
        "node1",
        "8.8.8.8",
        "172.18.0.11",
        6,
        22,
    );
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    let text = report.render();
    assert!(
        text.contains("host    node node1 [on node1]: always allowed (failsafe port tcp:22)"),
        "{text}"
    );
    let report = reference::trace(
        &state,
        &opts,
        &compiled.table,
        "node1",
        "8.8.8.8",
        "172.18.0.11",
        6,
        443,
    );
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    assert!(
        report
            .render()
            .contains("verdict: DENIED (host firewall of node node1)"),
        "{}",
        report.render()
    );
    assert_eq!(report.trace.checkpoints.len(), 1);
    assert_eq!(report.trace.checkpoints[0].checkpoint, Checkpoint::Host);
    assert!(
        report.render().contains("drop reason host_policy_denied"),
        "{}",
        report.render()
    );
    // Asked on node2, the host checkpoint of node1 is not enforced there.
    let Ok(other) = compile(&state, "node2", &opts, 3) else {
        panic!("compile")
    };
    let report = reference::trace(
        &state,
        &opts,
        &other.table,
        "node2",
        "8.8.8.8",
        "172.18.0.11",
        6,
        443,
    );
    assert!(report.is_ok_and(|r| r.dataplane.is_none()
        && r.render()
            .contains("no checkpoint of this connection is enforced here")));
}

// ---------------------------------------------------------------------------------------------
// Random clusters: compiled table == reference evaluator.

/// splitmix64: small, seeded, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NS: [&str; 3] = ["red", "blue", "green"];
const LABEL_KEYS: [&str; 2] = ["app", "tier"];
const LABEL_VALUES: [&str; 3] = ["web", "db", "cache"];
const NAMED: [(&str, u16, &str); 5] = [
    ("http", 80, "TCP"),
    ("http", 8080, "TCP"),
    ("dns", 53, "UDP"),
    ("metrics", 9100, "TCP"),
    ("dns", 53, "TCP"),
];
const PORTS: [u16; 9] = [22, 53, 80, 81, 443, 8080, 8472, 9100, 6443];
const EXTERNAL: [&str; 3] = ["8.8.8.8", "10.9.0.5", "192.168.7.1"];
const CIDRS: [(&str, &[&str]); 6] = [
    ("10.244.0.0/16", &["10.244.2.0/24"]),
    ("10.244.1.0/24", &[]),
    ("10.0.0.0/8", &["10.9.0.0/16", "10.244.1.0/25"]),
    ("0.0.0.0/0", &["10.0.0.0/8"]),
    ("172.18.0.0/24", &[]),
    ("8.8.8.8/32", &[]),
];

fn labels_json(rng: &mut Rng) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for k in LABEL_KEYS {
        if rng.chance(60) {
            m.insert(k.into(), (*rng.pick(&LABEL_VALUES)).into());
        }
    }
    serde_json::Value::Object(m)
}

fn selector_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(5) {
        0 => json!({}),
        1 | 2 => json!({"matchLabels": {*rng.pick(&LABEL_KEYS): *rng.pick(&LABEL_VALUES)}}),
        _ => {
            let key = *rng.pick(&LABEL_KEYS);
            let expr = match rng.below(4) {
                0 => {
                    json!({"key": key, "operator": "In", "values": [*rng.pick(&LABEL_VALUES), *rng.pick(&LABEL_VALUES)]})
                }
                1 => json!({"key": key, "operator": "NotIn", "values": [*rng.pick(&LABEL_VALUES)]}),
                2 => json!({"key": key, "operator": "Exists"}),
                _ => json!({"key": key, "operator": "DoesNotExist"}),
            };
            json!({"matchExpressions": [expr]})
        }
    }
}

fn rule_json(rng: &mut Rng, peers_field: &str) -> serde_json::Value {
    use serde_json::json;
    let mut rule = serde_json::Map::new();
    match rng.below(4) {
        0 => {}
        1 => {
            rule.insert(peers_field.into(), json!([]));
        }
        _ => {
            let peers: Vec<serde_json::Value> = (0..1 + rng.below(2))
                .map(|_| match rng.below(5) {
                    0 => json!({"podSelector": selector_json(rng)}),
                    1 => json!({"namespaceSelector": selector_json(rng)}),
                    2 => json!({"podSelector": selector_json(rng), "namespaceSelector": selector_json(rng)}),
                    _ => {
                        let (cidr, except) = *rng.pick(&CIDRS);
                        if except.is_empty() || rng.chance(30) {
                            json!({"ipBlock": {"cidr": cidr}})
                        } else {
                            json!({"ipBlock": {"cidr": cidr, "except": except}})
                        }
                    }
                })
                .collect();
            rule.insert(peers_field.into(), json!(peers));
        }
    }
    if rng.chance(70) {
        let ports: Vec<serde_json::Value> = (0..1 + rng.below(2))
            .map(|_| {
                let mut p = serde_json::Map::new();
                match rng.below(4) {
                    0 => {}
                    1 => {
                        p.insert("protocol".into(), json!("TCP"));
                    }
                    2 => {
                        p.insert("protocol".into(), json!("UDP"));
                    }
                    _ => {
                        p.insert("protocol".into(), json!("SCTP"));
                    }
                }
                match rng.below(5) {
                    0 => {}
                    1 => {
                        let names = ["http", "dns", "metrics", "missing"];
                        p.insert("port".into(), json!(*rng.pick(&names)));
                    }
                    2 => {
                        let lo = *rng.pick(&PORTS);
                        p.insert("port".into(), json!(lo));
                        p.insert("endPort".into(), json!(lo + rng.below(600) as u16));
                    }
                    _ => {
                        p.insert("port".into(), json!(*rng.pick(&PORTS)));
                    }
                }
                serde_json::Value::Object(p)
            })
            .collect();
        rule.insert("ports".into(), json!(ports));
    } else if rng.chance(20) {
        rule.insert("ports".into(), json!([]));
    }
    serde_json::Value::Object(rule)
}

fn audit_meta(rng: &mut Rng, meta: &mut serde_json::Value) {
    if rng.chance(25) {
        meta["annotations"] = serde_json::json!({"policy.sluice.io/audit": "true"});
    }
}

/// A random cluster file: 2 nodes, 3 namespaces, 1-8 pods, 0-4 NetworkPolicies, 0-2
/// HostNetworkPolicies. Returns (YAML, pod addresses).
fn random_cluster(rng: &mut Rng) -> (String, Vec<Ipv4Addr>) {
    use serde_json::json;
    let mut docs = Vec::new();
    for (name, ip, cidr, _) in NODES {
        docs.push(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels_json(rng)},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}));
    }
    for ns in NS {
        if rng.chance(80) {
            docs.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels_json(rng)}}));
        }
    }
    let mut addrs = Vec::new();
    for i in 0..1 + rng.below(8) {
        let node = rng.below(2);
        let addr = Ipv4Addr::new(10, 244, node as u8 + 1, 10 + i as u8);
        addrs.push(addr);
        let ports: Vec<serde_json::Value> = NAMED
            .iter()
            .filter(|_| rng.chance(40))
            .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
            .collect();
        // Port names must be unique in a pod: keep the first of each name.
        let mut seen = std::collections::BTreeSet::new();
        let ports: Vec<serde_json::Value> = ports
            .into_iter()
            .filter(|p| seen.insert(p["name"].to_string()))
            .collect();
        docs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": *rng.pick(&NS), "labels": labels_json(rng)},
            "spec": {"nodeName": NODES[node].0, "containers": [{"name": "c", "image": "i", "ports": ports}]},
            "status": {"podIP": addr.to_string()}}));
    }
    for i in 0..rng.below(5) {
        let mut meta = json!({"name": format!("np{i}"), "namespace": *rng.pick(&NS)});
        audit_meta(rng, &mut meta);
        let mut spec = serde_json::Map::new();
        spec.insert("podSelector".into(), selector_json(rng));
        match rng.below(4) {
            0 => {}
            1 => {
                spec.insert("policyTypes".into(), json!(["Ingress"]));
            }
            2 => {
                spec.insert("policyTypes".into(), json!(["Egress"]));
            }
            _ => {
                spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
            }
        }
        for (dir, field) in [("ingress", "from"), ("egress", "to")] {
            if rng.chance(70) {
                let rules: Vec<_> = (0..rng.below(3)).map(|_| rule_json(rng, field)).collect();
                spec.insert(dir.into(), json!(rules));
            }
        }
        docs.push(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta, "spec": spec}),
        );
    }
    for i in 0..rng.below(3) {
        let mut meta = json!({"name": format!("hp{i}")});
        audit_meta(rng, &mut meta);
        let mut spec = serde_json::Map::new();
        if rng.chance(70) {
            spec.insert("nodeSelector".into(), selector_json(rng));
        }
        if rng.chance(80) {
            let rules: Vec<_> = (0..rng.below(3)).map(|_| rule_json(rng, "from")).collect();
            spec.insert("ingress".into(), json!(rules));
        }
        docs.push(
            json!({"apiVersion": "policy.sluice.io/v1alpha1", "kind": "HostNetworkPolicy",
            "metadata": meta, "spec": spec}),
        );
    }
    let text = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n");
    (text, addrs)
}

#[test]
fn random_clusters_compiled_tables_agree_with_the_reference() {
    const CLUSTERS: u64 = 400;
    const CONNECTIONS: usize = 40;
    let mut checked = [0usize; 3]; // allow, audit, deny (reference verdicts on some node)
    for seed in 0..CLUSTERS {
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
        let (text, pods) = random_cluster(&mut rng);
        let state = match parse_str(&text, "random.yaml") {
            Ok(s) => s,
            Err(e) => panic!("seed {seed}: generated cluster does not parse: {e}\n{text}"),
        };
        let opts = PolicyOptions {
            audit: rng.chance(15),
            ..PolicyOptions::default()
        };
        let tables = tables(&state, &opts);
        let eval = Evaluator::new(&state, &opts);
        let mut ends: Vec<Ipv4Addr> = pods.clone();
        ends.extend(
            NODES
                .iter()
                .filter_map(|(_, ip, ..)| ip.parse::<Ipv4Addr>().ok()),
        );
        ends.extend(EXTERNAL.iter().filter_map(|ip| ip.parse::<Ipv4Addr>().ok()));
        for _ in 0..CONNECTIONS {
            let src = *rng.pick(&ends);
            let dst = *rng.pick(&ends);
            let protocol = *rng.pick(&[6u8, 6, 17, 132, 1]);
            let port = if protocol == 1 { 0 } else { *rng.pick(&PORTS) };
            let trace = eval.evaluate(src, dst, protocol, port);
            for (node, table) in &tables {
                let pport = policy_port(protocol, port);
                let want = trace.pod_verdict_on(node);
                let got = verdict(table.check(src, dst, protocol, pport));
                let host_checkpoint = trace
                    .checkpoints
                    .iter()
                    .any(|c| c.checkpoint == Checkpoint::Host && c.node == *node);
                let host = host_checkpoint.then(|| {
                    (
                        trace.host_verdict_on(node),
                        verdict(table.check_host(src, protocol, pport)),
                    )
                });
                let mismatch = want != got || host.is_some_and(|(w, g)| w != g);
                assert!(
                    !mismatch,
                    "seed {seed} node {node}: {src} -> {dst} {port}/{protocol}: reference pod \
                     {want:?} vs table {got:?}; host (reference, table) {host:?}\naudit_all \
                     {}\n{}\n--- cluster:\n{text}",
                    opts.audit,
                    trace.render()
                );
                let v = trace.verdict_on(node);
                checked[v as usize] += 1;
            }
        }
    }
    // The generator must reach every verdict, or the comparison proves little.
    assert!(
        checked.iter().all(|&n| n > 100),
        "verdict mix too thin: {checked:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The HostNetworkPolicy kind in the cluster file.

#[test]
fn host_policies_parse_and_bad_ones_name_document_object_and_field() {
    let good = format!(
        "{}---\n{}",
        xyz::cluster_yaml(),
        r#"apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: ssh-and-web, annotations: {policy.sluice.io/audit: "false"}}
spec:
  nodeSelector: {matchLabels: {pool: workers}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
    ports: [{port: 443, protocol: TCP}]
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: a-first}
"#
    );
    let state = match parse_str(&good, "c.yaml") {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let names: Vec<_> = state
        .host_policies
        .iter()
        .map(|p| p.metadata.name.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(names, ["a-first", "ssh-and-web"], "sorted by name");

    let documents = xyz::cluster_yaml().matches("\n---\n").count() + 1;
    for (object, want) in [
        (
            "apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\nmetadata: {name: h}\nspec:\n  egress: []\n",
            "(HostNetworkPolicy h): spec.egress: unknown field `egress`, expected `nodeSelector` or `ingress`",
        ),
        (
            "apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\nmetadata: {name: h, namespace: x}\n",
            "(HostNetworkPolicy h): metadata.namespace: HostNetworkPolicy is cluster-scoped",
        ),
        (
            "apiVersion: policy.sluice.io/v1\nkind: HostNetworkPolicy\nmetadata: {name: h}\n",
            "(HostNetworkPolicy h): apiVersion: HostNetworkPolicy must have apiVersion policy.sluice.io/v1alpha1",
        ),
        (
            "apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\nmetadata: {name: h}\nspec:\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n",
            "(HostNetworkPolicy h): spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\nmetadata: {name: h}\nspec:\n  ingress:\n  - ports: [{port: 0}]\n",
            "(HostNetworkPolicy h): spec.ingress[0].ports[0].port: port 0 is out of range",
        ),
        (
            "apiVersion: policy.sluice.io/v1alpha1\nkind: HostNetworkPolicy\nmetadata: {name: h}\nspec:\n  nodeSelector: {matchLabels: 3}\n",
            "(HostNetworkPolicy h): spec.nodeSelector.matchLabels: invalid type",
        ),
    ] {
        let text = format!("{}---\n{object}", xyz::cluster_yaml());
        let err = parse_str(&text, "c.yaml").err().map(|e| e.to_string()).unwrap_or_default();
        let at = format!("c.yaml: document {} ", documents + 1);
        assert!(err.starts_with(&at) && err.contains(want), "{object}\n-> {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// `sluice policy trace` against an agent socket (a stand-in that answers with the real report).

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

#[test]
fn the_cli_asks_the_agent_and_prints_the_explanation() {
    use control::api::{Request, Response, SOCKET_NAME};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    // No agent yet: a clear error naming the socket.
    let out = std::process::Command::new(SLUICE)
        .args([
            "policy", "trace", "--from", "x/a", "--to", "y/a", "--port", "80",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .output();
    let Ok(out) = out else {
        panic!("running sluice")
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the sluice agent") && stderr.contains(SOCKET_NAME),
        "{stderr}"
    );
    // A bad port never reaches the agent.
    let out = std::process::Command::new(SLUICE)
        .args([
            "policy", "trace", "--from", "x/a", "--to", "y/a", "--port", "80/icmp",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .output();
    let stderr = out
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    assert!(
        stderr.contains("--port \"80/icmp\": expected N, N/tcp"),
        "{stderr}"
    );

    let Some(case) = CASES.iter().find(|c| c.name == "test-network-policy") else {
        panic!("case missing")
    };
    let state = state_of(case);
    let opts = PolicyOptions::default();
    let Ok(compiled) = compile(&state, "node1", &opts, 7) else {
        panic!("compile")
    };
    let listener = match UnixListener::bind(dir.path().join(SOCKET_NAME)) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    // Two connections: the text answer and the JSON answer; then one with an unknown pod.
    let agent = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for _ in 0..3 {
            let Ok((stream, _)) = listener.accept() else {
                break;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let request: Option<Request> = serde_json::from_str(line.trim_end()).ok();
            let response = match &request {
                Some(Request::PolicyTrace {
                    from,
                    to,
                    protocol,
                    port,
                }) => match reference::trace(
                    &state,
                    &opts,
                    &compiled.table,
                    "node1",
                    from,
                    to,
                    *protocol,
                    *port,
                ) {
                    Ok(r) => Response {
                        policy_trace: Some(r),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e.to_string()),
                },
                _ => Response::error("unexpected request"),
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = (&stream).write_all(&out);
            requests.push(request);
        }
        requests
    });
    let run = |args: &[&str]| {
        let out = std::process::Command::new(SLUICE)
            .args(["policy", "trace"])
            .args(args)
            .arg("--state-dir")
            .arg(dir.path())
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => panic!("{e}"),
        }
    };
    let (ok, stdout, stderr) = run(&["--from", "x/a", "--to", "10.0.0.7", "--port", "5978/tcp"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("verdict: ALLOWED"), "{stdout}");
    assert!(
        stdout.contains("allowed by x/test-network-policy egress[0] to[0] ports[0]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("dataplane on node1: allowed (policy generation 7)"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run(&[
        "--from", "y/c", "--to", "x/a", "--port", "6379/udp", "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: Result<reference::TraceReport, _> = serde_json::from_str(&stdout);
    let Ok(report) = report else {
        panic!("{stdout}")
    };
    assert_eq!(report.trace.verdict, Verdict::Deny);
    assert_eq!(report.trace.protocol, 17);
    let (ok, _, stderr) = run(&["--from", "x/nope", "--to", "x/a", "--port", "80"]);
    assert!(
        !ok && stderr.contains("pod x/nope is not in the cluster state"),
        "{stderr}"
    );
    let requests = agent.join().unwrap_or_default();
    assert_eq!(
        requests.first().cloned().flatten(),
        Some(Request::PolicyTrace {
            from: "x/a".into(),
            to: "10.0.0.7".into(),
            protocol: 6,
            port: 5978
        })
    );
}

#[test]
fn the_agent_flag_default_is_the_default_failsafe_list() {
    let out = std::process::Command::new(SLUICE)
        .args(["run", "--help"])
        .output();
    let help = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let Some(default) = help
        .split("--host-failsafe")
        .nth(1)
        .and_then(|s| s.split("[default: ").nth(1))
        .and_then(|s| s.split(']').next())
    else {
        panic!("no --host-failsafe default in:\n{help}")
    };
    let mut expected = control::policy::DEFAULT_FAILSAFE.to_vec();
    expected.sort();
    assert_eq!(control::policy::parse_failsafe(default), Ok(expected));
}
