//! The sink: `recvmmsg` batches, per-flow sequence accounting and one-way latency.
//!
//! One-way latency is this process's `CLOCK_MONOTONIC` read once after each `recvmmsg`, minus
//! the sender's timestamp in the packet: both sides run on one machine, and network namespaces
//! share the monotonic clock. It includes the time a packet waited in the socket queue, which
//! is latency an application sees. Datagrams without the sluice-perf header are counted as
//! `malformed` and otherwise ignored.
//!
//! Bounded: stops at `duration`, after `idle_timeout` without traffic once traffic started, or
//! when `expect` distinct packets have arrived.

use std::net::{SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gen::StopReason;
use crate::hist::{HistError, LatencyHistogram, LatencySummary};
use crate::mmsg::{is_timeout, Batch};
use crate::pacing::rate_pps;
use crate::payload::{Header, Kind, MAX_FRAME_BYTES};
use crate::seq::{FlowTable, SeqGap, SeqStats, Stamp};
use crate::sys::{grow_recv_buffer, monotonic_ns, pin_to_cpu, SysError};

const RECV_BUFFER_BYTES: usize = 32 << 20;
/// How often a blocked receive wakes to look at the clock.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub bind: SocketAddrV4,
    pub duration: Duration,
    pub idle_timeout: Duration,
    pub expect: Option<u64>,
    pub batch: usize,
    pub cpu: Option<usize>,
    /// Put the serialised histogram into the report.
    pub include_histogram: bool,
    /// Created (empty) once the socket is bound, so a harness knows when to start sending.
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot bind the sink's UDP socket to {bind}: {source}; is the address in this namespace and the port free?")]
    Bind {
        bind: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot set a receive timeout on the sink socket: {0}")]
    Timeout(std::io::Error),
    #[error("recvmmsg on {bind} failed: {source}")]
    Recv {
        bind: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot create the ready file {path}: {source}")]
    Ready {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--batch {0} is outside 1..=1024")]
    Batch(usize),
    #[error(transparent)]
    Hist(#[from] HistError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// The sink's JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SinkReport {
    pub kind: String,
    pub bind: String,
    #[serde(flatten)]
    pub seq: SeqStats,
    pub malformed: u64,
    pub flows: usize,
    pub bytes: u64,
    /// From the first to the last datagram received.
    pub duration_ns: u64,
    pub rate_pps: f64,
    pub expected: Option<u64>,
    /// `expected - received` when `--expect` was given.
    pub missing_vs_expected: Option<u64>,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub stopped_by: StopReason,
    /// The longest run of sequence numbers missing between two received packets of a flow
    /// ([`crate::seq`]): where an outage was, in sequence and in time. Absent without a gap
    /// (and in reports written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_gap: Option<SeqGap>,
    /// The longest gaps (at most [`crate::seq::MAX_GAPS`]), longest first; the first is
    /// `longest_gap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<SeqGap>,
    /// Gaps found (also those not in `gaps`).
    #[serde(default)]
    pub gap_count: u64,
    /// Of every flow's highest-sequence packet, the one sent last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet: Option<Stamp>,
    /// One-way latency histogram, HdrHistogram V2 + deflate, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
}

/// Binds the sink socket (so callers can bind before they start a sender).
pub fn bind_sink(bind: SocketAddrV4) -> Result<UdpSocket, SinkError> {
    let s = UdpSocket::bind(bind).map_err(|source| SinkError::Bind { bind, source })?;
    grow_recv_buffer(&s, RECV_BUFFER_BYTES);
    s.set_read_timeout(Some(POLL_INTERVAL))
        .map_err(SinkError::Timeout)?;
    Ok(s)
}

/// Binds and runs the sink to completion.
pub fn run_sink(cfg: &SinkConfig) -> Result<SinkReport, SinkError> {
    let sock = bind_sink(cfg.bind)?;
    run_sink_on(&sock, cfg)
}

/// Runs the sink on an already bound socket.
pub fn run_sink_on(sock: &UdpSocket, cfg: &SinkConfig) -> Result<SinkReport, SinkError> {
    if !(1..=crate::gen::MAX_BATCH).contains(&cfg.batch) {
        return Err(SinkError::Batch(cfg.batch));
    }
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    sock.set_read_timeout(Some(POLL_INTERVAL))
        .map_err(SinkError::Timeout)?;
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, b"").map_err(|source| SinkError::Ready {
            path: path.clone(),
            source,
        })?;
    }
    let mut hist = LatencyHistogram::new()?;
    let mut flows = FlowTable::default();
    let mut batch = Batch::new(cfg.batch, MAX_FRAME_BYTES);
    let (mut malformed, mut bytes) = (0u64, 0u64);
    let (mut first_rx, mut last_rx) = (None::<u64>, 0u64);
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let idle_ns = u64::try_from(cfg.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let stopped_by = loop {
        let n = match batch.recv(sock) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => 0,
            Err(source) => {
                return Err(SinkError::Recv {
                    bind: cfg.bind,
                    source,
                })
            }
        };
        let now = monotonic_ns();
        if n > 0 {
            first_rx.get_or_insert(now);
            last_rx = now;
        }
        for i in 0..n {
            let d = batch.received(i);
            bytes += d.len() as u64;
            match Header::decode(d) {
                Ok(h) if h.kind == Kind::Data => {
                    flows.record_at(h.flow, h.seq, h.send_ts_ns, now);
                    hist.record(now.saturating_sub(h.send_ts_ns));
                }
                _ => malformed += 1,
            }
        }
        if cfg.expect.is_some_and(|e| flows.totals().received >= e) {
            break StopReason::Expected;
        }
        if now >= deadline {
            break StopReason::Duration;
        }
        if first_rx.is_some() && now - last_rx >= idle_ns {
            break StopReason::IdleTimeout;
        }
    };
    let seq = flows.totals();
    let duration_ns = first_rx.map_or(0, |f| last_rx - f);
    Ok(SinkReport {
        kind: "sink".into(),
        bind: cfg.bind.to_string(),
        seq,
        malformed,
        flows: flows.active_flows(),
        bytes,
        duration_ns,
        rate_pps: rate_pps(seq.received, duration_ns),
        expected: cfg.expect,
        missing_vs_expected: cfg.expect.map(|e| e.saturating_sub(seq.received)),
        latency: hist.summary(),
        stopped_by,
        longest_gap: flows.longest_gap(),
        gaps: flows.gaps(),
        gap_count: flows.gap_count(),
        last_packet: flows.last_sent(),
        histogram: if cfg.include_histogram {
            Some(hist.to_base64()?)
        } else {
            None
        },
    })
}
