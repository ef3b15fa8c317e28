//! Per-flow sequence accounting: received, lost, reordered, duplicates.
//!
//! The wire carries a 32-bit sequence number per flow (see [`crate::payload`]); this module
//! unwraps it to 64 bits against the highest sequence seen so far (a jump of less than 2^31 in
//! either direction is taken as the nearest candidate), so wrap-around costs nothing.
//!
//! A bitmap over the last [`REORDER_WINDOW`] sequence numbers tells a late packet (a gap being
//! filled: *reordered*) from a second copy (*duplicate*). Gaps count as *lost* until filled.
//! Packets older than the window cannot be told apart: they count as reordered and as *late*,
//! and fill a gap. Every flow is expected to start at sequence 0, so packets missed before the
//! first one received count as lost.

use serde::{Deserialize, Serialize};

/// How far back (in sequence numbers) reorder and duplicates are told apart exactly.
pub const REORDER_WINDOW: u64 = 4096;
const WINDOW_WORDS: usize = (REORDER_WINDOW / 64) as usize;

/// Totals over one or many flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqStats {
    /// Distinct packets received (duplicates excluded).
    pub received: u64,
    /// Sequence numbers never received, below the highest one received.
    pub lost: u64,
    /// Packets that arrived after a higher sequence number of their flow.
    pub reordered: u64,
    /// Second and later copies of a packet.
    pub duplicates: u64,
    /// Reordered packets older than the window: maybe duplicates, counted as reordered.
    pub late: u64,
}

impl SeqStats {
    pub fn add(&mut self, other: &SeqStats) {
        self.received += other.received;
        self.lost += other.lost;
        self.reordered += other.reordered;
        self.duplicates += other.duplicates;
        self.late += other.late;
    }
}

/// The state of one flow.
#[derive(Clone, Debug)]
pub struct FlowSeq {
    /// One past the highest unwrapped sequence number seen (the next one expected).
    next: u64,
    /// Bit `s % REORDER_WINDOW` set: sequence `s` (within the window below `next`) arrived.
    window: [u64; WINDOW_WORDS],
    stats: SeqStats,
}

impl Default for FlowSeq {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowSeq {
    /// A flow whose first packet is sequence 0.
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// A flow whose first packet is `first` (unwrapped); used to test wrap-around.
    pub fn starting_at(first: u64) -> Self {
        Self {
            next: first,
            window: [0; WINDOW_WORDS],
            stats: SeqStats::default(),
        }
    }

    pub fn stats(&self) -> SeqStats {
        self.stats
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % REORDER_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn test_and_set(&mut self, seq: u64) -> bool {
        let (w, m) = Self::bit(seq);
        let was = self.window[w] & m != 0;
        self.window[w] |= m;
        was
    }

    fn clear(&mut self, seq: u64) {
        let (w, m) = Self::bit(seq);
        self.window[w] &= !m;
    }

    /// Accounts one received packet carrying wire sequence `seq`.
    pub fn record(&mut self, seq: u32) {
        // Signed distance from the next expected sequence, on the 32-bit circle.
        let diff = i64::from(seq.wrapping_sub(self.next as u32) as i32);
        let Some(ext) = self.next.checked_add_signed(diff) else {
            // Before the flow's start: older than anything we can place.
            self.stats.late += 1;
            self.stats.reordered += 1;
            self.stats.received += 1;
            self.stats.lost = self.stats.lost.saturating_sub(1);
            return;
        };
        if ext >= self.next {
            let gap = ext - self.next;
            // Sequences next..ext are now missing; forget whatever the window held for them.
            if gap >= REORDER_WINDOW {
                self.window = [0; WINDOW_WORDS];
            } else {
                for s in self.next..ext {
                    self.clear(s);
                }
            }
            self.stats.lost += gap;
            self.test_and_set(ext);
            self.stats.received += 1;
            self.next = ext + 1;
        } else if self.next - ext > REORDER_WINDOW {
            self.stats.late += 1;
            self.stats.reordered += 1;
            self.stats.received += 1;
            self.stats.lost = self.stats.lost.saturating_sub(1);
        } else if self.test_and_set(ext) {
            self.stats.duplicates += 1;
        } else {
            self.stats.reordered += 1;
            self.stats.received += 1;
            self.stats.lost = self.stats.lost.saturating_sub(1);
        }
    }
}

/// Flows indexed by their 16-bit flow id; grows to the highest id seen (at most 65,536 flows).
#[derive(Clone, Debug, Default)]
pub struct FlowTable {
    flows: Vec<FlowSeq>,
}

impl FlowTable {
    pub fn record(&mut self, flow: u16, seq: u32) {
        let i = usize::from(flow);
        if i >= self.flows.len() {
            self.flows.resize_with(i + 1, FlowSeq::new);
        }
        self.flows[i].record(seq);
    }

    /// Flows that received at least one packet.
    pub fn active_flows(&self) -> usize {
        self.flows
            .iter()
            .filter(|f| f.stats.received + f.stats.duplicates > 0)
            .count()
    }

    pub fn totals(&self) -> SeqStats {
        let mut t = SeqStats::default();
        for f in &self.flows {
            t.add(&f.stats);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed(f: &mut FlowSeq, seqs: &[u32]) -> SeqStats {
        for &s in seqs {
            f.record(s);
        }
        f.stats()
    }

    #[test]
    fn in_order_has_no_loss() {
        let s = feed(&mut FlowSeq::new(), &[0, 1, 2, 3]);
        assert_eq!(
            s,
            SeqStats {
                received: 4,
                ..Default::default()
            }
        );
    }

    #[test]
    fn gaps_are_lost_and_a_missed_start_counts() {
        let s = feed(&mut FlowSeq::new(), &[2, 3, 7]);
        assert_eq!(
            s,
            SeqStats {
                received: 3,
                lost: 2 + 3,
                ..Default::default()
            }
        );
    }

    #[test]
    fn late_packet_fills_gap_as_reordered() {
        let s = feed(&mut FlowSeq::new(), &[0, 2, 1, 3]);
        assert_eq!(
            s,
            SeqStats {
                received: 4,
                reordered: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn duplicates_do_not_count_as_received() {
        let s = feed(&mut FlowSeq::new(), &[0, 1, 1, 2, 0]);
        assert_eq!(
            s,
            SeqStats {
                received: 3,
                duplicates: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn wraps_around_u32() {
        let start = u64::from(u32::MAX) - 2;
        let mut f = FlowSeq::starting_at(start);
        let s = feed(&mut f, &[u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 2, 1, 1]);
        assert_eq!(
            s,
            SeqStats {
                received: 6,
                reordered: 1,
                duplicates: 1,
                ..Default::default()
            }
        );
        assert_eq!(f.next, start + 6);
    }

    #[test]
    fn older_than_window_is_late() {
        let mut f = FlowSeq::new();
        f.record(0);
        f.record(REORDER_WINDOW as u32 + 10);
        f.record(1);
        let s = f.stats();
        assert_eq!(s.late, 1);
        assert_eq!(s.reordered, 1);
        assert_eq!(s.received, 3);
        assert_eq!(s.lost, REORDER_WINDOW + 9 - 1);
    }

    #[test]
    fn window_is_cleared_across_a_big_gap() {
        // Seq 5 seen, then a jump of more than a window: seq 5 + WINDOW shares 5's bit and must
        // count as reordered (a gap filled), not as a duplicate.
        let w = REORDER_WINDOW as u32;
        let mut f = FlowSeq::new();
        f.record(5);
        f.record(5 + w + 1);
        f.record(5 + w);
        assert_eq!(f.stats().duplicates, 0);
        assert_eq!(f.stats().reordered, 1);
        // Same for a gap shorter than the window: 20 + WINDOW - 10 .. reuse bits of 10..
        let mut g = FlowSeq::new();
        for s in 0..20 {
            g.record(s);
        }
        g.record(w + 15);
        g.record(w + 12);
        assert_eq!(g.stats().duplicates, 0);
        assert_eq!(g.stats().reordered, 1);
        assert_eq!(g.stats().lost, u64::from(w + 15 - 20 - 1));
    }

    #[test]
    fn table_sums_flows() {
        let mut t = FlowTable::default();
        t.record(0, 0);
        t.record(3, 1);
        t.record(3, 1);
        assert_eq!(t.active_flows(), 2);
        assert_eq!(
            t.totals(),
            SeqStats {
                received: 2,
                lost: 1,
                duplicates: 1,
                ..Default::default()
            }
        );
    }

    proptest! {
        /// Any permutation (within the window) of 0..n plus some repeats: nothing lost,
        /// received == n, duplicates == repeats, whatever the starting point on the u32 circle.
        #[test]
        fn permutations_lose_nothing(
            n in 1usize..300,
            start in any::<u32>(),
            swaps in proptest::collection::vec((0usize..300, 0usize..300), 0..50),
            repeats in proptest::collection::vec(0usize..300, 0..20),
        ) {
            let mut order: Vec<usize> = (0..n).collect();
            for (a, b) in swaps {
                order.swap(a % n, b % n);
            }
            for r in &repeats {
                order.push(r % n);
            }
            let mut f = FlowSeq::starting_at(u64::from(start));
            for i in &order {
                f.record(start.wrapping_add(*i as u32));
            }
            let s = f.stats();
            prop_assert_eq!(s.received, n as u64);
            prop_assert_eq!(s.lost, 0);
            prop_assert_eq!(s.duplicates, repeats.len() as u64);
            prop_assert_eq!(s.late, 0);
        }

        /// Dropping a set of packets from an in-order stream loses exactly those below the last
        /// one sent.
        #[test]
        fn drops_are_counted(n in 2u32..500, drops in proptest::collection::btree_set(0u32..500, 0..50)) {
            let mut f = FlowSeq::new();
            for s in 0..n {
                if !drops.contains(&s) || s == n - 1 {
                    f.record(s);
                }
            }
            let dropped = drops.iter().filter(|&&d| d < n - 1).count() as u64;
            prop_assert_eq!(f.stats().lost, dropped);
            prop_assert_eq!(f.stats().received, u64::from(n) - dropped);
        }
    }
}
