//! TCP throughput: a sender writing over `flows` parallel connections and a receiver counting
//! what arrives, both bounded by bytes and by time.
//!
//! The receiver's figure is the one that counts: bytes read from the first byte to the last,
//! over all connections ([`totals`]). The sender's figure is what the kernel accepted into its
//! socket buffers, which runs ahead of the receiver by up to the buffer size. Each thread's
//! blocking call wakes every [`POLL_INTERVAL`] to look at the clock, so nothing waits past the
//! deadline by more than that.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::pacing::rate_pps;
use crate::sys::{monotonic_ns, pin_to_cpu, SysError};

pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Largest single write.
pub const MAX_WRITE_BYTES: usize = 4 << 20;

#[derive(Debug, Error)]
pub enum TcpError {
    #[error("--flows must be at least 1")]
    NoFlows,
    #[error("write size {0} is outside 1..={MAX_WRITE_BYTES} bytes")]
    WriteSize(usize),
    #[error("cannot connect flow {flow} to {dst}: {source}; is the receiver listening?")]
    Connect {
        dst: SocketAddrV4,
        flow: u16,
        source: std::io::Error,
    },
    #[error("TCP I/O on flow {flow} with {peer} failed: {source}")]
    Io {
        peer: String,
        flow: u16,
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {bind}: {source}; is the address in this namespace and the port free?"
    )]
    Bind {
        bind: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot create the ready file {path}: {source}")]
    Ready {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a TCP worker thread panicked")]
    Thread,
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// Why a TCP flow or run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpStop {
    /// The byte budget was written (sender) or every connection reached end of stream
    /// (receiver).
    Done,
    Duration,
    IdleTimeout,
}

/// Bytes one connection carried, and when (monotonic ns; 0/0 when it carried nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBytes {
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Totals over all connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpTotals {
    pub connections: usize,
    pub bytes: u64,
    /// From the earliest first byte to the latest last byte of any connection.
    pub duration_ns: u64,
    pub bytes_per_s: f64,
    pub min_flow_bytes: u64,
    pub max_flow_bytes: u64,
}

/// Sums flows; connections that carried nothing count in `connections` and `min_flow_bytes`
/// but not in the time span.
pub fn totals(flows: &[FlowBytes]) -> TcpTotals {
    let active = || flows.iter().filter(|f| f.bytes > 0);
    let first = active().map(|f| f.first_ns).min();
    let last = active().map(|f| f.last_ns).max();
    let duration_ns = match (first, last) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let bytes = flows.iter().map(|f| f.bytes).sum();
    TcpTotals {
        connections: flows.len(),
        bytes,
        duration_ns,
        // pacing::rate_pps is "units per second"; here the units are bytes.
        bytes_per_s: rate_pps(bytes, duration_ns),
        min_flow_bytes: flows.iter().map(|f| f.bytes).min().unwrap_or(0),
        max_flow_bytes: flows.iter().map(|f| f.bytes).max().unwrap_or(0),
    }
}

/// Splits `total` bytes over `flows` connections: the first `total % flows` get one more.
pub fn per_flow_budget(total: u64, flows: u16, flow: u16) -> u64 {
    let n = u64::from(flows.max(1));
    total / n + u64::from(u64::from(flow) < total % n)
}

#[derive(Clone, Debug)]
pub struct TcpSendConfig {
    pub dst: SocketAddrV4,
    pub flows: u16,
    /// Total over all flows.
    pub bytes: u64,
    pub duration: Duration,
    pub write_bytes: usize,
    pub cpu: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TcpSendReport {
    pub kind: String,
    pub dst: String,
    pub flows: u16,
    pub write_bytes: usize,
    pub target_bytes: u64,
    #[serde(flatten)]
    pub totals: TcpTotals,
    pub stopped_by: TcpStop,
}

fn send_flow(
    cfg: &TcpSendConfig,
    flow: u16,
    deadline: u64,
) -> Result<(FlowBytes, TcpStop), TcpError> {
    let budget = per_flow_budget(cfg.bytes, cfg.flows, flow);
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(cfg.dst), CONNECT_TIMEOUT).map_err(
        |source| TcpError::Connect {
            dst: cfg.dst,
            flow,
            source,
        },
    )?;
    let io = |source| TcpError::Io {
        peer: cfg.dst.to_string(),
        flow,
        source,
    };
    s.set_write_timeout(Some(POLL_INTERVAL)).map_err(io)?;
    let _ = s.set_nodelay(true);
    let buf = vec![0x5Cu8; cfg.write_bytes];
    let mut fb = FlowBytes::default();
    let stop = loop {
        if fb.bytes >= budget {
            break TcpStop::Done;
        }
        if monotonic_ns() >= deadline {
            break TcpStop::Duration;
        }
        let n = usize::try_from(budget - fb.bytes)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        match s.write(&buf[..n]) {
            Ok(0) => return Err(io(ErrorKind::WriteZero.into())),
            Ok(k) => {
                let now = monotonic_ns();
                if fb.bytes == 0 {
                    fb.first_ns = now;
                }
                fb.bytes += k as u64;
                fb.last_ns = now;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    };
    // End of stream tells the receiver this flow is complete.
    let _ = s.shutdown(Shutdown::Write);
    Ok((fb, stop))
}

/// Connects `flows` times and writes until the byte budget or the duration is used up.
pub fn run_tcp_send(cfg: &TcpSendConfig) -> Result<TcpSendReport, TcpError> {
    if cfg.flows == 0 {
        return Err(TcpError::NoFlows);
    }
    if !(1..=MAX_WRITE_BYTES).contains(&cfg.write_bytes) {
        return Err(TcpError::WriteSize(cfg.write_bytes));
    }
    // Threads inherit the pinning of the thread that spawns them.
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    let deadline =
        monotonic_ns().saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let results: Vec<Result<(FlowBytes, TcpStop), TcpError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..cfg.flows)
            .map(|flow| sc.spawn(move || send_flow(cfg, flow, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(TcpError::Thread)))
            .collect()
    });
    let mut flows = Vec::with_capacity(results.len());
    let mut stopped_by = TcpStop::Done;
    for r in results {
        let (fb, stop) = r?;
        if stop != TcpStop::Done {
            stopped_by = stop;
        }
        flows.push(fb);
    }
    Ok(TcpSendReport {
        kind: "tcp-send".into(),
        dst: cfg.dst.to_string(),
        flows: cfg.flows,
        write_bytes: cfg.write_bytes,
        target_bytes: cfg.bytes,
        totals: totals(&flows),
        stopped_by,
    })
}

#[derive(Clone, Debug)]
pub struct TcpRecvConfig {
    pub bind: SocketAddrV4,
    /// Connections to wait for.
    pub flows: u16,
    pub duration: Duration,
    /// Give up on a connection this long after its last byte.
    pub idle_timeout: Duration,
    pub cpu: Option<usize>,
    pub ready_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TcpRecvReport {
    pub kind: String,
    pub bind: String,
    /// Connections expected.
    pub flows: u16,
    #[serde(flatten)]
    pub totals: TcpTotals,
    pub stopped_by: TcpStop,
}

fn recv_flow(
    mut s: TcpStream,
    flow: u16,
    deadline: u64,
    idle_ns: u64,
) -> Result<(FlowBytes, TcpStop), TcpError> {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let io = |source| TcpError::Io {
        peer: peer.clone(),
        flow,
        source,
    };
    s.set_read_timeout(Some(POLL_INTERVAL)).map_err(io)?;
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut fb = FlowBytes::default();
    let accepted = monotonic_ns();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok((fb, TcpStop::Done)),
            Ok(k) => {
                let now = monotonic_ns();
                if fb.bytes == 0 {
                    fb.first_ns = now;
                }
                fb.bytes += k as u64;
                fb.last_ns = now;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io(e)),
        }
        let now = monotonic_ns();
        if now >= deadline {
            return Ok((fb, TcpStop::Duration));
        }
        let last = if fb.bytes == 0 { accepted } else { fb.last_ns };
        if now.saturating_sub(last) >= idle_ns {
            return Ok((fb, TcpStop::IdleTimeout));
        }
    }
}

/// Binds, accepts `flows` connections (or as many as come before the deadline) and reads each
/// to its end.
pub fn run_tcp_recv(cfg: &TcpRecvConfig) -> Result<TcpRecvReport, TcpError> {
    if cfg.flows == 0 {
        return Err(TcpError::NoFlows);
    }
    if let Some(cpu) = cfg.cpu {
        pin_to_cpu(cpu)?;
    }
    let bind_err = |source| TcpError::Bind {
        bind: cfg.bind,
        source,
    };
    let listener = TcpListener::bind(cfg.bind).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, b"").map_err(|source| TcpError::Ready {
            path: path.clone(),
            source,
        })?;
    }
    let start = monotonic_ns();
    let deadline = start.saturating_add(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let idle_ns = u64::try_from(cfg.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let results: Vec<Result<(FlowBytes, TcpStop), TcpError>> = std::thread::scope(|sc| {
        let mut handles = Vec::new();
        let mut accept_error = None;
        while handles.len() < usize::from(cfg.flows) && monotonic_ns() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    let flow = handles.len() as u16;
                    if let Err(e) = s.set_nonblocking(false) {
                        accept_error = Some(bind_err(e));
                        break;
                    }
                    handles.push(sc.spawn(move || recv_flow(s, flow, deadline, idle_ns)));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    accept_error = Some(bind_err(e));
                    break;
                }
            }
        }
        let mut out: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(TcpError::Thread)))
            .collect();
        if let Some(e) = accept_error {
            out.push(Err(e));
        }
        out
    });
    let mut flows = Vec::with_capacity(results.len());
    let mut stopped_by = if results.len() < usize::from(cfg.flows) {
        TcpStop::Duration
    } else {
        TcpStop::Done
    };
    for r in results {
        let (fb, stop) = r?;
        if stop != TcpStop::Done {
            stopped_by = stop;
        }
        flows.push(fb);
    }
    Ok(TcpRecvReport {
        kind: "tcp-recv".into(),
        bind: cfg.bind.to_string(),
        flows: cfg.flows,
        totals: totals(&flows),
        stopped_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_span_all_flows_and_ignore_idle_ones() {
        let flows = [
            FlowBytes {
                bytes: 1_000,
                first_ns: 100,
                last_ns: 500_000_100,
            },
            FlowBytes {
                bytes: 3_000,
                first_ns: 200,
                last_ns: 1_000_000_100,
            },
            FlowBytes::default(),
        ];
        let t = totals(&flows);
        assert_eq!(t.connections, 3);
        assert_eq!(t.bytes, 4_000);
        assert_eq!(t.duration_ns, 1_000_000_000);
        assert!((t.bytes_per_s - 4_000.0).abs() < 1e-9);
        assert_eq!(t.min_flow_bytes, 0);
        assert_eq!(t.max_flow_bytes, 3_000);
        assert_eq!(totals(&[]), TcpTotals::default());
        // One write: no time span, no rate (not infinity).
        let one = totals(&[FlowBytes {
            bytes: 10,
            first_ns: 5,
            last_ns: 5,
        }]);
        assert_eq!(one.bytes_per_s, 0.0);
    }

    #[test]
    fn byte_budget_splits_exactly() {
        assert_eq!(
            (0..3)
                .map(|f| per_flow_budget(10, 3, f))
                .collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!((0..4).map(|f| per_flow_budget(10, 4, f)).sum::<u64>(), 10);
        assert_eq!(per_flow_budget(u64::MAX, 1, 0), u64::MAX);
        assert_eq!(per_flow_budget(5, 0, 0), 5);
    }

    #[test]
    fn loopback_send_and_receive_agree_on_bytes() {
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let bind = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let ready = std::env::temp_dir().join(format!("sluice-perf-tcp-{port}.ready"));
        let _ = std::fs::remove_file(&ready);
        let rcfg = TcpRecvConfig {
            bind,
            flows: 3,
            duration: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(2),
            cpu: None,
            ready_file: Some(ready.clone()),
        };
        let receiver = std::thread::spawn(move || run_tcp_recv(&rcfg));
        for _ in 0..500 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&ready);
        let sent = run_tcp_send(&TcpSendConfig {
            dst: bind,
            flows: 3,
            bytes: 10_000_001,
            duration: Duration::from_secs(10),
            write_bytes: 64 * 1024,
            cpu: None,
        })
        .expect("sender runs");
        let got = receiver
            .join()
            .expect("receiver thread")
            .expect("receiver runs");
        assert_eq!(sent.totals.bytes, 10_000_001);
        assert_eq!(sent.stopped_by, TcpStop::Done);
        assert_eq!(got.totals.bytes, 10_000_001);
        assert_eq!(got.totals.connections, 3);
        assert_eq!(got.totals.min_flow_bytes, 3_333_333);
        assert_eq!(got.totals.max_flow_bytes, 3_333_334);
        assert_eq!(got.stopped_by, TcpStop::Done);
        assert!(got.totals.bytes_per_s > 0.0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let cfg = TcpSendConfig {
            dst: SocketAddrV4::new([127, 0, 0, 1].into(), 9),
            flows: 0,
            bytes: 1,
            duration: Duration::from_millis(10),
            write_bytes: 1,
            cpu: None,
        };
        assert!(matches!(run_tcp_send(&cfg), Err(TcpError::NoFlows)));
        assert!(matches!(
            run_tcp_send(&TcpSendConfig {
                flows: 1,
                write_bytes: 0,
                ..cfg.clone()
            }),
            Err(TcpError::WriteSize(0))
        ));
        // Nobody listens on port 9 of loopback: a connect error naming the address.
        let e = run_tcp_send(&TcpSendConfig { flows: 1, ..cfg }).expect_err("refused");
        assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
    }
}
