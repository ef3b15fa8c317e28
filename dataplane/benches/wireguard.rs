//! WireGuard transport seal/open throughput per core against the raw AEADs, in the same run:
//! `cargo bench -p dataplane --bench wireguard`.
//!
//! For plaintexts of 64, 512 and 1400 bytes (padded to 64, 512, 1408 as WireGuard does):
//! - `raw_rustcrypto_{seal,open}`: `chacha20poly1305` `encrypt_in_place_detached` /
//!   `decrypt_in_place_detached` on the padded bytes (what `wireguard::seal`/`open` call);
//! - `raw_ring_{seal,open}`: `ring::aead::CHACHA20_POLY1305` (boringtun's AEAD)
//!   `seal_in_place_separate_tag` / `open_in_place`;
//! - `sluice_seal`: `wireguard::seal` (counter block, header, padding, AEAD, tag);
//! - `sluice_open`: `wireguard::open` (lookup, replay window, AEAD, IPv4 length).
//!
//! Open cases copy each message into the working buffer first (it is decrypted in place and a
//! counter opens once); the raw open cases copy the same bytes, so the ratio compares like with
//! like. Messages for `sluice_open` are made up front, 4096 consecutive counters, and a fresh
//! receiving session is used for each round of them.
use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use chacha20poly1305::{aead::AeadInPlace, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::wireguard::{
    nonce_bytes, open, padded_len, seal, CounterBlock, Session, SessionKeys, SessionTable,
};
use ring::aead::{Aad, LessSafeKey, UnboundKey, CHACHA20_POLY1305};

const SIZES: [usize; 3] = [64, 512, 1400];
const KEY: [u8; 32] = [0x42; 32];
const HEAD: usize = 64;
const ROUND: usize = 4096;

fn keys(initiator: bool) -> SessionKeys {
    SessionKeys {
        receiver_index: if initiator { 1 } else { 2 },
        peer_index: if initiator { 2 } else { 1 },
        send_key: KEY,
        recv_key: KEY,
        created_ns: 0,
        initiator,
        peer: 1,
    }
}

fn ipv4(len: usize) -> Vec<u8> {
    let mut p = vec![0x5au8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wireguard");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let rc = ChaCha20Poly1305::new(Key::from_slice(&KEY));
    let rk = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).expect("ring key"));
    for size in SIZES {
        let padded = padded_len(size);
        g.throughput(Throughput::Bytes(size as u64));

        // Raw AEADs, seal.
        let mut data = vec![7u8; padded];
        let mut ctr = 0u64;
        g.bench_with_input(
            BenchmarkId::new("raw_rustcrypto_seal", size),
            &size,
            |b, _| {
                b.iter(|| {
                    ctr += 1;
                    let tag = rc
                        .encrypt_in_place_detached(
                            Nonce::from_slice(&nonce_bytes(ctr)),
                            &[],
                            &mut data,
                        )
                        .expect("seal");
                    black_box(tag);
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("raw_ring_seal", size), &size, |b, _| {
            b.iter(|| {
                ctr += 1;
                let tag = rk
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce_bytes(ctr)),
                        Aad::empty(),
                        &mut data,
                    )
                    .expect("seal");
                black_box(tag.as_ref()[0]);
            })
        });

        // Raw AEADs, open (copy in, verify, decrypt).
        let mut sealed = vec![9u8; padded];
        let tag = rc
            .encrypt_in_place_detached(Nonce::from_slice(&nonce_bytes(5)), &[], &mut sealed)
            .expect("seal");
        let mut with_tag = sealed.clone();
        with_tag.extend_from_slice(&tag);
        let mut work = vec![0u8; padded + 16];
        g.bench_with_input(
            BenchmarkId::new("raw_rustcrypto_open", size),
            &size,
            |b, _| {
                b.iter(|| {
                    work[..padded].copy_from_slice(&sealed);
                    let ok = rc.decrypt_in_place_detached(
                        Nonce::from_slice(&nonce_bytes(5)),
                        &[],
                        &mut work[..padded],
                        Tag::from_slice(&tag),
                    );
                    assert!(ok.is_ok());
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("raw_ring_open", size), &size, |b, _| {
            b.iter(|| {
                work.copy_from_slice(&with_tag);
                let ok = rk.open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(nonce_bytes(5)),
                    Aad::empty(),
                    &mut work,
                );
                assert!(ok.is_ok());
            })
        });

        // sluice seal.
        let sender = Session::new(&keys(true)).expect("session");
        let mut block = CounterBlock::default();
        let pt = ipv4(size);
        let mut buf = vec![0u8; HEAD + padded + 16];
        buf[HEAD..HEAD + size].copy_from_slice(&pt);
        g.bench_with_input(BenchmarkId::new("sluice_seal", size), &size, |b, _| {
            b.iter(|| {
                let r = seal(&sender, &mut block, &mut buf, HEAD..HEAD + size, 1).expect("seal");
                black_box(r);
            })
        });

        // sluice open: a round of messages with consecutive counters, fresh session per round.
        let sender = Session::new(&keys(true)).expect("session");
        let mut block = CounterBlock::default();
        let msgs: Vec<Vec<u8>> = (0..ROUND)
            .map(|_| {
                let mut b = vec![0u8; HEAD + padded + 16];
                b[HEAD..HEAD + size].copy_from_slice(&pt);
                let r = seal(&sender, &mut block, &mut b, HEAD..HEAD + size, 1).expect("seal");
                b[r].to_vec()
            })
            .collect();
        let mut work = vec![0u8; msgs[0].len()];
        g.bench_with_input(BenchmarkId::new("sluice_open", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let table =
                        SessionTable::new([Arc::new(Session::new(&keys(false)).expect("session"))]);
                    let n = left.min(ROUND as u64) as usize;
                    let start = Instant::now();
                    for m in &msgs[..n] {
                        work.copy_from_slice(m);
                        let opened = open(&table, &mut work, 1).expect("open");
                        black_box(opened);
                    }
                    total += start.elapsed();
                    left -= n as u64;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
