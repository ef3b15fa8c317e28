//! The immutable tables workers read: built by control, published atomically (arc-swap), picked
//! up by each worker once per batch. Lookups are on sorted vectors (binary search): no hashing,
//! no allocation, bounded by the number of interfaces and local endpoints on one node.
//!
//! Limits: exact /32 lookups of local endpoints only; routes to other nodes arrive with the
//! overlay.
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

#[derive(Clone, Debug)]
pub struct Snapshot {
    generation: u64,
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
    pub fn interfaces(&self) -> &[InterfaceEntry] {
        &self.interfaces
    }
    pub fn endpoints(&self) -> impl Iterator<Item = (Ipv4Addr, &EndpointEntry)> {
        self.endpoints
            .iter()
            .map(|(ip, e)| (Ipv4Addr::from(*ip), e))
    }
}

/// Builds a [`Snapshot`]. Later entries for the same key replace earlier ones.
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
            },
        }
    }
    pub fn interface(&mut self, entry: InterfaceEntry) -> &mut Self {
        self.snap.interfaces.retain(|i| i.ifindex != entry.ifindex);
        self.snap.interfaces.push(entry);
        self
    }
    pub fn endpoint(&mut self, ip: Ipv4Addr, entry: EndpointEntry) -> &mut Self {
        let key = u32::from(ip);
        self.snap.endpoints.retain(|(k, _)| *k != key);
        self.snap.endpoints.push((key, entry));
        self
    }
    pub fn build(mut self) -> Snapshot {
        self.snap.interfaces.sort_by_key(|i| i.ifindex);
        self.snap.endpoints.sort_by_key(|(k, _)| *k);
        self.snap
    }
}
