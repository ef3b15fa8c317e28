//! Single-producer/single-consumer rings shared with the kernel (mmap'd from the socket).
//!
//! Producer side (fill, tx): `reserve` slots against a cached consumer index, write them,
//! `submit` publishes the producer index with Release ordering. Consumer side (rx, completion):
//! `peek` against a cached producer index (Acquire), read, `release`. Batched as in xdpilone and
//! libxdp's xsk.h: the shared indices are touched once per batch, not per entry.
use std::{
    marker::PhantomData,
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use super::sys;

/// One mmap'd ring: its mapping, the shared indices and the entry array.
pub struct RingMap<T> {
    map: NonNull<libc::c_void>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    entries: NonNull<T>,
    mask: u32,
    size: u32,
    _t: PhantomData<T>,
}

// SAFETY: the mapping is owned by this value; the ring protocol (one user-space side per ring,
// the kernel on the other) is upheld by the owners (one worker thread owns each socket).
unsafe impl<T: Send> Send for RingMap<T> {}

impl<T: Copy> RingMap<T> {
    /// Maps the ring of `size` entries at `pgoff` of `fd` using the kernel's `off` layout.
    pub fn map(
        fd: libc::c_int,
        pgoff: libc::off_t,
        off: &sys::xdp_ring_offset,
        size: u32,
    ) -> std::io::Result<Self> {
        let map_len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        // SAFETY: mapping a kernel-provided ring of a valid socket fd; length and offset come
        // from XDP_MMAP_OFFSETS for this socket; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = ptr as *mut u8;
        // SAFETY: offsets lie within the mapping (kernel contract); the fields are u32-aligned.
        let at = |o: u64| unsafe { NonNull::new_unchecked(base.add(o as usize)) };
        Ok(Self {
            map: NonNull::new(ptr).ok_or_else(std::io::Error::last_os_error)?,
            map_len,
            producer: at(off.producer).cast(),
            consumer: at(off.consumer).cast(),
            flags: at(off.flags).cast(),
            entries: at(off.desc).cast(),
            mask: size - 1,
            size,
            _t: PhantomData,
        })
    }

    #[inline]
    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping; the kernel treats it as an atomic u32.
        unsafe { self.producer.as_ref() }
    }
    #[inline]
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { self.consumer.as_ref() }
    }
    /// True when the kernel asks to be woken (XDP_RING_NEED_WAKEUP).
    #[inline]
    pub fn needs_wakeup(&self) -> bool {
        // SAFETY: as above.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & sys::XDP_RING_NEED_WAKEUP != 0
    }
    #[inline]
    fn read(&self, idx: u32) -> T {
        // SAFETY: idx & mask < size: within the entry array of the live mapping.
        unsafe {
            self.entries
                .as_ptr()
                .add((idx & self.mask) as usize)
                .read_volatile()
        }
    }
    #[inline]
    fn write(&self, idx: u32, v: T) {
        // SAFETY: as in `read`; the slot was reserved by the producer side (owned by us).
        unsafe {
            self.entries
                .as_ptr()
                .add((idx & self.mask) as usize)
                .write_volatile(v)
        }
    }
    pub fn size(&self) -> u32 {
        self.size
    }
}

impl<T> Drop for RingMap<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`.
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

/// User space produces (fill ring, tx ring).
pub struct ProdRing<T> {
    ring: RingMap<T>,
    cached_prod: u32,
    cached_cons: u32,
}

impl<T: Copy> ProdRing<T> {
    pub fn new(ring: RingMap<T>) -> Self {
        let cached_prod = ring.producer().load(Ordering::Relaxed);
        let cached_cons = ring
            .consumer()
            .load(Ordering::Acquire)
            .wrapping_add(ring.size);
        Self {
            ring,
            cached_prod,
            cached_cons,
        }
    }
    /// Free slots, refreshing the consumer index only when the cache says fewer than `want`.
    #[inline]
    pub fn free(&mut self, want: u32) -> u32 {
        let free = self.cached_cons.wrapping_sub(self.cached_prod);
        if free >= want {
            return free;
        }
        self.cached_cons = self
            .ring
            .consumer()
            .load(Ordering::Acquire)
            .wrapping_add(self.ring.size);
        self.cached_cons.wrapping_sub(self.cached_prod)
    }
    /// Writes one entry if a slot is free (not visible to the kernel before `submit`).
    #[inline]
    pub fn push(&mut self, v: T) -> bool {
        if self.free(1) == 0 {
            return false;
        }
        self.ring.write(self.cached_prod, v);
        self.cached_prod = self.cached_prod.wrapping_add(1);
        true
    }
    /// Publishes everything pushed so far.
    #[inline]
    pub fn submit(&mut self) {
        self.ring
            .producer()
            .store(self.cached_prod, Ordering::Release);
    }
    /// Entries the kernel has not consumed yet: `(first index, count)`, for reclaiming frames
    /// when a socket is torn down.
    pub fn unconsumed(&self) -> (u32, u32) {
        let cons = self.ring.consumer().load(Ordering::Acquire);
        (cons, self.cached_prod.wrapping_sub(cons))
    }
    pub fn entry(&self, idx: u32) -> T {
        self.ring.read(idx)
    }
    /// Entries published and not yet consumed by the kernel.
    pub fn pending(&self) -> u32 {
        self.unconsumed().1
    }
    pub fn needs_wakeup(&self) -> bool {
        self.ring.needs_wakeup()
    }
}

/// User space consumes (rx ring, completion ring).
pub struct ConsRing<T> {
    ring: RingMap<T>,
    cached_prod: u32,
    cached_cons: u32,
}

impl<T: Copy> ConsRing<T> {
    pub fn new(ring: RingMap<T>) -> Self {
        let cached_cons = ring.consumer().load(Ordering::Relaxed);
        let cached_prod = ring.producer().load(Ordering::Acquire);
        Self {
            ring,
            cached_prod,
            cached_cons,
        }
    }
    /// Number of entries ready (at most `max`), refreshing the producer index when needed.
    #[inline]
    pub fn available(&mut self, max: u32) -> u32 {
        let mut n = self.cached_prod.wrapping_sub(self.cached_cons);
        if n == 0 {
            self.cached_prod = self.ring.producer().load(Ordering::Acquire);
            n = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        n.min(max)
    }
    /// The `i`-th available entry (i < the last `available`).
    #[inline]
    pub fn get(&self, i: u32) -> T {
        self.ring.read(self.cached_cons.wrapping_add(i))
    }
    /// Gives `n` entries back to the kernel.
    #[inline]
    pub fn release(&mut self, n: u32) {
        self.cached_cons = self.cached_cons.wrapping_add(n);
        self.ring
            .consumer()
            .store(self.cached_cons, Ordering::Release);
    }
    pub fn needs_wakeup(&self) -> bool {
        self.ring.needs_wakeup()
    }
}
