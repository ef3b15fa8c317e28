//! The upstream NetworkPolicy e2e model (`test/e2e/network/netpol`): namespaces `x`, `y`, `z`
//! (label `ns: NAME`, plus `kubernetes.io/metadata.name`), pods `a`, `b`, `c` in each (label
//! `pod: NAME`) serving ports 80 and 81 on TCP, UDP and SCTP with container ports named
//! `serve-80-tcp`, `serve-81-udp`, ..., spread over two nodes. Plus a table of [`Case`]s: policy
//! objects from the Kubernetes documentation and the upstream e2e scenarios, each with probes
//! and the expected verdicts.
//!
//! One model for every test that needs it: `control/tests/policy.rs` runs every case through
//! the compiler (+ `PolicyTable::check`) and the reference evaluator; the testbed can build the
//! same cluster ([`cluster_yaml`] + a case's objects) and send the probes as real packets.

use std::net::Ipv4Addr;

use super::reference::Verdict;

/// The model's namespaces.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The model's pod names (in every namespace).
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The model's nodes: (name, InternalIP, pod CIDR, labels as YAML flow mapping).
pub const NODES: [(&str, &str, &str, &str); 2] = [
    (
        "node1",
        "172.18.0.11",
        "10.244.1.0/24",
        "{kubernetes.io/hostname: node1, node-role.kubernetes.io/control-plane: \"\"}",
    ),
    (
        "node2",
        "172.18.0.12",
        "10.244.2.0/24",
        "{kubernetes.io/hostname: node2, pool: workers}",
    ),
];
/// Container ports of every pod: (port, protocol).
pub const SERVED: [(u16, &str); 6] = [
    (80, "TCP"),
    (81, "TCP"),
    (80, "UDP"),
    (81, "UDP"),
    (80, "SCTP"),
    (81, "SCTP"),
];

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;
/// IP protocol number of SCTP.
pub const SCTP: u8 = 132;

fn index(namespace: &str, pod: &str) -> Option<usize> {
    let n = NAMESPACES.iter().position(|x| *x == namespace)?;
    let p = PODS.iter().position(|x| *x == pod)?;
    Some(n * PODS.len() + p)
}

/// The node of pod `namespace/pod`: alternating, x/a on node1, x/b on node2, ...
pub fn pod_node(namespace: &str, pod: &str) -> Option<&'static str> {
    index(namespace, pod).map(|i| NODES[i % 2].0)
}

/// The address of pod `namespace/pod`: `10.244.<node>.<10 + index>`.
pub fn pod_addr(namespace: &str, pod: &str) -> Option<Ipv4Addr> {
    let i = index(namespace, pod)?;
    Some(Ipv4Addr::new(10, 244, (i % 2 + 1) as u8, 10 + i as u8))
}

/// `NS/POD` or an IPv4 address, to an address of the model.
pub fn addr_of(endpoint: &str) -> Option<Ipv4Addr> {
    if let Ok(a) = endpoint.parse() {
        return Some(a);
    }
    let (ns, pod) = endpoint.split_once('/')?;
    pod_addr(ns, pod)
}

/// Nodes, namespaces and pods of the model as a multi-document YAML cluster file.
pub fn cluster_yaml() -> String {
    let mut out = String::new();
    for (name, ip, cidr, labels) in NODES {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {labels}}}\n\
             spec: {{podCIDR: {cidr}}}\n\
             status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n---\n"
        ));
    }
    for ns in NAMESPACES {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{ns: {ns}, \
             kubernetes.io/metadata.name: {ns}}}\n---\n"
        ));
    }
    for ns in NAMESPACES {
        for pod in PODS {
            let (Some(node), Some(addr)) = (pod_node(ns, pod), pod_addr(ns, pod)) else {
                continue;
            };
            let mut containers = String::new();
            for (port, proto) in SERVED {
                let lower = proto.to_ascii_lowercase();
                containers.push_str(&format!(
                    "  - name: cont-{port}-{lower}\n    image: agnhost\n    ports:\n    \
                     - {{name: serve-{port}-{lower}, containerPort: {port}, protocol: {proto}}}\n"
                ));
            }
            out.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  \
                 labels: {{pod: {pod}}}\nspec:\n  nodeName: {node}\n  containers:\n{containers}\
                 status: {{phase: Running, podIP: {addr}}}\n---\n"
            ));
        }
    }
    out
}

/// One connection and what policy must say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// `NS/POD` or an IPv4 address.
    pub from: &'static str,
    /// `NS/POD` or an IPv4 address (a node's InternalIP for the host firewall).
    pub to: &'static str,
    /// IP protocol number ([`TCP`], [`UDP`], [`SCTP`], 1 for ICMP).
    pub protocol: u8,
    pub port: u16,
    pub expect: Verdict,
}

/// Policy objects added to the model and the probes that check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// Short name (unique).
    pub name: &'static str,
    /// Where the scenario comes from (docs section or upstream e2e test name).
    pub source: &'static str,
    /// NetworkPolicy / HostNetworkPolicy documents (`---` separated).
    pub objects: &'static str,
    /// Agent-wide audit mode (`--policy-audit`).
    pub audit_all: bool,
    /// A substring of a compile warning the case must produce (invalid objects).
    pub warning: Option<&'static str>,
    pub probes: &'static [Probe],
}

const fn p(from: &'static str, to: &'static str, port: u16, expect: Verdict) -> Probe {
    Probe {
        from,
        to,
        protocol: TCP,
        port,
        expect,
    }
}

const fn pu(
    from: &'static str,
    to: &'static str,
    protocol: u8,
    port: u16,
    expect: Verdict,
) -> Probe {
    Probe {
        from,
        to,
        protocol,
        port,
        expect,
    }
}

use Verdict::{Allow as A, Audit as AU, Deny as D};

const fn case(
    name: &'static str,
    source: &'static str,
    objects: &'static str,
    probes: &'static [Probe],
) -> Case {
    Case {
        name,
        source,
        objects,
        audit_all: false,
        warning: None,
        probes,
    }
}

/// The table (module doc). Probes of one case share its objects.
pub const CASES: &[Case] = &[
    case(
        "no-policy",
        "docs: by default, pods are non-isolated",
        "",
        &[
            p("x/a", "y/b", 80, A),
            p("8.8.8.8", "x/a", 81, A),
            p("8.8.8.8", "172.18.0.11", 443, A),
        ],
    ),
    case(
        "default-deny-ingress",
        "e2e: should support a 'default-deny-ingress' policy; docs: default deny all ingress",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
        &[
            p("y/a", "x/a", 80, D),
            p("x/b", "x/a", 80, D),
            p("x/c", "x/a", 81, D),
            pu("y/a", "x/b", UDP, 80, D),
            pu("y/a", "x/b", 1, 0, D),
            p("x/a", "y/a", 80, A),
            p("x/a", "x/a", 80, A),
            p("y/a", "y/b", 80, A),
            // Kubelet probes: the pod's own node (x/a is on node1) always gets in.
            p("172.18.0.11", "x/a", 80, A),
            p("172.18.0.12", "x/a", 80, D),
        ],
    ),
    case(
        "default-deny-egress",
        "docs: default deny all egress traffic",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#,
        &[
            p("x/a", "y/a", 80, D),
            pu("x/a", "8.8.8.8", UDP, 53, D),
            p("x/a", "172.18.0.12", 10250, D),
            p("y/a", "x/a", 80, A),
        ],
    ),
    case(
        "allow-all-ingress",
        "e2e: should support allow-all policy; docs: allow all ingress traffic",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-ingress, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]
  policyTypes: [Ingress]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("z/c", "x/b", 81, A),
            pu("1.2.3.4", "x/c", UDP, 9999, A),
        ],
    ),
    case(
        "allow-all-egress",
        "docs: allow all egress traffic",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-egress, namespace: x}
spec:
  podSelector: {}
  egress: [{}]
  policyTypes: [Egress]
"#,
        &[p("x/a", "y/a", 80, A), pu("x/b", "8.8.8.8", UDP, 53, A)],
    ),
    case(
        "default-deny-all",
        "docs: default deny all ingress and all egress traffic",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
        &[
            p("x/a", "y/a", 80, D),
            p("y/a", "x/a", 80, D),
            p("x/a", "x/b", 80, D),
            p("y/a", "z/a", 80, A),
        ],
    ),
    case(
        "test-network-policy",
        "docs: the NetworkPolicy resource example (role=db as pod=a)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except: [172.17.1.0/24]
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
"#,
        &[
            p("y/c", "x/a", 6379, A),
            p("x/b", "x/a", 6379, A),
            p("x/c", "x/a", 6379, D),
            p("z/b", "x/a", 6379, D),
            p("172.17.0.5", "x/a", 6379, A),
            p("172.17.1.5", "x/a", 6379, D),
            p("y/c", "x/a", 80, D),
            pu("y/c", "x/a", UDP, 6379, D),
            p("x/a", "10.0.0.7", 5978, A),
            p("x/a", "10.0.0.7", 80, D),
            p("x/a", "y/a", 5978, D),
            p("x/b", "y/a", 80, A),
        ],
    ),
    case(
        "endport-egress",
        "docs: targeting a range of ports (endPort)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: multi-port-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 32000, endPort: 32768}]
"#,
        &[
            p("x/a", "10.0.0.9", 32000, A),
            p("x/a", "10.0.0.9", 32768, A),
            p("x/a", "10.0.0.9", 32400, A),
            p("x/a", "10.0.0.9", 31999, D),
            p("x/a", "10.0.0.9", 32769, D),
            pu("x/a", "10.0.0.9", UDP, 32000, D),
            p("x/a", "10.0.1.9", 32000, D),
        ],
    ),
    case(
        "namespace-by-name",
        "docs: targeting a namespace by its name (kubernetes.io/metadata.name)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y-by-name, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
"#,
        &[
            p("y/b", "x/a", 80, A),
            pu("y/c", "x/a", UDP, 81, A),
            p("z/b", "x/a", 80, D),
            p("x/b", "x/a", 80, D),
            p("z/b", "x/b", 80, A),
        ],
    ),
    case(
        "and-namespace-and-pod-selector",
        "docs: namespaceSelector and podSelector in one peer (AND); e2e: should enforce policy \
         based on PodSelector and NamespaceSelector",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
"#,
        &[
            p("y/b", "x/a", 80, A),
            p("y/a", "x/a", 80, D),
            p("x/b", "x/a", 80, D),
            p("z/b", "x/a", 80, D),
        ],
    ),
    case(
        "or-namespace-or-pod-selector",
        "docs: namespaceSelector and podSelector as two peers (OR); e2e: should enforce policy \
         based on NamespaceSelector or PodSelector",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/b", "x/a", 80, A),
            p("x/b", "x/a", 80, A),
            p("x/c", "x/a", 80, D),
            p("z/b", "x/a", 80, D),
        ],
    ),
    case(
        "pod-selector-within-namespace",
        "e2e: should enforce policy to allow traffic from pods within server namespace based on \
         PodSelector",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-allows-x-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
"#,
        &[
            p("x/b", "x/a", 80, A),
            p("x/b", "x/a", 81, A),
            p("y/b", "x/a", 80, D),
            p("x/c", "x/a", 80, D),
            p("x/c", "x/b", 80, A),
        ],
    ),
    case(
        "namespace-selector-match-expressions",
        "e2e: should enforce policy to allow traffic only from a different namespace, based on \
         NamespaceSelector with MatchExpressions",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-match-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: [y]}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/c", "x/a", 81, A),
            p("z/a", "x/a", 80, D),
            p("x/b", "x/a", 80, D),
        ],
    ),
    case(
        "pod-selector-match-expressions",
        "e2e: should enforce policy based on PodSelector with MatchExpressions",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-x-b-match-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: pod, operator: In, values: [b]}]
"#,
        &[
            p("x/b", "x/a", 80, A),
            p("x/c", "x/a", 80, D),
            p("y/b", "x/a", 80, D),
        ],
    ),
    case(
        "not-in-and-does-not-exist",
        "e2e: should enforce policy based on NamespaceSelector with MatchExpressions \
         (NotIn; DoesNotExist/Exists on pod labels)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: not-in-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: NotIn, values: [y]}]
      podSelector:
        matchExpressions: [{key: pod, operator: Exists}, {key: role, operator: DoesNotExist}]
"#,
        &[
            p("z/b", "x/a", 80, A),
            p("x/c", "x/a", 80, A),
            p("y/b", "x/a", 80, D),
            p("8.8.8.8", "x/a", 80, D),
        ],
    ),
    case(
        "ports",
        "e2e: should enforce policy based on Ports",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-on-port-81-ns-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81}]
"#,
        &[
            p("y/a", "x/a", 81, A),
            p("y/a", "x/a", 80, D),
            pu("y/a", "x/a", UDP, 81, D),
            p("z/a", "x/a", 81, D),
        ],
    ),
    case(
        "stacked-policies",
        "e2e: should enforce multiple, stacked policies with overlapping podSelectors",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-81, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/a", "x/a", 81, A),
            p("y/a", "x/a", 82, D),
            p("y/a", "x/b", 80, D),
            p("y/a", "x/b", 81, A),
        ],
    ),
    case(
        "named-port-ingress",
        "e2e: should allow ingress access on one named port",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-ingress-on-serve-81-tcp, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: serve-81-tcp}]
"#,
        &[
            p("y/a", "x/a", 81, A),
            p("8.8.8.8", "x/b", 81, A),
            p("y/a", "x/a", 80, D),
            pu("y/a", "x/a", UDP, 81, D),
        ],
    ),
    case(
        "named-port-ingress-protocol",
        "e2e: should allow ingress access on one named port (UDP name with protocol UDP)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-serve-80-udp, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - ports: [{port: serve-80-udp, protocol: UDP}, {port: serve-80-udp}]
"#,
        &[
            pu("y/a", "x/b", UDP, 80, A),
            p("y/a", "x/b", 80, D),
            pu("y/a", "x/b", UDP, 81, D),
        ],
    ),
    case(
        "named-port-egress",
        "e2e: should allow egress access on one named port",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress-on-serve-80-tcp, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: serve-80-tcp}]
  - ports: [{port: 53, protocol: UDP}]
"#,
        &[
            p("x/a", "y/b", 80, A),
            p("x/b", "x/c", 80, A),
            p("x/a", "y/b", 81, D),
            pu("x/a", "8.8.8.8", UDP, 53, A),
            p("x/a", "8.8.8.8", 80, D),
            p("x/a", "172.18.0.12", 80, D),
        ],
    ),
    case(
        "named-port-through-ipblock",
        "sluice: a named port never matches through an ipBlock peer (egress)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-via-block, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.0.0/16}}]
    ports: [{port: serve-80-tcp}, {port: 81}]
"#,
        &[
            p("x/a", "y/b", 80, D),
            p("x/a", "y/b", 81, A),
            p("x/a", "10.244.9.9", 81, A),
        ],
    ),
    case(
        "egress-pod-and-namespace-selector",
        "e2e: should enforce egress policy allowing traffic to a server in a different namespace \
         based on PodSelector and NamespaceSelector",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-to-ns-y-pod-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: a}}
"#,
        &[
            p("x/a", "y/a", 80, A),
            pu("x/a", "y/a", UDP, 81, A),
            p("x/a", "y/b", 80, D),
            p("x/a", "x/a", 80, A),
            p("x/a", "z/a", 80, D),
            p("x/b", "y/b", 80, A),
        ],
    ),
    case(
        "egress-cidr-except",
        "e2e: should enforce except clause while egress access to server in CIDR block",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-client-a-via-except-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.14/32]}
"#,
        // y/b is 10.244.1.14.
        &[
            p("x/a", "y/b", 80, D),
            p("x/a", "y/a", 80, A),
            p("x/a", "8.8.8.8", 80, D),
        ],
    ),
    case(
        "cidr-and-except-overlap",
        "e2e: should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-client-a-via-except-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.14/32]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.1.14/32}}]
"#,
        &[
            p("x/a", "y/b", 80, A),
            p("x/a", "y/a", 80, A),
            p("x/a", "8.8.8.8", 80, D),
        ],
    ),
    case(
        "client-side-egress-deny-wins",
        "e2e: should support denying of egress traffic on the client side (even if the server \
         explicitly allows this traffic)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-x-a, namespace: y}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: x}}
      podSelector: {matchLabels: {pod: a}}
"#,
        &[
            p("x/a", "y/a", 80, D),
            p("x/b", "y/a", 80, D),
            p("x/b", "z/a", 80, A),
        ],
    ),
    case(
        "any-port-on-protocol",
        "e2e: should enforce ingress policy allowing any port traffic to a server on a specific \
         protocol",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-by-proto, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{protocol: TCP}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/a", "x/a", 81, A),
            p("y/a", "x/a", 12345, A),
            pu("y/a", "x/a", UDP, 80, D),
            pu("y/a", "x/a", SCTP, 80, D),
        ],
    ),
    case(
        "ingress-endport",
        "e2e: should enforce policy to allow ingress traffic for a target (endPort)",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ingress-to-80-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80, endPort: 81}, {port: 80, endPort: 81, protocol: SCTP}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/a", "x/a", 81, A),
            p("y/a", "x/a", 82, D),
            pu("y/a", "x/a", SCTP, 81, A),
            pu("y/a", "x/a", UDP, 80, D),
        ],
    ),
    case(
        "policy-types-default-with-egress",
        "API defaulting: without policyTypes, Ingress always, and Egress when egress rules exist",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only-rules, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#,
        &[
            p("y/a", "x/a", 80, D),
            p("x/a", "y/a", 80, A),
            p("x/a", "z/a", 80, D),
        ],
    ),
    case(
        "policy-types-default-empty-egress",
        "API defaulting: `egress: []` without policyTypes does not isolate egress",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empty-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress: []
"#,
        &[p("x/a", "z/a", 80, A), p("z/a", "x/a", 80, D)],
    ),
    case(
        "audit-policy",
        "sluice: policy.sluice.io/audit: \"true\" reports instead of dropping",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
  namespace: x
  annotations: {policy.sluice.io/audit: "true"}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-80
  namespace: x
  annotations: {policy.sluice.io/audit: "true"}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 80}]}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/a", "x/a", 81, AU),
            p("y/a", "x/b", 80, AU),
            p("x/b", "y/b", 80, AU),
            p("y/b", "z/b", 80, A),
        ],
    ),
    case(
        "audit-and-enforced",
        "sluice: an enforcing policy's isolation is not lifted by an audit policy's rule",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-81-audit
  namespace: x
  annotations: {policy.sluice.io/audit: "true"}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 81}]}]
"#,
        &[
            p("y/a", "x/a", 80, A),
            p("y/a", "x/a", 81, D),
            p("y/a", "x/a", 82, D),
        ],
    ),
    Case {
        name: "audit-agent-wide",
        source: "sluice: --policy-audit puts every policy in audit mode",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{ports: [{port: 80}]}]
"#,
        audit_all: true,
        warning: None,
        probes: &[
            p("y/a", "x/a", 81, AU),
            p("y/a", "x/a", 80, A),
            p("x/a", "y/a", 80, AU),
        ],
    },
    Case {
        name: "bad-operator-skips-policy",
        source: "sluice: an invalid selector skips its policy with a warning",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-operator, namespace: x}
spec:
  podSelector:
    matchExpressions: [{key: pod, operator: Equals, values: [a]}]
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: good, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
"#,
        audit_all: false,
        warning: Some(
            "NetworkPolicy x/bad-operator: spec.podSelector: matchExpressions[0].operator: \
             unknown operator \"Equals\"",
        ),
        probes: &[p("y/a", "x/a", 80, A), p("y/a", "x/b", 80, D)],
    },
    Case {
        name: "bad-protocol-skips-rule",
        source: "sluice: an invalid port skips its rule (the policy still isolates)",
        objects: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-protocol, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80, protocol: tcp}]
  - ports: [{port: 81}]
"#,
        audit_all: false,
        warning: Some("NetworkPolicy x/bad-protocol: spec.ingress[0].ports[0].protocol"),
        probes: &[p("y/a", "x/a", 80, D), p("y/a", "x/a", 81, A)],
    },
    case(
        "host-open-until-selected",
        "sluice: a node is open until a HostNetworkPolicy selects it (nodeSelector)",
        r#"
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: workers-web-only}
spec:
  nodeSelector: {matchLabels: {pool: workers}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
    ports: [{port: 443, protocol: TCP}]
"#,
        &[
            p("8.8.8.8", "172.18.0.11", 443, A),
            p("8.8.8.8", "172.18.0.12", 443, D),
            p("10.1.2.3", "172.18.0.12", 443, A),
            p("10.1.2.3", "172.18.0.12", 80, D),
            // Failsafe: SSH, kubelet, apiserver from anywhere; VXLAN only from nodes.
            p("8.8.8.8", "172.18.0.12", 22, A),
            p("8.8.8.8", "172.18.0.12", 10250, A),
            p("8.8.8.8", "172.18.0.12", 50001, A),
            pu("8.8.8.8", "172.18.0.12", UDP, 8472, D),
            pu("172.18.0.11", "172.18.0.12", UDP, 8472, A),
            pu("172.18.0.11", "172.18.0.12", UDP, 51871, A),
            // Pods reach nodes from their own addresses (10.244/16 is in 10/8).
            p("x/a", "172.18.0.12", 443, A),
            p("x/a", "172.18.0.12", 80, D),
        ],
    ),
    case(
        "host-all-nodes-pod-peer",
        "sluice: an empty nodeSelector selects every node; pod peers of a host policy span all \
         namespaces",
        r#"
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: node-exporter-from-a}
spec:
  nodeSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: 9100}]
"#,
        &[
            p("x/a", "172.18.0.11", 9100, A),
            p("z/a", "172.18.0.12", 9100, A),
            p("x/b", "172.18.0.11", 9100, D),
            p("8.8.8.8", "172.18.0.11", 9100, D),
            p("8.8.8.8", "172.18.0.11", 6443, A),
            // Pod-to-pod traffic is not the host firewall's business.
            p("x/b", "y/a", 9100, A),
        ],
    ),
    case(
        "host-deny-all-and-audit",
        "sluice: a host policy without ingress rules denies all but the failsafe ports; audit \
         mode reports instead",
        r#"
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: lockdown-node1}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata:
  name: lockdown-node2-audit
  annotations: {policy.sluice.io/audit: "true"}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node2}}
  ingress: []
"#,
        &[
            p("8.8.8.8", "172.18.0.11", 443, D),
            p("8.8.8.8", "172.18.0.11", 22, A),
            pu("8.8.8.8", "172.18.0.11", 1, 0, D),
            p("8.8.8.8", "172.18.0.12", 443, AU),
            p("8.8.8.8", "172.18.0.12", 2379, A),
        ],
    ),
];
