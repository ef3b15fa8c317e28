//! Compiled network policy: what a worker asks when a flow starts, answered in a bounded number
//! of probes whatever the number of policies.
//!
//! ```text
//!  flow (src, dst, proto, dport), post-DNAT
//!   ├─ src is a local endpoint (pod)?   egress of src:  remote = dst
//!   └─ dst is a local endpoint (pod)?   ingress of dst: remote = src (this node's own
//!                                       addresses are always allowed: the Kubernetes rule)
//!  per direction: endpoint isolated? no -> allowed
//!     remote -> identity (pods of the cluster, by address)          FlatIndex probe
//!     remote -> CIDR class (most specific ipBlock prefix holding it) binary search
//!     for peer in [identity, cidr class, any] x proto in [proto, any]:
//!        rules[(endpoint, dir, peer, proto)] -> disjoint port ranges  hash probe + search
//!     -> bits: ALLOW_ENFORCED (an enforcing policy allows), ALLOW_AUDIT (an audit-mode one)
//! ```
//!
//! Control (`control::policy`) compiles NetworkPolicies and host policies into these tables; the
//! table does not know about policies, labels or names (that is `sluice policy trace`'s side, in
//! control). Two views are evaluated at once:
//! - the **enforced** view (policies in enforcing mode): a packet it denies is dropped;
//! - the **full** view (audit-mode policies too): a packet only it denies is forwarded and
//!   reported with an audit verdict.
//!
//! The worker caches the verdict in the flow's conntrack entry with the table's
//! [`PolicyTable::generation`] and asks again when the generation changes, so a connection that
//! becomes denied is cut (see `stages::lb`).
//!
//! **CIDR classes.** Every ipBlock `cidr` and `except` prefix is a class. An address's class is
//! the most specific prefix holding it; since prefixes nest, that one prefix fixes membership in
//! every other: `a` is in `C` exactly when class(a) is inside `C`. A rule `ipBlock {cidr C,
//! except E..}` therefore becomes the list of classes inside `C` and inside no `E`, and the
//! address space is cut into intervals, each with its class, searched by binary search.
use std::net::Ipv4Addr;

use crate::{drop_reason::DropReason, snapshot::FlatIndex, wire::ipv4};

/// A rule for every protocol (a NetworkPolicy rule without `ports`).
pub const PROTO_ANY: u8 = 0;
/// A rule of a policy in enforcing mode allows this.
pub const ALLOW_ENFORCED: u8 = 1;
/// A rule of a policy in audit mode allows this.
pub const ALLOW_AUDIT: u8 = 2;

/// Largest identity id (ids share a 64-bit rule key with the endpoint, direction and protocol).
pub const MAX_IDENTITY: u32 = (1 << 29) - 1;
/// Largest number of endpoints (local pods and the host) one table holds.
pub const MAX_ENDPOINTS: usize = 1 << 20;

/// Direction of traffic, seen from the local endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    Ingress = 0,
    Egress = 1,
}

/// Whether policies select an endpoint for one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Isolation {
    /// A policy in enforcing mode selects it: what no enforcing rule allows is dropped.
    pub enforced: bool,
    /// A policy in audit mode selects it: what no rule allows is reported as audit.
    pub audit: bool,
}

impl Isolation {
    pub const OPEN: Isolation = Isolation {
        enforced: false,
        audit: false,
    };

    fn any(self) -> bool {
        self.enforced || self.audit
    }
}

/// The remote end a rule allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerSpec {
    /// Everyone: every pod and every address.
    Any,
    /// Pods of this identity (see [`PolicyBuilder::identity`]).
    Identity(u32),
    /// Addresses in `cidr` and in none of `except` (pod addresses included).
    IpBlock {
        cidr: (Ipv4Addr, u8),
        except: Vec<(Ipv4Addr, u8)>,
    },
}

/// The traffic a rule allows: a protocol ([`PROTO_ANY`]: all) and a destination port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub proto: u8,
    pub lo: u16,
    pub hi: u16,
}

impl PortSpec {
    /// All protocols, all ports.
    pub const ALL: PortSpec = PortSpec {
        proto: PROTO_ANY,
        lo: 0,
        hi: u16::MAX,
    };

    /// Every port of `proto`.
    pub const fn all_of(proto: u8) -> PortSpec {
        PortSpec {
            proto,
            lo: 0,
            hi: u16::MAX,
        }
    }

    /// One port of `proto`.
    pub const fn one(proto: u8, port: u16) -> PortSpec {
        PortSpec {
            proto,
            lo: port,
            hi: port,
        }
    }
}

/// What a table says about a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    Allow,
    /// Allowed by the enforced view, denied by the full one (or everything is in audit mode):
    /// forwarded, reported with this reason.
    Audit(DropReason),
    Deny(DropReason),
}

/// Errors building a table (control's input was out of range).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("identity id {0} is above the largest one ({MAX_IDENTITY})")]
    IdentityTooLarge(u32),
    #[error("more than {MAX_ENDPOINTS} policy endpoints on one node")]
    TooManyEndpoints,
    #[error("rule for endpoint {0}, which was not declared")]
    UnknownEndpoint(u32),
    #[error("prefix {0}/{1}: the length is above 32")]
    BadPrefix(Ipv4Addr, u8),
    #[error("port range {0}-{1} is empty (the low end is above the high end)")]
    BadPortRange(u16, u16),
    #[error("endpoint address {0} is declared twice")]
    DuplicateEndpoint(Ipv4Addr),
}

const PEER_ANY: u64 = 0;
const PEER_IDENTITY: u64 = 1;
const PEER_CIDR: u64 = 2;
const NO_CLASS: u32 = u32::MAX;

#[inline]
fn rule_key(ep: u32, dir: Dir, kind: u64, id: u32, proto: u8) -> u64 {
    u64::from(ep) << 40
        | (dir as u64) << 39
        | kind << 37
        | u64::from(id & MAX_IDENTITY) << 8
        | u64::from(proto)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    lo: u16,
    hi: u16,
    flags: u8,
}

/// Open addressing from a rule key to its slice of `ranges` (built once, read-only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RuleIndex {
    keys: Vec<u64>,
    /// (start, len) into `ranges`; len 0 marks an empty slot.
    spans: Vec<(u32, u32)>,
    ranges: Vec<Range>,
}

impl RuleIndex {
    fn build(mut rules: Vec<(u64, Range)>) -> RuleIndex {
        rules.sort_by_key(|&(k, r)| (k, r.lo, r.hi));
        // Group by key, then cut each group's ranges into disjoint pieces with OR-ed flags.
        let mut groups: Vec<(u64, Vec<Range>)> = Vec::new();
        for (k, r) in rules {
            match groups.last_mut() {
                Some((last, v)) if *last == k => v.push(r),
                _ => groups.push((k, vec![r])),
            }
        }
        let slots = (groups.len() * 2).next_power_of_two().max(8);
        let mut idx = RuleIndex {
            keys: vec![0; slots],
            spans: vec![(0, 0); slots],
            ranges: Vec::new(),
        };
        for (k, rs) in groups {
            let start = idx.ranges.len() as u32;
            idx.ranges.extend(disjoint(&rs));
            let len = idx.ranges.len() as u32 - start;
            let mask = slots - 1;
            let mut at = Self::slot(k, slots);
            while idx.spans[at].1 != 0 {
                at = (at + 1) & mask;
            }
            idx.keys[at] = k;
            idx.spans[at] = (start, len);
        }
        idx
    }

    #[inline]
    fn slot(k: u64, slots: usize) -> usize {
        let h = (k ^ k >> 29).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (h >> 32) as usize & (slots - 1)
    }

    /// The flags of the range holding `port` under key `k` (0: none).
    #[inline]
    fn flags(&self, k: u64, port: u16) -> u8 {
        let slots = self.keys.len();
        if slots == 0 {
            return 0;
        }
        let mask = slots - 1;
        let mut at = Self::slot(k, slots);
        loop {
            let (start, len) = self.spans[at];
            if len == 0 {
                return 0;
            }
            if self.keys[at] == k {
                let rs = &self.ranges[start as usize..(start + len) as usize];
                // Disjoint and sorted: the last range starting at or below `port`.
                let i = rs.partition_point(|r| r.lo <= port);
                return match i.checked_sub(1).map(|i| rs[i]) {
                    Some(r) if port <= r.hi => r.flags,
                    _ => 0,
                };
            }
            at = (at + 1) & mask;
        }
    }
}

/// Overlapping ranges to disjoint ones, flags OR-ed where they overlap: one sweep over the
/// range ends with a count of open ranges per flag bit, O(n log n).
fn disjoint(rs: &[Range]) -> Vec<Range> {
    // (position, bit, +1 open / -1 close); a range closes after its last port.
    let mut events: Vec<(u32, usize, i32)> = Vec::with_capacity(rs.len() * 4);
    for r in rs {
        for bit in 0..8 {
            if r.flags & (1 << bit) != 0 {
                events.push((u32::from(r.lo), bit, 1));
                events.push((u32::from(r.hi) + 1, bit, -1));
            }
        }
    }
    events.sort_unstable();
    let mut open = [0i32; 8];
    let mut out: Vec<Range> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            open[events[i].1] += events[i].2;
            i += 1;
        }
        if at > u32::from(u16::MAX) {
            break;
        }
        let flags = (0..8).fold(0u8, |f, b| if open[b] > 0 { f | 1 << b } else { f });
        let next = events.get(i).map_or(u32::from(u16::MAX) + 1, |e| e.0);
        if flags == 0 {
            continue;
        }
        let (lo, hi) = (at, next - 1);
        match out.last_mut() {
            Some(last) if u32::from(last.hi) + 1 == lo && last.flags == flags => {
                last.hi = hi as u16
            }
            _ => out.push(Range {
                lo: lo as u16,
                hi: hi as u16,
                flags,
            }),
        }
    }
    out
}

/// One policy endpoint: a local pod, or the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    ingress: Isolation,
    egress: Isolation,
}

/// The compiled policy of one node. Immutable; shared by every worker through the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTable {
    generation: u16,
    /// Local pod address -> position in `pod_endpoints` (the endpoint id).
    local: FlatIndex,
    local_ids: Vec<u32>,
    endpoints: Vec<Endpoint>,
    host: Option<u32>,
    /// Cluster pod address -> position in `identities`.
    pods: FlatIndex,
    identities: Vec<u32>,
    /// This node's own addresses, sorted.
    node_addrs: Vec<u32>,
    /// Interval starts (sorted) and the CIDR class from each start on.
    cidr_starts: Vec<u32>,
    cidr_classes: Vec<u32>,
    rules: RuleIndex,
    active: bool,
}

impl Default for PolicyTable {
    fn default() -> Self {
        Self::empty()
    }
}

impl PolicyTable {
    /// No policy anywhere: every check allows, [`PolicyTable::is_active`] is false.
    pub fn empty() -> Self {
        PolicyTable {
            generation: 0,
            local: FlatIndex::build(std::iter::empty()),
            local_ids: Vec::new(),
            endpoints: Vec::new(),
            host: None,
            pods: FlatIndex::build(std::iter::empty()),
            identities: Vec::new(),
            node_addrs: Vec::new(),
            cidr_starts: vec![0],
            cidr_classes: vec![NO_CLASS],
            rules: RuleIndex::default(),
            active: false,
        }
    }

    /// Changes whenever the compiled rules change (0 only for [`PolicyTable::empty`]): flows
    /// cached under another generation are checked again.
    #[inline]
    pub fn generation(&self) -> u16 {
        self.generation
    }

    /// Whether some local endpoint (or the host) is isolated in some direction: when not, no
    /// flow needs a policy check and none is tracked for policy.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Equal rules, whatever the generations.
    pub fn same_rules(&self, other: &PolicyTable) -> bool {
        let mut a = self.clone();
        a.generation = other.generation;
        a == *other
    }

    /// Whether `addr` is a local pod some policy isolates (its flows are tracked).
    #[inline]
    pub fn isolates(&self, addr: Ipv4Addr) -> bool {
        self.local_endpoint(addr).is_some_and(|e| {
            let ep = &self.endpoints[e as usize];
            ep.ingress.any() || ep.egress.any()
        })
    }

    /// Whether the host endpoint is isolated (a host policy selects this node).
    #[inline]
    pub fn host_isolated(&self) -> bool {
        self.host
            .is_some_and(|h| self.endpoints[h as usize].ingress.any())
    }

    #[inline]
    fn local_endpoint(&self, addr: Ipv4Addr) -> Option<u32> {
        self.local.get(u32::from(addr)).map(|i| self.local_ids[i])
    }

    /// The identity of a cluster pod address.
    #[inline]
    pub fn identity(&self, addr: Ipv4Addr) -> Option<u32> {
        self.pods.get(u32::from(addr)).map(|i| self.identities[i])
    }

    #[inline]
    fn cidr_class(&self, addr: Ipv4Addr) -> u32 {
        let a = u32::from(addr);
        let i = self.cidr_starts.partition_point(|&s| s <= a);
        // cidr_starts[0] == 0, so i >= 1.
        self.cidr_classes[i.saturating_sub(1)]
    }

    /// The allow bits of `ep`'s rules for `remote`, `proto`, `port` in `dir`.
    #[inline]
    fn allow_bits(&self, ep: u32, dir: Dir, remote: Ipv4Addr, proto: u8, port: u16) -> u8 {
        let mut bits = 0;
        let identity = self.identity(remote);
        let class = self.cidr_class(remote);
        for p in [proto, PROTO_ANY] {
            // Port ranges apply to port-bearing protocols; an all-protocol rule covers all ports.
            let port = if p == PROTO_ANY { 0 } else { port };
            if let Some(id) = identity {
                bits |= self
                    .rules
                    .flags(rule_key(ep, dir, PEER_IDENTITY, id, p), port);
            }
            if class != NO_CLASS {
                bits |= self
                    .rules
                    .flags(rule_key(ep, dir, PEER_CIDR, class, p), port);
            }
            bits |= self.rules.flags(rule_key(ep, dir, PEER_ANY, 0, p), port);
            if bits & ALLOW_ENFORCED != 0 && bits & ALLOW_AUDIT != 0 {
                break;
            }
            if proto == PROTO_ANY {
                break;
            }
        }
        bits
    }

    /// One direction of one endpoint: `None` allowed, else audit (`false`) or deny (`true`).
    #[inline]
    fn judge(&self, ep: u32, dir: Dir, remote: Ipv4Addr, proto: u8, port: u16) -> Option<bool> {
        let e = &self.endpoints[ep as usize];
        let iso = match dir {
            Dir::Ingress => e.ingress,
            Dir::Egress => e.egress,
        };
        if !iso.any() {
            return None;
        }
        let bits = self.allow_bits(ep, dir, remote, proto, port);
        if iso.enforced && bits & ALLOW_ENFORCED == 0 {
            return Some(true);
        }
        // The full view: every policy, audit-mode ones included.
        if bits == 0 {
            return Some(false);
        }
        None
    }

    /// The verdict for a flow from `src` to `dst` (addresses after DNAT; the source before any
    /// SNAT this node did), `proto`, destination port `dport` (0 for protocols without ports):
    /// egress of a local source pod, then ingress of a local destination pod. A pod talking to
    /// itself is always allowed; so is ingress from this node's own addresses.
    #[inline]
    pub fn check(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: u16) -> PolicyVerdict {
        if !self.active || src == dst {
            return PolicyVerdict::Allow;
        }
        let mut audit = None;
        if let Some(ep) = self.local_endpoint(src) {
            match self.judge(ep, Dir::Egress, dst, proto, dport) {
                Some(true) => return PolicyVerdict::Deny(DropReason::PolicyDeniedEgress),
                Some(false) => audit = Some(DropReason::PolicyDeniedEgress),
                None => {}
            }
        }
        if let Some(ep) = self.local_endpoint(dst) {
            if self.node_addrs.binary_search(&u32::from(src)).is_err() {
                match self.judge(ep, Dir::Ingress, src, proto, dport) {
                    Some(true) => return PolicyVerdict::Deny(DropReason::PolicyDeniedIngress),
                    Some(false) => audit = audit.or(Some(DropReason::PolicyDeniedIngress)),
                    None => {}
                }
            }
        }
        match audit {
            Some(r) => PolicyVerdict::Audit(r),
            None => PolicyVerdict::Allow,
        }
    }

    /// The verdict for traffic from `src` to this node itself (host firewall).
    #[inline]
    pub fn check_host(&self, src: Ipv4Addr, proto: u8, dport: u16) -> PolicyVerdict {
        let Some(h) = self.host else {
            return PolicyVerdict::Allow;
        };
        match self.judge(h, Dir::Ingress, src, proto, dport) {
            Some(true) => PolicyVerdict::Deny(DropReason::HostPolicyDenied),
            Some(false) => PolicyVerdict::Audit(DropReason::HostPolicyDenied),
            None => PolicyVerdict::Allow,
        }
    }
}

/// The destination port a policy sees for a packet of protocol `proto` whose flow key carries
/// `dport` (TCP, UDP and SCTP ports; 0 for everything else, ICMP included).
#[inline]
pub fn policy_port(proto: u8, dport: u16) -> u16 {
    match proto {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_SCTP => dport,
        _ => 0,
    }
}

/// Builds a [`PolicyTable`]; see the module doc. Control calls it once per compile.
#[derive(Debug, Default)]
pub struct PolicyBuilder {
    generation: u16,
    identities: Vec<(u32, u32)>,
    node_addrs: Vec<u32>,
    endpoints: Vec<Endpoint>,
    local: Vec<(u32, u32)>,
    host: Option<u32>,
    rules: Vec<(u32, Dir, PeerSpec, PortSpec, u8)>,
}

impl PolicyBuilder {
    pub fn new(generation: u16) -> Self {
        PolicyBuilder {
            generation,
            ..Default::default()
        }
    }

    /// A pod address of the cluster (any node) and its identity.
    pub fn identity(&mut self, pod_addr: Ipv4Addr, id: u32) -> &mut Self {
        self.identities.push((u32::from(pod_addr), id));
        self
    }

    /// An address of this node: ingress from it to local pods is always allowed.
    pub fn node_addr(&mut self, addr: Ipv4Addr) -> &mut Self {
        self.node_addrs.push(u32::from(addr));
        self
    }

    /// A pod on this node; returns its endpoint id for [`PolicyBuilder::allow`].
    pub fn endpoint(&mut self, pod_addr: Ipv4Addr, ingress: Isolation, egress: Isolation) -> u32 {
        let id = self.endpoints.len() as u32;
        self.endpoints.push(Endpoint { ingress, egress });
        self.local.push((u32::from(pod_addr), id));
        id
    }

    /// This node itself (the host firewall's endpoint; only ingress is enforced).
    pub fn host(&mut self, ingress: Isolation) -> u32 {
        let id = self.endpoints.len() as u32;
        self.endpoints.push(Endpoint {
            ingress,
            egress: Isolation::OPEN,
        });
        self.host = Some(id);
        id
    }

    /// Endpoint `ep` allows `peer` on `port` in `dir`; `flags`: [`ALLOW_ENFORCED`] and/or
    /// [`ALLOW_AUDIT`].
    pub fn allow(
        &mut self,
        ep: u32,
        dir: Dir,
        peer: PeerSpec,
        port: PortSpec,
        flags: u8,
    ) -> &mut Self {
        self.rules.push((ep, dir, peer, port, flags));
        self
    }

    pub fn build(self) -> Result<PolicyTable, PolicyError> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(PolicyError::TooManyEndpoints);
        }
        if let Some(&(_, id)) = self.identities.iter().find(|&&(_, id)| id > MAX_IDENTITY) {
            return Err(PolicyError::IdentityTooLarge(id));
        }
        let mut seen: Vec<u32> = self.local.iter().map(|&(a, _)| a).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(PolicyError::DuplicateEndpoint(Ipv4Addr::from(w[0])));
        }
        // Every prefix named by a rule is a class.
        let mut prefixes: Vec<(u32, u8)> = Vec::new();
        let norm = |(a, len): (Ipv4Addr, u8)| -> Result<(u32, u8), PolicyError> {
            if len > 32 {
                return Err(PolicyError::BadPrefix(a, len));
            }
            Ok((u32::from(a) & mask(len), len))
        };
        for (ep, _, peer, port, _) in &self.rules {
            if *ep as usize >= self.endpoints.len() {
                return Err(PolicyError::UnknownEndpoint(*ep));
            }
            if port.lo > port.hi {
                return Err(PolicyError::BadPortRange(port.lo, port.hi));
            }
            if let PeerSpec::IpBlock { cidr, except } = peer {
                prefixes.push(norm(*cidr)?);
                for e in except {
                    prefixes.push(norm(*e)?);
                }
            }
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        let (cidr_starts, cidr_classes) = intervals(&prefixes);
        let mut rules: Vec<(u64, Range)> = Vec::new();
        for (ep, dir, peer, port, flags) in &self.rules {
            let range = Range {
                lo: if port.proto == PROTO_ANY { 0 } else { port.lo },
                hi: if port.proto == PROTO_ANY {
                    u16::MAX
                } else {
                    port.hi
                },
                flags: *flags,
            };
            match peer {
                PeerSpec::Any => rules.push((rule_key(*ep, *dir, PEER_ANY, 0, port.proto), range)),
                PeerSpec::Identity(id) => {
                    rules.push((rule_key(*ep, *dir, PEER_IDENTITY, *id, port.proto), range))
                }
                PeerSpec::IpBlock { cidr, except } => {
                    let c = norm(*cidr)?;
                    let ex: Vec<(u32, u8)> =
                        except.iter().map(|e| norm(*e)).collect::<Result<_, _>>()?;
                    for class in inside_range(&prefixes, c) {
                        let p = prefixes[class];
                        if inside(p, c) && !ex.iter().any(|&e| inside(p, e)) {
                            rules.push((
                                rule_key(*ep, *dir, PEER_CIDR, class as u32, port.proto),
                                range,
                            ));
                        }
                    }
                }
            }
        }
        let active = self
            .endpoints
            .iter()
            .any(|e| e.ingress.any() || e.egress.any());
        let mut node_addrs = self.node_addrs;
        node_addrs.sort_unstable();
        node_addrs.dedup();
        Ok(PolicyTable {
            generation: self.generation,
            local: FlatIndex::build(self.local.iter().map(|&(a, _)| a)),
            local_ids: self.local.iter().map(|&(_, id)| id).collect(),
            endpoints: self.endpoints,
            host: self.host,
            pods: FlatIndex::build(self.identities.iter().map(|&(a, _)| a)),
            identities: self.identities.iter().map(|&(_, id)| id).collect(),
            node_addrs,
            cidr_starts,
            cidr_classes,
            rules: RuleIndex::build(rules),
            active,
        })
    }
}

#[inline]
fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

/// Whether prefix `p` lies inside prefix `outer` (equal counts).
fn inside(p: (u32, u8), outer: (u32, u8)) -> bool {
    p.1 >= outer.1 && p.0 & mask(outer.1) == outer.0
}

/// The address space cut into intervals, each with its most specific prefix (index into
/// `prefixes`, which is sorted by (address, length) and deduplicated) or [`NO_CLASS`].
/// Prefixes nest or are disjoint, so one sweep with a stack of the prefixes open at each cut
/// does it: O(n log n).
fn intervals(prefixes: &[(u32, u8)]) -> (Vec<u32>, Vec<u32>) {
    let end = |p: (u32, u8)| u64::from(p.0) + (1u64 << (32 - u32::from(p.1)));
    let mut cuts: Vec<u64> = vec![0];
    for &p in prefixes {
        cuts.push(u64::from(p.0));
        cuts.push(end(p));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut starts = Vec::new();
    let mut classes: Vec<u32> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut next = 0;
    for &c in cuts.iter().filter(|&&c| c <= u64::from(u32::MAX)) {
        while open.last().is_some_and(|&i| end(prefixes[i]) <= c) {
            open.pop();
        }
        // Sorted by (address, length): shorter (outer) prefixes are pushed first.
        while next < prefixes.len() && u64::from(prefixes[next].0) == c {
            open.push(next);
            next += 1;
        }
        let class = open.last().map_or(NO_CLASS, |&i| i as u32);
        if classes.last() == Some(&class) {
            continue;
        }
        starts.push(c as u32);
        classes.push(class);
    }
    (starts, classes)
}

/// The positions in `prefixes` (sorted by (address, length)) of the prefixes inside `outer`:
/// a contiguous run starting at `outer` itself.
fn inside_range(prefixes: &[(u32, u8)], outer: (u32, u8)) -> std::ops::Range<usize> {
    let last = u64::from(outer.0) + (1u64 << (32 - u32::from(outer.1))) - 1;
    let from = prefixes.partition_point(|&p| p < outer);
    let to = prefixes.partition_point(|&p| u64::from(p.0) <= last);
    from..to.max(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: u8 = ipv4::PROTO_TCP;
    const UDP: u8 = ipv4::PROTO_UDP;
    const ICMP: u8 = ipv4::PROTO_ICMP;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const ENF: Isolation = Isolation {
        enforced: true,
        audit: false,
    };
    const AUD: Isolation = Isolation {
        enforced: false,
        audit: true,
    };

    #[test]
    fn an_empty_table_allows_everything_and_is_inactive() {
        let t = PolicyTable::empty();
        assert!(!t.is_active());
        assert_eq!(
            t.check(ip("10.0.0.1"), ip("10.0.0.2"), TCP, 80),
            PolicyVerdict::Allow
        );
        assert_eq!(t.check_host(ip("1.2.3.4"), TCP, 22), PolicyVerdict::Allow);
    }

    #[test]
    fn isolation_is_per_direction_and_rules_are_a_union() {
        let mut b = PolicyBuilder::new(1);
        b.identity(ip("10.0.0.2"), 7).identity(ip("10.0.1.5"), 8);
        let a = b.endpoint(ip("10.0.0.2"), ENF, Isolation::OPEN);
        b.allow(
            a,
            Dir::Ingress,
            PeerSpec::Identity(8),
            PortSpec::one(TCP, 80),
            1,
        )
        .allow(
            a,
            Dir::Ingress,
            PeerSpec::Identity(8),
            PortSpec::one(TCP, 443),
            1,
        );
        let t = b.build().unwrap();
        assert!(t.is_active() && t.isolates(ip("10.0.0.2")));
        let deny_in = PolicyVerdict::Deny(DropReason::PolicyDeniedIngress);
        assert_eq!(
            t.check(ip("10.0.1.5"), ip("10.0.0.2"), TCP, 80),
            PolicyVerdict::Allow
        );
        assert_eq!(
            t.check(ip("10.0.1.5"), ip("10.0.0.2"), TCP, 443),
            PolicyVerdict::Allow
        );
        assert_eq!(t.check(ip("10.0.1.5"), ip("10.0.0.2"), TCP, 81), deny_in);
        assert_eq!(t.check(ip("10.0.1.5"), ip("10.0.0.2"), UDP, 80), deny_in);
        assert_eq!(t.check(ip("10.0.1.6"), ip("10.0.0.2"), TCP, 80), deny_in);
        // Egress of the same pod is open.
        assert_eq!(
            t.check(ip("10.0.0.2"), ip("8.8.8.8"), UDP, 53),
            PolicyVerdict::Allow
        );
        // Itself, and its node, always.
        assert_eq!(
            t.check(ip("10.0.0.2"), ip("10.0.0.2"), TCP, 1),
            PolicyVerdict::Allow
        );
    }

    #[test]
    fn ingress_from_the_node_itself_is_always_allowed() {
        let mut b = PolicyBuilder::new(1);
        b.node_addr(ip("192.168.1.10"));
        b.endpoint(ip("10.0.0.2"), ENF, ENF);
        let t = b.build().unwrap();
        assert_eq!(
            t.check(ip("192.168.1.10"), ip("10.0.0.2"), TCP, 8080),
            PolicyVerdict::Allow
        );
        assert_eq!(
            t.check(ip("192.168.1.11"), ip("10.0.0.2"), TCP, 8080),
            PolicyVerdict::Deny(DropReason::PolicyDeniedIngress)
        );
    }

    #[test]
    fn ip_blocks_with_except_match_by_most_specific_prefix() {
        let mut b = PolicyBuilder::new(1);
        b.identity(ip("10.0.0.9"), 3);
        let a = b.endpoint(ip("10.0.0.2"), Isolation::OPEN, ENF);
        b.allow(
            a,
            Dir::Egress,
            PeerSpec::IpBlock {
                cidr: (ip("10.0.0.0"), 16),
                except: vec![(ip("10.0.0.0"), 24)],
            },
            PortSpec::all_of(TCP),
            1,
        );
        // Another rule's nested prefix must not break the first one.
        b.allow(
            a,
            Dir::Egress,
            PeerSpec::IpBlock {
                cidr: (ip("10.0.5.0"), 28),
                except: vec![],
            },
            PortSpec::one(UDP, 53),
            1,
        );
        let t = b.build().unwrap();
        let deny = PolicyVerdict::Deny(DropReason::PolicyDeniedEgress);
        let s = ip("10.0.0.2");
        assert_eq!(t.check(s, ip("10.0.1.1"), TCP, 5), PolicyVerdict::Allow);
        assert_eq!(t.check(s, ip("10.0.255.255"), TCP, 5), PolicyVerdict::Allow);
        assert_eq!(t.check(s, ip("10.0.5.3"), TCP, 5), PolicyVerdict::Allow);
        assert_eq!(t.check(s, ip("10.0.5.3"), UDP, 53), PolicyVerdict::Allow);
        assert_eq!(t.check(s, ip("10.0.6.3"), UDP, 53), deny);
        // In the except (a pod address too: ipBlocks match pods).
        assert_eq!(t.check(s, ip("10.0.0.9"), TCP, 5), deny);
        assert_eq!(t.check(s, ip("10.1.0.1"), TCP, 5), deny);
        assert_eq!(t.check(s, ip("0.0.0.0"), TCP, 5), deny);
        assert_eq!(t.check(s, ip("255.255.255.255"), TCP, 5), deny);
    }

    #[test]
    fn a_zero_length_prefix_matches_everything() {
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(ip("10.0.0.2"), Isolation::OPEN, ENF);
        b.allow(
            a,
            Dir::Egress,
            PeerSpec::IpBlock {
                cidr: (ip("0.0.0.0"), 0),
                except: vec![(ip("169.254.169.254"), 32)],
            },
            PortSpec::ALL,
            1,
        );
        let t = b.build().unwrap();
        let s = ip("10.0.0.2");
        assert_eq!(
            t.check(s, ip("255.255.255.255"), ICMP, 0),
            PolicyVerdict::Allow
        );
        assert_eq!(
            t.check(s, ip("169.254.169.253"), TCP, 80),
            PolicyVerdict::Allow
        );
        assert_eq!(
            t.check(s, ip("169.254.169.254"), TCP, 80),
            PolicyVerdict::Deny(DropReason::PolicyDeniedEgress)
        );
    }

    #[test]
    fn port_ranges_merge_and_all_protocol_rules_cover_icmp() {
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(ip("10.0.0.2"), ENF, Isolation::OPEN);
        let p = |lo, hi| PortSpec { proto: TCP, lo, hi };
        b.allow(a, Dir::Ingress, PeerSpec::Any, p(1000, 2000), 1)
            .allow(a, Dir::Ingress, PeerSpec::Any, p(1500, 3000), 1)
            .allow(a, Dir::Ingress, PeerSpec::Any, p(5000, 5000), 1);
        let t = b.build().unwrap();
        let d = ip("10.0.0.2");
        let r = ip("10.9.9.9");
        for port in [1000, 1999, 2500, 3000, 5000] {
            assert_eq!(t.check(r, d, TCP, port), PolicyVerdict::Allow, "{port}");
        }
        for port in [999, 3001, 4999, 5001, 0, 65535] {
            assert_ne!(t.check(r, d, TCP, port), PolicyVerdict::Allow, "{port}");
        }
        assert_ne!(t.check(r, d, ICMP, 0), PolicyVerdict::Allow);
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(d, ENF, Isolation::OPEN);
        b.allow(a, Dir::Ingress, PeerSpec::Any, PortSpec::ALL, 1);
        let t = b.build().unwrap();
        assert_eq!(t.check(r, d, ICMP, 0), PolicyVerdict::Allow);
        assert_eq!(t.check(r, d, UDP, 9), PolicyVerdict::Allow);
    }

    #[test]
    fn audit_mode_forwards_what_only_audit_policies_deny() {
        // Audit-only isolation: denied traffic is reported, not dropped.
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(ip("10.0.0.2"), AUD, Isolation::OPEN);
        b.allow(
            a,
            Dir::Ingress,
            PeerSpec::Any,
            PortSpec::one(TCP, 80),
            ALLOW_AUDIT,
        );
        let t = b.build().unwrap();
        let (r, d) = (ip("10.9.9.9"), ip("10.0.0.2"));
        assert_eq!(t.check(r, d, TCP, 80), PolicyVerdict::Allow);
        assert_eq!(
            t.check(r, d, TCP, 81),
            PolicyVerdict::Audit(DropReason::PolicyDeniedIngress)
        );
        // Both: an enforcing policy allows 80 and 81, an audit one only 80: 81 is audit, 82
        // denied.
        let both = Isolation {
            enforced: true,
            audit: true,
        };
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(d, both, Isolation::OPEN);
        b.allow(a, Dir::Ingress, PeerSpec::Any, PortSpec::one(TCP, 80), 3)
            .allow(a, Dir::Ingress, PeerSpec::Any, PortSpec::one(TCP, 81), 1);
        let t = b.build().unwrap();
        assert_eq!(t.check(r, d, TCP, 80), PolicyVerdict::Allow);
        assert_eq!(t.check(r, d, TCP, 81), PolicyVerdict::Allow);
        assert_eq!(
            t.check(r, d, TCP, 82),
            PolicyVerdict::Deny(DropReason::PolicyDeniedIngress)
        );
    }

    #[test]
    fn egress_is_judged_before_ingress_on_the_same_node() {
        let mut b = PolicyBuilder::new(1);
        b.identity(ip("10.0.0.2"), 1).identity(ip("10.0.0.3"), 2);
        b.endpoint(ip("10.0.0.2"), Isolation::OPEN, ENF);
        let s = b.endpoint(ip("10.0.0.3"), ENF, Isolation::OPEN);
        b.allow(s, Dir::Ingress, PeerSpec::Identity(1), PortSpec::ALL, 1);
        let t = b.build().unwrap();
        assert_eq!(
            t.check(ip("10.0.0.2"), ip("10.0.0.3"), TCP, 80),
            PolicyVerdict::Deny(DropReason::PolicyDeniedEgress)
        );
    }

    #[test]
    fn host_endpoint_is_open_until_isolated() {
        let mut b = PolicyBuilder::new(2);
        let h = b.host(ENF);
        b.allow(h, Dir::Ingress, PeerSpec::Any, PortSpec::one(TCP, 22), 1)
            .allow(
                h,
                Dir::Ingress,
                PeerSpec::IpBlock {
                    cidr: (ip("192.168.1.0"), 24),
                    except: vec![],
                },
                PortSpec::one(UDP, 8472),
                1,
            );
        let t = b.build().unwrap();
        assert!(t.host_isolated() && t.is_active());
        assert_eq!(t.check_host(ip("1.2.3.4"), TCP, 22), PolicyVerdict::Allow);
        assert_eq!(
            t.check_host(ip("192.168.1.7"), UDP, 8472),
            PolicyVerdict::Allow
        );
        assert_eq!(
            t.check_host(ip("1.2.3.4"), UDP, 8472),
            PolicyVerdict::Deny(DropReason::HostPolicyDenied)
        );
        // Pods are not affected by the host endpoint.
        assert_eq!(
            t.check(ip("1.2.3.4"), ip("10.0.0.2"), TCP, 80),
            PolicyVerdict::Allow
        );
    }

    #[test]
    fn same_rules_ignores_the_generation_and_bad_input_is_an_error() {
        let build = |g| {
            let mut b = PolicyBuilder::new(g);
            let a = b.endpoint(ip("10.0.0.2"), ENF, Isolation::OPEN);
            b.allow(a, Dir::Ingress, PeerSpec::Any, PortSpec::one(TCP, 80), 1);
            b.build().unwrap()
        };
        assert!(build(1).same_rules(&build(9)));
        assert_ne!(build(1), build(9));
        let mut b = PolicyBuilder::new(1);
        b.allow(4, Dir::Ingress, PeerSpec::Any, PortSpec::ALL, 1);
        assert_eq!(b.build(), Err(PolicyError::UnknownEndpoint(4)));
        let mut b = PolicyBuilder::new(1);
        let a = b.endpoint(ip("10.0.0.2"), ENF, ENF);
        b.allow(
            a,
            Dir::Ingress,
            PeerSpec::Any,
            PortSpec {
                proto: 6,
                lo: 9,
                hi: 1,
            },
            1,
        );
        assert_eq!(b.build(), Err(PolicyError::BadPortRange(9, 1)));
        let mut b = PolicyBuilder::new(1);
        b.identity(ip("10.0.0.2"), MAX_IDENTITY + 1);
        assert!(matches!(b.build(), Err(PolicyError::IdentityTooLarge(_))));
        let mut b = PolicyBuilder::new(1);
        b.endpoint(ip("10.0.0.2"), ENF, ENF);
        b.endpoint(ip("10.0.0.2"), ENF, ENF);
        assert!(matches!(b.build(), Err(PolicyError::DuplicateEndpoint(_))));
    }

    #[test]
    fn disjoint_ranges_or_the_flags_of_every_covering_range() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let n = 1 + next() % 12;
            let rs: Vec<Range> = (0..n)
                .map(|_| {
                    let a = (next() % 70) as u16 * 937;
                    let b = a.saturating_add((next() % 3000) as u16);
                    Range {
                        lo: a,
                        hi: b,
                        flags: 1 + (next() % 3) as u8,
                    }
                })
                .collect();
            let d = disjoint(&rs);
            for w in d.windows(2) {
                assert!(w[0].hi < w[1].lo, "sorted and disjoint: {d:?}");
            }
            for port in (0..=u16::MAX).step_by(97).chain([u16::MAX, 0]) {
                let want = rs
                    .iter()
                    .filter(|r| r.lo <= port && port <= r.hi)
                    .fold(0, |f, r| f | r.flags);
                let got = d
                    .iter()
                    .find(|r| r.lo <= port && port <= r.hi)
                    .map_or(0, |r| r.flags);
                assert_eq!(got, want, "port {port} in {rs:?}");
            }
        }
    }
}
