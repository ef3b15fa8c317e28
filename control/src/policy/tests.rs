//! Unit tests of the policy module's parts: selectors, failsafe parsing, validation warnings,
//! identities, determinism. The table of end-to-end cases is in `control/tests/policy.rs`.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::identity::{pod_views, Identities, FIRST_POD_IDENTITY};
use super::model::policies;
use super::selector::{Labels, Selector};
use super::*;
use crate::cluster::{parse_str, ClusterState};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn selector(labels_: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
    LabelSelector {
        match_labels: (!labels_.is_empty()).then(|| {
            labels_
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    }
}

fn model() -> ClusterState {
    match parse_str(&xyz::cluster_yaml(), "xyz.yaml") {
        Ok(s) => s,
        Err(e) => panic!("the x/y/z model does not parse: {e}"),
    }
}

#[test]
fn selectors_and_their_operators() {
    let ok = |s: LabelSelector| match Selector::new(&s) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let web = labels(&[("app", "web"), ("tier", "front")]);
    let db = labels(&[("app", "db")]);
    let none = Labels::new();

    let everything = ok(LabelSelector::default());
    assert!(everything.matches(&web) && everything.matches(&none) && everything.is_everything());

    let app_web = ok(selector(&[("app", "web")], vec![]));
    assert!(app_web.matches(&web) && !app_web.matches(&db) && !app_web.matches(&none));

    let in_ = ok(selector(&[], vec![expr("app", "In", &["web", "api"])]));
    assert!(in_.matches(&web) && !in_.matches(&db) && !in_.matches(&none));
    let not_in = ok(selector(&[], vec![expr("app", "NotIn", &["web"])]));
    assert!(!not_in.matches(&web) && not_in.matches(&db) && not_in.matches(&none));
    let exists = ok(selector(&[], vec![expr("tier", "Exists", &[])]));
    assert!(exists.matches(&web) && !exists.matches(&db));
    let absent = ok(selector(&[], vec![expr("tier", "DoesNotExist", &[])]));
    assert!(!absent.matches(&web) && absent.matches(&db) && absent.matches(&none));

    // matchLabels AND matchExpressions.
    let both = ok(selector(
        &[("app", "web")],
        vec![expr("tier", "In", &["back"])],
    ));
    assert!(!both.matches(&web));
    assert!(both.matches(&labels(&[("app", "web"), ("tier", "back")])));
}

#[test]
fn invalid_selectors_name_the_field_and_say_what_to_do() {
    let err = |s: LabelSelector| {
        Selector::new(&s)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(selector(&[], vec![expr("app", "Equals", &["x"])]));
    assert!(
        e.contains("matchExpressions[0].operator") && e.contains("In, NotIn"),
        "{e}"
    );
    let e = err(selector(&[], vec![expr("app", "In", &[])]));
    assert!(
        e.contains("matchExpressions[0].values") && e.contains("at least one"),
        "{e}"
    );
    let e = err(selector(
        &[],
        vec![expr("a", "Exists", &[]), expr("app", "Exists", &["x"])],
    ));
    assert!(
        e.contains("matchExpressions[1].values") && e.contains("takes no values"),
        "{e}"
    );
    let e = err(selector(&[], vec![expr("", "Exists", &[])]));
    assert!(e.contains("matchExpressions[0].key"), "{e}");
}

#[test]
fn failsafe_lists_parse_and_refuse_garbage() {
    let parsed = parse_failsafe("tcp:22, udp:8472@nodes,tcp:50000-50001,SCTP:9");
    assert_eq!(
        parsed
            .as_ref()
            .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Ok(vec![
            "tcp:22".to_owned(),
            "tcp:50000-50001".to_owned(),
            "udp:8472@nodes".to_owned(),
            "sctp:9".to_owned(),
        ])
    );
    assert_eq!(parse_failsafe("none"), Ok(Vec::new()));
    for bad in [
        "22",
        "icmp:1",
        "tcp:0",
        "tcp:70000",
        "tcp:9-8",
        "tcp:",
        "tcp:22@everyone",
    ] {
        let e = parse_failsafe(bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(bad) && e.contains("PROTO:PORT"), "{bad}: {e}");
    }
    // The defaults round-trip through the flag syntax.
    let text: Vec<String> = DEFAULT_FAILSAFE.iter().map(ToString::to_string).collect();
    let mut expected = DEFAULT_FAILSAFE.to_vec();
    expected.sort();
    assert_eq!(parse_failsafe(&text.join(",")), Ok(expected));
}

fn policy_with_port(port: NetworkPolicyPort) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some("bad-port".into()),
            namespace: Some("x".into()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(&[("pod", "a")], vec![])),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![port]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(81)),
                        ..Default::default()
                    }]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// endPort with a named port, or without a port, cannot come through the file parser (the API
/// server refuses them too), but can come from elsewhere: the compiler skips the rule.
#[test]
fn end_port_with_a_named_port_or_without_a_port_skips_the_rule() {
    for (port, field) in [
        (
            NetworkPolicyPort {
                port: Some(IntOrString::String("serve-80-tcp".into())),
                end_port: Some(90),
                protocol: None,
            },
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            NetworkPolicyPort {
                port: None,
                end_port: Some(90),
                protocol: None,
            },
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            NetworkPolicyPort {
                port: Some(IntOrString::Int(90)),
                end_port: Some(80),
                protocol: None,
            },
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            NetworkPolicyPort {
                port: Some(IntOrString::Int(0)),
                end_port: None,
                protocol: None,
            },
            "spec.ingress[0].ports[0].port",
        ),
    ] {
        let mut state = model();
        state
            .network_policies
            .push(std::sync::Arc::new(policy_with_port(port)));
        let parsed = policies(&state, false);
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        let w = &parsed.warnings[0];
        assert_eq!(w.object, "NetworkPolicy x/bad-port");
        assert_eq!(w.field, field);
        assert!(w.message.contains("rule is ignored"), "{w}");
        // The policy stays, with only its good rule: x/a is isolated, 81 allowed, 80 not.
        let rules = parsed.network[0].ingress.as_deref().unwrap_or_default();
        assert_eq!(rules.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1]);

        let compiled = match compile(&state, "node1", &PolicyOptions::default(), 1) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(compiled.warnings, parsed.warnings);
        let (ya, xa) = (xyz::pod_addr("y", "a"), xyz::pod_addr("x", "a"));
        let (Some(ya), Some(xa)) = (ya, xa) else {
            panic!("model addresses")
        };
        use dataplane::policy::PolicyVerdict;
        assert_eq!(compiled.table.check(ya, xa, 6, 81), PolicyVerdict::Allow);
        assert!(matches!(
            compiled.table.check(ya, xa, 6, 80),
            PolicyVerdict::Deny(_)
        ));
    }
}

#[test]
fn unknown_policy_types_and_audit_values_are_warnings() {
    let text = format!(
        "{}---\n{}",
        xyz::cluster_yaml(),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: x}
spec:
  podSelector: {}
  policyTypes: [ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: maybe-audit
  namespace: y
  annotations: {policy.sluice.io/audit: "yes"}
spec:
  podSelector: {}
"#
    );
    let state = match parse_str(&text, "c.yaml") {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let parsed = policies(&state, false);
    let text: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text[0].starts_with("NetworkPolicy x/typo: spec.policyTypes[0]: unknown policy type")
            && text[0].contains("whole policy is ignored"),
        "{text:?}"
    );
    assert!(
        text[1].starts_with(
            "NetworkPolicy y/maybe-audit: metadata.annotations[policy.sluice.io/audit]"
        ) && text[1].contains("enforced"),
        "{text:?}"
    );
    // The typo'd policy is gone; the other is enforced.
    assert_eq!(parsed.network.len(), 1);
    assert!(!parsed.network[0].audit);
}

#[test]
fn identities_group_pods_that_policy_cannot_tell_apart() {
    let state = model();
    let (pods, warnings) = pod_views(&state);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(pods.len(), 9);
    let ids = Identities::new(&pods);
    // Every pod of the model differs by namespace or label: 9 identities, from 256 up.
    assert_eq!(ids.identities.len(), 9);
    assert_eq!(ids.identities[0].0, FIRST_POD_IDENTITY);
    // Two pods that differ only by name share an identity; a different named port splits.
    let extra = format!(
        "{}---\n{}",
        xyz::cluster_yaml(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a2, namespace: x, labels: {pod: a}}\n\
         spec:\n  nodeName: node1\n  containers:\n  - name: c\n    image: i\n    ports:\n    \
         - {name: serve-80-tcp, containerPort: 80}\n\
         status: {podIP: 10.244.1.99}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: x, labels: {pod: a}}\n\
         spec: {nodeName: node1, hostNetwork: true, containers: [{name: c, image: i}]}\n\
         status: {podIP: 172.18.0.11}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: x, labels: {pod: a}}\n\
         spec: {nodeName: node1, containers: [{name: c, image: i}]}\n\
         status: {phase: Succeeded, podIP: 10.244.1.98}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: x, labels: {pod: a}}\n\
         spec: {containers: [{name: c, image: i}]}\n"
    );
    let state = match parse_str(&extra, "c.yaml") {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let (pods, _) = pod_views(&state);
    let keys: Vec<&str> = pods.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"x/a2") && !keys.contains(&"x/host") && !keys.contains(&"x/done"));
    assert!(!keys.contains(&"x/pending"));
    let ids = Identities::new(&pods);
    assert_eq!(
        ids.identities.len(),
        10,
        "x/a2 has other named ports than x/a"
    );
}

#[test]
fn compiling_twice_gives_the_same_rules_and_changes_are_seen() {
    let case = xyz::CASES
        .iter()
        .find(|c| c.name == "test-network-policy")
        .copied();
    let Some(case) = case else {
        panic!("case missing")
    };
    let state = match parse_str(
        &format!("{}---\n{}", xyz::cluster_yaml(), case.objects),
        "c",
    ) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let opts = PolicyOptions::default();
    let a = compile(&state, "node1", &opts, 1).map(|c| c.table);
    let b = compile(&state, "node1", &opts, 2).map(|c| c.table);
    let (Ok(a), Ok(b)) = (a, b) else {
        panic!("compile failed")
    };
    assert!(a.same_rules(&b));
    assert_eq!((a.generation(), b.generation()), (1, 2));
    assert!(a.is_active());
    // Audit mode changes the rules.
    let audit = compile(
        &state,
        "node1",
        &PolicyOptions {
            audit: true,
            ..opts.clone()
        },
        3,
    );
    assert!(audit.is_ok_and(|c| !c.table.same_rules(&a)));
    // node2 has no pod selected by the policy (x/a is on node1): inactive table.
    let n2 = compile(&state, "node2", &opts, 4);
    assert!(n2.is_ok_and(|c| !c.table.is_active() && c.isolated_pods == 0));
}

/// Every verdict of `table` over the model's pods, two ports, TCP and UDP.
fn verdicts(table: &dataplane::policy::PolicyTable) -> Vec<String> {
    let mut out = Vec::new();
    let pods: Vec<(String, std::net::Ipv4Addr)> = ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b", "c"].map(move |p| (ns, p)))
        .filter_map(|(ns, p)| Some((format!("{ns}/{p}"), xyz::pod_addr(ns, p)?)))
        .collect();
    for (s, src) in &pods {
        for (d, dst) in &pods {
            for proto in [6u8, 17] {
                for port in [80u16, 81] {
                    let v = table.check(*src, *dst, proto, port);
                    out.push(format!("{s} -> {d} {proto}/{port}: {v:?}"));
                }
            }
        }
    }
    out
}

/// A policy kept (the same object) across the whole cached-compile test: x/a admits
/// namespaces labelled team=new and, from any namespace, pods labelled version=2. Its peer
/// selections are memoized once and must follow pods and namespaces that change later.
const CACHE_PROBE_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cache-probe, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: new}}
    - namespaceSelector: {}
      podSelector: {matchLabels: {version: \"2\"}}
";

/// The cached compile decides every flow as a fresh compile does while policies, pod labels
/// and namespace labels change underneath it, keeps the identity of pods that did not change,
/// and reuses its work. Per xyz case: (A) the case's policies replace the previous ones,
/// (B) y/b's labels toggle version=2 (a new kind of pod, which the probe policy's memoized
/// peer selection must take in), (C) namespace z's labels toggle team=new (its pods' memoized
/// views must be redone), (D) pod z/c is deleted, or comes back as a new object, (E) pod y/c
/// takes x/b's address (an address clash x/b wins), or gets its own back. A cache that kept a stale view, identity or peer selection fails
/// the verdict comparison; one that renumbered unchanged pods fails the identity check.
#[test]
fn cached_compile_decides_as_a_fresh_one_across_changes() {
    use dataplane::policy::PolicyVerdict;
    use std::sync::Arc;
    let opts = PolicyOptions::default();
    let mut state = model();
    let probe = match parse_str(CACHE_PROBE_POLICY, "probe") {
        Ok(s) => s.network_policies,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(probe.len(), 1);
    let mut caches = [Cache::new(), Cache::new()];
    let x_a = xyz::pod_addr("x", "a").expect("x/a");
    let y_b = xyz::pod_addr("y", "b").expect("y/b");
    let z_a = xyz::pod_addr("z", "a").expect("z/a");
    let mut compared = 0;
    let mut admitted_by_probe = [0usize; 2];
    let mut last_x_a_id = None;
    let mut removed_z_c = None;
    let mut clash_warnings = 0;
    for (n, case) in xyz::CASES.iter().enumerate() {
        let with_case = match parse_str(
            &format!("{}---\n{}", xyz::cluster_yaml(), case.objects),
            "c",
        ) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        for step in ['A', 'B', 'C', 'D', 'E'] {
            match step {
                'A' => {
                    // Only the policies are new objects; pods and namespaces stay the same.
                    state.network_policies = with_case.network_policies.clone();
                    state.network_policies.push(Arc::clone(&probe[0]));
                }
                'B' => {
                    let i = state
                        .pods
                        .iter()
                        .position(|p| ClusterState::pod_key(p) == "y/b")
                        .expect("y/b");
                    let labels = Arc::make_mut(&mut state.pods[i])
                        .metadata
                        .labels
                        .get_or_insert_with(Default::default);
                    if n % 2 == 0 {
                        labels.insert("version".into(), "2".into());
                    } else {
                        labels.remove("version");
                    }
                }
                'D' => {
                    // z/c leaves (n even) and comes back as a new object (n odd): the pods-only
                    // refresh must drop its view, then take the new one in.
                    match state
                        .pods
                        .iter()
                        .position(|p| ClusterState::pod_key(p) == "z/c")
                    {
                        Some(i) => {
                            removed_z_c = Some((*state.pods.remove(i)).clone());
                        }
                        None => {
                            let pod = removed_z_c.take().expect("z/c was removed");
                            let at = state
                                .pods
                                .iter()
                                .position(|p| ClusterState::pod_key(p).as_str() > "z/c")
                                .unwrap_or(state.pods.len());
                            state.pods.insert(at, Arc::new(pod));
                        }
                    }
                }
                'E' => {
                    // y/c takes x/b's address (n even: x/b, first in order, keeps it and a
                    // warning names y/c), then gets its own back.
                    let i = state
                        .pods
                        .iter()
                        .position(|p| ClusterState::pod_key(p) == "y/c")
                        .expect("y/c");
                    let x_b = xyz::pod_addr("x", "b").expect("x/b");
                    let y_c = xyz::pod_addr("y", "c").expect("y/c");
                    let addr = if n % 2 == 0 { x_b } else { y_c };
                    if let Some(status) = Arc::make_mut(&mut state.pods[i]).status.as_mut() {
                        status.pod_ip = Some(addr.to_string());
                        status.pod_ips = None;
                    }
                }
                _ => {
                    let i = state
                        .namespaces
                        .iter()
                        .position(|ns| ns.metadata.name.as_deref() == Some("z"))
                        .expect("z");
                    let labels = Arc::make_mut(&mut state.namespaces[i])
                        .metadata
                        .labels
                        .get_or_insert_with(Default::default);
                    if n % 2 == 0 {
                        labels.insert("team".into(), "new".into());
                    } else {
                        labels.remove("team");
                    }
                }
            }
            for (k, (cache, node)) in caches.iter_mut().zip(["node1", "node2"]).enumerate() {
                let cached = compile_cached(&state, node, &opts, 1, cache).expect("cached compile");
                cache.check_identities();
                let fresh = compile(&state, node, &opts, 1).expect("fresh compile");
                let (c, f) = (verdicts(&cached.table), verdicts(&fresh.table));
                let differ: Vec<_> = c.iter().zip(&f).filter(|(c, f)| c != f).collect();
                assert!(
                    c.len() == f.len() && differ.is_empty(),
                    "case {} step {step} on {node}: (cached, fresh) {differ:?}",
                    case.name
                );
                assert_eq!(
                    cached.isolated_pods, fresh.isolated_pods,
                    "case {} step {step}",
                    case.name
                );
                assert_eq!(
                    cached.warnings, fresh.warnings,
                    "case {} step {step}",
                    case.name
                );
                // The probe's own selections at work (where x/a is on this node and nothing
                // else already decides these flows): counted so the test sees they happen.
                let without_probe = {
                    let mut s = state.clone();
                    s.network_policies.pop();
                    compile(&s, node, &opts, 1).expect("compile without the probe")
                };
                for src in [y_b, z_a] {
                    let v = fresh.table.check(src, x_a, 6, 80);
                    if v == PolicyVerdict::Allow && v != without_probe.table.check(src, x_a, 6, 80)
                    {
                        admitted_by_probe[k] += 1;
                    }
                }
                compared += 1;
                clash_warnings += cached
                    .warnings
                    .iter()
                    .filter(|w| w.object == "Pod y/c" && w.field == "status.podIP")
                    .count();
            }
            // x/a never changes: its identity id stays the same in the cache.
            let id = caches[0].identities_of(x_a);
            if let Some(last) = last_x_a_id {
                assert_eq!(
                    Some(last),
                    id,
                    "case {} step {step}: x/a was renumbered",
                    case.name
                );
            }
            last_x_a_id = id;
        }
    }
    assert!(compared > 30);
    // The clash of step E was seen (and matched the fresh compile's warnings above).
    assert!(clash_warnings > 0);
    // The probe decided flows (on the node where x/a's ingress is enforced) after pods and
    // namespaces changed, so the comparison above covered its memoized selections.
    assert!(
        admitted_by_probe.iter().any(|&c| c > 4),
        "{admitted_by_probe:?}"
    );
}

/// When identity ids run out the cache numbers from the start again; memoised peer
/// selections (which name old ids) must not survive that.
#[test]
fn cached_compile_after_the_identity_numbering_restarts_decides_as_a_fresh_one() {
    use std::sync::Arc;
    let opts = PolicyOptions::default();
    let mut state = model();
    let probe = match parse_str(CACHE_PROBE_POLICY, "probe") {
        Ok(s) => s.network_policies,
        Err(e) => panic!("{e}"),
    };
    state.network_policies.extend(probe);
    let x_a = xyz::pod_addr("x", "a").expect("x/a");
    let y_b = xyz::pod_addr("y", "b").expect("y/b");
    let mut cache = Cache::new();
    let node = xyz::pod_node("x", "a").expect("x/a's node");
    compile_cached(&state, node, &opts, 1, &mut cache).expect("first compile");
    cache.set_next_identity(dataplane::policy::MAX_IDENTITY - 10);
    // y/b becomes a new kind of pod: its identity would be past the limit.
    let i = state
        .pods
        .iter()
        .position(|p| ClusterState::pod_key(p) == "y/b")
        .expect("y/b");
    Arc::make_mut(&mut state.pods[i])
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("version".into(), "2".into());
    let cached = compile_cached(&state, node, &opts, 2, &mut cache).expect("cached compile");
    let fresh = compile(&state, node, &opts, 2).expect("fresh compile");
    assert_eq!(verdicts(&cached.table), verdicts(&fresh.table));
    assert_eq!(
        cached.table.check(y_b, x_a, 6, 80),
        dataplane::policy::PolicyVerdict::Allow
    );
    // Numbered from the start again, as a fresh cache would.
    assert!(cache.identities_of(x_a).is_some_and(|id| id < 1000));
}
