//! Traffic addressed to the gateway itself: ICMP echo is answered (so `ping <gateway>` works from
//! a pod, as it does with a kernel router); anything else is a counted drop.
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::InterfaceEntry,
    wire::{be16, checksum, icmp, ipv4, put16, put32},
    TxKind, Verdict,
};

#[inline]
pub fn answer(rx: &InterfaceEntry, meta: &Ipv4Meta, pkt: &mut PacketBuf<'_>) -> Verdict {
    // A fragmented echo request would need reassembly: not answered.
    if meta.protocol != ipv4::PROTO_ICMP || meta.fragment {
        return Verdict::Drop(DropReason::GatewayUnhandled);
    }
    let data = pkt.data_mut();
    let icmp_len = meta.total_len - (meta.l4 - meta.l3);
    if icmp_len < icmp::HEADER_LEN || data[meta.l4] != icmp::TYPE_ECHO_REQUEST {
        return Verdict::Drop(DropReason::GatewayUnhandled);
    }
    // Ethernet: back to the sender.
    data.copy_within(6..12, 0);
    data[6..12].copy_from_slice(&rx.mac.0);
    // IPv4: swap addresses (the checksum is unchanged by a swap), fresh TTL.
    let (src, dst) = (u32::from(meta.src), u32::from(meta.dst));
    put32(data, meta.l3 + 12, dst);
    put32(data, meta.l3 + 16, src);
    let old = be16(data, meta.l3 + 8);
    data[meta.l3 + 8] = 64;
    let c = checksum::update16(be16(data, meta.l3 + 10), old, be16(data, meta.l3 + 8));
    put16(data, meta.l3 + 10, c);
    // ICMP: type 8 -> 0, checksum updated incrementally.
    let old = be16(data, meta.l4);
    data[meta.l4] = icmp::TYPE_ECHO_REPLY;
    let c = checksum::update16(be16(data, meta.l4 + 2), old, be16(data, meta.l4));
    put16(data, meta.l4 + 2, c);
    Verdict::Tx {
        ifindex: rx.ifindex,
        kind: TxKind::GatewayEcho,
    }
}
