//! The handshake side of a WireGuard device, driven from one thread without I/O: the caller
//! reads datagrams from the UDP socket (WireGuard types 1-3; the uplink's XDP program passes them
//! to the kernel) and feeds them to [`Device::handle_datagram`], calls [`Device::tick`]
//! periodically and [`Device::want_session`] when the workers have traffic for a peer without a
//! session, and carries out the returned [`Action`]s: send bytes, hand session keys to the
//! workers, retire keys.
//!
//! Sessions per peer follow wireguard-go's `current`/`previous`/`next` keypairs:
//! - as initiator a new session becomes `current` at once (the old `current` stays `previous` for
//!   receiving packets still in flight);
//! - as responder it becomes `next`: receive-only until the initiator uses it, which the data path
//!   reports with [`Device::session_confirmed`]; then it becomes `current`.
//!
//! Transport counters live in the workers, so the rekey-after-messages limit and the
//! rekey-on-send/receive timers need the data path to report traffic
//! ([`Device::transport_sent`]/[`Device::transport_received`], batched per tick is fine).
//! Limits: no pre-shared keys (the psk slot is zero), IPv4 and IPv6 sources both accepted,
//! "under load" is set by the caller ([`Device::set_under_load`]) from its receive backlog.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use super::crypto;
use super::keys::{PrivateKey, PublicKey};
use super::noise::{
    self, CookieChecker, CookieGenerator, Handshake, Identity, NoiseError, Session,
};
use super::timers::{PeerTimers, TimerEvent, Timers};

/// What the caller must do after a call into the [`Device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `bytes` in one UDP datagram to `to` from the WireGuard socket.
    Send { to: SocketAddr, bytes: Vec<u8> },
    /// New keys for `peer`. An initiator's session is usable for sending at once; a responder's
    /// only receives until [`Action::SessionConfirmed`].
    SessionEstablished { peer: PublicKey, session: Session },
    /// The responder session `local_index` was used by the initiator: send with it now.
    SessionConfirmed { peer: PublicKey, local_index: u32 },
    /// Session `local_index` was superseded: stop using it for anything.
    SessionReplaced { peer: PublicKey, local_index: u32 },
    /// Session `local_index` is older than REJECT_AFTER_TIME (or the peer was removed): drop it.
    SessionExpired { peer: PublicKey, local_index: u32 },
    /// Send a keepalive (empty transport message) to `peer` on its current session.
    SendKeepalive { peer: PublicKey },
    /// Handshake retries for `peer` ran out (REKEY_ATTEMPT_TIME): queued traffic can be dropped.
    HandshakeGaveUp { peer: PublicKey },
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static public key.
    pub public_key: PublicKey,
    /// Where to send handshakes (updated when the peer sends an authenticated handshake from
    /// elsewhere).
    pub endpoint: SocketAddr,
}

/// Handshake counters of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Initiations sent (first attempts and retries).
    pub initiations_sent: u64,
    /// Initiation-sized datagrams received (before any check).
    pub initiations_received: u64,
    /// Responses sent.
    pub responses_sent: u64,
    /// Response-sized datagrams received (before any check).
    pub responses_received: u64,
    /// Handshakes completed (initiator: response consumed; responder: session confirmed).
    pub handshakes_completed: u64,
    /// Cookie replies sent (under load).
    pub cookie_replies_sent: u64,
    /// Cookie replies accepted.
    pub cookie_replies_received: u64,
    /// Sessions dropped for age or key zeroing.
    pub sessions_expired: u64,
    /// Handshakes abandoned after REKEY_ATTEMPT_TIME.
    pub handshakes_given_up: u64,
    /// Refused messages by reason, indexed by `NoiseError as usize`.
    pub failures: [u64; NoiseError::COUNT],
}

impl Counters {
    /// Refusals for `reason`.
    pub fn failures_for(&self, reason: NoiseError) -> u64 {
        self.failures[reason as usize]
    }
}

/// A peer as `wg show` would list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's key.
    pub public_key: PublicKey,
    /// Current endpoint.
    pub endpoint: SocketAddr,
    /// When the latest handshake completed (`now_ns` clock), if ever.
    pub latest_handshake_ns: Option<u64>,
    /// Whether a session usable for sending exists.
    pub has_session: bool,
    /// Retries of the handshake in progress.
    pub handshake_attempts: u32,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    local_index: u32,
    is_initiator: bool,
    created_ns: u64,
}

impl From<&Session> for Slot {
    fn from(s: &Session) -> Self {
        Self {
            local_index: s.local_index,
            is_initiator: s.is_initiator,
            created_ns: s.created_ns,
        }
    }
}

struct Peer {
    public_key: PublicKey,
    endpoint: SocketAddr,
    handshake: Handshake,
    cookies: CookieGenerator,
    timers: PeerTimers,
    current: Option<Slot>,
    previous: Option<Slot>,
    next: Option<Slot>,
    /// Data sent / received on the current session since it was installed.
    sent_on_current: bool,
    received_on_current: bool,
    /// Rekey-on-receive already asked for the current session (wireguard-go's
    /// `sentLastMinuteHandshake`).
    rekey_on_receive_sent: bool,
}

impl Peer {
    fn new(cfg: &PeerConfig) -> Self {
        Self {
            public_key: cfg.public_key,
            endpoint: cfg.endpoint,
            handshake: Handshake::new(cfg.public_key),
            cookies: CookieGenerator::new(&cfg.public_key),
            timers: PeerTimers::default(),
            current: None,
            previous: None,
            next: None,
            sent_on_current: false,
            received_on_current: false,
            rekey_on_receive_sent: false,
        }
    }
}

/// The handshake engine for one node key and its peers.
pub struct Device {
    id: Identity,
    timers: Timers,
    peers: BTreeMap<PublicKey, Peer>,
    /// Our indices (handshakes in flight and sessions) to their peer.
    index: HashMap<u32, PublicKey>,
    checker: CookieChecker,
    counters: Counters,
    under_load: bool,
    /// `unix time - now_ns`, for TAI64N timestamps.
    unix_offset_ns: i128,
}

fn random<const N: usize>() -> Result<[u8; N], NoiseError> {
    let mut b = [0u8; N];
    crypto::random_bytes(&mut b).map_err(|_| NoiseError::Rng)?;
    Ok(b)
}

impl Device {
    /// A device for `private`, with `timers`; `now_ns` is the caller's clock and `unix_now_ns`
    /// the wall-clock time at that instant (initiation timestamps must grow across restarts, so
    /// they come from the wall clock).
    pub fn new(private: &PrivateKey, timers: Timers, now_ns: u64, unix_now_ns: u64) -> Self {
        Self {
            id: Identity::new(private),
            timers,
            peers: BTreeMap::new(),
            index: HashMap::new(),
            checker: CookieChecker::default(),
            counters: Counters::default(),
            under_load: false,
            unix_offset_ns: i128::from(unix_now_ns) - i128::from(now_ns),
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.id.public_key()
    }

    /// The timers in use.
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Counters since creation.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// When set, initiations and responses without a valid MAC2 are answered with a cookie reply
    /// instead of being processed (the caller sets it when its receive backlog grows).
    pub fn set_under_load(&mut self, under_load: bool) {
        self.under_load = under_load;
    }

    /// Adds a peer or updates its endpoint.
    pub fn add_peer(&mut self, cfg: PeerConfig) {
        match self.peers.get_mut(&cfg.public_key) {
            Some(p) => p.endpoint = cfg.endpoint,
            None => {
                self.peers.insert(cfg.public_key, Peer::new(&cfg));
            }
        }
    }

    /// Removes a peer; its sessions are reported expired.
    pub fn remove_peer(&mut self, key: &PublicKey) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(mut peer) = self.peers.remove(key) {
            self.zero_keys(&mut peer, &mut actions);
        }
        actions
    }

    /// Makes the peer set exactly `peers`: adds new ones, updates endpoints, removes the rest.
    pub fn set_peers(&mut self, peers: &[PeerConfig]) -> Vec<Action> {
        let keep: std::collections::BTreeSet<PublicKey> =
            peers.iter().map(|p| p.public_key).collect();
        let gone: Vec<PublicKey> = self
            .peers
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        let mut actions = Vec::new();
        for k in gone {
            actions.extend(self.remove_peer(&k));
        }
        for p in peers {
            self.add_peer(p.clone());
        }
        actions
    }

    /// Status of every peer, in key order.
    pub fn peer_statuses(&self, now_ns: u64) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| PeerStatus {
                public_key: p.public_key,
                endpoint: p.endpoint,
                latest_handshake_ns: p.timers.latest_handshake_ns,
                has_session: self.usable(p.current, now_ns),
                handshake_attempts: p.timers.handshake_attempts,
            })
            .collect()
    }

    /// When the latest handshake with `peer` completed.
    pub fn latest_handshake(&self, peer: &PublicKey) -> Option<u64> {
        self.peers.get(peer)?.timers.latest_handshake_ns
    }

    fn usable(&self, slot: Option<Slot>, now_ns: u64) -> bool {
        slot.is_some_and(|s| now_ns.saturating_sub(s.created_ns) < self.timers.reject_after_time_ns)
    }

    fn fail(&mut self, reason: NoiseError, from: Option<SocketAddr>) {
        self.counters.failures[reason as usize] += 1;
        tracing::debug!(
            ?from,
            reason = reason.as_str(),
            "wireguard handshake message refused"
        );
    }

    /// Runs `f` on peer `key` taken out of the map (so `f` can use the rest of the device).
    fn with_peer<R>(
        &mut self,
        key: &PublicKey,
        f: impl FnOnce(&mut Self, &mut Peer) -> R,
    ) -> Option<R> {
        let mut peer = self.peers.remove(key)?;
        let r = f(self, &mut peer);
        self.peers.insert(*key, peer);
        Some(r)
    }

    fn new_index(&mut self, peer: PublicKey) -> Result<u32, NoiseError> {
        for _ in 0..32 {
            let i = u32::from_le_bytes(random::<4>()?);
            if i != 0 && !self.index.contains_key(&i) {
                self.index.insert(i, peer);
                return Ok(i);
            }
        }
        Err(NoiseError::Rng)
    }

    fn timestamp(&self, now_ns: u64) -> [u8; crypto::TIMESTAMP_LEN] {
        let unix = (i128::from(now_ns) + self.unix_offset_ns).clamp(0, i128::from(u64::MAX));
        crypto::tai64n(u64::try_from(unix).unwrap_or(0))
    }

    /// There is traffic for `peer` (or the agent wants a session up front): starts a handshake
    /// unless a usable session exists or one is in flight (at most one initiation per
    /// REKEY_TIMEOUT).
    pub fn want_session(&mut self, peer: &PublicKey, now_ns: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let fresh = self.peers.get(peer).is_some_and(|p| {
            p.current.is_some_and(|s| {
                let age = now_ns.saturating_sub(s.created_ns);
                age < self.timers.reject_after_time_ns
                    && !(s.is_initiator && age >= self.timers.rekey_after_time_ns)
            })
        });
        if !fresh {
            self.with_peer(peer, |dev, p| dev.initiate(p, now_ns, false, &mut actions));
        }
        actions
    }

    /// wireguard-go's `SendHandshakeInitiation(isRetry)`.
    fn initiate(&mut self, peer: &mut Peer, now_ns: u64, is_retry: bool, out: &mut Vec<Action>) {
        if !is_retry {
            peer.timers.handshake_attempts = 0;
        }
        if peer
            .timers
            .last_initiation_sent_ns
            .is_some_and(|t| now_ns.saturating_sub(t) < self.timers.rekey_timeout_ns)
        {
            return;
        }
        if let Err(e) = self.try_initiate(peer, now_ns, out) {
            self.fail(e, Some(peer.endpoint));
        }
    }

    fn try_initiate(
        &mut self,
        peer: &mut Peer,
        now_ns: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), NoiseError> {
        if peer.handshake.local_index != 0 {
            self.index.remove(&peer.handshake.local_index);
        }
        let local_index = self.new_index(peer.public_key)?;
        let ephemeral = random::<32>()?;
        let jitter_bytes = random::<8>()?;
        let jitter = u64::from_le_bytes(jitter_bytes)
            % self.timers.rekey_timeout_jitter_max_ns.saturating_add(1);
        let mut msg = peer.handshake.create_initiation(
            &self.id,
            local_index,
            ephemeral,
            self.timestamp(now_ns),
        )?;
        peer.cookies
            .add_macs(&mut msg, now_ns, self.timers.cookie_refresh_time_ns);
        peer.timers
            .handshake_initiated(&self.timers, now_ns, jitter);
        peer.timers.any_authenticated_sent(&self.timers, now_ns);
        self.counters.initiations_sent += 1;
        out.push(Action::Send {
            to: peer.endpoint,
            bytes: msg.to_vec(),
        });
        Ok(())
    }

    /// Handles one datagram received on the WireGuard socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8], now_ns: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let result = match noise::message_type(bytes) {
            Ok(noise::MSG_INITIATION) => {
                self.counters.initiations_received += 1;
                self.on_initiation(from, bytes, now_ns, &mut actions)
            }
            Ok(noise::MSG_RESPONSE) => {
                self.counters.responses_received += 1;
                self.on_response(from, bytes, now_ns, &mut actions)
            }
            Ok(noise::MSG_COOKIE_REPLY) => self.on_cookie_reply(bytes, now_ns),
            _ => Err(NoiseError::BadType),
        };
        if let Err(e) = result {
            self.fail(e, Some(from));
        }
        actions
    }

    /// MAC1 always; under load MAC2 too, answering a missing/stale one with a cookie reply.
    fn check_macs(
        &mut self,
        from: SocketAddr,
        msg: &[u8],
        sender: u32,
        now_ns: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), NoiseError> {
        if !self.id.check_mac1(msg) {
            return Err(NoiseError::BadMac1);
        }
        let refresh = self.timers.cookie_refresh_time_ns;
        if self.under_load && !self.checker.check_mac2(msg, &from, now_ns, refresh) {
            let reply = self.checker.create_reply(
                &self.id,
                msg,
                sender,
                &from,
                now_ns,
                refresh,
                random::<32>()?,
                random::<24>()?,
            )?;
            self.counters.cookie_replies_sent += 1;
            out.push(Action::Send {
                to: from,
                bytes: reply.to_vec(),
            });
            return Err(NoiseError::CookieRequired);
        }
        Ok(())
    }

    fn on_initiation(
        &mut self,
        from: SocketAddr,
        msg: &[u8],
        now_ns: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), NoiseError> {
        if msg.len() != noise::INITIATION_LEN {
            return Err(NoiseError::BadLength);
        }
        let (sender, _) = noise::indices(msg);
        self.check_macs(from, msg, sender.unwrap_or(0), now_ns, out)?;
        let init = noise::open_initiation(&self.id, msg)?;
        let key = init.remote_static;
        self.with_peer(&key, |dev, peer| {
            peer.handshake.accept_initiation(
                &init,
                now_ns,
                dev.timers.handshake_initiation_rate_ns,
            )?;
            if peer.handshake.local_index != 0 {
                dev.index.remove(&peer.handshake.local_index);
            }
            let local_index = dev.new_index(key)?;
            let (mut resp, session) =
                peer.handshake
                    .create_response(local_index, random::<32>()?, now_ns)?;
            peer.cookies
                .add_macs(&mut resp, now_ns, dev.timers.cookie_refresh_time_ns);
            peer.endpoint = from;
            peer.timers.any_authenticated_received();
            peer.timers.any_authenticated_sent(&dev.timers, now_ns);
            dev.counters.responses_sent += 1;
            out.push(Action::Send {
                to: from,
                bytes: resp.to_vec(),
            });
            dev.install(peer, session, now_ns, out);
            Ok(())
        })
        .unwrap_or(Err(NoiseError::UnknownPeer))
    }

    fn on_response(
        &mut self,
        from: SocketAddr,
        msg: &[u8],
        now_ns: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), NoiseError> {
        if msg.len() != noise::RESPONSE_LEN {
            return Err(NoiseError::BadLength);
        }
        let (sender, receiver) = noise::indices(msg);
        self.check_macs(from, msg, sender.unwrap_or(0), now_ns, out)?;
        let key = receiver
            .and_then(|r| self.index.get(&r).copied())
            .ok_or(NoiseError::UnknownIndex)?;
        self.with_peer(&key, |dev, peer| {
            if !peer.handshake.awaiting_response() {
                return Err(NoiseError::UnexpectedState);
            }
            let session = peer.handshake.consume_response(&dev.id, msg, now_ns)?;
            peer.endpoint = from;
            peer.timers.any_authenticated_received();
            peer.timers.handshake_complete(now_ns);
            dev.counters.handshakes_completed += 1;
            dev.install(peer, session, now_ns, out);
            // wireguard-go sends a keepalive at once so the responder can confirm the keys.
            out.push(Action::SendKeepalive { peer: key });
            peer.timers.any_authenticated_sent(&dev.timers, now_ns);
            Ok(())
        })
        .unwrap_or(Err(NoiseError::UnknownIndex))
    }

    fn on_cookie_reply(&mut self, msg: &[u8], now_ns: u64) -> Result<(), NoiseError> {
        if msg.len() != noise::COOKIE_REPLY_LEN {
            return Err(NoiseError::BadLength);
        }
        let (_, receiver) = noise::indices(msg);
        let key = receiver
            .and_then(|r| self.index.get(&r).copied())
            .ok_or(NoiseError::UnknownIndex)?;
        let peer = self.peers.get_mut(&key).ok_or(NoiseError::UnknownIndex)?;
        peer.cookies.consume_reply(msg, now_ns)?;
        self.counters.cookie_replies_received += 1;
        Ok(())
    }

    fn retire(&mut self, peer: &PublicKey, slot: Option<Slot>, out: &mut Vec<Action>) {
        if let Some(s) = slot {
            self.index.remove(&s.local_index);
            out.push(Action::SessionReplaced {
                peer: *peer,
                local_index: s.local_index,
            });
        }
    }

    /// wireguard-go's `BeginSymmetricSession` keypair rotation.
    fn install(&mut self, peer: &mut Peer, session: Session, now_ns: u64, out: &mut Vec<Action>) {
        let key = peer.public_key;
        let slot = Slot::from(&session);
        if session.is_initiator {
            if let Some(next) = peer.next.take() {
                let old = peer.previous.replace(next);
                self.retire(&key, old, out);
            } else {
                let old = peer.previous.take();
                self.retire(&key, old, out);
                peer.previous = peer.current;
            }
            peer.current = Some(slot);
            peer.sent_on_current = false;
            peer.received_on_current = false;
            peer.rekey_on_receive_sent = false;
        } else {
            let old_next = peer.next.replace(slot);
            self.retire(&key, old_next, out);
            let old_previous = peer.previous.take();
            self.retire(&key, old_previous, out);
        }
        self.index.insert(slot.local_index, key);
        peer.timers.session_derived(&self.timers, now_ns);
        out.push(Action::SessionEstablished { peer: key, session });
    }

    /// The data path received a valid transport message on responder session `local_index`
    /// (the initiator's key confirmation): it becomes the current session.
    pub fn session_confirmed(
        &mut self,
        peer: &PublicKey,
        local_index: u32,
        now_ns: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.with_peer(peer, |dev, p| {
            if p.next.is_none_or(|n| n.local_index != local_index) {
                return;
            }
            let old = p.previous.take();
            dev.retire(peer, old, &mut out);
            p.previous = p.current;
            p.current = p.next.take();
            p.sent_on_current = false;
            p.received_on_current = false;
            p.rekey_on_receive_sent = false;
            p.timers.handshake_complete(now_ns);
            dev.counters.handshakes_completed += 1;
            out.push(Action::SessionConfirmed {
                peer: *peer,
                local_index,
            });
        });
        out
    }

    /// The data path sent transport traffic to `peer` (`keepalive_only` when it was only
    /// keepalives); `messages` is the highest counter used on the current session.
    pub fn transport_sent(
        &mut self,
        peer: &PublicKey,
        keepalive_only: bool,
        messages: u64,
        now_ns: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.with_peer(peer, |dev, p| {
            p.timers.any_authenticated_sent(&dev.timers, now_ns);
            if keepalive_only {
                return;
            }
            p.timers.data_sent(&dev.timers, now_ns);
            p.sent_on_current = true;
            // wireguard-go `keepKeyFreshSending`.
            let stale = p.current.is_some_and(|s| {
                s.is_initiator
                    && (now_ns.saturating_sub(s.created_ns) >= dev.timers.rekey_after_time_ns
                        || messages >= dev.timers.rekey_after_messages)
            });
            if stale {
                dev.initiate(p, now_ns, false, &mut out);
            }
        });
        out
    }

    /// The data path received transport traffic from `peer`.
    pub fn transport_received(
        &mut self,
        peer: &PublicKey,
        keepalive_only: bool,
        now_ns: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.with_peer(peer, |dev, p| {
            p.timers.any_authenticated_received();
            if keepalive_only {
                return;
            }
            p.timers.data_received(&dev.timers, now_ns);
            p.received_on_current = true;
            // wireguard-go `keepKeyFreshReceiving`.
            let old = p.current.is_some_and(|s| {
                s.is_initiator
                    && now_ns.saturating_sub(s.created_ns) >= dev.timers.rekey_on_receive_ns()
            });
            if old && !p.rekey_on_receive_sent {
                p.rekey_on_receive_sent = true;
                dev.initiate(p, now_ns, false, &mut out);
            }
        });
        out
    }

    fn zero_keys(&mut self, peer: &mut Peer, out: &mut Vec<Action>) {
        for slot in [peer.current.take(), peer.previous.take(), peer.next.take()]
            .into_iter()
            .flatten()
        {
            self.index.remove(&slot.local_index);
            self.counters.sessions_expired += 1;
            out.push(Action::SessionExpired {
                peer: peer.public_key,
                local_index: slot.local_index,
            });
        }
        if peer.handshake.local_index != 0 {
            self.index.remove(&peer.handshake.local_index);
        }
        let endpoint = peer.endpoint;
        let timers = std::mem::take(&mut peer.timers);
        *peer = Peer::new(&PeerConfig {
            public_key: peer.public_key,
            endpoint,
        });
        // Keep what replay protection and status need across zeroing.
        peer.timers.latest_handshake_ns = timers.latest_handshake_ns;
        peer.timers.last_initiation_sent_ns = timers.last_initiation_sent_ns;
    }

    /// Runs the timers of every peer: retransmits, keepalives, session expiry, key zeroing.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        for key in keys {
            self.with_peer(&key, |dev, p| dev.tick_peer(p, now_ns, &mut out));
        }
        out
    }

    fn tick_peer(&mut self, p: &mut Peer, now_ns: u64, out: &mut Vec<Action>) {
        let reject = self.timers.reject_after_time_ns;
        for slot in [&mut p.current, &mut p.previous, &mut p.next] {
            let Some(s) = *slot else { continue };
            if now_ns.saturating_sub(s.created_ns) >= reject {
                *slot = None;
                self.index.remove(&s.local_index);
                self.counters.sessions_expired += 1;
                out.push(Action::SessionExpired {
                    peer: p.public_key,
                    local_index: s.local_index,
                });
            }
        }
        // A used initiator session past REKEY_AFTER_TIME is renewed even if the data path
        // reports traffic late.
        let due = p.current.is_some_and(|s| {
            s.is_initiator && now_ns.saturating_sub(s.created_ns) >= self.timers.rekey_after_time_ns
        });
        if due && p.sent_on_current {
            self.initiate(p, now_ns, false, out);
        }
        for event in p.timers.poll(&self.timers, now_ns) {
            match event {
                TimerEvent::RetransmitHandshake { .. } => self.initiate(p, now_ns, true, out),
                TimerEvent::HandshakeGaveUp => {
                    self.counters.handshakes_given_up += 1;
                    out.push(Action::HandshakeGaveUp { peer: p.public_key });
                }
                TimerEvent::SendKeepalive => {
                    if self.usable(p.current, now_ns) {
                        out.push(Action::SendKeepalive { peer: p.public_key });
                    }
                }
                TimerEvent::PersistentKeepalive => {
                    if self.usable(p.current, now_ns) {
                        out.push(Action::SendKeepalive { peer: p.public_key });
                    } else {
                        self.initiate(p, now_ns, false, out);
                    }
                }
                TimerEvent::NewHandshake => self.initiate(p, now_ns, false, out),
                TimerEvent::ZeroKeyMaterial => self.zero_keys(p, out),
            }
        }
    }
}

#[cfg(test)]
mod tests;
