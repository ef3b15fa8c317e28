//! One established WireGuard session (a keypair, in wireguard-go's words): the indices and keys
//! the handshake agreed, its age and message limits, the send counter shared by the workers and
//! the receive replay window.
//!
//! ## Nonces across workers
//! Several workers seal to the same peer at once, and a nonce must never repeat under a key.
//! A shared `fetch_add` per packet would bounce one cache line between the cores for every
//! packet. Instead each worker keeps a [`CounterBlock`] per session and takes
//! [`COUNTER_BLOCK`] counters with one `fetch_add` on the session's `AtomicU64`, then hands
//! them out locally. Blocks never overlap, so counters are unique across workers (tested with
//! threads below) and cross-core traffic drops to one atomic per 256 packets.
//!
//! The receiver then sees each worker's counters interleaved, up to a few blocks out of order.
//! Its replay window ([`super::replay`], 8128 counters) accepts any counter within 8128 of the
//! highest seen, so this is ordinary reordering to it, as long as the spread of the blocks in
//! use stays well below the window:
//! - a block is small: workers x 256 stays under half the window up to 15 workers;
//! - a block goes stale: before using a counter a worker reads (plain load, no write) the
//!   session's next free counter; when that is more than [`COUNTER_STALE_AFTER`] (half the
//!   window) ahead of the worker's position, e.g. because the worker sent nothing to this peer
//!   while others sent thousands, the rest of the block is abandoned and a fresh one taken.
//!   Without this an idle worker's next packet would arrive "too old" and be dropped.
//!
//! Abandoned counters are never used: the counter space (2^64) is not a resource here, and the
//! message limits below count the counters handed out, as the sender's nonce in wireguard-go.
//! wireguard-go and Linux senders never leave gaps; receivers do not care either way.
use std::sync::atomic::{AtomicU64, Ordering};

use super::{aead::Aead, replay::ReplayWindow, SealError};

/// Identifies the peer (node) a session belongs to, as control numbers them.
pub type PeerId = u32;

/// WireGuard paper section 6.1 / wireguard-go `constants.go`: a session is rekeyed after this
/// many messages...
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// ...and no message is sent or accepted with a counter at or above this (2^64 - 2^13 - 1).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// The initiator starts a new handshake when its session is this old (120 s).
pub const REKEY_AFTER_TIME_NS: u64 = 120_000_000_000;
/// No message is sent or accepted on a session this old (180 s).
pub const REJECT_AFTER_TIME_NS: u64 = 180_000_000_000;
/// The initiator also rekeys when it *receives* on a session this old:
/// REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT (10 s) - REKEY_TIMEOUT (5 s) = 165 s.
pub const REKEY_ON_RECEIVE_AFTER_TIME_NS: u64 = 165_000_000_000;

/// Counters a worker takes from a session at once (one `fetch_add`).
pub const COUNTER_BLOCK: u64 = 256;
/// A worker abandons the rest of its block when the session's next free counter is this far
/// ahead of it (half the receiver's replay window).
pub const COUNTER_STALE_AFTER: u64 = super::replay::REPLAY_WINDOW / 2;

// Blocks must stay well inside the receiver's window.
const _: () = assert!(COUNTER_BLOCK * 16 <= super::replay::REPLAY_WINDOW);

/// Why [`Session::new`] refused the handshake's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The AEAD implementation refused a key (ring refuses only keys of the wrong length, so
    /// this points at a broken build of ring, not at the handshake).
    #[error("ChaCha20-Poly1305 refused the {direction} key of session {receiver_index}")]
    KeyRejected {
        direction: &'static str,
        receiver_index: u32,
    },
    #[error("session {receiver_index}: a handed-over replay window of {words} words is not one")]
    ReplayWindow { receiver_index: u32, words: usize },
}

/// Session ids, so a [`CounterBlock`] is never used with another session than its own.
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// What the handshake (control's `wg` module) hands over for one established session.
#[derive(Clone)]
pub struct SessionKeys {
    /// Our index: peers put it in the messages they send us; we look sessions up by it.
    pub receiver_index: u32,
    /// The peer's index: we put it in the messages we send.
    pub peer_index: u32,
    /// ChaCha20-Poly1305 key for what we send (T_send).
    pub send_key: [u8; 32],
    /// ChaCha20-Poly1305 key for what we receive (T_recv).
    pub recv_key: [u8; 32],
    /// When the session was established (monotonic ns, the workers' clock).
    pub created_ns: u64,
    /// Whether we initiated the handshake (only the initiator rekeys on time).
    pub initiator: bool,
    /// Which peer this session belongs to.
    pub peer: PeerId,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("receiver_index", &self.receiver_index)
            .field("peer_index", &self.peer_index)
            .field("created_ns", &self.created_ns)
            .field("initiator", &self.initiator)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The send counter on a cache line of its own: it is written once per block by senders while
/// receivers write the replay window.
#[repr(align(128))]
struct SendCounter(AtomicU64);

/// An established session. Shared by all workers (`Sync`; usually in an `Arc`).
pub struct Session {
    id: u64,
    receiver_index: u32,
    peer_index: u32,
    peer: PeerId,
    initiator: bool,
    created_ns: u64,
    pub(super) send: Aead,
    pub(super) recv: Aead,
    /// The next counter no worker has taken yet.
    send_counter: SendCounter,
    pub(super) replay: ReplayWindow,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("receiver_index", &self.receiver_index)
            .field("peer_index", &self.peer_index)
            .field("peer", &self.peer)
            .field("initiator", &self.initiator)
            .field("created_ns", &self.created_ns)
            .field("counters_taken", &self.counters_taken())
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session from the handshake's result. Counters start at 0.
    pub fn new(keys: &SessionKeys) -> Result<Self, SessionError> {
        let rejected = |direction| SessionError::KeyRejected {
            direction,
            receiver_index: keys.receiver_index,
        };
        Ok(Session {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            receiver_index: keys.receiver_index,
            peer_index: keys.peer_index,
            peer: keys.peer,
            initiator: keys.initiator,
            created_ns: keys.created_ns,
            send: Aead::new(&keys.send_key).ok_or_else(|| rejected("send"))?,
            recv: Aead::new(&keys.recv_key).ok_or_else(|| rejected("receive"))?,
            send_counter: SendCounter(AtomicU64::new(0)),
            replay: ReplayWindow::new(),
        })
    }

    /// A session continuing another process's (hot restart): the same keys, its send counter
    /// taken up to `counters_taken`, its replay window as [`ReplayWindow::snapshot`] gave it.
    pub fn restored(
        keys: &SessionKeys,
        counters_taken: u64,
        replay_words: &[u64],
        replay_max: u64,
    ) -> Result<Self, SessionError> {
        let mut s = Self::new(keys)?;
        s.send_counter = SendCounter(AtomicU64::new(counters_taken));
        s.replay =
            ReplayWindow::restored(replay_words, replay_max).ok_or(SessionError::ReplayWindow {
                receiver_index: keys.receiver_index,
                words: replay_words.len(),
            })?;
        Ok(s)
    }

    /// The replay window's words and highest counter (see [`Session::restored`]).
    pub fn replay_snapshot(&self) -> (Vec<u64>, u64) {
        self.replay.snapshot()
    }

    /// Our index (what peers address this session by).
    pub fn receiver_index(&self) -> u32 {
        self.receiver_index
    }
    /// The peer's index (written into the messages we send).
    pub fn peer_index(&self) -> u32 {
        self.peer_index
    }
    /// The peer this session belongs to.
    pub fn peer(&self) -> PeerId {
        self.peer
    }
    /// Whether we initiated the handshake.
    pub fn initiator(&self) -> bool {
        self.initiator
    }
    /// When the session was established (ns).
    pub fn created_ns(&self) -> u64 {
        self.created_ns
    }
    /// Counters taken by senders so far (handed out or abandoned): the sending nonce.
    pub fn counters_taken(&self) -> u64 {
        self.send_counter.0.load(Ordering::Relaxed)
    }
    /// Whether any message was accepted on this session (counter 0 included): the
    /// initiator's key confirmation for a responder session.
    pub fn received_any(&self) -> bool {
        self.replay.max_accepted() > 0 || self.replay.precheck(0).is_err()
    }
    /// Highest counter received and accepted (0 before the first).
    pub fn max_received_counter(&self) -> u64 {
        self.replay.max_accepted()
    }

    fn age_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.created_ns)
    }

    /// Nothing may be sent or accepted on this session any more (REJECT_AFTER_TIME).
    pub fn expired(&self, now_ns: u64) -> bool {
        self.age_ns(now_ns) >= REJECT_AFTER_TIME_NS
    }

    /// The sender should start a new handshake (wireguard-go's send path): after
    /// REKEY_AFTER_MESSAGES counters, or, for the initiator, after REKEY_AFTER_TIME.
    pub fn needs_rekey(&self, now_ns: u64) -> bool {
        self.counters_taken() >= REKEY_AFTER_MESSAGES
            || (self.initiator && self.age_ns(now_ns) >= REKEY_AFTER_TIME_NS)
    }

    /// The initiator should start a new handshake because it received on a session about to
    /// expire (wireguard-go's receive path, 165 s).
    pub fn needs_rekey_on_receive(&self, now_ns: u64) -> bool {
        self.initiator && self.age_ns(now_ns) >= REKEY_ON_RECEIVE_AFTER_TIME_NS
    }
}

/// A worker's private run of send counters for one session (see the module doc). Start with
/// [`CounterBlock::default`] (empty) and keep one per (worker, peer); it refills itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterBlock {
    /// The session the block was taken from (0: none yet).
    session_id: u64,
    next: u64,
    end: u64,
}

impl CounterBlock {
    /// The next unique counter for `session`, taking a new block when this one is used up,
    /// stale or from another session. `Err` when the session's counters are exhausted.
    #[inline]
    pub fn next_counter(&mut self, session: &Session) -> Result<u64, SealError> {
        let shared = &session.send_counter.0;
        if self.session_id != session.id
            || self.next >= self.end
            || shared.load(Ordering::Relaxed).saturating_sub(self.next) > COUNTER_STALE_AFTER
        {
            let start = shared.fetch_add(COUNTER_BLOCK, Ordering::Relaxed);
            *self = CounterBlock {
                session_id: session.id,
                next: start,
                end: start.saturating_add(COUNTER_BLOCK),
            };
        }
        let counter = self.next;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SealError::CounterExhausted);
        }
        self.next += 1;
        Ok(counter)
    }

    /// Counters left in the block.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn keys(initiator: bool) -> SessionKeys {
        SessionKeys {
            receiver_index: 1,
            peer_index: 2,
            send_key: [1; 32],
            recv_key: [2; 32],
            created_ns: 1_000,
            initiator,
            peer: 7,
        }
    }

    #[test]
    fn a_restored_session_continues_counters_and_refuses_replays() {
        let old = Session::new(&keys(true)).expect("session");
        let mut block = CounterBlock::default();
        for _ in 0..300 {
            block.next_counter(&old).expect("counter");
        }
        for c in [0u64, 5, 9000, 9001] {
            old.replay.check_and_mark(c).expect("fresh");
        }
        let (words, max) = old.replay_snapshot();
        let new =
            Session::restored(&keys(true), old.counters_taken(), &words, max).expect("restored");
        assert_eq!(new.counters_taken(), old.counters_taken());
        let mut block = CounterBlock::default();
        let next = block.next_counter(&new).expect("counter");
        assert!(next >= 300, "no nonce of the old process again: {next}");
        assert_eq!(new.max_received_counter(), 9001);
        assert!(new.received_any());
        for c in [5u64, 9000, 9001] {
            assert!(new.replay.check_and_mark(c).is_err(), "{c} is a replay");
        }
        new.replay
            .check_and_mark(8999)
            .expect("inside the window, never seen");
        assert!(matches!(
            Session::restored(&keys(true), 0, &words[..3], max),
            Err(SessionError::ReplayWindow { words: 3, .. })
        ));
    }

    #[test]
    fn counters_are_unique_across_threads() {
        let session = Session::new(&keys(true)).expect("session");
        const PER_THREAD: usize = 100_000;
        let mut all: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let session = &session;
                    s.spawn(move || {
                        let mut block = CounterBlock::default();
                        let mut got = Vec::with_capacity(PER_THREAD);
                        for i in 0..PER_THREAD {
                            got.push(block.next_counter(session).expect("counter"));
                            // Uneven rates, so blocks go stale and get abandoned too.
                            if t == 0 && i % 1000 == 0 {
                                std::thread::yield_now();
                            }
                        }
                        got
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a counter was handed out twice");
        assert!(session.counters_taken() >= n as u64);
    }

    #[test]
    fn one_fetch_add_per_block() {
        let session = Session::new(&keys(true)).expect("session");
        let mut block = CounterBlock::default();
        for expect in 0..COUNTER_BLOCK {
            assert_eq!(block.next_counter(&session), Ok(expect));
        }
        assert_eq!(session.counters_taken(), COUNTER_BLOCK);
        assert_eq!(block.next_counter(&session), Ok(COUNTER_BLOCK));
        assert_eq!(session.counters_taken(), 2 * COUNTER_BLOCK);
    }

    #[test]
    fn stale_block_is_abandoned() {
        let session = Session::new(&keys(true)).expect("session");
        let (mut idle, mut busy) = (CounterBlock::default(), CounterBlock::default());
        assert_eq!(idle.next_counter(&session), Ok(0));
        for _ in 0..COUNTER_STALE_AFTER + 2 * COUNTER_BLOCK {
            busy.next_counter(&session).expect("counter");
        }
        let c = idle.next_counter(&session).expect("counter");
        assert!(
            c > COUNTER_STALE_AFTER,
            "idle worker went on with counter {c} far behind the others"
        );
    }

    #[test]
    fn block_is_bound_to_its_session() {
        let (a, b) = (
            Session::new(&keys(true)).expect("session"),
            Session::new(&keys(true)).expect("session"),
        );
        let mut block = CounterBlock::default();
        assert_eq!(block.next_counter(&a), Ok(0));
        assert_eq!(block.next_counter(&a), Ok(1));
        // A new session (rekey) starts from its own counter 0, not from a's block.
        assert_eq!(block.next_counter(&b), Ok(0));
        assert_eq!(a.counters_taken(), COUNTER_BLOCK);
    }

    #[test]
    fn counter_limit_is_enforced() {
        let session = Session::new(&keys(true)).expect("session");
        session
            .send_counter
            .0
            .store(REJECT_AFTER_MESSAGES - 1, Ordering::Relaxed);
        let mut block = CounterBlock::default();
        assert_eq!(block.next_counter(&session), Ok(REJECT_AFTER_MESSAGES - 1));
        assert_eq!(
            block.next_counter(&session),
            Err(SealError::CounterExhausted)
        );
        assert!(session.needs_rekey(0));
    }

    #[test]
    fn time_limits() {
        let init = Session::new(&keys(true)).expect("session");
        let resp = Session::new(&keys(false)).expect("session");
        let t0 = 1_000;
        assert!(!init.needs_rekey(t0) && !init.expired(t0));
        assert!(!init.needs_rekey(t0 + REKEY_AFTER_TIME_NS - 1));
        assert!(init.needs_rekey(t0 + REKEY_AFTER_TIME_NS));
        assert!(!resp.needs_rekey(t0 + REKEY_AFTER_TIME_NS));
        assert!(!init.needs_rekey_on_receive(t0 + REKEY_ON_RECEIVE_AFTER_TIME_NS - 1));
        assert!(init.needs_rekey_on_receive(t0 + REKEY_ON_RECEIVE_AFTER_TIME_NS));
        assert!(!resp.needs_rekey_on_receive(t0 + REKEY_ON_RECEIVE_AFTER_TIME_NS));
        assert!(!init.expired(t0 + REJECT_AFTER_TIME_NS - 1));
        assert!(init.expired(t0 + REJECT_AFTER_TIME_NS) && resp.expired(t0 + REJECT_AFTER_TIME_NS));
        // A clock reading before creation is age 0, not an underflow.
        assert!(!init.expired(0));
    }
}
