//! From the [`ServicePlan`] to what the workers read: the dataplane's service table, and the
//! ports and addresses the uplink's XDP program must hand to the workers.
//!
//! The plan already holds everything the dataplane needs (rotations with the terminating
//! fallback applied, Maglev tables computed here in control); this is a change of
//! representation only, so the Kubernetes API source (a later issue) reuses it unchanged.
use std::{collections::BTreeMap, net::Ipv4Addr};

use dataplane::services::{
    Backend, Frontend as DpFrontend, FrontendKind as DpKind, RotationSpec, ServiceSpec,
    ServiceTable, ServiceTableBuilder, ServiceTableError,
};
use xdp_redirect::{PortClaims, PortProtocol, RuleAction};

use super::{FrontendKind, Protocol, Rotation, Scope, ServicePlan};

/// Source ports SNAT uses (masquerade, NodePort to a remote backend, hairpin): above Linux's
/// default ephemeral range (32768-60999) so the node's own connections never collide, and
/// outside the NodePort range (30000-32767).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);
/// The source address of hairpin flows (Cilium's `IPV4_LOOPBACK`).
pub const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// `into` = the rotation `r` (buffers reused across service ports).
fn rotation(into: &mut RotationSpec, r: &Rotation) {
    into.members.clear();
    into.members.extend_from_slice(&r.backends);
    into.maglev = r.maglev.clone();
}

/// A stable non-zero key for a service port in the workers' affinity table (FNV-1a of
/// `namespace/name`, the port name and protocol, with NUL separators), so affinity survives
/// table rebuilds. Hashed as it goes, without building the string.
fn affinity_id(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> u32 {
    let parts: [&[u8]; 7] = [
        namespace.as_bytes(),
        b"/",
        name.as_bytes(),
        b"\0",
        port_name.as_bytes(),
        b"\0",
        protocol.as_str().as_bytes(),
    ];
    let h = super::maglev::fnv1a64_parts(&parts);
    ((h ^ (h >> 32)) as u32).max(1)
}

/// The dataplane's service table for `plan`.
pub fn service_table(
    plan: &ServicePlan,
    generation: u64,
) -> Result<ServiceTable, ServiceTableError> {
    let mut b = ServiceTableBuilder::new(generation);
    let mut spec = ServiceSpec::default();
    for s in &plan.services {
        spec.backends.clear();
        spec.backends.extend(s.backends.iter().map(|be| Backend {
            addr: be.address,
            port: be.port,
            local: be.local,
        }));
        rotation(&mut spec.cluster, &s.cluster);
        match &s.local {
            Some(r) => rotation(&mut spec.local, r),
            None => {
                spec.local.members.clear();
                spec.local.maglev = Default::default();
            }
        }
        spec.affinity_timeout_s = s.affinity.map_or(0, |a| a.timeout_seconds.max(1));
        spec.affinity_id = affinity_id(&s.namespace, &s.name, &s.port_name, s.protocol);
        b.service(&spec)?;
    }
    for f in &plan.frontends {
        b.frontend(DpFrontend {
            addr: f.address,
            port: f.port,
            proto: f.protocol.number(),
            kind: match f.kind {
                FrontendKind::ClusterIp => DpKind::ClusterIp,
                FrontendKind::NodePort => DpKind::NodePort,
                FrontendKind::LoadBalancer => DpKind::LoadBalancer,
                FrontendKind::ExternalIp => DpKind::ExternalIp,
            },
            service: f.service as u32,
            local_only: f.scope == Scope::Local,
            keep_source: f.external_traffic_local,
        });
    }
    b.build()
}

/// What the uplink's XDP program must redirect to the workers for services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkClaims {
    pub tcp: PortClaims,
    pub udp: PortClaims,
    pub icmp_echo_ids: PortClaims,
    /// LoadBalancer ingress IPs and externalIPs.
    pub addrs: BTreeMap<Ipv4Addr, RuleAction>,
}

/// NodePorts (exact, per protocol), the SNAT port range (replies to SNATed flows, and
/// masqueraded pings by identifier), and LoadBalancer / external IPs. healthCheckNodePorts are
/// explicitly left to the kernel (the agent answers them).
pub fn uplink_claims(plan: &ServicePlan, snat_ports: (u16, u16)) -> UplinkClaims {
    let mut c = UplinkClaims {
        tcp: PortClaims::new(),
        udp: PortClaims::new(),
        icmp_echo_ids: PortClaims::new(),
        addrs: BTreeMap::new(),
    };
    let range = snat_ports.0..=snat_ports.1;
    if snat_ports.0 <= snat_ports.1 {
        c.tcp.set_range(range.clone(), RuleAction::Redirect);
        c.udp.set_range(range.clone(), RuleAction::Redirect);
        c.icmp_echo_ids.set_range(range, RuleAction::Redirect);
    }
    for f in &plan.frontends {
        match f.kind {
            FrontendKind::NodePort => {
                let claims = match f.protocol {
                    Protocol::Tcp => &mut c.tcp,
                    Protocol::Udp => &mut c.udp,
                };
                claims.set(f.port, RuleAction::Redirect);
            }
            FrontendKind::LoadBalancer | FrontendKind::ExternalIp => {
                c.addrs.insert(f.address, RuleAction::Redirect);
            }
            FrontendKind::ClusterIp => {}
        }
    }
    for s in &plan.services {
        if let Some(p) = s.health_check_node_port {
            c.tcp.set(p, RuleAction::Pass);
        }
    }
    c
}

/// This node's addresses that NodePorts are answered on (from the plan's NodePort frontends),
/// with `internal_ip` first.
pub fn node_addresses(plan: &ServicePlan, internal_ip: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut out = vec![internal_ip];
    for f in &plan.frontends {
        if f.kind == FrontendKind::NodePort && !out.contains(&f.address) {
            out.push(f.address);
        }
    }
    out
}

/// `PortProtocol` for a plan protocol.
pub fn port_protocol(p: Protocol) -> PortProtocol {
    match p {
        Protocol::Tcp => PortProtocol::Tcp,
        Protocol::Udp => PortProtocol::Udp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{translate, ServiceOptions};

    const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1}
  spec: {podCIDR: 10.244.0.0/24}
  status:
    addresses:
    - {type: InternalIP, address: 192.168.50.11}
    - {type: ExternalIP, address: 203.0.113.11}
- apiVersion: v1
  kind: Node
  metadata: {name: n2}
  spec: {podCIDR: 10.244.1.0/24}
  status:
    addresses:
    - {type: InternalIP, address: 192.168.50.12}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-a, namespace: default, labels: {app: web}}
  spec: {nodeName: n1, containers: [{name: c, image: x}]}
  status: {podIP: 10.244.0.5, phase: Running, conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-b, namespace: default, labels: {app: web}}
  spec: {nodeName: n2, containers: [{name: c, image: x}]}
  status: {podIP: 10.244.1.5, phase: Running, conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.20
    selector: {app: web}
    externalTrafficPolicy: Local
    healthCheckNodePort: 32100
    sessionAffinity: ClientIP
    ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
    - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
  status:
    loadBalancer:
      ingress: [{ip: 198.51.100.7}]
"#;

    fn plan() -> ServicePlan {
        let cluster = crate::cluster::parse_str(CLUSTER, "test").expect("cluster parses");
        translate(&cluster, "n1", &ServiceOptions::default())
    }

    #[test]
    fn table_answers_every_frontend_of_the_plan_with_its_policy() {
        let plan = plan();
        assert!(!plan.frontends.is_empty());
        let t = service_table(&plan, 9).unwrap();
        assert_eq!(t.generation(), 9);
        for f in &plan.frontends {
            let got = t
                .frontend(f.address, f.port, f.protocol.number())
                .unwrap_or_else(|| panic!("{f:?} missing"));
            assert_eq!(got.local_only, f.scope == Scope::Local, "{f:?}");
            assert_eq!(got.keep_source, f.external_traffic_local, "{f:?}");
            let svc = t.service(got.service).unwrap();
            assert!(svc.has_affinity());
            assert_eq!(svc.affinity_timeout_ns, 10_800 * 1_000_000_000);
        }
        // The NodePort on the ExternalIP too, and eTP=Local: local rotation = web-a only.
        let np = t
            .frontend(Ipv4Addr::new(203, 0, 113, 11), 30080, 6)
            .expect("NodePort on the ExternalIP");
        assert!(np.local_only && np.keep_source);
        let svc = t.service(np.service).unwrap();
        let (_, b) = t.select(svc, true, 12345).unwrap();
        assert_eq!(b.addr, Ipv4Addr::new(10, 244, 0, 5));
        assert!(b.local);
        assert_eq!(b.port, 8080);
        // ClusterIP uses the cluster rotation (both pods), Maglev table of the default size.
        let cip = t.frontend(Ipv4Addr::new(10, 96, 0, 20), 80, 6).unwrap();
        assert!(!cip.local_only);
        assert_eq!(
            t.maglev_of(t.service(cip.service).unwrap(), false).len(),
            crate::services::DEFAULT_TABLE_SIZE as usize
        );
    }

    #[test]
    fn uplink_claims_nodeports_snat_range_and_lb_ips_but_not_health_ports() {
        let c = uplink_claims(&plan(), DEFAULT_SNAT_PORTS);
        assert_eq!(c.tcp.get(30080), Some(RuleAction::Redirect));
        assert_eq!(c.tcp.get(30053), None, "30053 is a UDP NodePort");
        assert_eq!(c.udp.get(30053), Some(RuleAction::Redirect));
        assert_eq!(
            c.tcp.get(32100),
            Some(RuleAction::Pass),
            "health check port"
        );
        assert_eq!(c.tcp.get(30081), None);
        for p in [61000, 63000, 65535] {
            assert_eq!(c.tcp.get(p), Some(RuleAction::Redirect));
            assert_eq!(c.udp.get(p), Some(RuleAction::Redirect));
            assert_eq!(c.icmp_echo_ids.get(p), Some(RuleAction::Redirect));
        }
        assert_eq!(
            c.tcp.get(60999),
            None,
            "kernel ephemeral ports stay with the kernel"
        );
        assert_eq!(
            c.addrs.keys().copied().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(198, 51, 100, 7)]
        );
    }

    #[test]
    fn affinity_id_is_the_hash_of_the_service_port_key() {
        let key = "default/web\0http\0TCP";
        let h = crate::services::maglev::fnv1a64(key.as_bytes());
        let want = ((h ^ (h >> 32)) as u32).max(1);
        assert_eq!(affinity_id("default", "web", "http", Protocol::Tcp), want);
        assert_ne!(
            affinity_id("default", "web", "http", Protocol::Udp),
            affinity_id("default", "web", "http", Protocol::Tcp)
        );
    }

    #[test]
    fn node_addresses_start_with_the_internal_ip() {
        assert_eq!(
            node_addresses(&plan(), Ipv4Addr::new(192, 168, 50, 11)),
            vec![
                Ipv4Addr::new(192, 168, 50, 11),
                Ipv4Addr::new(203, 0, 113, 11)
            ]
        );
    }
}
