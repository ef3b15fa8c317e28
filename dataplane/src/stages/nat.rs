//! NAT rewrites in place with incremental checksums (RFC 1624 eqn. 3, [`checksum::update16`]):
//! IPv4 source/destination, TCP/UDP ports, the ICMP echo identifier, and ICMP errors about a
//! translated flow (their embedded header). Nothing is re-summed from scratch: every changed
//! 16-bit word is folded into each checksum that covers it.
//!
//! Which checksum covers which word:
//! - IPv4 addresses: the IPv4 header checksum and, for TCP/UDP, the transport checksum
//!   (pseudo-header, RFC 793 3.1 / RFC 768). ICMP has no pseudo-header (RFC 792).
//! - Ports and the echo identifier: the transport (or ICMP) checksum.
//! - UDP: a checksum of 0 means "none" and stays 0 (RFC 768); a computed 0 is sent as 0xffff.
//! - Inside an ICMP error (RFC 792: the offending IP header plus at least 8 bytes of its
//!   payload) every change, including the embedded checksums' own changes, is also folded into
//!   the outer ICMP checksum. A quoted TCP header is often cut before its checksum (offset 16):
//!   then only the ports are rewritten, as Linux's `nf_nat_ipv4_manip_pkt` does.
//!
//! Ports of ICMP echo (RFC 792 types 8/0): the identifier names the requester's side, so it is
//! the *source* port of an echo request and the *destination* port of an echo reply (the
//! [`crate::conntrack::FlowKey`] of an echo request is `sport = id, dport = 0`, its reply's
//! `sport = 0, dport = id`). The other "port" of an echo rewrite is ignored.
//!
//! ICMP errors (destination unreachable, source quench, redirect, time exceeded, parameter
//! problem) travel in the *opposite* direction of the packet they quote. [`rewrite`] takes the
//! rewrite of the error's own direction (for example the reverse SNAT `src: service` of a
//! DNATed flow's replies) and applies it mirrored to the quoted packet (its destination becomes
//! the service). The outer addresses are rewritten only where they name the translated
//! endpoint itself: the outer source when it equals the quoted destination (the error comes from
//! the backend itself, not from a router on the way), the outer destination when it equals the
//! quoted source (always, for an error going back to the sender). Errors from routers on the way
//! keep their source, so traceroute through a service still shows the hops.
//!
//! Non-first fragments carry no transport header: only their addresses are rewritten (the
//! transport checksum, in the first fragment, already absorbed the pseudo-header change). Which
//! flow a non-first fragment belongs to is the caller's business.
use std::net::Ipv4Addr;

use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    wire::{be16, be32, checksum, icmp, ipv4, put16},
};

/// What to write into a packet: a new source and/or destination, each an address and a port
/// (the port is ignored where the protocol has none; see the module doc for ICMP echo).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatRewrite {
    pub src: Option<(Ipv4Addr, u16)>,
    pub dst: Option<(Ipv4Addr, u16)>,
}

impl NatRewrite {
    /// No change.
    pub const NONE: NatRewrite = NatRewrite {
        src: None,
        dst: None,
    };

    /// Destination NAT only (service -> backend).
    pub const fn dnat(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            src: None,
            dst: Some((addr, port)),
        }
    }

    /// Source NAT only (backend -> service on replies, pod -> node when masquerading).
    pub const fn snat(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            src: Some((addr, port)),
            dst: None,
        }
    }

    pub const fn is_none(&self) -> bool {
        self.src.is_none() && self.dst.is_none()
    }
}

const IP_CHECKSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
const TCP_CHECKSUM: usize = 16;
const UDP_CHECKSUM: usize = 6;
const ICMP_CHECKSUM: usize = 2;
const ICMP_ECHO_ID: usize = 4;

/// Rewrites the classified frame in `pkt` (see [`rewrite_frame`]).
#[inline]
pub fn rewrite(
    meta: &Ipv4Meta,
    rw: &NatRewrite,
    pkt: &mut PacketBuf<'_>,
) -> Result<(), DropReason> {
    rewrite_frame(meta, rw, pkt.data_mut())
}

/// Applies `rw` to the IPv4 packet that `classify` described in `meta` (`frame` is the whole
/// Ethernet frame). ICMP errors are rewritten as described in the module doc. A packet too short
/// for the headers the rewrite touches is `FrameTooShort` (quoted header shorter than 20 bytes
/// or not IPv4: `Ipv4Malformed`); on error the frame may be partly rewritten and must be
/// dropped.
#[inline]
pub fn rewrite_frame(meta: &Ipv4Meta, rw: &NatRewrite, frame: &mut [u8]) -> Result<(), DropReason> {
    if rw.is_none() {
        return Ok(());
    }
    let end = meta
        .l3
        .checked_add(meta.total_len)
        .ok_or(DropReason::FrameTooShort)?;
    if meta.l4 < meta.l3 + ipv4::MIN_HEADER_LEN || meta.l4 > end || frame.len() < end {
        return Err(DropReason::FrameTooShort);
    }
    let pkt = &mut frame[meta.l3..end];
    let ihl = meta.l4 - meta.l3;
    let l4 = if meta.later_fragment {
        L4::None
    } else {
        match transport(pkt, ihl, meta.protocol, false)? {
            Transport::L4(l4) => l4,
            Transport::IcmpError => return rewrite_icmp_error(pkt, ihl, rw),
        }
    };
    let mut no_outer = 0u16;
    translate(pkt, l4, rw.src, rw.dst, &mut no_outer);
    Ok(())
}

/// The transport header a rewrite touches, at offsets within the IP packet.
#[derive(Clone, Copy, Debug)]
enum L4 {
    /// Nothing beyond the IP header (non-first fragment, other protocol, other ICMP type).
    None,
    /// TCP or UDP: ports at `at`, checksum at `csum` (`None`: cut off in a quote, or UDP 0).
    Ports {
        at: usize,
        csum: Option<usize>,
        udp: bool,
    },
    /// ICMP echo request (`request`) or reply: identifier and checksum.
    Echo {
        at: usize,
        request: bool,
        csum: Option<usize>,
    },
}

enum Transport {
    L4(L4),
    IcmpError,
}

/// Finds the transport header of the IP packet `pkt` (header length `ihl`). `quoted`: inside
/// an ICMP error, where only 8 bytes of it are guaranteed (TCP checksum may be absent), and
/// where an ICMP error is not looked into again.
fn transport(pkt: &[u8], ihl: usize, protocol: u8, quoted: bool) -> Result<Transport, DropReason> {
    let avail = pkt.len() - ihl;
    match protocol {
        ipv4::PROTO_TCP => {
            let csum = if avail >= TCP_CHECKSUM + 2 {
                Some(ihl + TCP_CHECKSUM)
            } else if quoted && avail >= 8 {
                None
            } else {
                return Err(DropReason::FrameTooShort);
            };
            Ok(Transport::L4(L4::Ports {
                at: ihl,
                csum,
                udp: false,
            }))
        }
        ipv4::PROTO_UDP => {
            if avail < 8 {
                return Err(DropReason::FrameTooShort);
            }
            let csum = (be16(pkt, ihl + UDP_CHECKSUM) != 0).then_some(ihl + UDP_CHECKSUM);
            Ok(Transport::L4(L4::Ports {
                at: ihl,
                csum,
                udp: true,
            }))
        }
        ipv4::PROTO_ICMP => {
            if avail < icmp::HEADER_LEN {
                return Err(DropReason::FrameTooShort);
            }
            match pkt[ihl] {
                t @ (icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY) => {
                    Ok(Transport::L4(L4::Echo {
                        at: ihl,
                        request: t == icmp::TYPE_ECHO_REQUEST,
                        csum: Some(ihl + ICMP_CHECKSUM),
                    }))
                }
                t if icmp::is_error(t) && !quoted => Ok(Transport::IcmpError),
                _ => Ok(Transport::L4(L4::None)),
            }
        }
        _ => Ok(Transport::L4(L4::None)),
    }
}

/// Writes `new` at `at` (a 16-bit word) and folds the change into every checksum in `sums`.
#[inline]
fn put_word(pkt: &mut [u8], at: usize, new: u16, sums: &mut [&mut u16]) {
    let old = be16(pkt, at);
    if old == new {
        return;
    }
    for s in sums.iter_mut() {
        **s = checksum::update16(**s, old, new);
    }
    put16(pkt, at, new);
}

/// Rewrites the IP packet at the start of `pkt` (its header checksum at offset 10) and its
/// transport header `l4`. Every changed word is also folded into `outer` (the enclosing ICMP
/// error's checksum; a scratch value otherwise).
fn translate(
    pkt: &mut [u8],
    l4: L4,
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
    outer: &mut u16,
) {
    let mut ip_sum = be16(pkt, IP_CHECKSUM);
    let (csum_at, pseudo, udp) = match l4 {
        L4::None => (None, false, false),
        L4::Ports { csum, udp, .. } => (csum, true, udp),
        L4::Echo { csum, .. } => (csum, false, false),
    };
    let mut l4_sum = csum_at.map_or(0, |at| be16(pkt, at));
    let mut scratch = 0u16;
    for (field, port_off, addr) in [(IP_SRC, 0usize, src), (IP_DST, 2, dst)] {
        let Some((addr, port)) = addr else { continue };
        let a = u32::from(addr);
        for (i, word) in [(a >> 16) as u16, a as u16].into_iter().enumerate() {
            let pseudo_sum = if pseudo && csum_at.is_some() {
                &mut l4_sum
            } else {
                &mut scratch
            };
            put_word(
                pkt,
                field + 2 * i,
                word,
                &mut [&mut ip_sum, pseudo_sum, &mut *outer],
            );
        }
        let port_at = match l4 {
            L4::None => None,
            L4::Ports { at, .. } => Some(at + port_off),
            // The identifier is the requester's port: source of a request, destination of
            // a reply.
            L4::Echo { at, request, .. } => {
                (request == (field == IP_SRC)).then_some(at + ICMP_ECHO_ID)
            }
        };
        if let Some(at) = port_at {
            put_word(pkt, at, port, &mut [&mut l4_sum, &mut *outer]);
        }
    }
    put_word(pkt, IP_CHECKSUM, ip_sum, &mut [&mut *outer]);
    if let Some(at) = csum_at {
        // RFC 768: a computed 0 is transmitted as all ones (0 means "no checksum").
        if udp && l4_sum == 0 {
            l4_sum = 0xffff;
        }
        put_word(pkt, at, l4_sum, &mut [&mut *outer]);
    }
}

/// An ICMP error at `icmp_at` in `pkt`: rewrite the quoted packet with `rw` mirrored, the outer
/// addresses where they name the translated endpoint, and the outer ICMP checksum.
fn rewrite_icmp_error(pkt: &mut [u8], icmp_at: usize, rw: &NatRewrite) -> Result<(), DropReason> {
    let inner_at = icmp_at + icmp::HEADER_LEN;
    let inner = &pkt[inner_at..];
    if inner.len() < ipv4::MIN_HEADER_LEN {
        return Err(DropReason::FrameTooShort);
    }
    let inner_ihl = usize::from(inner[0] & 0x0f) * 4;
    if inner[0] >> 4 != 4 || inner_ihl < ipv4::MIN_HEADER_LEN || inner.len() < inner_ihl + 8 {
        return Err(DropReason::Ipv4Malformed);
    }
    let inner_src = Ipv4Addr::from(be32(inner, IP_SRC));
    let inner_dst = Ipv4Addr::from(be32(inner, IP_DST));
    let later_fragment = be16(inner, 6) & 0x1fff != 0;
    let l4 = if later_fragment {
        L4::None
    } else {
        match transport(inner, inner_ihl, inner[9], true)? {
            Transport::L4(l4) => l4,
            Transport::IcmpError => L4::None,
        }
    };
    let mut icmp_sum = be16(pkt, icmp_at + ICMP_CHECKSUM);
    // The quoted packet went the other way: our source is its destination and vice versa.
    translate(&mut pkt[inner_at..], l4, rw.dst, rw.src, &mut icmp_sum);
    put16(pkt, icmp_at + ICMP_CHECKSUM, icmp_sum);
    let outer_src = rw
        .src
        .filter(|_| Ipv4Addr::from(be32(pkt, IP_SRC)) == inner_dst)
        .map(|(a, _)| (a, 0));
    let outer_dst = rw
        .dst
        .filter(|_| Ipv4Addr::from(be32(pkt, IP_DST)) == inner_src)
        .map(|(a, _)| (a, 0));
    let mut scratch = 0u16;
    translate(pkt, L4::None, outer_src, outer_dst, &mut scratch);
    Ok(())
}
