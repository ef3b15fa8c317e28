//! Golden WireGuard transport messages, checked against implementations other than the one
//! `dataplane::wireguard` uses:
//! - fixed bytes made with Python `cryptography` 48 (OpenSSL's ChaCha20-Poly1305), key
//!   00 01 .. 1f, receiver index 0xdeadbeef: a 50-byte VXLAN IPv4 packet at counters 0, 1 and
//!   0x0102030405060708, and a keepalive at counter 0;
//! - RustCrypto's `chacha20poly1305` (the library uses `ring`) for many sizes and counters,
//!   both ways.
//!
//! No published WireGuard transport-message vectors were found (wireguard-go and Linux test the
//! primitives and the handshake, not transport bytes); the interop tests with wireguard-go cover
//! the rest.
//!
//! Also here, since it needs its own global allocator: seal and open allocate nothing.
use std::sync::Arc;

use chacha20poly1305::{aead::AeadInPlace, ChaCha20Poly1305, Key, KeyInit, Nonce};
use dataplane::wireguard::{
    open, padded_len, seal, CounterBlock, OpenError, Opened, Session, SessionKeys, SessionTable,
    TAG_LEN, TRANSPORT_HEADER_LEN,
};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

const KEY: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};
const INDEX: u32 = 0xdead_beef;

/// IPv4 172.18.0.11 -> 172.18.0.12, UDP 40000 -> 8472, VXLAN VNI 1, inner Ethernet header.
const PLAINTEXT: &str = "45000032000040004011e27fac12000bac12000c9c402118001e00000800000000000100\
                         0200000000040200000000030800";
const MSG_COUNTER_0: &str =
    "04000000efbeadde00000000000000005db84203ade6e6d15370be1e03514e2c54a3f3f9\
     7ded7a44ece6fc122235755c7208096dd3ee3c5d9d855a24640e003f93a0f65ede5d59ce0d2a4a7f31955acd0b98\
     21d238dba865e3629eb80a4402d3";
const MSG_COUNTER_1: &str =
    "04000000efbeadde0100000000000000da57f36db52aef1869a74c23fe87998c696feb02\
     db2b41b5c37ab55b85e8dda4d84ad7ace6c8df8b842ff69f8b849c6e4b368566f38c46568514816022846b81728c\
     e560ab4b9570fc49cf03e2644031";
const MSG_COUNTER_0102030405060708: &str =
    "04000000efbeadde0807060504030201b549add6ab39aa1824bac8b3df6a61b34c14f2c814046486572ba75de10\
     2a7dd597c01bdd03209f9103064f0c260e065f4bff6882f9c8c1c82e78da9e975d5dea9385c4a523b0d2895f9a2\
     ec12721bd5";
const KEEPALIVE_COUNTER_0: &str =
    "04000000efbeadde000000000000000010324f800a160bd9a1794255be7ec29d";

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// Our side sends with KEY to a peer whose index is INDEX.
fn sender() -> Session {
    Session::new(&SessionKeys {
        receiver_index: 7,
        peer_index: INDEX,
        send_key: KEY,
        recv_key: [0; 32],
        created_ns: 0,
        initiator: true,
        peer: 2,
    })
    .expect("session")
}

/// Our side receives with KEY, addressed by INDEX.
fn receiver() -> SessionTable {
    SessionTable::new([Arc::new(
        Session::new(&SessionKeys {
            receiver_index: INDEX,
            peer_index: 7,
            send_key: [0; 32],
            recv_key: KEY,
            created_ns: 0,
            initiator: false,
            peer: 9,
        })
        .expect("session"),
    )])
}

const HEAD: usize = 64;

fn seal_vec(s: &Session, block: &mut CounterBlock, pt: &[u8]) -> Vec<u8> {
    let mut buf = vec![0xa5u8; HEAD + pt.len() + 32];
    buf[HEAD..HEAD + pt.len()].copy_from_slice(pt);
    let r = seal(s, block, &mut buf, HEAD..HEAD + pt.len(), 1).expect("seal");
    buf[r].to_vec()
}

#[test]
fn seal_matches_openssl_fixtures() {
    let s = sender();
    let mut block = CounterBlock::default();
    let pt = hex(PLAINTEXT);
    assert_eq!(pt.len(), 50);
    assert_eq!(seal_vec(&s, &mut block, &pt), hex(MSG_COUNTER_0));
    assert_eq!(seal_vec(&s, &mut block, &pt), hex(MSG_COUNTER_1));
    // A keepalive at counter 0 of a fresh session.
    let s = sender();
    let mut block = CounterBlock::default();
    assert_eq!(seal_vec(&s, &mut block, &[]), hex(KEEPALIVE_COUNTER_0));
}

#[test]
fn open_accepts_openssl_fixtures() {
    let table = receiver();
    let pt = hex(PLAINTEXT);
    for (fixture, counter) in [
        (MSG_COUNTER_1, 1),
        (MSG_COUNTER_0, 0),
        (MSG_COUNTER_0102030405060708, 0x0102_0304_0506_0708u64),
    ] {
        let mut msg = hex(fixture);
        let opened = open(&table, &mut msg, 1).expect("open fixture");
        assert_eq!(
            opened,
            Opened {
                peer: 9,
                receiver_index: INDEX,
                counter,
                plaintext: 16..66
            }
        );
        assert_eq!(&msg[opened.plaintext], &pt[..]);
    }
    // Now counter 0 is far behind the window; a fresh session takes the keepalive, once.
    let mut ka = hex(KEEPALIVE_COUNTER_0);
    assert_eq!(open(&table, &mut ka, 1), Err(OpenError::TooOld));
    let table = receiver();
    let mut ka = hex(KEEPALIVE_COUNTER_0);
    assert_eq!(
        open(&table, &mut ka, 1),
        Err(OpenError::Keepalive { peer: 9 })
    );
    let mut ka = hex(KEEPALIVE_COUNTER_0);
    assert_eq!(open(&table, &mut ka, 1), Err(OpenError::Replayed));
}

/// A deterministic IPv4-looking plaintext of `len` bytes (len >= 20).
fn plaintext(len: usize, seed: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The transport message for `pt` at `counter`, built with RustCrypto from the paper's
/// description.
fn reference_message(counter: u64, pt: &[u8]) -> Vec<u8> {
    let mut msg = vec![4u8, 0, 0, 0];
    msg.extend_from_slice(&INDEX.to_le_bytes());
    msg.extend_from_slice(&counter.to_le_bytes());
    let mut body = pt.to_vec();
    body.resize(padded_len(pt.len()), 0);
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    let tag = ChaCha20Poly1305::new(Key::from_slice(&KEY))
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &[], &mut body)
        .expect("RustCrypto seal");
    msg.extend_from_slice(&body);
    msg.extend_from_slice(&tag);
    msg
}

#[test]
fn seal_matches_rustcrypto_for_many_sizes() {
    let s = sender();
    let mut block = CounterBlock::default();
    let sizes = (20..=1500).step_by(37).chain([64, 512, 1400, 1500]);
    for (counter, len) in (0u64..).zip(sizes) {
        let pt = plaintext(len, len as u8);
        let ours = seal_vec(&s, &mut block, &pt);
        assert_eq!(ours, reference_message(counter, &pt), "len {len}");
        assert_eq!(ours.len(), TRANSPORT_HEADER_LEN + padded_len(len) + TAG_LEN);
    }
}

#[test]
fn open_accepts_rustcrypto_messages_and_rejects_tampered_ones() {
    let table = receiver();
    for (i, len) in (20..=1500).step_by(53).enumerate() {
        let counter = 1000 + 3 * i as u64;
        let pt = plaintext(len, 3);
        let mut msg = reference_message(counter, &pt);
        let mut tampered = msg.clone();
        let at = 16 + (i * 7) % (msg.len() - 16);
        tampered[at] ^= 0x40;
        assert_eq!(
            open(&table, &mut tampered, 1),
            Err(OpenError::AuthFailed),
            "len {len}"
        );
        let opened = open(&table, &mut msg, 1).expect("open RustCrypto message");
        assert_eq!(opened.counter, counter);
        assert_eq!(&msg[opened.plaintext], &pt[..], "len {len}");
    }
}

#[test]
fn seal_and_open_allocate_nothing() {
    let s = sender();
    let table = receiver();
    let mut block = CounterBlock::default();
    let pt = plaintext(1400, 1);
    let mut buf = vec![0u8; 2048];
    let mut run = |n: usize| -> usize {
        let mut ok = 0;
        for _ in 0..n {
            buf[HEAD..HEAD + pt.len()].copy_from_slice(&pt);
            let r = seal(&s, &mut block, &mut buf, HEAD..HEAD + pt.len(), 1).expect("seal");
            if open(&table, &mut buf[r], 1).is_ok() {
                ok += 1;
            }
        }
        ok
    };
    run(10);
    let (ok, allocs) = counting_alloc::allocations_during(|| run(5_000));
    assert_eq!(ok, 5_000, "every message opened");
    assert_eq!(allocs, 0, "allocations in seal/open");
    // And the drop paths (replay, forgery, unknown index) allocate nothing either.
    let good = seal_vec(&s, &mut block, &pt);
    let ((), allocs) = counting_alloc::allocations_during(|| {
        let mut m = good.clone();
        let _ = open(&table, &mut m, 1);
        for _ in 0..1000 {
            let mut scratch = [0u8; 1500];
            let n = good.len().min(scratch.len());
            scratch[..n].copy_from_slice(&good[..n]);
            assert_eq!(open(&table, &mut scratch[..n], 1), Err(OpenError::Replayed));
            scratch[4] ^= 1;
            assert_eq!(
                open(&table, &mut scratch[..n], 1),
                Err(OpenError::UnknownReceiver)
            );
        }
    });
    // The one clone above is the only allocation.
    assert_eq!(allocs, 1, "allocations on the drop paths");
}
