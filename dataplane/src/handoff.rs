//! Handoff between workers: how both directions of a flow meet the worker that owns its state.
//!
//! Conntrack is per worker (no locks, no shared cache lines per packet). A flow's packets can
//! arrive on any worker: a pod's veth queue is chosen by the CPU the pod sent from, the uplink's
//! by the NIC's hash. So `stages::lb` computes each stateful packet's *owner* from its headers
//! alone, the same for both directions (see `stages::lb::owner`), and a worker that is not the
//! owner copies the frame here, into a single-producer single-consumer ring from it to the
//! owner; the owner copies it into one of its own frames and goes on where the pipeline
//! stopped (`pipeline::process_resumed`). UMEMs are per worker, so the frame is copied, not
//! passed.
//!
//! **Measured** (`cargo bench -p dataplane --bench services -- steering`, 2-vCPU VM, two
//! threads):
//! - `handoff_cross_thread_64B`: 77-98 ns per frame handed from one core to the other. That
//!   covers both copies and the ring's cache lines. On one thread, push + drain costs 6.6 ns
//!   (64 B) and 33 ns (1400 B), group `handoff`.
//! - `shared_entry_2_threads`: 44-50 ns per packet when two cores update one flow entry (a
//!   plain atomic add and store on one cache line, without the synchronisation a real shared
//!   table needs for inserts, eviction and consistent reads). Per-core entries take 6.4 ns.
//!
//! So on this machine a lock-free shared table would cost less per crossing packet than the
//! handoff, at least 44 ns against 77-98 ns. The handoff was kept for three reasons:
//! - it keeps the rule "no shared atomics written by several cores";
//! - it needs no concurrent insert, evict or GC protocol in the conntrack table;
//! - its cost falls only on the packets that arrive on the other worker.
//!
//! A real shared table should be built and measured before this is settled.
//!
//! One lane per ordered pair of workers: `n * (n - 1)` lanes of [`LANE_SLOTS`] slots of
//! [`SLOT_BYTES`], allocated at start. A full lane drops the frame (`handoff_full`): a worker
//! that cannot keep up must not stall the others. A consumer sleeping in poll(2) is woken
//! through its eventfd, written only when it says it sleeps (so never per packet under load).
use std::{
    cell::UnsafeCell,
    os::fd::RawFd,
    sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering},
};

use crate::{drop_reason::DropReason, pipeline::Resume};

/// Bytes per slot: a frame of up to 1500 bytes of IP plus Ethernet, or a decapsulated one.
pub const SLOT_BYTES: usize = 2048;
/// Slots per lane (a power of two).
pub const LANE_SLOTS: usize = 512;

struct Slot {
    len: u32,
    rx_ifindex: u32,
    resume: Resume,
    data: [u8; SLOT_BYTES],
}

#[repr(align(64))]
struct Padded(AtomicUsize);

/// One single-producer single-consumer ring.
struct Lane {
    slots: Box<[UnsafeCell<Slot>]>,
    /// Next slot the consumer reads (written by the consumer only).
    head: Padded,
    /// Next slot the producer writes (written by the producer only).
    tail: Padded,
}

// SAFETY: a slot is written only by the single producer while `tail - head < LANE_SLOTS` says
// the consumer is not reading it, and read only by the single consumer after the producer's
// Release store of `tail` made the write visible (Acquire load); `Handoff` enforces one
// producer (worker `from`) and one consumer (worker `to`) per lane by construction.
unsafe impl Sync for Lane {}

impl Lane {
    fn new() -> Self {
        let slots = (0..LANE_SLOTS)
            .map(|_| {
                UnsafeCell::new(Slot {
                    len: 0,
                    rx_ifindex: 0,
                    resume: Resume::Pod,
                    data: [0; SLOT_BYTES],
                })
            })
            .collect();
        Self {
            slots,
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
        }
    }
}

/// A worker's wake-up: its eventfd and whether it is (about to be) asleep.
struct Waker {
    sleeping: AtomicBool,
    fd: AtomicI32,
}

/// All lanes and wakers of a dataplane.
pub struct Handoff {
    workers: usize,
    /// `from * workers + to`; `None` on the diagonal.
    lanes: Vec<Option<Lane>>,
    wakers: Vec<Waker>,
}

impl Handoff {
    /// Lanes for `workers` workers (none for one worker).
    pub fn new(workers: usize) -> Self {
        let lanes = if workers > 1 {
            (0..workers * workers)
                .map(|i| (i / workers != i % workers).then(Lane::new))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            workers,
            lanes,
            wakers: (0..workers)
                .map(|_| Waker {
                    sleeping: AtomicBool::new(false),
                    fd: AtomicI32::new(-1),
                })
                .collect(),
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Registers worker `w`'s eventfd (written to wake it).
    pub fn set_waker(&self, w: usize, fd: RawFd) {
        if let Some(k) = self.wakers.get(w) {
            k.fd.store(fd, Ordering::Release);
        }
    }

    #[inline]
    fn lane(&self, from: usize, to: usize) -> Option<&Lane> {
        self.lanes.get(from * self.workers + to)?.as_ref()
    }

    /// Copies `frame` into the lane from `from` to `to`. Must only be called by worker `from`.
    #[inline]
    pub fn push(
        &self,
        from: usize,
        to: usize,
        rx_ifindex: u32,
        resume: Resume,
        frame: &[u8],
    ) -> Result<(), DropReason> {
        if frame.len() > SLOT_BYTES {
            return Err(DropReason::HandoffTooBig);
        }
        let lane = match self.lane(from, to) {
            Some(l) if from != to => l,
            _ => return Err(DropReason::HandoffFull),
        };
        let tail = lane.tail.0.load(Ordering::Relaxed);
        let head = lane.head.0.load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= LANE_SLOTS {
            return Err(DropReason::HandoffFull);
        }
        // SAFETY: see `impl Sync for Lane`: the consumer does not touch this slot until the
        // Release store below publishes it.
        let slot = unsafe { &mut *lane.slots[tail & (LANE_SLOTS - 1)].get() };
        slot.len = frame.len() as u32;
        slot.rx_ifindex = rx_ifindex;
        slot.resume = resume;
        slot.data[..frame.len()].copy_from_slice(frame);
        lane.tail.0.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Wakes worker `to` if it sleeps (call once per batch after pushing to it).
    #[inline]
    pub fn wake(&self, to: usize) {
        let Some(k) = self.wakers.get(to) else { return };
        if k.sleeping.load(Ordering::Acquire) {
            let fd = k.fd.load(Ordering::Acquire);
            if fd >= 0 {
                let one: u64 = 1;
                // SAFETY: an 8-byte write of a local u64 to the worker's eventfd (EFD_NONBLOCK;
                // EAGAIN when the counter is saturated is fine: it is awake then).
                unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
            }
        }
    }

    /// Worker `w` announces it is going to sleep (true) or is awake (false). After announcing
    /// sleep it must check [`Handoff::pending`] once more before poll(2), so a frame pushed in
    /// between is not left waiting.
    pub fn set_sleeping(&self, w: usize, sleeping: bool) {
        if let Some(k) = self.wakers.get(w) {
            k.sleeping.store(sleeping, Ordering::SeqCst);
        }
    }

    /// Whether any lane into `to` holds frames.
    pub fn pending(&self, to: usize) -> bool {
        (0..self.workers).any(|from| {
            self.lane(from, to).is_some_and(|l| {
                from != to && l.tail.0.load(Ordering::SeqCst) != l.head.0.load(Ordering::Relaxed)
            })
        })
    }

    /// Takes up to `max` frames from the lane `from -> to`, calling `f(rx_ifindex, resume,
    /// bytes)` for each. Must only be called by worker `to`. Returns how many were taken.
    #[inline]
    pub fn drain(
        &self,
        from: usize,
        to: usize,
        max: usize,
        mut f: impl FnMut(u32, Resume, &[u8]),
    ) -> usize {
        let Some(lane) = self.lane(from, to).filter(|_| from != to) else {
            return 0;
        };
        let head = lane.head.0.load(Ordering::Relaxed);
        let tail = lane.tail.0.load(Ordering::Acquire);
        let n = tail.wrapping_sub(head).min(max);
        for i in 0..n {
            // SAFETY: slots head..tail were published by the producer (Acquire above) and it
            // does not write them again until `head` moves past them (Release below).
            let slot = unsafe { &*lane.slots[head.wrapping_add(i) & (LANE_SLOTS - 1)].get() };
            f(
                slot.rx_ifindex,
                slot.resume,
                &slot.data[..slot.len as usize],
            );
        }
        lane.head.0.store(head.wrapping_add(n), Ordering::Release);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn frames_arrive_in_order_with_their_metadata() {
        let h = Handoff::new(2);
        h.push(0, 1, 7, Resume::Pod, &[1, 2, 3]).unwrap();
        let overlay = Resume::Overlay;
        h.push(0, 1, 9, overlay, &[4; 100]).unwrap();
        assert!(h.pending(1));
        assert!(!h.pending(0));
        let mut got = Vec::new();
        assert_eq!(
            h.drain(0, 1, 16, |ifx, r, b| got.push((ifx, r, b.to_vec()))),
            2
        );
        assert_eq!(got[0], (7, Resume::Pod, vec![1, 2, 3]));
        assert_eq!(got[1], (9, overlay, vec![4; 100]));
        assert!(!h.pending(1));
    }

    #[test]
    fn full_lane_and_oversize_are_drop_reasons() {
        let h = Handoff::new(2);
        for _ in 0..LANE_SLOTS {
            h.push(1, 0, 1, Resume::Pod, &[0; 60]).unwrap();
        }
        assert_eq!(
            h.push(1, 0, 1, Resume::Pod, &[0; 60]),
            Err(DropReason::HandoffFull)
        );
        assert_eq!(
            h.push(0, 1, 1, Resume::Pod, &[0; SLOT_BYTES + 1]),
            Err(DropReason::HandoffTooBig)
        );
        assert_eq!(h.drain(1, 0, 10, |_, _, _| {}), 10);
        h.push(1, 0, 1, Resume::Pod, &[0; 60]).unwrap();
        assert_eq!(
            h.push(0, 0, 1, Resume::Pod, &[0; 1]),
            Err(DropReason::HandoffFull)
        );
        assert_eq!(
            Handoff::new(1).push(0, 0, 1, Resume::Pod, &[0]),
            Err(DropReason::HandoffFull)
        );
    }

    #[test]
    fn concurrent_producer_and_consumer_lose_nothing() {
        let h = Arc::new(Handoff::new(2));
        let p = Arc::clone(&h);
        let total = 200_000u32;
        let producer = std::thread::spawn(move || {
            let mut i = 0u32;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while i < total && std::time::Instant::now() < deadline {
                if p.push(0, 1, i, Resume::Pod, &i.to_le_bytes()).is_ok() {
                    i += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            i
        });
        let mut next = 0u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while next < total && std::time::Instant::now() < deadline {
            let n = h.drain(0, 1, 64, |ifx, _, b| {
                assert_eq!(ifx, next);
                assert_eq!(b, next.to_le_bytes());
                next += 1;
            });
            if n == 0 {
                std::thread::yield_now();
            }
        }
        assert_eq!(producer.join().unwrap(), total);
        assert_eq!(next, total);
    }
}
