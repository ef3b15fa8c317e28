//! Next hops on the uplink. Control publishes the MACs it learned (the XDP program snoops every
//! ARP packet on the uplink into a map, which control reads); when a next hop is missing, the
//! worker turns the packet's frame into an ARP request (RFC 826) for it, at most once per
//! [`ARP_RETRY_NS`] per address per worker, and the packet counts as `NeighborUnresolved`.
use std::net::Ipv4Addr;

use crate::{
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::OverlayConfig,
    wire::{arp, ethernet, Mac},
    TxKind, Verdict,
};

/// Minimum time between two ARP requests for one address from one worker.
pub const ARP_RETRY_NS: u64 = 100_000_000;
const SLOTS: usize = 64;

/// Per-worker memory of recent ARP requests: a small direct-mapped table, no allocation.
#[derive(Clone, Debug)]
pub struct ArpThrottle {
    slots: [(u32, u64); SLOTS],
}

impl Default for ArpThrottle {
    fn default() -> Self {
        Self {
            slots: [(0, 0); SLOTS],
        }
    }
}

impl ArpThrottle {
    /// True if a request for `ip` may go out at `now_ns` (and records it).
    #[inline]
    pub fn allow(&mut self, ip: Ipv4Addr, now_ns: u64) -> bool {
        let key = u32::from(ip);
        let slot = &mut self.slots[(key.wrapping_mul(0x9e37_79b1) >> 26) as usize % SLOTS];
        if slot.0 == key && slot.1 != 0 && now_ns.saturating_sub(slot.1) < ARP_RETRY_NS {
            return false;
        }
        *slot = (key, now_ns.max(1));
        true
    }
}

/// Turns `pkt` into a broadcast ARP request for `next_hop` from the node's uplink, or drops.
#[inline]
pub fn resolve(
    throttle: &mut ArpThrottle,
    now_ns: u64,
    overlay: &OverlayConfig,
    uplink_mac: Mac,
    next_hop: Ipv4Addr,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    if !throttle.allow(next_hop, now_ns) {
        return Verdict::Drop(DropReason::NeighborUnresolved);
    }
    let len = ethernet::HEADER_LEN + arp::PACKET_LEN;
    if pkt.set_len(len).is_err() {
        return Verdict::Drop(DropReason::NeighborUnresolved);
    }
    let data = pkt.data_mut();
    let (eth, body) = data.split_at_mut(ethernet::HEADER_LEN);
    if ethernet::emit(eth, Mac::BROADCAST, uplink_mac, ethernet::ETHERTYPE_ARP).is_err()
        || arp::emit(
            body,
            arp::OP_REQUEST,
            uplink_mac,
            overlay.node_ip,
            Mac([0; 6]),
            next_hop,
        )
        .is_err()
    {
        return Verdict::Drop(DropReason::NeighborUnresolved);
    }
    Verdict::Tx {
        ifindex: overlay.uplink_ifindex,
        kind: TxKind::ArpRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_per_address_per_interval() {
        let mut t = ArpThrottle::default();
        let a = Ipv4Addr::new(172, 18, 0, 12);
        let b = Ipv4Addr::new(172, 18, 0, 13);
        assert!(t.allow(a, 1_000));
        assert!(!t.allow(a, 1_000 + ARP_RETRY_NS - 1));
        assert!(t.allow(b, 1_000), "another address is independent");
        assert!(t.allow(a, 1_000 + ARP_RETRY_NS));
        let mut fresh = ArpThrottle::default();
        assert!(
            fresh.allow(a, 0),
            "time zero (no clock yet) still allows the first"
        );
    }
}
