//! Starting, commanding and stopping the workers; publishing snapshots to them.
//!
//! Control owns a [`Dataplane`]. It publishes a new [`Snapshot`] with [`Dataplane::publish`]
//! (one atomic pointer swap; workers pick it up at their next batch), adds and removes ports
//! with commands over bounded channels (each worker wakes through its eventfd), and reads
//! counters from the workers' published copies without stopping them.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use arc_swap::ArcSwapOption;

use crate::{
    handoff::Handoff,
    latency::LatencyHistograms,
    snapshot::Snapshot,
    stats::{Counters, SharedCounters},
    worker::{Command, PortInfo, PortKind, PortStatus, Worker, WorkerConfig},
    xsk::{RingSizes, UmemConfig},
    xsk::{UmemRegion, XskSocket},
};

const COMMAND_QUEUE_DEPTH: usize = 64;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    pub workers: usize,
    /// Core for each worker (`cores[i]` for worker i); `None`: not pinned.
    pub cores: Option<Vec<usize>>,
    pub umem: UmemConfig,
    pub rings: RingSizes,
    pub batch: u32,
    /// See [`WorkerConfig::idle_spin`].
    pub idle_spin: Duration,
    pub idle_poll_ms: i32,
    /// Conntrack entries per worker (a power of two).
    pub conntrack_capacity: usize,
    /// Session-affinity entries (one table shared by the workers).
    pub affinity_entries: usize,
    pub timeouts: crate::conntrack::Timeouts,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            cores: None,
            umem: UmemConfig::default(),
            rings: RingSizes::default(),
            batch: 64,
            idle_spin: Duration::from_micros(200),
            idle_poll_ms: 100,
            conntrack_capacity: 1 << 18,
            affinity_entries: 1 << 16,
            timeouts: crate::conntrack::Timeouts::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("dataplane needs at least one worker")]
    NoWorkers,
    #[error("{ring} ring size {size} must be a power of two in 16..=65536 (batch: 1..=rx)")]
    Rings { ring: &'static str, size: u32 },
    #[error("worker {worker}: {what}")]
    Worker { worker: usize, what: String },
    #[error("creating the wake-up eventfd for worker {worker}: {source}")]
    EventFd {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
}

struct WorkerHandle {
    id: usize,
    core: Option<usize>,
    commands: mpsc::SyncSender<Command>,
    wake: OwnedFd,
    shared: Arc<SharedCounters>,
    thread: Option<JoinHandle<()>>,
    hugepages: bool,
    /// The worker's UMEM, for binding new sockets on the control thread.
    umem: UmemRegion,
    /// The worker's sockets as control knows them: (ifindex, queue, fd). Any bound one lends
    /// its fd to `XDP_SHARED_UMEM`. Only control adds and removes ports, so an fd listed here
    /// stays open (the worker closes a socket only when told to remove it, after it left this
    /// list). Control-path only: the mutex is never touched per packet.
    ports: Mutex<Vec<(u32, u32, i32)>>,
}

impl WorkerHandle {
    fn send(&self, cmd: Command) -> Result<(), RuntimeError> {
        // Never block control on a stuck worker: a full queue is an error to report.
        self.commands
            .try_send(cmd)
            .map_err(|e| RuntimeError::Worker {
                worker: self.id,
                what: match e {
                    mpsc::TrySendError::Full(_) => {
                        "command queue full (worker not keeping up)".into()
                    }
                    mpsc::TrySendError::Disconnected(_) => "worker thread has exited".into(),
                },
            })?;
        self.wake();
        Ok(())
    }

    /// Wakes the worker if it sleeps in poll(2): it reads its commands next.
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our own eventfd from a local u64.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

/// A worker's published state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerReport {
    pub id: usize,
    pub core: Option<usize>,
    pub hugepages: bool,
    /// Generation of the snapshot the worker ran when it last published.
    pub generation: u64,
    /// UMEM frames in the worker's free list at its last publication (not in any ring, not in
    /// flight). With no ports, all `total_frames`; a lower figure then means a leak.
    pub free_frames: u64,
    /// UMEM frames the worker owns in all.
    pub total_frames: u64,
    pub counters: Counters,
    /// WireGuard traffic per peer slot (see [`crate::stats::WgPeerCounters`]).
    #[serde(skip)]
    pub wg_peers: crate::stats::WgPeerCounters,
}

/// A request to the binder thread: create and bind a socket on `umem`, sharing it through the
/// first of `shared` fds that works, else registering it.
struct BindRequest {
    umem: UmemRegion,
    ifindex: u32,
    queue: u32,
    rings: RingSizes,
    shared: Vec<i32>,
    reply: mpsc::SyncSender<Result<XskSocket, String>>,
}

/// The binder thread: AF_XDP sockets bind to an interface of their creator's network namespace,
/// so they are created by a thread started with the workers (same namespace as the caller of
/// [`Dataplane::start`]), never by a worker (the syscalls, mmaps and the rtnl lock in bind(2)
/// would stall its packets) and not by whichever thread calls `add_port`.
fn binder(requests: mpsc::Receiver<BindRequest>) {
    for r in requests {
        let mut last_err = None;
        let mut socket = None;
        for fd in &r.shared {
            // SAFETY: listed fds belong to sockets a worker keeps open (see WorkerHandle::ports);
            // the requester holds that list's lock until we answer.
            let shared = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            match XskSocket::new(&r.umem, r.ifindex, r.queue, r.rings, Some(shared)) {
                Ok(s) => {
                    socket = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let result = match socket {
            Some(s) => Ok(s),
            None => XskSocket::new(&r.umem, r.ifindex, r.queue, r.rings, None).map_err(|e| {
                match &last_err {
                    Some(shared) => format!("{e} (sharing the UMEM also failed: {shared})"),
                    None => e.to_string(),
                }
            }),
        };
        let _ = r.reply.send(result);
    }
}

/// What [`Dataplane::prepare`] allocated for [`Dataplane::adopt`].
pub struct Prepared {
    conntrack: Vec<crate::conntrack::Conntrack>,
    handoff: Arc<Handoff>,
    affinity: Arc<crate::affinity::Affinity>,
}

pub struct Dataplane {
    workers: Vec<WorkerHandle>,
    binder: mpsc::SyncSender<BindRequest>,
    frames_per_worker: u32,
    rings: RingSizes,
    snapshot: Arc<ArcSwapOption<Snapshot>>,
    /// Sockets handed over at a hot restart, until the agent claims them.
    adopted: Mutex<Vec<PortInfo>>,
    /// The workers' shared session-affinity table.
    affinity: Arc<crate::affinity::Affinity>,
    config: DataplaneConfig,
}

impl Dataplane {
    pub fn start(config: DataplaneConfig) -> Result<Self, RuntimeError> {
        Self::start_with(config, Vec::new(), None)
    }

    /// Starts workers that continue the previous agent's ([`Dataplane::handover`] there; one
    /// state per worker, in worker order, their fds received over the hot-restart socket).
    /// The adopted sockets are listed by [`Dataplane::take_adopted`] until the agent claims
    /// them for its interfaces.
    pub fn adopt(
        config: DataplaneConfig,
        states: Vec<crate::handover::WorkerState>,
        prepared: Option<Prepared>,
    ) -> Result<Self, RuntimeError> {
        if states.len() != config.workers {
            return Err(RuntimeError::Worker {
                worker: states.len(),
                what: format!(
                    "the running agent hands over {} workers, this one runs {}; a hot restart \
                     keeps the worker count",
                    states.len(),
                    config.workers
                ),
            });
        }
        Self::start_with(config, states, prepared)
    }

    /// Allocates what adopted workers need (conntrack tables, the handoff rings, the affinity
    /// table) before a hot restart stops the previous agent's workers: the time they are
    /// stopped is then spent on mapping and importing only.
    pub fn prepare(config: &DataplaneConfig) -> Result<Prepared, RuntimeError> {
        let mut conntrack = Vec::with_capacity(config.workers);
        for id in 0..config.workers {
            let wc = Self::worker_config(config, id, None);
            conntrack.push(crate::worker::new_conntrack(&wc).map_err(|e| {
                RuntimeError::Worker {
                    worker: id,
                    what: e.to_string(),
                }
            })?);
        }
        Ok(Prepared {
            conntrack,
            handoff: Arc::new(Handoff::new(config.workers)),
            affinity: Arc::new(crate::affinity::Affinity::new(config.affinity_entries)),
        })
    }

    fn worker_config(config: &DataplaneConfig, id: usize, core: Option<usize>) -> WorkerConfig {
        WorkerConfig {
            id,
            core,
            umem: config.umem,
            rings: config.rings,
            batch: config.batch,
            idle_spin: config.idle_spin,
            idle_poll_ms: config.idle_poll_ms,
            conntrack_capacity: config.conntrack_capacity,
            timeouts: config.timeouts,
            workers: config.workers,
        }
    }

    fn start_with(
        config: DataplaneConfig,
        states: Vec<crate::handover::WorkerState>,
        prepared: Option<Prepared>,
    ) -> Result<Self, RuntimeError> {
        let mut states: Vec<Option<crate::handover::WorkerState>> =
            states.into_iter().map(Some).collect();
        let (mut tables, handoff, affinity) = match prepared {
            Some(p) if p.conntrack.len() == config.workers => (
                p.conntrack.into_iter().map(Some).collect::<Vec<_>>(),
                p.handoff,
                p.affinity,
            ),
            _ => (
                Vec::new(),
                Arc::new(Handoff::new(config.workers)),
                Arc::new(crate::affinity::Affinity::new(config.affinity_entries)),
            ),
        };
        let mut adopted = Vec::new();
        if config.workers == 0 {
            return Err(RuntimeError::NoWorkers);
        }
        let r = config.rings;
        for (name, n) in [
            ("rx", r.rx),
            ("tx", r.tx),
            ("fill", r.fill),
            ("completion", r.completion),
        ] {
            if !n.is_power_of_two() || !(16..=65536).contains(&n) {
                return Err(RuntimeError::Rings {
                    ring: name,
                    size: n,
                });
            }
        }
        if config.batch == 0 || config.batch > r.rx {
            return Err(RuntimeError::Rings {
                ring: "batch",
                size: config.batch,
            });
        }
        let snapshot = Arc::new(ArcSwapOption::empty());
        let mut workers = Vec::with_capacity(config.workers);
        for id in 0..config.workers {
            let core = config.cores.as_ref().and_then(|c| c.get(id).copied());
            // SAFETY: plain eventfd(2); result checked.
            let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if raw < 0 {
                return Err(RuntimeError::EventFd {
                    worker: id,
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: raw is a fresh fd we own.
            let wake = unsafe { OwnedFd::from_raw_fd(raw) };
            let worker_wake = wake
                .try_clone()
                .map_err(|source| RuntimeError::EventFd { worker: id, source })?;
            let (tx, rx) = mpsc::sync_channel(COMMAND_QUEUE_DEPTH);
            let shared = Arc::new(SharedCounters::default());
            let wc = Self::worker_config(&config, id, core);
            let table = tables.get_mut(id).and_then(Option::take);
            let ho = Arc::clone(&handoff);
            let aff = Arc::clone(&affinity);
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let (s, snap) = (Arc::clone(&shared), Arc::clone(&snapshot));
            let state = states.get_mut(id).and_then(Option::take);
            let mut handed_ports = Vec::new();
            if let Some(st) = &state {
                if st.id != id {
                    return Err(RuntimeError::Worker {
                        worker: id,
                        what: format!("handed-over state is worker {}'s", st.id),
                    });
                }
                for p in &st.ports {
                    let info = PortInfo {
                        worker: id,
                        ifindex: p.socket.ifindex(),
                        queue: p.socket.queue(),
                        fd: p.socket.fd().as_raw_fd(),
                        mode: p.socket.mode(),
                    };
                    handed_ports.push((info.ifindex, info.queue, info.fd));
                    adopted.push(info);
                }
            }
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{id}"))
                .spawn(move || {
                    // The UMEM is allocated on the worker's own thread (after pinning would be
                    // better for NUMA; on one socket it makes no difference).
                    let worker = match state {
                        None => Worker::new(wc, s, snap, rx, worker_wake, ho, aff),
                        Some(st) => Worker::adopt(wc, st, table, s, snap, rx, worker_wake, ho, aff),
                    };
                    match worker {
                        Ok(w) => {
                            let _ = ready_tx.send(Ok((w.on_hugepages(), w.umem_region())));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                })
                .map_err(|e| RuntimeError::Worker {
                    worker: id,
                    what: format!("spawning thread: {e}"),
                })?;
            let (hugepages, umem) = match ready_rx.recv_timeout(COMMAND_TIMEOUT) {
                Ok(Ok(ready)) => ready,
                Ok(Err(what)) => return Err(RuntimeError::Worker { worker: id, what }),
                Err(_) => {
                    return Err(RuntimeError::Worker {
                        worker: id,
                        what: "did not start".into(),
                    })
                }
            };
            workers.push(WorkerHandle {
                id,
                core,
                commands: tx,
                wake,
                shared,
                thread: Some(thread),
                hugepages,
                umem,
                ports: Mutex::new(handed_ports),
            });
        }
        Ok(Self {
            workers,
            binder: {
                let (tx, rx) = mpsc::sync_channel(4);
                std::thread::Builder::new()
                    .name("sluice-xsk-binder".into())
                    .spawn(move || binder(rx))
                    .map_err(|e| RuntimeError::Worker {
                        worker: 0,
                        what: format!("spawning the socket binder: {e}"),
                    })?;
                tx
            },
            frames_per_worker: config.umem.frames,
            rings: config.rings,
            snapshot,
            adopted: Mutex::new(adopted),
            affinity,
            config,
        })
    }

    /// The session-affinity entries ([`crate::affinity::Affinity::export`] records) and how
    /// many, for a hot restart: call after [`Dataplane::handover`], with the workers stopped.
    pub fn export_affinity(&self) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let now = crate::latency::CycleClock::get().to_ns(crate::latency::cycles());
        let n = self.affinity.export(now, &mut out);
        (out, n)
    }

    /// Inserts the previous agent's session-affinity entries, `age` after their export (each
    /// keeps its time left minus that): call right after [`Dataplane::adopt`], before the first
    /// snapshot makes the workers forward.
    pub fn import_affinity(
        &self,
        records: &[u8],
        age: Duration,
    ) -> Result<usize, crate::affinity::AffinityImportError> {
        let now = crate::latency::CycleClock::get().to_ns(crate::latency::cycles());
        self.affinity.import(records, now, age.as_secs())
    }

    /// A socket handed over by the previous agent for (`ifindex`, `queue`), now this agent's
    /// (it is still registered in that interface's XSKMAP). `None` when there was none.
    pub fn take_adopted(&self, ifindex: u32, queue: u32) -> Option<PortInfo> {
        let mut a = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        let at = a
            .iter()
            .position(|p| (p.ifindex, p.queue) == (ifindex, queue))?;
        Some(a.swap_remove(at))
    }

    /// Handed-over sockets no interface of this agent claimed (their interface went away
    /// during the restart): removes them and returns how many.
    pub fn drop_unclaimed_adopted(&self) -> usize {
        let left = std::mem::take(&mut *self.adopted.lock().unwrap_or_else(|e| e.into_inner()));
        for p in &left {
            let _ = self.remove_port(p.ifindex, p.queue);
        }
        left.len()
    }

    /// Forgets the list of handed-over sockets (they are the caller's already: a hand-over
    /// that did not happen gave the same sockets back).
    pub fn clear_adopted(&self) {
        self.adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// A hot restart's first phase: every worker stops taking frames from its rx rings (it
    /// still empties its handoff lanes and sends what it queued), so that at
    /// [`Dataplane::handover`] no copy is left in a lane to a worker that already handed over.
    /// When a worker does not answer, the others are let go again and this is an error: the
    /// dataplane runs on as before.
    pub fn pause(&self) -> Result<(), RuntimeError> {
        let mut replies = Vec::with_capacity(self.workers.len());
        let mut failed = None;
        for w in &self.workers {
            let (tx, rx) = mpsc::sync_channel(1);
            match w.send(Command::Pause { reply: tx }) {
                Ok(()) => replies.push((w.id, rx)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for (id, rx) in &replies {
            if failed.is_none() && rx.recv_timeout(COMMAND_TIMEOUT).is_err() {
                failed = Some(RuntimeError::Worker {
                    worker: *id,
                    what: "did not answer Pause".into(),
                });
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                self.unpause();
                Err(e)
            }
        }
    }

    /// Lets paused workers take frames from their rx rings again (a hot restart that stopped
    /// between [`Dataplane::pause`] and the hand-over). Blocking: a slow worker's full command
    /// queue must not leave it paused for good.
    pub fn unpause(&self) {
        for w in &self.workers {
            if w.commands.send(Command::Unpause).is_ok() {
                w.wake();
            }
        }
    }

    /// Sets the kind of an adopted port (the previous agent's may not have said, or said
    /// otherwise): the worker recomputes its fill caps.
    pub fn set_port_kind(
        &self,
        ifindex: u32,
        queue: u32,
        kind: PortKind,
    ) -> Result<(), RuntimeError> {
        self.workers[self.worker_for_queue(queue)].send(Command::SetPortKind {
            ifindex,
            queue,
            kind,
        })
    }

    /// Hot restart, after [`Dataplane::pause`] (without it, a copy one worker hands another
    /// that has already handed over is lost): every worker empties its handoff lanes, stops
    /// between two batches and hands over its sockets, UMEM,
    /// frame owners and flows ([`crate::handover`]); the threads are joined. The sockets stay
    /// open (and registered in their XSKMAPs) inside the returned states.
    /// After it, this dataplane has no running worker: drop it, or replace it with
    /// [`Dataplane::adopt`] of the same states to run on (the next agent gave up).
    pub fn handover(&mut self) -> Result<Vec<crate::handover::WorkerState>, RuntimeError> {
        let mut replies = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let (tx, rx) = mpsc::sync_channel(1);
            w.send(Command::Handover { reply: tx })?;
            replies.push(rx);
        }
        let mut states = Vec::with_capacity(replies.len());
        for (w, rx) in self.workers.iter_mut().zip(replies) {
            let st = rx
                .recv_timeout(COMMAND_TIMEOUT)
                .map_err(|_| RuntimeError::Worker {
                    worker: w.id,
                    what: "did not answer Handover".into(),
                })?;
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
            states.push(st);
        }
        Ok(states)
    }

    /// What the dataplane was started with.
    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// The ring sizes every socket of this dataplane has.
    pub fn rings(&self) -> RingSizes {
        self.rings
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The worker that owns `queue` of every interface.
    pub fn worker_for_queue(&self, queue: u32) -> usize {
        queue as usize % self.workers.len()
    }

    /// Makes `snapshot` current; workers switch at their next batch.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Some(Arc::new(snapshot)));
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.load_full()
    }

    /// Creates the socket for (`ifindex`, `queue`) on the worker owning `queue`.
    ///
    /// The socket is created and bound here, on the caller's thread: socket(2), the ring
    /// setsockopts and mmaps, and bind(2) (which takes the rtnl lock) never stall a worker.
    /// The worker only takes it over and fills its fill ring.
    pub fn add_port(&self, ifindex: u32, queue: u32) -> Result<PortInfo, RuntimeError> {
        self.add_port_as(ifindex, queue, PortKind::Endpoint)
    }

    /// [`Dataplane::add_port`] for a port of the given kind: the uplink's fill ring is kept
    /// full from the start ([`PortKind::Uplink`]).
    pub fn add_port_as(
        &self,
        ifindex: u32,
        queue: u32,
        kind: PortKind,
    ) -> Result<PortInfo, RuntimeError> {
        let w = &self.workers[self.worker_for_queue(queue)];
        let mut ports = w.ports.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = mpsc::sync_channel(1);
        let request = BindRequest {
            umem: w.umem,
            ifindex,
            queue,
            rings: self.rings,
            shared: ports.iter().map(|(_, _, fd)| *fd).collect(),
            reply: tx,
        };
        self.binder
            .send(request)
            .map_err(|_| RuntimeError::Worker {
                worker: w.id,
                what: "the socket binder thread has exited".into(),
            })?;
        let socket = match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(Ok(s)) => s,
            Ok(Err(what)) => return Err(RuntimeError::Worker { worker: w.id, what }),
            Err(_) => {
                return Err(RuntimeError::Worker {
                    worker: w.id,
                    what: "socket binder did not answer".into(),
                })
            }
        };
        let fd = socket.fd().as_raw_fd();
        let (tx, rx) = mpsc::sync_channel(1);
        w.send(Command::AddPort {
            socket: Box::new(socket),
            kind,
            reply: tx,
        })?;
        match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(Ok(info)) => {
                ports.push((ifindex, queue, fd));
                Ok(info)
            }
            Ok(Err(what)) => Err(RuntimeError::Worker { worker: w.id, what }),
            Err(_) => Err(RuntimeError::Worker {
                worker: w.id,
                what: "did not answer AddPort".into(),
            }),
        }
    }

    /// Removes the socket for (`ifindex`, `queue`), reclaiming its frames. The caller must have
    /// removed the socket from the XSKMAP first. Returns whether such a port existed.
    pub fn remove_port(&self, ifindex: u32, queue: u32) -> Result<bool, RuntimeError> {
        let w = &self.workers[self.worker_for_queue(queue)];
        w.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, q, _)| (*i, *q) != (ifindex, queue));
        let (tx, rx) = mpsc::sync_channel(1);
        w.send(Command::RemovePort {
            ifindex,
            queue,
            reply: tx,
        })?;
        rx.recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| RuntimeError::Worker {
                worker: w.id,
                what: "did not answer RemovePort".into(),
            })
    }

    /// Every worker's published counters (no worker is stopped to read them).
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.workers
            .iter()
            .map(|w| {
                let (counters, generation) = w.shared.read();
                WorkerReport {
                    id: w.id,
                    core: w.core,
                    hugepages: w.hugepages,
                    generation,
                    free_frames: w.shared.free_frames(),
                    total_frames: u64::from(self.frames_per_worker),
                    counters,
                    wg_peers: w.shared.read_wg(),
                }
            })
            .collect()
    }

    /// Counters of all workers summed.
    pub fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for r in self.reports() {
            t.add(&r.counters);
        }
        t
    }

    /// Each worker's latency histograms, and all of them merged. Each worker adds its own into a
    /// buffer sent to it, between two batches: nothing stops, nothing on the worker allocates.
    pub fn histograms(&self) -> Result<(Vec<LatencyHistograms>, LatencyHistograms), RuntimeError> {
        let mut per_worker = Vec::with_capacity(self.workers.len());
        let mut merged = LatencyHistograms::new();
        for w in &self.workers {
            let (tx, rx) = mpsc::sync_channel(1);
            w.send(Command::Histograms {
                into: Box::new(LatencyHistograms::new()),
                reply: tx,
            })?;
            let h = rx
                .recv_timeout(COMMAND_TIMEOUT)
                .map_err(|_| RuntimeError::Worker {
                    worker: w.id,
                    what: "did not answer Histograms".into(),
                })?;
            merged.add(&h);
            per_worker.push(*h);
        }
        Ok((per_worker, merged))
    }

    /// Per-socket kernel statistics, asked of each worker between its batches.
    pub fn port_stats(&self) -> Result<Vec<PortStatus>, RuntimeError> {
        let mut out = Vec::new();
        for w in &self.workers {
            let (tx, rx) = mpsc::sync_channel(1);
            w.send(Command::PortStats { reply: tx })?;
            out.extend(
                rx.recv_timeout(COMMAND_TIMEOUT)
                    .map_err(|_| RuntimeError::Worker {
                        worker: w.id,
                        what: "did not answer PortStats".into(),
                    })?,
            );
        }
        Ok(out)
    }

    /// Stops every worker and joins its thread; sockets and UMEMs are released.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for w in &self.workers {
            // Blocking send: the worker drains its queue every iteration.
            let _ = w.commands.send(Command::Shutdown);
            w.wake();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}
