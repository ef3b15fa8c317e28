//! The immutable tables workers read: built by control, published atomically (arc-swap), picked
//! up by each worker once per batch. Lookups are on sorted vectors (binary search): no hashing,
//! no allocation, bounded by the number of interfaces and local endpoints on one node.
//!
//! Local endpoints are exact /32 lookups. Other nodes' pod CIDRs are a sorted list of disjoint
//! prefixes (a node's pod CIDRs never overlap another's), found by binary search for the
//! greatest network <= the address, then a mask check. Neighbours on the uplink (next hops'
//! MACs) are learned by control from ARP and published here.
use std::net::Ipv4Addr;

use crate::wire::Mac;

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
        self.interfaces
            .binary_search_by_key(&ifindex, |i| i.ifindex)
            .ok()
            .map(|at| &self.interfaces[at])
    }
    #[inline]
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&EndpointEntry> {
        let key = u32::from(ip);
        self.endpoints
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
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
