//! A global allocator that counts the allocations of threads that opted in, for tests proving
//! that a path allocates nothing (the test harness allocates on its own threads, so only the
//! measuring thread counts). Each test binary installs it:
//!
//! ```ignore
//! #[path = "support/counting_alloc.rs"]
//! mod counting_alloc;
//! #[global_allocator]
//! static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;
//! ```
#![allow(dead_code)]
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
};

pub struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

fn note_alloc() {
    if COUNT_HERE.with(|c| c.get()) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` on this thread with counting on and returns its result and the number of
/// allocations it made. Checks first that the counter counts (it must be the global
/// allocator), or a zero would prove nothing.
pub fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    COUNT_HERE.with(|c| c.set(true));
    let probe = ALLOCS.load(Ordering::Relaxed);
    drop(std::hint::black_box(vec![1u8; 64]));
    assert!(
        ALLOCS.load(Ordering::Relaxed) > probe,
        "the counting allocator does not count: is it the #[global_allocator]?"
    );
    let before = ALLOCS.load(Ordering::Relaxed);
    let r = f();
    let after = ALLOCS.load(Ordering::Relaxed);
    COUNT_HERE.with(|c| c.set(false));
    (r, after - before)
}
