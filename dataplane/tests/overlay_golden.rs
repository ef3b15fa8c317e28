//! Golden fixtures for the overlay: encapsulation on the sending node, decapsulation on the
//! receiving one, neighbour resolution, MTU handling, and every malformed VXLAN case.
mod common;

use common::*;
use dataplane::{
    packet::PacketBuf,
    pipeline::{process, process_ctx},
    stages::{encap::derived_vtep_mac, neighbor::ArpThrottle},
    wire::{checksum, Mac},
    Ctx, DropReason, TxKind, Verdict,
};

fn run_on(snap: &dataplane::snapshot::Snapshot, rx: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = chunk_with(frame);
    let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
    let v = process(snap, rx, &mut pkt);
    (v, pkt.data().to_vec())
}

fn remote_udp() -> (Vec<u8>, Vec<u8>) {
    let l4 = udp(5000, 80, b"hello over vxlan");
    (from_a(REMOTE_POD, 17, 64, &l4), l4)
}

#[test]
fn pod_to_remote_pod_is_encapsulated_byte_for_byte() {
    let (input, l4) = remote_udp();
    let (v, out) = run_on(&node1(true), IF_A, &input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_UPLINK,
            kind: TxKind::Encap
        }
    );
    assert_eq!(out.len(), input.len() + 50);
    // Outer Ethernet: to node 2's uplink MAC, from ours.
    assert_eq!(&out[0..6], &PEER_UPLINK_MAC.0);
    assert_eq!(&out[6..12], &UPLINK_MAC.0);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    // Outer IPv4: 20 bytes, DF, ID 0, TTL 64, UDP, 172.18.0.11 -> 172.18.0.12, checksum valid.
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
    assert_eq!(&ip[4..8], &[0, 0, 0x40, 0]);
    assert_eq!((ip[8], ip[9]), (64, 17));
    assert_eq!(&ip[12..16], &NODE_IP.octets());
    assert_eq!(&ip[16..20], &PEER_IP.octets());
    assert!(checksum::verify(ip));
    // Outer UDP: ephemeral source port, 8472, length, checksum 0.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!((32768..=60999).contains(&sport), "source port {sport}");
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), VXLAN_PORT);
    assert_eq!(
        u16::from_be_bytes([out[38], out[39]]) as usize,
        out.len() - 34
    );
    assert_eq!(&out[40..42], &[0, 0]);
    // VXLAN: I flag, VNI 1.
    assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
    // Inner: VTEP MACs, TTL decremented once, the rest untouched.
    let mut inner = eth(derived_vtep_mac(PEER_IP), derived_vtep_mac(NODE_IP), 0x0800);
    inner.extend(ipv4(POD_A, REMOTE_POD, 17, 63, l4.len()));
    inner.extend_from_slice(&l4);
    assert_eq!(&out[50..], &inner[..]);
}

#[test]
fn source_port_follows_the_inner_flow() {
    let sport = |sp: u16| {
        let (_, out) = run_on(
            &node1(true),
            IF_A,
            &from_a(REMOTE_POD, 17, 64, &udp(sp, 80, b"x")),
        );
        u16::from_be_bytes([out[34], out[35]])
    };
    assert_eq!(sport(1000), sport(1000), "one flow, one outer port");
    let distinct: std::collections::BTreeSet<u16> = (1000..1064).map(sport).collect();
    assert!(
        distinct.len() > 48,
        "64 flows spread over only {} source ports",
        distinct.len()
    );
}

#[test]
fn encapsulated_frame_is_delivered_on_the_other_node() {
    let (input, l4) = remote_udp();
    let (_, wire) = run_on(&node1(true), IF_A, &input);
    let (v, out) = run_on(&node2(), IF_UPLINK, &wire);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Decap
        }
    );
    let mut expected = eth(POD_B_MAC, LXC_B_MAC, 0x0800);
    expected.extend(ipv4(POD_A, REMOTE_POD, 17, 62, l4.len()));
    expected.extend_from_slice(&l4);
    assert_eq!(
        out, expected,
        "inner packet, TTL decremented on each node, delivered to the pod"
    );
}

#[test]
fn kernel_style_vxlan_with_padding_and_any_inner_mac_is_accepted() {
    // As a Linux vxlan device sends it: inner destination MAC of our choosing, outer padding.
    let l4 = udp(7, 9, b"k");
    let mut inner = eth(Mac([0x0a, 0x58, 1, 2, 3, 4]), Mac([0xee; 6]), 0x0800);
    inner.extend(ipv4(POD_A, REMOTE_POD, 17, 64, l4.len()));
    inner.extend_from_slice(&l4);
    let mut wire = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &inner);
    wire.resize(wire.len() + 6, 0);
    let (v, out) = run_on(&node2(), IF_UPLINK, &wire);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Decap
        }
    );
    assert_eq!(
        out.len(),
        inner.len(),
        "outer padding not carried into the inner frame"
    );
}

#[test]
fn malformed_vxlan_has_its_drop_reason() {
    let (input, _) = remote_udp();
    let inner = &input[..];
    let bad = |frame: Vec<u8>| match run_on(&node2(), IF_UPLINK, &frame).0 {
        Verdict::Drop(r) => r,
        v => panic!("expected a drop, got {v:?}"),
    };
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, 99, inner)),
        DropReason::VxlanBadVni
    );
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x00, VNI, inner)),
        DropReason::VxlanMalformed
    );
    assert_eq!(
        bad(vxlan_frame(PEER_IP, 4789, 0x08, VNI, inner)),
        DropReason::UplinkUnexpected
    );
    assert_eq!(
        bad(vxlan_frame(NODE_IP, VXLAN_PORT, 0x08, VNI, inner)),
        DropReason::UplinkUnexpected
    );
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &inner[..10])),
        DropReason::VxlanMalformed
    );
    // UDP length beyond the IP payload.
    let mut long = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, inner);
    long[38] = 0xff;
    assert_eq!(bad(long), DropReason::VxlanMalformed);
    // Outer fragment (MF set).
    let mut frag = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, inner);
    frag[20] = 0x20;
    frag[24] = 0;
    frag[25] = 0;
    let c = checksum::checksum(&frag[14..34]);
    frag[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(bad(frag), DropReason::VxlanFragment);
    // Inner ARP and inner IPv6 are not carried.
    let arp_inner = arp(1, POD_A_MAC, POD_A, Mac([0; 6]), REMOTE_POD);
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &arp_inner)),
        DropReason::VxlanInnerUnsupported
    );
    let mut v6 = eth(POD_B_MAC, POD_A_MAC, 0x86dd);
    v6.resize(60, 0);
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &v6)),
        DropReason::VxlanInnerUnsupported
    );
    // Inner destination that is not a pod here.
    let stray = from_a(
        std::net::Ipv4Addr::new(10, 244, 2, 99),
        17,
        64,
        &udp(1, 2, b"?"),
    );
    assert_eq!(
        bad(vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &stray)),
        DropReason::NoRoute
    );
    // Non-UDP to the node on the uplink, and ARP that reached the dataplane.
    assert_eq!(
        bad(from_a(PEER_IP, 6, 64, &[0u8; 20])),
        DropReason::UplinkUnexpected
    );
    assert_eq!(
        bad(arp(1, UPLINK_MAC, NODE_IP, Mac([0; 6]), PEER_IP)),
        DropReason::UplinkUnexpected
    );
}

#[test]
fn a_node_may_only_speak_for_its_own_pods() {
    let (input, _) = remote_udp();
    // Right inner source (node 1's pod), but the outer source is another host.
    let mut wire = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &input);
    wire[26..30].copy_from_slice(&[172, 18, 0, 99]);
    wire[24] = 0;
    wire[25] = 0;
    let c = checksum::checksum(&wire[14..34]);
    wire[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        run_on(&node2(), IF_UPLINK, &wire).0,
        Verdict::Drop(DropReason::VxlanSourceMismatch)
    );
    // Right outer source, inner source outside node 1's pod CIDR.
    let mut stranger = eth(POD_B_MAC, POD_A_MAC, 0x0800);
    let l4 = udp(1, 2, b"x");
    stranger.extend(ipv4(
        std::net::Ipv4Addr::new(10, 9, 0, 1),
        REMOTE_POD,
        17,
        64,
        l4.len(),
    ));
    stranger.extend_from_slice(&l4);
    let wire = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &stranger);
    assert_eq!(
        run_on(&node2(), IF_UPLINK, &wire).0,
        Verdict::Drop(DropReason::VxlanSourceMismatch)
    );
}

#[test]
fn unresolved_next_hop_sends_one_arp_request_per_interval() {
    let snap = node1(false);
    let (input, _) = remote_udp();
    let mut arp_mem = ArpThrottle::default();
    let mut run = |now_ns: u64| {
        let mut buf = chunk_with(&input);
        let mut pkt = PacketBuf::new(&mut buf, HEADROOM, input.len()).expect("fits");
        let v = process_ctx(
            &mut Ctx::stateless(now_ns, &mut arp_mem),
            &snap,
            IF_A,
            &mut pkt,
        );
        (v, pkt.data().to_vec())
    };
    let (v, out) = run(1_000_000_000);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_UPLINK,
            kind: TxKind::ArpRequest
        }
    );
    let expected = {
        let mut f = arp(1, UPLINK_MAC, NODE_IP, Mac([0; 6]), PEER_IP);
        f[0..6].copy_from_slice(&Mac::BROADCAST.0);
        f
    };
    assert_eq!(out, expected);
    assert_eq!(
        run(1_050_000_000).0,
        Verdict::Drop(DropReason::NeighborUnresolved),
        "throttled"
    );
    assert_eq!(
        run(1_100_000_000).0,
        Verdict::Tx {
            ifindex: IF_UPLINK,
            kind: TxKind::ArpRequest
        }
    );
}

#[test]
fn too_big_for_the_overlay_gets_fragmentation_needed_or_a_counted_drop() {
    // 1500-byte uplink: inner IP packets above 1450 bytes do not fit.
    let l4 = udp(1, 2, &vec![0u8; 1450 - 20 - 8 + 1]);
    let with_df = from_a(REMOTE_POD, 17, 64, &l4); // our builder sets DF
    let (v, out) = run_on(&node1(true), IF_A, &with_df);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::IcmpError
        }
    );
    assert_eq!(
        (out[34], out[35]),
        (3, 4),
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(
        u16::from_be_bytes([out[40], out[41]]),
        1450,
        "next-hop MTU (RFC 1191)"
    );
    assert_eq!(&out[30..34], &POD_A.octets());
    assert!(checksum::verify(&out[34..]));
    let mut no_df = with_df.clone();
    no_df[20] = 0;
    let c = checksum::checksum(&{
        let mut h = no_df[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    no_df[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        run_on(&node1(true), IF_A, &no_df).0,
        Verdict::Drop(DropReason::OversizeNoDf)
    );
    // Exactly at the limit fits.
    let fits = from_a(REMOTE_POD, 17, 64, &udp(1, 2, &vec![0u8; 1450 - 28]));
    assert_eq!(
        run_on(&node1(true), IF_A, &fits).0,
        Verdict::Tx {
            ifindex: IF_UPLINK,
            kind: TxKind::Encap
        }
    );
}

#[test]
fn ttl_one_to_a_remote_pod_expires_here() {
    let (v, out) = run_on(
        &node1(true),
        IF_A,
        &from_a(REMOTE_POD, 17, 1, &udp(1, 2, b"t")),
    );
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::IcmpError
        }
    );
    assert_eq!(out[34], 11);
}

#[test]
fn no_overlay_means_no_route() {
    assert_eq!(
        run_on(&two_pods(), IF_A, &remote_udp().0).0,
        Verdict::Drop(DropReason::NoRoute)
    );
}
