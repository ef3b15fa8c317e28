//! One arbitrary frame on a pod interface or the uplink of a node with the overlay configured:
//! the whole pipeline must never panic.
#![no_main]
use std::net::Ipv4Addr;

use dataplane::{
    packet::PacketBuf,
    pipeline::process,
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, OverlayConfig, RemoteNode, SnapshotBuilder},
    wire::Mac,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, frame)) = data.split_first() else { return };
    let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 244, 1, 1));
    b.interface(InterfaceEntry { ifindex: 2, mac: Mac([2, 0, 0, 0, 0, 2]), role: InterfaceRole::Uplink });
    b.interface(InterfaceEntry { ifindex: 3, mac: Mac([2, 0, 0, 0, 0, 3]), role: InterfaceRole::Pod });
    b.endpoint(Ipv4Addr::new(10, 244, 1, 2), EndpointEntry { ifindex: 3, mac: Mac([2, 0, 0, 0, 0, 4]) });
    b.overlay(OverlayConfig { node_ip: Ipv4Addr::new(172, 18, 0, 11), vtep_mac: Mac([0x0a, 0x58, 172, 18, 0, 11]), uplink_ifindex: 2, uplink_mtu: 1500, port: 8472, vni: 1 });
    b.remote(RemoteNode { pod_net: Ipv4Addr::new(10, 244, 2, 0), prefix_len: 24, vtep_ip: Ipv4Addr::new(172, 18, 0, 12), vtep_mac: Mac([0x0a, 0x58, 172, 18, 0, 12]), next_hop: Ipv4Addr::new(172, 18, 0, 12) });
    if which & 1 == 1 {
        b.neighbor(Ipv4Addr::new(172, 18, 0, 12), Mac([2, 0, 0, 0, 0, 12]));
    }
    let snap = b.build();
    if frame.len() > 3800 {
        return;
    }
    let mut buf = vec![0u8; 4096];
    buf[256..256 + frame.len()].copy_from_slice(frame);
    if let Some(mut pkt) = PacketBuf::new(&mut buf, 256, frame.len()) {
        let rx = if which & 2 == 2 { 2 } else { 3 };
        let _ = process(&snap, rx, &mut pkt);
    }
});
