//! VXLAN decapsulation (RFC 7348) of frames arriving on the uplink: the outer headers are
//! validated (IPv4 to this node, not fragmented, UDP to the VXLAN port with a consistent length,
//! the I flag, our VNI, a whole inner Ethernet header), then pulled off in place so the inner
//! frame goes on through the pipeline. Every failure is a numbered drop.
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::OverlayConfig,
    wire::{ethernet, ipv4, udp, vxlan},
};

/// Strips the outer headers of a VXLAN frame whose outer IPv4 header classify validated.
#[inline]
pub fn pop(
    overlay: &OverlayConfig,
    outer: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Result<(), DropReason> {
    if outer.dst != overlay.node_ip || outer.protocol != ipv4::PROTO_UDP {
        return Err(DropReason::UplinkUnexpected);
    }
    if outer.fragment {
        return Err(DropReason::VxlanFragment);
    }
    let ip_end = outer.l3 + outer.total_len;
    let data = pkt.data();
    let Ok(u) = udp::Datagram::new_checked(&data[outer.l4..ip_end]) else {
        return Err(DropReason::VxlanMalformed);
    };
    if u.dst_port() != overlay.port {
        return Err(DropReason::UplinkUnexpected);
    }
    let vx = match vxlan::Packet::new_checked(u.payload()) {
        Ok(v) => v,
        Err(_) => return Err(DropReason::VxlanMalformed),
    };
    if vx.vni() != overlay.vni {
        return Err(DropReason::VxlanBadVni);
    }
    let inner_len = vx.payload().len();
    if inner_len < ethernet::HEADER_LEN {
        return Err(DropReason::VxlanMalformed);
    }
    let inner_at = outer.l4 + udp::HEADER_LEN + vxlan::HEADER_LEN;
    pkt.pull_front(inner_at)
        .map_err(|_| DropReason::VxlanMalformed)?;
    pkt.set_len(inner_len)
        .map_err(|_| DropReason::VxlanMalformed)?;
    Ok(())
}
