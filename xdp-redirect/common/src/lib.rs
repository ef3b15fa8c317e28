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
//! - Host firewall (consulted only while [`CONFIG_HOST_FIREWALL`] is 1):
//!   - `HOST_ADDRS` (hash, network-order IPv4 -> 1, at most [`MAX_HOST_ADDRS`]): this node's own
//!     addresses;
//!   - `CLUSTER_NODES` (hash, network-order IPv4 -> 1, at most [`MAX_CLUSTER_NODES`], allocated
//!     on demand): addresses of the cluster's nodes, for "nodes only" failsafe entries;
//!   - `FAILSAFE` (array of `u64`, [`FAILSAFE_TABLES`] tables laid out like `PORTS`, see
//!     [`port_slot`]): per TCP/UDP destination port and per ICMP type, 2 bits saying nothing /
//!     [`FAILSAFE_NODES_ONLY`] / [`FAILSAFE_ANYWHERE`];
//!   - `HOST_FLOWS` (LRU hash, [`HostFlowKey`] -> [`HostFlowValue`]): flows the node itself
//!     sent, written by the TC egress program `host_flows`, read by the XDP program.
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
pub const CONFIG_ENTRIES: u32 = 4;
/// `CONFIG[CONFIG_DEFAULT_ACTION]`: the [`RuleAction`] for traffic no rule matches.
pub const CONFIG_DEFAULT_ACTION: u32 = 0;
/// `CONFIG[CONFIG_SNOOP_ARP]` = 1: record the sender of every ARP packet in `NEIGH` (the
/// uplink: the dataplane learns next-hop MACs while the kernel keeps answering ARP itself).
pub const CONFIG_SNOOP_ARP: u32 = 1;
/// `CONFIG[CONFIG_WG_PORT]` = a UDP port (0: off): WireGuard transport messages (type 4) to it
/// go to the dataplane, every other message to it (handshake initiation and response, cookie
/// reply) to the kernel, where the agent's handshake socket receives them.
pub const CONFIG_WG_PORT: u32 = 2;
/// `CONFIG[CONFIG_HOST_FIREWALL]` = 1: IPv4 traffic to a `HOST_ADDRS` address that no other
/// rule claims is decided by the host firewall (failsafe ports, ICMP errors, flows the node
/// sent: `XDP_PASS`; everything else to the dataplane, which applies host policy).
pub const CONFIG_HOST_FIREWALL: u32 = 3;

/// Maximum entries in `HOST_ADDRS` (this node's own IPv4 addresses).
pub const MAX_HOST_ADDRS: u32 = 64;
/// Maximum entries in `CLUSTER_NODES` (the cluster's node addresses).
pub const MAX_CLUSTER_NODES: u32 = 16384;
/// `FAILSAFE` table of TCP destination ports.
pub const FAILSAFE_TABLE_TCP: u32 = 0;
/// `FAILSAFE` table of UDP destination ports.
pub const FAILSAFE_TABLE_UDP: u32 = 1;
/// `FAILSAFE` table of ICMP types (only 0..=255 used).
pub const FAILSAFE_TABLE_ICMP_TYPE: u32 = 2;
/// Tables in `FAILSAFE`.
pub const FAILSAFE_TABLES: u32 = 3;
/// Entries in the `FAILSAFE` array map.
pub const FAILSAFE_WORDS: u32 = FAILSAFE_TABLES * PORT_TABLE_WORDS;
/// Two bits of a `FAILSAFE` entry: passed when the source is in `CLUSTER_NODES`.
pub const FAILSAFE_NODES_ONLY: u64 = 1;
/// Two bits of a `FAILSAFE` entry: passed from any source.
pub const FAILSAFE_ANYWHERE: u64 = 2;
/// `HOST_FLOWS` entries when the loader is not told otherwise (pod veths never use the map;
/// an LRU map is preallocated, so every attachment pays for its size).
pub const HOST_FLOWS_MIN: u32 = 1;
/// How long after the node last sent on a flow its inbound packets still pass: TCP (2 h, the
/// kernel conntrack's established timeout is 5 days; a connection idle for 2 h without
/// keepalives goes back through the workers).
pub const HOST_FLOW_TCP_TIMEOUT_NS: u64 = 2 * 3600 * 1_000_000_000;
/// As [`HOST_FLOW_TCP_TIMEOUT_NS`] for UDP (180 s, nf_conntrack's udp_timeout_stream).
pub const HOST_FLOW_UDP_TIMEOUT_NS: u64 = 180 * 1_000_000_000;
/// As [`HOST_FLOW_TCP_TIMEOUT_NS`] for ICMP echo (30 s, nf_conntrack's icmp_timeout).
pub const HOST_FLOW_ICMP_TIMEOUT_NS: u64 = 30 * 1_000_000_000;
/// The TC program rewrites the last-seen time of an existing flow only when it is older than
/// this: one map lookup per outbound packet, one write per flow per interval.
pub const HOST_FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Key of `HOST_FLOWS`: a flow the node sent, as its inbound packets will look up.
/// TCP/UDP: the remote's port and the node's port. ICMP echo: `remote_port` 0 and `local_port`
/// the echo identifier. Ports in host byte order, the address as read from the packet
/// (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HostFlowKey {
    pub proto: u8,
    pub pad: u8,
    pub remote_port: u16,
    pub local_port: u16,
    pub pad2: u16,
    pub remote_addr: u32,
}

#[cfg(feature = "user")]
// SAFETY: HostFlowKey is repr(C), Copy, explicit padding, no pointers.
unsafe impl aya::Pod for HostFlowKey {}

/// [`HostFlowValue::flags`]: the node opened this flow (an outbound TCP SYN without ACK, an
/// ICMP echo request, or a connection of the node's found when the firewall was turned on).
/// Such flows survive a host policy change; the others (replies of connections the firewall
/// let in, UDP) are cleared so that their next inbound packet meets the new policy.
pub const HOST_FLOW_NODE_OPENED: u64 = 1;

/// Value of `HOST_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostFlowValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the node last sent on the flow; rewritten in
    /// place by the TC program (an aligned u64 store).
    pub seen_ns: u64,
    /// [`HOST_FLOW_NODE_OPENED`] or 0; set when the entry is created, never changed after.
    pub flags: u64,
}

#[cfg(feature = "user")]
// SAFETY: HostFlowValue is repr(C), Copy, two u64, no pointers.
unsafe impl aya::Pod for HostFlowValue {}
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
    /// Host firewall: `XDP_PASS` to a failsafe port (or ICMP type).
    PassFailsafe = 4,
    /// Host firewall: `XDP_PASS` as a reply or continuation of a flow the node sent.
    PassHostFlow = 5,
    /// Host firewall: `XDP_PASS` of an ICMP error (types 3, 4, 5, 11, 12) to the node.
    PassIcmpError = 6,
}

impl Action {
    pub const COUNT: u32 = 7;
    pub const ALL: [Action; 7] = [
        Action::Redirected,
        Action::PassNoSocket,
        Action::PassRule,
        Action::PassShort,
        Action::PassFailsafe,
        Action::PassHostFlow,
        Action::PassIcmpError,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Redirected => "redirected",
            Action::PassNoSocket => "pass_no_socket",
            Action::PassRule => "pass_rule",
            Action::PassShort => "pass_short",
            Action::PassFailsafe => "pass_failsafe",
            Action::PassHostFlow => "pass_host_flow",
            Action::PassIcmpError => "pass_icmp_error",
        }
    }
}
