//! The receive-side sliding replay window (RFC 6479 style), shared by every worker that may
//! receive for a session, without a lock.
//!
//! WireGuard paper section 5.4.6: "the receiver keeps track of the counter, and uses a sliding
//! window to reject messages with counters that have already been seen or that fall outside
//! the window". Linux (`COUNTER_WINDOW_SIZE = 8192 - BITS_PER_LONG`) and wireguard-go
//! (`windowSize = (ringBlocks - 1) * blockBits = 127 * 64`) both accept 8128 counters behind
//! the highest one seen; so does [`REPLAY_WINDOW`].
//!
//! ## Layout: a ring of tagged words
//! RFC 6479 keeps a ring of bitmap words and clears the words it slides over. Clearing is what
//! makes the Linux and wireguard-go versions need a lock when several CPUs receive for one peer.
//! Here every ring slot is one `AtomicU64` holding both a 32-bit bitmap (32 consecutive
//! counters, a "block") and the low 32 bits of that block's number, its tag:
//!
//! ```text
//!  counter c  ->  block = c / 32, bit = c % 32, slot = block % 256, tag = block as u32
//!  slot word  =   tag << 32 | bitmap
//! ```
//!
//! A word whose bitmap is 0 was never written (every write sets a bit): it counts as older
//! than any block. A slot is never cleared ahead of time: the first packet of a newer block
//! finds an older tag and replaces the whole word (new tag, only its own bit) with one compare-and-swap. Every
//! change of a word is a CAS from the value just read, so a word's tag only ever moves forward
//! and a bit is only ever set under the tag it belongs to. That is the whole safety argument:
//! once counter `c` was accepted, its slot holds `tag(c)` with `c`'s bit set, or a newer tag, for
//! ever after; a replay of `c` then fails with [`ReplayError::Replayed`] or
//! [`ReplayError::TooOld`], whichever worker receives it and whatever other workers do at the
//! same time.
//!
//! The highest accepted counter (`max`, updated with `fetch_max` after the slot) only gives the
//! window its WireGuard meaning: a counter [`REPLAY_WINDOW`] or more behind it is too old even
//! if its slot was never reused. `max` is read and written `Relaxed`: a stale read can only let
//! through a counter that is authentic and never seen (the slot decides that), never a replay.
//!
//! ## Limits
//! - 256 slots x 32 bits = 8192 counters of state; the window is 8128 < 8192 - 32, so every
//!   counter inside it has a slot of its own (no two live blocks share a slot).
//! - Tags are 32 bits of the block number and compared with wrapping arithmetic: correct while
//!   the counters of a session move less than 2^31 blocks (2^36 counters) in one jump. A
//!   WireGuard sender counts up from 0 (sluice's workers leave gaps of at most a few counter
//!   blocks, see `session`), and a session carries at most REJECT_AFTER_TIME (180 s) of
//!   traffic: 2^36 counters in 180 s would be 380 Mpps to one peer.
//! - A CAS that keeps losing to other workers is retried [`MAX_CAS_ATTEMPTS`] times, then the
//!   packet is dropped as [`ReplayError::Contended`] (never seen with two workers; counted).
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters this far (or further) behind the highest one accepted are rejected as too old
/// (Linux and wireguard-go: 8192 - 64).
pub const REPLAY_WINDOW: u64 = 8128;

/// Counters per ring slot (the bitmap half of a slot word).
const BLOCK_BITS: u64 = 32;
/// Slots in the ring.
const SLOTS: usize = 256;
/// Bounded retries of one slot's compare-and-swap.
pub const MAX_CAS_ATTEMPTS: u32 = 64;

// Every counter inside the window must have a slot its block does not share with a newer one.
const _: () = assert!(REPLAY_WINDOW + BLOCK_BITS <= SLOTS as u64 * BLOCK_BITS);

/// Why a counter is not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The counter was accepted before.
    #[error("counter already received (replayed message)")]
    Replayed,
    /// The counter is REPLAY_WINDOW or more behind the highest one accepted.
    #[error("counter too far behind the replay window")]
    TooOld,
    /// Other receivers kept changing the counter's slot; dropped rather than spinning.
    #[error("replay window slot contended; dropped")]
    Contended,
}

/// The replay window of one session's receive direction. `Sync`: any worker may call
/// [`ReplayWindow::check_and_mark`] at any time.
pub struct ReplayWindow {
    slots: [AtomicU64; SLOTS],
    /// Highest counter accepted so far (0 before the first).
    max: AtomicU64,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("max", &self.max.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[inline]
fn locate(counter: u64) -> (usize, u32, u64) {
    let block = counter / BLOCK_BITS;
    let slot = (block % SLOTS as u64) as usize;
    let tag = block as u32;
    let bit = 1u64 << (counter % BLOCK_BITS);
    (slot, tag, bit)
}

/// Signed distance from the tag in a slot word to `tag` (positive: the word is older). A word
/// whose bitmap is empty was never written (every write sets a bit): older than anything.
#[inline]
fn tag_distance(tag: u32, word: u64) -> i32 {
    if word as u32 == 0 {
        return 1;
    }
    tag.wrapping_sub((word >> 32) as u32) as i32
}

impl ReplayWindow {
    /// An empty window: every counter from 0 up is new.
    pub fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            max: AtomicU64::new(0),
        }
    }

    /// The window's words and highest counter, for a hot restart (read while no worker
    /// receives on the session, or the copy may miss the last marks).
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        (
            self.slots
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            self.max.load(Ordering::Acquire),
        )
    }

    /// A window continuing [`ReplayWindow::snapshot`]: the same counters are replays.
    /// `None` when `words` is not a whole window.
    pub fn restored(words: &[u64], max: u64) -> Option<Self> {
        if words.len() != SLOTS {
            return None;
        }
        Some(Self {
            slots: std::array::from_fn(|i| AtomicU64::new(words[i])),
            max: AtomicU64::new(max),
        })
    }

    /// The highest counter accepted so far (0 before the first).
    pub fn max_accepted(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Read-only pre-check, for use before spending the AEAD on a message: `Err` when the
    /// counter is certainly not acceptable now. `Ok` is no promise:
    /// [`ReplayWindow::check_and_mark`] decides after authentication.
    #[inline]
    pub fn precheck(&self, counter: u64) -> Result<(), ReplayError> {
        if counter.saturating_add(REPLAY_WINDOW) <= self.max.load(Ordering::Relaxed) {
            return Err(ReplayError::TooOld);
        }
        let (slot, tag, bit) = locate(counter);
        let word = self.slots[slot].load(Ordering::Relaxed);
        match tag_distance(tag, word) {
            d if d < 0 => Err(ReplayError::TooOld),
            0 if word & bit != 0 => Err(ReplayError::Replayed),
            _ => Ok(()),
        }
    }

    /// Accepts `counter` once: `Ok` the first time it is seen inside the window, `Err` for a
    /// replay, a counter that is too old, or a slot that stayed contended. Call it only for
    /// authenticated messages (the window must not move for forgeries).
    #[inline]
    pub fn check_and_mark(&self, counter: u64) -> Result<(), ReplayError> {
        if counter.saturating_add(REPLAY_WINDOW) <= self.max.load(Ordering::Relaxed) {
            return Err(ReplayError::TooOld);
        }
        let (slot, tag, bit) = locate(counter);
        let cell = &self.slots[slot];
        let mut word = cell.load(Ordering::Relaxed);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let new = match tag_distance(tag, word) {
                d if d < 0 => return Err(ReplayError::TooOld),
                0 if word & bit != 0 => return Err(ReplayError::Replayed),
                0 => word | bit,
                // An older block: this block takes the slot over, with only this bit.
                _ => (u64::from(tag) << 32) | bit,
            };
            match cell.compare_exchange_weak(word, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    self.max.fetch_max(counter, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => word = now,
            }
        }
        Err(ReplayError::Contended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_counters_are_accepted_once() {
        let w = ReplayWindow::new();
        for c in 0..20_000 {
            assert_eq!(w.check_and_mark(c), Ok(()), "counter {c}");
        }
        for c in 20_000 - REPLAY_WINDOW..20_000 {
            assert_eq!(
                w.check_and_mark(c),
                Err(ReplayError::Replayed),
                "counter {c}"
            );
        }
        assert_eq!(w.max_accepted(), 19_999);
    }

    #[test]
    fn reordered_within_window_accepted_and_duplicates_rejected() {
        let w = ReplayWindow::new();
        assert_eq!(w.check_and_mark(5000), Ok(()));
        assert_eq!(w.check_and_mark(4999), Ok(()));
        assert_eq!(w.check_and_mark(0), Ok(()));
        assert_eq!(w.check_and_mark(0), Err(ReplayError::Replayed));
        assert_eq!(w.check_and_mark(5000), Err(ReplayError::Replayed));
        assert_eq!(w.precheck(4999), Err(ReplayError::Replayed));
        assert_eq!(w.precheck(4998), Ok(()));
    }

    #[test]
    fn window_edge_is_exactly_8128() {
        let w = ReplayWindow::new();
        let top = 100_000;
        assert_eq!(w.check_and_mark(top), Ok(()));
        assert_eq!(w.precheck(top - REPLAY_WINDOW), Err(ReplayError::TooOld));
        assert_eq!(
            w.check_and_mark(top - REPLAY_WINDOW),
            Err(ReplayError::TooOld)
        );
        assert_eq!(w.check_and_mark(top - REPLAY_WINDOW + 1), Ok(()));
        assert_eq!(
            w.check_and_mark(top - REPLAY_WINDOW + 1),
            Err(ReplayError::Replayed)
        );
    }

    #[test]
    fn slots_are_reused_after_the_ring_wraps() {
        // Counter 7 and counter 7 + 8192 share slot 0; the newer block takes the slot over and
        // its bits start empty, and the older block is then too old.
        let w = ReplayWindow::new();
        assert_eq!(w.check_and_mark(7), Ok(()));
        assert_eq!(w.check_and_mark(8), Ok(()));
        assert_eq!(w.check_and_mark(7 + 8192), Ok(()));
        assert_eq!(w.check_and_mark(8 + 8192), Ok(()));
        assert_eq!(w.check_and_mark(8 + 8192), Err(ReplayError::Replayed));
        assert_eq!(w.check_and_mark(7), Err(ReplayError::TooOld));
        // Many laps of the ring in order, each counter once.
        for c in 9000..9000 + 5 * 8192 {
            assert_eq!(w.check_and_mark(c), Ok(()), "counter {c}");
        }
    }

    #[test]
    fn big_jump_makes_everything_before_too_old() {
        let w = ReplayWindow::new();
        assert_eq!(w.check_and_mark(10), Ok(()));
        assert_eq!(w.check_and_mark(1 << 40), Ok(()));
        assert_eq!(w.check_and_mark(11), Err(ReplayError::TooOld));
        assert_eq!(w.check_and_mark((1 << 40) - 1), Ok(()));
    }

    #[test]
    fn largest_counters_do_not_overflow() {
        let w = ReplayWindow::new();
        let top = u64::MAX - 1;
        assert_eq!(w.check_and_mark(top), Ok(()));
        assert_eq!(w.check_and_mark(top), Err(ReplayError::Replayed));
        assert_eq!(w.check_and_mark(top - 1), Ok(()));
        assert_eq!(w.check_and_mark(0), Err(ReplayError::TooOld));
    }

    #[test]
    fn concurrent_receivers_accept_each_counter_exactly_once() {
        // Four threads receive the same 200k counters (each in its own shuffled-ish order):
        // every counter must be accepted by exactly one of them.
        const N: u64 = 200_000;
        let w = ReplayWindow::new();
        let accepted: Vec<AtomicU64> = (0..N).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (w, accepted) = (&w, &accepted);
                s.spawn(move || {
                    // Walk in small reordered chunks so threads race on the same slots.
                    for base in (0..N).step_by(64) {
                        for i in 0..64 {
                            let c = base + (i * 37 + t * 11) % 64;
                            if c < N && w.check_and_mark(c).is_ok() {
                                accepted[c as usize].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let mut once = 0;
        for (c, a) in accepted.iter().enumerate() {
            let a = a.load(Ordering::Relaxed);
            assert!(a <= 1, "counter {c} accepted {a} times");
            once += a;
        }
        // Threads run close together, so almost all counters are inside the window when they
        // arrive; losing a few as too old is allowed, losing many means the window is broken.
        assert!(once > N * 9 / 10, "only {once} of {N} accepted");
    }

    /// Reference model: the WireGuard window semantics with a plain set.
    struct Model {
        seen: std::collections::BTreeSet<u64>,
        max: u64,
    }
    impl Model {
        fn check(&mut self, c: u64) -> Result<(), ReplayError> {
            if c.saturating_add(REPLAY_WINDOW) <= self.max {
                return Err(ReplayError::TooOld);
            }
            if !self.seen.insert(c) {
                return Err(ReplayError::Replayed);
            }
            self.max = self.max.max(c);
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn matches_the_reference_model(
            start in 0u64..u64::MAX / 2,
            steps in proptest::collection::vec((0u64..20_000, any::<bool>()), 1..400),
        ) {
            // A moving position with jumps forward and back (inside and outside the window,
            // across ring laps), duplicates included.
            let w = ReplayWindow::new();
            let mut model = Model { seen: Default::default(), max: 0 };
            let mut pos = start;
            for (delta, back) in steps {
                pos = if back { pos.saturating_sub(delta) } else { pos.saturating_add(delta) };
                // The pre-check never refuses what the window would accept.
                prop_assert!(!(w.precheck(pos).is_err() && model.clone_check(pos).is_ok()));
                prop_assert_eq!(w.check_and_mark(pos), model.check(pos), "counter {}", pos);
            }
        }

        #[test]
        fn every_duplicate_is_rejected(counters in proptest::collection::vec(0u64..50_000, 1..300)) {
            let w = ReplayWindow::new();
            let mut accepted = std::collections::HashSet::new();
            for c in counters {
                if w.check_and_mark(c).is_ok() {
                    prop_assert!(accepted.insert(c), "counter {} accepted twice", c);
                }
            }
        }
    }

    impl Model {
        /// What `check` would say, without recording.
        fn clone_check(&self, c: u64) -> Result<(), ReplayError> {
            if c.saturating_add(REPLAY_WINDOW) <= self.max {
                Err(ReplayError::TooOld)
            } else if self.seen.contains(&c) {
                Err(ReplayError::Replayed)
            } else {
                Ok(())
            }
        }
    }
}
