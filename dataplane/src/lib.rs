//! sluice's dataplane: a sans-IO per-packet pipeline and the AF_XDP workers that feed it.
//!
//! ```text
//!  pod veth / uplink --XDP redirect--> AF_XDP socket (rx ring) --+
//!                                                               | worker thread (pinned core):
//!      fill ring <-- free frames <-- completion ring <--+        |  snapshot = cache.load()  (once per batch)
//!                                                       |        |  for frame in batch:
//!  dest. socket (tx ring) <------ Verdict::Tx ----------+--------+    pipeline::process(snapshot, rx, frame)
//! ```
//!
//! Invariants:
//! - The per-packet path (`pipeline`, `stages`, `classify`, `wire`) allocates nothing, takes no
//!   lock, reads no clock, formats nothing, and never panics on packet contents: every frame ends
//!   in a [`Verdict`], every drop in a numbered [`DropReason`].
//! - Each worker owns its UMEM, sockets, frame pool and counters; it reads the control plane's
//!   [`snapshot::Snapshot`] through arc-swap once per batch. Control talks to workers over
//!   bounded channels polled between batches.
//! - Frames live in UMEM chunks with headroom in front for later encapsulation.
pub mod classify;
pub mod drop_reason;
pub mod latency;
pub mod packet;
pub mod pipeline;
pub mod runtime;
pub mod snapshot;
pub mod stages;
pub mod stats;
pub mod wire;
pub mod worker;
pub mod xsk;

pub use drop_reason::DropReason;

/// Why a frame is transmitted (counted per kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxKind {
    /// Routed to another interface.
    Forward,
    /// ARP reply for the gateway.
    ArpReply,
    /// ICMP echo reply from the gateway.
    GatewayEcho,
    /// ICMP error (time exceeded) back to the sender.
    IcmpError,
}

/// The outcome of the pipeline for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame on `ifindex`.
    Tx { ifindex: u32, kind: TxKind },
    /// Drop, for this reason.
    Drop(DropReason),
}
