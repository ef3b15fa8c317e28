//! VXLAN encapsulation (RFC 7348) into the frame's headroom: outer Ethernet / IPv4 / UDP /
//! VXLAN in front of the inner Ethernet frame, nothing copied.
//!
//! - Outer IPv4: source = this node, destination = the remote VTEP, TTL 64, DF set (the pod MTU
//!   leaves room for the overhead, so outer packets never need fragmenting), ID 0 (RFC 6864:
//!   the ID only matters for fragmentation), checksum computed.
//! - Outer UDP: destination = the configured VXLAN port; source = a hash of the inner flow
//!   folded into the ephemeral range 32768..=60999 (as Linux's `udp_flow_src_port`), giving the
//!   fabric's ECMP and the receiver's RSS entropy; checksum 0 (RFC 7348 section 5, IPv4).
//! - Inner Ethernet: source = this node's VTEP MAC, destination = the remote VTEP MAC.
//! - Too big for the uplink: with DF, ICMP fragmentation needed (RFC 1191: next-hop MTU = the
//!   uplink MTU minus the overhead) back to the pod; without DF, a counted drop (`OversizeNoDf`).
use crate::{
    classify::Ipv4Meta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::{InterfaceEntry, OverlayConfig, RemoteNode, Snapshot},
    stages::{icmp_error, neighbor},
    wire::{be16, ethernet, ipv4, udp, vxlan, Mac},
    Ctx, TxKind, Verdict,
};

const OUTER_TTL: u8 = 64;
const SRC_PORT_MIN: u16 = 32768;
const SRC_PORT_MAX: u16 = 60999;

/// A 32-bit hash of the inner flow (addresses, protocol, ports when present).
#[inline]
pub fn flow_hash(frame: &[u8], meta: &Ipv4Meta) -> u32 {
    let mut h = u32::from(meta.src).wrapping_mul(0x9e37_79b1) ^ u32::from(meta.dst).rotate_left(16);
    h ^= u32::from(meta.protocol).wrapping_mul(0x85eb_ca6b);
    if !meta.fragment
        && (meta.protocol == ipv4::PROTO_TCP || meta.protocol == ipv4::PROTO_UDP)
        && frame.len() >= meta.l4 + 4
    {
        h ^= (u32::from(be16(frame, meta.l4)) << 16 | u32::from(be16(frame, meta.l4 + 2)))
            .wrapping_mul(0xc2b2_ae35);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^ (h >> 12)
}

#[inline]
fn src_port(hash: u32) -> u16 {
    let span = u32::from(SRC_PORT_MAX - SRC_PORT_MIN) + 1;
    SRC_PORT_MIN + (hash % span) as u16
}

/// Encapsulates the (already routed, TTL not yet decremented) packet for `remote`.
#[inline]
pub fn push(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    overlay: &OverlayConfig,
    remote: &RemoteNode,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let inner_len = ethernet::HEADER_LEN + meta.total_len;
    let outer_ip_len = inner_len + vxlan::OVERHEAD_BYTES - ethernet::HEADER_LEN;
    if outer_ip_len > usize::from(overlay.uplink_mtu) {
        if meta.dont_fragment {
            // Inner IP bytes that fit: the uplink MTU minus outer IPv4, UDP, VXLAN and the
            // inner Ethernet header (50 bytes in all).
            let mtu = overlay
                .uplink_mtu
                .saturating_sub(vxlan::OVERHEAD_BYTES as u16);
            return icmp_error::fragmentation_needed(snap.gateway(), rx, meta, mtu, pkt);
        }
        return Verdict::Drop(DropReason::OversizeNoDf);
    }
    let Some(uplink) = snap.interface(overlay.uplink_ifindex) else {
        return Verdict::Drop(DropReason::NoTxPort);
    };
    let Some(next_hop_mac) = snap.neighbor(remote.next_hop) else {
        return neighbor::resolve(
            ctx.arp,
            ctx.now_ns,
            overlay,
            uplink.mac,
            remote.next_hop,
            pkt,
        );
    };
    let hash = flow_hash(pkt.data(), meta);
    // Inner frame: drop Ethernet padding, route (TTL), address to the remote VTEP.
    if pkt.set_len(inner_len).is_err() {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    {
        let data = pkt.data_mut();
        if ipv4::decrement_ttl(&mut data[meta.l3..]).is_err()
            || ethernet::emit(
                data,
                remote.vtep_mac,
                overlay.vtep_mac,
                ethernet::ETHERTYPE_IPV4,
            )
            .is_err()
        {
            return Verdict::Drop(DropReason::Ipv4Malformed);
        }
    }
    if pkt.push_front(vxlan::OVERHEAD_BYTES).is_err() {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    let data = pkt.data_mut();
    let ip_at = ethernet::HEADER_LEN;
    let udp_at = ip_at + ipv4::MIN_HEADER_LEN;
    let vx_at = udp_at + udp::HEADER_LEN;
    let repr = ipv4::Repr {
        src: overlay.node_ip,
        dst: remote.vtep_ip,
        protocol: ipv4::PROTO_UDP,
        ttl: OUTER_TTL,
        payload_len: outer_ip_len - ipv4::MIN_HEADER_LEN,
    };
    let ok = ethernet::emit(data, next_hop_mac, uplink.mac, ethernet::ETHERTYPE_IPV4).is_ok()
        && ipv4::emit_df(&mut data[ip_at..], &repr).is_ok()
        && udp::emit(
            &mut data[udp_at..],
            src_port(hash),
            overlay.port,
            outer_ip_len - ipv4::MIN_HEADER_LEN - udp::HEADER_LEN,
        )
        .is_ok()
        && vxlan::emit(&mut data[vx_at..], overlay.vni).is_ok();
    if !ok {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    Verdict::Tx {
        ifindex: overlay.uplink_ifindex,
        kind: TxKind::Encap,
    }
}

/// The inner source MAC a node uses, derived from its address when no annotation says
/// otherwise: `0a:58` + the IPv4 address (locally administered, unicast; the same scheme as
/// OVN-Kubernetes' pod MACs), so a kernel vxlan peer can be configured with it.
pub fn derived_vtep_mac(node_ip: std::net::Ipv4Addr) -> Mac {
    let o = node_ip.octets();
    Mac([0x0a, 0x58, o[0], o[1], o[2], o[3]])
}
