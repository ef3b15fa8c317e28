//! `#[repr(C)]` types shared by the XDP program (`xdp-redirect-ebpf`) and its loader.
//!
//! The program has four maps per attached interface:
//! - `XSKS` (`BPF_MAP_TYPE_XSKMAP`, index = rx queue): the AF_XDP socket for each queue.
//! - `RULES` (hash, [`PassKey`] -> [`RuleAction`] as `u8`): per-traffic exceptions to the default.
//! - `CONFIG` (array of `u32`, index [`CONFIG_DEFAULT_ACTION`]): the interface's default
//!   [`RuleAction`]. Pod veths redirect everything; an uplink passes everything to the kernel
//!   except what the agent claims (VXLAN, WireGuard, NodePorts).
//! - `ACTIONS` (per-CPU array of `u64`, index = [`Action`]): what the program did.
//! - `NEIGH` (LRU hash, IPv4 -> [`NeighEntry`]): ARP senders seen, when snooping is on.
#![no_std]

/// Maximum rx queues per interface that can carry an AF_XDP socket.
pub const MAX_QUEUES: u32 = 64;
/// Maximum entries in the `RULES` map.
pub const MAX_RULES: u32 = 256;

/// Entries in `CONFIG`.
pub const CONFIG_ENTRIES: u32 = 2;
/// `CONFIG[CONFIG_DEFAULT_ACTION]`: the [`RuleAction`] for traffic no rule matches.
pub const CONFIG_DEFAULT_ACTION: u32 = 0;
/// `CONFIG[CONFIG_SNOOP_ARP]` = 1: record the sender of every ARP packet in `NEIGH` (the
/// uplink: the dataplane learns next-hop MACs while the kernel keeps answering ARP itself).
pub const CONFIG_SNOOP_ARP: u32 = 1;
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
