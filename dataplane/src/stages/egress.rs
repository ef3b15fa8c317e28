//! Out of the cluster through the uplink: masqueraded pod traffic and replies of NodePort /
//! LoadBalancer flows to outside clients. Routed like the kernel would (RFC 1812 5.2/5.3): the
//! next hop is the destination itself when on the uplink's subnet, else the uplink's gateway;
//! TTL decremented; MACs from the snooped neighbour table (an ARP request when unresolved).
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::Snapshot,
    stages::neighbor,
    wire::{ethernet, ipv4},
    Ctx, TxKind, Verdict,
};

/// Why [`send`] did not send (the frame is untouched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotSent {
    /// No uplink, no NAT configuration, or no route (no gateway) for the destination.
    NoRoute,
    /// TTL would reach zero.
    TtlExpired,
}

#[inline]
pub fn send(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Result<Verdict, NotSent> {
    let (Some(overlay), Some(nat)) = (snap.overlay(), snap.nat()) else {
        return Err(NotSent::NoRoute);
    };
    let Some(next_hop) = nat.next_hop(meta.dst) else {
        return Err(NotSent::NoRoute);
    };
    let Some(uplink) = snap.interface(overlay.uplink_ifindex) else {
        return Ok(Verdict::Drop(DropReason::NoTxPort));
    };
    if meta.ttl <= 1 {
        return Err(NotSent::TtlExpired);
    }
    let Some(mac) = snap.neighbor(next_hop) else {
        return Ok(neighbor::resolve(
            ctx.arp, ctx.now_ns, overlay, uplink.mac, next_hop, pkt,
        ));
    };
    let data = pkt.data_mut();
    if ipv4::decrement_ttl(&mut data[meta.l3..]).is_err() {
        return Ok(Verdict::Drop(DropReason::Ipv4Malformed));
    }
    if ethernet::emit(data, mac, uplink.mac, ethernet::ETHERTYPE_IPV4).is_err() {
        return Ok(Verdict::Drop(DropReason::FrameTooShort));
    }
    Ok(Verdict::Tx {
        ifindex: overlay.uplink_ifindex,
        kind: TxKind::Forward,
    })
}
