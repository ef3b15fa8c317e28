//! Frame builders and a two-pod snapshot shared by the pipeline tests and benchmarks.
#![allow(dead_code)]
use std::net::Ipv4Addr;

use dataplane::{
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, Snapshot, SnapshotBuilder},
    wire::{checksum, Mac},
};

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const IF_A: u32 = 7;
pub const IF_B: u32 = 9;
pub const LXC_A_MAC: Mac = Mac([0x02, 0, 0, 0, 0xa, 0x1]);
pub const LXC_B_MAC: Mac = Mac([0x02, 0, 0, 0, 0xb, 0x1]);
pub const POD_A_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xa, 0x2]);
pub const POD_B_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xb, 0x2]);
/// Room in front of every test frame, like UMEM headroom.
pub const HEADROOM: usize = 256;

pub fn two_pods() -> Snapshot {
    let mut b = SnapshotBuilder::new(1, GATEWAY);
    b.interface(InterfaceEntry {
        ifindex: IF_A,
        mac: LXC_A_MAC,
        role: InterfaceRole::Pod,
    });
    b.interface(InterfaceEntry {
        ifindex: IF_B,
        mac: LXC_B_MAC,
        role: InterfaceRole::Pod,
    });
    b.endpoint(
        POD_A,
        EndpointEntry {
            ifindex: IF_A,
            mac: POD_A_MAC,
        },
    );
    b.endpoint(
        POD_B,
        EndpointEntry {
            ifindex: IF_B,
            mac: POD_B_MAC,
        },
    );
    b.build()
}

pub fn eth(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 header (no options) with a correct checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum::checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// ICMP echo request with `data` bytes of payload.
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum::checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A UDP datagram (checksum 0: allowed for IPv4).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// Pod A -> `dst` IPv4 frame carrying `l4` with protocol `proto`.
pub fn from_a(dst: Ipv4Addr, proto: u8, ttl: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = eth(LXC_A_MAC, POD_A_MAC, 0x0800);
    f.extend(ipv4(POD_A, dst, proto, ttl, l4.len()));
    f.extend_from_slice(l4);
    f
}

pub fn arp(
    op: u16,
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_mac: Mac,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = eth(Mac::BROADCAST, sender_mac, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sender_mac.0);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac.0);
    f.extend_from_slice(&target_ip.octets());
    f
}

/// A buffer with headroom in front and tailroom behind `frame`, like a UMEM chunk.
pub fn chunk_with(frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    buf
}

// --- Overlay fixtures: this node is 172.18.0.11 (pods 10.244.1.0/24), the remote node is
// 172.18.0.12 (pods 10.244.2.0/24), both on the uplink's subnet.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
pub const IF_UPLINK: u32 = 2;
pub const UPLINK_MAC: Mac = Mac([0x02, 0, 0, 0, 0x11, 0x11]);
pub const PEER_UPLINK_MAC: Mac = Mac([0x02, 0, 0, 0, 0x12, 0x12]);
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
pub const UPLINK_MTU: u16 = 1500;

pub fn overlay_config(node_ip: Ipv4Addr) -> dataplane::snapshot::OverlayConfig {
    dataplane::snapshot::OverlayConfig {
        node_ip,
        vtep_mac: dataplane::stages::encap::derived_vtep_mac(node_ip),
        uplink_ifindex: IF_UPLINK,
        uplink_mtu: UPLINK_MTU,
        port: VXLAN_PORT,
        vni: VNI,
    }
}

/// Node 1 (pods A and B local) with node 2 reachable; `resolved`: node 2's MAC is known.
pub fn node1(resolved: bool) -> Snapshot {
    let mut b = SnapshotBuilder::new(1, GATEWAY);
    b.interface(InterfaceEntry {
        ifindex: IF_A,
        mac: LXC_A_MAC,
        role: InterfaceRole::Pod,
    });
    b.interface(InterfaceEntry {
        ifindex: IF_B,
        mac: LXC_B_MAC,
        role: InterfaceRole::Pod,
    });
    b.interface(InterfaceEntry {
        ifindex: IF_UPLINK,
        mac: UPLINK_MAC,
        role: InterfaceRole::Uplink,
    });
    b.endpoint(
        POD_A,
        EndpointEntry {
            ifindex: IF_A,
            mac: POD_A_MAC,
        },
    );
    b.endpoint(
        POD_B,
        EndpointEntry {
            ifindex: IF_B,
            mac: POD_B_MAC,
        },
    );
    b.overlay(overlay_config(NODE_IP));
    b.remote(dataplane::snapshot::RemoteNode {
        pod_net: Ipv4Addr::new(10, 244, 2, 0),
        prefix_len: 24,
        vtep_ip: PEER_IP,
        vtep_mac: dataplane::stages::encap::derived_vtep_mac(PEER_IP),
        next_hop: PEER_IP,
    });
    if resolved {
        b.neighbor(PEER_IP, PEER_UPLINK_MAC);
    }
    b.build()
}

/// Node 2, where REMOTE_POD lives behind IF_B's slot, and node 1 is the remote.
pub fn node2() -> Snapshot {
    let mut b = SnapshotBuilder::new(1, Ipv4Addr::new(10, 244, 2, 1));
    b.interface(InterfaceEntry {
        ifindex: IF_B,
        mac: LXC_B_MAC,
        role: InterfaceRole::Pod,
    });
    b.interface(InterfaceEntry {
        ifindex: IF_UPLINK,
        mac: PEER_UPLINK_MAC,
        role: InterfaceRole::Uplink,
    });
    b.endpoint(
        REMOTE_POD,
        EndpointEntry {
            ifindex: IF_B,
            mac: POD_B_MAC,
        },
    );
    b.overlay(overlay_config(PEER_IP));
    b.remote(dataplane::snapshot::RemoteNode {
        pod_net: Ipv4Addr::new(10, 244, 1, 0),
        prefix_len: 24,
        vtep_ip: NODE_IP,
        vtep_mac: dataplane::stages::encap::derived_vtep_mac(NODE_IP),
        next_hop: NODE_IP,
    });
    b.build()
}

/// A VXLAN frame as node 1 would send it to node 2 (hand-built, independent of `encap`).
pub fn vxlan_frame(outer_dst: Ipv4Addr, dport: u16, flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut f = eth(PEER_UPLINK_MAC, UPLINK_MAC, 0x0800);
    let mut vx = vec![flags, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    vx.extend_from_slice(inner);
    let u = udp(40000, dport, &vx);
    f.extend(ipv4(NODE_IP, outer_dst, 17, 64, u.len()));
    f.extend(u);
    f
}
