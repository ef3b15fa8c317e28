//! Session affinity (`sessionAffinity: ClientIP`): per worker, which backend a client address
//! was last sent to for a service port, until `timeoutSeconds` pass without a new flow (as
//! Cilium's `LB_AFFINITY` map and kube-proxy's `recent` module; the timeout is refreshed by
//! every new flow of the client, not by every packet).
//!
//! A fixed table of 4-way sets, allocated once: a client hashes to one set; an insert takes the
//! matching, an expired, or else the oldest way (counted as an eviction). With more than one
//! worker each has its own table, so the *first* choice for a client must be the same on every
//! worker: `stages::lb` hashes only the client address for affinity services, so all workers
//! agree on the backend as long as the backend set does not change.
use std::net::Ipv4Addr;

const WAYS: usize = 4;

#[derive(Clone, Copy, Debug, Default)]
struct Way {
    /// `client << 32 | service`; 0 = empty (service 0 of client 0.0.0.0 never occurs).
    key: u64,
    backend_addr: u32,
    backend_port: u16,
    expires_ns: u64,
}

/// The table; see the module doc.
#[derive(Debug)]
pub struct Affinity {
    sets: Box<[[Way; WAYS]]>,
    mask: usize,
    pub evictions: u64,
}

impl Affinity {
    /// A table for about `entries` clients (rounded up to a power of two, at least one set).
    pub fn new(entries: usize) -> Self {
        let sets = (entries / WAYS).max(1).next_power_of_two();
        Self {
            sets: vec![[Way::default(); WAYS]; sets].into_boxed_slice(),
            mask: sets - 1,
            evictions: 0,
        }
    }

    #[inline]
    fn key(client: Ipv4Addr, service: u32) -> u64 {
        u64::from(u32::from(client)) << 32 | u64::from(service.wrapping_add(1))
    }

    #[inline]
    fn set(&self, key: u64) -> usize {
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 32) as usize & self.mask
    }

    /// The backend `client` was sent to for `service`, if the entry has not expired.
    #[inline]
    pub fn get(&self, client: Ipv4Addr, service: u32, now_ns: u64) -> Option<(Ipv4Addr, u16)> {
        let key = Self::key(client, service);
        self.sets[self.set(key)]
            .iter()
            .find(|w| w.key == key && w.expires_ns > now_ns)
            .map(|w| (Ipv4Addr::from(w.backend_addr), w.backend_port))
    }

    /// Records (or refreshes) the client's backend until `now_ns + timeout_ns`.
    #[inline]
    pub fn put(
        &mut self,
        client: Ipv4Addr,
        service: u32,
        backend: (Ipv4Addr, u16),
        now_ns: u64,
        timeout_ns: u64,
    ) {
        let key = Self::key(client, service);
        let s = self.set(key);
        let set = &mut self.sets[s];
        let at = match set.iter().position(|w| w.key == key) {
            Some(i) => i,
            None => match set
                .iter()
                .position(|w| w.key == 0 || w.expires_ns <= now_ns)
            {
                Some(i) => i,
                None => {
                    self.evictions += 1;
                    let mut oldest = 0;
                    for i in 1..WAYS {
                        if set[i].expires_ns < set[oldest].expires_ns {
                            oldest = i;
                        }
                    }
                    oldest
                }
            },
        };
        set[at] = Way {
            key,
            backend_addr: u32::from(backend.0),
            backend_port: backend.1,
            expires_ns: now_ns.saturating_add(timeout_ns),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn remembers_until_timeout_and_per_service() {
        let mut a = Affinity::new(64);
        let c = Ipv4Addr::new(10, 244, 1, 5);
        let b = (Ipv4Addr::new(10, 244, 2, 9), 8080);
        assert_eq!(a.get(c, 3, 0), None);
        a.put(c, 3, b, 10 * S, 30 * S);
        assert_eq!(a.get(c, 3, 39 * S), Some(b));
        assert_eq!(a.get(c, 4, 39 * S), None, "another service port");
        assert_eq!(a.get(c, 3, 40 * S), None, "expired after timeoutSeconds");
        a.put(c, 3, (b.0, 9090), 41 * S, 30 * S);
        assert_eq!(a.get(c, 3, 42 * S), Some((b.0, 9090)));
    }

    #[test]
    fn full_set_evicts_the_oldest_and_counts_it() {
        let mut a = Affinity::new(4); // one set of four ways
        for i in 0..4u8 {
            a.put(
                Ipv4Addr::new(10, 0, 0, i + 1),
                0,
                (Ipv4Addr::new(10, 1, 0, 1), 1),
                u64::from(i) * S,
                100 * S,
            );
        }
        assert_eq!(a.evictions, 0);
        a.put(
            Ipv4Addr::new(10, 0, 0, 9),
            0,
            (Ipv4Addr::new(10, 1, 0, 2), 2),
            5 * S,
            100 * S,
        );
        assert_eq!(a.evictions, 1);
        assert_eq!(
            a.get(Ipv4Addr::new(10, 0, 0, 1), 0, 6 * S),
            None,
            "oldest evicted"
        );
        assert!(a.get(Ipv4Addr::new(10, 0, 0, 2), 0, 6 * S).is_some());
        assert!(a.get(Ipv4Addr::new(10, 0, 0, 9), 0, 6 * S).is_some());
    }
}
