//! The immutable tables workers read: built by control, published atomically (arc-swap), picked
//! up by each worker once per batch. Lookups are on sorted vectors (binary search): no hashing,
//! no allocation, bounded by the number of interfaces and local endpoints on one node.
//!
//! Local endpoints and interfaces are exact lookups in a hash index built with the snapshot
//! (flat cost as pods are added; the sorted vectors remain for iteration). Other nodes' pod CIDRs are a sorted list of disjoint
//! prefixes (a node's pod CIDRs never overlap another's), found by binary search for the
//! greatest network <= the address, then a mask check. Neighbours on the uplink (next hops'
//! MACs) are learned by control from ARP and published here.
use std::{net::Ipv4Addr, sync::Arc};

use crate::{
    policy::PolicyTable,
    services::ServiceTable,
    wire::Mac,
    wireguard::{PeerId, Session, SessionTable},
};

/// Where packets for this node that the host firewall admits go: the dataplane's end of the
/// re-injection veth pair (`ifindex`, `mac`), and the MAC of the kernel's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPath {
    pub ifindex: u32,
    pub mac: Mac,
    pub kernel_mac: Mac,
}

/// What an interface is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum InterfaceRole {
    /// Host side of a pod's veth pair.
    Pod,
    /// The node's link to other nodes.
    Uplink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceEntry {
    pub ifindex: u32,
    /// The interface's own MAC: the gateway MAC pods see on it, and the source MAC of frames the
    /// dataplane sends out of it.
    pub mac: Mac,
    pub role: InterfaceRole,
}

/// A pod on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Host side of the pod's veth: frames for the pod are sent here.
    pub ifindex: u32,
    /// The pod interface's MAC (destination MAC of frames for the pod).
    pub mac: Mac,
}

/// The node's overlay (VXLAN, RFC 7348) settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayConfig {
    /// This node's address on the uplink: outer source address, VXLAN endpoint.
    pub node_ip: Ipv4Addr,
    /// Inner source MAC of frames this node encapsulates (its VTEP MAC).
    pub vtep_mac: Mac,
    pub uplink_ifindex: u32,
    /// The uplink's MTU (IP bytes): outer packets may not exceed it.
    pub uplink_mtu: u16,
    /// VXLAN UDP destination port (8472 like Cilium and Flannel; IANA's is 4789).
    pub port: u16,
    pub vni: u32,
}

/// Another node, reached through the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// The node's pod CIDR.
    pub pod_net: Ipv4Addr,
    pub prefix_len: u8,
    /// Its VXLAN endpoint (InternalIP): the outer destination.
    pub vtep_ip: Ipv4Addr,
    /// Its VTEP MAC: the inner destination MAC (a kernel vxlan device drops frames not addressed
    /// to it; sluice ignores the inner destination MAC).
    pub vtep_mac: Mac,
    /// Where to send the outer packet on the uplink: `vtep_ip` itself when on-link, else the
    /// uplink's gateway.
    pub next_hop: Ipv4Addr,
}

impl RemoteNode {
    #[inline]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.pod_net) & mask
    }
}

/// Address translation and routing out of the cluster (masquerade, NodePort SNAT, hairpin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// This node's addresses (InternalIP first, then ExternalIPs): NodePorts are answered on
    /// them, and SNAT uses the first.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Source address of hairpin flows (a pod reaching a service that selects itself), which
    /// must not see its own address as the source: Cilium's `169.254.42.1`.
    pub hairpin_addr: Ipv4Addr,
    /// SNAT source ports (inclusive), outside the kernel's ephemeral range and the NodePort
    /// range; the uplink's XDP program hands replies to these ports to the dataplane.
    pub ports: (u16, u16),
    /// This node's pod CIDR.
    pub pod_net: Ipv4Addr,
    pub pod_prefix: u8,
    /// Masquerade pod traffic to destinations outside the cluster (pod CIDRs and nodes).
    pub masquerade: bool,
    /// The uplink's subnet (destinations in it are on-link) and default gateway.
    pub uplink_net: Ipv4Addr,
    pub uplink_prefix: u8,
    pub uplink_gateway: Option<Ipv4Addr>,
}

#[inline]
fn in_prefix(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

impl NatConfig {
    /// Whether `ip` is one of this node's addresses or the hairpin address (replies to SNATed
    /// flows come back to them).
    #[inline]
    pub fn is_snat_addr(&self, ip: Ipv4Addr) -> bool {
        ip == self.hairpin_addr || self.node_addrs.contains(&ip)
    }

    /// The SNAT source address for flows leaving through the uplink.
    #[inline]
    pub fn node_addr(&self) -> Option<Ipv4Addr> {
        self.node_addrs.first().copied()
    }

    #[inline]
    pub fn in_local_pod_net(&self, ip: Ipv4Addr) -> bool {
        in_prefix(ip, self.pod_net, self.pod_prefix)
    }

    /// Where a packet for `dst` (outside the cluster) goes on the uplink: `dst` itself when
    /// on-link, else the gateway.
    #[inline]
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if in_prefix(dst, self.uplink_net, self.uplink_prefix) {
            Some(dst)
        } else {
            self.uplink_gateway
        }
    }
}

/// A WireGuard peer node as the workers need it.
#[derive(Clone, Debug)]
pub struct WgPeer {
    /// The peer node's address: VXLAN packets to it are sealed for it, and the outer source its
    /// transport messages must carry inside.
    pub node_ip: Ipv4Addr,
    pub id: PeerId,
    /// The session to seal with; `None` until a handshake is confirmed.
    pub send: Option<Arc<Session>>,
}

/// Encryption between nodes (WireGuard, Cilium's WireGuard+VXLAN shape).
#[derive(Clone, Debug)]
pub struct WireguardConfig {
    /// UDP port of WireGuard (51871).
    pub port: u16,
    /// Strict mode: pod traffic to a node without a session is dropped (and clear VXLAN from a
    /// peer node refused) instead of going in clear.
    pub strict: bool,
    /// Sorted by `node_ip`.
    pub peers: Vec<WgPeer>,
    /// Every live session by our receiver index.
    pub sessions: SessionTable,
}

impl WireguardConfig {
    #[inline]
    pub fn peer(&self, node_ip: Ipv4Addr) -> Option<&WgPeer> {
        let key = u32::from(node_ip);
        self.peers
            .binary_search_by_key(&key, |p| u32::from(p.node_ip))
            .ok()
            .map(|i| &self.peers[i])
    }

    #[inline]
    pub fn peer_by_id(&self, id: PeerId) -> Option<&WgPeer> {
        self.peers.iter().find(|p| p.id == id)
    }
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    generation: u64,
    overlay: Option<OverlayConfig>,
    /// Sorted by `pod_net`, disjoint.
    remotes: Vec<RemoteNode>,
    /// Uplink neighbours (next hop address -> MAC), sorted.
    neighbors: Vec<(u32, Mac)>,
    gateway: Ipv4Addr,
    interfaces: Vec<InterfaceEntry>,
    endpoints: Vec<(u32, EndpointEntry)>,
    /// Hash indexes into `interfaces` (by ifindex) and `endpoints` (by address): one probe in
    /// the common case, whatever the number of pods (the sorted vectors stay for iteration).
    interface_index: FlatIndex,
    endpoint_index: FlatIndex,
    /// Index of `remotes` by their VTEP (node) address.
    remote_node_index: FlatIndex,
    services: Arc<ServiceTable>,
    nat: Option<NatConfig>,
    wireguard: Option<Arc<WireguardConfig>>,
    policy: Arc<PolicyTable>,
    host: Option<HostPath>,
}

/// An open-addressing hash index from a non-zero `u32` key to a position: power-of-two table at
/// most half full, multiplicative (Fibonacci) hashing, linear probing. Built once per snapshot;
/// lookups allocate nothing and always end at an empty slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FlatIndex {
    keys: Vec<u32>,
    positions: Vec<u32>,
    shift: u32,
}

impl FlatIndex {
    const EMPTY: u32 = 0;

    pub(crate) fn build(keys: impl ExactSizeIterator<Item = u32>) -> Self {
        let n = keys.len().max(1);
        let slots = (n * 2).next_power_of_two().max(8);
        let mut idx = FlatIndex {
            keys: vec![Self::EMPTY; slots],
            positions: vec![0; slots],
            shift: 32 - slots.trailing_zeros(),
        };
        let mask = slots - 1;
        for (pos, key) in keys.enumerate() {
            if key == Self::EMPTY {
                continue; // ifindex 0 and 0.0.0.0 are never valid keys
            }
            let mut at = idx.slot(key);
            while idx.keys[at] != Self::EMPTY && idx.keys[at] != key {
                at = (at + 1) & mask;
            }
            idx.keys[at] = key;
            idx.positions[at] = pos as u32;
        }
        idx
    }

    #[inline]
    fn slot(&self, key: u32) -> usize {
        (key.wrapping_mul(0x9e37_79b9) >> self.shift) as usize
    }

    #[inline]
    pub(crate) fn get(&self, key: u32) -> Option<usize> {
        if self.keys.is_empty() || key == Self::EMPTY {
            return None;
        }
        let mask = self.keys.len() - 1;
        let mut at = self.slot(key);
        loop {
            let k = self.keys[at];
            if k == key {
                return Some(self.positions[at] as usize);
            }
            if k == Self::EMPTY {
                return None;
            }
            at = (at + 1) & mask;
        }
    }
}

impl Snapshot {
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The pods' gateway address (first address of the node's pod CIDR).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    #[inline]
    pub fn interface(&self, ifindex: u32) -> Option<&InterfaceEntry> {
        self.interface_index
            .get(ifindex)
            .map(|at| &self.interfaces[at])
    }
    #[inline]
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&EndpointEntry> {
        self.endpoint_index
            .get(u32::from(ip))
            .map(|at| &self.endpoints[at].1)
    }
    pub fn overlay(&self) -> Option<&OverlayConfig> {
        self.overlay.as_ref()
    }
    /// The remote node whose pod CIDR holds `ip`.
    #[inline]
    pub fn remote(&self, ip: Ipv4Addr) -> Option<&RemoteNode> {
        let key = u32::from(ip);
        let at = self
            .remotes
            .partition_point(|r| u32::from(r.pod_net) <= key);
        let r = self.remotes.get(at.checked_sub(1)?)?;
        r.contains(ip).then_some(r)
    }
    /// The MAC of uplink neighbour `ip`, if resolved.
    #[inline]
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<Mac> {
        let key = u32::from(ip);
        self.neighbors
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|at| self.neighbors[at].1)
    }
    /// The remote node whose address (VTEP) is `ip`.
    #[inline]
    pub fn remote_node(&self, ip: Ipv4Addr) -> Option<&RemoteNode> {
        self.remote_node_index
            .get(u32::from(ip))
            .map(|at| &self.remotes[at])
    }
    /// The service tables (empty when there are no services).
    #[inline]
    pub fn services(&self) -> &ServiceTable {
        &self.services
    }
    pub fn services_arc(&self) -> &Arc<ServiceTable> {
        &self.services
    }
    #[inline]
    pub fn nat(&self) -> Option<&NatConfig> {
        self.nat.as_ref()
    }
    #[inline]
    pub fn wireguard(&self) -> Option<&WireguardConfig> {
        self.wireguard.as_deref()
    }
    /// The compiled network policy (empty, inactive, when no policy selects anything here).
    #[inline]
    pub fn policy(&self) -> &PolicyTable {
        &self.policy
    }
    /// The host firewall's way into the kernel (set when a host policy selects this node).
    #[inline]
    pub fn host_path(&self) -> Option<&HostPath> {
        self.host.as_ref()
    }
    /// Whether `ip` is inside the cluster: a pod CIDR (this node's or another's) or a node
    /// address. Pod traffic to anything else is masqueraded.
    #[inline]
    pub fn in_cluster(&self, ip: Ipv4Addr) -> bool {
        // Cheapest first: a mask compare answers for this node's pods (the common case on the
        // per-packet path), then the other nodes' CIDRs and addresses.
        self.nat
            .as_ref()
            .is_some_and(|n| n.in_local_pod_net(ip) || n.node_addrs.contains(&ip))
            || self.remote(ip).is_some()
            || self.remote_node(ip).is_some()
            || self.endpoint(ip).is_some()
    }
    pub fn remotes(&self) -> &[RemoteNode] {
        &self.remotes
    }
    pub fn neighbors(&self) -> impl Iterator<Item = (Ipv4Addr, Mac)> + '_ {
        self.neighbors.iter().map(|(k, m)| (Ipv4Addr::from(*k), *m))
    }
    pub fn interfaces(&self) -> &[InterfaceEntry] {
        &self.interfaces
    }
    pub fn endpoints(&self) -> impl Iterator<Item = (Ipv4Addr, &EndpointEntry)> {
        self.endpoints
            .iter()
            .map(|(ip, e)| (Ipv4Addr::from(*ip), e))
    }
}

/// Builds a [`Snapshot`]. Later entries for the same key replace earlier ones (resolved once in
/// `build`, so building is O(n log n)).
#[derive(Debug)]
pub struct SnapshotBuilder {
    snap: Snapshot,
}

impl SnapshotBuilder {
    pub fn new(generation: u64, gateway: Ipv4Addr) -> Self {
        Self {
            snap: Snapshot {
                generation,
                gateway,
                interfaces: Vec::new(),
                endpoints: Vec::new(),
                overlay: None,
                remotes: Vec::new(),
                neighbors: Vec::new(),
                interface_index: FlatIndex::default(),
                endpoint_index: FlatIndex::default(),
                remote_node_index: FlatIndex::default(),
                services: ServiceTable::empty(),
                nat: None,
                wireguard: None,
                policy: Arc::new(PolicyTable::empty()),
                host: None,
            },
        }
    }
    pub fn interface(&mut self, entry: InterfaceEntry) -> &mut Self {
        self.snap.interfaces.push(entry);
        self
    }
    pub fn endpoint(&mut self, ip: Ipv4Addr, entry: EndpointEntry) -> &mut Self {
        self.snap.endpoints.push((u32::from(ip), entry));
        self
    }
    pub fn overlay(&mut self, config: OverlayConfig) -> &mut Self {
        self.snap.overlay = Some(config);
        self
    }
    /// Adds a remote node. Pod CIDRs must not overlap (checked in `build`: an overlapping one
    /// is dropped and reported).
    pub fn remote(&mut self, node: RemoteNode) -> &mut Self {
        self.snap.remotes.push(node);
        self
    }
    pub fn services(&mut self, table: Arc<ServiceTable>) -> &mut Self {
        self.snap.services = table;
        self
    }
    pub fn nat(&mut self, config: NatConfig) -> &mut Self {
        self.snap.nat = Some(config);
        self
    }
    /// Turns WireGuard on (peers are sorted here).
    pub fn wireguard(&mut self, mut config: WireguardConfig) -> &mut Self {
        config.peers.sort_by_key(|p| u32::from(p.node_ip));
        self.snap.wireguard = Some(Arc::new(config));
        self
    }
    /// Turns the host firewall's re-injection path on.
    pub fn host_path(&mut self, path: HostPath) -> &mut Self {
        self.snap.host = Some(path);
        self
    }
    /// The compiled network policy (see `policy`).
    pub fn policy(&mut self, table: Arc<PolicyTable>) -> &mut Self {
        self.snap.policy = table;
        self
    }
    pub fn neighbor(&mut self, ip: Ipv4Addr, mac: Mac) -> &mut Self {
        self.snap.neighbors.push((u32::from(ip), mac));
        self
    }
    /// Builds the snapshot; returns remote nodes refused for overlapping an earlier one.
    pub fn build_checked(mut self) -> (Snapshot, Vec<RemoteNode>) {
        let mut refused = Vec::new();
        let mut remotes: Vec<RemoteNode> = Vec::with_capacity(self.snap.remotes.len());
        for r in std::mem::take(&mut self.snap.remotes) {
            let mut r = r;
            let mask = if r.prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(r.prefix_len.min(32)))
            };
            r.pod_net = Ipv4Addr::from(u32::from(r.pod_net) & mask);
            let overlaps = remotes
                .iter()
                .any(|o| o.contains(r.pod_net) || r.contains(o.pod_net));
            if overlaps {
                refused.push(r);
            } else {
                remotes.push(r);
            }
        }
        remotes.sort_by_key(|r| u32::from(r.pod_net));
        self.snap.remotes = remotes;
        self.snap.remote_node_index =
            FlatIndex::build(self.snap.remotes.iter().map(|r| u32::from(r.vtep_ip)));
        // Later entries for the same key replace earlier ones: stable sort, keep the last.
        fn last_wins<T, K: PartialEq>(v: &mut Vec<T>, key: impl Fn(&T) -> K) {
            let mut out: Vec<T> = Vec::with_capacity(v.len());
            for item in v.drain(..) {
                match out.last_mut() {
                    Some(prev) if key(prev) == key(&item) => *prev = item,
                    _ => out.push(item),
                }
            }
            *v = out;
        }
        self.snap.neighbors.sort_by_key(|(k, _)| *k);
        last_wins(&mut self.snap.neighbors, |(k, _)| *k);
        self.snap.interfaces.sort_by_key(|i| i.ifindex);
        last_wins(&mut self.snap.interfaces, |i| i.ifindex);
        self.snap.endpoints.sort_by_key(|(k, _)| *k);
        last_wins(&mut self.snap.endpoints, |(k, _)| *k);
        self.snap.interface_index =
            FlatIndex::build(self.snap.interfaces.iter().map(|i| i.ifindex));
        self.snap.endpoint_index = FlatIndex::build(self.snap.endpoints.iter().map(|(k, _)| *k));
        (self.snap, refused)
    }
    /// Builds the snapshot (overlapping remote pod CIDRs are dropped: see `build_checked`).
    pub fn build(self) -> Snapshot {
        self.build_checked().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(net: [u8; 4], len: u8, vtep: [u8; 4]) -> RemoteNode {
        RemoteNode {
            pod_net: Ipv4Addr::from(net),
            prefix_len: len,
            vtep_ip: Ipv4Addr::from(vtep),
            vtep_mac: Mac([0x0a, 0x58, vtep[0], vtep[1], vtep[2], vtep[3]]),
            next_hop: Ipv4Addr::from(vtep),
        }
    }

    #[test]
    fn later_entries_win_and_lookups_find_them() {
        let mac = |b| Mac([2, 0, 0, 0, 0, b]);
        let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 0, 0, 1));
        b.endpoint(
            Ipv4Addr::new(10, 0, 0, 5),
            EndpointEntry {
                ifindex: 1,
                mac: mac(1),
            },
        );
        b.endpoint(
            Ipv4Addr::new(10, 0, 0, 5),
            EndpointEntry {
                ifindex: 2,
                mac: mac(2),
            },
        );
        b.interface(InterfaceEntry {
            ifindex: 2,
            mac: mac(9),
            role: InterfaceRole::Pod,
        });
        b.interface(InterfaceEntry {
            ifindex: 2,
            mac: mac(8),
            role: InterfaceRole::Pod,
        });
        b.neighbor(Ipv4Addr::new(172, 18, 0, 1), mac(3));
        b.neighbor(Ipv4Addr::new(172, 18, 0, 1), mac(4));
        let s = b.build();
        assert_eq!(
            s.endpoint(Ipv4Addr::new(10, 0, 0, 5)).map(|e| e.ifindex),
            Some(2)
        );
        assert_eq!(s.endpoints().count(), 1);
        assert_eq!(s.interface(2).map(|i| i.mac), Some(mac(8)));
        assert_eq!(s.interfaces().len(), 1);
        assert_eq!(s.neighbor(Ipv4Addr::new(172, 18, 0, 1)), Some(mac(4)));
    }

    #[test]
    fn hash_index_finds_every_key_and_nothing_else() {
        for n in [0u32, 1, 7, 8, 9, 1000, 70_000] {
            let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 0, 0, 1));
            // Distinct keys (0x10001 is odd: i -> i * 0x10001 is a bijection) sharing low bits.
            let ip = |i: u32| Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i.wrapping_mul(0x1_0001)));
            for i in 1..=n {
                b.endpoint(
                    ip(i),
                    EndpointEntry {
                        ifindex: i,
                        mac: Mac([2, 0, 0, 0, 0, 1]),
                    },
                );
                b.interface(InterfaceEntry {
                    ifindex: i,
                    mac: Mac([2, 0, 0, 0, 0, 2]),
                    role: InterfaceRole::Pod,
                });
            }
            b.endpoint(
                Ipv4Addr::UNSPECIFIED,
                EndpointEntry {
                    ifindex: 9,
                    mac: Mac([2, 0, 0, 0, 0, 3]),
                },
            );
            let s = b.build();
            for i in 1..=n {
                assert_eq!(s.endpoint(ip(i)).map(|e| e.ifindex), Some(i), "n={n} i={i}");
                assert_eq!(s.interface(i).map(|e| e.ifindex), Some(i));
            }
            assert!(s.endpoint(ip(n + 1)).is_none());
            assert!(s.interface(n + 1).is_none());
            assert!(s.interface(0).is_none());
            assert!(
                s.endpoint(Ipv4Addr::UNSPECIFIED).is_none(),
                "0.0.0.0 is never an endpoint"
            );
        }
    }

    #[test]
    fn remote_lookup_is_longest_disjoint_prefix_and_overlaps_are_refused() {
        let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 244, 1, 1));
        b.remote(remote([10, 244, 3, 0], 24, [172, 18, 0, 13]));
        b.remote(remote([10, 244, 2, 0], 24, [172, 18, 0, 12]));
        b.remote(remote([10, 245, 0, 7], 16, [172, 18, 0, 14])); // host bits are masked off
        b.remote(remote([10, 244, 2, 128], 25, [172, 18, 0, 15])); // overlaps node .12
        let (s, refused) = b.build_checked();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].vtep_ip, Ipv4Addr::new(172, 18, 0, 15));
        let vtep = |ip: [u8; 4]| s.remote(Ipv4Addr::from(ip)).map(|r| r.vtep_ip.octets());
        assert_eq!(vtep([10, 244, 2, 200]), Some([172, 18, 0, 12]));
        assert_eq!(vtep([10, 244, 3, 0]), Some([172, 18, 0, 13]));
        assert_eq!(vtep([10, 245, 255, 255]), Some([172, 18, 0, 14]));
        assert_eq!(vtep([10, 244, 4, 1]), None);
        assert_eq!(vtep([10, 244, 1, 9]), None);
        assert_eq!(vtep([0, 0, 0, 0]), None);
        assert_eq!(vtep([255, 255, 255, 255]), None);
    }
}
