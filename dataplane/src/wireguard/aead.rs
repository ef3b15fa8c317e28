//! The transport AEAD, ChaCha20-Poly1305 (RFC 8439) with WireGuard's nonce: 4 zero bytes then
//! the 64-bit counter little-endian (paper section 5.4.6), and an empty associated data.
//!
//! Which implementation: `benches/wireguard.rs` measures RustCrypto's `chacha20poly1305` and
//! `ring` (the AEAD behind boringtun) in the same run. ring won by 2.5-9x on this machine
//! (AMD EPYC, AVX2/AVX-512, 2 vCPUs shared with other builds: 10-20 % noise; one core,
//! criterion medians, Nov 2026), so ring is used here. `wireguard::seal`/`open` (counter block,
//! header, padding, replay window, lookup, inner length) against raw ring in the same run:
//!
//! | plaintext | RustCrypto seal / open | ring seal / open  | sluice seal / open | sluice/ring |
//! |-----------|------------------------|-------------------|--------------------|-------------|
//! | 64 B      | 46 / 42 MiB/s          | 378 / 351 MiB/s   | 342 / 351 MiB/s    | 90 / 100 %  |
//! | 512 B     | 261 / 276 MiB/s        | 1.29 / 1.27 GiB/s | 1.04 / 1.14 GiB/s  | 81 / 90 %   |
//! | 1400 B    | 540 / 560 MiB/s        | 1.72 / 1.62 GiB/s | 1.49 / 1.77 GiB/s  | 87 / 109 %  |
//!
//! A rerun of the seal cases alone gave 96 / 99 / 92 % of raw ring at 64 / 512 / 1400 B: the
//! wrapper costs a few ns per packet and the differences above are mostly the machine's noise.
//! At 1400 B one core seals or opens about 1.1-1.3 M messages/s.
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

/// Bytes of the Poly1305 tag.
pub const TAG_LEN: usize = 16;

/// WireGuard's 96-bit nonce for `counter`.
#[inline]
pub fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// One direction's key, ready to use.
pub(crate) struct Aead(LessSafeKey);

impl Aead {
    /// `None` cannot happen for a 32-byte key (ring refuses only wrong key lengths).
    pub(crate) fn new(key: &[u8; 32]) -> Option<Self> {
        Some(Aead(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key).ok()?,
        )))
    }

    /// Encrypts `data` in place; returns the tag. `None` only for data beyond the AEAD's limit
    /// (256 GiB), which no frame reaches.
    #[inline]
    pub(crate) fn seal(&self, counter: u64, data: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        let nonce = Nonce::assume_unique_for_key(nonce_bytes(counter));
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, Aad::empty(), data)
            .ok()?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }

    /// Verifies `tag` over `data` and decrypts `data` in place. `false`: not authentic (then
    /// ring has zeroed `data`).
    #[inline]
    pub(crate) fn open(&self, counter: u64, data: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        let nonce = Nonce::assume_unique_for_key(nonce_bytes(counter));
        self.0
            .open_in_place_separate_tag(nonce, Aad::empty(), Tag::from(*tag), data, 0..)
            .is_ok()
    }
}
