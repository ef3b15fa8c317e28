//! Request/response latency, closed loop (one request outstanding at a time) or open loop
//! (requests at a fixed rate whatever the replies do).
//!
//! The client stamps each ping with `CLOCK_MONOTONIC` and a sequence number; the server turns
//! it into a pong in place (one byte) and sends it back; the client records `now - stamp` for
//! the pong whose sequence it is waiting for. Pongs of earlier, timed-out pings are counted as
//! `stale` and ignored. Bounded by `count`, `duration`, and a per-ping `reply_timeout`.
//!
//! Open loop ([`PingConfig::rate_pps`]): pings leave on the pacer's schedule ([`crate::pacing`]);
//! pongs are matched by sequence number ([`crate::seq::FlowSeq`]: received, duplicates,
//! reordered) and their round trip is read from the stamp they carry back, so a slow reply never
//! delays the next request and queueing shows up in the latency instead of being hidden by the
//! closed loop's waiting (coordinated omission). After the last ping the client waits
//! `reply_timeout` for stragglers; pings without a pong by then are `lost`.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gen::StopReason;
use crate::hist::{HistError, LatencyHistogram, LatencySummary};
use crate::mmsg::is_timeout;
use crate::pacing::{rate_pps, Pacer};
use crate::payload::{payload_len_for_frame, Header, Kind, PayloadError, MAX_FRAME_BYTES};
use crate::seq::FlowSeq;
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
    #[error("--rate 0 would never send; leave --rate out for closed loop")]
    ZeroRate,
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
    /// `None`: closed loop. `Some(r)`: open loop at `r` requests per second.
    pub rate_pps: Option<u64>,
}

fn yes() -> bool {
    true
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
    /// Open loop: the request rate asked for (`None`: closed loop).
    #[serde(default)]
    pub target_pps: Option<u64>,
    /// Open loop: requests went out within 5 % of the target rate (`true` in closed loop).
    #[serde(default = "yes")]
    pub rate_reached: bool,
    /// Open loop: requests whose reply never came (closed loop counts those in `timeouts`).
    #[serde(default)]
    pub lost: u64,
    /// Open loop: second copies of a reply.
    #[serde(default)]
    pub duplicates: u64,
}

/// Runs the client, closed or open loop by [`PingConfig::rate_pps`].
pub fn run_pingpong(cfg: &PingConfig) -> Result<PingReport, PingError> {
    let payload = payload_len_for_frame(cfg.frame_bytes)?;
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    if let Some(rate) = cfg.rate_pps {
        let pacer = Pacer::new(rate).ok_or(PingError::ZeroRate)?;
        return run_open_loop(cfg, payload, pacer);
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
        target_pps: None,
        rate_reached: true,
        lost: 0,
        duplicates: 0,
    })
}

/// Waits until `fd` is readable or `timeout_ns` passed (`ppoll`, nanosecond resolution).
fn wait_readable(fd: &UdpSocket, timeout_ns: u64) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask; an error or EINTR only ends
    // the wait early, which the caller's clock check handles.
    unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
}

fn run_open_loop(cfg: &PingConfig, payload: usize, pacer: Pacer) -> Result<PingReport, PingError> {
    let io = |source| PingError::Io {
        addr: cfg.dst,
        source,
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|source| PingError::Socket {
        addr: cfg.dst,
        source,
    })?;
    sock.connect(SocketAddr::V4(cfg.dst)).map_err(io)?;
    sock.set_nonblocking(true).map_err(io)?;
    crate::sys::grow_recv_buffer(&sock, 4 << 20);
    crate::sys::grow_send_buffer(&sock, 4 << 20);
    let reply_ns = u64::try_from(cfg.reply_timeout.as_nanos()).unwrap_or(u64::MAX);
    let mut out = vec![0u8; payload];
    let mut inp = vec![0u8; MAX_FRAME_BYTES];
    let mut hist = LatencyHistogram::new()?;
    let mut replies = FlowSeq::new();
    let (mut sent, mut send_failed, mut stale) = (0u64, 0u64, 0u64);
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let mut stopped: Option<(StopReason, u64)> = None;
    let mut sending_ns = 0u64;
    loop {
        let now = monotonic_ns();
        if stopped.is_none() {
            if sent >= cfg.count {
                stopped = Some((StopReason::Count, now));
            } else if now >= deadline {
                stopped = Some((StopReason::Duration, now));
            }
            if stopped.is_some() {
                sending_ns = now - start;
            }
        }
        if let Some((_, at)) = stopped {
            if now >= at.saturating_add(reply_ns) || replies.stats().received >= sent {
                break;
            }
        } else if pacer.wait_ns(now - start, sent).is_none() {
            Header {
                kind: Kind::Ping,
                flow: 0,
                seq: sent as u32,
                send_ts_ns: now,
            }
            .encode(&mut out)?;
            sent += 1;
            if sock.send(&out).is_err() {
                // No buffer or a queued ICMP error: this request is lost, the schedule goes on.
                send_failed += 1;
            }
            continue;
        }
        // Take every pong waiting, then sleep until the next ping is due or a pong arrives.
        loop {
            match sock.recv(&mut inp) {
                Ok(len) => match Header::decode(&inp[..len]) {
                    Ok(h) if h.kind == Kind::Pong => {
                        let before = replies.stats();
                        replies.record(h.seq);
                        if replies.stats().duplicates == before.duplicates {
                            hist.record(monotonic_ns().saturating_sub(h.send_ts_ns));
                        }
                    }
                    _ => stale += 1,
                },
                Err(e) if is_timeout(&e) => break,
                // A queued ICMP error (nothing listening yet): counted as lost requests.
                Err(_) => break,
            }
        }
        let now = monotonic_ns();
        let until = match stopped {
            Some((_, at)) => at.saturating_add(reply_ns),
            None => start.saturating_add(pacer.due_ns(sent)).min(deadline),
        };
        if until > now {
            wait_readable(&sock, (until - now).min(POLL_INTERVAL.as_nanos() as u64));
        }
    }
    let r = replies.stats();
    let achieved = rate_pps(sent, sending_ns);
    Ok(PingReport {
        kind: "pingpong".into(),
        dst: cfg.dst.to_string(),
        frame_bytes: cfg.frame_bytes,
        sent,
        received: r.received,
        timeouts: send_failed,
        stale,
        duration_ns: sending_ns,
        rate_pps: rate_pps(r.received, sending_ns),
        latency: hist.summary(),
        stopped_by: stopped.map_or(StopReason::Duration, |(s, _)| s),
        histogram: if cfg.include_histogram {
            Some(hist.to_base64()?)
        } else {
            None
        },
        target_pps: Some(pacer.rate_pps()),
        rate_reached: crate::pacing::rate_reached(achieved, Some(pacer.rate_pps())),
        lost: sent.saturating_sub(r.received),
        duplicates: r.duplicates,
    })
}
