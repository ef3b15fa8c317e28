//! Golden fixtures through the whole pipeline (no root, no I/O): for each case a snapshot, an
//! input frame on an interface, the expected verdict and, when transmitted, the expected output
//! frame byte for byte (katran `lib/testing/`, cilium `bpf/tests/` style).
mod common;

use common::*;
use dataplane::{
    packet::PacketBuf,
    pipeline::process,
    wire::{checksum, Mac},
    DropReason, TxKind, Verdict,
};

/// Runs `frame` received on `rx` and returns the verdict and the output bytes.
fn run(rx: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let snap = two_pods();
    let mut buf = chunk_with(frame);
    let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
    let v = process(&snap, rx, &mut pkt);
    (v, pkt.data().to_vec())
}

fn drop_of(rx: u32, frame: &[u8]) -> DropReason {
    match run(rx, frame).0 {
        Verdict::Drop(r) => r,
        v => panic!("expected a drop, got {v:?}"),
    }
}

#[test]
fn arp_request_for_gateway_is_answered_with_the_rx_interface_mac() {
    let req = arp(1, POD_A_MAC, POD_A, Mac([0; 6]), GATEWAY);
    let (v, out) = run(IF_A, &req);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::ArpReply
        }
    );
    #[rustfmt::skip]
    let expected: [u8; 42] = [
        // Ethernet: to pod A, from lxc A, ARP
        0x0a, 0, 0, 0, 0xa, 0x2,  0x02, 0, 0, 0, 0xa, 0x1,  0x08, 0x06,
        // ARP reply: Ethernet/IPv4, op 2
        0, 1, 8, 0, 6, 4, 0, 2,
        // sender: lxc A MAC, gateway 10.244.1.1
        0x02, 0, 0, 0, 0xa, 0x1,  10, 244, 1, 1,
        // target: pod A MAC, 10.244.1.2
        0x0a, 0, 0, 0, 0xa, 0x2,  10, 244, 1, 2,
    ];
    assert_eq!(out, expected);
}

#[test]
fn arp_padded_to_60_bytes_keeps_its_length() {
    let mut req = arp(1, POD_B_MAC, POD_B, Mac([0; 6]), GATEWAY);
    req.resize(60, 0);
    let (v, out) = run(IF_B, &req);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::ArpReply
        }
    );
    assert_eq!(out.len(), 60);
    assert_eq!(&out[22..28], &LXC_B_MAC.0);
}

#[test]
fn arp_other_than_request_for_gateway_is_dropped() {
    assert_eq!(
        drop_of(IF_A, &arp(1, POD_A_MAC, POD_A, Mac([0; 6]), POD_B)),
        DropReason::ArpNotForGateway
    );
    assert_eq!(
        drop_of(IF_A, &arp(2, POD_A_MAC, POD_A, LXC_A_MAC, GATEWAY)),
        DropReason::ArpNotForGateway
    );
    let mut bad = arp(1, POD_A_MAC, POD_A, Mac([0; 6]), GATEWAY);
    bad[14 + 4] = 8; // hlen 8
    assert_eq!(drop_of(IF_A, &bad), DropReason::ArpMalformed);
    assert_eq!(drop_of(IF_A, &bad[..30]), DropReason::ArpMalformed);
}

#[test]
fn pod_to_pod_rewrites_macs_and_decrements_ttl_only() {
    let l4 = icmp_echo(0x77, 1, b"abcdefgh");
    let input = from_a(POD_B, 1, 64, &l4);
    let (v, out) = run(IF_A, &input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Forward
        }
    );
    let mut expected = eth(POD_B_MAC, LXC_B_MAC, 0x0800);
    expected.extend(ipv4(POD_A, POD_B, 1, 63, l4.len()));
    expected.extend_from_slice(&l4);
    assert_eq!(out, expected, "only MACs, TTL and IP checksum may change");
    assert!(checksum::verify(&out[14..34]));
}

#[test]
fn ethernet_padding_is_carried_not_misread() {
    let l4 = udp(1000, 2000, b"hi");
    let mut input = from_a(POD_B, 17, 64, &l4);
    input.resize(60, 0); // minimum Ethernet frame: IP total length 30 < 46 bytes of payload
    let (v, out) = run(IF_A, &input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Forward
        }
    );
    assert_eq!(out.len(), 60);
    assert_eq!(out[14 + 8], 63);
}

#[test]
fn ttl_expiry_answers_icmp_time_exceeded_quoting_header_and_8_bytes() {
    let l4 = udp(5353, 53, b"0123456789");
    let input = from_a(POD_B, 17, 1, &l4);
    let (v, out) = run(IF_A, &input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::IcmpError
        }
    );
    let quoted = [&input[14..34], &l4[..8]].concat();
    let mut icmp = vec![11, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let c = checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut expected = eth(POD_A_MAC, LXC_A_MAC, 0x0800);
    let mut ip = ipv4(GATEWAY, POD_A, 1, 64, icmp.len());
    // Our emitter writes id 0 and no DF; rebuild the expected header the same way.
    ip[4..8].copy_from_slice(&[0, 0, 0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    expected.extend(ip);
    expected.extend(icmp);
    assert_eq!(out, expected);
    assert!(checksum::verify(&out[34..]));
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    let mut err = vec![3, 1, 0, 0, 0, 0, 0, 0];
    err.extend_from_slice(&[0u8; 28]);
    let c = checksum::checksum(&err);
    err[2..4].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        drop_of(IF_A, &from_a(POD_B, 1, 1, &err)),
        DropReason::TtlExceeded
    );
}

#[test]
fn ping_to_the_gateway_is_answered() {
    let l4 = icmp_echo(9, 3, b"payload!");
    let input = from_a(GATEWAY, 1, 64, &l4);
    let (v, out) = run(IF_A, &input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::GatewayEcho
        }
    );
    assert_eq!(&out[0..6], &POD_A_MAC.0);
    assert_eq!(&out[6..12], &LXC_A_MAC.0);
    assert_eq!(&out[26..30], &GATEWAY.octets());
    assert_eq!(&out[30..34], &POD_A.octets());
    assert_eq!(out[34], 0, "echo reply");
    assert_eq!(&out[38..], &l4[4..], "id, seq and data echoed");
    assert!(checksum::verify(&out[14..34]), "IP checksum");
    assert!(checksum::verify(&out[34..]), "ICMP checksum");
}

#[test]
fn every_unhandled_case_has_its_drop_reason() {
    let udp_b = udp(1, 2, b"x");
    let cases: Vec<(&str, u32, Vec<u8>, DropReason)> = vec![
        ("runt", IF_A, vec![0u8; 10], DropReason::FrameTooShort),
        (
            "ipv6",
            IF_A,
            {
                let mut f = eth(LXC_A_MAC, POD_A_MAC, 0x86dd);
                f.resize(60, 0);
                f
            },
            DropReason::Ipv6Unsupported,
        ),
        (
            "lldp",
            IF_A,
            {
                let mut f = eth(LXC_A_MAC, POD_A_MAC, 0x88cc);
                f.resize(60, 0);
                f
            },
            DropReason::UnsupportedEthertype,
        ),
        (
            "tcp to gateway",
            IF_A,
            from_a(GATEWAY, 6, 64, &[0u8; 20]),
            DropReason::GatewayUnhandled,
        ),
        (
            "unknown destination",
            IF_A,
            from_a("10.9.9.9".parse().unwrap(), 17, 64, &udp_b),
            DropReason::NoRoute,
        ),
        (
            "multicast destination",
            IF_A,
            from_a("224.0.0.251".parse().unwrap(), 17, 64, &udp_b),
            DropReason::Ipv4Multicast,
        ),
        (
            "broadcast destination",
            IF_A,
            from_a("255.255.255.255".parse().unwrap(), 17, 64, &udp_b),
            DropReason::Ipv4Multicast,
        ),
        (
            "unknown interface",
            4242,
            from_a(POD_B, 17, 64, &udp_b),
            DropReason::UnknownInterface,
        ),
    ];
    for (name, rx, frame, reason) in cases {
        assert_eq!(drop_of(rx, &frame), reason, "{name}");
    }
}

#[test]
fn a_pod_may_only_send_from_its_own_address() {
    // Pod A claiming pod B's address, and an address of nobody.
    let mut spoofed = eth(LXC_A_MAC, POD_A_MAC, 0x0800);
    let l4 = udp(1, 2, b"spoof");
    spoofed.extend(ipv4(POD_B, POD_B, 17, 64, l4.len()));
    spoofed.extend_from_slice(&l4);
    assert_eq!(drop_of(IF_A, &spoofed), DropReason::SourceNotOwned);
    let mut stranger = eth(LXC_A_MAC, POD_A_MAC, 0x0800);
    stranger.extend(ipv4(
        "10.244.1.77".parse().unwrap(),
        POD_B,
        17,
        64,
        l4.len(),
    ));
    stranger.extend_from_slice(&l4);
    assert_eq!(drop_of(IF_A, &stranger), DropReason::SourceNotOwned);
    // The same frame from its real owner's interface is forwarded.
    let mut real = eth(LXC_B_MAC, POD_B_MAC, 0x0800);
    real.extend(ipv4(POD_B, POD_A, 17, 64, l4.len()));
    real.extend_from_slice(&l4);
    assert_eq!(
        run(IF_B, &real).0,
        Verdict::Tx {
            ifindex: IF_A,
            kind: TxKind::Forward
        }
    );
}

#[test]
fn fragmented_ping_to_the_gateway_is_not_answered() {
    let mut f = from_a(GATEWAY, 1, 64, &icmp_echo(1, 1, b"frag-one"));
    f[14 + 6] = 0x20; // MF, offset 0
    let c = checksum::checksum(&{
        let mut h = f[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    f[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(drop_of(IF_A, &f), DropReason::GatewayUnhandled);
}

#[test]
fn malformed_ipv4_headers_are_named() {
    let good = from_a(POD_B, 17, 64, &udp(1, 2, b"x"));
    let mut bad_csum = good.clone();
    bad_csum[14 + 10] ^= 0xff;
    assert_eq!(drop_of(IF_A, &bad_csum), DropReason::Ipv4Checksum);
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    assert_eq!(drop_of(IF_A, &bad_version), DropReason::Ipv4Malformed);
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44;
    assert_eq!(drop_of(IF_A, &short_ihl), DropReason::Ipv4Malformed);
    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
    assert_eq!(drop_of(IF_A, &long_total), DropReason::FrameTooShort);
    assert_eq!(drop_of(IF_A, &good[..30]), DropReason::FrameTooShort);
    let mut zero_src = good.clone();
    zero_src[26..30].copy_from_slice(&[0, 0, 0, 0]);
    let c = checksum::checksum(&{
        let mut h = zero_src[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    zero_src[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(drop_of(IF_A, &zero_src), DropReason::Ipv4BadSource);
}

#[test]
fn ip_options_are_forwarded_with_offsets_from_ihl() {
    // IHL 6: one 4-byte option (NOP NOP NOP EOL).
    let l4 = udp(7, 8, b"opt");
    let mut ip = ipv4(POD_A, POD_B, 17, 10, l4.len() + 4);
    ip[0] = 0x46;
    ip.extend_from_slice(&[1, 1, 1, 0]);
    ip[10] = 0;
    ip[11] = 0;
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = eth(LXC_A_MAC, POD_A_MAC, 0x0800);
    frame.extend(ip);
    frame.extend(&l4);
    let (v, out) = run(IF_A, &frame);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Forward
        }
    );
    assert_eq!(out[14 + 8], 9);
    assert!(checksum::verify(&out[14..38]));
    assert_eq!(&out[38..], &l4[..]);
}
