//! ARP responder for the pods' gateway address (RFC 826). Pods route everything to the
//! gateway; the dataplane answers for it with the MAC of the interface the request came in on
//! (the host side of the pod's veth), so no kernel neighbour state is involved.
use crate::{
    classify::ArpMeta,
    drop_reason::DropReason,
    packet::PacketBuf,
    snapshot::{InterfaceEntry, Snapshot},
    wire::{arp, ethernet},
    Verdict,
};

/// Answers an ARP request for the gateway in place; anything else is a counted drop.
#[inline]
pub fn respond(
    snap: &Snapshot,
    rx: &InterfaceEntry,
    meta: &ArpMeta,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    if meta.operation != arp::OP_REQUEST || meta.target_ip != snap.gateway() {
        return Verdict::Drop(DropReason::ArpNotForGateway);
    }
    let len = ethernet::HEADER_LEN + arp::PACKET_LEN;
    if pkt.set_len(len.max(pkt.len())).is_err() {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    let data = pkt.data_mut();
    let (eth, payload) = data.split_at_mut(ethernet::HEADER_LEN);
    if ethernet::emit(eth, meta.sender_mac, rx.mac, ethernet::ETHERTYPE_ARP).is_err()
        || arp::emit(
            payload,
            arp::OP_REPLY,
            rx.mac,
            meta.target_ip,
            meta.sender_mac,
            meta.sender_ip,
        )
        .is_err()
    {
        return Verdict::Drop(DropReason::FrameTooShort);
    }
    Verdict::Tx {
        ifindex: rx.ifindex,
        kind: TxKind::ArpReply,
    }
}

use crate::TxKind;
