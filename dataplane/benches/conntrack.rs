//! Conntrack per-operation cost at several fill levels: `cargo bench -p dataplane --bench
//! conntrack`.
//!
//! One table of capacity 2^21 (2M flows, 200 MiB), filled to 1k, 100k and 1M flows (each with
//! an original and a reply key). Keys are visited in a scattered order (a stride co-prime with
//! the fill), so large fills pay the cache misses a worker would. Cases:
//! - `lookup_hit`: a live key (alternating original and reply direction);
//! - `lookup_miss`: a key never inserted;
//! - `insert_remove`: insert a new flow then remove it (fill level stays constant).
//!
//! The per-op cost should stay flat in the fill level (bounded probes: two buckets per key);
//! what grows is the cache-miss share once the table outgrows the CPU caches. After each fill
//! it prints the evictions (expected `[0, 0, 0]` at every fill, 1M included) and the cuckoo
//! displacements. Figures of the last run are in the module doc of `conntrack`.
use std::{hint::black_box, net::Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::{
    conntrack::{Config, Conntrack, FlowKey, Timeouts, TCP_SYN},
    stages::nat::NatRewrite,
};

const CAPACITY: usize = 1 << 21;
const FILLS: [usize; 3] = [1_000, 100_000, 1_000_000];
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
/// Odd stride for scattered visiting order.
const STRIDE: usize = 0x9E37_79B1;

fn key(i: usize) -> FlowKey {
    FlowKey {
        src: Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i as u32)),
        dst: Ipv4Addr::new(10, 96, (i >> 16) as u8, 10),
        sport: (i as u16) | 1024,
        dport: 80,
        proto: 6,
    }
}

fn rw() -> NatRewrite {
    NatRewrite::dnat(BACKEND, 8080)
}

fn fill(ct: &mut Conntrack, from: usize, to: usize) {
    for i in from..to {
        let k = key(i);
        let f = ct.new_flow(6, TCP_SYN, Some(rw()), i as u16, 0);
        let _ = ct.insert(&k, &k.reply_key(&rw()), f, 0);
    }
}

fn bench(c: &mut Criterion) {
    let mut ct = Conntrack::new(Config {
        capacity: CAPACITY,
        seed: 0x1234_5678,
        timeouts: Timeouts::default(),
    })
    .expect("capacity is a power of two");
    let now = 1;
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
    let mut filled = 0;
    for n in FILLS {
        fill(&mut ct, filled, n);
        filled = n;
        g.bench_with_input(BenchmarkId::new("lookup_hit", n), &n, |b, &n| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + STRIDE) % n;
                let k = if i & 1 == 0 {
                    key(i)
                } else {
                    key(i).reply_key(&rw())
                };
                black_box(ct.lookup(black_box(&k), now).map(|f| f.backend))
            })
        });
        g.bench_with_input(BenchmarkId::new("lookup_miss", n), &n, |b, &n| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + STRIDE) % n;
                let k = key(CAPACITY * 4 + i);
                black_box(ct.lookup(black_box(&k), now).is_some())
            })
        });
        g.bench_with_input(BenchmarkId::new("insert_remove", n), &n, |b, &n| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + STRIDE) % n;
                let k = key(CAPACITY * 8 + i);
                let f = ct.new_flow(6, TCP_SYN, Some(rw()), 0, now);
                let _ = black_box(ct.insert(&k, &k.reply_key(&rw()), f, now));
                black_box(ct.remove(&k))
            })
        });
        // Evictions (expired, table full, buckets full) during the run: expected zero at
        // every fill (the 1M case showed 2 `buckets_full` while inserts were first-fit into
        // the first bucket; see the module doc of conntrack), and displacements rare.
        eprintln!(
            "fill {n}: len {} evictions {:?} displaced {}",
            ct.len(),
            ct.stats().evictions,
            ct.stats().displaced
        );
        filled = ct.len().min(filled);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
