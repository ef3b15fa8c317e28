//! Time spent in the pipeline, per batch and per packet, from the CPU's time-stamp counter read
//! twice per batch (never per packet), into HDR histograms preallocated at start-up (recording
//! never allocates: the histograms cannot grow, out-of-range values saturate).
//!
//! Control reads them without stopping a worker: it sends an empty [`LatencyHistograms`] of the
//! same shape; between two batches the worker adds its own into it (same bounds: no
//! allocation) and sends it back.
use std::sync::OnceLock;

use hdrhistogram::Histogram;

/// Highest value a histogram holds: 1 s (in ns; batch sizes far below).
pub const MAX_NS: u64 = 1_000_000_000;
/// Significant decimal digits kept (0.1 % resolution).
pub const SIGFIG: u8 = 3;

/// The three histograms a worker keeps.
#[derive(Clone, Debug)]
pub struct LatencyHistograms {
    /// Nanoseconds per batch that had frames: rx ring to tx rings published.
    pub batch_ns: Histogram<u64>,
    /// Nanoseconds per packet (batch time / frames), weighted by frames.
    pub packet_ns: Histogram<u64>,
    /// Frames per batch.
    pub batch_packets: Histogram<u64>,
}

impl LatencyHistograms {
    pub fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, MAX_NS, SIGFIG).expect("constant, valid bounds");
        Self {
            batch_ns: h(),
            packet_ns: h(),
            batch_packets: h(),
        }
    }

    /// Records one batch of `packets` frames that took `ns`.
    #[inline]
    pub fn record_batch(&mut self, ns: u64, packets: u64) {
        if packets == 0 {
            return;
        }
        self.batch_ns.saturating_record(ns.max(1));
        self.packet_ns
            .saturating_record_n((ns / packets).max(1), packets);
        self.batch_packets.saturating_record(packets);
    }

    /// Adds `other` into `self` (same bounds: no allocation).
    pub fn add(&mut self, other: &LatencyHistograms) {
        // Same bounds on both sides, so `add` cannot fail or resize; ignore the impossible.
        let _ = self.batch_ns.add(&other.batch_ns);
        let _ = self.packet_ns.add(&other.packet_ns);
        let _ = self.batch_packets.add(&other.batch_packets);
    }

    pub fn reset(&mut self) {
        self.batch_ns.reset();
        self.packet_ns.reset();
        self.batch_packets.reset();
    }
}

impl Default for LatencyHistograms {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the time-stamp counter (x86_64 `rdtsc`); elsewhere a monotonic clock in ns.
#[inline]
pub fn cycles() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Converts cycle counts to nanoseconds: `ns = cycles * mult >> 32`, calibrated once against
/// the monotonic clock over 20 ms (the TSC of every CPU this runs on is invariant).
#[derive(Clone, Copy, Debug)]
pub struct CycleClock {
    mult: u64,
    hz: u64,
}

impl CycleClock {
    pub fn get() -> CycleClock {
        static CLOCK: OnceLock<CycleClock> = OnceLock::new();
        *CLOCK.get_or_init(|| {
            let (t0, c0) = (std::time::Instant::now(), cycles());
            std::thread::sleep(std::time::Duration::from_millis(20));
            let (ns, c) = (t0.elapsed().as_nanos() as u64, cycles().wrapping_sub(c0));
            let hz = if ns == 0 || c == 0 {
                1_000_000_000
            } else {
                (c as u128 * 1_000_000_000 / ns as u128) as u64
            };
            CycleClock::from_hz(hz)
        })
    }
    pub fn from_hz(hz: u64) -> CycleClock {
        let hz = hz.max(1);
        CycleClock {
            mult: ((1_000_000_000u128 << 32) / hz as u128) as u64,
            hz,
        }
    }
    pub fn hz(&self) -> u64 {
        self.hz
    }
    #[inline]
    pub fn to_ns(&self, cycles: u64) -> u64 {
        ((cycles as u128 * self.mult as u128) >> 32) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_histogram_weighs_packets() {
        let mut h = LatencyHistograms::new();
        h.record_batch(6400, 64); // 100 ns per packet, 64 packets
        h.record_batch(1000, 1); // 1000 ns, 1 packet
        assert_eq!(h.batch_ns.len(), 2);
        assert_eq!(h.packet_ns.len(), 65);
        assert_eq!(h.packet_ns.value_at_quantile(0.5), 100);
        assert!(h.packet_ns.max() >= 999);
        assert_eq!(h.batch_packets.max(), 64);
        h.record_batch(5, 0);
        assert_eq!(h.batch_ns.len(), 2, "empty batches are not recorded");
        let mut m = LatencyHistograms::new();
        m.add(&h);
        m.add(&h);
        assert_eq!(m.packet_ns.len(), 130);
        h.record_batch(u64::MAX, 1);
        assert_eq!(
            h.batch_ns.max(),
            h.batch_ns.highest_equivalent(MAX_NS),
            "saturates, never grows"
        );
    }

    #[test]
    fn cycle_clock_converts() {
        let c = CycleClock::from_hz(2_000_000_000);
        assert_eq!(c.to_ns(2_000_000_000), 1_000_000_000);
        assert_eq!(c.to_ns(2), 1);
        let real = CycleClock::get();
        assert!(real.hz() > 1_000_000, "calibrated {} Hz", real.hz());
        let (t0, c0) = (std::time::Instant::now(), cycles());
        std::thread::sleep(std::time::Duration::from_millis(10));
        let ns = real.to_ns(cycles() - c0) as f64;
        let want = t0.elapsed().as_nanos() as f64;
        assert!(
            (ns / want - 1.0).abs() < 0.2,
            "tsc {ns} ns vs clock {want} ns"
        );
    }
}
