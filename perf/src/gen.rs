//! The bounded UDP generator: `sendmmsg` batches over `flows` connected sockets (one source port
//! each), open loop at a target rate or closed loop (as fast as the socket takes them).
//!
//! Bounded: stops after `count` packets or `duration`, whichever comes first. The clock is read
//! once per batch, and every packet of a batch carries that batch's timestamp, so the sink's
//! latency includes the time a packet waits behind the earlier ones of its batch.
//! A packet counts as sent when `sendmmsg` accepted it; a batch the kernel refuses is counted in
//! `send_errors` and its sequence numbers are reused, so the sink sees no false gaps.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mmsg::Batch;
use crate::pacing::{rate_pps, rate_reached, Pacer};
use crate::payload::{payload_len_for_frame, Header, Kind, PayloadError};
use crate::sys::{
    grow_send_buffer, monotonic_ns, pin_to_cpu, sleep_until_ns, tighten_timer_slack, SysError,
};

/// Most packets in one `sendmmsg` (the kernel's UIO_MAXIOV is 1024).
pub const MAX_BATCH: usize = 1024;
const SEND_BUFFER_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub dst: SocketAddrV4,
    /// Ethernet frame size including FCS (see [`crate::payload`]).
    pub frame_bytes: usize,
    pub count: u64,
    pub duration: Duration,
    /// `None`: closed loop.
    pub rate_pps: Option<u64>,
    pub flows: u16,
    pub batch: usize,
    pub cpu: Option<usize>,
}

#[derive(Debug, Error)]
pub enum GenError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("--flows must be at least 1")]
    NoFlows,
    #[error("--batch {0} is outside 1..={MAX_BATCH}")]
    Batch(usize),
    #[error("--rate 0 would never send; leave --rate out for closed loop")]
    ZeroRate,
    #[error("cannot open a UDP socket towards {dst} for flow {flow}: {source}")]
    Socket {
        dst: SocketAddrV4,
        flow: u16,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Why a bounded loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Count,
    Duration,
    IdleTimeout,
    Expected,
}

/// The generator's JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenReport {
    pub kind: String,
    pub dst: String,
    pub frame_bytes: usize,
    pub payload_bytes: usize,
    pub flows: u16,
    pub batch: usize,
    pub sent: u64,
    /// `CLOCK_MONOTONIC` ns when sending began (0 in reports written before it existed).
    #[serde(default)]
    pub start_ns: u64,
    /// `sendmmsg` calls that failed (their packets were not sent and are retried).
    pub send_errors: u64,
    pub duration_ns: u64,
    pub achieved_pps: f64,
    pub target_pps: Option<u64>,
    /// Achieved within 5 % of the target; `true` in closed loop (no target).
    pub rate_reached: bool,
    pub stopped_by: StopReason,
}

/// Runs the generator to completion.
pub fn run_gen(cfg: &GenConfig) -> Result<GenReport, GenError> {
    let payload = payload_len_for_frame(cfg.frame_bytes)?;
    if cfg.flows == 0 {
        return Err(GenError::NoFlows);
    }
    if !(1..=MAX_BATCH).contains(&cfg.batch) {
        return Err(GenError::Batch(cfg.batch));
    }
    let pacer = match cfg.rate_pps {
        None => None,
        Some(r) => Some(Pacer::new(r).ok_or(GenError::ZeroRate)?),
    };
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    tighten_timer_slack();
    let mut socks = Vec::with_capacity(usize::from(cfg.flows));
    for flow in 0..cfg.flows {
        let open = || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::V4(cfg.dst))?;
            Ok(s)
        };
        let s = open().map_err(|source| GenError::Socket {
            dst: cfg.dst,
            flow,
            source,
        })?;
        grow_send_buffer(&s, SEND_BUFFER_BYTES);
        socks.push(s);
    }
    let mut next_seq = vec![0u32; socks.len()];
    let mut batch = Batch::new(cfg.batch, payload);
    let mut sent = 0u64;
    let mut send_errors = 0u64;
    let mut flow = 0usize;
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let stopped_by = loop {
        if sent >= cfg.count {
            break StopReason::Count;
        }
        let now = monotonic_ns();
        if now >= deadline {
            break StopReason::Duration;
        }
        if let Some(wait) = pacer.and_then(|p| p.wait_ns(now - start, sent)) {
            sleep_until_ns(now.saturating_add(wait).min(deadline));
            continue;
        }
        let n = usize::try_from(cfg.count - sent)
            .unwrap_or(usize::MAX)
            .min(cfg.batch);
        for i in 0..n {
            let h = Header {
                kind: Kind::Data,
                flow: flow as u16,
                seq: next_seq[flow].wrapping_add(i as u32),
                send_ts_ns: now,
            };
            h.encode(batch.slot_mut(i))?;
        }
        let mut done = 0usize;
        while done < n {
            match batch.send(&socks[flow], done, n - done) {
                Ok(k) => done += k,
                Err(_) => {
                    // ENOBUFS, a queued ICMP error (ECONNREFUSED) and the like: give up on the
                    // rest of this batch; the clock check above bounds the retries.
                    send_errors += 1;
                    break;
                }
            }
        }
        sent += done as u64;
        next_seq[flow] = next_seq[flow].wrapping_add(done as u32);
        flow = (flow + 1) % socks.len();
    };
    let duration_ns = monotonic_ns() - start;
    let achieved_pps = rate_pps(sent, duration_ns);
    Ok(GenReport {
        kind: "gen".into(),
        dst: cfg.dst.to_string(),
        frame_bytes: cfg.frame_bytes,
        payload_bytes: payload,
        flows: cfg.flows,
        batch: cfg.batch,
        sent,
        start_ns: start,
        send_errors,
        duration_ns,
        achieved_pps,
        target_pps: cfg.rate_pps,
        rate_reached: rate_reached(achieved_pps, cfg.rate_pps),
        stopped_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GenConfig {
        GenConfig {
            dst: SocketAddrV4::new([127, 0, 0, 1].into(), 9),
            frame_bytes: 64,
            count: 10,
            duration: Duration::from_millis(100),
            rate_pps: None,
            flows: 1,
            batch: 8,
            cpu: None,
        }
    }

    #[test]
    fn bad_parameters_are_refused_before_sending() {
        assert!(matches!(
            run_gen(&GenConfig {
                frame_bytes: 10,
                ..cfg()
            }),
            Err(GenError::Payload(_))
        ));
        assert!(matches!(
            run_gen(&GenConfig { flows: 0, ..cfg() }),
            Err(GenError::NoFlows)
        ));
        assert!(matches!(
            run_gen(&GenConfig { batch: 0, ..cfg() }),
            Err(GenError::Batch(0))
        ));
        assert!(matches!(
            run_gen(&GenConfig {
                batch: 5000,
                ..cfg()
            }),
            Err(GenError::Batch(5000))
        ));
        assert!(matches!(
            run_gen(&GenConfig {
                rate_pps: Some(0),
                ..cfg()
            }),
            Err(GenError::ZeroRate)
        ));
    }
}
