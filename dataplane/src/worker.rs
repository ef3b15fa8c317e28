//! A worker: one pinned thread owning one UMEM, its frame pool, and one AF_XDP socket per
//! (interface, queue) assigned to it. Per loop iteration:
//!
//! 1. apply control commands (take over a new socket, remove a port, report port stats),
//!    polled with `try_recv`; sockets are created and bound by control (the syscalls, mmaps
//!    and rtnl lock stay off this thread), the worker only fills their fill ring;
//! 2. load the current snapshot once (arc-swap cache);
//! 3. reap completion rings (transmitted frames back to the pool);
//! 4. for each port, take a batch from its rx ring and run every frame through
//!    [`pipeline::process`]; a `Tx` verdict moves the frame (no copy) to the tx ring of the
//!    destination interface's socket on this same worker, a drop returns it to the pool;
//! 5. publish tx rings and kick them when the kernel asks (copy mode always asks);
//! 6. top up fill rings from the pool;
//! 7. when nothing happened for `idle_spin` (the clock is read only on empty iterations, never
//!    per packet), publish counters and sleep in poll(2) on all sockets and the worker's eventfd
//!    (control writes it after sending a command).
//!
//! Frame ownership: `owner[frame]` says where every UMEM frame is: with the worker (free list
//! or being processed) or given to the kernel through one port's fill or tx ring. Rx and
//! completion descriptors are checked against it (a frame the port does not hold is counted as
//! a bad descriptor, never reused twice), and removing a port reclaims exactly the frames it
//! held, after its socket is closed (copy mode: the kernel touches none after close).
//!
//! Queue ownership: worker `w` of `n` owns queue `q` of every interface where `q % n == w`, so
//! it has a socket (hence a tx ring) on every interface and forwarding never crosses workers.
//! This needs every interface to have at least `n` queues (the CNI plugin creates pod veths
//! with one queue per worker).
use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        mpsc::{Receiver, SyncSender},
        Arc,
    },
};

use arc_swap::ArcSwapOption;

use std::hash::BuildHasher;

use crate::{
    conntrack::{Conntrack, ConntrackError},
    drop_reason::DropReason,
    handoff::Handoff,
    latency::{cycles, CycleClock, LatencyHistograms},
    packet::PacketBuf,
    pipeline,
    snapshot::Snapshot,
    stages::lb::{Flows, Steer},
    stages::neighbor::ArpThrottle,
    stats::{Counters, SharedCounters},
    xsk::{sys::xdp_desc, BindMode, RingSizes, UmemArea, UmemConfig, XskSocket},
    Ctx, Verdict,
};

/// Why a worker could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Umem(#[from] crate::xsk::UmemError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error("handed-over flows: {0}")]
    Flows(#[from] crate::conntrack::ImportError),
}

/// Conntrack entries examined per busy loop iteration and before each sleep.
const GC_BUDGET_BUSY: usize = 32;
const GC_BUDGET_IDLE: usize = 8192;

/// How many tx kicks one flush may spend on one socket (copy mode sends 32 frames per kick).
const MAX_KICKS_PER_FLUSH: u32 = 16;
/// Publish counters at least every this many busy iterations.
const PUBLISH_EVERY_BATCHES: u64 = 64;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: usize,
    pub core: Option<usize>,
    pub umem: UmemConfig,
    pub rings: RingSizes,
    /// Frames taken from one rx ring per iteration.
    pub batch: u32,
    /// How long to keep polling the rings after the last work before sleeping in poll(2).
    /// Longer: fewer thread wake-ups (lower request/response latency), more CPU burnt idle.
    pub idle_spin: std::time::Duration,
    /// poll(2) timeout while idle.
    pub idle_poll_ms: i32,
    /// Conntrack entries (a power of two) of this worker.
    pub conntrack_capacity: usize,
    /// Conntrack timeouts.
    pub timeouts: crate::conntrack::Timeouts,
    /// How many workers share the flows (steering; see `stages::lb`).
    pub workers: usize,
}

/// What a new socket looks like, for control (which puts `fd` into the XSKMAP).
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    pub worker: usize,
    pub ifindex: u32,
    pub queue: u32,
    /// The socket's fd, valid until the port is removed.
    pub fd: i32,
    pub mode: BindMode,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PortStatus {
    pub worker: usize,
    pub ifindex: u32,
    pub queue: u32,
    pub mode: BindMode,
    pub kernel: crate::xsk::sys::xdp_statistics,
    /// Frames currently given to the kernel (fill + tx rings, in flight).
    pub frames_in_kernel: u32,
}

pub enum Command {
    /// Take over a socket control created and bound on this worker's UMEM.
    AddPort {
        socket: Box<XskSocket>,
        kind: PortKind,
        reply: SyncSender<Result<PortInfo, String>>,
    },
    RemovePort {
        ifindex: u32,
        queue: u32,
        reply: SyncSender<bool>,
    },
    PortStats {
        reply: SyncSender<Vec<PortStatus>>,
    },
    /// Add this worker's latency histograms into `into` and send it back.
    Histograms {
        into: Box<LatencyHistograms>,
        reply: SyncSender<Box<LatencyHistograms>>,
    },
    Shutdown,
    /// Stop taking frames from the rx rings (a hot restart's first phase): once every worker
    /// has answered, none hands another a copy, so each can empty its handoff lanes for good
    /// at [`Command::Handover`].
    Pause {
        reply: SyncSender<()>,
    },
    /// Take frames from the rx rings again (a hot restart that stopped before its hand-over).
    Unpause,
    /// The kind of the port on (`ifindex`, `queue`): an adopted port keeps the kind the previous
    /// agent gave it, which an older agent did not tell ([`crate::handover::PortMeta::kind`]).
    SetPortKind {
        ifindex: u32,
        queue: u32,
        kind: PortKind,
    },
    /// Hot restart: empty the handoff lanes, stop between two batches and hand everything over
    /// ([`crate::handover`]): sockets, UMEM, frame owners, flows. The sockets are not closed.
    /// After [`Command::Pause`] on every worker, so that no copy arrives after this.
    Handover {
        reply: SyncSender<crate::handover::WorkerState>,
    },
}

/// What the command loop tells the worker loop.
enum Next {
    Run,
    Stop,
    Handover(SyncSender<crate::handover::WorkerState>),
}

/// `owner` value of a frame the worker holds (free list, or in the middle of the pipeline).
const OWNER_WORKER: u16 = u16::MAX;
/// `owner` value of a frame a zero-copy port still held when removed: never reused.
const OWNER_LEAKED: u16 = u16::MAX - 1;

/// What a port carries, which decides how its fill ring is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    /// A pod's veth (or the host firewall's re-injection veth): starts small, grows with
    /// traffic.
    #[default]
    Endpoint,
    /// The node's uplink, where every other node's traffic arrives: its fill ring is kept at
    /// its whole cap from the start (an equal share of the worker's fill budget, at least a
    /// quarter of it, at most one ring), like a NIC's rx ring. A burst from another
    /// node (its worker catching up after a pause, a hot restart's rings released at once)
    /// lands in frames already posted, not in a ring that grows only after it ran dry.
    Uplink,
}

struct Port {
    /// Stable id (index positions shift when ports are removed).
    id: u16,
    kind: PortKind,
    sock: XskSocket,
    tx_dirty: bool,
    /// Frames this port's fill ring is topped up to: starts small ([`fill_start`]) and doubles
    /// (up to the worker's per-port cap) each time traffic drained it below a quarter between
    /// two refills. Idle ports hold few frames, so adding ports never takes the pool
    /// from the busy ones (with one fixed share per port, the first ports added kept the big
    /// shares of a worker with few ports, and a node with many pods ran out of free frames).
    fill_target: u32,
    /// Frames in the fill ring right after the last refill (what it received since is the
    /// difference with the ring's count now).
    filled: u32,
}

/// A new port's fill target: a thirty-second of the UMEM (256 frames of the default 8192), at
/// least 64 (a burst of a few batches must find frames before the ring has grown), at most one
/// ring.
fn fill_start(frames: u32, ring: u32) -> u32 {
    (frames / 32).max(64).min(ring).max(1)
}

/// What a worker is built from: fresh, or handed over by the previous agent.
struct Parts {
    umem: UmemArea,
    owner: Vec<u16>,
    ports: Vec<Port>,
    next_port_id: u16,
    flows: Vec<u8>,
    adopted: bool,
    /// Allocated ahead (a hot restart allocates before the previous agent's workers stop).
    conntrack: Option<Conntrack>,
}

/// A worker's conntrack table, with a random seed of its own: flow keys chosen by an attacker
/// cannot be aimed at buckets.
pub fn new_conntrack(config: &WorkerConfig) -> Result<Conntrack, ConntrackError> {
    let seed = std::collections::hash_map::RandomState::new().hash_one(config.id);
    Conntrack::new(crate::conntrack::Config {
        capacity: config.conntrack_capacity,
        seed,
        timeouts: config.timeouts,
    })
}

/// Worker state. Field order matters for Drop: ports (sockets, rings) before the UMEM.
pub struct Worker {
    ports: Vec<Port>,
    umem: UmemArea,
    free: Vec<u64>,
    /// Per frame: [`OWNER_WORKER`], [`OWNER_LEAKED`], or the id of the port whose rings hold it.
    owner: Vec<u16>,
    frame_shift: u32,
    next_port_id: u16,
    /// Where `refill` starts, rotated so no port is always served last.
    refill_from: usize,
    /// (ifindex, port index) sorted by ifindex: the tx socket for each interface.
    tx_port: Vec<(u32, usize)>,
    pollfds: Vec<libc::pollfd>,
    /// Per-port fill caps: an endpoint port grows up to `fill_target`, an uplink port is kept
    /// at `uplink_fill_target`.
    fill_target: u32,
    uplink_fill_target: u32,
    counters: Counters,
    latency: LatencyHistograms,
    clock: CycleClock,
    arp: ArpThrottle,
    /// The batch's time (from the TSC read at its start), handed to the pipeline.
    now_ns: u64,
    /// Conntrack and affinity: flows this worker owns.
    flows: Flows,
    steer: Steer,
    handoff: Arc<Handoff>,
    /// Workers handed a frame in this iteration (bit per worker), woken after the batch.
    wake_mask: u64,
    shared: Arc<SharedCounters>,
    snapshot: Arc<ArcSwapOption<Snapshot>>,
    commands: Receiver<Command>,
    wake: OwnedFd,
    config: WorkerConfig,
    /// Continues a previous agent's worker (hot restart).
    adopted: bool,
    /// [`Command::Pause`] came: no frame is taken from the rx rings.
    paused: bool,
}

impl Worker {
    pub fn new(
        config: WorkerConfig,
        shared: Arc<SharedCounters>,
        snapshot: Arc<ArcSwapOption<Snapshot>>,
        commands: Receiver<Command>,
        wake: OwnedFd,
        handoff: Arc<Handoff>,
        affinity: Arc<crate::affinity::Affinity>,
    ) -> Result<Self, WorkerError> {
        let umem = UmemArea::new(config.umem)?;
        let frames = config.umem.frames;
        let owner = vec![OWNER_WORKER; frames as usize];
        Self::build(
            config,
            Parts {
                umem,
                owner,
                ports: Vec::new(),
                next_port_id: 0,
                flows: Vec::new(),
                adopted: false,
                conntrack: None,
            },
            shared,
            snapshot,
            commands,
            wake,
            handoff,
            affinity,
        )
    }

    /// A worker that continues where a worker of the previous agent stopped
    /// ([`Command::Handover`]): its UMEM, sockets, frame owners and flows.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        config: WorkerConfig,
        state: crate::handover::WorkerState,
        conntrack: Option<Conntrack>,
        shared: Arc<SharedCounters>,
        snapshot: Arc<ArcSwapOption<Snapshot>>,
        commands: Receiver<Command>,
        wake: OwnedFd,
        handoff: Arc<Handoff>,
        affinity: Arc<crate::affinity::Affinity>,
    ) -> Result<Self, WorkerError> {
        let mut owner = state.owner;
        owner.resize(config.umem.frames as usize, OWNER_WORKER);
        for o in &mut owner {
            // A frame of a port that is not handed over (none should be) is the worker's.
            if *o != OWNER_WORKER && *o != OWNER_LEAKED && !state.ports.iter().any(|p| p.id == *o) {
                *o = OWNER_WORKER;
            }
        }
        let ports = state
            .ports
            .into_iter()
            .map(|p| Port {
                id: p.id,
                kind: p.kind,
                sock: p.socket,
                // What the old worker queued may not have been kicked yet.
                tx_dirty: true,
                fill_target: p.fill_target.max(1),
                filled: p.filled,
            })
            .collect();
        Self::build(
            config,
            Parts {
                umem: state.umem,
                owner,
                ports,
                next_port_id: state.next_port_id,
                flows: state.flows,
                adopted: true,
                conntrack,
            },
            shared,
            snapshot,
            commands,
            wake,
            handoff,
            affinity,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        config: WorkerConfig,
        parts: Parts,
        shared: Arc<SharedCounters>,
        snapshot: Arc<ArcSwapOption<Snapshot>>,
        commands: Receiver<Command>,
        wake: OwnedFd,
        handoff: Arc<Handoff>,
        affinity: Arc<crate::affinity::Affinity>,
    ) -> Result<Self, WorkerError> {
        let Parts {
            umem,
            owner,
            ports,
            next_port_id,
            flows: flow_records,
            adopted,
            conntrack,
        } = parts;
        let mut ct = match conntrack {
            Some(ct) => ct,
            None => new_conntrack(&config)?,
        };
        let clock = CycleClock::get();
        if !flow_records.is_empty() {
            ct.import(&flow_records, clock.to_ns(cycles()))?;
        }
        let flows = Flows::new(ct, affinity);
        let steer = Steer {
            worker: config.id as u16,
            workers: config.workers.max(1) as u16,
        };
        handoff.set_waker(config.id, wake.as_raw_fd());
        let shift = config.umem.frame_size.trailing_zeros();
        let free = owner
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, o)| **o == OWNER_WORKER)
            .map(|(i, _)| (i as u64) << shift)
            .collect::<Vec<u64>>();
        let mut free_list = Vec::with_capacity(config.umem.frames as usize);
        free_list.extend(free);
        let mut w = Self {
            ports,
            umem,
            free: free_list,
            owner,
            frame_shift: shift,
            next_port_id,
            refill_from: 0,
            tx_port: Vec::new(),
            pollfds: Vec::new(),
            fill_target: 0,
            uplink_fill_target: 0,
            counters: Counters::default(),
            latency: LatencyHistograms::new(),
            clock,
            arp: ArpThrottle::default(),
            now_ns: 0,
            flows,
            steer,
            handoff,
            wake_mask: 0,
            shared,
            snapshot,
            commands,
            wake,
            adopted,
            paused: false,
            config,
        };
        w.rebuild_tables();
        Ok(w)
    }

    /// Stops for a hot restart: sends what is queued, puts every frame the fill rings can take
    /// into them (the kernel receives into those until the next agent's worker runs), and
    /// returns the sockets, the UMEM, the frame owners and the flows.
    fn into_handover(mut self) -> crate::handover::WorkerState {
        let generation = self.snapshot.load().as_ref().map_or(0, |s| s.generation());
        self.flush_tx();
        let reserve = (self.config.umem.frames / 16) as usize;
        let nports = self.ports.len();
        for k in 0..nports {
            let share = self.free.len().saturating_sub(reserve) / (nports - k);
            let p = &mut self.ports[k];
            let mut pushed = 0;
            while pushed < share {
                let Some(addr) = self.free.pop() else { break };
                if !p.sock.fill.push(addr) {
                    self.free.push(addr);
                    break;
                }
                self.owner[(addr >> self.frame_shift) as usize] = p.id;
                pushed += 1;
            }
            if pushed > 0 {
                p.sock.fill.submit();
            }
            p.filled = p.sock.fill.pending();
            if p.sock.fill.needs_wakeup() {
                p.sock.kick_rx();
            }
        }
        let now = self.clock.to_ns(cycles());
        let mut flows = Vec::new();
        let flow_count = self.flows.ct.export(now, &mut flows);
        self.sync_flow_counters();
        self.shared
            .publish(&self.counters, generation, self.free.len() as u64);
        let ports = std::mem::take(&mut self.ports)
            .into_iter()
            .map(|p| crate::handover::PortState {
                id: p.id,
                kind: p.kind,
                fill_target: p.fill_target,
                filled: p.filled,
                socket: p.sock,
            })
            .collect();
        crate::handover::WorkerState {
            id: self.config.id,
            umem: self.umem,
            ports,
            owner: self.owner,
            next_port_id: self.next_port_id,
            flows,
            flow_count,
        }
    }

    pub fn on_hugepages(&self) -> bool {
        self.umem.on_hugepages()
    }

    /// The UMEM region sockets for this worker must register or share.
    pub fn umem_region(&self) -> crate::xsk::UmemRegion {
        self.umem.region()
    }

    /// The worker loop; returns on `Command::Shutdown` or when control hangs up.
    pub fn run(mut self) {
        if let Some(core) = self.config.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(
                    worker = self.config.id,
                    core,
                    "could not pin worker to its core"
                );
            }
        }
        let snapshot = Arc::clone(&self.snapshot);
        let mut cache = arc_swap::Cache::new(&*snapshot);
        let mut idle_since: Option<std::time::Instant> = None;
        let mut since_publish = 0u64;
        loop {
            match self.apply_commands() {
                Next::Run => {}
                Next::Stop => break,
                Next::Handover(reply) => {
                    // Copies other workers handed this one before they paused: forwarded now,
                    // or lost with this process's lanes. (Not while adopted and waiting for a
                    // snapshot: such a worker touches no ring, and nobody hands it copies.)
                    let snap = cache.load();
                    if snap.is_some() || !self.adopted {
                        self.now_ns = self.clock.to_ns(cycles());
                        while self.drain_handoff(snap.as_deref()) > 0 {}
                    }
                    drop(cache);
                    let _ = reply.send(self.into_handover());
                    return;
                }
            }
            let snap = cache.load();
            let generation = snap.as_ref().map_or(0, |s| s.generation());
            let t0 = cycles();
            self.now_ns = self.clock.to_ns(t0);
            // An adopted worker touches no ring until the new agent's first snapshot: what waits
            // in its rx rings stays there rather than being dropped for want of a snapshot, and
            // if the hot restart fails before then the previous agent takes back rings whose
            // indices, completions and fill frames are exactly as it left them (reaping a
            // completion here would lose that frame to it; refilling would hand the kernel a
            // frame it also holds as free).
            let live = snap.is_some() || !self.adopted;
            let mut work = if live { self.reap_completions() } else { 0 };
            let mut frames = 0;
            if live {
                if !self.paused {
                    for p in 0..self.ports.len() {
                        frames += self.rx_batch(p, snap.as_deref());
                    }
                }
                frames += self.drain_handoff(snap.as_deref());
            }
            if self.wake_mask != 0 {
                self.wake_handoff_targets();
            }
            work += frames;
            self.flows.ct.gc(self.now_ns, GC_BUDGET_BUSY);
            let tx_pending = self.flush_tx();
            if frames > 0 {
                let ns = self.clock.to_ns(cycles().wrapping_sub(t0));
                self.latency.record_batch(ns, u64::from(frames));
            }
            if live {
                self.refill();
            }
            if work > 0 || tx_pending {
                idle_since = None;
                self.counters.batches += 1;
                since_publish += 1;
                if since_publish >= PUBLISH_EVERY_BATCHES {
                    self.sync_flow_counters();
                    self.shared
                        .publish(&self.counters, generation, self.free.len() as u64);
                    since_publish = 0;
                }
                continue;
            }
            let now = std::time::Instant::now();
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) < self.config.idle_spin {
                // Spinning, but let any other runnable thread on this core go first (another
                // node's worker on a shared test machine, the sink): sched_yield returns at once
                // when nothing else wants the core.
                std::thread::yield_now();
            } else {
                self.flows.ct.gc(self.now_ns, GC_BUDGET_IDLE);
                self.sync_flow_counters();
                self.shared
                    .publish(&self.counters, generation, self.free.len() as u64);
                since_publish = 0;
                self.sleep();
                idle_since = None;
            }
        }
        let generation = self.snapshot.load().as_ref().map_or(0, |s| s.generation());
        self.sync_flow_counters();
        self.shared
            .publish(&self.counters, generation, self.free.len() as u64);
    }

    fn sleep(&mut self) {
        // Announce the sleep, then look once more: a frame handed over in between would
        // otherwise wait for the poll timeout.
        self.handoff.set_sleeping(self.config.id, true);
        if self.handoff.pending(self.config.id) {
            self.handoff.set_sleeping(self.config.id, false);
            return;
        }
        self.counters.idle_sleeps += 1;
        // Paused (a hot restart's first phase): only control's eventfd, since what waits in
        // the rx rings would wake it at once, again and again.
        let watched = if self.paused { 1 } else { self.pollfds.len() };
        // SAFETY: pollfds is a live array of pollfd, at least `watched` long (the eventfd first).
        unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                watched as libc::nfds_t,
                self.config.idle_poll_ms,
            )
        };
        self.handoff.set_sleeping(self.config.id, false);
        // Drain the eventfd if control or another worker woke us.
        if self.pollfds[0].revents & libc::POLLIN != 0 {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes from our own non-blocking eventfd into a local buffer.
            unsafe {
                libc::read(
                    self.wake.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    8,
                )
            };
        }
    }

    /// What to do next: run on, stop, or hand over.
    fn apply_commands(&mut self) -> Next {
        loop {
            match self.commands.try_recv() {
                Ok(Command::AddPort {
                    socket,
                    kind,
                    reply,
                }) => {
                    let (ifindex, queue) = (socket.ifindex(), socket.queue());
                    let r = self.add_port(*socket, kind);
                    let added = r.is_ok();
                    if reply.send(r).is_err() && added {
                        // Control gave up waiting: nobody will register or remove this socket.
                        self.remove_port(ifindex, queue);
                    }
                }
                Ok(Command::RemovePort {
                    ifindex,
                    queue,
                    reply,
                }) => {
                    let found = self.remove_port(ifindex, queue);
                    let _ = reply.send(found);
                }
                Ok(Command::PortStats { reply }) => {
                    // Publish too, so counters and gauges read right after are current.
                    let generation = self.snapshot.load().as_ref().map_or(0, |s| s.generation());
                    self.shared
                        .publish(&self.counters, generation, self.free.len() as u64);
                    let _ = reply.send(self.port_stats());
                }
                Ok(Command::Histograms { mut into, reply }) => {
                    into.add(&self.latency);
                    let _ = reply.send(into);
                }
                Ok(Command::Shutdown) => return Next::Stop,
                Ok(Command::Pause { reply }) => {
                    self.paused = true;
                    let _ = reply.send(());
                }
                Ok(Command::Unpause) => self.paused = false,
                Ok(Command::SetPortKind {
                    ifindex,
                    queue,
                    kind,
                }) => {
                    let found = self
                        .ports
                        .iter_mut()
                        .find(|p| p.sock.ifindex() == ifindex && p.sock.queue() == queue);
                    if let Some(p) = found {
                        if p.kind != kind {
                            p.kind = kind;
                            if kind == PortKind::Endpoint {
                                p.fill_target =
                                    fill_start(self.config.umem.frames, self.config.rings.fill);
                            }
                            self.rebuild_tables();
                        }
                    }
                }
                Ok(Command::Handover { reply }) => return Next::Handover(reply),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Next::Run,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Next::Stop,
            }
        }
    }

    fn add_port(&mut self, sock: XskSocket, kind: PortKind) -> Result<PortInfo, String> {
        let (ifindex, queue) = (sock.ifindex(), sock.queue());
        if self
            .ports
            .iter()
            .any(|p| p.sock.ifindex() == ifindex && p.sock.queue() == queue)
        {
            return Err(format!(
                "ifindex {ifindex} queue {queue} already has a socket on this worker"
            ));
        }
        let info = PortInfo {
            worker: self.config.id,
            ifindex,
            queue,
            fd: sock.fd().as_raw_fd(),
            mode: sock.mode(),
        };
        let id = self.allocate_port_id();
        self.ports.push(Port {
            // An uplink's target is set to its cap by `rebuild_tables`.
            fill_target: fill_start(self.config.umem.frames, self.config.rings.fill),
            filled: 0,
            id,
            kind,
            sock,
            tx_dirty: false,
        });
        self.rebuild_tables();
        self.refill();
        Ok(info)
    }

    fn allocate_port_id(&mut self) -> u16 {
        loop {
            let id = self.next_port_id;
            self.next_port_id = if id + 1 >= OWNER_LEAKED { 0 } else { id + 1 };
            if !self.ports.iter().any(|p| p.id == id) {
                return id;
            }
        }
    }

    fn remove_port(&mut self, ifindex: u32, queue: u32) -> bool {
        let Some(at) = self
            .ports
            .iter()
            .position(|p| p.sock.ifindex() == ifindex && p.sock.queue() == queue)
        else {
            return false;
        };
        let port = self.ports.remove(at);
        let (id, zero_copy) = (port.id, port.sock.mode() == BindMode::ZeroCopy);
        // Close first: in copy mode the kernel touches no frame of a closed socket (unbind
        // waits for in-flight NAPI with synchronize_net; transmitted skbs are copies). Then
        // every frame this port held comes back, wherever it sat (fill, rx, tx, completion).
        drop(port);
        let shift = self.frame_shift;
        for (i, o) in self.owner.iter_mut().enumerate() {
            if *o != id {
                continue;
            }
            if zero_copy {
                // A driver may still DMA into it until its deferred teardown: never reuse.
                *o = OWNER_LEAKED;
                self.counters.frames_leaked += 1;
            } else {
                *o = OWNER_WORKER;
                self.free.push((i as u64) << shift);
            }
        }
        self.rebuild_tables();
        true
    }

    fn port_stats(&self) -> Vec<PortStatus> {
        self.ports
            .iter()
            .map(|p| PortStatus {
                worker: self.config.id,
                ifindex: p.sock.ifindex(),
                queue: p.sock.queue(),
                mode: p.sock.mode(),
                kernel: p.sock.kernel_stats().unwrap_or_default(),
                frames_in_kernel: self.owner.iter().filter(|o| **o == p.id).count() as u32,
            })
            .collect()
    }

    fn rebuild_tables(&mut self) {
        self.tx_port.clear();
        for (i, p) in self.ports.iter().enumerate() {
            if !self.tx_port.iter().any(|(ifx, _)| *ifx == p.sock.ifindex()) {
                self.tx_port.push((p.sock.ifindex(), i));
            }
        }
        self.tx_port.sort_by_key(|(ifx, _)| *ifx);
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for p in &self.ports {
            self.pollfds.push(libc::pollfd {
                fd: p.sock.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // At most about half the UMEM waits in fill rings; the rest carries frames in flight
        // (rx -> tx -> completion), and `refill` never takes the free pool below its reserve.
        // Every port may hold an equal share of that budget, down to a floor: endpoints grow
        // to it with traffic, the uplinks hold it from the start, and never less than a
        // quarter of the budget (a node with a hundred pods still has an uplink ring to
        // receive a burst into; the reserve bounds what this takes beyond the budget).
        // Giving the uplinks a fixed half instead lowered a busy pod's cap (1365 to 1024
        // frames with three ports) and its port ran dry at 200 kpps.
        let ring = self.config.rings.fill;
        let floor = 16.min(ring);
        let budget = self.config.umem.frames / 2;
        let equal = budget / (self.ports.len() as u32).max(1);
        self.fill_target = equal.clamp(floor, ring);
        self.uplink_fill_target = equal.max(budget / 4).clamp(floor, ring);
        for p in &mut self.ports {
            if p.kind == PortKind::Uplink {
                p.fill_target = self.uplink_fill_target;
            }
        }
    }

    #[inline]
    fn reap_completions(&mut self) -> u32 {
        let shift = self.frame_shift;
        let mut total = 0;
        for p in &mut self.ports {
            let n = p.sock.completion.available(self.config.rings.completion);
            if n == 0 {
                continue;
            }
            for i in 0..n {
                let frame = (p.sock.completion.get(i) >> shift) as usize;
                match self.owner.get_mut(frame) {
                    Some(o) if *o == p.id => {
                        *o = OWNER_WORKER;
                        self.free.push((frame as u64) << shift);
                    }
                    _ => self.counters.bad_descriptors += 1,
                }
            }
            p.sock.completion.release(n);
            total += n;
        }
        total
    }

    #[inline]
    fn rx_batch(&mut self, p: usize, snap: Option<&Snapshot>) -> u32 {
        let n = self.ports[p].sock.rx.available(self.config.batch);
        if n == 0 {
            return 0;
        }
        let rx_ifindex = self.ports[p].sock.ifindex();
        let rx_id = self.ports[p].id;
        let shift = self.frame_shift;
        for i in 0..n {
            let desc = self.ports[p].sock.rx.get(i);
            let frame = (desc.addr >> shift) as usize;
            // Only a frame this port's fill ring held may come back on its rx ring.
            match self.owner.get_mut(frame) {
                Some(o) if *o == rx_id => *o = OWNER_WORKER,
                _ => {
                    self.counters.bad_descriptors += 1;
                    continue;
                }
            }
            let base = (frame as u64) << shift;
            let Some((chunk, off)) = self.umem.chunk_mut(desc.addr) else {
                self.counters.bad_descriptors += 1;
                self.free.push(base);
                continue;
            };
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += u64::from(desc.len);
            let Some(mut pkt) = PacketBuf::new(chunk, off, desc.len as usize) else {
                self.counters.bad_descriptors += 1;
                self.free.push(base);
                continue;
            };
            let verdict = match snap {
                Some(s) => {
                    let mut ctx = Ctx {
                        now_ns: self.now_ns,
                        arp: &mut self.arp,
                        flows: Some(&mut self.flows),
                        steer: self.steer,
                    };
                    pipeline::process_ctx(&mut ctx, s, rx_ifindex, &mut pkt)
                }
                None => Verdict::Drop(DropReason::NoSnapshot),
            };
            let verdict = match verdict {
                Verdict::Handoff { worker, resume } => {
                    let to = usize::from(worker);
                    match self
                        .handoff
                        .push(self.config.id, to, rx_ifindex, resume, pkt.data())
                    {
                        Ok(()) => {
                            self.counters.handoff_out += 1;
                            self.wake_mask |= 1u64 << (to % 64);
                        }
                        Err(r) => self.counters.count_drop(r),
                    }
                    self.free.push(base);
                    continue;
                }
                v => v,
            };
            let (head, len) = (pkt.head(), pkt.len());
            self.finish(verdict, frame, base, head, len);
        }
        self.ports[p].sock.rx.release(n);
        n
    }

    /// Queues a processed frame on its tx ring, or returns it to the pool.
    #[inline]
    fn finish(&mut self, verdict: Verdict, frame: usize, base: u64, head: usize, len: usize) {
        match verdict {
            Verdict::Tx { ifindex, kind } => {
                let out = xdp_desc {
                    addr: base + head as u64,
                    len: len as u32,
                    options: 0,
                };
                match self.tx_port.binary_search_by_key(&ifindex, |(ifx, _)| *ifx) {
                    Ok(at) => {
                        let port = &mut self.ports[self.tx_port[at].1];
                        if port.sock.tx.push(out) {
                            self.owner[frame] = port.id;
                            port.tx_dirty = true;
                            self.counters.tx_packets += 1;
                            self.counters.tx_bytes += len as u64;
                            self.counters.count_tx_kind(kind);
                        } else {
                            self.counters.count_drop(DropReason::TxRingFull);
                            self.free.push(base);
                        }
                    }
                    Err(_) => {
                        self.counters.count_drop(DropReason::NoTxPort);
                        self.free.push(base);
                    }
                }
            }
            Verdict::Drop(reason) => {
                self.counters.count_drop(reason);
                self.free.push(base);
            }
            // A frame handed over once is never handed over again (`process_resumed` does not
            // steer); this arm only keeps the match total.
            Verdict::Handoff { .. } => {
                self.counters.count_drop(DropReason::HandoffFull);
                self.free.push(base);
            }
        }
    }

    /// Takes frames other workers handed over (flows this worker owns): each is copied into
    /// one of this worker's frames and resumed where the other worker stopped.
    #[inline]
    fn drain_handoff(&mut self, snap: Option<&Snapshot>) -> u32 {
        let handoff = Arc::clone(&self.handoff);
        let me = self.config.id;
        let headroom = self.config.umem.headroom as usize;
        let mut total = 0u32;
        for from in 0..handoff.workers() {
            if from == me {
                continue;
            }
            let n = handoff.drain(
                from,
                me,
                self.config.batch as usize,
                |rx_ifindex, resume, bytes| {
                    self.counters.handoff_in += 1;
                    let Some(base) = self.free.pop() else {
                        self.counters.count_drop(DropReason::HandoffFull);
                        return;
                    };
                    let frame = (base >> self.frame_shift) as usize;
                    let Some((chunk, off)) = self.umem.chunk_mut(base + headroom as u64) else {
                        self.free.push(base);
                        return;
                    };
                    if chunk.len() < off + bytes.len() {
                        self.counters.count_drop(DropReason::HandoffTooBig);
                        self.free.push(base);
                        return;
                    }
                    chunk[off..off + bytes.len()].copy_from_slice(bytes);
                    let Some(mut pkt) = PacketBuf::new(chunk, off, bytes.len()) else {
                        self.free.push(base);
                        return;
                    };
                    let verdict = match snap {
                        Some(s) => {
                            let mut ctx = Ctx {
                                now_ns: self.now_ns,
                                arp: &mut self.arp,
                                flows: Some(&mut self.flows),
                                steer: self.steer,
                            };
                            pipeline::process_resumed(&mut ctx, s, rx_ifindex, resume, &mut pkt)
                        }
                        None => Verdict::Drop(DropReason::NoSnapshot),
                    };
                    let (head, len) = (pkt.head(), pkt.len());
                    self.finish(verdict, frame, base, head, len);
                },
            );
            total += n as u32;
        }
        total
    }

    /// Wakes the workers this batch handed frames to (only those that sleep get a write).
    #[inline]
    fn wake_handoff_targets(&mut self) {
        let mut m = std::mem::take(&mut self.wake_mask);
        while m != 0 {
            let to = m.trailing_zeros() as usize;
            m &= m - 1;
            self.handoff.wake(to);
        }
    }

    /// Copies conntrack and lb figures into the counters before they are published.
    fn sync_flow_counters(&mut self) {
        let st = *self.flows.ct.stats();
        self.counters.ct_entries = st.entries;
        self.counters.ct_capacity = st.capacity;
        self.counters.ct_evictions = st.evictions
            [crate::conntrack::EvictReason::TableFull as usize]
            + st.evictions[crate::conntrack::EvictReason::BucketsFull as usize];
        self.counters.ct_gc_removed = st.gc_removed;
        let lb = self.flows.stats;
        self.counters.lb_new_flows = lb.lb_new_flows;
        self.counters.masq_new_flows = lb.masq_new_flows;
        self.counters.ct_hits = lb.ct_hits;
        self.counters.lb_reselected = lb.lb_reselected;
        self.counters.policy_flows = lb.policy_flows;
        self.counters.policy_audit_ingress = lb.policy_audit[0];
        self.counters.policy_audit_egress = lb.policy_audit[1];
        self.counters.policy_audit_host = lb.policy_audit[2];
        self.counters.policy_cut = lb.policy_cut;
        self.counters.decrypted = self.flows.wg_opened;
        self.shared.publish_wg(&self.flows.wg_peers);
    }

    /// Publishes and kicks dirty tx rings. Returns true while frames wait to be sent.
    #[inline]
    fn flush_tx(&mut self) -> bool {
        let mut pending_any = false;
        for p in &mut self.ports {
            if !p.tx_dirty {
                continue;
            }
            p.sock.tx.submit();
            if p.sock.tx.needs_wakeup() {
                let mut kicks = 0;
                while p.sock.tx.pending() > 0 && kicks < MAX_KICKS_PER_FLUSH {
                    kicks += 1;
                    self.counters.tx_kicks += 1;
                    match p.sock.kick_tx() {
                        Ok(()) => {}
                        Err(e) if e == libc::EAGAIN || e == libc::EBUSY => {}
                        Err(_) => {
                            // ENETDOWN/ENXIO/ENOBUFS: the interface is down or going away.
                            // Frames stay in the ring (reclaimed if the port is removed); the
                            // next frame queued for it kicks again. Not "pending": the worker
                            // must not spin on an interface that cannot send.
                            self.counters.tx_kick_errors += 1;
                            p.tx_dirty = false;
                            continue;
                        }
                    }
                }
            }
            p.tx_dirty = p.sock.tx.pending() > 0;
            pending_any |= p.tx_dirty;
        }
        pending_any
    }

    #[inline]
    fn refill(&mut self) {
        let nports = self.ports.len();
        if nports == 0 {
            return;
        }
        self.refill_from = (self.refill_from + 1) % nports;
        // Frames kept out of fill rings for frames in flight (handoff copies, generated
        // replies), so that a burst on some ports cannot take the pool from the others.
        let reserve = (self.config.umem.frames / 8) as usize;
        for k in 0..nports {
            let p = &mut self.ports[(self.refill_from + k) % nports];
            let outstanding = p.sock.fill.pending();
            let received = p.filled.saturating_sub(outstanding);
            // Grown when traffic drained the ring to a quarter since the last refill (a burst,
            // or the worker was away): idle and lightly used ports stay small.
            if p.kind == PortKind::Endpoint
                && received > 0
                && outstanding < p.fill_target / 4
                && p.fill_target < self.fill_target
            {
                p.fill_target = (p.fill_target * 2).min(self.fill_target);
            }
            let cap = match p.kind {
                PortKind::Uplink => self.uplink_fill_target,
                PortKind::Endpoint => self.fill_target,
            };
            let target = p.fill_target.min(cap);
            if outstanding < target {
                let want = target - outstanding;
                let mut pushed = 0;
                while pushed < want {
                    if self.free.len() <= reserve {
                        self.counters.fill_starved += 1;
                        break;
                    }
                    let Some(addr) = self.free.pop() else {
                        self.counters.fill_starved += 1;
                        break;
                    };
                    if !p.sock.fill.push(addr) {
                        self.free.push(addr);
                        break;
                    }
                    self.owner[(addr >> self.frame_shift) as usize] = p.id;
                    pushed += 1;
                }
                if pushed > 0 {
                    p.sock.fill.submit();
                }
                p.filled = outstanding + pushed;
            } else {
                p.filled = outstanding;
            }
            if p.sock.fill.needs_wakeup() {
                self.counters.fill_kicks += 1;
                p.sock.kick_rx();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::fd::FromRawFd,
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            id: 0,
            core: None,
            umem: UmemConfig {
                frames: 256,
                frame_size: 4096,
                headroom: 256,
                hugepages: false,
            },
            rings: RingSizes {
                rx: 64,
                tx: 64,
                fill: 64,
                completion: 64,
            },
            batch: 16,
            // Asleep at once when idle, and not woken by the poll timeout during the test.
            idle_spin: Duration::ZERO,
            idle_poll_ms: 30_000,
            conntrack_capacity: 1 << 10,
            timeouts: Default::default(),
            workers: 2,
        }
    }

    /// A copy another worker handed this one just before the hot restart's pause (still in
    /// the lane when Pause and Handover arrive together) is taken from the lane and counted
    /// before the worker hands over: with the lanes gone with the process, skipping it lost
    /// the packet.
    #[test]
    fn a_worker_empties_its_handoff_lanes_before_it_hands_over() {
        let handoff = Arc::new(Handoff::new(2));
        let shared = Arc::new(SharedCounters::default());
        let snapshot = Arc::new(ArcSwapOption::<Snapshot>::empty());
        let (commands, rx) = mpsc::sync_channel(8);
        // SAFETY: eventfd has no preconditions; the fd is checked and owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd");
        // SAFETY: a fresh fd nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let worker_wake = wake.try_clone().expect("dup");
        let thread = {
            let (handoff, shared, snapshot) = (
                Arc::clone(&handoff),
                Arc::clone(&shared),
                Arc::clone(&snapshot),
            );
            std::thread::spawn(move || {
                let affinity = Arc::new(crate::affinity::Affinity::new(16));
                Worker::new(
                    config(),
                    shared,
                    snapshot,
                    rx,
                    worker_wake,
                    handoff,
                    affinity,
                )
                .expect("worker")
                .run();
            })
        };
        // Idle from the start: it sleeps in poll(2) within microseconds.
        std::thread::sleep(Duration::from_millis(300));
        // Worker 1 hands it a frame without waking it (as one that paused right after).
        handoff
            .push(1, 0, 7, pipeline::Resume::Pod, &[0u8; 60])
            .expect("lane has room");
        let (paused_tx, paused_rx) = mpsc::sync_channel(1);
        let (state_tx, state_rx) = mpsc::sync_channel(1);
        commands
            .send(Command::Pause { reply: paused_tx })
            .expect("send");
        commands
            .send(Command::Handover { reply: state_tx })
            .expect("send");
        let one: u64 = 1;
        // SAFETY: an 8-byte write of a local u64 to our eventfd.
        unsafe {
            libc::write(
                wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        paused_rx
            .recv_timeout(deadline - Instant::now())
            .expect("paused");
        let state = state_rx
            .recv_timeout(deadline - Instant::now())
            .expect("handed over");
        thread.join().expect("worker thread");
        let (counters, _) = shared.read();
        assert_eq!(counters.handoff_in, 1, "the copy in the lane: {counters:?}");
        assert!(!handoff.pending(0), "the lane is empty");
        // No snapshot: it was dropped as such (counted), its frame back in the pool.
        let no_snapshot = counters
            .drops_by_reason()
            .into_iter()
            .find(|(r, _)| *r == DropReason::NoSnapshot)
            .map(|(_, n)| n);
        assert_eq!(no_snapshot, Some(1), "{counters:?}");
        assert_eq!(
            state.owner.iter().filter(|o| **o == OWNER_WORKER).count(),
            256
        );
    }
}
