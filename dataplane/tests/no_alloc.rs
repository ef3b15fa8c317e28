//! The per-packet path allocates nothing: a counting global allocator watches 100k frames of
//! every kind (forward, ARP reply, gateway echo, ICMP error, drops) after one warm-up pass.
mod common;

use common::*;
use dataplane::{packet::PacketBuf, pipeline::process, stats::Counters, wire::Mac, Verdict};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

#[test]
fn zero_allocations_per_packet_after_warm_up() {
    let snap = two_pods();
    let frames: Vec<(u32, Vec<u8>)> = vec![
        (IF_A, from_a(POD_B, 17, 64, &udp(1, 2, &[0u8; 18]))),
        (IF_A, from_a(POD_B, 17, 64, &udp(1, 2, &[0u8; 1300]))),
        (IF_A, arp(1, POD_A_MAC, POD_A, Mac([0; 6]), GATEWAY)),
        (IF_A, from_a(GATEWAY, 1, 64, &icmp_echo(1, 1, b"12345678"))),
        (IF_A, from_a(POD_B, 17, 1, &udp(1, 2, b"ttl"))),
        (
            IF_A,
            from_a("10.1.2.3".parse().expect("ip"), 17, 64, &udp(1, 2, b"x")),
        ),
        (IF_B, vec![0u8; 9]),
    ];
    let mut bufs: Vec<Vec<u8>> = frames.iter().map(|(_, f)| chunk_with(f)).collect();
    let mut counters = Counters::default();
    let pass = |counters: &mut Counters, bufs: &mut Vec<Vec<u8>>| {
        for ((rx, frame), buf) in frames.iter().zip(bufs.iter_mut()) {
            buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
            let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, frame.len()) else {
                continue;
            };
            match process(&snap, *rx, &mut pkt) {
                Verdict::Tx { kind, .. } => counters.count_tx_kind(kind),
                Verdict::Drop(r) => counters.count_drop(r),
                Verdict::Handoff { .. } => counters.handoff_out += 1,
            }
        }
    };
    pass(&mut counters, &mut bufs);
    let ((), allocs) = counting_alloc::allocations_during(|| {
        for _ in 0..100_000 / frames.len() {
            pass(&mut counters, &mut bufs);
        }
    });
    assert_eq!(allocs, 0, "allocations on the per-packet path");
    // The loop really exercised every path.
    assert!(
        counters.forwarded > 0 && counters.arp_replies > 0 && counters.gateway_echo_replies > 0
    );
    assert!(counters.icmp_errors_sent > 0 && counters.dropped > 0);
}
