//! IPv4 forwarding between local pods by destination address (RFC 1812 5.2/5.3): look up the
//! destination endpoint, decrement TTL (incremental checksum, RFC 1624), rewrite the MACs
//! (source = the outgoing interface, i.e. the gateway MAC the destination pod sees).
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::Snapshot,
    wire::{ethernet, ipv4},
    TxKind, Verdict,
};

/// Why [`forward`] did not forward (the frame is untouched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotForwarded {
    /// The destination is not a pod on this node: the caller tries other routes.
    NotLocal,
    /// The destination is local but the TTL would reach zero: the caller answers with ICMP
    /// time exceeded.
    TtlExpired,
}

#[inline]
pub fn forward(
    snap: &Snapshot,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Result<Verdict, NotForwarded> {
    // One lookup decides both "is it local" and where it goes.
    let Some(dst) = snap.endpoint(meta.dst) else {
        return Err(NotForwarded::NotLocal);
    };
    let Some(out) = snap.interface(dst.ifindex) else {
        return Ok(Verdict::Drop(DropReason::NoRoute));
    };
    if meta.ttl <= 1 {
        return Err(NotForwarded::TtlExpired);
    }
    let data = pkt.data_mut();
    // The header was validated by classify: use its offset, never parse again.
    if ipv4::decrement_ttl(&mut data[meta.l3..]).is_err() {
        return Ok(Verdict::Drop(DropReason::Ipv4Malformed));
    }
    if ethernet::emit(data, dst.mac, out.mac, ethernet::ETHERTYPE_IPV4).is_err() {
        return Ok(Verdict::Drop(DropReason::FrameTooShort));
    }
    Ok(Verdict::Tx {
        ifindex: dst.ifindex,
        kind: TxKind::Forward,
    })
}
