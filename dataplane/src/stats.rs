//! Per-worker counters: plain `u64`s owned by the worker, published every few batches into a
//! single-writer array of atomics (Relaxed stores, no read-modify-write, no sharing of a cache
//! line between writers), read by control at any time without stopping the worker.
//!
//! A read is not a consistent cut: fields are stored one by one, so a reader racing a
//! publication can see e.g. `dropped` one batch ahead of the per-reason `drops`. Each field is
//! exact and monotonic; sums across fields agree once the worker is idle (it publishes before
//! sleeping) or after the next publication.
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::{drop_reason::DropReason, TxKind};

/// Drops per [`DropReason`] number (index 0 unused); derefs to the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drops(pub [u64; DropReason::SLOTS]);

impl Default for Drops {
    fn default() -> Self {
        Drops([0; DropReason::SLOTS])
    }
}

impl std::ops::Deref for Drops {
    type Target = [u64; DropReason::SLOTS];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Drops {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Serialize for Drops {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A worker's counters.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct Counters {
            $( $(#[$doc])* pub $name: u64, )*
            /// Drops per [`DropReason`] number (index 0 unused).
            pub drops: Drops,
        }

        impl Counters {
            /// Names of the scalar counters, in `values()` order.
            pub const NAMES: &'static [&'static str] = &[$( stringify!($name) ),*];
            const SCALARS: usize = Self::NAMES.len();
            const SLOTS: usize = Self::SCALARS + DropReason::SLOTS;

            fn store(&self, out: &[AtomicU64]) {
                let mut i = 0;
                $( out[i].store(self.$name, Ordering::Relaxed); i += 1; )*
                for &d in self.drops.iter() {
                    out[i].store(d, Ordering::Relaxed);
                    i += 1;
                }
            }

            fn load(from: &[AtomicU64]) -> Self {
                let mut c = Counters::default();
                let mut i = 0;
                $( c.$name = from[i].load(Ordering::Relaxed); i += 1; )*
                for d in c.drops.iter_mut() {
                    *d = from[i].load(Ordering::Relaxed);
                    i += 1;
                }
                c
            }

            /// Scalar counters as (name, value), in `NAMES` order.
            pub fn values(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name) ),*]
            }

            /// Sums `other` into `self` (merging workers).
            pub fn add(&mut self, other: &Counters) {
                $( self.$name += other.$name; )*
                for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
                    *a += *b;
                }
            }
        }
    };
}

counters! {
    /// Frames taken from rx rings.
    rx_packets,
    rx_bytes,
    /// Frames placed on tx rings.
    tx_packets,
    tx_bytes,
    /// Routed to another interface.
    forwarded,
    /// ARP replies for the gateway.
    arp_replies,
    /// ICMP echo replies from the gateway.
    gateway_echo_replies,
    /// ICMP errors sent (time exceeded, fragmentation needed).
    icmp_errors_sent,
    /// Sent to another node in VXLAN.
    encapsulated,
    /// Received from another node in VXLAN and delivered.
    decapsulated,
    /// Sealed in WireGuard for another node (also counted in `encapsulated`).
    encrypted,
    /// WireGuard transport messages opened (authentic, in the replay window).
    decrypted,
    /// ARP requests sent for unresolved next hops on the uplink.
    arp_requests,
    /// TCP RSTs and ICMP port unreachables sent for service ports without backends.
    rejects_sent,
    /// Flows translated to a service backend (new conntrack entries with DNAT).
    lb_new_flows,
    /// Flows masqueraded (SNAT to the node address) leaving the cluster.
    masq_new_flows,
    /// Flows whose backend left the service, forgotten and balanced again (Cilium's reselect).
    lb_reselected,
    /// Packets that matched a tracked flow.
    ct_hits,
    /// Packets for this node itself that the host firewall let through to the kernel (the
    /// re-injection veth).
    to_host,
    /// Flows tracked only because a NetworkPolicy isolates one of their ends.
    policy_flows,
    /// Flows (or untracked packets) forwarded under an audit verdict: an audit-mode policy
    /// (or the agent-wide audit mode) would have denied them at the destination's ingress.
    policy_audit_ingress,
    /// The same, at the source's egress.
    policy_audit_egress,
    /// The same, by the host policy of this node.
    policy_audit_host,
    /// Established flows cut because a policy change denies them.
    policy_cut,
    /// Frames copied to another worker that owns their flow.
    handoff_out,
    /// Frames received from other workers.
    handoff_in,
    /// Conntrack entries in use (a gauge: this worker's fill level).
    ct_entries,
    /// Conntrack capacity (a gauge).
    ct_capacity,
    /// Live flows evicted to make room (table or buckets full).
    ct_evictions,
    /// Expired flows reclaimed by garbage collection.
    ct_gc_removed,
    /// Frames dropped (sum of `drops`).
    dropped,
    /// Loop iterations that found work.
    batches,
    /// Times the worker slept in poll(2) for lack of work.
    idle_sleeps,
    /// sendto(2) kicks of tx rings.
    tx_kicks,
    /// Kicks that failed for a reason other than EAGAIN/EBUSY (ENETDOWN, ENXIO, ENOBUFS: the
    /// interface is down or going away); frames stay queued until the next frame for it.
    tx_kick_errors,
    /// recvfrom(2) kicks for fill rings that asked for one.
    fill_kicks,
    /// Times a fill ring could not be topped up because the frame pool was empty.
    fill_starved,
    /// Rx descriptors pointing outside the UMEM (never expected; counted, frame ignored).
    bad_descriptors,
    /// Frames the kernel still held when a socket was removed (lost to the pool).
    frames_leaked,
}

impl Counters {
    #[inline]
    pub fn count_drop(&mut self, reason: DropReason) {
        self.dropped += 1;
        self.drops[reason as usize] += 1;
    }
    #[inline]
    pub fn count_tx_kind(&mut self, kind: TxKind) {
        match kind {
            TxKind::Forward => self.forwarded += 1,
            TxKind::ArpReply => self.arp_replies += 1,
            TxKind::GatewayEcho => self.gateway_echo_replies += 1,
            TxKind::IcmpError => self.icmp_errors_sent += 1,
            TxKind::Encap => self.encapsulated += 1,
            TxKind::Decap => self.decapsulated += 1,
            TxKind::ToHost => self.to_host += 1,
            TxKind::EncapEncrypted => {
                self.encapsulated += 1;
                self.encrypted += 1;
            }
            TxKind::ArpRequest => {
                self.arp_requests += 1;
                self.count_drop(DropReason::NeighborUnresolved);
            }
            TxKind::Reject(reason) => {
                self.rejects_sent += 1;
                self.count_drop(reason);
            }
        }
    }
    /// Drops per reason, every reason listed (zeros included).
    pub fn drops_by_reason(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops[*r as usize]))
            .collect()
    }
}

/// The published copy of one worker's counters (one writer: that worker).
pub struct SharedCounters {
    slots: Box<[AtomicU64]>,
    generation: AtomicU64,
    free_frames: AtomicU64,
    /// Per WireGuard peer slot (peer id modulo [`WG_PEER_SLOTS`]): tx packets, tx bytes, rx
    /// packets, rx bytes.
    wg: Box<[AtomicU64]>,
}

/// WireGuard peer slots in the per-worker traffic counters.
pub const WG_PEER_SLOTS: usize = crate::stages::lb::WG_BLOCKS;

/// Per WireGuard peer slot: `[tx packets, tx bytes, rx packets, rx bytes]`.
pub type WgPeerCounters = [[u64; 4]; WG_PEER_SLOTS];

impl Default for SharedCounters {
    fn default() -> Self {
        Self {
            slots: (0..Counters::SLOTS).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
            free_frames: AtomicU64::new(0),
            wg: (0..WG_PEER_SLOTS * 4).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl SharedCounters {
    /// Called by the owning worker only.
    pub fn publish(&self, c: &Counters, snapshot_generation: u64, free_frames: u64) {
        c.store(&self.slots);
        self.generation
            .store(snapshot_generation, Ordering::Relaxed);
        self.free_frames.store(free_frames, Ordering::Relaxed);
    }
    /// Called by the owning worker only.
    pub fn publish_wg(&self, c: &WgPeerCounters) {
        for (i, v) in c.iter().flatten().enumerate() {
            self.wg[i].store(*v, Ordering::Relaxed);
        }
    }
    pub fn read_wg(&self) -> WgPeerCounters {
        let mut out = [[0u64; 4]; WG_PEER_SLOTS];
        for (i, v) in out.iter_mut().flatten().enumerate() {
            *v = self.wg[i].load(Ordering::Relaxed);
        }
        out
    }
    /// Frames in the worker's free list at its last publication (a gauge).
    pub fn free_frames(&self) -> u64 {
        self.free_frames.load(Ordering::Relaxed)
    }
    pub fn read(&self) -> (Counters, u64) {
        (
            Counters::load(&self.slots),
            self.generation.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_every_field() {
        let mut c = Counters {
            rx_packets: 1,
            frames_leaked: 17,
            ..Default::default()
        };
        c.count_drop(DropReason::NoRoute);
        c.count_drop(DropReason::Ipv4Multicast);
        c.count_tx_kind(TxKind::ArpReply);
        let shared = SharedCounters::default();
        shared.publish(&c, 42, 7);
        assert_eq!(shared.free_frames(), 7);
        let (back, generation) = shared.read();
        assert_eq!(back, c);
        assert_eq!(generation, 42);
        assert_eq!(back.dropped, 2);
        assert_eq!(back.drops[DropReason::NoRoute as usize], 1);
        let mut sum = back.clone();
        sum.add(&c);
        assert_eq!(sum.drops[DropReason::Ipv4Multicast as usize], 2);
        assert_eq!(sum.arp_replies, 2);
    }
}
