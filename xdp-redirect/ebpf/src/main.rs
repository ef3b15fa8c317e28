//! sluice's only kernel code: hand each frame to the AF_XDP socket of its rx queue.
//!
//! What goes to the dataplane and what stays with the kernel; the first step that matches
//! decides ("redirect" below means: to the AF_XDP socket, if one is registered):
//!
//! 1. ARP with snooping on (`CONFIG`): the sender is recorded in `NEIGH`, then on to step 2.
//! 2. `RULES[(ethertype, 0, 0)]`: a whole ethertype. Anything but IPv4 then takes the default.
//! 3. IPv4 with an IHL below 5: the default.
//! 4. `DST_ADDRS[destination]`: service addresses (LoadBalancer ingress, externalIPs), any
//!    protocol, every fragment.
//! 5. IPv4 fragments (MF set or offset non-zero) skip steps 6 and 7: fragments after the first
//!    carry no port, and all fragments of a datagram must take the same way or neither side can
//!    reassemble it.
//! 6. TCP/UDP: `RULES[(ethertype, proto, dst_port)]`, then the `PORTS` table of the protocol by
//!    destination port (NodePorts, the masquerade port range).
//! 7. ICMP: an echo reply (type 0) by its identifier in the ICMP `PORTS` table (masqueraded
//!    pings). An error (type 3, 11, 12) by the packet it quotes, which the node sent: a quoted
//!    TCP/UDP packet by its *source* port in that protocol's table, a quoted echo request by its
//!    identifier; a quoted fragment with non-zero offset, or a truncated quote, matches nothing.
//! 8. `RULES[(ethertype, proto, 0)]`.
//! 9. Host firewall, only when `CONFIG_HOST_FIREWALL` is on and the destination is in
//!    `HOST_ADDRS` (traffic for the node itself that no rule above claimed):
//!    a. fragments: redirect (every fragment alike, as in step 5; the dataplane counts them);
//!    b. TCP/UDP to a `FAILSAFE` port, ICMP of a `FAILSAFE` type: pass (`pass_failsafe`), if
//!       the entry is "anywhere" or the source is in `CLUSTER_NODES`;
//!    c. ICMP errors (types 3, 4, 5, 11, 12): pass (`pass_icmp_error`): PMTU discovery and
//!       unreachables for the kernel's own connections;
//!    d. a packet of a flow the node sent (`HOST_FLOWS`, written by the TC egress program
//!       below; TCP/UDP by (source, source port, destination port), an echo reply by
//!       (source, identifier)) seen within the protocol's timeout: pass (`pass_host_flow`);
//!    e. everything else: redirect; the workers apply host policy and re-inject what is
//!       allowed through the re-injection veth pair.
//! 10. The interface default (`CONFIG`).
//!
//! Then: a Pass -> `XDP_PASS`. A Redirect with no socket registered for the queue (agent not
//! running) -> `XDP_PASS`: fail-open, the node stays reachable when the agent is down or has
//! crashed. Otherwise `bpf_redirect_map(XSKS, queue, XDP_PASS)`: the fallback is `XDP_PASS` too.
//!
//! Every decision increments one per-CPU counter in `ACTIONS`.
//!
//! The TC classifier `host_flows` (attached to the uplink's egress only while the host firewall
//! is on) records every IPv4 TCP/UDP packet and ICMP echo request that leaves with a source in
//! `HOST_ADDRS` in `HOST_FLOWS`, keyed as its replies will look it up (step 9d). It never
//! changes or drops a packet (`TC_ACT_OK`).
#![no_std]
#![no_main]

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::maps::{Array, LruHashMap};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray, XskMap},
    programs::{TcContext, XdpContext},
};
use xdp_redirect_common::{
    port_action, port_slot, Action, HostFlowKey, HostFlowValue, NeighEntry, PassKey, RuleAction,
    CONFIG_DEFAULT_ACTION, CONFIG_ENTRIES, CONFIG_HOST_FIREWALL, CONFIG_SNOOP_ARP, CONFIG_WG_PORT,
    FAILSAFE_ANYWHERE, FAILSAFE_NODES_ONLY, FAILSAFE_TABLE_ICMP_TYPE, FAILSAFE_TABLE_TCP,
    FAILSAFE_TABLE_UDP, FAILSAFE_WORDS, HOST_FLOWS_MIN, HOST_FLOW_ICMP_TIMEOUT_NS,
    HOST_FLOW_NODE_OPENED, HOST_FLOW_REFRESH_NS, HOST_FLOW_TCP_TIMEOUT_NS,
    HOST_FLOW_UDP_TIMEOUT_NS, MAX_CLUSTER_NODES, MAX_DST_ADDRS, MAX_HOST_ADDRS, MAX_NEIGHBORS,
    MAX_QUEUES, MAX_RULES, PORT_MASK, PORT_TABLE_ICMP_ID, PORT_TABLE_TCP, PORT_TABLE_UDP,
    PORT_WORDS,
};

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

#[map]
static RULES: HashMap<PassKey, u8> = HashMap::with_max_entries(MAX_RULES, 0);

/// Allocated on demand (`BPF_F_NO_PREALLOC`): most interfaces (pod veths) never hold an entry.
#[map]
static DST_ADDRS: HashMap<u32, u8> =
    HashMap::with_max_entries(MAX_DST_ADDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_ENTRIES, 0);

#[map]
static ACTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Action::COUNT, 0);

#[map]
static NEIGH: LruHashMap<u32, NeighEntry> = LruHashMap::with_max_entries(MAX_NEIGHBORS, 0);

#[map]
static HOST_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

/// Allocated on demand (`BPF_F_NO_PREALLOC`): empty unless the host firewall is on.
#[map]
static CLUSTER_NODES: HashMap<u32, u8> =
    HashMap::with_max_entries(MAX_CLUSTER_NODES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static FAILSAFE: Array<u64> = Array::with_max_entries(FAILSAFE_WORDS, 0);

/// Sized by the loader (`EbpfLoader::set_max_entries`): large on an uplink, minimal elsewhere.
#[map]
static HOST_FLOWS: LruHashMap<HostFlowKey, HostFlowValue> =
    LruHashMap::with_max_entries(HOST_FLOWS_MIN, 0);

const ETHERTYPE_ARP: u16 = 0x0806;
/// WireGuard message type of transport data.
const WG_TRANSPORT: u8 = 4;

/// `CONFIG[i]`, 0 when absent. Read through a volatile load so the value, not the pointer,
/// reaches later arithmetic (the verifier refuses bit operations on map pointers).
#[inline(always)]
fn config(i: u32) -> u32 {
    match CONFIG.get_ptr(i) {
        // SAFETY: a valid pointer into the array map's value for index i.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

/// Records the sender (IPv4 -> MAC) of an Ethernet/IPv4 ARP packet in `NEIGH`.
#[inline(always)]
fn snoop_arp(ctx: &XdpContext) {
    // htype 1, ptype 0x0800, hlen 6, plen 4 (RFC 826), as one 48-bit check.
    let Some(hdr) = load::<[u8; 6]>(ctx, ETH_HDR_LEN) else {
        return;
    };
    if hdr != [0, 1, 8, 0, 6, 4] {
        return;
    }
    // One bounds check for sender MAC and address together (bytes 8..18 of the ARP header):
    // separate checks let LLVM fold them into a path the verifier cannot follow.
    let Some(sender) = load::<[u8; 10]>(ctx, ETH_HDR_LEN + 8) else {
        return;
    };
    let sha = [
        sender[0], sender[1], sender[2], sender[3], sender[4], sender[5],
    ];
    let spa = u32::from_ne_bytes([sender[6], sender[7], sender[8], sender[9]]);
    if spa == 0 || sha[0] & 1 == 1 {
        return; // ARP probes (sender 0.0.0.0) and multicast senders teach nothing
    }
    // SAFETY: a helper with no arguments.
    let seen_ns = unsafe { bpf_ktime_get_ns() };
    let _ = NEIGH.insert(
        &spa,
        &NeighEntry {
            mac: sha,
            pad: [0; 2],
            seen_ns,
        },
        0,
    );
}

const ETH_HDR_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMP header bytes before the quoted packet of an error (RFC 792).
const ICMP_HDR_LEN: usize = 8;

#[inline(always)]
fn count(action: Action) {
    if let Some(slot) = ACTIONS.get_ptr_mut(action as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above (the verifier checks it again).
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

#[inline(always)]
fn rule(key: &PassKey) -> Option<bool> {
    // SAFETY: lookup of a plain-data key; the value is copied out at once.
    unsafe { RULES.get(key) }.map(|v| *v == RuleAction::Pass as u8)
}

/// `DST_ADDRS[addr]` (`addr` as read from the packet, network order): `Some(true)` = pass.
#[inline(always)]
fn dst_addr_rule(addr: u32) -> Option<bool> {
    // SAFETY: lookup of a plain u32 key; the value is copied out at once. The map is
    // BPF_F_NO_PREALLOC, so a concurrent delete cannot alias the element.
    unsafe { DST_ADDRS.get(&addr) }.map(|v| *v == RuleAction::Pass as u8)
}

/// The entry for `port` in `PORTS` table `table`: `Some(true)` = pass, `None` = no entry.
#[inline(always)]
fn port_rule(table: u32, port: u16) -> Option<bool> {
    let (index, shift) = port_slot(table, port);
    let word = match PORTS.get_ptr(index) {
        // SAFETY: a valid pointer into the array map's value for `index`; a volatile load so
        // the value, not the pointer, reaches the shift below.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => return None,
    };
    port_action(word >> shift).map(|a| a == RuleAction::Pass)
}

/// Step 7 of the module doc: an ICMP message at `l4` (its offset in the frame).
/// `Err`: too short to classify.
#[inline(always)]
fn icmp_rule(ctx: &XdpContext, l4: usize) -> Result<Option<bool>, ()> {
    // The whole 8-byte header in one bounds check: a 1-byte load at a variable offset compiles
    // to `ptr >= data_end`, which the verifier does not accept as a bound.
    let icmp: [u8; ICMP_HDR_LEN] = load(ctx, l4).ok_or(())?;
    let icmp_type = icmp[0];
    if icmp_type == ICMP_ECHO_REPLY {
        let id = u16::from_be_bytes([icmp[4], icmp[5]]);
        return Ok(port_rule(PORT_TABLE_ICMP_ID, id));
    }
    if icmp_type != ICMP_DEST_UNREACHABLE
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return Ok(None);
    }
    // The quoted packet: its IPv4 header and at least 8 bytes after it (RFC 792). A quote too
    // short to hold what we look at is a valid ICMP error about something we cannot place:
    // no match rather than "short".
    let quoted = l4 + ICMP_HDR_LEN;
    let Some(q_ip) = load::<[u8; 20]>(ctx, quoted) else {
        return Ok(None);
    };
    let q_ihl = ((q_ip[0] & 0x0f) as usize) * 4;
    if q_ip[0] >> 4 != 4 || q_ihl < 20 {
        return Ok(None);
    }
    if u16::from_be_bytes([q_ip[6], q_ip[7]]) & 0x1fff != 0 {
        return Ok(None); // a later fragment quotes no L4 header
    }
    let table = match q_ip[9] {
        IPPROTO_TCP => PORT_TABLE_TCP,
        IPPROTO_UDP => PORT_TABLE_UDP,
        IPPROTO_ICMP => PORT_TABLE_ICMP_ID,
        _ => return Ok(None),
    };
    // q_ihl is 20..=60 as above: a constant-bounded offset.
    let q_l4 = quoted + (q_ihl & 0x3c);
    // One load for the first 6 quoted L4 bytes: TCP/UDP source port at 0..2, ICMP type at 0
    // and identifier at 4..6.
    let Some(q_hdr) = load::<[u8; 6]>(ctx, q_l4) else {
        return Ok(None);
    };
    let key = if table == PORT_TABLE_ICMP_ID {
        if q_hdr[0] != ICMP_ECHO_REQUEST {
            return Ok(None);
        }
        u16::from_be_bytes([q_hdr[4], q_hdr[5]])
    } else {
        u16::from_be_bytes([q_hdr[0], q_hdr[1]])
    };
    Ok(port_rule(table, key))
}

/// What to do with a frame, and under which counter when it is passed.
#[derive(Clone, Copy)]
enum Verdict {
    Pass(Action),
    Redirect,
}

/// The verdict of a rule (or the default): `true` = pass.
#[inline(always)]
fn by_rule(pass: bool) -> Verdict {
    if pass {
        Verdict::Pass(Action::PassRule)
    } else {
        Verdict::Redirect
    }
}

/// Whether `addr` (network order) is one of this node's addresses.
#[inline(always)]
fn is_host_addr(addr: u32) -> bool {
    // SAFETY: lookup of a plain u32 key; only presence is used.
    unsafe { HOST_ADDRS.get(&addr) }.is_some()
}

/// Whether `addr` (network order) is a cluster node's address.
#[inline(always)]
fn is_cluster_node(addr: u32) -> bool {
    // SAFETY: lookup of a plain u32 key; only presence is used.
    unsafe { CLUSTER_NODES.get(&addr) }.is_some()
}

/// Step 9b: whether `key` (a port, or an ICMP type) of `FAILSAFE` table `table` passes a
/// packet from `src`.
#[inline(always)]
fn failsafe(table: u32, key: u16, src: u32) -> bool {
    let (index, shift) = port_slot(table, key);
    let word = match FAILSAFE.get_ptr(index) {
        // SAFETY: a valid pointer into the array map's value for `index`; a volatile load so
        // the value, not the pointer, reaches the shift below.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => return false,
    };
    let bits = (word >> shift) & PORT_MASK;
    bits == FAILSAFE_ANYWHERE || (bits == FAILSAFE_NODES_ONLY && is_cluster_node(src))
}

/// Step 9d: whether the node sent on this flow within the protocol's timeout.
#[inline(always)]
fn node_flow(proto: u8, remote_addr: u32, remote_port: u16, local_port: u16) -> bool {
    let key = HostFlowKey {
        proto,
        pad: 0,
        remote_port,
        local_port,
        pad2: 0,
        remote_addr,
    };
    let seen = match HOST_FLOWS.get_ptr(&key) {
        // SAFETY: a valid pointer to the entry's value; `seen_ns` is an aligned u64 the TC
        // program may rewrite concurrently, read once.
        Some(p) => unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).seen_ns)) },
        None => return false,
    };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout = if proto == IPPROTO_TCP {
        HOST_FLOW_TCP_TIMEOUT_NS
    } else if proto == IPPROTO_UDP {
        HOST_FLOW_UDP_TIMEOUT_NS
    } else {
        HOST_FLOW_ICMP_TIMEOUT_NS
    };
    // A write on another CPU after our `seen` read can make `seen` newer than `now`.
    now.saturating_sub(seen) < timeout
}

/// Step 9 of the module doc: an IPv4 packet from `src` to one of the node's own addresses that
/// no rule claimed. `l4`: offset of its L4 header.
#[inline(always)]
fn host_firewall(ctx: &XdpContext, proto: u8, src: u32, fragment: bool, l4: usize) -> Verdict {
    if fragment {
        return Verdict::Redirect;
    }
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        // Source and destination port (the destination was read before: present).
        let Some(ports) = load::<[u8; 4]>(ctx, l4) else {
            return Verdict::Redirect;
        };
        let src_port = u16::from_be_bytes([ports[0], ports[1]]);
        let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        let table = if proto == IPPROTO_TCP {
            FAILSAFE_TABLE_TCP
        } else {
            FAILSAFE_TABLE_UDP
        };
        if failsafe(table, dst_port, src) {
            return Verdict::Pass(Action::PassFailsafe);
        }
        if node_flow(proto, src, src_port, dst_port) {
            return Verdict::Pass(Action::PassHostFlow);
        }
    } else if proto == IPPROTO_ICMP {
        let Some(icmp) = load::<[u8; ICMP_HDR_LEN]>(ctx, l4) else {
            return Verdict::Redirect;
        };
        let icmp_type = icmp[0];
        if icmp_type == ICMP_DEST_UNREACHABLE
            || icmp_type == ICMP_SOURCE_QUENCH
            || icmp_type == ICMP_REDIRECT
            || icmp_type == ICMP_TIME_EXCEEDED
            || icmp_type == ICMP_PARAMETER_PROBLEM
        {
            return Verdict::Pass(Action::PassIcmpError);
        }
        if failsafe(FAILSAFE_TABLE_ICMP_TYPE, u16::from(icmp_type), src) {
            return Verdict::Pass(Action::PassFailsafe);
        }
        if icmp_type == ICMP_ECHO_REPLY
            && node_flow(IPPROTO_ICMP, src, 0, u16::from_be_bytes([icmp[4], icmp[5]]))
        {
            return Verdict::Pass(Action::PassHostFlow);
        }
    }
    Verdict::Redirect
}

/// The verdict for a frame. `Err`: too short to classify. Steps as in the module doc.
#[inline(always)]
fn kernel_keeps(ctx: &XdpContext) -> Result<Verdict, ()> {
    let default_pass = CONFIG
        .get(CONFIG_DEFAULT_ACTION)
        .map(|v| *v == RuleAction::Pass as u32);
    let default_pass = default_pass.unwrap_or(false);
    let ethertype = u16::from_be(load::<u16>(ctx, 12).ok_or(())?);
    if ethertype == ETHERTYPE_ARP && config(CONFIG_SNOOP_ARP) == 1 {
        snoop_arp(ctx);
    }
    if let Some(pass) = rule(&PassKey::ethertype(ethertype)) {
        return Ok(by_rule(pass));
    }
    if ethertype != ETHERTYPE_IPV4 {
        return Ok(by_rule(default_pass));
    }
    let ver_ihl: u8 = load(ctx, ETH_HDR_LEN).ok_or(())?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(by_rule(default_pass));
    }
    // Without its protocol byte the packet cannot be classified at all (pass_short). With it
    // but cut short of the addresses it matches no rule: the interface default decides, so a
    // pod's truncated packet still reaches the dataplane, which counts it (`frame_too_short`).
    let _proto: u8 = load(ctx, ETH_HDR_LEN + 9).ok_or(())?;
    // Protocol (byte 9) to destination address (16..20) in one bounds check.
    let Some(hdr) = load::<[u8; 12]>(ctx, ETH_HDR_LEN + 8) else {
        return Ok(by_rule(default_pass));
    };
    let proto = hdr[1];
    let src = u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let dst = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if let Some(pass) = dst_addr_rule(dst) {
        return Ok(by_rule(pass));
    }
    let frag = u16::from_be(load::<u16>(ctx, ETH_HDR_LEN + 6).ok_or(())?);
    let fragment = frag & 0x3fff != 0;
    // ihl is 20..=60: a constant-bounded offset the verifier accepts.
    let l4 = ETH_HDR_LEN + (ihl & 0x3c);
    if !fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        let port = u16::from_be(load::<u16>(ctx, l4 + 2).ok_or(())?);
        let wg_port = config(CONFIG_WG_PORT);
        if proto == IPPROTO_UDP && wg_port != 0 && u32::from(port) == wg_port {
            // The message type is the first byte after the UDP header: transport data (4) for
            // the workers, handshakes and cookies (1, 2, 3) for the agent's socket.
            return Ok(by_rule(load::<u8>(ctx, l4 + 8) != Some(WG_TRANSPORT)));
        }
        if let Some(pass) = rule(&PassKey::ipv4(proto, port)) {
            return Ok(by_rule(pass));
        }
        let table = if proto == IPPROTO_TCP {
            PORT_TABLE_TCP
        } else {
            PORT_TABLE_UDP
        };
        if let Some(pass) = port_rule(table, port) {
            return Ok(by_rule(pass));
        }
    }
    if !fragment && proto == IPPROTO_ICMP {
        if let Some(pass) = icmp_rule(ctx, l4)? {
            return Ok(by_rule(pass));
        }
    }
    if let Some(pass) = rule(&PassKey::ipv4(proto, 0)) {
        return Ok(by_rule(pass));
    }
    if config(CONFIG_HOST_FIREWALL) == 1 && is_host_addr(dst) {
        return Ok(host_firewall(ctx, proto, src, fragment, l4));
    }
    Ok(by_rule(default_pass))
}

#[xdp]
pub fn xdp_redirect(ctx: XdpContext) -> u32 {
    match kernel_keeps(&ctx) {
        Ok(Verdict::Pass(action)) => {
            count(action);
            return xdp_action::XDP_PASS;
        }
        Ok(Verdict::Redirect) => {}
        Err(()) => {
            count(Action::PassShort);
            return xdp_action::XDP_PASS;
        }
    }
    // SAFETY: reading the rx queue index from the xdp_md context.
    let queue = unsafe { (*ctx.ctx).rx_queue_index };
    if XSKS.get(queue).is_none() {
        count(Action::PassNoSocket);
        return xdp_action::XDP_PASS;
    }
    count(Action::Redirected);
    XSKS.redirect(queue, xdp_action::XDP_PASS as u64)
        .unwrap_or(xdp_action::XDP_PASS)
}

/// The TC egress program: records the flows the node sends (module doc, last paragraph).
#[classifier]
pub fn host_flows(ctx: TcContext) -> i32 {
    record_host_flow(&ctx);
    TC_ACT_OK as i32
}

#[inline(always)]
fn record_host_flow(ctx: &TcContext) -> Option<()> {
    // bpf_skb_load_bytes: works on non-linear (GSO) skbs too, bounds checked by the helper.
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip: [u8; 20] = ctx.load(ETH_HDR_LEN).ok()?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None; // a later fragment carries no ports
    }
    let proto = ip[9];
    let src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if !is_host_addr(src) {
        return None; // forwarded, not the node's own traffic
    }
    let l4 = ETH_HDR_LEN + (ihl & 0x3c);
    let (remote_port, local_port, flags) = if proto == IPPROTO_TCP {
        // Ports (0..4) to flags (13) in one load.
        let tcp: [u8; 14] = ctx.load(l4).ok()?;
        // SYN without ACK: the node opens the connection.
        let opened = if tcp[13] & 0x12 == 0x02 {
            HOST_FLOW_NODE_OPENED
        } else {
            0
        };
        (
            u16::from_be_bytes([tcp[2], tcp[3]]),
            u16::from_be_bytes([tcp[0], tcp[1]]),
            opened,
        )
    } else if proto == IPPROTO_UDP {
        let ports: [u8; 4] = ctx.load(l4).ok()?;
        (
            u16::from_be_bytes([ports[2], ports[3]]),
            u16::from_be_bytes([ports[0], ports[1]]),
            0,
        )
    } else if proto == IPPROTO_ICMP {
        let icmp: [u8; ICMP_HDR_LEN] = ctx.load(l4).ok()?;
        if icmp[0] != ICMP_ECHO_REQUEST {
            return None;
        }
        (
            0,
            u16::from_be_bytes([icmp[4], icmp[5]]),
            HOST_FLOW_NODE_OPENED,
        )
    } else {
        return None;
    };
    let key = HostFlowKey {
        proto,
        pad: 0,
        remote_port,
        local_port,
        pad2: 0,
        remote_addr: dst,
    };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = HOST_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a valid pointer to the entry's value; `seen_ns` (an aligned u64) is read and
        // rewritten in place, which an LRU update would not do without allocating an element.
        unsafe {
            let seen = core::ptr::addr_of_mut!((*p).seen_ns);
            if now.saturating_sub(core::ptr::read_volatile(seen)) > HOST_FLOW_REFRESH_NS {
                core::ptr::write_volatile(seen, now);
            }
        }
        return Some(());
    }
    let value = HostFlowValue {
        seen_ns: now,
        flags,
    };
    let _ = HOST_FLOWS.insert(&key, &value, 0);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
