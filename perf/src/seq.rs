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
//!
//! [`FlowSeq::record_at`] also keeps the [`MAX_GAPS`] longest *gaps* (a gap: sequence numbers
//! missing between two packets received one after the other in sequence order, [`SeqGap`]) with
//! both packets' send and receive timestamps, so an outage (an agent restart) can be placed in
//! time, and counts all gaps. A gap is found when the packet after it arrives; late packets
//! that arrive later inside it do not shrink it but are counted in [`SeqGap::filled_later`]. Lost packets before the first
//! and after the last received one are not a gap (nothing brackets them).

use serde::{Deserialize, Serialize};

/// How many of the longest gaps a flow (and a [`FlowTable`]) keeps.
pub const MAX_GAPS: usize = 8;

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

/// One received packet placed in sequence and time: its unwrapped sequence number, the
/// sender's timestamp it carried and the receiver's clock when it arrived (both
/// `CLOCK_MONOTONIC` ns, which every namespace on the machine shares).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub seq: u64,
    pub send_ts_ns: u64,
    pub rx_ts_ns: u64,
}

/// The longest run of sequence numbers missing between two packets of a flow received one
/// after the other in sequence order: `before` is the last packet before the run, `after` the
/// first one past it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqGap {
    pub flow: u16,
    /// Sequence numbers missing: `after.seq - before.seq - 1`.
    pub missing: u64,
    pub before: Stamp,
    pub after: Stamp,
    /// Late packets that arrived inside the run after it was found (the run was then not one
    /// outage but several, or reordering).
    pub filled_later: u64,
}

impl SeqGap {
    /// Sender's time from the last packet before the run to the first one after it: how long
    /// the sender's packets were lost (to one send batch's resolution).
    pub fn send_span_ns(&self) -> u64 {
        self.after.send_ts_ns.saturating_sub(self.before.send_ts_ns)
    }

    /// Receiver's time between the two packets: how long the receiver saw nothing.
    pub fn rx_span_ns(&self) -> u64 {
        self.after.rx_ts_ns.saturating_sub(self.before.rx_ts_ns)
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
    /// The packet with the highest sequence number so far.
    highest: Option<Stamp>,
    /// The longest gaps, longest first, at most [`MAX_GAPS`].
    gaps: Vec<SeqGap>,
    /// Every gap found (also those not kept).
    gap_count: u64,
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
            highest: None,
            gaps: Vec::new(),
            gap_count: 0,
        }
    }

    pub fn stats(&self) -> SeqStats {
        self.stats
    }

    /// The packet with the highest sequence number received (with [`FlowSeq::record_at`]'s
    /// timestamps).
    pub fn highest(&self) -> Option<Stamp> {
        self.highest
    }

    /// The longest gap between two received packets (flow id 0; [`FlowTable`] sets it).
    pub fn longest_gap(&self) -> Option<SeqGap> {
        self.gaps.first().copied()
    }

    /// The [`MAX_GAPS`] longest gaps, longest first (flow id 0).
    pub fn gaps(&self) -> &[SeqGap] {
        &self.gaps
    }

    /// How many gaps were found.
    pub fn gap_count(&self) -> u64 {
        self.gap_count
    }

    /// Keeps `g` if it is among the [`MAX_GAPS`] longest (an equal one found earlier ranks
    /// first).
    fn keep_gap(&mut self, g: SeqGap) {
        self.gap_count += 1;
        let at = self.gaps.partition_point(|x| x.missing >= g.missing);
        if at < MAX_GAPS {
            self.gaps.insert(at, g);
            self.gaps.truncate(MAX_GAPS);
        }
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

    /// Accounts one received packet carrying wire sequence `seq` (no timestamps: gaps are still
    /// found, with zero times).
    pub fn record(&mut self, seq: u32) {
        self.record_at(seq, 0, 0);
    }

    /// Accounts one received packet carrying wire sequence `seq`, sent at `send_ts_ns` and
    /// received at `rx_ts_ns`.
    pub fn record_at(&mut self, seq: u32, send_ts_ns: u64, rx_ts_ns: u64) {
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
            let here = Stamp {
                seq: ext,
                send_ts_ns,
                rx_ts_ns,
            };
            if let Some(before) = self.highest {
                if gap > 0 {
                    self.keep_gap(SeqGap {
                        flow: 0,
                        missing: gap,
                        before,
                        after: here,
                        filled_later: 0,
                    });
                }
            }
            self.highest = Some(here);
            return;
        }
        if self.next - ext > REORDER_WINDOW {
            self.stats.late += 1;
        } else if self.test_and_set(ext) {
            self.stats.duplicates += 1;
            return;
        }
        // A gap being filled.
        self.stats.reordered += 1;
        self.stats.received += 1;
        self.stats.lost = self.stats.lost.saturating_sub(1);
        if let Some(g) = self
            .gaps
            .iter_mut()
            .find(|g| g.before.seq < ext && ext < g.after.seq)
        {
            g.filled_later += 1;
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
        self.record_at(flow, seq, 0, 0);
    }

    /// [`FlowSeq::record_at`] on flow `flow`.
    pub fn record_at(&mut self, flow: u16, seq: u32, send_ts_ns: u64, rx_ts_ns: u64) {
        let i = usize::from(flow);
        if i >= self.flows.len() {
            self.flows.resize_with(i + 1, FlowSeq::new);
        }
        self.flows[i].record_at(seq, send_ts_ns, rx_ts_ns);
    }

    /// Flows that received at least one packet.
    pub fn active_flows(&self) -> usize {
        self.flows
            .iter()
            .filter(|f| f.stats.received + f.stats.duplicates > 0)
            .count()
    }

    /// The longest gap over all flows (the first flow's on a tie), with its flow id.
    pub fn longest_gap(&self) -> Option<SeqGap> {
        self.gaps().first().copied()
    }

    /// The [`MAX_GAPS`] longest gaps over all flows, longest first, with their flow ids.
    pub fn gaps(&self) -> Vec<SeqGap> {
        let mut all: Vec<SeqGap> = self
            .flows
            .iter()
            .enumerate()
            .flat_map(|(id, f)| {
                f.gaps.iter().map(move |g| SeqGap {
                    flow: u16::try_from(id).unwrap_or(u16::MAX),
                    ..*g
                })
            })
            .collect();
        // Stable: on equal length the lower flow id, then the earlier gap, comes first.
        all.sort_by_key(|g| std::cmp::Reverse(g.missing));
        all.truncate(MAX_GAPS);
        all
    }

    /// Gaps found over all flows.
    pub fn gap_count(&self) -> u64 {
        self.flows.iter().map(|f| f.gap_count).sum()
    }

    /// Of every flow's highest-sequence packet, the one sent last.
    pub fn last_sent(&self) -> Option<Stamp> {
        self.flows
            .iter()
            .filter_map(|f| f.highest)
            .max_by_key(|s| s.send_ts_ns)
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

    #[test]
    fn longest_gap_is_placed_in_time_and_by_flow() {
        let mut t = FlowTable::default();
        // Flow 0: 0..10, then 10..13 lost (3), then 13..20; flow 2: 0, then 1..=7 lost (7), 8.
        for s in (0..10).chain(13..20) {
            t.record_at(0, s, 1_000 * u64::from(s), 1_000 * u64::from(s) + 50);
        }
        t.record_at(2, 0, 500, 600);
        t.record_at(2, 8, 9_000, 9_700);
        let g = t.longest_gap().expect("a gap");
        assert_eq!(g.flow, 2);
        assert_eq!(g.missing, 7);
        assert_eq!((g.before.seq, g.after.seq), (0, 8));
        assert_eq!(g.send_span_ns(), 8_500);
        assert_eq!(g.rx_span_ns(), 9_100);
        assert_eq!(g.filled_later, 0);
        assert_eq!(t.last_sent().map(|s| s.send_ts_ns), Some(19_000));
        assert_eq!(t.gap_count(), 2);
        let all: Vec<(u16, u64)> = t.gaps().iter().map(|g| (g.flow, g.missing)).collect();
        assert_eq!(all, [(2, 7), (0, 3)]);
        assert_eq!(t.totals().lost, 3 + 7);
    }

    #[test]
    fn missed_start_is_not_a_gap_and_late_fills_are_counted() {
        let mut f = FlowSeq::new();
        // 0..5 never arrive: lost, but nothing brackets them.
        f.record_at(5, 5, 5);
        f.record_at(6, 6, 6);
        assert_eq!(f.longest_gap(), None);
        assert_eq!(f.stats().lost, 5);
        f.record_at(20, 20, 20);
        f.record_at(10, 10, 30);
        f.record_at(10, 10, 31);
        let g = f.longest_gap().expect("gap 7..20");
        assert_eq!((g.missing, g.filled_later), (13, 1));
        // A shorter gap later does not replace it; an equal one neither.
        f.record_at(30, 30, 40);
        f.record_at(44, 44, 50);
        assert_eq!(f.longest_gap().map(|g| g.after.seq), Some(20));
        f.record_at(46, 46, 60);
        assert_eq!(f.highest().map(|s| s.seq), Some(46));
        let kept: Vec<u64> = f.gaps().iter().map(|g| g.after.seq).collect();
        assert_eq!(kept, [20, 44, 30, 46]);
        assert_eq!(f.gap_count(), 4);
        assert_eq!(f.stats().duplicates, 1);
    }

    #[test]
    fn only_the_longest_gaps_are_kept_but_all_are_counted() {
        let mut f = FlowSeq::new();
        let mut seq = 0u32;
        // Gaps of 1, 2, .., 20 packets, in that order.
        for missing in 1..=20u32 {
            f.record(seq);
            seq += missing + 1;
        }
        f.record(seq);
        assert_eq!(f.gap_count(), 20);
        let kept: Vec<u64> = f.gaps().iter().map(|g| g.missing).collect();
        let want: Vec<u64> = (13..=20).rev().collect();
        assert_eq!(kept, want);
        assert_eq!(f.stats().lost, (1..=20).sum::<u64>());
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
