//! Open-loop pacing arithmetic: when may the next batch go, and was the target rate reached.
//!
//! The generator paces per batch, not per packet: before sending a batch it compares the clock
//! with the moment the packets already sent were due at the target rate, and sleeps (absolute
//! `clock_nanosleep`, no busy-wait) until then if it is early. A late generator does not skip
//! packets: it sends back to back until it has caught up, and the report says whether the
//! achieved rate came within [`RATE_TOLERANCE`] of the target. A generator that falls short
//! measures itself, not the dataplane (NOTES.md).

/// Fraction of the target a run must reach to count as having reached it.
pub const RATE_TOLERANCE: f64 = 0.05;
const NS_PER_S: u128 = 1_000_000_000;

/// Paces batches at `rate_pps` from a start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacer {
    rate_pps: u64,
}

impl Pacer {
    /// `None` when the rate is 0 (nothing could ever be sent).
    pub fn new(rate_pps: u64) -> Option<Self> {
        (rate_pps > 0).then_some(Self { rate_pps })
    }

    pub fn rate_pps(&self) -> u64 {
        self.rate_pps
    }

    /// Nanoseconds after the start at which packet number `sent` (0-based) is due.
    pub fn due_ns(&self, sent: u64) -> u64 {
        let ns = u128::from(sent) * NS_PER_S / u128::from(self.rate_pps);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// How long to wait, `elapsed_ns` after the start with `sent` packets out, before the next
    /// batch may go; `None` when it is due (or overdue) now.
    pub fn wait_ns(&self, elapsed_ns: u64, sent: u64) -> Option<u64> {
        let due = self.due_ns(sent);
        (due > elapsed_ns).then(|| due - elapsed_ns)
    }
}

/// Packets per second for `packets` over `duration_ns`; 0 for an empty interval.
pub fn rate_pps(packets: u64, duration_ns: u64) -> f64 {
    if duration_ns == 0 {
        return 0.0;
    }
    packets as f64 * 1e9 / duration_ns as f64
}

/// Whether `achieved` is within [`RATE_TOLERANCE`] below `target` (or above it). With no target
/// (closed loop) there is nothing to reach: `true`.
pub fn rate_reached(achieved_pps: f64, target_pps: Option<u64>) -> bool {
    match target_pps {
        None => true,
        Some(t) => achieved_pps >= t as f64 * (1.0 - RATE_TOLERANCE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_is_refused() {
        assert_eq!(Pacer::new(0), None);
    }

    #[test]
    fn due_times() {
        let p = Pacer::new(1_000_000).expect("non-zero");
        assert_eq!(p.due_ns(0), 0);
        assert_eq!(p.due_ns(1), 1_000);
        assert_eq!(p.due_ns(32), 32_000);
        let slow = Pacer::new(3).expect("non-zero");
        assert_eq!(slow.due_ns(1), 333_333_333);
        assert_eq!(slow.due_ns(3), 1_000_000_000);
        // No overflow for absurd counts.
        assert_eq!(Pacer::new(1).expect("non-zero").due_ns(u64::MAX), u64::MAX);
    }

    #[test]
    fn waits_only_when_early() {
        let p = Pacer::new(100_000).expect("non-zero"); // one packet per 10 us
        assert_eq!(p.wait_ns(0, 0), None);
        assert_eq!(p.wait_ns(0, 32), Some(320_000));
        assert_eq!(p.wait_ns(300_000, 32), Some(20_000));
        assert_eq!(p.wait_ns(320_000, 32), None);
        assert_eq!(p.wait_ns(900_000, 32), None);
    }

    #[test]
    fn rates() {
        assert_eq!(rate_pps(0, 0), 0.0);
        assert_eq!(rate_pps(1_000, 1_000_000), 1_000_000.0);
        assert!(rate_reached(960.0, Some(1000)));
        assert!(rate_reached(950.0, Some(1000)));
        assert!(!rate_reached(949.0, Some(1000)));
        assert!(rate_reached(2000.0, Some(1000)));
        assert!(rate_reached(0.0, None));
    }
}
