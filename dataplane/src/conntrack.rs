//! A per-worker connection tracking table: preallocated, bounded, lock-free (single owner),
//! no allocation after [`Conntrack::new`], no clock reads (every call takes `now_ns`).
//!
//! ```text
//!   index: buckets of 8 slots (64 B, one cache line)      entries: [Entry; capacity]
//!   +-----------------------------------+                  +-------------------------------+
//!   | tag u32 | entry<<1 | dir   x 8    | --------------> | keys[Original], keys[Reply]   |
//!   +-----------------------------------+                  | Flow { nat, expires, state .. }|
//!   a key lives in one of two buckets (two-choice hashing)  +-------------------------------+
//! ```
//!
//! **Both directions.** A flow is one `Entry` holding its original key (as the first packet
//! arrived, before NAT) and its reply key (what replies carry: the translated packet's key,
//! reversed; [`FlowKey::reply_key`]). Both keys are inserted in the index, each slot pointing
//! at the same entry with a direction bit, so a lookup with either key finds the one flow and
//! learns the direction ([`Conntrack::lookup_dir`]), as Linux's two `tuplehash` entries per
//! `nf_conn`. When the two keys are equal (a flow to itself) only one slot is used.
//! Normalising keys (sorting the endpoints) was rejected: with NAT the two directions carry
//! different addresses, so they would not normalise to the same key anyway.
//!
//! **Index.** `4 x capacity` slots in buckets of 8 (at most half full when the table is full).
//! A key hashes (seeded per table, so keys chosen by an attacker cannot be precomputed) to two
//! buckets: the first from the hash's low bits, the second the first XOR a mix of the 32-bit
//! tag (the high bits), so a slot's other bucket is known from its tag alone ("partial-key
//! cuckoo hashing"). Lookup reads both (two cache lines) and compares the tag before the full
//! key. An insert takes an empty slot of the *less loaded* of the two buckets (the
//! "power of two choices": first-fit into the first bucket, as this table first did, gives the
//! one-choice Poisson tail and made 1 M flows in a 2 M table evict live flows with
//! `BucketsFull`); if both are full it moves one slot of either to that slot's other bucket
//! (one level of cuckoo displacement, counted in [`ConntrackStats::displaced`]). There are no
//! tombstones: deletion just clears the slot. Lookup cost is bounded (16 slots) whatever the
//! fill level. Measured with random keys at 2^16 capacity: at half capacity the fullest bucket
//! holds 5 keys, at full capacity (half the index) 7; no `BucketsFull` eviction in either.
//! `benches/conntrack.rs` (2^21 capacity, 2 shared vCPUs, noise about 10 %): 1 M flows
//! inserted with 0 evictions (first-fit: 2 `BucketsFull`) and 0 displacements; per operation
//! at 1 k / 100 k / 1 M flows, lookup hit 31 / 274 / 452 ns, lookup miss 33 / 108 / 223 ns,
//! insert + remove 87 / 259 / 306 ns (first-fit in the same run: 33 / 308 / 440, 33 / 234 /
//! 219, 81 / 315 / 298 ns: the same within noise; above 1 k flows it is cache and TLB misses).
//!
//! **Eviction**, always counted per [`EvictReason`]: when every entry is in use, or both buckets
//! of a new key are full and no slot can move, a victim is taken among the flows referenced from the new keys'
//! buckets (and, if those are empty, from the next 8 entries after a rotating hand): an expired
//! one if there is one, else the one closest to expiry. [`Conntrack::insert`] reports a live
//! flow it evicted as `Err(Evicted)` (the new flow is in the table all the same).
//!
//! **Expiry.** A flow whose `expires_ns <= now_ns` is absent for lookups; its memory is
//! reclaimed by [`Conntrack::gc`] (bounded work per call: `budget` entries examined, a hand
//! sweeping the entry array, so `capacity / budget` calls cover the whole table) or by an
//! insert that needs room.
//!
//! **Timeouts** ([`Timeouts::default`]), refreshed on every packet, after Linux
//! `nf_conntrack_tcp_timeout_*` / `nf_conntrack_udp_timeout*` / `nf_conntrack_icmp_timeout`:
//!
//! | state | default | Linux | note |
//! |---|---|---|---|
//! | TCP SYN_SENT | 120 s | 120 s | |
//! | TCP SYN_RECV | 60 s | 60 s | |
//! | TCP ESTABLISHED | 6 h | 5 days | Cilium's `CT_CONNECTION_LIFETIME_TCP` (21600 s): a dead peer's flow must not hold an entry for days |
//! | TCP FIN seen one way | 10 s | 120 s (FIN_WAIT) | Cilium's `CT_CLOSE_TIMEOUT`: refreshed while the half-open side still talks |
//! | TCP FIN both ways (TIME_WAIT) | 120 s | 120 s | |
//! | TCP RST (CLOSE) | 10 s | 10 s | |
//! | UDP | 30 s | 30 s | until a reply is seen |
//! | UDP assured | 120 s | 120 s (stream) | after a reply |
//! | ICMP | 30 s | 30 s | |
//! | other protocols | 60 s | 600 s | Cilium's non-TCP lifetime |
//!
//! TCP state follows the flags ([`Flow::observe`]): RST in any state -> CLOSE; SYN (no ACK)
//! -> SYN_SENT; SYN-ACK from the reply side -> SYN_RECV; then ACK from the original side ->
//! ESTABLISHED; FIN -> FIN seen (one way) / TIME_WAIT (both ways); a new SYN on a closed or
//! TIME_WAIT flow reopens it. A flow first seen mid-stream (no SYN: e.g. after an agent
//! restart) is picked up as ESTABLISHED, as Linux's default `nf_conntrack_tcp_loose=1`. No
//! sequence-number window tracking.
//!
//! **Size.** [`BYTES_PER_ENTRY`] = 64 B entry (two 16 B keys + a 32 B [`Flow`], one cache
//! line, aligned) + 4 index slots of 8 B + 4 B of free list = 100 B per flow (Cilium: two map
//! entries of about 70 B, one per direction). A table for 2^21 flows takes 200 MiB.
//!
//! **Limits.** Per worker: both directions of a flow must be steered to the same worker by the
//! caller (not this module's concern). ICMP echo uses the identifier as a port: an echo
//! request's key is `sport = id, dport = 0`, its reply's `sport = 0, dport = id`.
use std::net::Ipv4Addr;

use crate::{stages::nat::NatRewrite, wire::ipv4};

pub const NS_PER_SEC: u64 = 1_000_000_000;

/// TCP flag bits as in the header's 14th byte (RFC 793 / RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SLOTS_PER_BUCKET: usize = 8;
/// Index slots per entry: two keys per flow, index at most half full.
const SLOTS_PER_ENTRY: usize = 4;
/// Entries examined after the hand when a key's buckets reference no evictable flow.
const HAND_SCAN: usize = 8;
/// Largest capacity (an entry number shifted left by one must fit a `u32`).
pub const MAX_CAPACITY: usize = 1 << 30;

/// Memory per flow: the entry, its index slots and its free-list word.
pub const BYTES_PER_ENTRY: usize = std::mem::size_of::<Entry>()
    + SLOTS_PER_ENTRY * std::mem::size_of::<Slot>()
    + std::mem::size_of::<u32>();

/// Size of one flow record of [`Conntrack::export`]: two keys (13 bytes each), the rewrite
/// (13), the time left (8) and the state (7).
pub const EXPORTED_FLOW_BYTES: usize = 54;

/// Why exported flows could not be imported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    #[error(
        "{0} bytes of flow records is not a whole number of {EXPORTED_FLOW_BYTES}-byte records"
    )]
    Length(usize),
    #[error("flow record {index} is malformed (unknown state or flags)")]
    Record { index: usize },
}

fn put_key(k: &FlowKey, out: &mut Vec<u8>) {
    out.extend_from_slice(&k.src.octets());
    out.extend_from_slice(&k.dst.octets());
    out.extend_from_slice(&k.sport.to_be_bytes());
    out.extend_from_slice(&k.dport.to_be_bytes());
    out.push(k.proto);
}

fn get_key(b: &[u8]) -> FlowKey {
    FlowKey {
        src: Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        dst: Ipv4Addr::new(b[4], b[5], b[6], b[7]),
        sport: u16::from_be_bytes([b[8], b[9]]),
        dport: u16::from_be_bytes([b[10], b[11]]),
        proto: b[12],
    }
}

fn put_endpoint(e: Option<(Ipv4Addr, u16)>, out: &mut Vec<u8>) {
    let (a, p) = e.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
    out.extend_from_slice(&a.octets());
    out.extend_from_slice(&p.to_be_bytes());
}

fn get_endpoint(b: &[u8], present: bool) -> Option<(Ipv4Addr, u16)> {
    present.then(|| {
        (
            Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            u16::from_be_bytes([b[4], b[5]]),
        )
    })
}

const REC_NAT: u8 = 1;
const REC_NAT_SRC: u8 = 2;
const REC_NAT_DST: u8 = 4;

fn encode_flow(keys: &[FlowKey; 2], f: &Flow, left_ns: u64, out: &mut Vec<u8>) {
    put_key(&keys[0], out);
    put_key(&keys[1], out);
    let nat = f.nat.unwrap_or_default();
    let flags = if f.nat.is_some() { REC_NAT } else { 0 }
        | if nat.src.is_some() { REC_NAT_SRC } else { 0 }
        | if nat.dst.is_some() { REC_NAT_DST } else { 0 };
    out.push(flags);
    put_endpoint(nat.src, out);
    put_endpoint(nat.dst, out);
    out.extend_from_slice(&left_ns.to_be_bytes());
    out.extend_from_slice(&f.backend.to_be_bytes());
    out.extend_from_slice(&f.policy_gen.to_be_bytes());
    out.push(u8::from(f.policy_audit));
    out.push(f.state as u8);
    out.push(f.fins);
}

fn decode_flow(b: &[u8]) -> Option<([FlowKey; 2], Flow, u64)> {
    let keys = [get_key(&b[0..13]), get_key(&b[13..26])];
    let flags = b[26];
    if flags & !(REC_NAT | REC_NAT_SRC | REC_NAT_DST) != 0 || (flags & REC_NAT == 0 && flags != 0) {
        return None;
    }
    let nat = (flags & REC_NAT != 0).then(|| NatRewrite {
        src: get_endpoint(&b[27..33], flags & REC_NAT_SRC != 0),
        dst: get_endpoint(&b[33..39], flags & REC_NAT_DST != 0),
    });
    let left_ns = u64::from_be_bytes(b[39..47].try_into().ok()?);
    const STATES: [FlowState; 10] = [
        FlowState::TcpSynSent,
        FlowState::TcpSynRecv,
        FlowState::TcpEstablished,
        FlowState::TcpFinWait,
        FlowState::TcpTimeWait,
        FlowState::TcpClose,
        FlowState::Udp,
        FlowState::UdpAssured,
        FlowState::Icmp,
        FlowState::Other,
    ];
    let state = *STATES.get(usize::from(b[52]))?;
    if b[51] > 1 || b[53] > 3 {
        return None;
    }
    let flow = Flow {
        nat,
        expires_ns: 0,
        backend: u16::from_be_bytes([b[47], b[48]]),
        policy_gen: u16::from_be_bytes([b[49], b[50]]),
        policy_audit: b[51] == 1,
        state,
        fins: b[53],
        slots: 0,
    };
    Some((keys, flow, left_ns))
}

/// A flow's 5-tuple as one packet carries it (ICMP echo: identifier as a port, see module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl FlowKey {
    const ZERO: FlowKey = FlowKey {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
        proto: 0,
    };

    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }

    /// The key of this packet after `rw`. For ICMP echo only the identifier's side takes a
    /// port: the source of a request (`dport == 0`), the destination of a reply.
    pub fn translated(&self, rw: &NatRewrite) -> FlowKey {
        let mut k = *self;
        let icmp = self.proto == ipv4::PROTO_ICMP;
        if let Some((addr, port)) = rw.src {
            k.src = addr;
            if !icmp || self.dport == 0 {
                k.sport = port;
            }
        }
        if let Some((addr, port)) = rw.dst {
            k.dst = addr;
            if !icmp || self.dport != 0 {
                k.dport = port;
            }
        }
        k
    }

    /// The key replies carry when this packet leaves rewritten by `rw`.
    pub fn reply_key(&self, rw: &NatRewrite) -> FlowKey {
        self.translated(rw).reversed()
    }
}

/// The rewrite for replies of a flow whose original packets (key `orig`) get `rw`: what `rw`
/// changed is changed back (a DNAT becomes an SNAT from the service, an SNAT a DNAT back to
/// the client).
pub fn reply_rewrite(orig: &FlowKey, rw: &NatRewrite) -> NatRewrite {
    NatRewrite {
        src: rw.dst.map(|_| (orig.dst, orig.dport)),
        dst: rw.src.map(|_| (orig.src, orig.sport)),
    }
}

/// Which of a flow's two keys a packet matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// As the first packet of the flow.
    Original = 0,
    /// A reply.
    Reply = 1,
}

/// Connection state; decides the timeout.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    TcpSynSent,
    TcpSynRecv,
    TcpEstablished,
    /// A FIN seen in one direction.
    TcpFinWait,
    /// FINs seen in both directions.
    TcpTimeWait,
    /// A RST seen.
    TcpClose,
    /// UDP, no reply yet.
    Udp,
    /// UDP with a reply seen.
    UdpAssured,
    Icmp,
    /// Any other IP protocol.
    Other,
}

impl FlowState {
    /// The state of a new flow whose first packet has protocol `proto` (and `tcp_flags`).
    pub fn initial(proto: u8, tcp_flags: u8) -> FlowState {
        match proto {
            ipv4::PROTO_TCP if tcp_flags & TCP_RST != 0 => FlowState::TcpClose,
            ipv4::PROTO_TCP if tcp_flags & TCP_FIN != 0 => FlowState::TcpFinWait,
            ipv4::PROTO_TCP if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN => FlowState::TcpSynSent,
            ipv4::PROTO_TCP => FlowState::TcpEstablished,
            ipv4::PROTO_UDP => FlowState::Udp,
            ipv4::PROTO_ICMP => FlowState::Icmp,
            _ => FlowState::Other,
        }
    }
}

/// Idle timeouts per state, in nanoseconds (defaults: module doc table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent_ns: u64,
    pub tcp_syn_recv_ns: u64,
    pub tcp_established_ns: u64,
    pub tcp_fin_wait_ns: u64,
    pub tcp_time_wait_ns: u64,
    pub tcp_close_ns: u64,
    pub udp_ns: u64,
    pub udp_assured_ns: u64,
    pub icmp_ns: u64,
    pub other_ns: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent_ns: 120 * NS_PER_SEC,
            tcp_syn_recv_ns: 60 * NS_PER_SEC,
            tcp_established_ns: 6 * 3600 * NS_PER_SEC,
            tcp_fin_wait_ns: 10 * NS_PER_SEC,
            tcp_time_wait_ns: 120 * NS_PER_SEC,
            tcp_close_ns: 10 * NS_PER_SEC,
            udp_ns: 30 * NS_PER_SEC,
            udp_assured_ns: 120 * NS_PER_SEC,
            icmp_ns: 30 * NS_PER_SEC,
            other_ns: 60 * NS_PER_SEC,
        }
    }
}

impl Timeouts {
    pub const fn for_state(&self, state: FlowState) -> u64 {
        match state {
            FlowState::TcpSynSent => self.tcp_syn_sent_ns,
            FlowState::TcpSynRecv => self.tcp_syn_recv_ns,
            FlowState::TcpEstablished => self.tcp_established_ns,
            FlowState::TcpFinWait => self.tcp_fin_wait_ns,
            FlowState::TcpTimeWait => self.tcp_time_wait_ns,
            FlowState::TcpClose => self.tcp_close_ns,
            FlowState::Udp => self.udp_ns,
            FlowState::UdpAssured => self.udp_assured_ns,
            FlowState::Icmp => self.icmp_ns,
            FlowState::Other => self.other_ns,
        }
    }
}

/// What the table keeps per flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The rewrite for packets in the original direction (`None`: not translated); replies get
    /// [`reply_rewrite`] of it ([`Flow::rewrite_for`]).
    pub nat: Option<NatRewrite>,
    /// Monotonic time after which the flow is gone.
    pub expires_ns: u64,
    /// A tag for the caller: `stages::lb` keeps the service table generation (low 16 bits) its
    /// backend was last checked against.
    pub backend: u16,
    /// The policy generation the flow's verdict was taken under (0: never checked); `stages::lb`
    /// checks the flow again when the table's generation differs.
    pub policy_gen: u16,
    /// The flow is forwarded under an audit verdict (a policy in audit mode would deny it).
    pub policy_audit: bool,
    pub state: FlowState,
    /// FIN seen: bit 0 original direction, bit 1 reply.
    fins: u8,
    /// Index slots in use (0: free entry; 1: one key; 2: both keys).
    slots: u8,
}

impl Flow {
    /// A new flow whose first packet has `proto` and `tcp_flags` (0 for other protocols).
    pub fn new(
        proto: u8,
        tcp_flags: u8,
        nat: Option<NatRewrite>,
        backend: u16,
        now_ns: u64,
        timeouts: &Timeouts,
    ) -> Flow {
        let state = FlowState::initial(proto, tcp_flags);
        Flow {
            nat,
            expires_ns: now_ns.saturating_add(timeouts.for_state(state)),
            backend,
            policy_gen: 0,
            policy_audit: false,
            state,
            fins: if state == FlowState::TcpFinWait { 1 } else { 0 },
            slots: 0,
        }
    }

    /// Advances the state for a packet in direction `dir` (with `tcp_flags` for TCP) and
    /// refreshes the expiry.
    pub fn observe(&mut self, dir: Direction, tcp_flags: u8, now_ns: u64, timeouts: &Timeouts) {
        self.state = match self.state {
            FlowState::Udp | FlowState::UdpAssured if dir == Direction::Reply => {
                FlowState::UdpAssured
            }
            s @ (FlowState::TcpSynSent
            | FlowState::TcpSynRecv
            | FlowState::TcpEstablished
            | FlowState::TcpFinWait
            | FlowState::TcpTimeWait
            | FlowState::TcpClose) => self.tcp_next(s, dir, tcp_flags),
            s => s,
        };
        self.expires_ns = now_ns.saturating_add(timeouts.for_state(self.state));
    }

    fn tcp_next(&mut self, state: FlowState, dir: Direction, flags: u8) -> FlowState {
        let syn = flags & TCP_SYN != 0;
        let ack = flags & TCP_ACK != 0;
        if flags & TCP_RST != 0 {
            return FlowState::TcpClose;
        }
        match (state, dir) {
            // Port reuse: a new connection on a closed tuple.
            (FlowState::TcpClose | FlowState::TcpTimeWait, Direction::Original) if syn && !ack => {
                self.fins = 0;
                return FlowState::TcpSynSent;
            }
            _ => {}
        }
        if flags & TCP_FIN != 0 {
            self.fins |= 1 << dir as u8;
            return if self.fins == 3 {
                FlowState::TcpTimeWait
            } else {
                FlowState::TcpFinWait
            };
        }
        match (state, dir) {
            (FlowState::TcpSynSent, Direction::Reply) if syn && ack => FlowState::TcpSynRecv,
            (FlowState::TcpSynRecv, Direction::Original) if ack && !syn => {
                FlowState::TcpEstablished
            }
            (s, _) => s,
        }
    }

    /// The rewrite for a packet of this flow in direction `dir`, given the flow's original key.
    pub fn rewrite_for(&self, orig: &FlowKey, dir: Direction) -> Option<NatRewrite> {
        let nat = self.nat?;
        Some(match dir {
            Direction::Original => nat,
            Direction::Reply => reply_rewrite(orig, &nat),
        })
    }
}

/// Why an entry was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictReason {
    /// The victim had expired (its memory was reused before GC reached it): harmless.
    Expired = 0,
    /// Every entry was in use: a live flow was evicted.
    TableFull = 1,
    /// Both index buckets of a new key were full: a live flow was evicted.
    BucketsFull = 2,
}

impl EvictReason {
    pub const ALL: [EvictReason; 3] = [
        EvictReason::Expired,
        EvictReason::TableFull,
        EvictReason::BucketsFull,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            EvictReason::Expired => "expired",
            EvictReason::TableFull => "table_full",
            EvictReason::BucketsFull => "buckets_full",
        }
    }
}

/// A live flow evicted to make room for a new one (the new one was inserted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// The evicted flow's original key.
    pub key: FlowKey,
    pub reason: EvictReason,
}

/// Per-table counters (plain integers: the table has one owner).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries in use (live or expired but not yet reclaimed): the fill level.
    pub entries: u64,
    pub capacity: u64,
    pub inserts: u64,
    /// Inserts that replaced an existing flow with the same key.
    pub replaced: u64,
    /// Evictions, indexed by `EvictReason as usize`.
    pub evictions: [u64; 3],
    /// Index slots moved to their other bucket to make room for a new key (cuckoo
    /// displacement, one level): each one an eviction avoided.
    pub displaced: u64,
    pub gc_removed: u64,
    pub lookup_hits: u64,
    pub lookup_misses: u64,
}

/// Sizing and timeouts of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Maximum number of flows: a power of two, 1..=2^30.
    pub capacity: usize,
    /// Hash seed (per worker, from a random source at start-up).
    pub seed: u64,
    pub timeouts: Timeouts,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConntrackError {
    #[error(
        "conntrack capacity {0} is not a power of two between 1 and 2^30 entries: \
         set the worker's conntrack capacity to one (e.g. 262144)"
    )]
    Capacity(usize),
}

#[derive(Clone, Copy, Debug)]
#[repr(align(64))]
struct Entry {
    keys: [FlowKey; 2],
    flow: Flow,
}

/// An index slot: `tag == 0` is empty; `r` is `entry << 1 | direction`.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    tag: u32,
    r: u32,
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Bucket([Slot; SLOTS_PER_BUCKET]);

impl Bucket {
    #[inline]
    fn used(&self) -> usize {
        self.0.iter().filter(|s| s.tag != 0).count()
    }

    /// Puts `slot` in an empty slot; false when full.
    #[inline]
    fn put(&mut self, slot: Slot) -> bool {
        match self.0.iter_mut().find(|s| s.tag == 0) {
            Some(s) => {
                *s = slot;
                true
            }
            None => false,
        }
    }
}

/// The table. See the module doc.
pub struct Conntrack {
    buckets: Box<[Bucket]>,
    bucket_mask: usize,
    entries: Box<[Entry]>,
    free: Vec<u32>,
    seed: u64,
    timeouts: Timeouts,
    gc_hand: usize,
    evict_hand: usize,
    stats: ConntrackStats,
}

impl Conntrack {
    /// Allocates the whole table (`capacity` x [`BYTES_PER_ENTRY`]); nothing allocates after.
    pub fn new(config: Config) -> Result<Self, ConntrackError> {
        let cap = config.capacity;
        if !cap.is_power_of_two() || cap > MAX_CAPACITY {
            return Err(ConntrackError::Capacity(cap));
        }
        let n_buckets = (cap * SLOTS_PER_ENTRY / SLOTS_PER_BUCKET).max(2);
        let empty = Entry {
            keys: [FlowKey::ZERO; 2],
            flow: Flow::new(0, 0, None, 0, 0, &config.timeouts),
        };
        let mut free = Vec::with_capacity(cap);
        // Popped from the end: entry 0 is used first.
        free.extend((0..cap as u32).rev());
        let buckets = vec![Bucket::default(); n_buckets].into_boxed_slice();
        let entries = vec![empty; cap].into_boxed_slice();
        advise_huge_pages(&buckets);
        advise_huge_pages(&entries);
        Ok(Self {
            buckets,
            bucket_mask: n_buckets - 1,
            entries,
            free,
            seed: config.seed,
            timeouts: config.timeouts,
            gc_hand: 0,
            evict_hand: 0,
            stats: ConntrackStats {
                capacity: cap as u64,
                ..ConntrackStats::default()
            },
        })
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    pub fn stats(&self) -> &ConntrackStats {
        &self.stats
    }

    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Entries in use (including expired ones not yet reclaimed).
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new flow with this table's timeouts (see [`Flow::new`]).
    pub fn new_flow(
        &self,
        proto: u8,
        tcp_flags: u8,
        nat: Option<NatRewrite>,
        backend: u16,
        now_ns: u64,
    ) -> Flow {
        Flow::new(proto, tcp_flags, nat, backend, now_ns, &self.timeouts)
    }

    /// The live flow with `key` in either direction.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now_ns: u64) -> Option<&mut Flow> {
        self.lookup_dir(key, now_ns).map(|(_, f)| f)
    }

    /// The live flow with `key` in either direction, and which direction `key` is.
    #[inline]
    pub fn lookup_dir(&mut self, key: &FlowKey, now_ns: u64) -> Option<(Direction, &mut Flow)> {
        let (dir, idx) = self.live(key, now_ns)?;
        Some((dir, &mut self.entries[idx].flow))
    }

    /// The entry of the live flow `key` belongs to and `key`'s direction; counts the hit or miss.
    #[inline]
    fn live(&mut self, key: &FlowKey, now_ns: u64) -> Option<(Direction, usize)> {
        let found = self
            .find(key)
            .map(|(_, _, r)| r)
            .filter(|r| self.entries[(r >> 1) as usize].flow.expires_ns > now_ns);
        let Some(r) = found else {
            self.stats.lookup_misses += 1;
            return None;
        };
        self.stats.lookup_hits += 1;
        let dir = if r & 1 == 0 {
            Direction::Original
        } else {
            Direction::Reply
        };
        Some((dir, (r >> 1) as usize))
    }

    /// Looks `key` up and, when found, advances its state for this packet ([`Flow::observe`]).
    #[inline]
    pub fn track(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        now_ns: u64,
    ) -> Option<(Direction, &mut Flow)> {
        let timeouts = self.timeouts;
        let (dir, flow) = self.lookup_dir(key, now_ns)?;
        flow.observe(dir, tcp_flags, now_ns, &timeouts);
        Some((dir, flow))
    }

    /// Looks `key` up; when found, advances its state for this packet if `observe` (not for
    /// ICMP errors about the flow) and returns the direction, the flow's original key (which
    /// the reply rewrite needs) and a copy of the flow. One index probe, as [`Conntrack::track`].
    #[inline]
    pub fn track_origin(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        observe: bool,
        now_ns: u64,
    ) -> Option<(Direction, FlowKey, Flow)> {
        let (dir, idx) = self.live(key, now_ns)?;
        let timeouts = self.timeouts;
        let e = &mut self.entries[idx];
        if observe {
            e.flow.observe(dir, tcp_flags, now_ns, &timeouts);
        }
        Some((dir, e.keys[0], e.flow))
    }

    /// Whether a live flow has `key` (either direction); counts nothing.
    #[inline]
    pub fn contains(&self, key: &FlowKey, now_ns: u64) -> bool {
        self.find(key)
            .is_some_and(|(_, _, r)| self.entries[(r >> 1) as usize].flow.expires_ns > now_ns)
    }

    /// The original key of the live flow that `key` belongs to.
    pub fn original_key(&self, key: &FlowKey, now_ns: u64) -> Option<FlowKey> {
        let (_, _, r) = self.find(key)?;
        let e = &self.entries[(r >> 1) as usize];
        (e.flow.expires_ns > now_ns).then_some(e.keys[0])
    }

    /// Inserts a flow under its original `key` and its `reply_key` (equal keys use one slot).
    /// An existing flow with either key is replaced. `Err` reports a live flow evicted to make
    /// room; the new flow is in the table in every case.
    pub fn insert(
        &mut self,
        key: &FlowKey,
        reply_key: &FlowKey,
        mut flow: Flow,
        now_ns: u64,
    ) -> Result<(), Evicted> {
        self.stats.inserts += 1;
        for k in [key, reply_key] {
            if let Some((_, _, r)) = self.find(k) {
                self.remove_entry(r >> 1);
                self.stats.replaced += 1;
            }
        }
        let mut evicted = None;
        let keys = [*key, *reply_key];
        let n_keys = if key == reply_key { 1 } else { 2 };
        let idx = loop {
            if let Some(i) = self.free.pop() {
                break i;
            }
            let windows = [self.buckets_of(key), self.buckets_of(reply_key)];
            match self.victim(&windows, u32::MAX, now_ns) {
                Some(v) => Self::note(&mut evicted, self.evict(v, EvictReason::TableFull, now_ns)),
                // Unreachable with capacity >= 1 (the hand always finds a used entry when
                // none is free); dropping the new flow keeps the table consistent.
                None => {
                    return Err(Evicted {
                        key: *key,
                        reason: EvictReason::TableFull,
                    })
                }
            }
        };
        flow.slots = n_keys as u8;
        self.entries[idx as usize] = Entry { keys, flow };
        self.stats.entries += 1;
        for (dir, k) in keys.iter().enumerate().take(n_keys) {
            let r = idx << 1 | dir as u32;
            // At most one eviction per key: the victim had a slot in one of its buckets.
            for _ in 0..2 {
                if self.place(k, r) {
                    break;
                }
                let window = [self.buckets_of(k)];
                match self.victim(&window, idx, now_ns) {
                    Some(v) => Self::note(
                        &mut evicted,
                        self.evict(v, EvictReason::BucketsFull, now_ns),
                    ),
                    None => break,
                }
            }
        }
        match evicted {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sets the `backend` tag of the flow `key` belongs to (either direction); false when absent.
    pub fn set_backend(&mut self, key: &FlowKey, backend: u16) -> bool {
        match self.find(key) {
            Some((_, _, r)) => {
                self.entries[(r >> 1) as usize].flow.backend = backend;
                true
            }
            None => false,
        }
    }

    /// Records the policy verdict of the flow `key` belongs to (either direction): taken under
    /// policy generation `generation`, `audit` if forwarded under an audit verdict. False when
    /// absent.
    pub fn set_policy(&mut self, key: &FlowKey, generation: u16, audit: bool) -> bool {
        match self.find(key) {
            Some((_, _, r)) => {
                let f = &mut self.entries[(r >> 1) as usize].flow;
                f.policy_gen = generation;
                f.policy_audit = audit;
                true
            }
            None => false,
        }
    }

    /// Removes the flow `key` belongs to (either direction, live or expired).
    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let (_, _, r) = self.find(key)?;
        let flow = self.entries[(r >> 1) as usize].flow;
        self.remove_entry(r >> 1);
        Some(flow)
    }

    /// Incremental garbage collection: examines at most `budget` entries from where the last
    /// call stopped and frees the expired ones. Returns how many were freed.
    pub fn gc(&mut self, now_ns: u64, budget: usize) -> usize {
        let mask = self.entries.len() - 1;
        let mut removed = 0;
        for _ in 0..budget.min(self.entries.len()) {
            let i = self.gc_hand;
            self.gc_hand = (i + 1) & mask;
            let f = &self.entries[i].flow;
            if f.slots != 0 && f.expires_ns <= now_ns {
                self.remove_entry(i as u32);
                removed += 1;
            }
        }
        self.stats.gc_removed += removed as u64;
        removed
    }

    /// Appends every live flow to `out` as [`EXPORTED_FLOW_BYTES`]-byte records (a hot restart
    /// carries them to the next agent). Returns how many.
    pub fn export(&self, now_ns: u64, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        for e in self.entries.iter() {
            if e.flow.slots == 0 || e.flow.expires_ns <= now_ns {
                continue;
            }
            encode_flow(&e.keys, &e.flow, e.flow.expires_ns - now_ns, out);
            n += 1;
        }
        n
    }

    /// Inserts the flows of [`Conntrack::export`]'s records, their time left counted from
    /// `now_ns`. Their policy verdicts are taken again at their next packet (`policy_gen` 0:
    /// the next agent's policy generations are its own). A record that does not decode is an
    /// error naming it; the flows before it stay inserted.
    pub fn import(&mut self, bytes: &[u8], now_ns: u64) -> Result<usize, ImportError> {
        if !bytes.len().is_multiple_of(EXPORTED_FLOW_BYTES) {
            return Err(ImportError::Length(bytes.len()));
        }
        let mut n = 0;
        for (i, rec) in bytes.chunks_exact(EXPORTED_FLOW_BYTES).enumerate() {
            let (keys, mut flow, left_ns) =
                decode_flow(rec).ok_or(ImportError::Record { index: i })?;
            flow.expires_ns = now_ns.saturating_add(left_ns);
            flow.policy_gen = 0;
            // An eviction here means the table is smaller than the one exported: counted in
            // the stats like any eviction.
            let _ = self.insert(&keys[0], &keys[1], flow, now_ns);
            n += 1;
        }
        Ok(n)
    }

    fn note(evicted: &mut Option<Evicted>, e: Option<Evicted>) {
        if evicted.is_none() {
            *evicted = e;
        }
    }

    /// Evicts entry `idx`; reports it when it was live.
    fn evict(&mut self, idx: u32, live_reason: EvictReason, now_ns: u64) -> Option<Evicted> {
        let e = &self.entries[idx as usize];
        let key = e.keys[0];
        let reason = if e.flow.expires_ns <= now_ns {
            EvictReason::Expired
        } else {
            live_reason
        };
        self.remove_entry(idx);
        self.stats.evictions[reason as usize] += 1;
        (reason != EvictReason::Expired).then_some(Evicted { key, reason })
    }

    /// The entry to evict among those referenced from `windows` (bucket pairs), not `exclude`:
    /// an expired one, else the one closest to expiry. Falls back to the entries after the
    /// eviction hand when the windows reference nothing.
    fn victim(&mut self, windows: &[(usize, usize)], exclude: u32, now_ns: u64) -> Option<u32> {
        let mut best: Option<(u64, u32)> = None;
        'scan: for &(b1, b2) in windows {
            for b in [b1, b2] {
                for s in &self.buckets[b].0 {
                    let idx = s.r >> 1;
                    if s.tag != 0 && idx != exclude {
                        let expires = self.entries[idx as usize].flow.expires_ns;
                        if closer(&mut best, idx, expires, now_ns) {
                            break 'scan;
                        }
                    }
                }
            }
        }
        if best.is_none() {
            let mask = self.entries.len() - 1;
            for _ in 0..HAND_SCAN.min(self.entries.len()) {
                let i = self.evict_hand;
                self.evict_hand = (i + 1) & mask;
                let f = &self.entries[i].flow;
                if f.slots != 0
                    && i as u32 != exclude
                    && closer(&mut best, i as u32, f.expires_ns, now_ns)
                {
                    break;
                }
            }
        }
        best.map(|(_, idx)| idx)
    }

    /// Puts `r` in an empty slot of the less loaded of `key`'s buckets (ties: the first), else
    /// moves one slot of a full bucket to its other bucket to make room (one level of cuckoo
    /// displacement, at most 16 candidates, no entry read: a slot's other bucket is its bucket
    /// XOR a function of its tag); false when that fails too.
    fn place(&mut self, key: &FlowKey, r: u32) -> bool {
        let h = self.hash(key);
        let tag = tag_of(h);
        let (b1, b2) = self.buckets_from(h);
        let new = Slot { tag, r };
        let (u1, u2) = (self.buckets[b1].used(), self.buckets[b2].used());
        let b = if u2 < u1 { b2 } else { b1 };
        if u1.min(u2) < SLOTS_PER_BUCKET {
            return self.buckets[b].put(new);
        }
        for b in [b1, b2] {
            for i in 0..SLOTS_PER_BUCKET {
                let moved = self.buckets[b].0[i];
                let other = b ^ self.alt_of(moved.tag);
                if self.buckets[other].put(moved) {
                    self.buckets[b].0[i] = new;
                    self.stats.displaced += 1;
                    return true;
                }
            }
        }
        false
    }

    /// Frees entry `idx` and clears its index slots.
    fn remove_entry(&mut self, idx: u32) {
        let e = self.entries[idx as usize];
        for (dir, k) in e.keys.iter().enumerate().take(usize::from(e.flow.slots)) {
            let r = idx << 1 | dir as u32;
            let (b1, b2) = self.buckets_of(k);
            for b in [b1, b2] {
                if let Some(s) = self.buckets[b]
                    .0
                    .iter_mut()
                    .find(|s| s.tag != 0 && s.r == r)
                {
                    *s = Slot::default();
                    break;
                }
            }
        }
        self.entries[idx as usize].flow.slots = 0;
        self.free.push(idx);
        self.stats.entries -= 1;
    }

    /// (bucket, slot, r) of `key`, live or expired.
    #[inline]
    fn find(&self, key: &FlowKey) -> Option<(usize, usize, u32)> {
        let h = self.hash(key);
        let tag = tag_of(h);
        let (b1, b2) = self.buckets_from(h);
        for b in [b1, b2] {
            for (i, s) in self.buckets[b].0.iter().enumerate() {
                if s.tag == tag {
                    let e = &self.entries[(s.r >> 1) as usize];
                    if e.keys[(s.r & 1) as usize] == *key {
                        return Some((b, i, s.r));
                    }
                }
            }
        }
        None
    }

    #[inline]
    fn buckets_of(&self, key: &FlowKey) -> (usize, usize) {
        self.buckets_from(self.hash(key))
    }

    /// Two distinct buckets from one hash: the first from the low bits, the second the first
    /// XOR a mix of the tag (the high 32 bits: independent of the low ones), so each bucket of
    /// a slot is the other XOR [`Self::alt_of`] its tag ("partial-key cuckoo hashing",
    /// Fan et al., CoNEXT 2014).
    #[inline]
    fn buckets_from(&self, h: u64) -> (usize, usize) {
        let b1 = h as usize & self.bucket_mask;
        (b1, b1 ^ self.alt_of(tag_of(h)))
    }

    /// The XOR distance between a tag's two buckets: non-zero, below the bucket count.
    #[inline]
    fn alt_of(&self, tag: u32) -> usize {
        let x = (u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
        (x & self.bucket_mask).max(1)
    }

    #[inline]
    fn hash(&self, k: &FlowKey) -> u64 {
        let a = (u64::from(u32::from(k.src)) << 32) | u64::from(u32::from(k.dst));
        let b = (u64::from(k.sport) << 24) | (u64::from(k.dport) << 8) | u64::from(k.proto);
        let mut h = (a ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h = (h.rotate_left(29) ^ b).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h = (h ^ (h >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h ^ (h >> 29)
    }
}

/// Asks for transparent huge pages over the 2 MiB-aligned interior of a large table (a hint:
/// lookups are random over the whole table and 4 KiB pages cost a TLB miss per lookup; with
/// THP in `madvise` mode nothing happens without it). Failure is harmless and ignored.
fn advise_huge_pages<T>(table: &[T]) {
    const HUGE: usize = 2 << 20;
    let start = table.as_ptr() as usize;
    let end = start + std::mem::size_of_val(table);
    let from = start.next_multiple_of(HUGE);
    if end <= from + HUGE {
        return;
    }
    let len = (end - from) / HUGE * HUGE;
    // SAFETY: [from, from + len) lies inside `table`'s live allocation; MADV_HUGEPAGE changes
    // only how the kernel backs those pages, never their contents or validity.
    unsafe {
        libc::madvise(from as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

/// A non-zero 32-bit tag from the hash's high half.
#[inline]
fn tag_of(h: u64) -> u32 {
    (h >> 32) as u32 | 1
}

/// Keeps in `best` the entry closest to expiry; true when `idx` has expired (stop looking).
#[inline]
fn closer(best: &mut Option<(u64, u32)>, idx: u32, expires_ns: u64, now_ns: u64) -> bool {
    if best.is_none_or(|(e, _)| expires_ns < e) {
        *best = Some((expires_ns, idx));
    }
    expires_ns <= now_ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
    const S: u64 = NS_PER_SEC;

    fn table(capacity: usize) -> Conntrack {
        Conntrack::new(Config {
            capacity,
            seed: 0x5eed,
            timeouts: Timeouts::default(),
        })
        .expect("valid capacity")
    }

    fn key(proto: u8, sport: u16) -> FlowKey {
        FlowKey {
            src: CLIENT,
            dst: SERVICE,
            sport,
            dport: 80,
            proto,
        }
    }

    /// Inserts a DNATed TCP flow (client -> service:80 becomes backend:8080) with `flags`.
    fn insert_dnat(ct: &mut Conntrack, sport: u16, flags: u8, now: u64) -> (FlowKey, FlowKey) {
        let k = key(ipv4::PROTO_TCP, sport);
        let rw = NatRewrite::dnat(BACKEND, 8080);
        let reply = k.reply_key(&rw);
        let flow = ct.new_flow(ipv4::PROTO_TCP, flags, Some(rw), 3, now);
        assert_eq!(ct.insert(&k, &reply, flow, now), Ok(()));
        (k, reply)
    }

    #[test]
    fn exported_flows_come_back_in_another_table_with_their_time_left() {
        let mut old = table(64);
        let t0 = 1_000 * S;
        let (k, reply) = insert_dnat(&mut old, 40000, TCP_SYN, t0);
        old.track(&reply, TCP_SYN | TCP_ACK, t0 + S).expect("reply");
        old.track(&k, TCP_ACK, t0 + S).expect("ack");
        assert!(old.set_policy(&k, 9, true));
        // A SNATed UDP flow, an untranslated ICMP flow, and one that expires before the export.
        let u = key(ipv4::PROTO_UDP, 5353);
        let snat = NatRewrite {
            src: Some((Ipv4Addr::new(192, 168, 0, 1), 61001)),
            dst: None,
        };
        let f = old.new_flow(ipv4::PROTO_UDP, 0, Some(snat), 0, t0);
        old.insert(&u, &u.reply_key(&snat), f, t0).expect("room");
        let i = key(ipv4::PROTO_ICMP, 7);
        let f = old.new_flow(ipv4::PROTO_ICMP, 0, None, 0, t0);
        old.insert(&i, &i.reversed(), f, t0).expect("room");
        let gone = key(ipv4::PROTO_ICMP, 8);
        let f = old.new_flow(ipv4::PROTO_ICMP, 0, None, 0, t0 - 100 * S);
        old.insert(&gone, &gone.reversed(), f, t0 - 100 * S)
            .expect("room");

        let now_old = t0 + 2 * S;
        let mut bytes = Vec::new();
        assert_eq!(
            old.export(now_old, &mut bytes),
            3,
            "the expired flow stays behind"
        );
        assert_eq!(bytes.len(), 3 * EXPORTED_FLOW_BYTES);

        // Another process: another clock origin, another seed.
        let mut new = Conntrack::new(Config {
            capacity: 128,
            seed: 77,
            timeouts: Timeouts::default(),
        })
        .expect("valid");
        let now_new = 5 * S;
        assert_eq!(new.import(&bytes, now_new), Ok(3));
        assert_eq!(new.len(), 3);
        let (dir, f) = new.lookup_dir(&reply, now_new).expect("reply key found");
        assert_eq!(dir, Direction::Reply);
        assert_eq!(f.state, FlowState::TcpEstablished);
        assert_eq!(f.nat, Some(NatRewrite::dnat(BACKEND, 8080)));
        assert_eq!(f.backend, 3);
        assert_eq!(f.policy_gen, 0, "verdicts are taken again by the new agent");
        assert!(f.policy_audit);
        let left = old.lookup(&k, now_old).expect("old").expires_ns - now_old;
        assert_eq!(
            new.lookup(&k, now_new).expect("new").expires_ns,
            now_new + left
        );
        let fu = new
            .lookup(&u.reply_key(&snat), now_new)
            .expect("snat reply");
        assert_eq!(fu.nat, Some(snat));
        assert!(new.lookup(&i.reversed(), now_new).is_some());
        assert!(new.lookup(&gone, now_new).is_none());
    }

    #[test]
    fn malformed_flow_records_are_refused_by_name() {
        let mut old = table(8);
        insert_dnat(&mut old, 1, TCP_SYN, S);
        let mut bytes = Vec::new();
        old.export(S, &mut bytes);
        let mut new = table(8);
        assert_eq!(new.import(&bytes[..10], S), Err(ImportError::Length(10)));
        let mut bad = bytes.clone();
        bad[52] = 200; // no such state
        assert_eq!(new.import(&bad, S), Err(ImportError::Record { index: 0 }));
        let mut bad = bytes;
        bad[26] = REC_NAT_SRC; // a rewrite flag without a rewrite
        assert_eq!(new.import(&bad, S), Err(ImportError::Record { index: 0 }));
        assert!(new.is_empty());
    }

    #[test]
    fn bytes_per_entry_is_documented() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
        assert_eq!(std::mem::size_of::<Flow>(), 32);
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(BYTES_PER_ENTRY, 100);
    }

    #[test]
    fn capacity_must_be_a_power_of_two() {
        for bad in [0, 3, 1000, MAX_CAPACITY * 2] {
            let err = Conntrack::new(Config {
                capacity: bad,
                seed: 1,
                timeouts: Timeouts::default(),
            })
            .err();
            assert_eq!(err, Some(ConntrackError::Capacity(bad)));
        }
        assert!(err_message_names_the_fix());
    }

    fn err_message_names_the_fix() -> bool {
        ConntrackError::Capacity(3)
            .to_string()
            .contains("power of two")
    }

    #[test]
    fn both_directions_find_one_flow() {
        let mut ct = table(16);
        let (k, reply) = insert_dnat(&mut ct, 40000, TCP_SYN, 0);
        assert_eq!(
            reply,
            FlowKey {
                src: BACKEND,
                dst: CLIENT,
                sport: 8080,
                dport: 40000,
                proto: ipv4::PROTO_TCP
            }
        );
        let (dir, f) = ct.lookup_dir(&k, 1).expect("original direction");
        assert_eq!(dir, Direction::Original);
        assert_eq!(f.backend, 3);
        f.backend = 9;
        let (dir, f) = ct.lookup_dir(&reply, 1).expect("reply direction");
        assert_eq!(dir, Direction::Reply);
        assert_eq!(f.backend, 9, "both keys lead to the same entry");
        assert_eq!(
            f.rewrite_for(&k, Direction::Reply),
            Some(NatRewrite::snat(SERVICE, 80))
        );
        assert_eq!(ct.original_key(&reply, 1), Some(k));
        assert!(
            ct.lookup(&k.reversed(), 1).is_none(),
            "un-NATed reverse key"
        );
        assert_eq!(ct.len(), 1);
        let st = ct.stats();
        assert_eq!((st.lookup_hits, st.lookup_misses, st.entries), (2, 1, 1));
        assert!(ct.remove(&reply).is_some());
        assert!(ct.lookup(&k, 1).is_none());
        assert!(ct.is_empty());
    }

    #[test]
    fn a_flow_to_itself_uses_one_key() {
        let mut ct = table(4);
        let k = FlowKey {
            src: CLIENT,
            dst: CLIENT,
            sport: 7,
            dport: 7,
            proto: ipv4::PROTO_UDP,
        };
        let f = ct.new_flow(ipv4::PROTO_UDP, 0, None, 0, 0);
        assert_eq!(ct.insert(&k, &k.reversed(), f, 0), Ok(()));
        assert_eq!(
            ct.lookup_dir(&k, 0).map(|(d, _)| d),
            Some(Direction::Original)
        );
        assert!(ct.remove(&k).is_some());
        assert!(ct.lookup(&k, 0).is_none());
    }

    #[test]
    fn tcp_state_follows_flags_with_linux_timeouts() {
        let mut ct = table(16);
        let t = Timeouts::default();
        let (k, reply) = insert_dnat(&mut ct, 40001, TCP_SYN, 0);
        let f = ct.lookup(&k, 0).expect("flow");
        assert_eq!((f.state, f.expires_ns), (FlowState::TcpSynSent, 120 * S));
        let steps: [(&FlowKey, u8, FlowState, u64); 7] = [
            // A SYN-ACK from the original side does not advance the handshake.
            (&k, TCP_SYN | TCP_ACK, FlowState::TcpSynSent, 120 * S),
            (&reply, TCP_SYN | TCP_ACK, FlowState::TcpSynRecv, 60 * S),
            (&k, TCP_ACK, FlowState::TcpEstablished, 6 * 3600 * S),
            (&reply, TCP_ACK, FlowState::TcpEstablished, 6 * 3600 * S),
            (&k, TCP_FIN | TCP_ACK, FlowState::TcpFinWait, 10 * S),
            (&reply, TCP_FIN | TCP_ACK, FlowState::TcpTimeWait, 120 * S),
            (&k, TCP_ACK, FlowState::TcpTimeWait, 120 * S),
        ];
        let mut now = 0;
        for (i, (key, flags, state, timeout)) in steps.into_iter().enumerate() {
            now += S;
            let (_, f) = ct.track(key, flags, now).expect("live flow");
            assert_eq!((i, f.state), (i, state));
            assert_eq!(f.expires_ns, now + timeout, "step {i}");
            assert_eq!(timeout, t.for_state(state));
        }
        // Port reuse: a new SYN on a TIME_WAIT flow starts over.
        let (_, f) = ct.track(&k, TCP_SYN, now).expect("live");
        assert_eq!(f.state, FlowState::TcpSynSent);
        // RST from either side closes, from any state.
        let (_, f) = ct.track(&reply, TCP_RST | TCP_ACK, now).expect("live");
        assert_eq!((f.state, f.expires_ns), (FlowState::TcpClose, now + 10 * S));
        assert!(ct.lookup(&k, now + 10 * S).is_none(), "closed flow expires");
    }

    #[test]
    fn first_packet_decides_the_initial_state() {
        use FlowState::*;
        let tcp = ipv4::PROTO_TCP;
        assert_eq!(FlowState::initial(tcp, TCP_SYN), TcpSynSent);
        assert_eq!(FlowState::initial(tcp, TCP_ACK), TcpEstablished);
        assert_eq!(FlowState::initial(tcp, TCP_RST), TcpClose);
        assert_eq!(FlowState::initial(tcp, TCP_FIN | TCP_ACK), TcpFinWait);
        assert_eq!(FlowState::initial(ipv4::PROTO_UDP, 0), Udp);
        assert_eq!(FlowState::initial(ipv4::PROTO_ICMP, 0), Icmp);
        assert_eq!(FlowState::initial(47, 0), Other);
    }

    #[test]
    fn udp_is_assured_after_a_reply_and_icmp_has_its_own_timeout() {
        let mut ct = table(8);
        let k = key(ipv4::PROTO_UDP, 5353);
        let f = ct.new_flow(ipv4::PROTO_UDP, 0, None, 0, 0);
        assert_eq!(ct.insert(&k, &k.reversed(), f, 0), Ok(()));
        let (_, f) = ct.track(&k, 0, S).expect("live");
        assert_eq!((f.state, f.expires_ns), (FlowState::Udp, 31 * S));
        let (_, f) = ct.track(&k.reversed(), 0, 2 * S).expect("live");
        assert_eq!((f.state, f.expires_ns), (FlowState::UdpAssured, 122 * S));
        let (_, f) = ct.track(&k, 0, 3 * S).expect("live");
        assert_eq!((f.state, f.expires_ns), (FlowState::UdpAssured, 123 * S));

        let echo = FlowKey {
            src: CLIENT,
            dst: BACKEND,
            sport: 77,
            dport: 0,
            proto: ipv4::PROTO_ICMP,
        };
        let f = ct.new_flow(ipv4::PROTO_ICMP, 0, None, 0, 0);
        assert_eq!(f.expires_ns, 30 * S);
        assert_eq!(ct.insert(&echo, &echo.reversed(), f, 0), Ok(()));
        assert!(ct.lookup(&echo.reversed(), 29 * S).is_some());
        assert!(ct.lookup(&echo, 30 * S).is_none());
    }

    #[test]
    fn icmp_echo_keys_translate_the_identifier_side_only() {
        let req = FlowKey {
            src: CLIENT,
            dst: SERVICE,
            sport: 77,
            dport: 0,
            proto: ipv4::PROTO_ICMP,
        };
        let masq = NatRewrite::snat(BACKEND, 1234);
        let reply = req.reply_key(&masq);
        assert_eq!(
            (reply.src, reply.dst, reply.sport, reply.dport),
            (SERVICE, BACKEND, 0, 1234)
        );
        // DNAT of an echo: the destination's "port" is not the identifier's side.
        let d = req.translated(&NatRewrite::dnat(BACKEND, 999));
        assert_eq!((d.dst, d.sport, d.dport), (BACKEND, 77, 0));
        assert_eq!(
            reply_rewrite(&req, &masq),
            NatRewrite {
                src: None,
                dst: Some((CLIENT, 77))
            }
        );
    }

    #[test]
    fn expired_flows_are_absent_and_counted_as_misses() {
        let mut ct = table(8);
        let (k, reply) = insert_dnat(&mut ct, 1, TCP_SYN, 0);
        assert!(ct.lookup(&reply, 120 * S - 1).is_some());
        assert!(ct.lookup(&k, 120 * S).is_none());
        assert!(ct.track(&reply, TCP_ACK, 121 * S).is_none());
        assert_eq!(ct.stats().lookup_misses, 2);
        // Still occupying memory until GC or an insert reclaims it.
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.gc(120 * S, 8), 1);
        assert!(ct.is_empty());
    }

    #[test]
    fn reinserting_a_key_replaces_the_flow() {
        let mut ct = table(8);
        let (k, _) = insert_dnat(&mut ct, 5, TCP_SYN, 0);
        let (_, _) = insert_dnat(&mut ct, 5, TCP_ACK, 1);
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.stats().replaced, 1);
        assert_eq!(
            ct.lookup(&k, 1).map(|f| f.state),
            Some(FlowState::TcpEstablished)
        );
    }

    #[test]
    fn full_table_evicts_closest_to_expiry_and_counts() {
        let mut ct = table(4);
        let t = Timeouts::default();
        // Four live flows with different expiries: port 3's expires first.
        let mut keys = Vec::new();
        for (sport, flags) in [(1, TCP_ACK), (2, TCP_SYN), (3, TCP_RST), (4, TCP_ACK)] {
            keys.push(insert_dnat(&mut ct, sport, flags, 0).0);
        }
        assert_eq!(ct.len(), 4);
        let k5 = key(ipv4::PROTO_TCP, 5);
        let f = ct.new_flow(ipv4::PROTO_TCP, TCP_SYN, None, 0, S);
        let res = ct.insert(&k5, &k5.reversed(), f, S);
        // With capacity 4 the index is two buckets: every flow is in the window.
        assert_eq!(
            res,
            Err(Evicted {
                key: keys[2],
                reason: EvictReason::TableFull
            })
        );
        assert_eq!(ct.len(), 4);
        assert!(ct.lookup(&keys[2], S).is_none());
        assert!(ct.lookup(&k5, S).is_some());
        assert_eq!(ct.stats().evictions, [0, 1, 0]);
        // Once flows have expired, an insert reuses one without evicting a live flow.
        let later = S + t.tcp_syn_sent_ns;
        let k6 = key(ipv4::PROTO_TCP, 6);
        let f = ct.new_flow(ipv4::PROTO_TCP, TCP_SYN, None, 0, later);
        assert_eq!(ct.insert(&k6, &k6.reversed(), f, later), Ok(()));
        assert_eq!(ct.stats().evictions, [1, 1, 0]);
        assert_eq!(ct.stats().inserts, 6);
    }

    #[test]
    fn capacity_one_evicts_every_time() {
        let mut ct = table(1);
        let mut last = None;
        for sport in 1..=100u16 {
            let k = key(ipv4::PROTO_UDP, sport);
            let f = ct.new_flow(ipv4::PROTO_UDP, 0, None, 0, 0);
            let res = ct.insert(&k, &k.reversed(), f, 0);
            if let Some(prev) = last {
                assert_eq!(
                    res,
                    Err(Evicted {
                        key: prev,
                        reason: EvictReason::TableFull
                    })
                );
            }
            assert!(ct.lookup(&k.reversed(), 0).is_some());
            last = Some(k);
        }
        assert_eq!(ct.stats().evictions[EvictReason::TableFull as usize], 99);
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn gc_is_bounded_per_call_and_complete_over_calls() {
        let cap = 1024;
        let mut ct = table(cap);
        // 900 UDP flows (30 s) and 100 established TCP flows (6 h).
        for sport in 0..1000u16 {
            let (proto, flags) = if sport < 900 {
                (ipv4::PROTO_UDP, 0)
            } else {
                (ipv4::PROTO_TCP, TCP_ACK)
            };
            let k = key(proto, sport);
            let f = ct.new_flow(proto, flags, None, 0, 0);
            assert_eq!(ct.insert(&k, &k.reversed(), f, 0), Ok(()));
        }
        assert_eq!(ct.gc(29 * S, cap), 0, "nothing expired yet");
        let now = 30 * S;
        let budget = 100;
        let mut total = 0;
        for _ in 0..cap / budget + 1 {
            let n = ct.gc(now, budget);
            assert!(n <= budget);
            total += n;
        }
        assert_eq!(total, 900);
        assert_eq!(ct.len(), 100);
        assert_eq!(ct.stats().gc_removed, 900);
        assert_eq!(ct.stats().entries, 100);
        for sport in 900..1000 {
            assert!(ct.lookup(&key(ipv4::PROTO_TCP, sport), now).is_some());
        }
        assert_eq!(ct.gc(now, 0), 0);
    }

    #[test]
    fn full_table_stays_consistent_under_churn() {
        let mut ct = table(1 << 10);
        let mut now = 0;
        for i in 0..20_000u32 {
            now += 1_000;
            let k = FlowKey {
                src: Ipv4Addr::from(0x0af4_0000 | (i % 5000)),
                dst: SERVICE,
                sport: (i * 7) as u16,
                dport: 443,
                proto: ipv4::PROTO_TCP,
            };
            let rw = NatRewrite::dnat(BACKEND, 8443);
            let f = ct.new_flow(ipv4::PROTO_TCP, TCP_SYN, Some(rw), i as u16, now);
            let _ = ct.insert(&k, &k.reply_key(&rw), f, now);
            assert_eq!(
                ct.lookup(&k.reply_key(&rw), now).map(|f| f.backend),
                Some(i as u16)
            );
        }
        let st = *ct.stats();
        assert_eq!(st.entries as usize, ct.len());
        assert_eq!(ct.len(), 1 << 10);
        assert_eq!(st.inserts, 20_000);
        let evicted: u64 = st.evictions.iter().sum();
        assert_eq!(st.inserts - st.replaced - evicted, 1 << 10);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_never_panic_and_keep_counts(
            cap_log in 0u32..6,
            ops in proptest::collection::vec((0u8..4, any::<u16>(), 0u8..4, 0u64..200), 1..400),
        ) {
            let mut ct = table(1 << cap_log);
            let mut now = 0u64;
            for (op, port, proto_sel, dt) in ops {
                now += dt * S;
                let proto = [ipv4::PROTO_TCP, ipv4::PROTO_UDP, ipv4::PROTO_ICMP, 132][proto_sel as usize];
                let k = FlowKey { src: CLIENT, dst: SERVICE, sport: port % 64, dport: port / 1024, proto };
                match op {
                    0 | 1 => {
                        let rw = NatRewrite::dnat(BACKEND, port);
                        let f = ct.new_flow(proto, port as u8, Some(rw), 0, now);
                        let reply = k.reply_key(&rw);
                        let _ = ct.insert(&k, &reply, f, now);
                        prop_assert!(ct.lookup(&k, now).is_some());
                        prop_assert!(ct.lookup(&reply, now).is_some());
                    }
                    2 => { let _ = ct.track(&k, port as u8, now); }
                    _ => { ct.gc(now, usize::from(port % 8)); }
                }
                prop_assert!(ct.len() <= ct.capacity());
                prop_assert_eq!(ct.stats().entries as usize, ct.len());
            }
        }
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    /// splitmix64: a seeded source of distinct-enough random keys for the load tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn random_key(rng: &mut Rng) -> FlowKey {
        let a = rng.next();
        let b = rng.next();
        FlowKey {
            src: Ipv4Addr::from(a as u32),
            dst: Ipv4Addr::from((a >> 32) as u32),
            sport: b as u16,
            dport: (b >> 16) as u16,
            proto: [ipv4::PROTO_TCP, ipv4::PROTO_UDP][(b >> 32) as usize & 1],
        }
    }

    /// Histogram of bucket loads: `h[n]` buckets hold `n` keys.
    fn histogram(ct: &Conntrack) -> [usize; SLOTS_PER_BUCKET + 1] {
        let mut h = [0; SLOTS_PER_BUCKET + 1];
        for b in ct.buckets.iter() {
            h[b.0.iter().filter(|s| s.tag != 0).count()] += 1;
        }
        h
    }

    /// Fills a table of `capacity` with `flows` random DNATed flows (both keys inserted).
    fn fill(capacity: usize, flows: usize, seed: u64) -> Conntrack {
        let mut ct = Conntrack::new(Config {
            capacity,
            seed,
            timeouts: Timeouts::default(),
        })
        .expect("valid capacity");
        let mut rng = Rng(seed);
        let backend = Ipv4Addr::new(10, 244, 2, 7);
        for i in 0..flows {
            let k = random_key(&mut rng);
            let rw = NatRewrite::dnat(backend, (i as u16) | 1);
            let f = ct.new_flow(k.proto, TCP_SYN, Some(rw), i as u16, 0);
            let _ = ct.insert(&k, &k.reply_key(&rw), f, 0);
        }
        ct
    }

    /// Max bucket load and histogram of `keys` balls in `buckets` bins with the ideal scheme:
    /// two independent uniform choices, each ball into the less loaded one (ties: the first).
    fn ideal_two_choice(buckets: usize, keys: usize, seed: u64) -> [usize; 17] {
        let mut load = vec![0usize; buckets];
        let mut rng = Rng(seed);
        for _ in 0..keys {
            let (b1, b2) = (rng.next() as usize % buckets, rng.next() as usize % buckets);
            let b = if load[b2] < load[b1] { b2 } else { b1 };
            load[b] += 1;
        }
        let mut h = [0; 17];
        for l in load {
            h[l.min(16)] += 1;
        }
        h
    }

    fn max_load(h: &[usize]) -> usize {
        h.iter().rposition(|&n| n != 0).unwrap_or(0)
    }

    /// Half the capacity (a quarter of the index) and the full capacity (half the index, the
    /// design's worst case): two choices of 8-slot buckets must never both be full.
    #[test]
    fn filled_tables_never_evict_for_full_buckets() {
        let cap = 1 << 16;
        for seed in [1, 2, 3] {
            for flows in [cap / 2, cap] {
                let ct = fill(cap, flows, seed);
                let st = ct.stats();
                eprintln!(
                    "seed {seed} flows {flows}/{cap}: evictions {:?} displaced {} loads {:?}",
                    st.evictions,
                    st.displaced,
                    histogram(&ct)
                );
                assert_eq!(ct.len(), flows);
                assert_eq!(st.evictions, [0, 0, 0], "seed {seed}, {flows} flows");
            }
        }
    }

    /// The bucket-load histogram matches two independent choices (correlated choices or
    /// first-fit placement give the one-choice Poisson tail: buckets of 7 and 8 at 25 % load).
    #[test]
    fn bucket_loads_match_two_independent_choices() {
        let cap = 1 << 16;
        let flows = cap / 2;
        let ct = fill(cap, flows, 11);
        let real = histogram(&ct);
        let keys: usize = real.iter().enumerate().map(|(n, b)| n * b).sum();
        assert_eq!(keys, 2 * flows, "random keys: no reply key equals its key");
        let ideal = ideal_two_choice(ct.buckets.len(), keys, 12);
        eprintln!("bucket loads at 25 % index load: table {real:?}, ideal two-choice {ideal:?}");
        assert!(
            max_load(&real) <= max_load(&ideal) + 1,
            "max bucket load {} vs {} for two independent choices",
            max_load(&real),
            max_load(&ideal)
        );
        // Buckets with more than 4 keys: a handful with two choices, ~5 % with one.
        let heavy = |h: &[usize]| h.iter().skip(5).sum::<usize>();
        assert!(
            heavy(&real) <= heavy(&ideal) * 2 + 8,
            "{real:?} vs {ideal:?}"
        );
    }

    /// Both buckets of a new key full, but one slot's other bucket has room: it moves there
    /// and nothing is evicted; every key stays findable and removable.
    #[test]
    fn a_full_bucket_pair_displaces_a_slot_instead_of_evicting() {
        let mut ct = Conntrack::new(Config {
            capacity: 32,
            seed: 9,
            timeouts: Timeouts::default(),
        })
        .expect("valid capacity");
        assert_eq!(ct.buckets.len(), 16);
        let mut rng = Rng(5);
        let target = random_key(&mut rng);
        let (b1, b2) = ct.buckets_of(&target);
        // 8 single-key flows homed in b1 and 8 in b2, each with its other bucket elsewhere.
        let mut movers = Vec::new();
        for _ in 0..100_000 {
            if movers.len() == 2 * SLOTS_PER_BUCKET {
                break;
            }
            let k = random_key(&mut rng);
            let (c1, c2) = ct.buckets_of(&k);
            let home = if movers.len() < SLOTS_PER_BUCKET {
                b1
            } else {
                b2
            };
            let other = c1 ^ c2 ^ home;
            if (c1 == home || c2 == home) && other != b1 && other != b2 {
                movers.push((k, home));
            }
        }
        assert_eq!(movers.len(), 16, "enough keys found");
        for (k, _) in &movers {
            let f = ct.new_flow(ipv4::PROTO_UDP, 0, None, 0, 0);
            assert_eq!(ct.insert(k, k, f, 0), Ok(()));
        }
        // Rearrange the index so that b1 and b2 are full.
        let slots: Vec<Slot> = movers
            .iter()
            .map(|(k, _)| {
                let (b, i, _) = ct.find(k).expect("inserted");
                ct.buckets[b].0[i]
            })
            .collect();
        ct.buckets.fill(Bucket::default());
        for ((_, home), slot) in movers.iter().zip(slots) {
            assert!(ct.buckets[*home].put(slot));
        }
        assert_eq!(ct.buckets[b1].used() + ct.buckets[b2].used(), 16);

        let f = ct.new_flow(ipv4::PROTO_UDP, 0, None, 0, 0);
        assert_eq!(ct.insert(&target, &target, f, 0), Ok(()));
        assert_eq!(ct.stats().displaced, 1);
        assert_eq!(ct.stats().evictions, [0, 0, 0]);
        assert!(ct.lookup(&target, 0).is_some());
        for (k, _) in &movers {
            assert!(ct.lookup(k, 0).is_some(), "{k:?} still found");
            assert!(ct.remove(k).is_some());
        }
        assert!(ct.remove(&target).is_some());
        assert!(ct.is_empty());
        assert!(ct.buckets.iter().all(|b| b.used() == 0), "no stale slots");
    }
}
