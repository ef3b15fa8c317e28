//! sluice's only kernel code: hand each frame to the AF_XDP socket of its rx queue.
//!
//! - The first matching `RULES` entry, or else the interface default in `CONFIG`, says
//!   redirect or pass (node traffic on an uplink stays with the kernel).
//! - No socket registered for the queue (agent not running) -> `XDP_PASS`: fail-open, the node
//!   stays reachable when the agent is down or has crashed.
//! - Otherwise `bpf_redirect_map(XSKS, queue, XDP_PASS)`: the fallback action is `XDP_PASS` too.
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
    Action, NeighEntry, PassKey, RuleAction, CONFIG_DEFAULT_ACTION, CONFIG_ENTRIES,
    CONFIG_SNOOP_ARP, MAX_NEIGHBORS, MAX_QUEUES, MAX_RULES,
};

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

#[map]
static RULES: HashMap<PassKey, u8> = HashMap::with_max_entries(MAX_RULES, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_ENTRIES, 0);

#[map]
static ACTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Action::COUNT, 0);

#[map]
static NEIGH: LruHashMap<u32, NeighEntry> = LruHashMap::with_max_entries(MAX_NEIGHBORS, 0);

const ETHERTYPE_ARP: u16 = 0x0806;

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
    let Some(hdr) = load::<[u8; 6]>(ctx, ETH_HDR_LEN) else { return };
    if hdr != [0, 1, 8, 0, 6, 4] {
        return;
    }
    // One bounds check for sender MAC and address together (bytes 8..18 of the ARP header):
    // separate checks let LLVM fold them into a path the verifier cannot follow.
    let Some(sender) = load::<[u8; 10]>(ctx, ETH_HDR_LEN + 8) else { return };
    let sha = [sender[0], sender[1], sender[2], sender[3], sender[4], sender[5]];
    let spa = u32::from_ne_bytes([sender[6], sender[7], sender[8], sender[9]]);
    if spa == 0 || sha[0] & 1 == 1 {
        return; // ARP probes (sender 0.0.0.0) and multicast senders teach nothing
    }
    // SAFETY: a helper with no arguments.
    let seen_ns = unsafe { bpf_ktime_get_ns() };
    let _ = NEIGH.insert(&spa, &NeighEntry { mac: sha, pad: [0; 2], seen_ns }, 0);
}

const ETH_HDR_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

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

/// `Ok(true)`: leave to the kernel. `Err`: too short to classify.
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
    let proto: u8 = load(ctx, ETH_HDR_LEN + 9).ok_or(())?;
    // Fragments carry no port after the first one: every fragment of a datagram must take the
    // same way (kernel or AF_XDP), or neither side can reassemble it. So a fragment (MF set or
    // offset non-zero) is decided by the (proto, 0) rule or the default, never by its "port".
    let frag = u16::from_be(load::<u16>(ctx, ETH_HDR_LEN + 6).ok_or(())?);
    let fragment = frag & 0x3fff != 0;
    if !fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        // ihl is 20..=60: a constant-bounded offset the verifier accepts.
        let off = ETH_HDR_LEN + (ihl & 0x3c) + 2;
        let port = u16::from_be(load::<u16>(ctx, off).ok_or(())?);
        if let Some(pass) = rule(&PassKey::ipv4(proto, port)) {
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
