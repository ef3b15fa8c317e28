//! Hot restart, both sides (the protocol is `crate::handover`).
//!
//! - The next agent, started with the same `--state-dir` while one runs, calls [`take_over`]
//!   first: it receives the running agent's dataplane and applied state, and its `run` then
//!   builds the agent around them, publishing its first snapshot only once every handed-over
//!   interface is known again ([`super::Agent::hold_publish`]).
//! - The running agent serves `handover.sock` and answers with [`super::Agent::hand_over`].
use std::{
    collections::BTreeMap,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use dataplane::{handover::WorkerState, runtime::DataplaneConfig};
use xdp_redirect::Attachment;

use super::{Agent, Job};
use crate::{
    cluster::{self, ClusterState},
    handover::{self, Ack, Hello, Reply, State},
};

/// How long either side waits for the other's next message.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the next agent takes over.
pub(super) struct Takeover {
    pub stream: UnixStream,
    pub generation: u64,
    pub cluster: ClusterState,
    pub workers: Vec<WorkerState>,
    /// By interface name.
    pub attachments: BTreeMap<String, Attachment>,
    /// The WireGuard socket and sessions.
    pub wireguard: Option<(std::net::UdpSocket, crate::wg_runtime::WgHandover)>,
    /// The running agent's pid (from the socket's peer credentials).
    pub from_pid: i32,
    /// When its state arrived: its workers are stopped from shortly before until this agent
    /// publishes its first snapshot.
    pub received: std::time::Instant,
    /// Tables allocated before asking (not while the previous agent's workers are stopped).
    pub prepared: Option<dataplane::runtime::Prepared>,
    /// Session-affinity records, for [`dataplane::runtime::Dataplane::import_affinity`].
    pub affinity: Vec<u8>,
}

impl Takeover {
    /// Tells the old agent how it went: `Ok` lets it exit, `Err` makes it take its state back.
    pub fn finish(&self, result: Result<(), String>) {
        let ack = match result {
            Ok(()) => Ack::Running,
            Err(error) => Ack::Failed { error },
        };
        if let Err(e) = handover::send_json(&self.stream, &ack, &[]) {
            tracing::warn!(error = %e, "could not tell the previous agent the outcome");
        }
    }
}

/// The peer's pid and uid (`SO_PEERCRED`); zeros when the kernel does not say.
fn peer(stream: &UnixStream) -> (i32, u32) {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size passed.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r == 0 {
        (cred.pid, cred.uid)
    } else {
        (0, u32::MAX)
    }
}

/// The next agent's side: when an agent serves `<state-dir>/handover.sock`, asks it for its
/// dataplane. `None` when no agent runs (nothing listens: a cold start). An agent that refuses
/// (another worker count, the host firewall on) keeps running, and this is an error with its
/// reason.
pub(super) fn take_over(
    state_dir: &Path,
    node: &str,
    dp: &DataplaneConfig,
) -> anyhow::Result<Option<Takeover>> {
    let path = state_dir.join(handover::SOCKET_NAME);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    stream.set_read_timeout(Some(PEER_TIMEOUT))?;
    stream.set_write_timeout(Some(PEER_TIMEOUT))?;
    let (from_pid, _) = peer(&stream);
    tracing::info!(socket = %path.display(), pid = from_pid, "an agent is running: asking it to hand over (hot restart)");
    let prepared = dataplane::runtime::Dataplane::prepare(dp)
        .context("hot restart: allocating the workers' tables")?;
    let hello = Hello {
        version: handover::PROTOCOL_VERSION,
        pid: std::process::id(),
        node: node.to_owned(),
        workers: dp.workers,
        frames: dp.umem.frames,
        frame_size: dp.umem.frame_size,
        rings: [dp.rings.rx, dp.rings.tx, dp.rings.fill, dp.rings.completion],
    };
    handover::send_json(&stream, &hello, &[]).context("hot restart: sending hello")?;
    let (reply, fds): (Reply, Vec<OwnedFd>) =
        handover::recv_json(&stream).context("hot restart: waiting for the running agent")?;
    let state = match reply {
        Reply::Refused { reason } => bail!(
            "the running agent (pid {from_pid}) refused a hot restart: {reason}; stop it first \
             for a cold restart"
        ),
        Reply::State(s) => *s,
    };
    let received = std::time::Instant::now();
    let mut flows = Vec::with_capacity(state.workers.len());
    for w in &state.workers {
        let (bytes, _) = handover::recv(&stream)
            .with_context(|| format!("hot restart: flows of worker {}", w.id))?;
        flows.push(bytes);
    }
    let affinity = if state.affinity_entries > 0 {
        handover::recv(&stream)
            .context("hot restart: session-affinity entries")?
            .0
    } else {
        Vec::new()
    };
    let t = Takeover {
        stream,
        generation: state.generation,
        cluster: ClusterState::default(),
        workers: Vec::new(),
        attachments: BTreeMap::new(),
        wireguard: None,
        from_pid,
        received,
        prepared: Some(prepared),
        affinity,
    };
    match adopt(state, fds, flows, dp) {
        Ok((cluster, workers, attachments, wireguard)) => Ok(Some(Takeover {
            cluster,
            workers,
            attachments,
            wireguard,
            ..t
        })),
        Err(e) => {
            t.finish(Err(format!("{e:#}")));
            Err(e)
        }
    }
}

type Adopted = (
    ClusterState,
    Vec<WorkerState>,
    BTreeMap<String, Attachment>,
    Option<(std::net::UdpSocket, crate::wg_runtime::WgHandover)>,
);

fn adopt(
    state: State,
    fds: Vec<OwnedFd>,
    flows: Vec<Vec<u8>>,
    dp: &DataplaneConfig,
) -> anyhow::Result<Adopted> {
    if fds.len() != state.fd_count() {
        bail!(
            "hot restart: {} file descriptors received, the state lists {}",
            fds.len(),
            state.fd_count()
        );
    }
    let cluster = cluster::parse_str(&state.cluster_yaml, "the running agent's state")
        .context("hot restart: the handed-over cluster state")?;
    let mut fds = fds.into_iter();
    let mut workers = Vec::with_capacity(state.workers.len());
    for (meta, flows) in state.workers.into_iter().zip(flows) {
        let n = meta.ports.len() + 1;
        let mine: Vec<OwnedFd> = fds.by_ref().take(n).collect();
        workers.push(
            WorkerState::from_meta(meta, mine, flows, dp.umem, dp.rings)
                .context("hot restart: taking over a worker")?,
        );
    }
    let mut attachments = BTreeMap::new();
    let wires = state
        .uplink
        .into_iter()
        .chain(state.endpoints.into_iter().map(|(_, a)| a));
    for wire in wires {
        let mine: Vec<OwnedFd> = fds.by_ref().take(wire.fd_count()).collect();
        let ifname = wire.ifname.clone();
        let a = Attachment::adopt(wire.into(), mine)
            .with_context(|| format!("hot restart: taking over the XDP program on {ifname}"))?;
        attachments.insert(ifname, a);
    }
    let wireguard = match state.wireguard {
        Some(w) => {
            let fd = fds
                .next()
                .context("hot restart: the WireGuard socket's fd is missing")?;
            Some((std::net::UdpSocket::from(fd), w))
        }
        None => None,
    };
    Ok((cluster, workers, attachments, wireguard))
}

/// Serves `<state-dir>/handover.sock`: each connection becomes a [`Job::Handover`].
pub(super) fn serve(state_dir: &Path, to_control: mpsc::SyncSender<Job>) -> anyhow::Result<()> {
    let path = state_dir.join(handover::SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the hot-restart socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("sluice-handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let _ = stream.set_read_timeout(Some(PEER_TIMEOUT));
                let _ = stream.set_write_timeout(Some(PEER_TIMEOUT));
                if to_control.send(Job::Handover(stream)).is_err() {
                    return;
                }
            }
        })
        .context("starting the hot-restart thread")?;
    Ok(())
}

/// What the control loop does after a hand-over request.
pub(super) enum Outcome {
    /// Nothing changed (refused, or the next agent gave up and this one took its state back).
    RunOn,
    /// The next agent runs the dataplane: exit without detaching or removing anything.
    Exit,
}

impl Agent {
    /// Why this agent cannot hand over to an agent that said `hello`, if it cannot.
    fn refusal(&self, hello: &Hello) -> Option<String> {
        let c = self.dp.config();
        let ours = [c.rings.rx, c.rings.tx, c.rings.fill, c.rings.completion];
        if hello.version != handover::PROTOCOL_VERSION {
            return Some(format!(
                "hot-restart protocol {} (this agent speaks {})",
                hello.version,
                handover::PROTOCOL_VERSION
            ));
        }
        if hello.node != self.node.name {
            return Some(format!(
                "this agent runs node {:?}, the new one asks for {:?}",
                self.node.name, hello.node
            ));
        }
        if hello.workers != c.workers {
            return Some(format!(
                "--workers {} here, {} in the new agent: flows are steered by worker count",
                c.workers, hello.workers
            ));
        }
        if (hello.frames, hello.frame_size) != (c.umem.frames, c.umem.frame_size) {
            return Some(format!(
                "UMEM of {} x {} B here, {} x {} B in the new agent (--frames-per-worker)",
                c.umem.frames, c.umem.frame_size, hello.frames, hello.frame_size
            ));
        }
        if hello.rings != ours {
            return Some(format!(
                "ring sizes {ours:?} here, {:?} in the new agent",
                hello.rings
            ));
        }
        None
    }

    /// The running agent's side of a hot restart (see `crate::handover`).
    pub(super) fn hand_over(
        &mut self,
        stream: UnixStream,
        api_socket: &Path,
        rebind_api: &dyn Fn() -> anyhow::Result<()>,
    ) -> Outcome {
        let hello: Hello = match handover::recv_json(&stream) {
            Ok((h, _)) => h,
            Err(e) => {
                tracing::warn!(error = %e, "hot-restart request unreadable; ignored");
                return Outcome::RunOn;
            }
        };
        let refuse = |reason: String| {
            tracing::warn!(pid = hello.pid, %reason, "hot restart refused");
            let _ = handover::send_json(&stream, &Reply::Refused { reason }, &[]);
            Outcome::RunOn
        };
        // The dataplane goes only to a process of our own user (the socket's mode already
        // keeps others out; this holds when the state directory is shared).
        let (_, uid) = peer(&stream);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid != me {
            return refuse(format!("the new agent runs as uid {uid}, this one as {me}"));
        }
        if let Some(reason) = self.refusal(&hello) {
            return refuse(reason);
        }
        let cluster_yaml = match super::checkpoint_state(&self.cluster).to_yaml() {
            Ok(y) => y,
            Err(e) => return refuse(format!("the applied state does not serialise: {e}")),
        };
        // Everything that can fail before the workers stop is checked first.
        let mut attachment_fds: Vec<BorrowedFd<'_>> = Vec::new();
        let mut uplink = None;
        let mut endpoints = Vec::new();
        if let Some(u) = &self.uplink {
            match u.attachment.handover() {
                Ok((meta, fds)) => {
                    uplink = Some(handover::AttachmentWire::from(&meta));
                    attachment_fds.extend(fds);
                }
                Err(e) => return refuse(e.to_string()),
            }
        }
        for (id, a) in &self.endpoints {
            match a.attachment.handover() {
                Ok((meta, fds)) => {
                    endpoints.push((id.clone(), handover::AttachmentWire::from(&meta)));
                    attachment_fds.extend(fds);
                }
                Err(e) => return refuse(e.to_string()),
            }
        }
        // Dup them: the workers' states are taken below while these stay borrowed from self.
        let attachment_fds: Vec<OwnedFd> = match attachment_fds
            .iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<Result<_, _>>()
        {
            Ok(v) => v,
            Err(e) => return refuse(format!("duplicating the XDP fds: {e}")),
        };
        tracing::info!(
            pid = hello.pid,
            "handing the dataplane over to the next agent (hot restart)"
        );
        // The next agent binds the local API once it runs.
        let _ = std::fs::remove_file(api_socket);
        let started = std::time::Instant::now();
        if let Err(e) = self.dp.pause() {
            tracing::error!(error = %e, "workers did not pause for the hand-over; running on");
            if let Err(e) = rebind_api() {
                tracing::error!(error = %format!("{e:#}"), "local API not served again");
            }
            return refuse(format!("the workers did not pause: {e}"));
        }
        let states = match self.dp.handover() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "workers did not stop for the hand-over; restarting them");
                // Those that did not stop run on if the restart fails.
                self.dp.unpause();
                let (affinity, _) = self.dp.export_affinity();
                self.resume(
                    Vec::new(),
                    None,
                    (&affinity, std::time::Instant::now()),
                    rebind_api,
                );
                return refuse(format!("the workers did not stop: {e}"));
            }
        };
        // With the workers stopped, the sessions' counters and replay windows stand still,
        // and no affinity entry changes.
        let wg = self.wg.as_mut().and_then(|w| w.hand_over());
        let (affinity, affinity_entries) = self.dp.export_affinity();
        let exported = std::time::Instant::now();
        let rings = self.dp.config().rings;
        let mut workers = Vec::with_capacity(states.len());
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        for s in &states {
            let (meta, f) = s.meta(rings);
            workers.push(meta);
            fds.extend(f);
        }
        fds.extend(attachment_fds.iter().map(|f| {
            use std::os::fd::AsFd;
            f.as_fd()
        }));
        if let Some((socket, _)) = &wg {
            use std::os::fd::AsFd;
            fds.push(socket.as_fd());
        }
        let state = State {
            generation: self.generation,
            cluster_yaml,
            workers,
            uplink,
            endpoints,
            wireguard: wg.as_ref().map(|(_, w)| w.clone()),
            affinity_entries,
        };
        let sent = handover::send_json(&stream, &Reply::State(Box::new(state)), &fds)
            .and_then(|()| {
                states
                    .iter()
                    .try_for_each(|s| handover::send(&stream, &s.flows, &[]))
            })
            .and_then(|()| {
                if affinity_entries > 0 {
                    handover::send(&stream, &affinity, &[])
                } else {
                    Ok(())
                }
            });
        drop(fds);
        let flows: usize = states.iter().map(|s| s.flow_count).sum();
        let ack = sent.and_then(|()| handover::recv_json::<Ack>(&stream).map(|(a, _)| a));
        match ack {
            Ok(Ack::Running) => {
                tracing::info!(
                    pid = hello.pid,
                    flows,
                    affinity_entries,
                    workers_stopped_ms = started.elapsed().as_secs_f64() * 1e3,
                    "the next agent runs the dataplane; exiting without detaching"
                );
                Outcome::Exit
            }
            Ok(Ack::Failed { error }) => {
                tracing::error!(pid = hello.pid, %error, "the next agent gave up; taking the dataplane back");
                self.resume(states, wg, (&affinity, exported), rebind_api);
                Outcome::RunOn
            }
            Err(e) => {
                tracing::error!(pid = hello.pid, error = %e, "the next agent went away during the hand-over; taking the dataplane back");
                self.resume(states, wg, (&affinity, exported), rebind_api);
                Outcome::RunOn
            }
        }
    }

    /// Runs on after a hand-over that did not happen: new workers continue the handed states
    /// (ours again) with the affinity entries exported for it (aged by the time since), the
    /// snapshot is published to them, and the API socket is bound again.
    fn resume(
        &mut self,
        states: Vec<WorkerState>,
        wg: Option<(std::net::UdpSocket, crate::wg_runtime::WgHandover)>,
        (affinity, exported): (&[u8], std::time::Instant),
        rebind_api: &dyn Fn() -> anyhow::Result<()>,
    ) {
        if let Some((socket, state)) = wg {
            let restarted = crate::wg::keys::load_or_create(&self.opts.state_dir)
                .map_err(anyhow::Error::from)
                .and_then(|key| {
                    crate::wg_runtime::WgRuntime::adopt(
                        &key,
                        crate::wg::timers::Timers::default(),
                        socket,
                        state,
                    )
                });
            match restarted {
                Ok(rt) => {
                    self.wg = Some(rt);
                    self.update_wireguard_peers();
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "WireGuard not restarted"),
            }
        }
        let config = self.dp.config().clone();
        let restarted = if states.is_empty() {
            dataplane::runtime::Dataplane::start(config)
        } else {
            dataplane::runtime::Dataplane::adopt(config, states, None)
        };
        match restarted {
            Ok(dp) => {
                self.dp = dp;
                if let Err(e) = self.dp.import_affinity(affinity, exported.elapsed()) {
                    tracing::error!(error = %e, "session-affinity entries not taken back");
                }
                // Our own sockets are registered already: claim them back.
                self.dp.clear_adopted();
                self.publish();
            }
            Err(e) => tracing::error!(error = %e, "could not restart the workers"),
        }
        if let Err(e) = rebind_api() {
            tracing::error!(error = %format!("{e:#}"), "local API not served again");
        }
    }
}
