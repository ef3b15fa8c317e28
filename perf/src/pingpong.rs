//! Closed-loop request/response latency: one request outstanding at a time.
//!
//! The client stamps each ping with `CLOCK_MONOTONIC` and a sequence number; the server turns
//! it into a pong in place (one byte) and sends it back; the client records `now - stamp` for
//! the pong whose sequence it is waiting for. Pongs of earlier, timed-out pings are counted as
//! `stale` and ignored. Bounded by `count`, `duration`, and a per-ping `reply_timeout`.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gen::StopReason;
use crate::hist::{HistError, LatencyHistogram, LatencySummary};
use crate::mmsg::is_timeout;
use crate::pacing::rate_pps;
use crate::payload::{payload_len_for_frame, Header, Kind, PayloadError, MAX_FRAME_BYTES};
use crate::sink::POLL_INTERVAL;
use crate::sys::{monotonic_ns, pin_to_cpu, SysError};

#[derive(Debug, Error)]
pub enum PingError {
    #[error("cannot open a UDP socket for ping-pong with {addr}: {source}")]
    Socket {
        addr: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("ping-pong I/O with {addr} failed: {source}")]
    Io {
        addr: SocketAddrV4,
        source: std::io::Error,
    },
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Hist(#[from] HistError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

#[derive(Clone, Debug)]
pub struct PingServerConfig {
    pub bind: SocketAddrV4,
    pub duration: Duration,
    pub cpu: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingServerReport {
    pub kind: String,
    pub bind: String,
    pub served: u64,
    pub malformed: u64,
    pub send_errors: u64,
    pub duration_ns: u64,
}

/// Binds the server socket (so callers can bind before they start a client).
pub fn bind_server(bind: SocketAddrV4) -> Result<UdpSocket, PingError> {
    let s = UdpSocket::bind(bind).map_err(|source| PingError::Socket { addr: bind, source })?;
    s.set_read_timeout(Some(POLL_INTERVAL))
        .map_err(|source| PingError::Socket { addr: bind, source })?;
    Ok(s)
}

/// Echoes pings as pongs until `duration` has passed.
pub fn run_server_on(
    sock: &UdpSocket,
    cfg: &PingServerConfig,
) -> Result<PingServerReport, PingError> {
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    let io = |source| PingError::Io {
        addr: cfg.bind,
        source,
    };
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let (mut served, mut malformed, mut send_errors) = (0u64, 0u64, 0u64);
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    while monotonic_ns() < deadline {
        let (len, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(io(e)),
        };
        let pkt = &mut buf[..len];
        match Header::decode(pkt) {
            Ok(h) if h.kind == Kind::Ping => {
                Header::set_kind(pkt, Kind::Pong)?;
                match sock.send_to(pkt, peer) {
                    Ok(_) => served += 1,
                    // The client may be gone (ICMP unreachable queued): keep serving.
                    Err(_) => send_errors += 1,
                }
            }
            _ => malformed += 1,
        }
    }
    Ok(PingServerReport {
        kind: "pingpong-server".into(),
        bind: cfg.bind.to_string(),
        served,
        malformed,
        send_errors,
        duration_ns: monotonic_ns() - start,
    })
}

pub fn run_server(cfg: &PingServerConfig) -> Result<PingServerReport, PingError> {
    run_server_on(&bind_server(cfg.bind)?, cfg)
}

#[derive(Clone, Debug)]
pub struct PingConfig {
    pub dst: SocketAddrV4,
    pub frame_bytes: usize,
    pub count: u64,
    pub duration: Duration,
    pub reply_timeout: Duration,
    pub cpu: Option<usize>,
    pub include_histogram: bool,
}

/// The client's JSON line; latency fields are round-trip times.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub kind: String,
    pub dst: String,
    pub frame_bytes: usize,
    pub sent: u64,
    pub received: u64,
    pub timeouts: u64,
    pub stale: u64,
    pub duration_ns: u64,
    /// Completed round trips per second.
    pub rate_pps: f64,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub stopped_by: StopReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
}

pub fn run_pingpong(cfg: &PingConfig) -> Result<PingReport, PingError> {
    let payload = payload_len_for_frame(cfg.frame_bytes)?;
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    let io = |source| PingError::Io {
        addr: cfg.dst,
        source,
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|source| PingError::Socket {
        addr: cfg.dst,
        source,
    })?;
    sock.connect(SocketAddr::V4(cfg.dst)).map_err(io)?;
    let timeout_ns = u64::try_from(cfg.reply_timeout.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut out = vec![0u8; payload];
    let mut inp = vec![0u8; MAX_FRAME_BYTES];
    let mut hist = LatencyHistogram::new()?;
    let (mut sent, mut received, mut timeouts, mut stale) = (0u64, 0u64, 0u64, 0u64);
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let stopped_by = loop {
        if sent >= cfg.count {
            break StopReason::Count;
        }
        let t0 = monotonic_ns();
        if t0 >= deadline {
            break StopReason::Duration;
        }
        let seq = sent as u32;
        Header {
            kind: Kind::Ping,
            flow: 0,
            seq,
            send_ts_ns: t0,
        }
        .encode(&mut out)?;
        sent += 1;
        if sock.send(&out).is_err() {
            // Nothing listening yet (ICMP unreachable) or no buffer: a lost round trip.
            timeouts += 1;
            continue;
        }
        let wait_until = t0.saturating_add(timeout_ns).min(deadline);
        loop {
            let now = monotonic_ns();
            if now >= wait_until {
                timeouts += 1;
                break;
            }
            let left = Duration::from_nanos(wait_until - now).max(Duration::from_micros(1));
            sock.set_read_timeout(Some(left)).map_err(io)?;
            match sock.recv(&mut inp) {
                Ok(len) => match Header::decode(&inp[..len]) {
                    Ok(h) if h.kind == Kind::Pong && h.seq == seq => {
                        hist.record(monotonic_ns().saturating_sub(h.send_ts_ns));
                        received += 1;
                        break;
                    }
                    _ => stale += 1,
                },
                Err(e) if is_timeout(&e) => {}
                // ECONNREFUSED from a queued ICMP error: this round trip is lost.
                Err(_) => {
                    timeouts += 1;
                    break;
                }
            }
        }
    };
    let duration_ns = monotonic_ns() - start;
    Ok(PingReport {
        kind: "pingpong".into(),
        dst: cfg.dst.to_string(),
        frame_bytes: cfg.frame_bytes,
        sent,
        received,
        timeouts,
        stale,
        duration_ns,
        rate_pps: rate_pps(received, duration_ns),
        latency: hist.summary(),
        stopped_by,
        histogram: if cfg.include_histogram {
            Some(hist.to_base64()?)
        } else {
            None
        },
    })
}
