//! One arbitrary frame on a pod interface or the uplink of a node with the overlay configured:
//! the whole pipeline must never panic. With bit 2 of the first byte set, the node also has a
//! policy table (the pod isolated both ways, ipBlock, identity and port-range rules, a host
//! firewall) and real flow state, so the policy paths (tracked, untracked, host) run too.
#![no_main]
use std::net::Ipv4Addr;

use std::sync::Arc;

use dataplane::{
    affinity::Affinity,
    conntrack::{Config, Conntrack, Timeouts},
    packet::PacketBuf,
    pipeline::{process, process_ctx},
    policy::{Dir, Isolation, PeerSpec, PolicyBuilder, PortSpec},
    snapshot::{HostPath, NatConfig},
    stages::{lb::Flows, neighbor::ArpThrottle},
    Ctx,
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
    let policy = which & 4 == 4;
    if policy {
        let on = Isolation { enforced: true, audit: which & 8 == 8 };
        let mut p = PolicyBuilder::new(1);
        p.identity(Ipv4Addr::new(10, 244, 2, 5), 7).node_addr(Ipv4Addr::new(172, 18, 0, 11));
        let e = p.endpoint(Ipv4Addr::new(10, 244, 1, 2), on, on);
        let h = p.host(on);
        p.allow(e, Dir::Ingress, PeerSpec::Identity(7), PortSpec { proto: 6, lo: 80, hi: 90 }, 1);
        p.allow(e, Dir::Egress, PeerSpec::IpBlock { cidr: (Ipv4Addr::new(10, 0, 0, 0), 8), except: vec![(Ipv4Addr::new(10, 244, 2, 0), 24)] }, PortSpec::all_of(17), 3);
        p.allow(h, Dir::Ingress, PeerSpec::Any, PortSpec::one(6, 443), 1);
        if let Ok(t) = p.build() {
            b.policy(Arc::new(t));
        }
        b.nat(NatConfig {
            node_addrs: vec![Ipv4Addr::new(172, 18, 0, 11)],
            hairpin_addr: Ipv4Addr::new(169, 254, 42, 1),
            ports: (61000, 65535),
            pod_net: Ipv4Addr::new(10, 244, 1, 0),
            pod_prefix: 24,
            masquerade: true,
            uplink_net: Ipv4Addr::new(172, 18, 0, 0),
            uplink_prefix: 24,
            uplink_gateway: None,
        });
        b.host_path(HostPath { ifindex: 9, mac: Mac([2, 0, 0, 0, 0, 9]), kernel_mac: Mac([2, 0, 0, 0, 0, 10]) });
    }
    let snap = b.build();
    if frame.len() > 3800 {
        return;
    }
    let mut buf = vec![0u8; 4096];
    buf[256..256 + frame.len()].copy_from_slice(frame);
    if let Some(mut pkt) = PacketBuf::new(&mut buf, 256, frame.len()) {
        let rx = if which & 2 == 2 { 2 } else { 3 };
        if policy {
            let ct = Conntrack::new(Config { capacity: 64, seed: 1, timeouts: Timeouts::default() });
            let Ok(ct) = ct else { return };
            let mut flows = Flows::new(ct, Arc::new(Affinity::new(8)));
            let mut arp = ArpThrottle::default();
            let mut ctx = Ctx::stateless(1, &mut arp);
            ctx.flows = Some(&mut flows);
            let _ = process_ctx(&mut ctx, &snap, rx, &mut pkt);
        } else {
            let _ = process(&snap, rx, &mut pkt);
        }
    }
});
