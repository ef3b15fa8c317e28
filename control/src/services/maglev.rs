//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), computed by control, looked up by workers.
//!
//! > For each backend i, `offset = h1(name[i]) mod M`, `skip = h2(name[i]) mod (M - 1) + 1`,
//! > `permutation[i][j] = (offset + j * skip) mod M`. Backends take turns: each claims the next
//! > still-empty entry of its own permutation, until all M entries are filled.
//!
//! With M prime every `skip` is coprime to M, so each permutation visits every entry: population
//! always terminates within M probes per claim. Each backend ends with `floor(M/N)` or
//! `ceil(M/N)` entries (weights are equal).
//!
//! Hash (stable across Rust versions and machines, unlike std's `DefaultHasher`): `h1`/`h2` are
//! 64-bit FNV-1a over an 8-byte little-endian seed followed by the key bytes, finished with
//! MurmurHash3's `fmix64` avalanche (FNV's low bits mix poorly on their own). The two seeds,
//! [`OFFSET_SEED`] and [`SKIP_SEED`], differ, so offset and skip come from independent hash
//! states. Keys are `address:port` strings ([`super::Backend::key`]), so a backend keeps its
//! permutation whatever its position in the list.
//!
//! Measured disruption (see `maglev_removal_disruption` in `tests.rs`): removing one of N
//! backends reassigns its own ~M/N entries and changes the owner of about 1 % of the other
//! entries (0.66 % at N = 10, 1.06 % at 50, 1.30 % at 100; M = 16381): close to the minimum.

use thiserror::Error;

/// Cilium's default table size (`--bpf-lb-maglev-table-size`): a prime, about 100 x a
/// 160-backend service.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// Largest accepted table size (Cilium's largest choice is 131071); bounds memory per service.
pub const MAX_TABLE_SIZE: u32 = 1 << 20;
/// Smallest accepted table size.
pub const MIN_TABLE_SIZE: u32 = 3;
/// Seed of the hash giving a backend's permutation offset (ASCII "mglv-off").
pub const OFFSET_SEED: u64 = 0x6d67_6c76_2d6f_6666;
/// Seed of the hash giving a backend's permutation skip (ASCII "mglv-skp").
pub const SKIP_SEED: u64 = 0x6d67_6c76_2d73_6b70;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Errors of the Maglev table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is not a prime within bounds.
    #[error(
        "Maglev table size {size}: {reason}; use a prime between {MIN_TABLE_SIZE} and \
         {MAX_TABLE_SIZE}, e.g. 16381 (the default, as Cilium), 32749 or 65521, at least about \
         100 x the largest service's backend count"
    )]
    InvalidTableSize {
        /// The rejected size.
        size: u32,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// More backends than a `u16` entry can name.
    #[error("Maglev table over {count} backends: at most 65,536 fit u16 entries")]
    TooManyBackends {
        /// The backends asked for.
        count: usize,
    },
}

/// Checks that `m` can be a Maglev table size: prime, within [`MIN_TABLE_SIZE`]..=[`MAX_TABLE_SIZE`].
pub fn validate_table_size(m: u32) -> Result<(), MaglevError> {
    let invalid = |reason| Err(MaglevError::InvalidTableSize { size: m, reason });
    if m < MIN_TABLE_SIZE {
        return invalid("too small");
    }
    if m > MAX_TABLE_SIZE {
        return invalid("too large");
    }
    if !is_prime(m) {
        return invalid("not a prime");
    }
    Ok(())
}

/// Trial division; `m` is at most [`MAX_TABLE_SIZE`], so at most ~1024 divisions.
pub fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    let m = u64::from(m);
    let mut d = 2u64;
    while d * d <= m {
        if m % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit FNV-1a of `bytes` (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_from(FNV_OFFSET_BASIS, bytes)
}

/// [`fnv1a64`] of the concatenation of `parts`.
pub fn fnv1a64_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(FNV_OFFSET_BASIS, |h, p| fnv1a64_from(h, p))
}

fn fnv1a64_from(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The seeded key hash: `fmix64(FNV-1a(seed as 8 LE bytes ++ key))`.
pub fn seeded_hash(seed: u64, key: &[u8]) -> u64 {
    let state = fnv1a64_from(FNV_OFFSET_BASIS, &seed.to_le_bytes());
    fmix64(fnv1a64_from(state, key))
}

/// A backend's permutation `(offset, skip)` in a table of size `m` (valid `m` assumed:
/// `offset < m`, `1 <= skip < m`).
pub fn offset_skip(key: &str, m: u32) -> (u32, u32) {
    let m64 = u64::from(m.max(2));
    let offset = seeded_hash(OFFSET_SEED, key.as_bytes()) % m64;
    let skip = seeded_hash(SKIP_SEED, key.as_bytes()) % (m64 - 1) + 1;
    // Both are below m <= u32::MAX.
    (offset as u32, skip as u32)
}

/// Tables computed for (table size, backend keys), kept across translations: a table is a pure
/// function of its inputs, and recomputing every Service's table for every state change made a
/// one-object update at 10,000 Services cost seconds (`sluice-perf scale-api`). Entries not
/// used by the last two [`Cache::sweep`] rounds are dropped, so the cache holds about the
/// tables in use.
#[derive(Debug, Default)]
pub struct Cache {
    entries: std::collections::HashMap<CacheKey, (std::sync::Arc<[u16]>, bool)>,
}

/// (table size, backend keys in order).
type CacheKey = (u32, Vec<String>);

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// [`table`] with `u16` entries (what the dataplane's tables hold), from the cache when
    /// these backends and size were computed before.
    pub fn table(
        &mut self,
        backends: &[&str],
        m: u32,
    ) -> Result<std::sync::Arc<[u16]>, MaglevError> {
        if backends.len() > usize::from(u16::MAX) + 1 {
            return Err(MaglevError::TooManyBackends {
                count: backends.len(),
            });
        }
        let key = (
            m,
            backends.iter().map(|b| (*b).to_owned()).collect::<Vec<_>>(),
        );
        if let Some((t, used)) = self.entries.get_mut(&key) {
            *used = true;
            return Ok(std::sync::Arc::clone(t));
        }
        // Every entry names one of `backends` (fewer than 65,537): it fits.
        let t: std::sync::Arc<[u16]> = table(backends, m)?.into_iter().map(|e| e as u16).collect();
        self.entries.insert(key, (std::sync::Arc::clone(&t), true));
        Ok(t)
    }

    /// Drops the tables not used since the last sweep; call once per translation.
    pub fn sweep(&mut self) {
        self.entries.retain(|_, (_, used)| std::mem::take(used));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The Maglev lookup table of size `m` over `backends` (stable keys, e.g. `10.244.1.5:8080`),
/// equal weights: entry `j` is the index in `backends` owning it. Empty when `backends` is.
/// When there are more backends than entries, the later ones get none.
pub fn table(backends: &[&str], m: u32) -> Result<Vec<u32>, MaglevError> {
    validate_table_size(m)?;
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    let size = m as usize;
    let m64 = u64::from(m);
    let permutations: Vec<(u64, u64)> = backends
        .iter()
        .map(|key| {
            let (offset, skip) = offset_skip(key, m);
            (u64::from(offset), u64::from(skip))
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entries = vec![u32::MAX; size];
    let mut filled = 0usize;
    // Each pass gives every backend one entry; a claim probes at most m positions because the
    // permutation visits every entry and at least one is empty while filled < size.
    'fill: loop {
        for (i, &(offset, skip)) in permutations.iter().enumerate() {
            let mut probes = 0u64;
            let slot = loop {
                let candidate = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                probes += 1;
                if entries.get(candidate) == Some(&u32::MAX) || probes > m64 {
                    break candidate;
                }
            };
            if let Some(entry) = entries.get_mut(slot) {
                if *entry == u32::MAX {
                    // `backends.len()` fits in u32 for any table that can hold them.
                    *entry = i as u32;
                    filled += 1;
                }
            }
            if filled == size {
                break 'fill;
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn the_cache_returns_the_same_tables_and_forgets_unused_ones() {
        let mut c = Cache::new();
        let a = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let b = ["10.0.0.1:80", "10.0.0.2:80"];
        let wide = |t: std::sync::Arc<[u16]>| t.iter().map(|&e| u32::from(e)).collect::<Vec<_>>();
        let ta = c.table(&a, 251).unwrap();
        assert_eq!(wide(ta.clone()), table(&a, 251).unwrap());
        assert!(
            std::sync::Arc::ptr_eq(&ta, &c.table(&a, 251).unwrap()),
            "from the cache"
        );
        assert_eq!(wide(c.table(&b, 251).unwrap()), table(&b, 251).unwrap());
        assert_eq!(wide(c.table(&a, 257).unwrap()), table(&a, 257).unwrap());
        assert_eq!(c.len(), 3);
        c.sweep(); // all three were used since the start
        assert_eq!(c.len(), 3);
        c.table(&a, 251).unwrap();
        c.sweep(); // only a/251 was used in this round
        assert_eq!(c.len(), 1);
        assert!(c.table(&[], 251).unwrap().is_empty());
        assert!(c.table(&a, 250).is_err(), "not prime");
        let many: Vec<String> = (0..65_537u32)
            .map(|i| format!("10.{}.{}.1:80", i >> 8, i & 255))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            c.table(&many, 251),
            Err(MaglevError::TooManyBackends { count: 65_537 })
        ));
    }
}
