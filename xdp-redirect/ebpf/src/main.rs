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
//! 8. `RULES[(ethertype, proto, 0)]`, then the interface default (`CONFIG`).
//!
//! Then: a Pass -> `XDP_PASS`. A Redirect with no socket registered for the queue (agent not
//! running) -> `XDP_PASS`: fail-open, the node stays reachable when the agent is down or has
//! crashed. Otherwise `bpf_redirect_map(XSKS, queue, XDP_PASS)`: the fallback is `XDP_PASS` too.
//!
//! Every decision increments one per-CPU counter in `ACTIONS`.
#![no_std]
#![no_main]

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::maps::{Array, LruHashMap};
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use xdp_redirect_common::{
    port_action, port_slot, Action, NeighEntry, PassKey, RuleAction, CONFIG_DEFAULT_ACTION,
    CONFIG_ENTRIES, CONFIG_SNOOP_ARP, CONFIG_WG_PORT, MAX_DST_ADDRS, MAX_NEIGHBORS, MAX_QUEUES, MAX_RULES,
    PORT_TABLE_ICMP_ID, PORT_TABLE_TCP, PORT_TABLE_UDP, PORT_WORDS,
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

/// `Ok(true)`: leave to the kernel. `Err`: too short to classify. Steps as in the module doc.
#[inline(always)]
fn kernel_keeps(ctx: &XdpContext) -> Result<bool, ()> {
    let default_pass = CONFIG
        .get(CONFIG_DEFAULT_ACTION)
        .map(|v| *v == RuleAction::Pass as u32);
    let default_pass = default_pass.unwrap_or(false);
    let ethertype = u16::from_be(load::<u16>(ctx, 12).ok_or(())?);
    if ethertype == ETHERTYPE_ARP && config(CONFIG_SNOOP_ARP) == 1 {
        snoop_arp(ctx);
    }
    if let Some(pass) = rule(&PassKey::ethertype(ethertype)) {
        return Ok(pass);
    }
    if ethertype != ETHERTYPE_IPV4 {
        return Ok(default_pass);
    }
    let ver_ihl: u8 = load(ctx, ETH_HDR_LEN).ok_or(())?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(default_pass);
    }
    // Without its protocol byte the packet cannot be classified at all (pass_short). With it
    // but cut short of the addresses it matches no rule: the interface default decides, so a
    // pod's truncated packet still reaches the dataplane, which counts it (`frame_too_short`).
    let _proto: u8 = load(ctx, ETH_HDR_LEN + 9).ok_or(())?;
    // Protocol (byte 9) to destination address (16..20) in one bounds check.
    let Some(hdr) = load::<[u8; 12]>(ctx, ETH_HDR_LEN + 8) else {
        return Ok(default_pass);
    };
    let proto = hdr[1];
    let dst = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if let Some(pass) = dst_addr_rule(dst) {
        return Ok(pass);
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
            return Ok(load::<u8>(ctx, l4 + 8) != Some(WG_TRANSPORT));
        }
        if let Some(pass) = rule(&PassKey::ipv4(proto, port)) {
            return Ok(pass);
        }
        let table = if proto == IPPROTO_TCP {
            PORT_TABLE_TCP
        } else {
            PORT_TABLE_UDP
        };
        if let Some(pass) = port_rule(table, port) {
            return Ok(pass);
        }
    }
    if !fragment && proto == IPPROTO_ICMP {
        if let Some(pass) = icmp_rule(ctx, l4)? {
            return Ok(pass);
        }
    }
    Ok(rule(&PassKey::ipv4(proto, 0)).unwrap_or(default_pass))
}

#[xdp]
pub fn xdp_redirect(ctx: XdpContext) -> u32 {
    match kernel_keeps(&ctx) {
        Ok(true) => {
            count(Action::PassRule);
            return xdp_action::XDP_PASS;
        }
        Ok(false) => {}
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
