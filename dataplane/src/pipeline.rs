//! The one place that writes the stage order. Per frame:
//!
//! ```text
//! rx on a pod interface:
//!   classify -> ARP?  -> arp::respond                                   -> tx back out rx
//!            -> IPv4: source sane, owned by the pod? -> to gateway?     -> gateway::answer
//!                     -> local pod?   -> route::forward (TTL, MACs)     -> tx to the pod
//!                     -> other node?  -> TTL -> encap::push (neighbour?) -> tx on the uplink
//!                     -> TTL expired / too big: icmp_error              -> tx back out rx
//! rx on the uplink:
//!   classify (outer) -> VXLAN? decap::pop -> classify (inner) -> source check -> lb -> route
//!                    -> else (NodePort, LB IP, SNAT reply: XDP claimed it) -> lb -> route
//! lb (stages::lb): steer to the flow's owner worker (Handoff), conntrack, DNAT/SNAT, reject,
//!                 NetworkPolicy verdicts (judged per new flow, cached in conntrack), and the
//!                 host firewall for packets to the node (re-injected through the host veth)
//! route after lb: local pod -> route::forward; other node's pod CIDR or address -> encap;
//!                 outside the cluster -> egress::send on the uplink
//! ```
//!
//! A frame handed over by another worker enters at [`process_resumed`], where the first worker
//! stopped (right before lb).
//! Sans-IO: no sockets, no clock (the batch's time comes in `Ctx`),
//! no allocation; callable from tests and benchmarks as is.
use crate::{
    classify::{classify, Class, Ipv4Meta},
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::WireguardConfig,
    snapshot::{InterfaceEntry, InterfaceRole, Snapshot},
    stages::{
        arp, decap, egress, encap, gateway, icmp_error,
        lb::{self, Lb, Origin},
        neighbor::ArpThrottle,
        route,
    },
    wire::{be16, ethernet, ipv4, udp, vxlan, Mac},
    wireguard::{self as wg, OpenError, OuterUdp},
    Ctx, TxKind, Verdict,
};

/// Where a frame handed to another worker goes on (see [`crate::handoff`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// From a pod, source checks passed: lb, then route.
    Pod,
    /// Decapsulated from another node, inner source checked: lb, then route.
    Overlay,
    /// Plain IPv4 from the uplink: lb, then route.
    Uplink,
}

/// Runs one frame received on `rx_ifindex` through the pipeline, rewriting it in place.
#[inline]
pub fn process_ctx(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx_ifindex: u32,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let Some(rx) = snap.interface(rx_ifindex) else {
        return Verdict::Drop(DropReason::UnknownInterface);
    };
    let class = match classify(pkt.data()) {
        Ok(c) => c,
        Err(reason) => return Verdict::Drop(reason),
    };
    match (rx.role, class) {
        (InterfaceRole::Uplink, Class::Ipv4(outer)) => from_uplink(ctx, snap, rx, &outer, pkt),
        (InterfaceRole::Uplink, Class::Arp(_)) => Verdict::Drop(DropReason::UplinkUnexpected),
        (InterfaceRole::Pod, Class::Arp(meta)) => arp::respond(snap, rx, &meta, pkt),
        (InterfaceRole::Pod, Class::Ipv4(meta)) => from_pod(ctx, snap, rx, &meta, pkt),
    }
}

/// Goes on with a frame another worker handed over at `resume` (its checks are done).
#[inline]
pub fn process_resumed(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx_ifindex: u32,
    resume: Resume,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let Some(rx) = snap.interface(rx_ifindex) else {
        return Verdict::Drop(DropReason::UnknownInterface);
    };
    let meta = match classify(pkt.data()) {
        Ok(Class::Ipv4(m)) => m,
        Ok(Class::Arp(_)) => return Verdict::Drop(DropReason::UnsupportedEthertype),
        Err(reason) => return Verdict::Drop(reason),
    };
    match resume {
        Resume::Pod => pod_lb_route(ctx, snap, rx, &meta, pkt, true),
        Resume::Overlay => overlay_lb_route(ctx, snap, rx, &meta, pkt, true),
        Resume::Uplink => uplink_lb_route(ctx, snap, rx, &meta, pkt, true),
    }
}

/// [`process_ctx`] without a batch clock, ARP memory or flow state (tests, benchmarks, pod-only
/// paths): an unresolved next hop then always sends an ARP request.
#[inline]
pub fn process(snap: &Snapshot, rx_ifindex: u32, pkt: &mut PacketBuf<'_>) -> Verdict {
    let mut arp = ArpThrottle::default();
    process_ctx(&mut Ctx::stateless(0, &mut arp), snap, rx_ifindex, pkt)
}

#[inline]
fn from_pod(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let src = meta.src;
    if src.is_multicast() || src.is_broadcast() || src.is_unspecified() || src.is_loopback() {
        return Verdict::Drop(DropReason::Ipv4BadSource);
    }
    // A pod may only send from its own address (anti-spoofing, as Cilium's source-IP
    // verification): later policy stages key on the source.
    if snap.endpoint(src).map(|e| e.ifindex) != Some(rx.ifindex) {
        return Verdict::Drop(DropReason::SourceNotOwned);
    }
    if meta.dst == snap.gateway() {
        return gateway::answer(rx, meta, pkt);
    }
    if meta.dst.is_multicast() || meta.dst.is_broadcast() {
        return Verdict::Drop(DropReason::Ipv4Multicast);
    }
    pod_lb_route(ctx, snap, rx, meta, pkt, false)
}

#[inline]
fn pod_lb_route(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    steered: bool,
) -> Verdict {
    let meta = match lb::run(ctx, snap, Origin::Pod, rx, meta, pkt, steered, Resume::Pod) {
        Lb::Continue(m) => m,
        Lb::Done(v) => return v,
    };
    route_after_lb(ctx, snap, &meta, pkt, Sender::Pod(rx))
}

/// Whether an outer packet on the uplink is VXLAN for this node (fragments of UDP to the node
/// count as VXLAN: they are dropped there as `vxlan_fragment`).
#[inline]
fn is_vxlan(snap: &Snapshot, outer: &Ipv4Meta, frame: &[u8]) -> bool {
    let Some(overlay) = snap.overlay() else {
        return false;
    };
    if outer.protocol != ipv4::PROTO_UDP || outer.dst != overlay.node_ip {
        return false;
    }
    outer.fragment || (frame.len() >= outer.l4 + 4 && be16(frame, outer.l4 + 2) == overlay.port)
}

#[inline]
fn from_uplink(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    outer: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    if let Some(wg) = snap.wireguard() {
        if is_wireguard(snap, wg, outer, pkt.data()) {
            return wg_in(ctx, snap, wg, rx, outer, pkt);
        }
        if wg.strict && wg.peer(outer.src).is_some() && is_vxlan(snap, outer, pkt.data()) {
            return Verdict::Drop(DropReason::WgCleartext);
        }
    }
    if is_vxlan(snap, outer, pkt.data()) || snap.overlay().is_none() {
        return from_overlay(ctx, snap, rx, outer, pkt);
    }
    uplink_lb_route(ctx, snap, rx, outer, pkt, false)
}

/// Plain IPv4 from outside the cluster that the uplink's XDP program claimed.
#[inline]
fn uplink_lb_route(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    steered: bool,
) -> Verdict {
    let meta = match lb::run(
        ctx,
        snap,
        Origin::Uplink,
        rx,
        meta,
        pkt,
        steered,
        Resume::Uplink,
    ) {
        Lb::Continue(m) => m,
        Lb::Done(v) => return v,
    };
    route_after_lb(
        ctx,
        snap,
        &meta,
        pkt,
        Sender::Outside {
            local_kind: TxKind::Forward,
        },
    )
}

/// Who sent the packet being routed: a pod on this node gets ICMP errors (time exceeded,
/// fragmentation needed) back; a packet from another node or from outside is dropped with the
/// reason instead (the error would have to cross the tunnel, or is not ours to send), and its
/// local delivery is counted as `local_kind`.
#[derive(Clone, Copy)]
enum Sender<'a> {
    Pod(&'a InterfaceEntry),
    Outside { local_kind: TxKind },
}

/// Routing after lb: to a local pod, to another node's pod CIDR or address (VXLAN, sealed in
/// WireGuard when there is a session), or out of the cluster on the uplink.
#[inline]
fn route_after_lb(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    sender: Sender<'_>,
) -> Verdict {
    let ttl_expired = |pkt: &mut PacketBuf<'_>| match sender {
        Sender::Pod(rx) => icmp_error::time_exceeded(snap.gateway(), rx, meta, pkt),
        Sender::Outside { .. } => Verdict::Drop(DropReason::TtlExceeded),
    };
    match route::forward(snap, meta, pkt) {
        Ok(Verdict::Tx {
            ifindex,
            kind: TxKind::Forward,
        }) => {
            let kind = match sender {
                Sender::Pod(_) => TxKind::Forward,
                Sender::Outside { local_kind } => local_kind,
            };
            return Verdict::Tx { ifindex, kind };
        }
        Ok(verdict) => return verdict,
        Err(route::NotForwarded::TtlExpired) => return ttl_expired(pkt),
        Err(route::NotForwarded::NotLocal) => {}
    }
    if let Some(overlay) = snap.overlay() {
        if let Some(remote) = snap.remote(meta.dst).or_else(|| snap.remote_node(meta.dst)) {
            if meta.ttl <= 1 {
                return ttl_expired(pkt);
            }
            let vtep = remote.vtep_ip;
            let rx = match sender {
                Sender::Pod(rx) => *rx,
                // The uplink is both rx and tx here.
                Sender::Outside { .. } => match snap.interface(overlay.uplink_ifindex) {
                    Some(u) => *u,
                    None => return Verdict::Drop(DropReason::NoTxPort),
                },
            };
            // Sealed in WireGuard the tunnel carries 60 bytes less (the pod MTU allows for it):
            // a bigger packet gets fragmentation-needed with that MTU, never a silent drop.
            if let Some(wgc) = snap.wireguard() {
                let mtu = overlay
                    .uplink_mtu
                    .saturating_sub((vxlan::OVERHEAD_BYTES + WG_OVERHEAD) as u16);
                let sealed = wgc.peer(vtep).is_some_and(|p| p.send.is_some());
                if sealed && meta.total_len > usize::from(mtu) {
                    return match sender {
                        Sender::Pod(rx) if meta.dont_fragment => {
                            icmp_error::fragmentation_needed(snap.gateway(), rx, meta, mtu, pkt)
                        }
                        _ => Verdict::Drop(DropReason::OversizeNoDf),
                    };
                }
            }
            return match encap::push(ctx, snap, overlay, remote, &rx, meta, pkt) {
                Verdict::Tx {
                    kind: TxKind::IcmpError,
                    ..
                } if matches!(sender, Sender::Outside { .. }) => {
                    Verdict::Drop(DropReason::OversizeNoDf)
                }
                v => wg_out(ctx, snap, vtep, pkt, v),
            };
        }
    }
    if snap.in_cluster(meta.dst) {
        return Verdict::Drop(DropReason::NoRoute);
    }
    match egress::send(ctx, snap, meta, pkt) {
        Ok(v) => v,
        Err(egress::NotSent::TtlExpired) => ttl_expired(pkt),
        Err(egress::NotSent::NoRoute) => Verdict::Drop(DropReason::NoRoute),
    }
}

/// A frame from another node: VXLAN to this node, delivered to a local pod.
#[inline]
fn from_overlay(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    outer: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let Some(overlay) = snap.overlay() else {
        return Verdict::Drop(DropReason::UplinkUnexpected);
    };
    if let Err(reason) = decap::pop(overlay, outer, pkt) {
        return Verdict::Drop(reason);
    }
    let inner = match classify(pkt.data()) {
        Ok(Class::Ipv4(m)) => m,
        Ok(Class::Arp(_))
        | Err(DropReason::Ipv6Unsupported)
        | Err(DropReason::UnsupportedEthertype) => {
            return Verdict::Drop(DropReason::VxlanInnerUnsupported)
        }
        Err(reason) => return Verdict::Drop(reason),
    };
    // The inner source must belong to the node that sent the packet: one of its pods, or the
    // node itself (NodePort traffic it SNATed to its address): a node can only speak for its
    // own pods.
    let sender_ok =
        inner.src == outer.src || snap.remote(inner.src).map(|r| r.vtep_ip) == Some(outer.src);
    if !sender_ok {
        return Verdict::Drop(DropReason::VxlanSourceMismatch);
    }
    overlay_lb_route(ctx, snap, rx, &inner, pkt, false)
}

#[inline]
fn overlay_lb_route(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    rx: &InterfaceEntry,
    inner: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    steered: bool,
) -> Verdict {
    let inner = match lb::run(
        ctx,
        snap,
        Origin::Overlay,
        rx,
        inner,
        pkt,
        steered,
        Resume::Overlay,
    ) {
        Lb::Continue(m) => m,
        Lb::Done(v) => return v,
    };
    // Without services, only local pods are reachable from the overlay (as before).
    if snap.services().is_empty() && snap.nat().is_none() {
        return match route::forward(snap, &inner, pkt) {
            Ok(Verdict::Tx {
                ifindex,
                kind: TxKind::Forward,
            }) => Verdict::Tx {
                ifindex,
                kind: TxKind::Decap,
            },
            Ok(verdict) => verdict,
            // An ICMP error would have to travel back through the tunnel: not sent (documented).
            Err(route::NotForwarded::TtlExpired) => Verdict::Drop(DropReason::TtlExceeded),
            Err(route::NotForwarded::NotLocal) => Verdict::Drop(DropReason::NoRoute),
        };
    }
    // Local pods, outside (replies of NodePort flows SNATed here), or back through the tunnel
    // (replies restored to a pod of another node that reached our NodePort).
    route_after_lb(
        ctx,
        snap,
        &inner,
        pkt,
        Sender::Outside {
            local_kind: TxKind::Decap,
        },
    )
}

/// Bytes WireGuard adds to a VXLAN packet (outer IPv4 + UDP, header, tag; padding stops at the
/// MTU).
const WG_OVERHEAD: usize = wg::OUTER_IPV4_UDP_LEN + wg::TRANSPORT_HEADER_LEN + wg::TAG_LEN;

/// Whether an outer packet on the uplink is a WireGuard transport message to this node.
#[inline]
fn is_wireguard(snap: &Snapshot, wg: &WireguardConfig, outer: &Ipv4Meta, frame: &[u8]) -> bool {
    let Some(overlay) = snap.overlay() else {
        return false;
    };
    outer.protocol == ipv4::PROTO_UDP
        && outer.dst == overlay.node_ip
        && !outer.fragment
        && frame.len() >= outer.l4 + udp::HEADER_LEN
        && be16(frame, outer.l4 + 2) == wg.port
}

/// Seals an encapsulated VXLAN packet (`v` is encap's verdict) for the peer node `to`, as
/// Cilium's WireGuard+VXLAN mode: the whole VXLAN IPv4 packet is the plaintext. Without a
/// session it goes in clear, or is dropped in strict mode.
#[inline]
fn wg_out(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    to: std::net::Ipv4Addr,
    pkt: &mut PacketBuf<'_>,
    v: Verdict,
) -> Verdict {
    let Verdict::Tx {
        ifindex,
        kind: TxKind::Encap,
    } = v
    else {
        return v;
    };
    let (Some(wgc), Some(overlay)) = (snap.wireguard(), snap.overlay()) else {
        return v;
    };
    let Some(peer) = wgc.peer(to) else {
        // Not a WireGuard peer (no key published): clear, unless strict.
        return if wgc.strict {
            Verdict::Drop(DropReason::WgNoSession)
        } else {
            v
        };
    };
    let Some(session) = peer.send.as_deref() else {
        return if wgc.strict {
            Verdict::Drop(DropReason::WgNoSession)
        } else {
            v
        };
    };
    // Plaintext bytes the uplink carries once sealed: its MTU minus outer IPv4/UDP, the
    // transport header and the tag. Padding stops at it (WireGuard's rule).
    let tunnel_mtu = usize::from(overlay.uplink_mtu)
        .saturating_sub(wg::OUTER_IPV4_UDP_LEN + wg::TRANSPORT_HEADER_LEN + wg::TAG_LEN);
    let plain_len = pkt.len().saturating_sub(ethernet::HEADER_LEN);
    if plain_len > tunnel_mtu {
        return Verdict::Drop(DropReason::WgTooBig);
    }
    let Some(flows) = ctx.flows.as_deref_mut() else {
        return Verdict::Drop(DropReason::NoFlowState);
    };
    let (dst_mac, src_mac) = {
        let d = pkt.data();
        let mut a = [0u8; 6];
        let mut b = [0u8; 6];
        a.copy_from_slice(&d[0..6]);
        b.copy_from_slice(&d[6..12]);
        (Mac(a), Mac(b))
    };
    if pkt.pull_front(ethernet::HEADER_LEN).is_err() {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    let slot = peer.id as usize % crate::stages::lb::WG_BLOCKS;
    if wg::seal_packet_within(
        session,
        &mut flows.wg_blocks[slot],
        pkt,
        tunnel_mtu,
        ctx.now_ns,
    )
    .is_err()
    {
        return Verdict::Drop(DropReason::WgSealFailed);
    }
    flows.wg_peers[slot][0] += 1;
    flows.wg_peers[slot][1] += pkt.len() as u64;
    let outer = OuterUdp {
        src: overlay.node_ip,
        dst: to,
        src_port: wgc.port,
        dst_port: wgc.port,
        ttl: 64,
    };
    if wg::push_outer_ipv4_udp(pkt, &outer).is_err()
        || pkt.push_front(ethernet::HEADER_LEN).is_err()
    {
        return Verdict::Drop(DropReason::WgSealFailed);
    }
    if ethernet::emit(pkt.data_mut(), dst_mac, src_mac, ethernet::ETHERTYPE_IPV4).is_err() {
        return Verdict::Drop(DropReason::WgSealFailed);
    }
    Verdict::Tx {
        ifindex,
        kind: TxKind::EncapEncrypted,
    }
}

/// Opens a WireGuard transport message from the uplink; its plaintext, a VXLAN packet from the
/// peer node, goes on through [`from_overlay`].
#[inline]
fn wg_in(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    wgc: &WireguardConfig,
    rx: &InterfaceEntry,
    outer: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let payload = outer.l4 + udp::HEADER_LEN;
    let end = outer.l3 + outer.total_len;
    if end < payload || end > pkt.len() {
        return Verdict::Drop(DropReason::WgMalformed);
    }
    if pkt.set_len(end).is_err() || pkt.pull_front(payload).is_err() {
        return Verdict::Drop(DropReason::WgMalformed);
    }
    let opened = match wg::open_packet(&wgc.sessions, pkt, ctx.now_ns) {
        Ok(o) => o,
        Err(e) => {
            return Verdict::Drop(match e {
                OpenError::Keepalive { .. } => DropReason::WgKeepalive,
                OpenError::Short
                | OpenError::BadType
                | OpenError::NotIpv4
                | OpenError::InnerLength => DropReason::WgMalformed,
                OpenError::UnknownReceiver
                | OpenError::SessionExpired
                | OpenError::CounterExhausted => DropReason::WgUnknownSession,
                OpenError::Replayed | OpenError::TooOld | OpenError::ReplayContended => {
                    DropReason::WgReplay
                }
                OpenError::AuthFailed => DropReason::WgAuthFailed,
            })
        }
    };
    if let Some(flows) = ctx.flows.as_deref_mut() {
        flows.wg_opened += 1;
        let slot = opened.peer as usize % crate::stages::lb::WG_BLOCKS;
        flows.wg_peers[slot][2] += 1;
        flows.wg_peers[slot][3] += opened.plaintext.len() as u64;
    }
    // The plaintext is an IPv4 packet from the peer node itself (its VXLAN outer header).
    let src = {
        let d = pkt.data();
        std::net::Ipv4Addr::new(d[12], d[13], d[14], d[15])
    };
    if wgc.peer_by_id(opened.peer).map(|p| p.node_ip) != Some(src) {
        return Verdict::Drop(DropReason::WgSourceMismatch);
    }
    if pkt.push_front(ethernet::HEADER_LEN).is_err()
        || ethernet::emit(
            pkt.data_mut(),
            rx.mac,
            outer.src_mac,
            ethernet::ETHERTYPE_IPV4,
        )
        .is_err()
    {
        return Verdict::Drop(DropReason::WgMalformed);
    }
    let inner_outer = match classify(pkt.data()) {
        Ok(Class::Ipv4(m)) => m,
        _ => return Verdict::Drop(DropReason::WgMalformed),
    };
    if !is_vxlan(snap, &inner_outer, pkt.data()) {
        return Verdict::Drop(DropReason::UplinkUnexpected);
    }
    from_overlay(ctx, snap, rx, &inner_outer, pkt)
}
