//! The one place that writes the stage order. Per frame:
//!
//! ```text
//! rx (interface known?) -> classify -> ARP?  -> arp::respond           -> tx back out rx
//!                                   -> IPv4: source sane? -> to gateway?  -> gateway::answer
//!                                            -> route::forward -> TTL expired? -> icmp_error::time_exceeded
//!                                                              -> tx to the destination pod
//! ```
//! Later issues insert stages here (firewall before route, lb/encap/encrypt after it).
//! Sans-IO: no sockets, no clock, no allocation; callable from tests and benchmarks as is.
use crate::{
    classify::{classify, Class},
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::{InterfaceRole, Snapshot},
    stages::{arp, gateway, icmp_error, route},
    Verdict,
};

/// Runs one frame received on `rx_ifindex` through the pipeline, rewriting it in place.
#[inline]
pub fn process(snap: &Snapshot, rx_ifindex: u32, pkt: &mut PacketBuf<'_>) -> Verdict {
    let Some(rx) = snap.interface(rx_ifindex) else {
        return Verdict::Drop(DropReason::UnknownInterface);
    };
    let class = match classify(pkt.data()) {
        Ok(c) => c,
        Err(reason) => return Verdict::Drop(reason),
    };
    match class {
        Class::Arp(meta) => arp::respond(snap, rx, &meta, pkt),
        Class::Ipv4(meta) => {
            let src = meta.src;
            if src.is_multicast() || src.is_broadcast() || src.is_unspecified() || src.is_loopback()
            {
                return Verdict::Drop(DropReason::Ipv4BadSource);
            }
            // A pod may only send from its own address (anti-spoofing, as Cilium's
            // source-IP verification): later policy stages key on the source.
            if rx.role == InterfaceRole::Pod
                && snap.endpoint(src).map(|e| e.ifindex) != Some(rx.ifindex)
            {
                return Verdict::Drop(DropReason::SourceNotOwned);
            }
            if meta.dst == snap.gateway() {
                return gateway::answer(rx, &meta, pkt);
            }
            if meta.dst.is_multicast() || meta.dst.is_broadcast() {
                return Verdict::Drop(DropReason::Ipv4Multicast);
            }
            match route::forward(snap, &meta, pkt) {
                Ok(verdict) => verdict,
                Err(route::TtlExpired) => icmp_error::time_exceeded(snap.gateway(), rx, &meta, pkt),
            }
        }
    }
}
