//! Per-packet cost of the pipeline, no I/O: `cargo bench -p dataplane --bench pipeline`.
//!
//! Every iteration restores the frame's first 64 bytes (forwarding rewrites MACs and TTL), so
//! `restore_only` measures that restore alone: the baseline in the same run. Report
//! `pipeline - restore_only` as the pipeline's cost, or the ratio of the two.
//! `endpoints/N` repeats forwarding with N local endpoints in the snapshot (lookup scaling).
use std::{hint::black_box, net::Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::{
    packet::PacketBuf,
    pipeline::{process, process_ctx},
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, SnapshotBuilder},
    stages::neighbor::ArpThrottle,
    wire::Mac,
    Ctx,
};

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;

const RESTORE: usize = 64;

fn bench_cases(c: &mut Criterion) {
    // One ARP memory for the whole run, as a worker has (process() would zero a fresh one per
    // packet).
    let mut arp_mem = ArpThrottle::default();
    let snap = two_pods();
    let cases: Vec<(&str, u32, Vec<u8>)> = vec![
        ("forward_64B", IF_A, {
            let mut f = from_a(POD_B, 17, 64, &udp(1, 2, &[0; 18]));
            f.resize(64, 0);
            f
        }),
        (
            "forward_1400B",
            IF_A,
            from_a(POD_B, 17, 64, &udp(1, 2, &[0; 1400 - 42])),
        ),
        (
            "arp_reply",
            IF_A,
            arp(1, POD_A_MAC, POD_A, Mac([0; 6]), GATEWAY),
        ),
        (
            "icmp_time_exceeded",
            IF_A,
            from_a(POD_B, 17, 1, &udp(1, 2, &[0; 18])),
        ),
        (
            "drop_no_route",
            IF_A,
            from_a(Ipv4Addr::new(10, 9, 9, 9), 17, 64, &udp(1, 2, &[0; 18])),
        ),
    ];
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));
    for (name, rx, frame) in &cases {
        let mut buf = chunk_with(frame);
        let head: Vec<u8> = frame[..frame.len().min(RESTORE)].to_vec();
        g.bench_function(*name, |b| {
            b.iter(|| {
                buf[HEADROOM..HEADROOM + head.len()].copy_from_slice(&head);
                let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
                black_box(process_ctx(
                    &mut Ctx::stateless(0, &mut arp_mem),
                    &snap,
                    black_box(*rx),
                    &mut pkt,
                ))
            })
        });
    }
    let frame = from_a(POD_B, 17, 64, &udp(1, 2, &[0; 18]));
    let mut buf = chunk_with(&frame);
    g.bench_function("restore_only", |b| {
        b.iter(|| {
            buf[HEADROOM..HEADROOM + RESTORE.min(frame.len())]
                .copy_from_slice(&frame[..RESTORE.min(frame.len())]);
            black_box(&mut buf);
        })
    });
    g.finish();

    // Overlay: encapsulation on the sending node (64 B and 1400 B inner frames), and
    // decapsulation + delivery on the receiving node of the very frames encap produced.
    let mut g = c.benchmark_group("overlay");
    g.throughput(Throughput::Elements(1));
    let node1 = node1(true);
    let node2 = node2();
    for (name, payload) in [("64B", 18usize), ("1400B", 1400 - 42)] {
        let inner = from_a(REMOTE_POD, 17, 64, &udp(5000, 80, &vec![0; payload]));
        let mut buf = chunk_with(&inner);
        g.bench_function(format!("encap_{name}"), |b| {
            b.iter(|| {
                buf[HEADROOM..HEADROOM + RESTORE.min(inner.len())]
                    .copy_from_slice(&inner[..RESTORE.min(inner.len())]);
                let mut pkt = PacketBuf::new(&mut buf, HEADROOM, inner.len()).expect("fits");
                black_box(process_ctx(
                    &mut Ctx::stateless(0, &mut arp_mem),
                    &node1,
                    black_box(IF_A),
                    &mut pkt,
                ))
            })
        });
        let wire = {
            let mut buf = chunk_with(&inner);
            let mut pkt = PacketBuf::new(&mut buf, HEADROOM, inner.len()).expect("fits");
            let _ = process(&node1, IF_A, &mut pkt);
            pkt.data().to_vec()
        };
        let mut buf = chunk_with(&wire);
        let restore = (RESTORE + 50).min(wire.len());
        g.bench_function(format!("decap_{name}"), |b| {
            b.iter(|| {
                buf[HEADROOM..HEADROOM + restore].copy_from_slice(&wire[..restore]);
                let mut pkt = PacketBuf::new(&mut buf, HEADROOM, wire.len()).expect("fits");
                black_box(process_ctx(
                    &mut Ctx::stateless(0, &mut arp_mem),
                    &node2,
                    black_box(IF_UPLINK),
                    &mut pkt,
                ))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("endpoints");
    g.throughput(Throughput::Elements(1));
    for n in [2u32, 64, 1024, 16384] {
        let mut b = SnapshotBuilder::new(1, GATEWAY);
        b.interface(InterfaceEntry {
            ifindex: IF_A,
            mac: LXC_A_MAC,
            role: InterfaceRole::Pod,
        });
        b.endpoint(
            POD_A,
            EndpointEntry {
                ifindex: IF_A,
                mac: POD_A_MAC,
            },
        );
        for i in 0..n {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i);
            b.interface(InterfaceEntry {
                ifindex: 100 + i,
                mac: LXC_B_MAC,
                role: InterfaceRole::Pod,
            });
            b.endpoint(
                ip,
                EndpointEntry {
                    ifindex: 100 + i,
                    mac: POD_B_MAC,
                },
            );
        }
        let snap = b.build();
        let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n / 2);
        let frame = from_a(dst, 17, 64, &udp(1, 2, &[0; 18]));
        let mut buf = chunk_with(&frame);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bch, _| {
            bch.iter(|| {
                buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(&frame);
                let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
                black_box(process_ctx(
                    &mut Ctx::stateless(0, &mut arp_mem),
                    &snap,
                    IF_A,
                    &mut pkt,
                ))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cases);
criterion_main!(benches);
