//! sluice-perf: honest, bounded packet-rate and latency measurements between pods.
//!
//! ```text
//!   pod-a netns                                   pod-b netns
//!   gen  --sendmmsg batches, F source ports-->  sink (recvmmsg, per-flow seq, one-way latency)
//!   pingpong --closed loop, or open loop at a rate-> pingpong-server (echo)
//!   tcp-send --F connections, bytes/time bound--> tcp-recv (bytes per connection)
//!              (kernel path or sluice's workers in between; `run` measures both)
//! ```
//!
//! Invariants:
//! - Every loop is bounded by a count and a duration; nothing waits forever.
//! - Every packet carries an 18-byte header ([`payload`]): flow, 32-bit sequence, and the
//!   sender's `CLOCK_MONOTONIC`, so one-way latency is measured on one clock.
//! - Numbers come with their caveats: the generator says whether it reached its target rate,
//!   and every run report says that generator, sink and dataplane share the CPUs ([`report`]).
//!
//! Layout: pure pieces without I/O and testable without root ([`payload`], [`seq`], [`pacing`],
//! [`hist`], [`metrics`] (figures, sluice/baseline ratios, comparisons), [`report`],
//! [`scenario`] (the table of scenarios), [`service`] (ClusterIP targets), [`policy`] (evidence
//! that a policy scenario's policies were enforced), [`restart`] (the loss an agent restart causes
//! under traffic)); socket loops ([`gen`], [`sink`], [`pingpong`],
//! [`tcp`]) over [`mmsg`] and [`sys`]; the binary `sluice-perf` wires them to a CLI and to the
//! testbed, running every scenario with sluice and with the kernel baseline. Exports: [`hlog`]
//! (HdrHistogram interval logs) and [`plot`] (SVG latency spectra and curves); [`scale`] is the
//! pipeline's cost-versus-table-size curve; [`scale_api`] the control plane's first sync, memory
//! and update latency at 10,000 Services (fake API server + Kubernetes source + translation).

pub mod gen;
pub mod hist;
pub mod hlog;
pub mod metrics;
pub mod mmsg;
pub mod pacing;
pub mod payload;
pub mod pingpong;
pub mod plot;
pub mod policy;
pub mod report;
pub mod restart;
pub mod scale;
pub mod scale_api;
pub mod scenario;
pub mod seq;
pub mod service;
pub mod sink;
pub mod sys;
pub mod tcp;
