//! Arbitrary bytes behind a valid outer Ethernet/IPv4/UDP:8472 header, received on the uplink:
//! decapsulation and everything after it must never panic, only drop or deliver.
#![no_main]
use std::net::Ipv4Addr;

use dataplane::{
    packet::PacketBuf,
    pipeline::process,
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, OverlayConfig, SnapshotBuilder},
    wire::{checksum, Mac},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let node_ip = Ipv4Addr::new(172, 18, 0, 12);
    let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 244, 2, 1));
    b.interface(InterfaceEntry { ifindex: 2, mac: Mac([2, 0, 0, 0, 0, 2]), role: InterfaceRole::Uplink });
    b.interface(InterfaceEntry { ifindex: 3, mac: Mac([2, 0, 0, 0, 0, 3]), role: InterfaceRole::Pod });
    b.endpoint(Ipv4Addr::new(10, 244, 2, 5), EndpointEntry { ifindex: 3, mac: Mac([2, 0, 0, 0, 0, 4]) });
    b.overlay(OverlayConfig { node_ip, vtep_mac: Mac([0x0a, 0x58, 172, 18, 0, 12]), uplink_ifindex: 2, uplink_mtu: 1500, port: 8472, vni: 1 });
    let snap = b.build();
    // Outer headers, then the fuzz input as UDP payload (VXLAN header + inner frame).
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 9, 0x08, 0x00];
    let udp_len = 8 + data.len();
    let total = 20 + udp_len;
    if total > 4000 {
        return;
    }
    let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0, 172, 18, 0, 11];
    ip.extend_from_slice(&node_ip.octets());
    let c = checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend(ip);
    frame.extend_from_slice(&[0x9c, 0x40, 0x21, 0x18, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    frame.extend_from_slice(data);
    let mut buf = vec![0u8; 4096];
    buf[256..256 + frame.len()].copy_from_slice(&frame);
    if let Some(mut pkt) = PacketBuf::new(&mut buf, 256, frame.len()) {
        let _ = process(&snap, 2, &mut pkt);
    }
});
