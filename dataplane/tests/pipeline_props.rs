//! Properties: the pipeline never panics, whatever the bytes; every verdict on arbitrary input
//! is either a transmission or a numbered drop; valid forwarded frames keep a valid checksum.
mod common;

use common::*;
use dataplane::{packet::PacketBuf, pipeline::process, wire::checksum, DropReason, Verdict};
use proptest::prelude::*;

fn run(rx: u32, frame: &[u8]) -> Verdict {
    let snap = two_pods();
    let mut buf = chunk_with(frame);
    let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
    process(&snap, rx, &mut pkt)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..200), rx in prop_oneof![Just(IF_A), Just(IF_B), any::<u32>()]) {
        match run(rx, &frame) {
            Verdict::Drop(r) => prop_assert!(DropReason::ALL.contains(&r)),
            Verdict::Tx { ifindex, .. } => prop_assert!(ifindex == IF_A || ifindex == IF_B),
            Verdict::Handoff { .. } => prop_assert!(false, "one worker never hands over"),
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(flips in proptest::collection::vec((0usize..80, any::<u8>()), 1..6), ttl in 0u8..=255, cut in 0usize..80) {
        let mut frame = from_a(POD_B, 17, ttl, &udp(1, 2, &[0x5a; 30]));
        for (at, v) in flips {
            if at < frame.len() { frame[at] = v; }
        }
        frame.truncate(frame.len().min(14 + cut.max(1)));
        let _ = run(IF_A, &frame);
        let arp_frame = arp(1, POD_A_MAC, POD_A, dataplane::wire::Mac([0; 6]), GATEWAY);
        let mut a = arp_frame.clone();
        a.truncate(cut.min(a.len()));
        let _ = run(IF_A, &a);
    }

    #[test]
    fn forwarding_keeps_the_ip_checksum_valid(ttl in 2u8..=255, len in 0usize..1300, proto in any::<u8>()) {
        let payload = vec![0xa5u8; len];
        let frame = from_a(POD_B, proto, ttl, &payload);
        let snap = two_pods();
        let mut buf = chunk_with(&frame);
        let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
        let v = process(&snap, IF_A, &mut pkt);
        prop_assert_eq!(v, Verdict::Tx { ifindex: IF_B, kind: dataplane::TxKind::Forward });
        prop_assert!(checksum::verify(&pkt.data()[14..34]));
        prop_assert_eq!(pkt.data()[14 + 8], ttl - 1);
        prop_assert_eq!(&pkt.data()[34..], &payload[..]);
    }
}
