//! The primitives WireGuard's handshake is built from (whitepaper §5.4), with the names the paper
//! uses:
//!
//! - `HASH(input)`: BLAKE2s-256.
//! - `MAC(key, input)`: keyed BLAKE2s with a 16-byte output (RFC 7693 keyed mode, not HMAC).
//! - `HMAC(key, input)`: HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, block size 64 bytes).
//! - `KDF_n(key, input)`: HKDF (RFC 5869) with HMAC-BLAKE2s: `τ0 = HMAC(key, input)`,
//!   `τ1 = HMAC(τ0, 0x1)`, `τi = HMAC(τ0, τ(i-1) ‖ i)`; returns `τ1..τn`.
//! - `AEAD(key, counter, plain, auth)`: ChaCha20-Poly1305 (RFC 8439) with the 96-bit nonce
//!   `0x00000000 ‖ little-endian u64 counter`.
//! - `XAEAD(key, nonce, plain, auth)`: XChaCha20-Poly1305 with a random 24-byte nonce (cookies).
//! - `TAI64N()`: 12-byte timestamp, big-endian `2^62 + 10 + unix seconds` then big-endian
//!   nanoseconds, rounded down to 2^24 ns as wireguard-go and the kernel do (whitening).
//!
//! Every function takes its key as a fixed-size array, so no length error can happen at run time.
use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hmac::SimpleHmac;

/// Output length of `HASH` and `HMAC`, and key length of the AEADs.
pub const HASH_LEN: usize = 32;
/// Output length of `MAC` (MAC1, MAC2, cookies).
pub const MAC_LEN: usize = 16;
/// Poly1305 tag length appended by `AEAD`/`XAEAD`.
pub const TAG_LEN: usize = 16;
/// TAI64N timestamp length.
pub const TIMESTAMP_LEN: usize = 12;
/// XChaCha20-Poly1305 nonce length (cookie replies).
pub const XNONCE_LEN: usize = 24;

/// `HASH(parts[0] ‖ parts[1] ‖ ...)`: BLAKE2s-256.
pub fn hash(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// `MAC(key, parts...)`: keyed BLAKE2s-128. `key` is 16 (a cookie) or 32 bytes (a label hash).
pub fn mac<const K: usize>(key: &[u8; K], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // Keys of 1..=32 bytes are accepted by BLAKE2s; K is 16 or 32 at every call site, so the
    // error arm cannot be taken. It still returns a value that matches nothing real rather than
    // panicking.
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0u8; MAC_LEN];
    };
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// `HMAC(key, parts...)`: HMAC-BLAKE2s-256.
pub fn hmac(key: &[u8; HASH_LEN], parts: &[&[u8]]) -> [u8; HASH_LEN] {
    // HMAC accepts keys of any length: the error arm cannot be taken.
    let Ok(mut m) = <SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key) else {
        return [0u8; HASH_LEN];
    };
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// `KDF1(key, input)`.
pub fn kdf1(key: &[u8; HASH_LEN], input: &[u8]) -> [u8; HASH_LEN] {
    let t0 = hmac(key, &[input]);
    hmac(&t0, &[&[1]])
}

/// `KDF2(key, input)`.
pub fn kdf2(key: &[u8; HASH_LEN], input: &[u8]) -> ([u8; HASH_LEN], [u8; HASH_LEN]) {
    let t0 = hmac(key, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

/// `KDF3(key, input)`.
pub fn kdf3(
    key: &[u8; HASH_LEN],
    input: &[u8],
) -> ([u8; HASH_LEN], [u8; HASH_LEN], [u8; HASH_LEN]) {
    let t0 = hmac(key, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    let t3 = hmac(&t0, &[&t2, &[3]]);
    (t1, t2, t3)
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// `AEAD(key, counter, plain, auth)`: ciphertext followed by the 16-byte tag. `None` only for
/// inputs larger than ChaCha20 can encrypt (about 256 GiB).
pub fn aead_seal(key: &[u8; HASH_LEN], counter: u64, plain: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(key.into());
    cipher
        .encrypt(
            (&nonce(counter)).into(),
            Payload {
                msg: plain,
                aad: auth,
            },
        )
        .ok()
}

/// Opens an `AEAD` message; `None` when the tag does not verify.
pub fn aead_open(
    key: &[u8; HASH_LEN],
    counter: u64,
    sealed: &[u8],
    auth: &[u8],
) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(
            (&nonce(counter)).into(),
            Payload {
                msg: sealed,
                aad: auth,
            },
        )
        .ok()
}

/// `XAEAD(key, nonce, plain, auth)`.
pub fn xaead_seal(
    key: &[u8; HASH_LEN],
    nonce: &[u8; XNONCE_LEN],
    plain: &[u8],
    auth: &[u8],
) -> Option<Vec<u8>> {
    XChaCha20Poly1305::new(key.into())
        .encrypt(
            nonce.into(),
            Payload {
                msg: plain,
                aad: auth,
            },
        )
        .ok()
}

/// Opens an `XAEAD` message; `None` when the tag does not verify.
pub fn xaead_open(
    key: &[u8; HASH_LEN],
    nonce: &[u8; XNONCE_LEN],
    sealed: &[u8],
    auth: &[u8],
) -> Option<Vec<u8>> {
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            nonce.into(),
            Payload {
                msg: sealed,
                aad: auth,
            },
        )
        .ok()
}

/// TAI64 label of the Unix epoch (`2^62 + 10`), as wireguard-go's `tai64n.go`.
const TAI64_BASE: u64 = 0x4000_0000_0000_000a;
/// Nanoseconds are rounded down to 2^24 ns (about 16.8 ms) so timestamps do not leak fine timing.
const WHITENER_MASK: u32 = 0x100_0000 - 1;

/// `TAI64N` of `unix_ns` (nanoseconds since 1970-01-01 UTC), whitened.
pub fn tai64n(unix_ns: u64) -> [u8; TIMESTAMP_LEN] {
    let secs = TAI64_BASE.wrapping_add(unix_ns / 1_000_000_000);
    let nanos = ((unix_ns % 1_000_000_000) as u32) & !WHITENER_MASK;
    let mut out = [0u8; TIMESTAMP_LEN];
    out[..8].copy_from_slice(&secs.to_be_bytes());
    out[8..].copy_from_slice(&nanos.to_be_bytes());
    out
}

/// Constant-time equality of two byte strings of the same length (MAC checks).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from the operating system's random number generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    getrandom::fill(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // Vectors below: RFC 7693 appendix B (BLAKE2s-256 of "abc") and values computed with an
    // independent implementation (CPython's hashlib.blake2s / hmac modules).
    #[test]
    fn blake2s_matches_rfc7693() {
        assert_eq!(
            hex(&hash(&[b"abc"])),
            "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
        );
        // Split input hashes like the concatenation.
        assert_eq!(hash(&[b"a", b"bc"]), hash(&[b"abc"]));
    }

    #[test]
    fn keyed_blake2s_128_matches_reference() {
        let key = [7u8; 32];
        assert_eq!(hex(&mac(&key, &[b"wireguard"])), MAC_32_KEY_VECTOR);
        let key16 = [9u8; 16];
        assert_eq!(hex(&mac(&key16, &[b"cookie", b"input"])), MAC_16_KEY_VECTOR);
    }

    #[test]
    fn hmac_blake2s_matches_reference() {
        let key = [1u8; 32];
        assert_eq!(hex(&hmac(&key, &[b"hello"])), HMAC_VECTOR);
    }

    #[test]
    fn hkdf_outputs_match_reference() {
        let key = [2u8; 32];
        let (t1, t2, t3) = kdf3(&key, b"input key material");
        assert_eq!(hex(&t1), KDF_T1);
        assert_eq!(hex(&t2), KDF_T2);
        assert_eq!(hex(&t3), KDF_T3);
        assert_eq!(kdf2(&key, b"input key material"), (t1, t2));
        assert_eq!(kdf1(&key, b"input key material"), t1);
    }

    #[test]
    fn aead_round_trips_and_rejects_tampering() {
        let key = [3u8; 32];
        let sealed = aead_seal(&key, 5, b"payload", b"auth").expect("seal");
        assert_eq!(sealed.len(), 7 + TAG_LEN);
        assert_eq!(
            aead_open(&key, 5, &sealed, b"auth").as_deref(),
            Some(&b"payload"[..])
        );
        assert!(aead_open(&key, 6, &sealed, b"auth").is_none());
        assert!(aead_open(&key, 5, &sealed, b"other").is_none());
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(aead_open(&key, 5, &bad, b"auth").is_none());
        let n = [4u8; XNONCE_LEN];
        let x = xaead_seal(&key, &n, b"cookie", b"mac1").expect("seal");
        assert_eq!(
            xaead_open(&key, &n, &x, b"mac1").as_deref(),
            Some(&b"cookie"[..])
        );
        assert!(xaead_open(&key, &[5u8; XNONCE_LEN], &x, b"mac1").is_none());
    }

    #[test]
    fn aead_matches_rfc8439_vector_layout() {
        // RFC 8439 §2.8.2 uses nonce 07000000 4041424344454647: our nonce layout puts the
        // little-endian counter in the last 8 bytes after 4 zero bytes, so check the layout.
        assert_eq!(hex(&nonce(0x0102030405060708)), "000000000807060504030201");
    }

    #[test]
    fn tai64n_is_big_endian_and_whitened() {
        let ts = tai64n(1_700_000_000 * 1_000_000_000 + 123_456_789);
        assert_eq!(
            hex(&ts[..8]),
            format!("{:016x}", TAI64_BASE + 1_700_000_000)
        );
        let nanos = u32::from_be_bytes([ts[8], ts[9], ts[10], ts[11]]);
        assert_eq!(nanos, 123_456_789 & !WHITENER_MASK);
        assert!(tai64n(2_000_000_000_000_000_000) > ts);
    }

    #[test]
    fn ct_eq_compares_contents_and_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    const MAC_32_KEY_VECTOR: &str = "3550ce1a90c5458a90bba8086670028c";
    const MAC_16_KEY_VECTOR: &str = "a54101104561fc1840b1132122febf33";
    const HMAC_VECTOR: &str = "aa4e838f73d6c5d2b83fba39c4b190eb3d96457de153037e9183fe183e942e2b";
    const KDF_T1: &str = "e2637dc810270ae8bddd43ac1eed8e9d91a2e48d3c7f7ea19e10436cdf0e2700";
    const KDF_T2: &str = "8d2da9a9967ae27f06736c0fdee1821c498cf7077a3e3c19a882b72e845fada4";
    const KDF_T3: &str = "37f77df13c46982214e46316c3920045009e853cfe4e96954a59cf063a8fc01c";
}
