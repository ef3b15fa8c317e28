//! HdrHistogram interval logs (`.hlog`), the file HdrHistogram's `HistogramLogProcessor`,
//! `HistogramLogAnalyzer` and the Go/C/Rust readers take.
//!
//! ```text
//! #[Histogram log format version 1.3]
//! #[StartTime: 1700000000.000 (seconds since epoch)]
//! #[BaseTime: 1700000000.000 (seconds since epoch)]
//! "StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"
//! #[MaxValueDivisor: 1000000.000]
//! Tag=sluice,0.000,10.000,0.352,HISTFAAA...
//! Tag=baseline,10.500,10.000,0.417,HISTFAAA...
//! ```
//!
//! Design: the lines are written by hdrhistogram's `serialization::interval_log` writer with the
//! V2 + deflate serializer (the Java implementation's "compressed" encoding); only the legend line
//! is added by hand, because that writer has no call for it. StartTime and BaseTime are both the
//! run's start, so interval timestamps are offsets from it (the Java reader then applies no
//! heuristics). Histogram values are nanoseconds; the `Interval_Max` column is divided by 10^6
//! (milliseconds), as Java's `HistogramLogWriter` does by default; that column is for humans only,
//! readers decode the histogram.
//!
//! Limits: tags cannot contain `,`, space, CR or LF (the format has no escaping): such a tag is an
//! error, not silently rewritten. An empty tag writes an untagged interval. Intervals are written
//! sorted by start offset (stable, so equal starts keep the caller's order).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::serialization::interval_log::{
    IntervalLogWriterBuilder, IntervalLogWriterError, Tag,
};
use hdrhistogram::serialization::{V2DeflateSerializeError, V2DeflateSerializer};
use hdrhistogram::Histogram;
use thiserror::Error;

/// The log format version this writer follows (Java's `HistogramLogWriter`, tags included).
pub const LOG_FORMAT_VERSION: &str = "1.3";
/// Divisor of the human-readable `Interval_Max` column: nanoseconds to milliseconds.
pub const MAX_VALUE_DIVISOR: f64 = 1_000_000.0;
/// The legend line Java's `HistogramLogWriter::outputLegend` writes.
pub const LEGEND: &str =
    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"";

#[derive(Debug, Error)]
pub enum HlogError {
    #[error("interval log start time {value} is not a finite, non-negative Unix time in seconds; pass seconds since 1970-01-01")]
    BadStartTime { value: f64 },
    #[error("interval tag {tag:?} contains ',', a space, CR or LF, which the interval log format cannot carry; rename it (for example with '_')")]
    BadTag { tag: String },
    #[error("interval {tag:?}: start offset {start_s} s and length {len_s} s must be finite and non-negative seconds")]
    BadInterval {
        tag: String,
        start_s: f64,
        len_s: f64,
    },
    #[error("cannot encode histogram {tag:?} as HdrHistogram V2+deflate: {source}")]
    Serialize {
        tag: String,
        #[source]
        source: V2DeflateSerializeError,
    },
    #[error("cannot format the interval log in memory: {0}")]
    Format(#[source] io::Error),
    #[error("cannot write the interval log {}: {source}; check that its directory exists and is writable", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HlogError {
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            HlogError::BadStartTime { .. }
            | HlogError::BadTag { .. }
            | HlogError::BadInterval { .. } => io::ErrorKind::InvalidInput,
            HlogError::Serialize { .. } => io::ErrorKind::InvalidData,
            HlogError::Format(e) | HlogError::Write { source: e, .. } => e.kind(),
        }
    }
}

impl From<HlogError> for io::Error {
    fn from(e: HlogError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// Writes `intervals` (tag, start offset from `start_unix_s` in s, interval length in s,
/// histogram in ns) to `path` as an HdrHistogram interval log. Nothing is written when an
/// interval is invalid; errors name the file or the interval.
pub fn write_interval_log(
    path: &Path,
    start_unix_s: f64,
    intervals: &[(String, f64, f64, &Histogram<u64>)],
) -> io::Result<()> {
    let bytes = encode_interval_log(start_unix_s, intervals)?;
    std::fs::write(path, bytes).map_err(|source| {
        io::Error::from(HlogError::Write {
            path: path.to_owned(),
            source,
        })
    })
}

/// The bytes [`write_interval_log`] writes.
pub fn encode_interval_log(
    start_unix_s: f64,
    intervals: &[(String, f64, f64, &Histogram<u64>)],
) -> Result<Vec<u8>, HlogError> {
    let start = Duration::try_from_secs_f64(start_unix_s)
        .ok()
        .and_then(|d| UNIX_EPOCH.checked_add(d))
        .ok_or(HlogError::BadStartTime {
            value: start_unix_s,
        })?;
    // Validate everything first so a bad interval leaves no half-written file behind.
    let mut checked = Vec::with_capacity(intervals.len());
    for (tag, start_s, len_s, h) in intervals {
        let tag_opt = if tag.is_empty() {
            None
        } else {
            Some(Tag::new(tag).ok_or_else(|| HlogError::BadTag { tag: tag.clone() })?)
        };
        let bad = || HlogError::BadInterval {
            tag: tag.clone(),
            start_s: *start_s,
            len_s: *len_s,
        };
        let offset = Duration::try_from_secs_f64(*start_s).map_err(|_| bad())?;
        let length = Duration::try_from_secs_f64(*len_s).map_err(|_| bad())?;
        checked.push((tag.as_str(), tag_opt, offset, length, *h));
    }
    checked.sort_by_key(|c| c.2);

    let mut out = Vec::new();
    header(&mut out, start)?;
    out.extend_from_slice(LEGEND.as_bytes());
    out.push(b'\n');
    let mut serializer = V2DeflateSerializer::new();
    // This second writer adds only the MaxValueDivisor comment: the other headers were written
    // above, before the legend.
    let mut writer = IntervalLogWriterBuilder::new()
        .with_max_value_divisor(MAX_VALUE_DIVISOR)
        .begin_log_with(&mut out, &mut serializer)
        .map_err(HlogError::Format)?;
    for (tag, tag_opt, offset, length, h) in checked {
        writer
            .write_histogram(h, offset, length, tag_opt)
            .map_err(|e| match e {
                IntervalLogWriterError::SerializeError(source) => HlogError::Serialize {
                    tag: tag.to_owned(),
                    source,
                },
                IntervalLogWriterError::IoError(e) => HlogError::Format(e),
            })?;
    }
    Ok(out)
}

/// Version, StartTime and BaseTime lines, via the crate's writer.
fn header(out: &mut Vec<u8>, start: SystemTime) -> Result<(), HlogError> {
    let mut serializer = V2DeflateSerializer::new();
    IntervalLogWriterBuilder::new()
        .add_comment(&format!(
            "[Histogram log format version {LOG_FORMAT_VERSION}]"
        ))
        .add_comment("[Logged with sluice-perf]")
        .with_start_time(start)
        .with_base_time(start)
        .begin_log_with(out, &mut serializer)
        .map_err(HlogError::Format)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("bounds");
        for v in values {
            h.record(v).expect("in range");
        }
        h
    }

    struct ReadBack {
        start: Option<Duration>,
        base: Option<Duration>,
        intervals: Vec<ReadInterval>,
    }

    struct ReadInterval {
        tag: Option<String>,
        start: Duration,
        len: Duration,
        max: f64,
        hist: Histogram<u64>,
    }

    fn read_back(bytes: &[u8]) -> ReadBack {
        let mut r = ReadBack {
            start: None,
            base: None,
            intervals: Vec::new(),
        };
        for entry in IntervalLogIterator::new(bytes) {
            match entry.expect("parses") {
                LogEntry::StartTime(t) => r.start = Some(t),
                LogEntry::BaseTime(t) => r.base = Some(t),
                LogEntry::Interval(i) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(i.encoded_histogram())
                        .expect("base64");
                    let h: Histogram<u64> = Deserializer::new()
                        .deserialize(&mut raw.as_slice())
                        .expect("V2 histogram");
                    r.intervals.push(ReadInterval {
                        tag: i.tag().map(|t| t.as_str().to_owned()),
                        start: i.start_timestamp(),
                        len: i.duration(),
                        max: i.max(),
                        hist: h,
                    });
                }
            }
        }
        r
    }

    #[test]
    fn round_trip_keeps_histograms_tags_and_times() {
        let sluice = hist((1..=20_000).map(|i| 10_000 + 7 * i));
        let baseline = hist((1..=5_000).map(|i| 40_000 + 101 * i));
        let empty = hist([]);
        let intervals = vec![
            ("sluice".to_owned(), 0.0, 10.0, &sluice),
            ("baseline".to_owned(), 10.5, 9.25, &baseline),
            (String::new(), 20.0, 1.0, &empty),
        ];
        let bytes = encode_interval_log(1_700_000_000.25, &intervals).expect("encodes");
        let r = read_back(&bytes);
        assert_eq!(r.start, Some(Duration::from_millis(1_700_000_000_250)));
        assert_eq!(r.base, r.start);
        assert_eq!(r.intervals.len(), 3);
        for ((tag, start, len, h), got) in intervals.iter().zip(&r.intervals) {
            let want_tag = if tag.is_empty() {
                None
            } else {
                Some(tag.clone())
            };
            assert_eq!(got.tag, want_tag);
            assert_eq!(got.start, Duration::from_secs_f64(*start));
            assert_eq!(got.len, Duration::from_secs_f64(*len));
            assert!((got.max - h.max() as f64 / MAX_VALUE_DIVISOR).abs() < 1e-3);
            let back = &got.hist;
            assert_eq!(back.len(), h.len());
            for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
                assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q), "q={q}");
            }
            assert_eq!(back.min(), h.min());
            assert_eq!(back.max(), h.max());
        }
    }

    #[test]
    fn header_has_the_java_writer_lines() {
        let h = hist([1_000]);
        let bytes =
            encode_interval_log(1_000.0, &[("t".to_owned(), 0.0, 1.0, &h)]).expect("encodes");
        let text = String::from_utf8(bytes).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "#[Histogram log format version 1.3]");
        assert!(lines.contains(&"#[StartTime: 1000.000 (seconds since epoch)]"));
        assert!(lines.contains(&"#[BaseTime: 1000.000 (seconds since epoch)]"));
        let legend_at = lines.iter().position(|l| *l == LEGEND).expect("legend");
        let first_interval = lines
            .iter()
            .position(|l| l.starts_with("Tag=t,0.000,1.000,0.001,HISTF"))
            .expect("interval line, V2 deflate (HISTF) encoding");
        assert!(legend_at < first_interval);
        assert!(lines[..legend_at].iter().all(|l| l.starts_with('#')));
    }

    #[test]
    fn intervals_are_sorted_by_start() {
        let a = hist([1]);
        let b = hist([2]);
        let bytes = encode_interval_log(
            0.0,
            &[
                ("late".to_owned(), 5.0, 1.0, &a),
                ("early".to_owned(), 1.0, 1.0, &b),
            ],
        )
        .expect("encodes");
        let tags: Vec<_> = read_back(&bytes)
            .intervals
            .into_iter()
            .map(|i| i.tag.expect("tag"))
            .collect();
        assert_eq!(tags, ["early", "late"]);
    }

    #[test]
    fn bad_input_is_refused_and_named() {
        let h = hist([1]);
        let err = encode_interval_log(0.0, &[("a b".to_owned(), 0.0, 1.0, &h)])
            .expect_err("space in tag");
        assert!(
            matches!(&err, HlogError::BadTag { tag } if tag == "a b"),
            "{err}"
        );
        let err = encode_interval_log(0.0, &[("ok".to_owned(), -1.0, 1.0, &h)])
            .expect_err("negative start");
        assert!(err.to_string().contains("\"ok\""), "{err}");
        let err =
            encode_interval_log(0.0, &[("ok".to_owned(), 0.0, f64::NAN, &h)]).expect_err("NaN");
        assert!(matches!(err, HlogError::BadInterval { .. }));
        let err = encode_interval_log(f64::INFINITY, &[]).expect_err("infinite start");
        assert!(matches!(err, HlogError::BadStartTime { .. }));
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn write_creates_a_readable_file_and_names_it_on_error() {
        let dir = std::env::temp_dir().join(format!("sluice-hlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let h = hist((1..=100).map(|i| i * 1_000));
        let path = dir.join("run.hlog");
        write_interval_log(
            &path,
            1_700_000_000.0,
            &[("sluice".to_owned(), 0.0, 2.0, &h)],
        )
        .expect("writes");
        let r = read_back(&std::fs::read(&path).expect("read"));
        assert_eq!(r.intervals.len(), 1);
        assert_eq!(r.intervals[0].hist.len(), 100);

        // A bad interval leaves no file behind.
        let refused = dir.join("refused.hlog");
        let err = write_interval_log(&refused, 0.0, &[("x,y".to_owned(), 0.0, 1.0, &h)])
            .expect_err("comma in tag");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(!refused.exists());

        let missing = dir.join("no-such-dir").join("run.hlog");
        let err = write_interval_log(&missing, 0.0, &[]).expect_err("missing directory");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
