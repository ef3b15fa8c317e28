//! The agent's WireGuard slow path: one thread owns the handshake engine
//! ([`crate::wg::device::Device`]) and the node's UDP socket on the WireGuard port. The uplink's
//! XDP program passes handshake messages (types 1, 2, 3) to the kernel, so they arrive on this
//! socket; transport messages (type 4) go to the workers, which seal and open them with the
//! sessions this thread publishes.
//!
//! ```text
//!  UDP socket (node IP:51871) <-> Device (Noise IKpsk2, cookies, timers) --sessions--> WgState
//!        ^ handshakes only                                                    | generation
//!        | (XDP passes types 1-3)                           control loop: publish snapshot
//!  workers: seal with peer's send session, open by receiver index (dataplane::wireguard)
//! ```
//!
//! The workers' use of a session is read back from the session itself (sent: counters taken;
//! received: highest counter accepted) every loop, and reported to the device as
//! `transport_sent` / `transport_received` / `session_confirmed`, which drive rekeying,
//! keepalives and key confirmation exactly as wireguard-go's timers. Keepalives are sealed here
//! with the peer's current session (its counter is shared with the workers, so nonces stay
//! unique) and sent from the socket.
//!
//! Sessions are kept ahead of traffic: every peer gets a handshake as soon as it is known and
//! after any session loss, so the workers seldom see a peer without a session (then: clear
//! text, or a counted drop in strict mode).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use dataplane::wireguard::{
    self as dwg, CounterBlock, PeerId, Session as DpSession, SessionKeys, SessionTable,
};

use crate::wg::{
    device::{Action, Device, PeerConfig},
    keys::{NodePeer, PrivateKey, PublicKey},
    timers::Timers,
};

/// How long the thread waits on its socket before running timers and reading the workers'
/// session use again.
const LOOP_WAIT: Duration = Duration::from_millis(20);
/// Handshake messages per second above which the device answers initiations with cookie replies
/// (MAC2 required) until a second passes below it. wireguard-go switches when its handshake
/// queue holds 1/8 of 4096 messages; this thread has no queue, so it counts its own rate.
const UNDER_LOAD_PER_SECOND: u32 = 512;
/// After a rekey we initiated, the workers keep sealing with the current session this long
/// before switching to the new one: the peer's workers learn of a session from a snapshot its
/// control loop publishes after the handshake (up to a loop tick and a publish later), and a
/// message on a session they do not know yet is dropped (`wg_unknown_session`). wireguard-go
/// switches at once; it installs the receiving key in the same process step.
const SWITCH_GRACE: Duration = Duration::from_millis(50);

/// One peer as the agent shows it and the workers need it.
#[derive(Clone, Debug)]
pub struct PeerState {
    pub node: String,
    /// The peer node's address: the VXLAN outer destination whose packets are sealed for it,
    /// and the only outer source accepted inside its transport messages.
    pub node_ip: Ipv4Addr,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    pub id: PeerId,
    /// The session the workers seal with (None: no confirmed session yet).
    pub send: Option<Arc<DpSession>>,
    pub latest_handshake_ns: Option<u64>,
    /// Messages sealed and opened on this peer's sessions (from their counters).
    pub tx_messages: u64,
    pub rx_messages: u64,
}

/// What the workers read: published in the snapshot whenever `generation` moves.
#[derive(Clone, Debug, Default)]
pub struct WgState {
    pub generation: u64,
    pub peers: Vec<PeerState>,
    /// Every live session, by our receiver index (current, previous and unconfirmed next ones).
    pub table: SessionTable,
}

struct Shared {
    state: WgState,
    handshakes_completed: u64,
    initiations_sent: u64,
    failures: u64,
}

/// Handle on the slow-path thread.
pub struct WgRuntime {
    shared: Arc<Mutex<Shared>>,
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    peers_tx: mpsc::SyncSender<Vec<NodePeer>>,
    /// Gives its state back when it stops (a hot restart hands it over).
    thread: Option<JoinHandle<Loop>>,
    public_key: PublicKey,
    port: u16,
}

/// One session as a hot restart carries it to the next agent: its keys, how far its send
/// counter went and its replay window (read while the workers are stopped).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionHandover {
    pub peer: [u8; 32],
    pub receiver_index: u32,
    pub peer_index: u32,
    pub send_key: [u8; 32],
    pub recv_key: [u8; 32],
    pub created_ns: u64,
    pub initiator: bool,
    pub peer_id: PeerId,
    pub sendable: bool,
    pub counters_taken: u64,
    pub replay_words: Vec<u64>,
    pub replay_max: u64,
}

impl std::fmt::Debug for SessionHandover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandover")
            .field("receiver_index", &self.receiver_index)
            .field("peer_id", &self.peer_id)
            .field("counters_taken", &self.counters_taken)
            .finish_non_exhaustive()
    }
}

/// A peer as a hot restart carries it (its id and which session it sends with).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerHandover {
    pub node: String,
    pub public_key: [u8; 32],
    pub endpoint: SocketAddrV4,
    pub allowed_source: Ipv4Addr,
    pub id: PeerId,
    pub send: Option<u32>,
}

/// The WireGuard slow path's state at a hot restart; its UDP socket travels as an fd.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WgHandover {
    pub public_key: [u8; 32],
    pub port: u16,
    pub sessions: Vec<SessionHandover>,
    pub peers: Vec<PeerHandover>,
    pub next_peer_id: PeerId,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl WgRuntime {
    /// Binds `node_ip:port` and starts the thread with `private`'s identity.
    pub fn start(
        private: &PrivateKey,
        node_ip: Ipv4Addr,
        port: u16,
        timers: Timers,
    ) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(SocketAddrV4::new(node_ip, port)).with_context(|| {
            format!("binding the WireGuard socket {node_ip}:{port} (is another WireGuard on it?)")
        })?;
        Self::run_on(private, port, timers, socket, None)
    }

    /// Continues a previous agent's slow path (hot restart): its socket, its sessions (the
    /// workers keep sealing and opening with them), its peers. A fresh handshake with every
    /// peer starts at once, since the handshake engine's own state (timers, keypairs) does not
    /// travel; the handed-over sessions are used until the new ones replace them and dropped
    /// when they expire.
    pub fn adopt(
        private: &PrivateKey,
        timers: Timers,
        socket: UdpSocket,
        state: WgHandover,
    ) -> anyhow::Result<Self> {
        let public = private.public_key();
        if public.0 != state.public_key {
            anyhow::bail!(
                "the WireGuard key in the state directory ({}) is not the running agent's ({})",
                public.to_base64(),
                PublicKey(state.public_key).to_base64()
            );
        }
        let port = state.port;
        Self::run_on(private, port, timers, socket, Some(state))
    }

    fn run_on(
        private: &PrivateKey,
        port: u16,
        timers: Timers,
        socket: UdpSocket,
        handed: Option<WgHandover>,
    ) -> anyhow::Result<Self> {
        socket
            .set_read_timeout(Some(LOOP_WAIT))
            .context("setting the WireGuard socket's read timeout")?;
        let device = Device::new(private, timers, monotonic_ns(), unix_ns());
        let public_key = device.public_key();
        let shared = Arc::new(Mutex::new(Shared {
            state: WgState::default(),
            handshakes_completed: 0,
            initiations_sent: 0,
            failures: 0,
        }));
        let generation = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peers_tx, peers_rx) = mpsc::sync_channel(4);
        let mut worker = Loop {
            device,
            socket,
            shared: Arc::clone(&shared),
            generation: Arc::clone(&generation),
            stop: Arc::clone(&stop),
            peers_rx,
            peers: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_peer_id: 1,
            keepalive_block: CounterBlock::default(),
            dirty: false,
            load_count: 0,
            load_window_ns: 0,
            under_load: false,
            rekey_adopted: std::collections::BTreeSet::new(),
            peers_configured: false,
        };
        if let Some(h) = handed {
            worker.take_handed(h)?;
            // The first snapshot of the next agent must already hold the sessions.
            worker.publish();
        }
        let thread = std::thread::Builder::new()
            .name("sluice-wireguard".into())
            .spawn(move || {
                worker.run();
                worker
            })
            .context("starting the WireGuard thread")?;
        Ok(Self {
            shared,
            generation,
            stop,
            peers_tx,
            thread: Some(thread),
            public_key,
            port,
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replaces the peer set (from the Nodes of the cluster).
    pub fn set_peers(&self, peers: Vec<NodePeer>) {
        let _ = self.peers_tx.try_send(peers);
    }

    /// Moves whenever the sessions the workers need changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current state (cloned; control path only).
    pub fn state(&self) -> WgState {
        self.shared
            .lock()
            .map(|s| s.state.clone())
            .unwrap_or_default()
    }

    /// (handshakes completed, initiations sent, refused handshake messages).
    pub fn counters(&self) -> (u64, u64, u64) {
        self.shared.lock().map_or((0, 0, 0), |s| {
            (s.handshakes_completed, s.initiations_sent, s.failures)
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Hot restart: stops the thread and returns its socket and state (call it while the
    /// workers are stopped, so the replay windows and counters stand still). `None` if the
    /// thread is gone.
    pub fn hand_over(&mut self) -> Option<(UdpSocket, WgHandover)> {
        self.stop.store(true, Ordering::Relaxed);
        let lp = self.thread.take()?.join().ok()?;
        let state = lp.handover(self.public_key, self.port);
        Some((lp.socket, state))
    }
}

impl Drop for WgRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A session and what the loop last saw of its use.
struct Tracked {
    peer: PublicKey,
    /// What made the session (kept for a hot restart: the AEAD keys cannot be read back).
    keys: SessionKeys,
    /// Handed over by the previous agent: the handshake engine does not know it; it is used
    /// until it expires, while a fresh handshake replaces it.
    adopted: bool,
    session: Arc<DpSession>,
    /// Installed for sending (an initiator's at once, a responder's once confirmed).
    sendable: bool,
    seen_taken: u64,
    seen_received: u64,
    received_any: bool,
}

struct PeerEntry {
    node: NodePeer,
    id: PeerId,
    /// Receiver index of the session used for sending.
    send: Option<u32>,
    /// A newer session we initiated, and when the workers switch to it (see
    /// [`SWITCH_GRACE`]).
    switch: Option<(u32, u64)>,
}

struct Loop {
    device: Device,
    socket: UdpSocket,
    shared: Arc<Mutex<Shared>>,
    generation: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    peers_rx: mpsc::Receiver<Vec<NodePeer>>,
    peers: BTreeMap<PublicKey, PeerEntry>,
    sessions: BTreeMap<u32, Tracked>,
    next_peer_id: PeerId,
    keepalive_block: CounterBlock,
    dirty: bool,
    /// Handshake datagrams in the current one-second window, and its start.
    load_count: u32,
    load_window_ns: u64,
    under_load: bool,
    /// Handed-over peers still to get a fresh handshake (once the device knows them).
    rekey_adopted: std::collections::BTreeSet<PublicKey>,
    /// `set_peers` ran at least once (the device knows the peers).
    peers_configured: bool,
}

impl Loop {
    /// Installs a previous agent's sessions and peers (hot restart).
    fn take_handed(&mut self, h: WgHandover) -> anyhow::Result<()> {
        for p in h.peers {
            let key = PublicKey(p.public_key);
            self.rekey_adopted.insert(key);
            self.peers.insert(
                key,
                PeerEntry {
                    switch: None,
                    node: NodePeer {
                        node: p.node,
                        public_key: key,
                        endpoint: p.endpoint,
                        allowed_source: p.allowed_source,
                    },
                    id: p.id,
                    send: p.send,
                },
            );
        }
        self.next_peer_id = h.next_peer_id.max(self.next_peer_id);
        for t in h.sessions {
            let keys = SessionKeys {
                receiver_index: t.receiver_index,
                peer_index: t.peer_index,
                send_key: t.send_key,
                recv_key: t.recv_key,
                created_ns: t.created_ns,
                initiator: t.initiator,
                peer: t.peer_id,
            };
            let session =
                DpSession::restored(&keys, t.counters_taken, &t.replay_words, t.replay_max)
                    .context("a handed-over WireGuard session")?;
            let received_any = session.received_any();
            self.sessions.insert(
                t.receiver_index,
                Tracked {
                    peer: PublicKey(t.peer),
                    keys,
                    adopted: true,
                    seen_taken: t.counters_taken,
                    seen_received: t.replay_max,
                    received_any,
                    sendable: t.sendable,
                    session: Arc::new(session),
                },
            );
        }
        self.dirty = true;
        Ok(())
    }

    /// This loop's state for the next agent.
    fn handover(&self, public_key: PublicKey, port: u16) -> WgHandover {
        let sessions = self
            .sessions
            .values()
            .map(|t| {
                let (replay_words, replay_max) = t.session.replay_snapshot();
                SessionHandover {
                    peer: t.peer.0,
                    receiver_index: t.keys.receiver_index,
                    peer_index: t.keys.peer_index,
                    send_key: t.keys.send_key,
                    recv_key: t.keys.recv_key,
                    created_ns: t.keys.created_ns,
                    initiator: t.keys.initiator,
                    peer_id: t.keys.peer,
                    sendable: t.sendable,
                    counters_taken: t.session.counters_taken(),
                    replay_words,
                    replay_max,
                }
            })
            .collect();
        let peers = self
            .peers
            .iter()
            .map(|(k, e)| PeerHandover {
                node: e.node.node.clone(),
                public_key: k.0,
                endpoint: e.node.endpoint,
                allowed_source: e.node.allowed_source,
                id: e.id,
                send: e.send,
            })
            .collect();
        WgHandover {
            public_key: public_key.0,
            port,
            sessions,
            peers,
            next_peer_id: self.next_peer_id,
        }
    }

    /// Handed-over sessions: a fresh handshake for their peers once the device knows them,
    /// and away when they expire.
    fn tend_adopted(&mut self, now: u64) {
        if self.peers_configured && !self.rekey_adopted.is_empty() {
            for k in std::mem::take(&mut self.rekey_adopted) {
                if self.peers.contains_key(&k) {
                    let actions = self.device.want_session(&k, now);
                    self.apply(actions, now);
                }
            }
        }
        let expired: Vec<(u32, PublicKey)> = self
            .sessions
            .iter()
            .filter(|(_, t)| t.adopted && t.session.expired(now))
            .map(|(i, t)| (*i, t.peer))
            .collect();
        for (idx, peer) in expired {
            self.sessions.remove(&idx);
            if let Some(e) = self.peers.get_mut(&peer) {
                if e.send == Some(idx) {
                    e.send = e.switch.take().map(|(i, _)| i);
                }
            }
            self.dirty = true;
        }
    }

    /// Counts one handshake datagram and switches the device's cookie mode per second.
    fn note_load(&mut self, now: u64) {
        if now.saturating_sub(self.load_window_ns) >= 1_000_000_000 {
            let busy = self.load_count >= UNDER_LOAD_PER_SECOND;
            if busy != self.under_load {
                self.under_load = busy;
                self.device.set_under_load(busy);
                tracing::info!(
                    under_load = busy,
                    rate = self.load_count,
                    "WireGuard handshake load"
                );
            }
            self.load_count = 0;
            self.load_window_ns = now;
        }
        self.load_count += 1;
        if self.load_count >= UNDER_LOAD_PER_SECOND && !self.under_load {
            self.under_load = true;
            self.device.set_under_load(true);
            tracing::info!(under_load = true, "WireGuard handshake load");
        }
    }

    fn run(&mut self) {
        let mut buf = vec![0u8; 2048];
        while !self.stop.load(Ordering::Relaxed) {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let now = monotonic_ns();
                    self.note_load(now);
                    let actions = self.device.handle_datagram(from, &buf[..n], now);
                    self.apply(actions, now);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => {
                    tracing::warn!(error = %e, "WireGuard socket receive failed");
                    std::thread::sleep(LOOP_WAIT);
                }
            }
            let now = monotonic_ns();
            while let Ok(peers) = self.peers_rx.try_recv() {
                self.set_peers(peers, now);
            }
            self.read_session_use(now);
            self.tend_adopted(now);
            for e in self.peers.values_mut() {
                if let Some((idx, at)) = e.switch {
                    if now >= at {
                        e.send = Some(idx);
                        e.switch = None;
                        self.dirty = true;
                    }
                }
            }
            let actions = self.device.tick(now);
            self.apply(actions, now);
            // Keep a session with every peer ahead of traffic.
            let without: Vec<PublicKey> = self
                .peers
                .iter()
                .filter(|(_, p)| p.send.is_none())
                .map(|(k, _)| *k)
                .collect();
            for k in without {
                let actions = self.device.want_session(&k, now);
                self.apply(actions, now);
            }
            if self.dirty {
                self.publish();
            }
        }
    }

    fn set_peers(&mut self, peers: Vec<NodePeer>, now: u64) {
        let configs: Vec<PeerConfig> = peers
            .iter()
            .map(|p| PeerConfig {
                public_key: p.public_key,
                endpoint: SocketAddr::V4(p.endpoint),
            })
            .collect();
        let actions = self.device.set_peers(&configs);
        let mut next = BTreeMap::new();
        for p in peers {
            let (id, send) = match self.peers.remove(&p.public_key) {
                Some(old) => (old.id, old.send),
                None => {
                    let id = self.next_peer_id;
                    self.next_peer_id += 1;
                    (id, None)
                }
            };
            next.insert(
                p.public_key,
                PeerEntry {
                    node: p,
                    id,
                    send,
                    switch: None,
                },
            );
        }
        // Peers gone: their sessions go too.
        self.sessions.retain(|_, t| next.contains_key(&t.peer));
        self.peers = next;
        self.peers_configured = true;
        self.dirty = true;
        self.apply(actions, now);
    }

    fn apply(&mut self, actions: Vec<Action>, now: u64) {
        for a in actions {
            match a {
                Action::Send { to, bytes } => {
                    if matches!(bytes.first(), Some(1)) {
                        if let Ok(mut s) = self.shared.lock() {
                            s.initiations_sent += 1;
                        }
                    }
                    if let Err(e) = self.socket.send_to(&bytes, to) {
                        tracing::debug!(%to, error = %e, "WireGuard handshake send failed");
                    }
                }
                Action::SessionEstablished { peer, session } => {
                    let Some(entry) = self.peers.get_mut(&peer) else {
                        continue;
                    };
                    let keys = SessionKeys {
                        receiver_index: session.local_index,
                        peer_index: session.remote_index,
                        send_key: session.send_key,
                        recv_key: session.recv_key,
                        created_ns: session.created_ns,
                        initiator: session.is_initiator,
                        peer: entry.id,
                    };
                    let dp = match DpSession::new(&keys) {
                        Ok(s) => Arc::new(s),
                        Err(e) => {
                            tracing::error!(error = %e, "WireGuard session not installed");
                            continue;
                        }
                    };
                    if session.is_initiator {
                        let current = entry.send.and_then(|i| self.sessions.get(&i));
                        if current.is_some_and(|t| t.sendable && !t.session.expired(now)) {
                            let at = now + SWITCH_GRACE.as_nanos() as u64;
                            entry.switch = Some((session.local_index, at));
                        } else {
                            entry.send = Some(session.local_index);
                            entry.switch = None;
                        }
                    }
                    self.sessions.insert(
                        session.local_index,
                        Tracked {
                            peer,
                            keys,
                            adopted: false,
                            session: dp,
                            sendable: session.is_initiator,
                            seen_taken: 0,
                            seen_received: 0,
                            received_any: false,
                        },
                    );
                    if let Ok(mut s) = self.shared.lock() {
                        s.handshakes_completed = self.device.counters().handshakes_completed;
                    }
                    self.dirty = true;
                }
                Action::SessionConfirmed { peer, local_index } => {
                    if let Some(t) = self.sessions.get_mut(&local_index) {
                        t.sendable = true;
                    }
                    if let Some(e) = self.peers.get_mut(&peer) {
                        e.send = Some(local_index);
                    }
                    if let Ok(mut s) = self.shared.lock() {
                        s.handshakes_completed = self.device.counters().handshakes_completed;
                    }
                    self.dirty = true;
                }
                Action::SessionReplaced { peer, local_index }
                | Action::SessionExpired { peer, local_index } => {
                    self.sessions.remove(&local_index);
                    if let Some(e) = self.peers.get_mut(&peer) {
                        if e.switch.is_some_and(|(i, _)| i == local_index) {
                            e.switch = None;
                        }
                        if e.send == Some(local_index) {
                            // The session waiting for its switch takes over at once.
                            e.send = e.switch.take().map(|(i, _)| i);
                        }
                    }
                    self.dirty = true;
                }
                Action::SendKeepalive { peer } => self.send_keepalive(&peer, now),
                Action::HandshakeGaveUp { peer } => {
                    let node = self.peers.get(&peer).map(|p| p.node.node.clone());
                    tracing::warn!(peer = %peer.to_base64(), node = ?node, "WireGuard handshake gave up after REKEY_ATTEMPT_TIME");
                }
            }
        }
        if let Ok(mut s) = self.shared.lock() {
            s.failures = self.device.counters().failures.iter().sum();
        }
    }

    /// An empty transport message on the peer's current session.
    fn send_keepalive(&mut self, peer: &PublicKey, now: u64) {
        let Some(entry) = self.peers.get(peer) else {
            return;
        };
        let Some(t) = entry.send.and_then(|i| self.sessions.get(&i)) else {
            return;
        };
        let mut buf = [0u8; dwg::TRANSPORT_HEADER_LEN + dwg::TAG_LEN];
        let plain = dwg::TRANSPORT_HEADER_LEN..dwg::TRANSPORT_HEADER_LEN;
        match dwg::seal(&t.session, &mut self.keepalive_block, &mut buf, plain, now) {
            Ok(range) => {
                let to = entry.node.endpoint;
                if let Err(e) = self.socket.send_to(&buf[range], to) {
                    tracing::debug!(%to, error = %e, "WireGuard keepalive send failed");
                }
                let taken = t.session.counters_taken();
                let actions = self.device.transport_sent(peer, true, taken, now);
                self.apply(actions, now);
            }
            Err(e) => tracing::debug!(error = ?e, "WireGuard keepalive not sealed"),
        }
    }

    /// Reports what the workers did with each session since the last look.
    fn read_session_use(&mut self, now: u64) {
        let mut events: Vec<(PublicKey, u32, bool, bool, u64, bool)> = Vec::new();
        for (idx, t) in &mut self.sessions {
            // The handshake engine does not know handed-over sessions.
            if t.adopted {
                continue;
            }
            let taken = t.session.counters_taken();
            let received = t.session.max_received_counter();
            let got_any = t.session.received_any();
            let sent_now = taken > t.seen_taken;
            let recv_now = received > t.seen_received || (got_any && !t.received_any);
            let confirm = !t.sendable && got_any;
            t.seen_taken = taken;
            t.seen_received = received;
            t.received_any = got_any;
            if sent_now || recv_now || confirm {
                events.push((t.peer, *idx, sent_now, recv_now, taken, confirm));
            }
        }
        for (peer, idx, sent, recv, taken, confirm) in events {
            if confirm {
                let a = self.device.session_confirmed(&peer, idx, now);
                self.apply(a, now);
            }
            if sent {
                let a = self.device.transport_sent(&peer, false, taken, now);
                self.apply(a, now);
            }
            if recv {
                let a = self.device.transport_received(&peer, false, now);
                self.apply(a, now);
            }
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        let now = monotonic_ns();
        let statuses = self.device.peer_statuses(now);
        let mut peers = Vec::with_capacity(self.peers.len());
        for (key, e) in &self.peers {
            let status = statuses.iter().find(|s| s.public_key == *key);
            let (tx, rx) =
                self.sessions
                    .values()
                    .filter(|t| t.peer == *key)
                    .fold((0, 0), |(tx, rx), t| {
                        (
                            tx + t.session.counters_taken(),
                            rx + t.session.max_received_counter(),
                        )
                    });
            peers.push(PeerState {
                node: e.node.node.clone(),
                node_ip: e.node.allowed_source,
                public_key: *key,
                endpoint: status.map_or(SocketAddr::V4(e.node.endpoint), |s| s.endpoint),
                id: e.id,
                send: e
                    .send
                    .and_then(|i| self.sessions.get(&i))
                    .filter(|t| t.sendable)
                    .map(|t| Arc::clone(&t.session)),
                latest_handshake_ns: status.and_then(|s| s.latest_handshake_ns),
                tx_messages: tx,
                rx_messages: rx,
            });
        }
        let table = SessionTable::new(self.sessions.values().map(|t| Arc::clone(&t.session)));
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        if let Ok(mut s) = self.shared.lock() {
            s.state = WgState {
                generation,
                peers,
                table,
            };
        }
        self.generation.store(generation, Ordering::Release);
    }
}
