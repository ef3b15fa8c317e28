//! Golden NAT fixtures: frames built here independently (checksums summed from scratch with
//! this file's own RFC 1071 code, pseudo-header included), rewritten by `stages::nat` with the
//! rewrites `conntrack` derives, compared byte for byte. Plus property tests (checksums always
//! verify; rewrite then inverse is the identity) and a counting allocator proving that
//! conntrack and NAT allocate nothing per packet after construction.
use std::net::Ipv4Addr;

use dataplane::{
    classify::{classify, Class, Ipv4Meta},
    conntrack::{
        reply_rewrite, Config, Conntrack, Direction, FlowKey, Timeouts, NS_PER_SEC, TCP_ACK,
        TCP_SYN,
    },
    stages::nat::{rewrite_frame, NatRewrite},
    DropReason,
};
use proptest::prelude::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

// ---- independent builders -------------------------------------------------------------

/// RFC 1071 checksum, written separately from `wire::checksum`.
fn csum(parts: &[&[u8]]) -> u16 {
    let mut acc: u64 = 0;
    for p in parts {
        for (i, b) in p.iter().enumerate() {
            acc += if i % 2 == 0 {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0xbe, 0xef, 0x40, 0, 63, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// IP packet (header + l4).
fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = ip_header(src, dst, proto, l4.len());
    p.extend_from_slice(l4);
    p
}

/// Ethernet frame around an IP packet.
fn eth(ip_packet: &[u8]) -> Vec<u8> {
    let mut f = vec![0x0a, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip_packet);
    f
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    t.extend_from_slice(
        &(if flags & TCP_ACK != 0 {
            0x5566_7788u32
        } else {
            0
        })
        .to_be_bytes(),
    );
    t.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(data);
    let c = csum(&[&pseudo(src, dst, TCP, t.len()), &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, TCP, &t)
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8], sum: bool) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    if sum {
        let c = match csum(&[&pseudo(src, dst, UDP, u.len()), &u]) {
            0 => 0xffff,
            c => c,
        };
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    ip(src, dst, UDP, &u)
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 9]);
    m.extend_from_slice(data);
    let c = csum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, ICMP, &m)
}

/// ICMP error from `src` to `dst` quoting the IP header and the first `quote_l4` bytes of the
/// transport header of `about`.
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    about: &[u8],
    quote_l4: usize,
) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&about[..20 + quote_l4]);
    let c = csum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, ICMP, &m)
}

fn meta(frame: &[u8]) -> Ipv4Meta {
    match classify(frame) {
        Ok(Class::Ipv4(m)) => m,
        other => panic!("not IPv4: {other:?}"),
    }
}

/// Checks the IPv4 header checksum and the TCP/UDP (pseudo-header) or ICMP checksum from
/// scratch.
fn assert_checksums(frame: &[u8]) {
    let p = &frame[14..];
    assert_eq!(csum(&[&p[..20]]), 0, "IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let l4 = &p[20..total];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    match p[9] {
        TCP => assert_eq!(csum(&[&pseudo(src, dst, TCP, l4.len()), l4]), 0, "TCP"),
        UDP if l4[6..8] == [0, 0] => {}
        UDP => assert_eq!(csum(&[&pseudo(src, dst, UDP, l4.len()), l4]), 0, "UDP"),
        ICMP => assert_eq!(csum(&[l4]), 0, "ICMP"),
        _ => {}
    }
}

fn rewritten(frame: &[u8], rw: &NatRewrite) -> Vec<u8> {
    let mut out = frame.to_vec();
    rewrite_frame(&meta(frame), rw, &mut out).expect("rewrite");
    out
}

fn table() -> Conntrack {
    Conntrack::new(Config {
        capacity: 1024,
        seed: 7,
        timeouts: Timeouts::default(),
    })
    .expect("table")
}

// ---- golden fixtures -------------------------------------------------------------------

#[test]
fn tcp_syn_dnat_to_backend_and_syn_ack_snat_back_to_service() {
    let mut ct = table();
    let syn = eth(&tcp(CLIENT, SERVICE, 40000, 80, TCP_SYN, b""));
    let key = FlowKey {
        src: CLIENT,
        dst: SERVICE,
        sport: 40000,
        dport: 80,
        proto: TCP,
    };
    let rw = NatRewrite::dnat(BACKEND, 8080);
    let flow = ct.new_flow(TCP, TCP_SYN, Some(rw), 1, 0);
    ct.insert(&key, &key.reply_key(&rw), flow, 0).expect("room");
    let (dir, f) = ct.track(&key, TCP_SYN, 1).expect("flow");
    let fwd = f.rewrite_for(&key, dir).expect("NATed");
    let out = rewritten(&syn, &fwd);
    assert_eq!(out, eth(&tcp(CLIENT, BACKEND, 40000, 8080, TCP_SYN, b"")));
    assert_checksums(&out);

    let syn_ack = eth(&tcp(BACKEND, CLIENT, 8080, 40000, TCP_SYN | TCP_ACK, b""));
    let reply_key = FlowKey {
        src: BACKEND,
        dst: CLIENT,
        sport: 8080,
        dport: 40000,
        proto: TCP,
    };
    let (dir, f) = ct.track(&reply_key, TCP_SYN | TCP_ACK, 2).expect("reply");
    assert_eq!(dir, Direction::Reply);
    let rev = f.rewrite_for(&key, dir).expect("NATed");
    assert_eq!(rev, NatRewrite::snat(SERVICE, 80));
    let out = rewritten(&syn_ack, &rev);
    assert_eq!(
        out,
        eth(&tcp(SERVICE, CLIENT, 80, 40000, TCP_SYN | TCP_ACK, b""))
    );
    assert_checksums(&out);
}

#[test]
fn tcp_with_payload_and_both_addresses_rewritten() {
    let data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n!";
    let f = eth(&tcp(CLIENT, SERVICE, 33000, 443, TCP_ACK, data));
    let rw = NatRewrite {
        src: Some((NODE, 61000)),
        dst: Some((BACKEND, 8443)),
    };
    let out = rewritten(&f, &rw);
    assert_eq!(out, eth(&tcp(NODE, BACKEND, 61000, 8443, TCP_ACK, data)));
    assert_checksums(&out);
}

#[test]
fn udp_with_checksum_is_updated_and_without_stays_zero() {
    let rw = NatRewrite::dnat(BACKEND, 5353);
    for sum in [true, false] {
        let f = eth(&udp(CLIENT, SERVICE, 40000, 53, b"query bytes", sum));
        let out = rewritten(&f, &rw);
        assert_eq!(
            out,
            eth(&udp(CLIENT, BACKEND, 40000, 5353, b"query bytes", sum)),
            "checksum {sum}"
        );
        assert_checksums(&out);
        if !sum {
            assert_eq!(out[14 + 20 + 6..14 + 20 + 8], [0, 0]);
        }
    }
}

#[test]
fn udp_checksum_computing_to_zero_is_sent_as_all_ones() {
    // Choose the last payload word so that the translated datagram's checksum is 0.
    let rw = NatRewrite::dnat(BACKEND, 5353);
    let mut data = *b"abcdefgh\0\0";
    let after = udp(CLIENT, BACKEND, 40000, 5353, &data, false);
    let l4 = &after[20..];
    let s = !csum(&[&pseudo(CLIENT, BACKEND, UDP, l4.len()), l4]);
    data[8..10].copy_from_slice(&(!s).to_be_bytes());
    let expected = udp(CLIENT, BACKEND, 40000, 5353, &data, true);
    assert_eq!(
        expected[20 + 6..20 + 8],
        [0xff, 0xff],
        "fixture computes to 0"
    );
    let out = rewritten(&eth(&udp(CLIENT, SERVICE, 40000, 53, &data, true)), &rw);
    assert_eq!(out, eth(&expected));
    assert_checksums(&out);
}

#[test]
fn icmp_echo_dnat_and_masquerade_rewrite_the_identifier_side() {
    // DNAT of an echo request: only the address; the reply comes back from the service.
    let req = eth(&echo(CLIENT, SERVICE, 8, 77, b"ping-data"));
    let key = FlowKey {
        src: CLIENT,
        dst: SERVICE,
        sport: 77,
        dport: 0,
        proto: ICMP,
    };
    let rw = NatRewrite::dnat(BACKEND, 0);
    let out = rewritten(&req, &rw);
    assert_eq!(out, eth(&echo(CLIENT, BACKEND, 8, 77, b"ping-data")));
    assert_checksums(&out);
    let rep = eth(&echo(BACKEND, CLIENT, 0, 77, b"ping-data"));
    let out = rewritten(&rep, &reply_rewrite(&key, &rw));
    assert_eq!(out, eth(&echo(SERVICE, CLIENT, 0, 77, b"ping-data")));
    assert_checksums(&out);

    // Masquerade: source and identifier change; the reply's identifier changes back.
    let masq = NatRewrite::snat(NODE, 1234);
    let out = rewritten(&req, &masq);
    assert_eq!(out, eth(&echo(NODE, SERVICE, 8, 1234, b"ping-data")));
    assert_checksums(&out);
    let reply_key = key.reply_key(&masq);
    assert_eq!((reply_key.dst, reply_key.dport), (NODE, 1234));
    let rep = eth(&echo(SERVICE, NODE, 0, 1234, b"ping-data"));
    let out = rewritten(&rep, &reply_rewrite(&key, &masq));
    assert_eq!(out, eth(&echo(SERVICE, CLIENT, 0, 77, b"ping-data")));
    assert_checksums(&out);
}

#[test]
fn icmp_port_unreachable_about_dnated_udp_is_rewritten_back_to_the_service() {
    let original = udp(CLIENT, SERVICE, 40000, 53, b"dns query", true);
    let key = FlowKey {
        src: CLIENT,
        dst: SERVICE,
        sport: 40000,
        dport: 53,
        proto: UDP,
    };
    let rw = NatRewrite::dnat(BACKEND, 5353);
    let delivered = udp(CLIENT, BACKEND, 40000, 5353, b"dns query", true);
    assert_eq!(
        rewritten(&eth(&original), &rw),
        eth(&delivered),
        "forward DNAT"
    );
    let rev = reply_rewrite(&key, &rw);

    // From the backend itself: outer source becomes the service, quote as the client sent it.
    let err = eth(&icmp_error(BACKEND, CLIENT, 3, 3, &delivered, 8));
    let out = rewritten(&err, &rev);
    assert_eq!(out, eth(&icmp_error(SERVICE, CLIENT, 3, 3, &original, 8)));
    assert_checksums(&out);

    // From a router on the way (time exceeded): its source address stays.
    let err = eth(&icmp_error(ROUTER, CLIENT, 11, 0, &delivered, 8));
    let out = rewritten(&err, &rev);
    assert_eq!(out, eth(&icmp_error(ROUTER, CLIENT, 11, 0, &original, 8)));
    assert_checksums(&out);
}

#[test]
fn icmp_error_about_masqueraded_tcp_goes_back_to_the_pod() {
    // Pod -> outside host, masqueraded to the node; a router says "unreachable".
    let key = FlowKey {
        src: CLIENT,
        dst: ROUTER,
        sport: 45000,
        dport: 443,
        proto: TCP,
    };
    let masq = NatRewrite::snat(NODE, 61001);
    let original = tcp(CLIENT, ROUTER, 45000, 443, TCP_SYN, b"");
    let sent = tcp(NODE, ROUTER, 61001, 443, TCP_SYN, b"");
    let rev = reply_rewrite(&key, &masq);
    // Quoting the whole TCP header (checksum included) and only its first 8 bytes.
    for quote in [20, 8] {
        let err = eth(&icmp_error(ROUTER, NODE, 3, 1, &sent, quote));
        let out = rewritten(&err, &rev);
        let mut expected = eth(&icmp_error(ROUTER, CLIENT, 3, 1, &original, quote));
        if quote == 8 {
            // No quoted checksum to fix: the ports change, the rest is as sent. The outer
            // ICMP checksum covers what is there.
            assert_eq!(out[14 + 28 + 20..14 + 28 + 28], expected[14 + 28 + 20..]);
            expected = out.clone();
        }
        assert_eq!(out, expected, "quote {quote}");
        assert_checksums(&out);
    }
}

#[test]
fn truncated_packets_are_drop_reasons_not_panics() {
    let f = eth(&tcp(CLIENT, SERVICE, 1, 2, TCP_SYN, b""));
    let m = meta(&f);
    let rw = NatRewrite::dnat(BACKEND, 9);
    // TCP header cut before its checksum (IP total length says so).
    let mut short = eth(&ip(CLIENT, SERVICE, TCP, &[0u8; 12]));
    let sm = meta(&short);
    assert_eq!(
        rewrite_frame(&sm, &rw, &mut short),
        Err(DropReason::FrameTooShort)
    );
    // Buffer shorter than the meta claims.
    let mut cut = f[..40].to_vec();
    assert_eq!(
        rewrite_frame(&m, &rw, &mut cut),
        Err(DropReason::FrameTooShort)
    );
    // ICMP error whose quote is not IPv4.
    let mut bad = echo(BACKEND, CLIENT, 3, 0, &[0x65; 28]);
    bad[20 + 1] = 3;
    let c = csum(&[&bad[20..]]);
    bad[22..24].copy_from_slice(&c.to_be_bytes());
    let mut bad = eth(&bad);
    let bm = meta(&bad);
    assert_eq!(
        rewrite_frame(&bm, &NatRewrite::snat(SERVICE, 1), &mut bad),
        Err(DropReason::Ipv4Malformed)
    );
    // An identity rewrite touches nothing.
    let mut same = f.clone();
    assert_eq!(rewrite_frame(&m, &NatRewrite::NONE, &mut same), Ok(()));
    assert_eq!(same, f);
}

// ---- properties ------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Kind {
    Tcp,
    Udp { sum: bool },
    Echo { request: bool },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Tcp),
        any::<bool>().prop_map(|sum| Kind::Udp { sum }),
        any::<bool>().prop_map(|request| Kind::Echo { request }),
    ]
}

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn endpoint() -> impl Strategy<Value = Option<(Ipv4Addr, u16)>> {
    proptest::option::of((addr(), any::<u16>()))
}

fn build(k: &Kind, src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16, data: &[u8]) -> Vec<u8> {
    eth(&match k {
        Kind::Tcp => tcp(src, dst, sp, dp, TCP_ACK, data),
        Kind::Udp { sum } => udp(src, dst, sp, dp, data, *sum),
        Kind::Echo { request: true } => echo(src, dst, 8, sp, data),
        Kind::Echo { request: false } => echo(src, dst, 0, dp, data),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_rewrites_verify_and_invert(
        k in kind(),
        src in addr(), dst in addr(), sp in any::<u16>(), dp in any::<u16>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
        rw_src in endpoint(), rw_dst in endpoint(),
    ) {
        let frame = build(&k, src, dst, sp, dp, &data);
        let rw = NatRewrite { src: rw_src, dst: rw_dst };
        let out = rewritten(&frame, &rw);
        assert_checksums(&out);
        // The result is the packet built from scratch with the new tuple.
        let (nsrc, nsp) = rw_src.unwrap_or((src, sp));
        let (ndst, ndp) = rw_dst.unwrap_or((dst, dp));
        let (nsp, ndp) = match k {
            Kind::Echo { request: true } => (nsp, dp),
            Kind::Echo { request: false } => (sp, ndp),
            _ => (nsp, ndp),
        };
        prop_assert_eq!(&out, &build(&k, nsrc, ndst, nsp, ndp, &data));
        let inverse = NatRewrite {
            src: rw_src.map(|_| (src, sp)),
            dst: rw_dst.map(|_| (dst, dp)),
        };
        prop_assert_eq!(rewritten(&out, &inverse), frame);
    }

    #[test]
    fn random_icmp_errors_verify_and_invert(
        k in kind(),
        src in addr(), dst in addr(), sp in any::<u16>(), dp in any::<u16>(),
        data in proptest::collection::vec(any::<u8>(), 12..40),
        rw_src in endpoint(), rw_dst in endpoint(),
        from_router in any::<bool>(), quote in 8usize..=20,
    ) {
        // The quoted packet went dst <- src; the error goes back from dst (or a router).
        let about = build(&k, src, dst, sp, dp, &data);
        let quote = if matches!(k, Kind::Tcp) { quote } else { 8 };
        let from = if from_router { ROUTER } else { dst };
        let err = eth(&icmp_error(from, src, 11, 0, &about[14..], quote));
        let rw = NatRewrite { src: rw_src, dst: rw_dst };
        let out = rewritten(&err, &rw);
        assert_checksums(&out);
        prop_assert_eq!(csum(&[&out[14 + 28..14 + 48]]), 0, "quoted IPv4 header checksum");
        let inverse = NatRewrite {
            src: rw_src.map(|_| (dst, dp)),
            dst: rw_dst.map(|_| (src, sp)),
        };
        // Outer addresses only follow when they named the endpoint: the inverse restores
        // the frame whenever the rewrite did not make outer and quoted addresses coincide.
        let o = &out[14..];
        let outer_src = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
        let inner_dst = Ipv4Addr::new(o[44], o[45], o[46], o[47]);
        if !(from_router && rw_src.is_some() && outer_src == inner_dst) {
            prop_assert_eq!(rewritten(&out, &inverse), err);
        }
    }
}

// ---- no allocation per packet ----------------------------------------------------------

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

#[test]
fn conntrack_and_nat_allocate_nothing_after_construction() {
    let mut ct = Conntrack::new(Config {
        capacity: 256,
        seed: 3,
        timeouts: Timeouts::default(),
    })
    .expect("table");
    let syn = eth(&tcp(CLIENT, SERVICE, 40000, 80, TCP_SYN, b"x"));
    let m = meta(&syn);
    let err = eth(&icmp_error(
        BACKEND,
        CLIENT,
        3,
        3,
        &udp(CLIENT, BACKEND, 1, 5353, b"q", true),
        8,
    ));
    let em = meta(&err);
    let mut buf = syn.clone();
    let mut ebuf = err.clone();

    let mut now = 0u64;
    let rw = NatRewrite::dnat(BACKEND, 8080);
    // 10k flows through a 256-entry table: hits, misses, evictions, GC.
    let ((), allocs) = counting_alloc::allocations_during(|| {
        for i in 0..10_000u32 {
            now += NS_PER_SEC / 100;
            let key = FlowKey {
                src: Ipv4Addr::from(0x0af4_0000 + i),
                dst: SERVICE,
                sport: i as u16,
                dport: 80,
                proto: TCP,
            };
            if ct.track(&key, TCP_SYN, now).is_none() {
                let f = ct.new_flow(TCP, TCP_SYN, Some(rw), i as u16, now);
                let _ = ct.insert(&key, &key.reply_key(&rw), f, now);
            }
            let _ = ct.track(&key.reply_key(&rw), TCP_SYN | TCP_ACK, now);
            ct.gc(now, 4);
            buf.copy_from_slice(&syn);
            rewrite_frame(&m, &rw, &mut buf).expect("rewrite");
            ebuf.copy_from_slice(&err);
            rewrite_frame(&em, &NatRewrite::snat(SERVICE, 53), &mut ebuf).expect("rewrite");
        }
    });
    assert_eq!(allocs, 0, "allocations on the per-packet path");
    let st = ct.stats();
    assert!(st.evictions.iter().sum::<u64>() > 0, "evictions exercised");
    assert!(st.lookup_hits > 0 && st.lookup_misses > 0);
}
