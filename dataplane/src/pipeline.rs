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
//!   classify (outer) -> decap::pop -> classify (inner) -> route::forward -> tx to the pod
//! ```
//! Later issues insert stages here (firewall before route, lb before route, encrypt after
//! encap, open before decap). Sans-IO: no sockets, no clock (the batch's time comes in `Ctx`),
//! no allocation; callable from tests and benchmarks as is.
use crate::{
    classify::{classify, Class, Ipv4Meta},
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::{InterfaceEntry, InterfaceRole, Snapshot},
    stages::{arp, decap, encap, gateway, icmp_error, neighbor::ArpThrottle, route},
    Ctx, TxKind, Verdict,
};

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
        (InterfaceRole::Uplink, Class::Ipv4(outer)) => from_overlay(snap, &outer, pkt),
        (InterfaceRole::Uplink, Class::Arp(_)) => Verdict::Drop(DropReason::UplinkUnexpected),
        (InterfaceRole::Pod, Class::Arp(meta)) => arp::respond(snap, rx, &meta, pkt),
        (InterfaceRole::Pod, Class::Ipv4(meta)) => from_pod(ctx, snap, rx, &meta, pkt),
    }
}

/// [`process_ctx`] without a batch clock or ARP memory (tests, benchmarks, pod-only paths):
/// an unresolved next hop then always sends an ARP request.
#[inline]
pub fn process(snap: &Snapshot, rx_ifindex: u32, pkt: &mut PacketBuf<'_>) -> Verdict {
    let mut arp = ArpThrottle::default();
    process_ctx(
        &mut Ctx {
            now_ns: 0,
            arp: &mut arp,
        },
        snap,
        rx_ifindex,
        pkt,
    )
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
    match route::forward(snap, meta, pkt) {
        Ok(verdict) => return verdict,
        Err(route::NotForwarded::TtlExpired) => {
            return icmp_error::time_exceeded(snap.gateway(), rx, meta, pkt)
        }
        Err(route::NotForwarded::NotLocal) => {}
    }
    if let (Some(overlay), Some(remote)) = (snap.overlay(), snap.remote(meta.dst)) {
        if meta.ttl <= 1 {
            return icmp_error::time_exceeded(snap.gateway(), rx, meta, pkt);
        }
        return encap::push(ctx, snap, overlay, remote, rx, meta, pkt);
    }
    Verdict::Drop(DropReason::NoRoute)
}

/// A frame from another node: VXLAN to this node, delivered to a local pod.
#[inline]
fn from_overlay(snap: &Snapshot, outer: &Ipv4Meta, pkt: &mut PacketBuf<'_>) -> Verdict {
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
    // The inner source must belong to the node that sent the packet: a node can only speak
    // for its own pods.
    if snap.remote(inner.src).map(|r| r.vtep_ip) != Some(outer.src) {
        return Verdict::Drop(DropReason::VxlanSourceMismatch);
    }
    match route::forward(snap, &inner, pkt) {
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
    }
}
