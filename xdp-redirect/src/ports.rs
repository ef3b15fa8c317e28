//! The userspace side of the `PORTS` map: [`PortClaims`], one table of 65536 entries (TCP or
//! UDP destination ports, or ICMP echo identifiers), each nothing / Redirect / Pass.
//!
//! The words use exactly the layout of the map (two bits per port, see
//! [`xdp_redirect_common::port_slot`]), so a reconcile writes to the kernel only the `u64` words
//! that differ ([`PortClaims::changed_words`]): a port that is claimed before and after a
//! reconcile is never unclaimed in between, whatever else changes around it.
use std::ops::RangeInclusive;

use xdp_redirect_common::{
    port_action, port_bits, port_slot, PORTS_PER_WORD, PORT_MASK, PORT_NONE, PORT_TABLE_ICMP_ID,
    PORT_TABLE_TCP, PORT_TABLE_UDP, PORT_TABLE_WORDS,
};

use crate::RuleAction;

/// Which `PORTS` table: what the 16-bit key of a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    /// TCP destination port (and the source port of a TCP packet quoted in an ICMP error).
    Tcp,
    /// UDP destination port (and the source port of a UDP packet quoted in an ICMP error).
    Udp,
    /// Identifier of an ICMP echo reply (and of an echo request quoted in an ICMP error).
    IcmpEchoId,
}

impl PortProtocol {
    pub const ALL: [PortProtocol; 3] = [
        PortProtocol::Tcp,
        PortProtocol::Udp,
        PortProtocol::IcmpEchoId,
    ];

    /// The IP protocol number (6, 17, 1).
    pub const fn ip_proto(self) -> u8 {
        match self {
            PortProtocol::Tcp => 6,
            PortProtocol::Udp => 17,
            PortProtocol::IcmpEchoId => 1,
        }
    }

    /// The table for IP protocol `proto` (6 TCP, 17 UDP, 1 ICMP), `None` for any other.
    pub const fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            6 => Some(PortProtocol::Tcp),
            17 => Some(PortProtocol::Udp),
            1 => Some(PortProtocol::IcmpEchoId),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
            PortProtocol::IcmpEchoId => "icmp-echo-id",
        }
    }

    /// Index of the table in the `PORTS` map.
    pub(crate) const fn table(self) -> u32 {
        match self {
            PortProtocol::Tcp => PORT_TABLE_TCP,
            PortProtocol::Udp => PORT_TABLE_UDP,
            PortProtocol::IcmpEchoId => PORT_TABLE_ICMP_ID,
        }
    }
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One table of the `PORTS` map: for every 16-bit port (or ICMP identifier) no entry, or a
/// [`RuleAction`]. 16 KiB, whatever it holds.
#[derive(Clone, PartialEq, Eq)]
pub struct PortClaims {
    /// `PORT_TABLE_WORDS` words, laid out as in the map (table 0's indices).
    words: Box<[u64]>,
}

impl Default for PortClaims {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PortClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ranges of equal entries, not 65536 lines.
        let mut list = f.debug_list();
        let mut start = 0u32;
        let mut current = self.get(0);
        for port in 1..=65536u32 {
            let next = u16::try_from(port).ok().map(|p| self.get(p));
            if next != Some(current) {
                if let Some(action) = current {
                    list.entry(&format_args!("{start}..={}: {action:?}", port - 1));
                }
                start = port;
                current = next.flatten();
            }
        }
        list.finish()
    }
}

impl PortClaims {
    /// No entries.
    pub fn new() -> Self {
        Self {
            words: vec![PORT_NONE; PORT_TABLE_WORDS as usize].into_boxed_slice(),
        }
    }

    fn slot(port: u16) -> (usize, u32) {
        let (index, shift) = port_slot(0, port);
        (index as usize, shift)
    }

    /// The entry for `port`.
    pub fn get(&self, port: u16) -> Option<RuleAction> {
        let (i, shift) = Self::slot(port);
        port_action(self.words[i] >> shift)
    }

    fn put(&mut self, port: u16, bits: u64) {
        let (i, shift) = Self::slot(port);
        self.words[i] = (self.words[i] & !(PORT_MASK << shift)) | (bits << shift);
    }

    /// Sets the entry for `port`.
    pub fn set(&mut self, port: u16, action: RuleAction) {
        self.put(port, port_bits(action));
    }

    /// Removes the entry for `port` (the packet falls through to the next rule).
    pub fn remove(&mut self, port: u16) {
        self.put(port, PORT_NONE);
    }

    /// Sets the entry of every port in `ports` (nothing if the range is empty).
    pub fn set_range(&mut self, ports: RangeInclusive<u16>, action: RuleAction) {
        self.fill(ports, port_bits(action));
    }

    /// Removes the entry of every port in `ports` (nothing if the range is empty).
    pub fn remove_range(&mut self, ports: RangeInclusive<u16>) {
        self.fill(ports, PORT_NONE);
    }

    fn fill(&mut self, ports: RangeInclusive<u16>, bits: u64) {
        if ports.is_empty() {
            return;
        }
        let (lo, hi) = (*ports.start(), *ports.end());
        let (first, _) = Self::slot(lo);
        let (last, _) = Self::slot(hi);
        // The same two bits repeated over a whole word.
        let pattern = bits * 0x5555_5555_5555_5555;
        for i in first..=last {
            // Ports of word i, clipped to the range.
            let word_lo = i as u32 * PORTS_PER_WORD;
            let from = u32::from(lo).max(word_lo) - word_lo;
            let to = u32::from(hi).min(word_lo + PORTS_PER_WORD - 1) - word_lo;
            let width = (to - from + 1) * 2;
            let mask = if width == 64 {
                u64::MAX
            } else {
                ((1u64 << width) - 1) << (from * 2)
            };
            self.words[i] = (self.words[i] & !mask) | (pattern & mask);
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.words.fill(PORT_NONE);
    }

    /// True if no port has an entry.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == PORT_NONE)
    }

    /// How many ports have an entry.
    pub fn len(&self) -> usize {
        self.words
            .iter()
            .map(|w| {
                // A port has an entry when either of its two bits is set.
                let either = (w | (w >> 1)) & 0x5555_5555_5555_5555;
                either.count_ones() as usize
            })
            .sum()
    }

    /// Ports with an entry and their action, in port order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, RuleAction)> + '_ {
        (0..=u16::MAX).filter_map(|p| self.get(p).map(|a| (p, a)))
    }

    /// The words of `target` that differ from `self`: (word index in the table, new word).
    pub fn changed_words<'a>(
        &'a self,
        target: &'a PortClaims,
    ) -> impl Iterator<Item = (u32, u64)> + 'a {
        self.words
            .iter()
            .zip(target.words.iter())
            .enumerate()
            .filter(|(_, (old, new))| old != new)
            .map(|(i, (_, new))| (i as u32, *new))
    }

    /// Sets word `index` (as from [`PortClaims::changed_words`]).
    pub(crate) fn set_word(&mut self, index: u32, word: u64) {
        self.words[index as usize] = word;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RuleAction::{Pass, Redirect};

    #[test]
    fn set_get_remove_single_ports_including_the_edges() {
        let mut c = PortClaims::new();
        assert!(c.is_empty());
        for port in [0u16, 1, 31, 32, 30080, 65534, 65535] {
            assert_eq!(c.get(port), None, "port {port} before set");
            c.set(port, Redirect);
            assert_eq!(c.get(port), Some(Redirect), "port {port} after set");
        }
        assert_eq!(c.len(), 7);
        // Neighbours are untouched.
        assert_eq!(c.get(30079), None);
        assert_eq!(c.get(30081), None);
        assert_eq!(c.get(2), None);
        c.set(30080, Pass);
        assert_eq!(c.get(30080), Some(Pass));
        assert_eq!(c.len(), 7);
        c.remove(30080);
        assert_eq!(c.get(30080), None);
        assert_eq!(c.get(65535), Some(Redirect));
        assert_eq!(c.len(), 6);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn ranges_cover_exactly_their_ports() {
        for (lo, hi) in [
            (0u16, 65535u16),
            (61000, 65535),
            (30000, 32767),
            (5, 5),
            (31, 32),
            (32, 63),
            (33, 62),
            (1, 100),
        ] {
            let mut c = PortClaims::new();
            c.set_range(lo..=hi, Redirect);
            assert_eq!(c.len(), usize::from(hi - lo) + 1, "{lo}..={hi}");
            assert_eq!(c.get(lo), Some(Redirect), "{lo}..={hi}: first");
            assert_eq!(c.get(hi), Some(Redirect), "{lo}..={hi}: last");
            if lo > 0 {
                assert_eq!(c.get(lo - 1), None, "{lo}..={hi}: below");
            }
            if hi < u16::MAX {
                assert_eq!(c.get(hi + 1), None, "{lo}..={hi}: above");
            }
            // Compare with port-by-port setting.
            let mut one_by_one = PortClaims::new();
            for p in lo..=hi {
                one_by_one.set(p, Redirect);
            }
            assert!(c == one_by_one, "{lo}..={hi} differs from port-by-port");
            c.remove_range(lo..=hi);
            assert!(c.is_empty(), "{lo}..={hi}: remove_range left {c:?}");
        }
    }

    #[test]
    fn a_pass_exception_inside_a_range_and_empty_ranges() {
        let mut c = PortClaims::new();
        c.set_range(30000..=32767, Redirect);
        c.set(31000, Pass);
        assert_eq!(c.get(30999), Some(Redirect));
        assert_eq!(c.get(31000), Some(Pass));
        assert_eq!(c.get(31001), Some(Redirect));
        #[allow(clippy::reversed_empty_ranges)]
        c.set_range(20..=10, Redirect);
        assert_eq!(c.get(15), None);
        assert_eq!(c.get(10), None);
        let listed: Vec<_> = c.iter().filter(|(_, a)| *a == Pass).collect();
        assert_eq!(listed, vec![(31000, Pass)]);
        assert_eq!(
            format!("{c:?}"),
            "[30000..=30999: Redirect, 31000..=31000: Pass, 31001..=32767: Redirect]"
        );
    }

    #[test]
    fn changed_words_are_only_the_words_that_differ() {
        let mut old = PortClaims::new();
        old.set_range(30000..=30031, Redirect); // words 937..=938 (30000 / 32 = 937.5)
        old.set(61000, Redirect);
        let mut new = old.clone();
        assert_eq!(old.changed_words(&new).count(), 0);
        new.set(30001, Pass);
        new.set(40000, Redirect);
        let changed: Vec<_> = old.changed_words(&new).collect();
        let idx: Vec<u32> = changed.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![30001 / 32, 40000 / 32]);
        // Applying the changed words to old yields new.
        for (i, w) in changed {
            old.set_word(i, w);
        }
        assert!(old == new);
    }

    #[test]
    fn protocols_map_to_their_ip_numbers_and_distinct_tables() {
        for p in PortProtocol::ALL {
            assert_eq!(PortProtocol::from_ip_proto(p.ip_proto()), Some(p));
        }
        assert_eq!(PortProtocol::from_ip_proto(132), None);
        let mut tables: Vec<u32> = PortProtocol::ALL.iter().map(|p| p.table()).collect();
        tables.sort_unstable();
        tables.dedup();
        assert_eq!(tables.len(), 3);
        assert!(tables.iter().all(|t| *t < xdp_redirect_common::PORT_TABLES));
    }
}
