//! `#[repr(C)]` types shared by the XDP program (`xdp-redirect-ebpf`) and its loader.
//!
//! The program has these maps per attached interface:
//! - `XSKS` (`BPF_MAP_TYPE_XSKMAP`, index = rx queue): the AF_XDP socket for each queue.
//! - `RULES` (hash, [`PassKey`] -> [`RuleAction`] as `u8`): per-traffic exceptions to the default.
//! - `DST_ADDRS` (hash, IPv4 destination as a network-order `u32` -> [`RuleAction`] as `u8`, at
//!   most [`MAX_DST_ADDRS`], allocated on demand): every IPv4 packet to one of these addresses
//!   (LoadBalancer ingress IPs, externalIPs), whatever its protocol, fragments included.
//! - `PORTS` (array of `u64`, [`PORT_TABLES`] tables of [`PORT_TABLE_WORDS`] words): per TCP
//!   destination port, per UDP destination port and per ICMP echo identifier, 2 bits saying
//!   nothing / [`RuleAction::Redirect`] / [`RuleAction::Pass`] (see [`port_slot`]). O(1) per
//!   packet, no limit on how many ports are claimed; 48 KiB per interface.
//! - `CONFIG` (array of `u32`, index [`CONFIG_DEFAULT_ACTION`]): the interface's default
//!   [`RuleAction`]. Pod veths redirect everything; an uplink passes everything to the kernel
//!   except what the agent claims (VXLAN, WireGuard, NodePorts, masquerade ports, service IPs).
//! - `ACTIONS` (per-CPU array of `u64`, index = [`Action`]): what the program did.
//! - `NEIGH` (LRU hash, IPv4 -> [`NeighEntry`]): ARP senders seen, when snooping is on.
//!
//! The order in which the program consults them is documented in `ebpf/src/main.rs`.
#![no_std]

/// Maximum rx queues per interface that can carry an AF_XDP socket.
pub const MAX_QUEUES: u32 = 64;
/// Maximum entries in the `RULES` map.
pub const MAX_RULES: u32 = 256;

/// Maximum entries in the `DST_ADDRS` map.
pub const MAX_DST_ADDRS: u32 = 4096;

/// `PORTS` table of TCP destination ports (and of the source port quoted in ICMP errors).
pub const PORT_TABLE_TCP: u32 = 0;
/// `PORTS` table of UDP destination ports (and of the source port quoted in ICMP errors).
pub const PORT_TABLE_UDP: u32 = 1;
/// `PORTS` table of ICMP echo identifiers (echo replies, and echo requests quoted in errors).
pub const PORT_TABLE_ICMP_ID: u32 = 2;
/// Tables in `PORTS`.
pub const PORT_TABLES: u32 = 3;
/// Bits per port (or ICMP identifier) in a `PORTS` table.
pub const PORT_BITS: u32 = 2;
/// Ports (or identifiers) per `u64` word of a `PORTS` table.
pub const PORTS_PER_WORD: u32 = 64 / PORT_BITS;
/// `u64` words in one `PORTS` table: 65536 ports x 2 bits.
pub const PORT_TABLE_WORDS: u32 = 65536 / PORTS_PER_WORD;
/// Entries in the `PORTS` array map.
pub const PORT_WORDS: u32 = PORT_TABLES * PORT_TABLE_WORDS;
/// Two bits of a `PORTS` entry: no opinion, fall through to the next rule.
pub const PORT_NONE: u64 = 0;
/// Two bits of a `PORTS` entry: [`RuleAction::Redirect`].
pub const PORT_REDIRECT: u64 = 1;
/// Two bits of a `PORTS` entry: [`RuleAction::Pass`].
pub const PORT_PASS: u64 = 2;
/// Mask of the two bits of one port once shifted down.
pub const PORT_MASK: u64 = 3;

/// Where `port` of `table` lives in `PORTS`: (array index, bit shift of its two bits).
/// `table` must be below [`PORT_TABLES`] (the map lookup fails otherwise, never out of bounds).
#[inline(always)]
pub const fn port_slot(table: u32, port: u16) -> (u32, u32) {
    let port = port as u32;
    (
        table * PORT_TABLE_WORDS + port / PORTS_PER_WORD,
        (port % PORTS_PER_WORD) * PORT_BITS,
    )
}

/// The two `PORTS` bits that encode `action`.
#[inline(always)]
pub const fn port_bits(action: RuleAction) -> u64 {
    match action {
        RuleAction::Redirect => PORT_REDIRECT,
        RuleAction::Pass => PORT_PASS,
    }
}

/// The action two `PORTS` bits encode (`None` for [`PORT_NONE`] and the unused value 3).
#[inline(always)]
pub const fn port_action(bits: u64) -> Option<RuleAction> {
    match bits & PORT_MASK {
        PORT_REDIRECT => Some(RuleAction::Redirect),
        PORT_PASS => Some(RuleAction::Pass),
        _ => None,
    }
}

/// Entries in `CONFIG`.
pub const CONFIG_ENTRIES: u32 = 3;
/// `CONFIG[CONFIG_DEFAULT_ACTION]`: the [`RuleAction`] for traffic no rule matches.
pub const CONFIG_DEFAULT_ACTION: u32 = 0;
/// `CONFIG[CONFIG_SNOOP_ARP]` = 1: record the sender of every ARP packet in `NEIGH` (the
/// uplink: the dataplane learns next-hop MACs while the kernel keeps answering ARP itself).
pub const CONFIG_SNOOP_ARP: u32 = 1;
/// `CONFIG[CONFIG_WG_PORT]` = a UDP port (0: off): WireGuard transport messages (type 4) to it
/// go to the dataplane, every other message to it (handshake initiation and response, cookie
/// reply) to the kernel, where the agent's handshake socket receives them.
pub const CONFIG_WG_PORT: u32 = 2;
/// Entries in the `NEIGH` LRU map.
pub const MAX_NEIGHBORS: u32 = 1024;

/// Value of `NEIGH` (key: the sender's IPv4 address as a network-order `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NeighEntry {
    pub mac: [u8; 6],
    pub pad: [u8; 2],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when last seen.
    pub seen_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: NeighEntry is repr(C), Copy, explicit padding, no pointers.
unsafe impl aya::Pod for NeighEntry {}

/// What a `RULES` entry (or the default) says to do with matching traffic.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Redirect to the AF_XDP socket of the rx queue (if one is registered).
    Redirect = 0,
    /// Leave to the kernel (`XDP_PASS`).
    Pass = 1,
}

/// Keys of the `RULES` map. The program looks up, in order:
/// `(ethertype, 0, 0)` (a whole ethertype), `(ethertype, proto, dst_port)`, `(ethertype, proto, 0)`.
/// `ethertype` and `dst_port` are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PassKey {
    pub ethertype: u16,
    pub ip_proto: u8,
    pub pad: u8,
    pub dst_port: u16,
    pub pad2: u16,
}

impl PassKey {
    pub const fn ethertype(ethertype: u16) -> Self {
        Self {
            ethertype,
            ip_proto: 0,
            pad: 0,
            dst_port: 0,
            pad2: 0,
        }
    }
    pub const fn ipv4(ip_proto: u8, dst_port: u16) -> Self {
        Self {
            ethertype: 0x0800,
            ip_proto,
            pad: 0,
            dst_port,
            pad2: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: PassKey is repr(C), Copy, has explicit padding fields and no pointers.
unsafe impl aya::Pod for PassKey {}

/// Index into the `ACTIONS` per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Handed to the AF_XDP socket of the rx queue.
    Redirected = 0,
    /// `XDP_PASS` because no socket is registered for the queue (agent down: fail-open).
    PassNoSocket = 1,
    /// `XDP_PASS` because a rule (or the interface default) leaves it to the kernel.
    PassRule = 2,
    /// `XDP_PASS` because the frame was too short to classify.
    PassShort = 3,
}

impl Action {
    pub const COUNT: u32 = 4;
    pub const ALL: [Action; 4] = [
        Action::Redirected,
        Action::PassNoSocket,
        Action::PassRule,
        Action::PassShort,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Redirected => "redirected",
            Action::PassNoSocket => "pass_no_socket",
            Action::PassRule => "pass_rule",
            Action::PassShort => "pass_short",
        }
    }
}
