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
pub mod affinity;
pub mod classify;
pub mod conntrack;
pub mod drop_reason;
pub mod handoff;
pub mod handover;
pub mod latency;
pub mod packet;
pub mod pipeline;
pub mod policy;
pub mod runtime;
pub mod services;
pub mod snapshot;
pub mod stages;
pub mod stats;
pub mod wire;
pub mod wireguard;
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
    /// ICMP error (time exceeded, fragmentation needed) back to the sender.
    IcmpError,
    /// Encapsulated in VXLAN and sent on the uplink to another node.
    Encap,
    /// Received in VXLAN from another node, decapsulated and delivered to a local pod.
    Decap,
    /// Encapsulated in VXLAN, then sealed in WireGuard, for another node.
    EncapEncrypted,
    /// The frame was turned into an ARP request for an unresolved next hop (the original packet
    /// counts as dropped with `NeighborUnresolved`).
    ArpRequest,
    /// The frame was turned into a rejection (TCP RST or ICMP port unreachable) sent back to
    /// its sender, as kube-proxy's reject rules; the original counts as dropped for the reason.
    Reject(DropReason),
    /// To this node's own stack, after the host firewall allowed it: transmitted on the
    /// re-injection veth, whose peer the kernel receives on.
    ToHost,
}

/// What the pipeline may use besides the snapshot and the frame: the batch's time (read once
/// per batch by the worker) and the worker's own small mutable tables.
pub struct Ctx<'a> {
    /// Monotonic nanoseconds at the start of the batch (0 when there is no clock: tests).
    pub now_ns: u64,
    pub arp: &'a mut stages::neighbor::ArpThrottle,
    /// The worker's flow state (conntrack, session affinity). `None` (some tests and
    /// benchmarks): packets that need flow state are dropped with `NoFlowState`.
    pub flows: Option<&'a mut stages::lb::Flows>,
    /// Which worker this is, of how many: flows are steered to their owner (see `stages::lb`).
    pub steer: stages::lb::Steer,
}

impl<'a> Ctx<'a> {
    /// A context without flow state, on a single worker.
    pub fn stateless(now_ns: u64, arp: &'a mut stages::neighbor::ArpThrottle) -> Self {
        Ctx {
            now_ns,
            arp,
            flows: None,
            steer: stages::lb::Steer::SINGLE,
        }
    }
}

/// The outcome of the pipeline for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame on `ifindex`.
    Tx { ifindex: u32, kind: TxKind },
    /// Drop, for this reason.
    Drop(DropReason),
    /// The flow belongs to another worker: copy the frame (as it is now) to `worker`, which
    /// goes on at `resume` ([`pipeline::process_resumed`]).
    Handoff {
        worker: u16,
        resume: pipeline::Resume,
    },
}
