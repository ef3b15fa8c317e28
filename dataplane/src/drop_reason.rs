//! The one list of reasons a packet is dropped. Numbers are stable: metrics, flow logs and the
//! CLI all use them (as Cilium's `bpf/lib/drop_reasons.h`). Append new reasons at the end; never
//! renumber or reuse a number.
use serde::Serialize;

/// Why a packet was dropped. `#[repr(u8)]`, numbered, stable.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DropReason {
    /// Shorter than an Ethernet header, or shorter than its own headers claim.
    FrameTooShort = 1,
    /// An ethertype the dataplane does not handle (not IPv4, not ARP, not IPv6).
    UnsupportedEthertype = 2,
    /// IPv6 is not handled yet.
    Ipv6Unsupported = 3,
    /// ARP that is not Ethernet/IPv4 or is truncated.
    ArpMalformed = 4,
    /// ARP that is not a request for the gateway address (replies, other targets).
    ArpNotForGateway = 5,
    /// IPv4 header with a bad version, IHL or total length.
    Ipv4Malformed = 6,
    /// IPv4 header checksum does not verify.
    Ipv4Checksum = 7,
    /// TTL expired and no ICMP error may be sent about this packet (RFC 1122 3.2.2).
    TtlExceeded = 8,
    /// No local endpoint (and, for now, no other route) for the destination.
    NoRoute = 9,
    /// The destination interface has no AF_XDP socket on this worker.
    NoTxPort = 10,
    /// The destination socket's TX ring was full.
    TxRingFull = 11,
    /// The worker has no snapshot yet.
    NoSnapshot = 12,
    /// Addressed to the gateway itself with something other than ARP or ICMP echo.
    GatewayUnhandled = 13,
    /// Frame from an interface the snapshot does not know.
    UnknownInterface = 14,
    /// Source address is not valid for a sender (multicast, broadcast, zero, loopback).
    Ipv4BadSource = 15,
    /// Destination is a multicast or broadcast address (not forwarded).
    Ipv4Multicast = 16,
    /// A pod sent from an address that is not its own (spoofing; policy would be bypassable).
    SourceNotOwned = 17,
    /// VXLAN packet with a bad UDP length, truncated header or inner frame.
    VxlanMalformed = 18,
    /// VXLAN packet for a VNI this node does not use.
    VxlanBadVni = 19,
    /// Fragmented outer packet (the dataplane does not reassemble; pod MTU prevents them).
    VxlanFragment = 20,
    /// Something on the uplink that is not VXLAN for this node, a service frontend or a reply
    /// of a translated flow reached the dataplane.
    UplinkUnexpected = 21,
    /// The next hop's MAC is unknown: an ARP request went out instead (rate limited).
    NeighborUnresolved = 22,
    /// Too big for the uplink after encapsulation and DF clear: not fragmented, dropped (with
    /// DF set the sender gets ICMP fragmentation-needed instead). Pod MTU prevents both.
    OversizeNoDf = 23,
    /// The frame inside VXLAN is not IPv4 (inner ARP/IPv6 are not carried).
    VxlanInnerUnsupported = 24,
    /// The inner source is not in the pod CIDR of the node the VXLAN packet came from
    /// (spoofing across nodes, or an unknown node).
    VxlanSourceMismatch = 25,
    /// A service port without any backend: the sender got a TCP RST or ICMP port unreachable
    /// (kube-proxy's reject rule).
    ServiceNoBackend = 26,
    /// A Local traffic policy (external or internal) and no backend on this node: dropped, as
    /// kube-proxy does.
    ServiceNoLocalBackend = 27,
    /// To a service address on a port or protocol no service port has: rejected (TCP RST or ICMP
    /// port unreachable, as kube-proxy's nftables mode), or dropped for other protocols.
    ServiceUnknownPort = 28,
    /// A fragment to a service address or of a translated flow: the dataplane does not reassemble,
    /// so it cannot translate fragments.
    ServiceFragment = 29,
    /// No free source port for SNAT (masquerade, NodePort, hairpin) after the bounded search.
    NatPortExhausted = 30,
    /// The owning worker's handoff ring was full (it is not keeping up).
    HandoffFull = 31,
    /// Frame larger than a handoff slot.
    HandoffTooBig = 32,
    /// A packet that needs connection tracking reached a pipeline without flow state (tests).
    NoFlowState = 33,
    /// Strict WireGuard mode and no session with the destination node yet: not sent in clear.
    WgNoSession = 34,
    /// A WireGuard transport message that is truncated, of another type, or whose plaintext is
    /// not the IPv4 packet it should be.
    WgMalformed = 35,
    /// A WireGuard message for a session this node does not have (unknown receiver index,
    /// expired, or past its message limit).
    WgUnknownSession = 36,
    /// A WireGuard counter already received or behind the replay window.
    WgReplay = 37,
    /// A WireGuard message that fails authentication (wrong key, corrupted or forged).
    WgAuthFailed = 38,
    /// A WireGuard keepalive (authentic, empty): consumed, nothing to forward.
    WgKeepalive = 39,
    /// A decrypted packet whose source is not the address of the peer whose session opened it.
    WgSourceMismatch = 40,
    /// Strict WireGuard mode: VXLAN in clear from a node that is a WireGuard peer.
    WgCleartext = 41,
    /// A packet could not be sealed (no room in the frame, or the session ran out of counters).
    WgSealFailed = 42,
    /// Too big for the uplink once encrypted (the pod MTU leaves room; not fragmented).
    WgTooBig = 43,
    /// Denied by the ingress NetworkPolicies of the destination pod (it is isolated for ingress
    /// and no rule allows the flow), or an established flow cut after a policy change.
    PolicyDeniedIngress = 44,
    /// Denied by the egress NetworkPolicies of the source pod (same rules, other direction).
    PolicyDeniedEgress = 45,
    /// Denied by the host policies of this node (host firewall).
    HostPolicyDenied = 46,
}

impl DropReason {
    /// Every reason, in number order (metrics export all of them, even at zero).
    pub const ALL: [DropReason; 46] = [
        DropReason::FrameTooShort,
        DropReason::UnsupportedEthertype,
        DropReason::Ipv6Unsupported,
        DropReason::ArpMalformed,
        DropReason::ArpNotForGateway,
        DropReason::Ipv4Malformed,
        DropReason::Ipv4Checksum,
        DropReason::TtlExceeded,
        DropReason::NoRoute,
        DropReason::NoTxPort,
        DropReason::TxRingFull,
        DropReason::NoSnapshot,
        DropReason::GatewayUnhandled,
        DropReason::UnknownInterface,
        DropReason::Ipv4BadSource,
        DropReason::Ipv4Multicast,
        DropReason::SourceNotOwned,
        DropReason::VxlanMalformed,
        DropReason::VxlanBadVni,
        DropReason::VxlanFragment,
        DropReason::UplinkUnexpected,
        DropReason::NeighborUnresolved,
        DropReason::OversizeNoDf,
        DropReason::VxlanInnerUnsupported,
        DropReason::VxlanSourceMismatch,
        DropReason::ServiceNoBackend,
        DropReason::ServiceNoLocalBackend,
        DropReason::ServiceUnknownPort,
        DropReason::ServiceFragment,
        DropReason::NatPortExhausted,
        DropReason::HandoffFull,
        DropReason::HandoffTooBig,
        DropReason::NoFlowState,
        DropReason::WgNoSession,
        DropReason::WgMalformed,
        DropReason::WgUnknownSession,
        DropReason::WgReplay,
        DropReason::WgAuthFailed,
        DropReason::WgKeepalive,
        DropReason::WgSourceMismatch,
        DropReason::WgCleartext,
        DropReason::WgSealFailed,
        DropReason::WgTooBig,
        DropReason::PolicyDeniedIngress,
        DropReason::PolicyDeniedEgress,
        DropReason::HostPolicyDenied,
    ];
    /// Size of a counter array indexed by `reason as usize` (index 0 unused).
    pub const SLOTS: usize = 47;

    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::FrameTooShort => "frame_too_short",
            DropReason::UnsupportedEthertype => "unsupported_ethertype",
            DropReason::Ipv6Unsupported => "ipv6_unsupported",
            DropReason::ArpMalformed => "arp_malformed",
            DropReason::ArpNotForGateway => "arp_not_for_gateway",
            DropReason::Ipv4Malformed => "ipv4_malformed",
            DropReason::Ipv4Checksum => "ipv4_checksum",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NoRoute => "no_route",
            DropReason::NoTxPort => "no_tx_port",
            DropReason::TxRingFull => "tx_ring_full",
            DropReason::NoSnapshot => "no_snapshot",
            DropReason::GatewayUnhandled => "gateway_unhandled",
            DropReason::UnknownInterface => "unknown_interface",
            DropReason::Ipv4BadSource => "ipv4_bad_source",
            DropReason::Ipv4Multicast => "ipv4_multicast",
            DropReason::SourceNotOwned => "source_not_owned",
            DropReason::VxlanMalformed => "vxlan_malformed",
            DropReason::VxlanBadVni => "vxlan_bad_vni",
            DropReason::VxlanFragment => "vxlan_fragment",
            DropReason::UplinkUnexpected => "uplink_unexpected",
            DropReason::NeighborUnresolved => "neighbor_unresolved",
            DropReason::OversizeNoDf => "oversize_no_df",
            DropReason::VxlanInnerUnsupported => "vxlan_inner_unsupported",
            DropReason::VxlanSourceMismatch => "vxlan_source_mismatch",
            DropReason::ServiceNoBackend => "service_no_backend",
            DropReason::ServiceNoLocalBackend => "service_no_local_backend",
            DropReason::ServiceUnknownPort => "service_unknown_port",
            DropReason::ServiceFragment => "service_fragment",
            DropReason::NatPortExhausted => "nat_port_exhausted",
            DropReason::HandoffFull => "handoff_full",
            DropReason::HandoffTooBig => "handoff_too_big",
            DropReason::NoFlowState => "no_flow_state",
            DropReason::WgNoSession => "wg_no_session",
            DropReason::WgMalformed => "wg_malformed",
            DropReason::WgUnknownSession => "wg_unknown_session",
            DropReason::WgReplay => "wg_replay",
            DropReason::WgAuthFailed => "wg_auth_failed",
            DropReason::WgKeepalive => "wg_keepalive",
            DropReason::WgSourceMismatch => "wg_source_mismatch",
            DropReason::WgCleartext => "wg_cleartext",
            DropReason::WgSealFailed => "wg_seal_failed",
            DropReason::WgTooBig => "wg_too_big",
            DropReason::PolicyDeniedIngress => "policy_denied_ingress",
            DropReason::PolicyDeniedEgress => "policy_denied_egress",
            DropReason::HostPolicyDenied => "host_policy_denied",
        }
    }

    pub fn from_u8(n: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| *r as u8 == n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_stable_and_names_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i + 1, "{r:?} out of order");
            assert_eq!(DropReason::from_u8(*r as u8), Some(*r));
        }
        assert_eq!(DropReason::SLOTS, DropReason::ALL.len() + 1);
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        assert_eq!(DropReason::from_u8(0), None);
        // Pinned numbers: changing one breaks dashboards and flow logs.
        assert_eq!(DropReason::NoRoute as u8, 9);
        assert_eq!(DropReason::Ipv6Unsupported as u8, 3);
    }
}
