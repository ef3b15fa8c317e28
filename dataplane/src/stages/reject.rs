//! TCP reset for a connection attempt to a service port without backends (kube-proxy's reject
//! rule: `reject with tcp reset`), built in place from the offending segment (RFC 9293 3.10.7.1):
//! - the segment had ACK: `<SEQ=SEG.ACK><CTL=RST>`;
//! - otherwise: `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>` (SYN and FIN count in SEG.LEN).
//!
//! A segment that is itself a RST gets nothing (RFC 9293: never reset a reset). The reply goes
//! back out of the interface the segment came in on, to its source MAC, from the address the
//! sender tried (the service), so its socket accepts it.
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::InterfaceEntry,
    wire::{be16, be32, checksum, ethernet, ipv4, put16},
    TxKind, Verdict,
};

const TCP_HEADER_LEN: usize = 20;
const TTL: u8 = 64;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// Turns the TCP segment in `pkt` into a RST back to its sender; the original counts as dropped
/// for `reason`.
#[inline]
pub fn tcp_reset(
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    reason: DropReason,
) -> Verdict {
    if meta.later_fragment || meta.protocol != ipv4::PROTO_TCP {
        return Verdict::Drop(reason);
    }
    let data = pkt.data();
    let l4 = meta.l4;
    let ip_end = meta.l3 + meta.total_len;
    if data.len() < ip_end || ip_end < l4 + TCP_HEADER_LEN {
        return Verdict::Drop(reason);
    }
    let sport = be16(data, l4);
    let dport = be16(data, l4 + 2);
    let seq = be32(data, l4 + 4);
    let ack = be32(data, l4 + 8);
    let doff = usize::from(data[l4 + 12] >> 4) * 4;
    let flags = data[l4 + 13];
    if flags & RST != 0 || doff < TCP_HEADER_LEN || l4 + doff > ip_end {
        return Verdict::Drop(reason);
    }
    let seg_len =
        (ip_end - l4 - doff) as u32 + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
    let (rst_seq, rst_ack, rst_flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        (0, seq.wrapping_add(seg_len), RST | ACK)
    };
    let new_len = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + TCP_HEADER_LEN;
    if pkt.set_len(new_len).is_err() {
        return Verdict::Drop(reason);
    }
    let data = pkt.data_mut();
    let t = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    let tcp = &mut data[t..t + TCP_HEADER_LEN];
    put16(tcp, 0, dport);
    put16(tcp, 2, sport);
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = (TCP_HEADER_LEN as u8 / 4) << 4;
    tcp[13] = rst_flags;
    put16(tcp, 14, 0); // window
    put16(tcp, 16, 0); // checksum
    put16(tcp, 18, 0); // urgent pointer
    let (src, dst) = (meta.dst, meta.src);
    let pseudo = checksum::sum(&src.octets())
        + checksum::sum(&dst.octets())
        + u32::from(ipv4::PROTO_TCP)
        + TCP_HEADER_LEN as u32;
    let c = !checksum::fold(pseudo + checksum::sum(tcp));
    put16(tcp, 16, c);
    let repr = ipv4::Repr {
        src,
        dst,
        protocol: ipv4::PROTO_TCP,
        ttl: TTL,
        payload_len: TCP_HEADER_LEN,
    };
    if ipv4::emit_df(&mut data[ethernet::HEADER_LEN..], &repr).is_err()
        || ethernet::emit(data, meta.src_mac, rx.mac, ethernet::ETHERTYPE_IPV4).is_err()
    {
        return Verdict::Drop(reason);
    }
    Verdict::Tx {
        ifindex: rx.ifindex,
        kind: TxKind::Reject(reason),
    }
}
