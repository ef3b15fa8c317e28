//! The overlay from the control side: which nodes are reachable through VXLAN, their VTEPs,
//! and the next hop on the uplink for each (from the kernel's routing table: the VTEP itself
//! when on-link, else the uplink's gateway).
//!
//! Cluster routing comes from Node objects only: `spec.podCIDR` (or the first IPv4 of
//! `spec.podCIDRs`) and the `InternalIP`, as Cilium's tunnel mode and Flannel do. A node's VTEP
//! MAC is the annotation [`VTEP_MAC_ANNOTATION`] when present (a kernel vxlan peer must be told
//! which inner destination MAC it accepts), else derived from its address
//! ([`dataplane::stages::encap::derived_vtep_mac`]).
use std::net::Ipv4Addr;

use dataplane::{snapshot::RemoteNode, stages::encap::derived_vtep_mac, wire::Mac};
use k8s_openapi::api::core::v1::Node;

use crate::cluster::ClusterState;

/// Node annotation giving the node's VTEP MAC (`aa:bb:cc:dd:ee:ff`).
pub const VTEP_MAC_ANNOTATION: &str = "sluice.io/vtep-mac";
/// Default VXLAN UDP port (Cilium's and Flannel's; IANA's 4789 is configurable).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// Default VNI (Flannel's; one overlay network).
pub const DEFAULT_VNI: u32 = 1;

/// One IPv4 route of the uplink (from /proc/net/route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix_len: u8,
    /// 0.0.0.0 for on-link routes.
    pub gateway: Ipv4Addr,
}

/// Parses /proc/net/route (hex, host byte order of the kernel: little endian here) for `ifname`.
pub fn parse_proc_routes(text: &str, ifname: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != ifname {
            continue;
        }
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| Ipv4Addr::from(v.swap_bytes()))
        };
        let (Some(dest), Some(gateway), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
            continue;
        };
        out.push(Route {
            dest,
            prefix_len: u32::from(mask).count_ones() as u8,
            gateway,
        });
    }
    out
}

/// The next hop for `dst`: the gateway of the longest matching route, or `dst` itself when that
/// route is on-link (or no route matches: the fabric is assumed flat).
pub fn next_hop(routes: &[Route], dst: Ipv4Addr) -> Ipv4Addr {
    let mut best: Option<&Route> = None;
    for r in routes {
        let mask = if r.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(r.prefix_len))
        };
        if u32::from(dst) & mask == u32::from(r.dest) & mask
            && best.is_none_or(|b| r.prefix_len > b.prefix_len)
        {
            best = Some(r);
        }
    }
    match best {
        Some(r) if !r.gateway.is_unspecified() => r.gateway,
        _ => dst,
    }
}

/// A node's VTEP MAC: its annotation when valid, else derived from `internal_ip`.
pub fn vtep_mac(node: &Node, internal_ip: Ipv4Addr) -> Mac {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VTEP_MAC_ANNOTATION))
        .and_then(|m| Mac::parse(m.trim()))
        .filter(|m| !m.is_multicast())
        .unwrap_or_else(|| derived_vtep_mac(internal_ip))
}

/// Every other node with a pod CIDR and an InternalIP, as the dataplane needs it. Nodes that
/// cannot be used are returned as (name, reason) so control can log them.
pub fn remote_nodes(
    cluster: &ClusterState,
    this_node: &str,
    routes: &[Route],
) -> (Vec<RemoteNode>, Vec<(String, String)>) {
    let mut remotes = Vec::new();
    let mut skipped = Vec::new();
    for node in &cluster.nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if name == this_node {
            continue;
        }
        match cluster.node_info(name) {
            Ok(info) => remotes.push(RemoteNode {
                pod_net: info.pod_cidr.network(),
                prefix_len: info.pod_cidr.prefix_len(),
                vtep_ip: info.internal_ip,
                vtep_mac: vtep_mac(node, info.internal_ip),
                next_hop: next_hop(routes, info.internal_ip),
            }),
            Err(e) => skipped.push((name.to_string(), e.to_string())),
        }
    }
    (remotes, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000A0A\t050012AC\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0
lxc12\t0201F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn routes_parse_and_pick_the_longest_match() {
        let r = parse_proc_routes(PROC_ROUTE, "eth0");
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(
            r[1],
            Route {
                dest: Ipv4Addr::new(172, 18, 0, 0),
                prefix_len: 24,
                gateway: Ipv4Addr::UNSPECIFIED
            }
        );
        assert_eq!(
            next_hop(&r, Ipv4Addr::new(172, 18, 0, 12)),
            Ipv4Addr::new(172, 18, 0, 12),
            "on-link"
        );
        assert_eq!(
            next_hop(&r, Ipv4Addr::new(10, 10, 3, 4)),
            Ipv4Addr::new(172, 18, 0, 5),
            "via a /16 route"
        );
        assert_eq!(
            next_hop(&r, Ipv4Addr::new(192, 0, 2, 1)),
            Ipv4Addr::new(172, 18, 0, 1),
            "default route"
        );
        assert_eq!(
            next_hop(&[], Ipv4Addr::new(192, 0, 2, 1)),
            Ipv4Addr::new(192, 0, 2, 1),
            "flat fabric"
        );
    }

    #[test]
    fn remotes_come_from_the_other_nodes_with_annotated_or_derived_macs() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2, annotations: {sluice.io/vtep-mac: "02:aa:bb:cc:dd:ee"}}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {podCIDR: 10.244.3.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.13}]}
---
apiVersion: v1
kind: Node
metadata: {name: n4}
status: {addresses: [{type: InternalIP, address: 172.18.0.14}]}
"#;
        let c = crate::cluster::parse_str(yaml, "test.yaml").expect("parses");
        let (remotes, skipped) = remote_nodes(&c, "n1", &[]);
        assert_eq!(remotes.len(), 2);
        assert_eq!(remotes[0].vtep_ip, Ipv4Addr::new(172, 18, 0, 12));
        assert_eq!(remotes[0].vtep_mac, Mac([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(
            remotes[1].vtep_mac,
            derived_vtep_mac(Ipv4Addr::new(172, 18, 0, 13))
        );
        assert_eq!(
            (remotes[1].pod_net, remotes[1].prefix_len),
            (Ipv4Addr::new(10, 244, 3, 0), 24)
        );
        assert_eq!(skipped.len(), 1, "n4 has no pod CIDR");
        assert_eq!(skipped[0].0, "n4");
    }
}
