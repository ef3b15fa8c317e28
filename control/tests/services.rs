//! Service translation from real Service / EndpointSlice / Pod / Node YAML, table-driven: each
//! case renders the plan as text lines (frontends, service entries, skip reasons) and compares
//! them with the expected lines.

use control::cluster::{parse_str, ClusterState};
use control::services::{
    translate, BackendState, FrontendKind, Protocol, Scope, SelectionMode, ServiceOptions,
    ServicePlan, DEFAULT_AFFINITY_TIMEOUT_SECONDS,
};

const THIS_NODE: &str = "node1";

const NODES: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node1
spec:
  podCIDR: 10.244.1.0/24
status:
  addresses:
  - type: InternalIP
    address: 172.18.0.11
  - type: Hostname
    address: node1
---
apiVersion: v1
kind: Node
metadata:
  name: node2
spec:
  podCIDR: 10.244.2.0/24
status:
  addresses:
  - type: InternalIP
    address: 172.18.0.12
";

fn parse(objects: &str) -> ClusterState {
    let text = format!("{NODES}---\n{objects}");
    match parse_str(&text, "cluster.yaml") {
        Ok(state) => state,
        Err(e) => panic!("fixture does not parse: {e}"),
    }
}

fn plan_of(objects: &str) -> ServicePlan {
    translate(&parse(objects), THIS_NODE, &ServiceOptions::default())
}

/// `address:port/PROTO kind -> ns/name:port scope[ etp-local]`
fn frontend_lines(plan: &ServicePlan) -> Vec<String> {
    plan.frontends
        .iter()
        .map(|f| {
            let service = &plan.services[f.service];
            format!(
                "{}:{}/{} {} -> {}:{} {}{}",
                f.address,
                f.port,
                f.protocol,
                f.kind.as_str(),
                service.service_key(),
                service.port_name,
                match f.scope {
                    Scope::Cluster => "cluster",
                    Scope::Local => "local",
                },
                if f.external_traffic_local {
                    " etp-local"
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// `ns/name:port port/PROTO [backend node state local, ...] cluster=[..] local=[..] ...`
fn service_lines(plan: &ServicePlan) -> Vec<String> {
    plan.services
        .iter()
        .map(|s| {
            let backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| {
                    format!(
                        "{} {} {}{}",
                        b.key(),
                        b.node_name.as_deref().unwrap_or("-"),
                        b.state.as_str(),
                        if b.local { " local" } else { "" }
                    )
                })
                .collect();
            let mut line = format!(
                "{}:{} {}/{} [{}] cluster={:?}",
                s.service_key(),
                s.port_name,
                s.port,
                s.protocol,
                backends.join(", "),
                s.cluster.backends
            );
            if s.cluster.terminating_fallback {
                line.push_str(" fallback");
            }
            if let Some(local) = &s.local {
                line.push_str(&format!(" local={:?}", local.backends));
                if local.terminating_fallback {
                    line.push_str(" fallback");
                }
            }
            if let Some(a) = s.affinity {
                line.push_str(&format!(" affinity={}", a.timeout_seconds));
            }
            if let Some(hc) = s.health_check_node_port {
                line.push_str(&format!(" hc={hc}"));
            }
            line
        })
        .collect()
}

struct Case {
    name: &'static str,
    objects: &'static str,
    frontends: &'static [&'static str],
    services: &'static [&'static str],
    /// (service, substring of the reason)
    skipped: &'static [(&'static str, &'static str)],
}

const WEB_SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: true, serving: true, terminating: false}
";

const CASES: &[Case] = &[
    Case {
        name: "clusterip, targetPort by number, slice given",
        objects: "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: true, serving: true, terminating: false}
",
        frontends: &["10.96.0.10:80/TCP clusterip -> default/web:http cluster"],
        services: &[
            "default/web:http 80/TCP [10.244.1.5:8080 node1 active local, \
                     10.244.2.7:8080 node2 active] cluster=[0, 1]",
        ],
        skipped: &[],
    },
    Case {
        name: "targetPort by name resolved per backend through derived slice port names",
        objects: "\
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  selector: {app: api}
  ports:
  - name: grpc
    port: 9000
    targetPort: grpc
  - name: metrics
    port: 9100
    protocol: UDP
    targetPort: 9100
---
apiVersion: v1
kind: Pod
metadata: {name: api-old, namespace: shop, labels: {app: api}}
spec:
  nodeName: node1
  containers:
  - name: c
    image: api:1
    ports: [{name: grpc, containerPort: 7000}]
status: {podIP: 10.244.1.8}
---
apiVersion: v1
kind: Pod
metadata: {name: api-new, namespace: shop, labels: {app: api}}
spec:
  nodeName: node2
  containers:
  - name: c
    image: api:2
    ports: [{name: grpc, containerPort: 7001}]
status: {podIP: 10.244.2.9}
",
        frontends: &[
            "10.96.0.20:9000/TCP clusterip -> shop/api:grpc cluster",
            "10.96.0.20:9100/UDP clusterip -> shop/api:metrics cluster",
        ],
        services: &[
            "shop/api:grpc 9000/TCP [10.244.1.8:7000 node1 active local, \
             10.244.2.9:7001 node2 active] cluster=[0, 1]",
            "shop/api:metrics 9100/UDP [10.244.1.8:9100 node1 active local, \
             10.244.2.9:9100 node2 active] cluster=[0, 1]",
        ],
        skipped: &[],
    },
    Case {
        name:
            "nodeport on this node's InternalIP and ExternalIP, loadbalancer ingress, externalIPs",
        objects: "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: 30080
status:
  loadBalancer:
    ingress:
    - ip: 192.0.2.10
    - hostname: lb.example.com
    - ip: 192.0.2.11
      ipMode: Proxy
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [10.244.2.7]
  nodeName: node2
",
        frontends: &[
            "10.96.0.10:80/TCP clusterip -> default/web:http cluster",
            "172.18.0.11:30080/TCP nodeport -> default/web:http cluster",
            "192.0.2.10:80/TCP loadbalancer -> default/web:http cluster",
            "198.51.100.7:80/TCP externalip -> default/web:http cluster",
        ],
        services: &["default/web:http 80/TCP [10.244.2.7:8080 node2 active] cluster=[0]"],
        skipped: &[("default/web", "192.0.2.11 has ipMode Proxy")],
    },
    Case {
        name: "headless, ExternalName, service-proxy-name label and SCTP are skipped with reasons",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ExternalName
  externalName: example.com
---
apiVersion: v1
kind: Service
metadata:
  name: other
  labels: {service.kubernetes.io/service-proxy-name: foo-proxy}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sig}
spec:
  clusterIP: 10.96.0.40
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
",
        frontends: &["10.96.0.40:3868/TCP clusterip -> default/sig:tcp cluster"],
        services: &["default/sig:tcp 3868/TCP [] cluster=[]"],
        skipped: &[
            ("default/db", "headless"),
            ("default/ext", "ExternalName"),
            (
                "default/other",
                "service.kubernetes.io/service-proxy-name=foo-proxy",
            ),
            (
                "default/sig",
                "sctp (3868/SCTP): protocol SCTP is not supported",
            ),
        ],
    },
    Case {
        name: "conditions: terminating-only used as fallback, not serving kept, nil means ready",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: false, serving: false, terminating: true}
- addresses: [10.244.2.8]
  nodeName: node2
  conditions: {ready: false, serving: false, terminating: false}
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mixed-1
  labels: {kubernetes.io/service-name: mixed}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.6]
  nodeName: node1
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.2.9]
  nodeName: node2
",
        frontends: &[
            "10.96.0.10:80/TCP clusterip -> default/web:http cluster",
            "10.96.0.11:80/TCP clusterip -> default/mixed:http cluster",
        ],
        services: &[
            "default/mixed:http 80/TCP [10.244.1.6:8080 node1 terminating local, \
             10.244.2.9:8080 node2 active] cluster=[1]",
            "default/web:http 80/TCP [10.244.1.5:8080 node1 terminating local, \
             10.244.2.7:8080 node2 not-serving, 10.244.2.8:8080 node2 not-serving] \
             cluster=[0] fallback",
        ],
        skipped: &[],
    },
    Case {
        name: "publishNotReadyAddresses makes every endpoint active",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: peers}
spec:
  clusterIP: 10.96.0.50
  publishNotReadyAddresses: true
  ports: [{name: gossip, port: 7946, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: peers-1
  labels: {kubernetes.io/service-name: peers}
addressType: IPv4
ports: [{name: gossip, port: 7946, protocol: UDP}]
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: false, serving: false, terminating: false}
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: false, serving: true, terminating: true}
",
        frontends: &["10.96.0.50:7946/UDP clusterip -> default/peers:gossip cluster"],
        services: &[
            "default/peers:gossip 7946/UDP [10.244.1.5:7946 node1 active local, \
                     10.244.2.7:7946 node2 active] cluster=[0, 1]",
        ],
        skipped: &[],
    },
    Case {
        name:
            "externalTrafficPolicy Local: local rotation on external frontends, healthCheckNodePort",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
---
WEB_SLICE",
        frontends: &[
            "10.96.0.10:80/TCP clusterip -> default/web:http cluster",
            "172.18.0.11:30080/TCP nodeport -> default/web:http local etp-local",
            "192.0.2.10:80/TCP loadbalancer -> default/web:http local etp-local",
        ],
        services: &[
            "default/web:http 80/TCP [10.244.1.5:8080 node1 active local, \
                     10.244.2.7:8080 node2 active] cluster=[0, 1] local=[0] hc=32100",
        ],
        skipped: &[],
    },
    Case {
        name: "internalTrafficPolicy Local: clusterip uses local backends only",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
WEB_SLICE",
        frontends: &[
            "10.96.0.10:80/TCP clusterip -> default/web:http local",
            "172.18.0.11:30080/TCP nodeport -> default/web:http cluster",
        ],
        services: &[
            "default/web:http 80/TCP [10.244.1.5:8080 node1 active local, \
                     10.244.2.7:8080 node2 active] cluster=[0, 1] local=[0]",
        ],
        skipped: &[],
    },
    Case {
        name: "session affinity ClientIP: default and explicit timeout",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web2}
spec:
  clusterIP: 10.96.0.12
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
WEB_SLICE",
        frontends: &[
            "10.96.0.10:80/TCP clusterip -> default/web:http cluster",
            "10.96.0.12:80/TCP clusterip -> default/web2:http cluster",
        ],
        services: &[
            "default/web:http 80/TCP [10.244.1.5:8080 node1 active local, \
             10.244.2.7:8080 node2 active] cluster=[0, 1] affinity=10800",
            "default/web2:http 80/TCP [] cluster=[] affinity=60",
        ],
        skipped: &[],
    },
    Case {
        name: "duplicate endpoint across slices keeps its best state; IPv6 slices ignored",
        objects: "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: other, port: 9999, protocol: TCP}]
endpoints:
- addresses: [10.244.2.7]
  nodeName: node2
  conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ['fd00::7']
  nodeName: node2
",
        frontends: &["10.96.0.10:80/TCP clusterip -> default/web:http cluster"],
        services: &["default/web:http 80/TCP [10.244.2.7:8080 node2 active] cluster=[0]"],
        skipped: &[],
    },
];

fn objects_of(case: &Case) -> String {
    case.objects.replace("WEB_SLICE", WEB_SLICE)
}

#[test]
fn translation_table() {
    for case in CASES {
        let plan = translate(
            &parse(&objects_of(case)),
            THIS_NODE,
            &ServiceOptions::default(),
        );
        assert_eq!(
            frontend_lines(&plan),
            case.frontends,
            "case {:?}: frontends",
            case.name
        );
        assert_eq!(
            service_lines(&plan),
            case.services,
            "case {:?}: services",
            case.name
        );
        assert_eq!(
            plan.skipped.len(),
            case.skipped.len(),
            "case {:?}: skipped {:?}",
            case.name,
            plan.skipped
        );
        for (service, reason) in case.skipped {
            assert!(
                plan.skipped
                    .iter()
                    .any(|(s, r)| s == service && r.contains(reason)),
                "case {:?}: no skip of {service} mentioning {reason:?} in {:?}",
                case.name,
                plan.skipped
            );
        }
        // Every rotation and Maglev entry points at a backend that may take new flows.
        for s in &plan.services {
            for rotation in std::iter::once(&s.cluster).chain(s.local.as_ref()) {
                assert_eq!(rotation.maglev.is_empty(), rotation.backends.is_empty());
                let maglev = rotation.maglev.iter().map(|&m| u32::from(m));
                for i in rotation.backends.iter().copied().chain(maglev) {
                    let b = &s.backends[i as usize];
                    assert_ne!(b.state, BackendState::NotServing, "case {:?}", case.name);
                    assert!(rotation.backends.contains(&i), "case {:?}", case.name);
                }
            }
        }
    }
}

#[test]
fn maglev_tables_use_the_configured_size_and_cover_the_rotation() {
    let objects = objects_of(&CASES[6]); // eTP=Local with two backends
    let cluster = parse(&objects);
    let opts = match ServiceOptions::new(251, SelectionMode::Maglev) {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    };
    let plan = translate(&cluster, THIS_NODE, &opts);
    let service = &plan.services[0];
    assert_eq!(service.cluster.maglev.len(), 251);
    for b in [0u16, 1] {
        let share = service.cluster.maglev.iter().filter(|&&x| x == b).count();
        assert!((125..=126).contains(&share), "backend {b}: {share}");
    }
    let local = service.local.as_ref().map(|l| l.maglev.to_vec());
    assert_eq!(
        local,
        Some(vec![0; 251]),
        "local rotation holds only node1's backend"
    );
}

#[test]
fn random_selection_builds_no_tables() {
    let cluster = parse(&objects_of(&CASES[6]));
    let opts = match ServiceOptions::new(16381, SelectionMode::Random) {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    };
    let plan = translate(&cluster, THIS_NODE, &opts);
    let service = &plan.services[0];
    assert_eq!(service.cluster.backends, vec![0, 1]);
    assert!(service.cluster.maglev.is_empty());
    assert!(service.local.as_ref().is_some_and(|l| l.maglev.is_empty()));
}

#[test]
fn affinity_default_timeout_is_kubernetes_default() {
    assert_eq!(DEFAULT_AFFINITY_TIMEOUT_SECONDS, 10_800);
    let plan = plan_of(&objects_of(&CASES[8]));
    assert_eq!(
        plan.services[0].affinity.map(|a| a.timeout_seconds),
        Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
    );
}

#[test]
fn nodeports_on_every_address_of_this_node_only() {
    let nodes_extra = "\
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]
";
    // node2's view: its own InternalIP only.
    let cluster = parse(nodes_extra);
    let plan = translate(&cluster, "node2", &ServiceOptions::default());
    assert_eq!(
        frontend_lines(&plan),
        [
            "10.96.0.60:53/UDP clusterip -> default/np:dns cluster",
            "172.18.0.12:30053/UDP nodeport -> default/np:dns cluster",
        ]
    );
    // A node with an ExternalIP too answers on both.
    let mut cluster = cluster;
    if let Some(addresses) = std::sync::Arc::make_mut(&mut cluster.nodes[0])
        .status
        .as_mut()
        .and_then(|s| s.addresses.as_mut())
    {
        addresses.push(k8s_openapi::api::core::v1::NodeAddress {
            type_: "ExternalIP".to_owned(),
            address: "203.0.113.11".to_owned(),
        });
    }
    let plan = translate(&cluster, THIS_NODE, &ServiceOptions::default());
    let nodeports: Vec<_> = plan
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort)
        .map(|f| (f.address.to_string(), f.port, f.protocol))
        .collect();
    assert_eq!(
        nodeports,
        [
            ("172.18.0.11".to_owned(), 30053, Protocol::Udp),
            ("203.0.113.11".to_owned(), 30053, Protocol::Udp),
        ]
    );
    // An unknown node has no address: the NodePort is reported, the ClusterIP still served.
    let plan = translate(&cluster, "node9", &ServiceOptions::default());
    assert_eq!(plan.frontends.len(), 1);
    assert!(plan
        .skipped
        .iter()
        .any(|(s, r)| s == "default/np" && r.contains("node9")));
}

#[test]
fn frontend_conflict_first_service_wins() {
    let objects = "\
apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  clusterIP: 10.96.0.70
  externalIPs: [198.51.100.7]
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec:
  clusterIP: 10.96.0.71
  externalIPs: [198.51.100.7]
  ports: [{name: http, port: 80}]
";
    let plan = plan_of(objects);
    let owner = plan
        .frontend(std::net::Ipv4Addr::new(198, 51, 100, 7), 80, Protocol::Tcp)
        .map(|f| plan.services[f.service].service_key());
    assert_eq!(owner.as_deref(), Some("default/a"));
    assert!(plan
        .skipped
        .iter()
        .any(|(s, r)| s == "default/b" && r.contains("already taken by default/a")));
}

#[test]
fn output_is_deterministic() {
    // Same objects in a different file order give the same plan, Maglev tables included.
    let all: Vec<String> = [&CASES[1], &CASES[3], &CASES[4]]
        .into_iter()
        .map(objects_of)
        .collect();
    let forward = all.join("---\n");
    let backward = all.iter().rev().cloned().collect::<Vec<_>>().join("---\n");
    let a = plan_of(&forward);
    let b = plan_of(&backward);
    assert!(!a.services.is_empty());
    assert_eq!(a, b);
    assert_eq!(a, plan_of(&forward));
}

/// `count` ClusterIP Services `svc-N` (one port, 80 -> 8080), each with one EndpointSlice of
/// two endpoints, one on each node.
fn many_services(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: default\n\
             spec:\n  clusterIP: 10.96.1.{i}\n  ports:\n  - port: 80\n    targetPort: 8080\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-a\n\
             \x20 namespace: default\n  labels:\n    kubernetes.io/service-name: svc-{i}\n\
             addressType: IPv4\nports:\n- port: 8080\n  protocol: TCP\n  name: \"\"\nendpoints:\n\
             - addresses: [10.244.1.{i}]\n  nodeName: node1\n\
             - addresses: [10.244.2.{i}]\n  nodeName: node2\n---\n"
        ));
    }
    out
}

/// The cached translation gives the plan a fresh one gives, after each kind of change, and
/// translates again only the Services whose objects changed (a cache that reused a changed
/// Service, or reused nothing, fails here).
#[test]
fn cached_translation_equals_a_fresh_one_and_redoes_only_what_changed() {
    use control::services::{translate_cached, Cache};
    use std::sync::Arc;
    let opts = ServiceOptions::default();
    let mut state = parse(&many_services(20));
    let mut cache = Cache::new();
    let first = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(first, translate(&state, THIS_NODE, &opts));
    assert_eq!(cache.last_translated, 20);
    assert_eq!(first.services.len(), 20);

    // Same objects: nothing translated again, Maglev tables shared with the last plan.
    let again = translate_cached(&state.clone(), THIS_NODE, &opts, &mut cache);
    assert_eq!(cache.last_translated, 0);
    assert_eq!(again, first);
    assert!(Arc::ptr_eq(
        &again.services[3].cluster.maglev,
        &first.services[3].cluster.maglev
    ));

    // One endpoint goes away from svc-7's slice: only svc-7 is translated again.
    let i = state
        .endpoint_slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-7-a"))
        .expect("slice");
    Arc::make_mut(&mut state.endpoint_slices[i]).endpoints.pop();
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(cache.last_translated, 1);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    let svc7 = plan
        .services
        .iter()
        .find(|s| s.name == "svc-7")
        .expect("svc-7");
    assert_eq!(svc7.backends.len(), 1);

    // svc-4 gets a second slice (a copy of its first under another name, with other
    // addresses); then svc-5's only slice is deleted: each time only that Service.
    let i = state
        .endpoint_slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-4-a"))
        .expect("slice");
    let mut second = (*state.endpoint_slices[i]).clone();
    second.metadata.name = Some("svc-4-b".into());
    for (n, e) in second.endpoints.iter_mut().enumerate() {
        e.addresses = vec![format!("10.244.3.{n}")];
    }
    state.endpoint_slices.insert(i + 1, Arc::new(second));
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(cache.last_translated, 1);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    let svc4 = plan
        .services
        .iter()
        .find(|s| s.name == "svc-4")
        .expect("svc-4");
    assert_eq!(svc4.backends.len(), 4);
    state
        .endpoint_slices
        .retain(|s| s.metadata.name.as_deref() != Some("svc-5-a"));
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(cache.last_translated, 1);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    let svc5 = plan
        .services
        .iter()
        .find(|s| s.name == "svc-5")
        .expect("svc-5");
    assert!(svc5.backends.is_empty());

    // svc-5 now selects app=five, with no slice of its own: its endpoints come from the Pods,
    // so a change of Pods alone must reach it (the unchanged-plan shortcut must not apply).
    let i = state
        .services
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-5"))
        .expect("svc-5");
    if let Some(spec) = Arc::make_mut(&mut state.services[i]).spec.as_mut() {
        spec.selector = Some([("app".to_owned(), "five".to_owned())].into());
    }
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    let pod = parse(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: five-1, namespace: default, labels: {app: five}}\n\
         spec: {nodeName: node1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.244.1.55}\n",
    )
    .pods
    .remove(0);
    state.pods.push(pod);
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    let svc5 = plan
        .services
        .iter()
        .find(|s| s.name == "svc-5")
        .expect("svc-5");
    assert_eq!(svc5.backends.len(), 1);

    // A Service's port changes; another Service is deleted.
    let i = state
        .services
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-2"))
        .expect("svc-2");
    if let Some(ports) = Arc::make_mut(&mut state.services[i])
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
    {
        ports[0].port = 81;
    }
    state
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("svc-9"));
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    // svc-2, and svc-5: a Service without slices of its own is always translated again.
    assert_eq!(cache.last_translated, 2);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
    assert_eq!(plan.services.len(), 19);
    assert!(plan
        .frontend("10.96.1.2".parse().unwrap(), 81, Protocol::Tcp)
        .is_some());

    // This node's addresses change: every Service is translated again.
    if let Some(addresses) = Arc::make_mut(&mut state.nodes[0])
        .status
        .as_mut()
        .and_then(|s| s.addresses.as_mut())
    {
        addresses[0].address = "172.18.0.99".into();
    }
    let plan = translate_cached(&state, THIS_NODE, &opts, &mut cache);
    assert_eq!(cache.last_translated, 19);
    assert_eq!(plan, translate(&state, THIS_NODE, &opts));
}
