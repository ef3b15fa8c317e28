//! ICMP errors back to a pod: time exceeded (RFC 792 type 11 code 0) when a TTL expires here,
//! and fragmentation needed (type 3 code 4, RFC 1191) when a DF packet is too big for the
//! overlay. Both are
//! built in place in the same frame: new Ethernet, IPv4 and ICMP headers, then the original IP
//! header plus the first 64 bits of its payload (RFC 792; RFC 1812 4.3.2.3 allows more, Linux
//! quotes more: we keep the classic minimum).
//!
//! No ICMP error about an ICMP error, about a non-first fragment, or to a source that is not a
//! unicast sender (RFC 1122 3.2.2, RFC 1812 4.3.2.7): those are dropped with `TtlExceeded`.
use std::net::Ipv4Addr;

use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::InterfaceEntry,
    wire::{ethernet, icmp, ipv4},
    TxKind, Verdict,
};

const QUOTED_PAYLOAD_BYTES: usize = 8;
const REPLY_TTL: u8 = 64;

#[inline]
pub fn time_exceeded(
    gateway: Ipv4Addr,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    reply(
        gateway,
        rx,
        meta,
        pkt,
        icmp::TYPE_TIME_EXCEEDED,
        icmp::CODE_TTL_EXCEEDED_IN_TRANSIT,
        [0; 4],
        DropReason::TtlExceeded,
    )
}

/// ICMP destination unreachable, fragmentation needed and DF set (RFC 792 type 3 code 4), with
/// the next-hop MTU in the second half of the unused word (RFC 1191 section 4).
#[inline]
pub fn fragmentation_needed(
    gateway: Ipv4Addr,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    next_hop_mtu: u16,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let m = next_hop_mtu.to_be_bytes();
    reply(
        gateway,
        rx,
        meta,
        pkt,
        icmp::TYPE_DEST_UNREACHABLE,
        icmp::CODE_FRAG_NEEDED,
        [0, 0, m[0], m[1]],
        DropReason::OversizeNoDf,
    )
}

/// ICMP destination unreachable, port unreachable (RFC 792 type 3 code 3) from `from` (the
/// service address the sender tried): the reject for a UDP service port without backends.
/// The original counts as dropped for `reason`.
#[inline]
pub fn port_unreachable(
    from: Ipv4Addr,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    reason: DropReason,
) -> Verdict {
    match reply(
        from,
        rx,
        meta,
        pkt,
        icmp::TYPE_DEST_UNREACHABLE,
        icmp::CODE_PORT_UNREACHABLE,
        [0; 4],
        reason,
    ) {
        Verdict::Tx { ifindex, .. } => Verdict::Tx {
            ifindex,
            kind: TxKind::Reject(reason),
        },
        v => v,
    }
}

/// Rewrites `pkt` into the ICMP error (`icmp_type`, `code`, `rest`) about itself, addressed back
/// to its sender from `gateway`; `refused` is the drop reason when no error may be sent.
#[allow(clippy::too_many_arguments)]
#[inline]
fn reply(
    gateway: Ipv4Addr,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    refused: DropReason,
) -> Verdict {
    let ihl = meta.l4 - meta.l3;
    let payload_len = meta.total_len - ihl;
    if meta.later_fragment {
        return Verdict::Drop(refused);
    }
    if meta.protocol == ipv4::PROTO_ICMP && (payload_len < 1 || icmp::is_error(pkt.data()[meta.l4]))
    {
        return Verdict::Drop(refused);
    }
    let quoted = ihl + payload_len.min(QUOTED_PAYLOAD_BYTES);
    let icmp_at = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    let quote_at = icmp_at + icmp::HEADER_LEN;
    let new_len = quote_at + quoted;
    // Move the quoted original (IP header + 8 bytes) behind the new headers.
    if pkt.copy_within(meta.l3, quoted, quote_at, new_len).is_err() {
        return Verdict::Drop(refused);
    }
    let data = pkt.data_mut();
    if icmp::emit(&mut data[icmp_at..], icmp_type, code, rest, quoted).is_err() {
        return Verdict::Drop(refused);
    }
    let repr = ipv4::Repr {
        src: gateway,
        dst: meta.src,
        protocol: ipv4::PROTO_ICMP,
        ttl: REPLY_TTL,
        payload_len: icmp::HEADER_LEN + quoted,
    };
    if ipv4::emit(&mut data[ethernet::HEADER_LEN..], &repr).is_err()
        || ethernet::emit(data, meta.src_mac, rx.mac, ethernet::ETHERTYPE_IPV4).is_err()
    {
        return Verdict::Drop(refused);
    }
    Verdict::Tx {
        ifindex: rx.ifindex,
        kind: TxKind::IcmpError,
    }
}
