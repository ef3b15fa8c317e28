//! Latency histograms: HDR, nanoseconds, 3 significant digits, serialisable for later merging.
//!
//! Values are clamped into `1 ns ..= 100 s` (a packet older than that is not a latency, it is a
//! bug, and clamping keeps the histogram's memory fixed). Serialised as hdrhistogram's V2 format
//! with deflate, base64-encoded, the same bytes HdrHistogram's Java/Go/C tools read.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Highest trackable value: 100 s in nanoseconds.
pub const MAX_TRACKABLE_NS: u64 = 100_000_000_000;
/// Significant decimal digits kept.
pub const SIGNIFICANT_DIGITS: u8 = 3;

#[derive(Debug, Error)]
pub enum HistError {
    #[error("cannot create a latency histogram (1 ns ..= {MAX_TRACKABLE_NS} ns, 3 digits): {0}")]
    Create(#[from] hdrhistogram::CreationError),
    #[error("cannot serialise the latency histogram as V2+deflate: {0}")]
    Serialize(#[from] hdrhistogram::serialization::V2DeflateSerializeError),
    #[error("histogram field is not valid base64: {0}; was it copied whole from a report?")]
    Base64(#[from] base64::DecodeError),
    #[error("histogram bytes are not an HdrHistogram V2 (deflate) encoding: {0}")]
    Deserialize(#[from] hdrhistogram::serialization::DeserializeError),
    #[error("cannot merge histograms: {0}")]
    Merge(#[from] hdrhistogram::AdditionError),
}

/// Percentiles and extremes, in nanoseconds. All zero when nothing was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded (named apart from packet counts when flattened into a report).
    #[serde(rename = "latency_samples")]
    pub count: u64,
    pub min_ns: u64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    h: Histogram<u64>,
}

impl LatencyHistogram {
    pub fn new() -> Result<Self, HistError> {
        Ok(Self {
            h: Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, SIGNIFICANT_DIGITS)?,
        })
    }

    /// Records one value, clamped into the trackable range.
    pub fn record(&mut self, ns: u64) {
        self.h.saturating_record(ns.min(MAX_TRACKABLE_NS));
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    pub fn summary(&self) -> LatencySummary {
        if self.h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.h.len(),
            min_ns: self.h.min(),
            mean_ns: self.h.mean(),
            p50_ns: self.h.value_at_quantile(0.50),
            p90_ns: self.h.value_at_quantile(0.90),
            p99_ns: self.h.value_at_quantile(0.99),
            p999_ns: self.h.value_at_quantile(0.999),
            max_ns: self.h.max(),
        }
    }

    /// The underlying HdrHistogram (for interval logs and plots).
    pub fn hdr(&self) -> &Histogram<u64> {
        &self.h
    }

    pub fn merge(&mut self, other: &LatencyHistogram) -> Result<(), HistError> {
        self.h.add(&other.h)?;
        Ok(())
    }

    /// V2 + deflate, base64 (standard alphabet, padded).
    pub fn to_base64(&self) -> Result<String, HistError> {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new().serialize(&self.h, &mut bytes)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Reads what [`Self::to_base64`] wrote (plain V2 is accepted too).
    pub fn from_base64(text: &str) -> Result<Self, HistError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim())?;
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice())?;
        Ok(Self { h })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> LatencyHistogram {
        let mut h = LatencyHistogram::new().expect("valid bounds");
        for v in values {
            h.record(v);
        }
        h
    }

    /// Within 3 significant digits.
    fn close(a: u64, b: u64) -> bool {
        a.abs_diff(b) <= b / 1000 + 1
    }

    #[test]
    fn percentiles_of_1_to_10000_us() {
        let s = hist((1..=10_000u64).map(|i| i * 1_000)).summary();
        assert_eq!(s.count, 10_000);
        assert!(close(s.min_ns, 1_000), "{s:?}");
        assert!(close(s.p50_ns, 5_000_000), "{s:?}");
        assert!(close(s.p90_ns, 9_000_000), "{s:?}");
        assert!(close(s.p99_ns, 9_900_000), "{s:?}");
        assert!(close(s.p999_ns, 9_990_000), "{s:?}");
        assert!(close(s.max_ns, 10_000_000), "{s:?}");
        assert!(s.p50_ns <= s.p90_ns && s.p90_ns <= s.p99_ns && s.p99_ns <= s.p999_ns);
    }

    #[test]
    fn empty_summary_is_zero_and_outliers_clamp() {
        assert_eq!(hist([]).summary(), LatencySummary::default());
        let s = hist([u64::MAX, 0]).summary();
        assert_eq!(s.count, 2);
        assert!(close(s.max_ns, MAX_TRACKABLE_NS));
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = hist((0..100).map(|_| 1_000));
        let b = hist((0..100).map(|_| 3_000_000));
        a.merge(&b).expect("same bounds");
        let s = a.summary();
        assert_eq!(s.count, 200);
        assert!(close(s.p50_ns, 1_000));
        assert!(close(s.p90_ns, 3_000_000));
    }

    #[test]
    fn base64_round_trip_then_merge() {
        let a = hist([10, 20, 30_000, 4_000_000]);
        let text = a.to_base64().expect("serialises");
        let back = LatencyHistogram::from_base64(&text).expect("deserialises");
        assert_eq!(back.summary(), a.summary());
        let mut m = back;
        m.merge(&a).expect("mergeable");
        assert_eq!(m.count(), 8);
        assert!(LatencyHistogram::from_base64("not base64!").is_err());
        assert!(LatencyHistogram::from_base64("AAAA").is_err());
    }
}
