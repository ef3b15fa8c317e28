//! Golden tests for the services (lb) stage, end to end through `pipeline::process_ctx` /
//! `process_resumed` with real per-worker flow state (`Conntrack` + `Affinity`): frames are built
//! byte by byte here, checksums summed from scratch with this file's own RFC 1071 code, and whole
//! output frames compared (addresses, ports, checksums, TTL, MACs, tx interface, `TxKind`).
//!
//! Steering: every scenario runs with 1, 2 and 3 workers. A request starts on worker 0 and is
//! followed through `Verdict::Handoff` to its owner; its reply (and ICMP errors about the flow)
//! is sent to a worker that is *not* the owner first and must be handed to the owner, which must
//! find the flow there.
use std::{net::Ipv4Addr, sync::Arc};

use dataplane::{
    affinity::Affinity,
    conntrack::{Config, Conntrack, FlowKey, FlowState, Timeouts, NS_PER_SEC},
    packet::PacketBuf,
    pipeline::{process_ctx, process_resumed},
    services::{
        Backend, Frontend, FrontendKind, RotationSpec, ServiceSpec, ServiceTable,
        ServiceTableBuilder,
    },
    snapshot::{
        EndpointEntry, InterfaceEntry, InterfaceRole, NatConfig, OverlayConfig, RemoteNode,
        Snapshot, SnapshotBuilder,
    },
    stages::{
        encap::derived_vtep_mac,
        lb::{flow_hash, Flows, Steer},
        nat::NatRewrite,
        neighbor::ArpThrottle,
    },
    wire::Mac,
    Ctx, DropReason, TxKind, Verdict,
};
use proptest::prelude::*;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

// ---- the node -------------------------------------------------------------------------------

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 12);
const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 50);
const INTERNET: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

const CIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CIP_MANY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const CIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const CIP_AFF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const CIP_ITP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const CIP_HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);
const CIP_ITP_NONE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 17);
const NP_LOCAL: u16 = 30080;
const NP_LOCAL_NONE: u16 = 30081;
const NP_CLUSTER: u16 = 30082;

const IF_A: u32 = 7;
const IF_B: u32 = 9;
const IF_UPLINK: u32 = 2;
const LXC_A_MAC: Mac = Mac([0x02, 0, 0, 0, 0xa, 0x1]);
const LXC_B_MAC: Mac = Mac([0x02, 0, 0, 0, 0xb, 0x1]);
const POD_A_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xa, 0x2]);
const POD_B_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xb, 0x2]);
const UPLINK_MAC: Mac = Mac([0x02, 0, 0, 0, 0x11, 0x11]);
const PEER_MAC: Mac = Mac([0x02, 0, 0, 0, 0x12, 0x12]);
const ROUTER_MAC: Mac = Mac([0x02, 0, 0, 0, 0x01, 0x01]);
const EXT_MAC: Mac = Mac([0x02, 0, 0, 0, 0x50, 0x50]);
const VXLAN_PORT: u16 = 8472;
const HEADROOM: usize = 256;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The Maglev table of `CIP_MANY` (backend indices; 3:1:1:2).
const MANY_MAGLEV: [u16; 7] = [0, 0, 0, 1, 2, 3, 3];
const SNAT_PORTS: (u16, u16) = (40000, 40127);

fn many_backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2, 10 + i)
}

/// What varies between the snapshots the tests use.
#[derive(Clone)]
struct Opts {
    masquerade: bool,
    ports: (u16, u16),
    /// Rotation of the affinity service (`CIP_AFF`, four remote backends).
    aff: RotationSpec,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            masquerade: true,
            ports: SNAT_PORTS,
            aff: RotationSpec {
                members: vec![0, 1, 2, 3],
                maglev: vec![0, 1, 2, 3, 0, 1, 2].into(),
            },
        }
    }
}

fn be(addr: Ipv4Addr, port: u16, local: bool) -> Backend {
    Backend { addr, port, local }
}

fn rot(members: &[u32]) -> RotationSpec {
    RotationSpec {
        members: members.to_vec(),
        maglev: vec![].into(),
    }
}

fn services(o: &Opts) -> ServiceTable {
    let mut b = ServiceTableBuilder::new(1);
    let add = |b: &mut ServiceTableBuilder,
               spec: ServiceSpec,
               fes: &[(Ipv4Addr, u16, u8, FrontendKind, bool, bool)]| {
        let s = b.service(&spec).expect("service");
        for &(addr, port, proto, kind, local_only, keep_source) in fes {
            b.frontend(Frontend {
                addr,
                port,
                proto,
                kind,
                service: s,
                local_only,
                keep_source,
            });
        }
    };
    let cip = FrontendKind::ClusterIp;
    let np = FrontendKind::NodePort;
    let one = |addr, port, local| ServiceSpec {
        backends: vec![be(addr, port, local)],
        cluster: rot(&[0]),
        local: if local { rot(&[0]) } else { rot(&[]) },
        affinity_timeout_s: 0,
        affinity_id: 0,
    };
    add(
        &mut b,
        one(POD_B, 8080, true),
        &[(CIP_LOCAL, 80, TCP, cip, false, false)],
    );
    add(
        &mut b,
        one(POD_B, 5353, true),
        &[(CIP_LOCAL, 53, UDP, cip, false, false)],
    );
    add(
        &mut b,
        one(REMOTE_POD, 8080, false),
        &[(CIP_REMOTE, 80, TCP, cip, false, false)],
    );
    add(
        &mut b,
        one(REMOTE_POD, 5353, false),
        &[(CIP_REMOTE, 53, UDP, cip, false, false)],
    );
    add(
        &mut b,
        ServiceSpec {
            backends: (0..4).map(|i| be(many_backend(i), 8080, false)).collect(),
            cluster: RotationSpec {
                members: vec![0, 1, 2, 3],
                maglev: MANY_MAGLEV.to_vec().into(),
            },
            local: rot(&[]),
            affinity_timeout_s: 0,
            affinity_id: 0,
        },
        &[(CIP_MANY, 80, TCP, cip, false, false)],
    );
    add(
        &mut b,
        ServiceSpec::default(),
        &[
            (CIP_EMPTY, 80, TCP, cip, false, false),
            (CIP_EMPTY, 53, UDP, cip, false, false),
        ],
    );
    add(
        &mut b,
        ServiceSpec {
            backends: (0..4).map(|i| be(many_backend(i), 9090, false)).collect(),
            cluster: o.aff.clone(),
            local: rot(&[]),
            affinity_timeout_s: 60,
            affinity_id: 0,
        },
        &[(CIP_AFF, 80, TCP, cip, false, false)],
    );
    let mixed = ServiceSpec {
        backends: vec![be(POD_B, 8080, true), be(REMOTE_POD, 8080, false)],
        cluster: rot(&[0, 1]),
        local: rot(&[0]),
        affinity_timeout_s: 0,
        affinity_id: 0,
    };
    add(
        &mut b,
        mixed.clone(),
        &[(NODE_IP, NP_LOCAL, TCP, np, true, true)],
    );
    add(
        &mut b,
        one(REMOTE_POD, 8080, false),
        &[(NODE_IP, NP_LOCAL_NONE, TCP, np, true, true)],
    );
    add(
        &mut b,
        one(REMOTE_POD, 8080, false),
        &[(NODE_IP, NP_CLUSTER, TCP, np, false, false)],
    );
    add(&mut b, mixed, &[(CIP_ITP, 80, TCP, cip, true, false)]);
    add(
        &mut b,
        one(REMOTE_POD, 8080, false),
        &[(CIP_ITP_NONE, 80, TCP, cip, true, false)],
    );
    add(
        &mut b,
        one(POD_A, 8080, true),
        &[(CIP_HAIRPIN, 80, TCP, cip, false, false)],
    );
    b.build().expect("table")
}

fn snapshot(o: &Opts) -> Snapshot {
    snapshot_with(o, services(o))
}

fn snapshot_with(o: &Opts, table: ServiceTable) -> Snapshot {
    snapshot_full(o, table, None, None)
}

fn snapshot_full(
    o: &Opts,
    table: ServiceTable,
    policy: Option<PolicyTable>,
    host: Option<dataplane::snapshot::HostPath>,
) -> Snapshot {
    let mut b = SnapshotBuilder::new(1, GATEWAY);
    if let Some(p) = policy {
        b.policy(Arc::new(p));
    }
    if let Some(h) = host {
        b.host_path(h);
    }
    for (ifindex, mac, role) in [
        (IF_A, LXC_A_MAC, InterfaceRole::Pod),
        (IF_B, LXC_B_MAC, InterfaceRole::Pod),
        (IF_UPLINK, UPLINK_MAC, InterfaceRole::Uplink),
    ] {
        b.interface(InterfaceEntry { ifindex, mac, role });
    }
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
    b.overlay(OverlayConfig {
        node_ip: NODE_IP,
        vtep_mac: derived_vtep_mac(NODE_IP),
        uplink_ifindex: IF_UPLINK,
        uplink_mtu: 1500,
        port: VXLAN_PORT,
        vni: 1,
    });
    b.remote(RemoteNode {
        pod_net: Ipv4Addr::new(10, 244, 2, 0),
        prefix_len: 24,
        vtep_ip: PEER_IP,
        vtep_mac: derived_vtep_mac(PEER_IP),
        next_hop: PEER_IP,
    });
    b.neighbor(PEER_IP, PEER_MAC);
    b.neighbor(ROUTER, ROUTER_MAC);
    b.neighbor(EXT_CLIENT, EXT_MAC);
    b.services(Arc::new(table));
    b.nat(NatConfig {
        node_addrs: vec![NODE_IP],
        hairpin_addr: HAIRPIN,
        ports: o.ports,
        pod_net: Ipv4Addr::new(10, 244, 1, 0),
        pod_prefix: 24,
        masquerade: o.masquerade,
        uplink_net: Ipv4Addr::new(172, 18, 0, 0),
        uplink_prefix: 24,
        uplink_gateway: Some(ROUTER),
    });
    b.build()
}

fn snap() -> Snapshot {
    snapshot(&Opts::default())
}

// ---- workers --------------------------------------------------------------------------------

/// One node's workers, each with its own flow state.
struct Node {
    workers: Vec<Flows>,
    arps: Vec<ArpThrottle>,
}

/// What happened to one frame.
#[derive(Debug)]
struct Out {
    v: Verdict,
    frame: Vec<u8>,
    /// The worker that finished it.
    worker: u16,
    /// Whether it was handed over.
    handed: bool,
}

fn chunk(frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    buf
}

impl Node {
    fn new(workers: u16) -> Self {
        // One affinity table for the node, as the runtime shares it between workers.
        let affinity = Arc::new(Affinity::new(64));
        let flows = (0..workers)
            .map(|_| {
                let ct = Conntrack::new(Config {
                    capacity: 1024,
                    seed: 7,
                    timeouts: Timeouts::default(),
                })
                .expect("conntrack");
                Flows::new(ct, Arc::clone(&affinity))
            })
            .collect();
        Node {
            workers: flows,
            arps: (0..workers).map(|_| ArpThrottle::default()).collect(),
        }
    }

    fn n(&self) -> u16 {
        self.workers.len() as u16
    }

    /// Runs `frame` (received on `rx`) on worker `start`, following a handoff to the owner.
    fn send_on(&mut self, snap: &Snapshot, rx: u32, frame: &[u8], start: u16, now: u64) -> Out {
        let n = self.n();
        let mut buf = chunk(frame);
        let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("fits");
        let w = usize::from(start);
        let mut ctx = Ctx {
            now_ns: now,
            arp: &mut self.arps[w],
            flows: Some(&mut self.workers[w]),
            steer: Steer {
                worker: start,
                workers: n,
            },
        };
        let v = process_ctx(&mut ctx, snap, rx, &mut pkt);
        let Verdict::Handoff { worker, resume } = v else {
            return Out {
                v,
                frame: pkt.data().to_vec(),
                worker: start,
                handed: false,
            };
        };
        assert_ne!(worker, start, "handed to itself");
        assert!(worker < n, "handed to worker {worker} of {n}");
        let moved = pkt.data().to_vec();
        let mut buf2 = chunk(&moved);
        let mut pkt2 = PacketBuf::new(&mut buf2, HEADROOM, moved.len()).expect("fits");
        let o = usize::from(worker);
        let mut ctx = Ctx {
            now_ns: now,
            arp: &mut self.arps[o],
            flows: Some(&mut self.workers[o]),
            steer: Steer { worker, workers: n },
        };
        let v = process_resumed(&mut ctx, snap, rx, resume, &mut pkt2);
        assert!(
            !matches!(v, Verdict::Handoff { .. }),
            "handed over twice: {v:?}"
        );
        Out {
            v,
            frame: pkt2.data().to_vec(),
            worker,
            handed: true,
        }
    }

    /// A packet starting a flow: sent to worker 0, followed to its owner.
    fn request(&mut self, snap: &Snapshot, rx: u32, frame: &[u8], now: u64) -> Out {
        self.send_on(snap, rx, frame, 0, now)
    }

    /// A later packet of the flow owned by `owner`: sent to another worker first, it must be
    /// handed to the owner (with more than one worker).
    fn via_owner(&mut self, snap: &Snapshot, rx: u32, frame: &[u8], owner: u16, now: u64) -> Out {
        let n = self.n();
        let out = self.send_on(snap, rx, frame, (owner + 1) % n, now);
        assert_eq!(out.worker, owner, "not steered to the flow's owner");
        assert_eq!(out.handed, n > 1, "handoff with {n} workers");
        out
    }

    /// A packet that may or may not be steered (its flow may be gone): sent to worker 0.
    fn via_owner_or_any(&mut self, snap: &Snapshot, rx: u32, frame: &[u8], now: u64) -> Out {
        self.send_on(snap, rx, frame, 0, now)
    }

    fn state(&mut self, owner: u16, key: &FlowKey, now: u64) -> Option<FlowState> {
        self.workers[usize::from(owner)]
            .ct
            .lookup(key, now)
            .map(|f| f.state)
    }
}

fn tx(ifindex: u32, kind: TxKind) -> Verdict {
    Verdict::Tx { ifindex, kind }
}

// ---- independent frame builders --------------------------------------------------------------

/// RFC 1071, written separately from `wire::checksum`.
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

/// IPv4 packet: 20-byte header (identification `id`, DF when `df`), then `l4`.
fn ip_full(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    id: u16,
    df: bool,
    l4: &[u8],
) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[if df { 0x40 } else { 0 }, 0, ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// A host's packet (identification 0xbeef, DF).
fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, l4: &[u8]) -> Vec<u8> {
    ip_full(src, dst, proto, ttl, 0xbeef, true, l4)
}

fn eth(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

#[derive(Clone, Copy)]
struct Seg {
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
}

const SEQ: u32 = 0x1122_3344;
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

fn seg(flags: u8) -> Seg {
    Seg {
        seq: SEQ,
        ack: if flags & ACK != 0 { 0x5566_7788 } else { 0 },
        flags,
        win: 0xfaf0,
    }
}

fn tcp_l4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, s: Seg, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&s.seq.to_be_bytes());
    t.extend_from_slice(&s.ack.to_be_bytes());
    t.extend_from_slice(&[0x50, s.flags]);
    t.extend_from_slice(&s.win.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(data);
    let c = csum(&[&pseudo(src, dst, TCP, t.len()), &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A TCP packet with `flags` (payload on segments without SYN/FIN/RST).
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, ttl: u8) -> Vec<u8> {
    let data: &[u8] = if flags & (SYN | FIN | RST) == 0 {
        PAYLOAD
    } else {
        b""
    };
    ip(
        src,
        dst,
        TCP,
        ttl,
        &tcp_l4(src, dst, sport, dport, seg(flags), data),
    )
}

fn udp_l4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let c = match csum(&[&pseudo(src, dst, UDP, u.len()), &u]) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ttl: u8) -> Vec<u8> {
    ip(
        src,
        dst,
        UDP,
        ttl,
        &udp_l4(src, dst, sport, dport, b"dns query?"),
    )
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16, ttl: u8) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(b"ping-payload");
    let c = csum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, ICMP, ttl, &m)
}

/// ICMP error `src` -> `dst` quoting the first 28 bytes (IP header + 8) of `about`.
fn icmp_err(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: u8,
    code: u8,
    rest: [u8; 4],
    about: &[u8],
    ttl: u8,
) -> Vec<u8> {
    let mut m = vec![t, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(&about[..28]);
    let c = csum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, ICMP, ttl, &m)
}

fn from_a(ip_packet: &[u8]) -> Vec<u8> {
    eth(LXC_A_MAC, POD_A_MAC, ip_packet)
}
fn from_b(ip_packet: &[u8]) -> Vec<u8> {
    eth(LXC_B_MAC, POD_B_MAC, ip_packet)
}
fn to_a(ip_packet: &[u8]) -> Vec<u8> {
    eth(POD_A_MAC, LXC_A_MAC, ip_packet)
}
fn to_b(ip_packet: &[u8]) -> Vec<u8> {
    eth(POD_B_MAC, LXC_B_MAC, ip_packet)
}
/// From `mac` on the uplink's wire to this node.
fn on_uplink(mac: Mac, ip_packet: &[u8]) -> Vec<u8> {
    eth(UPLINK_MAC, mac, ip_packet)
}

/// VXLAN from the peer node carrying `inner_ip` (as a kernel vxlan device sends it).
fn vxlan_in(inner_ip: &[u8]) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend(eth(
        derived_vtep_mac(NODE_IP),
        derived_vtep_mac(PEER_IP),
        inner_ip,
    ));
    let mut u = Vec::new();
    u.extend_from_slice(&50000u16.to_be_bytes());
    u.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    u.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(vx);
    eth(
        UPLINK_MAC,
        PEER_MAC,
        &ip_full(PEER_IP, NODE_IP, UDP, 64, 0, true, &u),
    )
}

/// Checks every checksum of the IPv4 packet at `p` from scratch (into ICMP errors' quotes:
/// the quoted IP header).
fn assert_sums(p: &[u8]) {
    assert_eq!(csum(&[&p[..20]]), 0, "IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let l4 = &p[20..total];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    match p[9] {
        TCP => assert_eq!(
            csum(&[&pseudo(src, dst, TCP, l4.len()), l4]),
            0,
            "TCP checksum"
        ),
        UDP if l4[6..8] == [0, 0] => {}
        UDP => assert_eq!(
            csum(&[&pseudo(src, dst, UDP, l4.len()), l4]),
            0,
            "UDP checksum"
        ),
        ICMP => {
            assert_eq!(csum(&[l4]), 0, "ICMP checksum");
            if matches!(l4[0], 3 | 11) {
                assert_eq!(csum(&[&l4[8..28]]), 0, "quoted IPv4 header checksum");
            }
        }
        _ => {}
    }
}

/// Checks an encapsulated frame to the peer node and returns its inner IP packet.
fn assert_encap(out: &[u8]) -> Vec<u8> {
    assert_eq!(&out[0..6], &PEER_MAC.0, "outer destination MAC");
    assert_eq!(&out[6..12], &UPLINK_MAC.0, "outer source MAC");
    let inner_len = out.len() - 50;
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        (32768..=60999).contains(&sport),
        "outer source port {sport}"
    );
    let mut udp_hdr = sport.to_be_bytes().to_vec();
    udp_hdr.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    udp_hdr.extend_from_slice(&((inner_len + 16) as u16).to_be_bytes());
    udp_hdr.extend_from_slice(&[0, 0, 0x08, 0, 0, 0, 0, 0, 1, 0]);
    udp_hdr.extend_from_slice(&derived_vtep_mac(PEER_IP).0);
    udp_hdr.extend_from_slice(&derived_vtep_mac(NODE_IP).0);
    udp_hdr.extend_from_slice(&[0x08, 0x00]);
    let outer = ip_full(NODE_IP, PEER_IP, UDP, 64, 0, true, &udp_hdr);
    // The outer header's total length covers the inner packet too.
    let mut expected_outer = outer.clone();
    let total = (out.len() - 14) as u16;
    expected_outer[2..4].copy_from_slice(&total.to_be_bytes());
    expected_outer[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&[&expected_outer[..20]]);
    expected_outer[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        &out[14..64],
        &expected_outer[..],
        "outer IPv4/UDP/VXLAN/inner Ethernet"
    );
    let inner = out[64..].to_vec();
    assert_sums(&inner);
    inner
}

fn port_at(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src,
        dst,
        sport,
        dport,
        proto,
    }
}

const WORKERS: [u16; 3] = [1, 2, 3];

// ---- 1. pod -> ClusterIP --------------------------------------------------------------------

#[test]
fn pod_to_clusterip_tcp_local_backend_dnat_reply_and_state() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 41000 + n;
        let k = key(POD_A, sport, CIP_LOCAL, 80, TCP);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_LOCAL, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward), "n={n}");
        assert_eq!(out.frame, to_b(&tcp(POD_A, sport, POD_B, 8080, SYN, 63)));
        assert_sums(&out.frame[14..]);
        let owner = out.worker;
        assert_eq!(node.state(owner, &k, 1), Some(FlowState::TcpSynSent));
        for w in (0..n).filter(|&w| w != owner) {
            assert_eq!(node.state(w, &k, 1), None, "flow only on its owner");
        }
        // SYN-ACK from the backend pod: from the ClusterIP again.
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 8080, POD_A, sport, SYN | ACK, 64)),
            owner,
            2,
        );
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        assert_eq!(
            r.frame,
            to_a(&tcp(CIP_LOCAL, 80, POD_A, sport, SYN | ACK, 63))
        );
        assert_eq!(node.state(owner, &k, 2), Some(FlowState::TcpSynRecv));
        let a = node.via_owner(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_LOCAL, 80, ACK, 64)),
            owner,
            3,
        );
        assert_eq!(a.frame, to_b(&tcp(POD_A, sport, POD_B, 8080, ACK, 63)));
        assert_eq!(node.state(owner, &k, 3), Some(FlowState::TcpEstablished));
        let f = node.via_owner(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_LOCAL, 80, FIN | ACK, 64)),
            owner,
            4,
        );
        assert_eq!(f.v, tx(IF_B, TxKind::Forward));
        assert_eq!(node.state(owner, &k, 4), Some(FlowState::TcpFinWait));
        let f = node.via_owner(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 8080, POD_A, sport, FIN | ACK, 64)),
            owner,
            5,
        );
        assert_eq!(
            f.frame,
            to_a(&tcp(CIP_LOCAL, 80, POD_A, sport, FIN | ACK, 63))
        );
        assert_eq!(node.state(owner, &k, 5), Some(FlowState::TcpTimeWait));
        let s = node.workers[usize::from(owner)].stats;
        assert_eq!((s.lb_new_flows, s.ct_hits), (1, 4));
    }
}

#[test]
fn pod_to_clusterip_udp_local_backend_and_reply() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 52000 + n;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, sport, CIP_LOCAL, 53, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward));
        assert_eq!(out.frame, to_b(&udp(POD_A, sport, POD_B, 5353, 63)));
        assert_sums(&out.frame[14..]);
        let k = key(POD_A, sport, CIP_LOCAL, 53, UDP);
        assert_eq!(node.state(out.worker, &k, 1), Some(FlowState::Udp));
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&udp(POD_B, 5353, POD_A, sport, 64)),
            out.worker,
            2,
        );
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        assert_eq!(r.frame, to_a(&udp(CIP_LOCAL, 53, POD_A, sport, 63)));
        assert_sums(&r.frame[14..]);
        assert_eq!(node.state(out.worker, &k, 2), Some(FlowState::UdpAssured));
    }
}

#[test]
fn pod_to_clusterip_remote_backend_is_encapsulated_and_the_reply_decapsulated() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 43000 + n;
        // TCP.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_REMOTE, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap));
        assert_eq!(
            assert_encap(&out.frame),
            tcp(POD_A, sport, REMOTE_POD, 8080, SYN, 63)
        );
        let reply = vxlan_in(&tcp(REMOTE_POD, 8080, POD_A, sport, SYN | ACK, 63));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Decap));
        assert_eq!(
            r.frame,
            to_a(&tcp(CIP_REMOTE, 80, POD_A, sport, SYN | ACK, 62))
        );
        assert_sums(&r.frame[14..]);
        // UDP.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, sport, CIP_REMOTE, 53, 64)),
            3,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap));
        assert_eq!(
            assert_encap(&out.frame),
            udp(POD_A, sport, REMOTE_POD, 5353, 63)
        );
        let reply = vxlan_in(&udp(REMOTE_POD, 5353, POD_A, sport, 64));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 4);
        assert_eq!(r.v, tx(IF_A, TxKind::Decap));
        assert_eq!(r.frame, to_a(&udp(CIP_REMOTE, 53, POD_A, sport, 63)));
    }
}

// ---- 2. backend selection, rejects ----------------------------------------------------------

#[test]
fn selection_follows_the_maglev_table_exactly_and_in_proportion() {
    let snap = snap();
    let mut node = Node::new(1);
    let mut counts = [0u32; 4];
    let flows = 7000u16;
    for i in 0..flows {
        let sport = 10000 + i;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_MANY, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap));
        let inner = &out.frame[64..];
        let dst = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
        let want = MANY_MAGLEV[(flow_hash(&key(POD_A, sport, CIP_MANY, 80, TCP)) % 7) as usize];
        assert_eq!(dst, many_backend(want as u8), "flow {sport}: Maglev entry");
        counts[want as usize] += 1;
    }
    let weights = [3.0, 1.0, 1.0, 2.0];
    for (b, &c) in counts.iter().enumerate() {
        let expected = f64::from(flows) * weights[b] / 7.0;
        let ratio = f64::from(c) / expected;
        assert!(
            (0.85..1.15).contains(&ratio),
            "backend {b}: {c} flows, expected about {expected}"
        );
    }
}

#[test]
fn empty_rotation_tcp_gets_a_reset_per_rfc9293() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        // SYN (no ACK): <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, SYN counts one.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 45000, CIP_EMPTY, 80, SYN, 64)),
            1,
        );
        assert_eq!(
            out.v,
            tx(IF_A, TxKind::Reject(DropReason::ServiceNoBackend))
        );
        let rst = Seg {
            seq: 0,
            ack: SEQ + 1,
            flags: RST | ACK,
            win: 0,
        };
        let want = ip_full(
            CIP_EMPTY,
            POD_A,
            TCP,
            64,
            0,
            true,
            &tcp_l4(CIP_EMPTY, POD_A, 80, 45000, rst, b""),
        );
        assert_eq!(out.frame, to_a(&want));
        assert_sums(&out.frame[14..]);
        // Data with ACK: <SEQ=SEG.ACK><CTL=RST>.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 45001, CIP_EMPTY, 80, ACK, 64)),
            1,
        );
        assert_eq!(
            out.v,
            tx(IF_A, TxKind::Reject(DropReason::ServiceNoBackend))
        );
        let rst = Seg {
            seq: 0x5566_7788,
            ack: 0,
            flags: RST,
            win: 0,
        };
        let want = ip_full(
            CIP_EMPTY,
            POD_A,
            TCP,
            64,
            0,
            true,
            &tcp_l4(CIP_EMPTY, POD_A, 80, 45001, rst, b""),
        );
        assert_eq!(out.frame, to_a(&want));
        // Data without ACK: SEG.LEN counts the payload, FIN one more.
        let data_fin = ip(
            POD_A,
            CIP_EMPTY,
            TCP,
            64,
            &tcp_l4(POD_A, CIP_EMPTY, 45002, 80, seg(FIN), PAYLOAD),
        );
        let out = node.request(&snap, IF_A, &from_a(&data_fin), 1);
        let rst = Seg {
            seq: 0,
            ack: SEQ + PAYLOAD.len() as u32 + 1,
            flags: RST | ACK,
            win: 0,
        };
        let want = ip_full(
            CIP_EMPTY,
            POD_A,
            TCP,
            64,
            0,
            true,
            &tcp_l4(CIP_EMPTY, POD_A, 80, 45002, rst, b""),
        );
        assert_eq!(out.frame, to_a(&want));
        // Never a reset for a reset.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 45003, CIP_EMPTY, 80, RST, 64)),
            1,
        );
        assert_eq!(out.v, Verdict::Drop(DropReason::ServiceNoBackend));
        // No flow was created for any of them.
        assert!(node.workers.iter().all(|w| w.ct.is_empty()));
    }
}

#[test]
fn empty_rotation_udp_gets_port_unreachable_quoting_the_datagram() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let dgram = udp(POD_A, 46000, CIP_EMPTY, 53, 64);
        let out = node.request(&snap, IF_A, &from_a(&dgram), 1);
        assert_eq!(
            out.v,
            tx(IF_A, TxKind::Reject(DropReason::ServiceNoBackend))
        );
        let want = ip_full(CIP_EMPTY, POD_A, ICMP, 64, 0, false, &{
            let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&dgram[..28]);
            let c = csum(&[&m]);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            m
        });
        assert_eq!(out.frame, to_a(&want));
        assert_sums(&out.frame[14..]);
    }
}

#[test]
fn unknown_port_is_rejected_and_icmp_echo_to_a_clusterip_dropped() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 47000, CIP_LOCAL, 81, SYN, 64)),
            1,
        );
        assert_eq!(
            out.v,
            tx(IF_A, TxKind::Reject(DropReason::ServiceUnknownPort))
        );
        let rst = Seg {
            seq: 0,
            ack: SEQ + 1,
            flags: RST | ACK,
            win: 0,
        };
        let want = ip_full(
            CIP_LOCAL,
            POD_A,
            TCP,
            64,
            0,
            true,
            &tcp_l4(CIP_LOCAL, POD_A, 81, 47000, rst, b""),
        );
        assert_eq!(out.frame, to_a(&want));
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, 47001, CIP_LOCAL, 54, 64)),
            1,
        );
        assert_eq!(
            out.v,
            tx(IF_A, TxKind::Reject(DropReason::ServiceUnknownPort))
        );
        assert_eq!(&out.frame[34..36], &[3, 3]);
        let out = node.request(&snap, IF_A, &from_a(&echo(POD_A, CIP_LOCAL, 8, 77, 64)), 1);
        assert_eq!(out.v, Verdict::Drop(DropReason::ServiceUnknownPort));
        assert!(node.workers.iter().all(|w| w.ct.is_empty()));
    }
}

// ---- 3. session affinity --------------------------------------------------------------------

/// The backend (last octet - 10) a SYN to `CIP_AFF` from `sport` was sent to.
fn aff_backend(node: &mut Node, snap: &Snapshot, sport: u16, now: u64) -> u8 {
    let out = node.request(
        snap,
        IF_A,
        &from_a(&tcp(POD_A, sport, CIP_AFF, 80, SYN, 64)),
        now,
    );
    assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap), "port {sport}");
    let inner = assert_encap(&out.frame);
    assert_eq!(port_at(&inner, 22), 9090);
    inner[19] - 10
}

#[test]
fn affinity_same_client_same_backend_until_timeout_and_only_while_in_rotation() {
    let s = NS_PER_SEC;
    for n in WORKERS {
        let mut node = Node::new(n);
        let base = snap();
        let first = aff_backend(&mut node, &base, 50000, s);
        for sport in 50001..50040 {
            assert_eq!(
                aff_backend(&mut node, &base, sport, 2 * s),
                first,
                "n={n} port {sport}"
            );
        }
        // The Maglev table now sends this client elsewhere: within the timeout (refreshed by
        // the last new flow at 2 s) the remembered backend still wins.
        let other = (first + 1) % 4;
        let moved = snapshot(&Opts {
            aff: RotationSpec {
                members: vec![0, 1, 2, 3],
                maglev: vec![u16::from(other); 7].into(),
            },
            ..Opts::default()
        });
        for sport in 50100..50110 {
            assert_eq!(
                aff_backend(&mut node, &moved, sport, 61 * s),
                first,
                "within timeout"
            );
        }
        // 60 s after the last new flow (61 s): a new choice, the table's.
        for sport in 50200..50210 {
            assert_eq!(
                aff_backend(&mut node, &moved, sport, 122 * s),
                other,
                "after timeout"
            );
        }
        // The remembered backend left the rotation: not used, though not expired.
        let without: Vec<u32> = (0..4).filter(|&b| b != u32::from(other)).collect();
        let gone = snapshot(&Opts {
            aff: RotationSpec {
                maglev: vec![without[0] as u16; 7].into(),
                members: without.clone(),
            },
            ..Opts::default()
        });
        for sport in 50300..50310 {
            assert_eq!(
                aff_backend(&mut node, &gone, sport, 123 * s),
                without[0] as u8,
                "out of rotation"
            );
        }
    }
}

/// The worker that owns a flow from `POD_A:sport` to a frontend, with `n` workers.
fn owner_of_client_port(sport: u16, n: u16) -> u16 {
    let k = FlowKey {
        src: POD_A,
        dst: CIP_AFF,
        sport,
        dport: 80,
        proto: TCP,
    };
    dataplane::stages::lb::owner(&k, dataplane::stages::lb::FlowRole::ToFrontend, n)
}

#[test]
fn affinity_is_one_table_for_all_workers() {
    let s = NS_PER_SEC;
    let mut node = Node::new(2);
    let base = snap();
    // Every flow so far starts on worker 0's ports only.
    let on0: Vec<u16> = (51000..52000)
        .filter(|&p| owner_of_client_port(p, 2) == 0)
        .take(5)
        .collect();
    let on1: Vec<u16> = (51000..52000)
        .filter(|&p| owner_of_client_port(p, 2) == 1)
        .take(5)
        .collect();
    let first = aff_backend(&mut node, &base, on0[0], s);
    for &p in &on0[1..] {
        assert_eq!(aff_backend(&mut node, &base, p, s), first);
    }
    // The rotation's Maglev table moves this client; worker 1 never saw it, yet it must send
    // the client's new flows to the remembered backend (a per-worker table would not).
    let other = (first + 1) % 4;
    let moved = snapshot(&Opts {
        aff: RotationSpec {
            members: vec![0, 1, 2, 3],
            maglev: vec![u16::from(other); 7].into(),
        },
        ..Opts::default()
    });
    for &p in &on1 {
        let out = node.request(
            &moved,
            IF_A,
            &from_a(&tcp(POD_A, p, CIP_AFF, 80, SYN, 64)),
            2 * s,
        );
        assert_eq!(out.worker, 1, "port {p} is worker 1's");
        let inner = assert_encap(&out.frame);
        assert_eq!(inner[19] - 10, first, "worker 1 follows the shared table");
    }
}

// ---- 4. traffic policies ------------------------------------------------------------------------

#[test]
fn nodeport_local_policy_keeps_the_client_source_and_replies_go_out_the_uplink() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let cport = 33000 + n;
        let out = node.request(
            &snap,
            IF_UPLINK,
            &on_uplink(
                ROUTER_MAC,
                &tcp(EXT_CLIENT, cport, NODE_IP, NP_LOCAL, SYN, 64),
            ),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward));
        assert_eq!(
            out.frame,
            to_b(&tcp(EXT_CLIENT, cport, POD_B, 8080, SYN, 63))
        );
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 8080, EXT_CLIENT, cport, SYN | ACK, 64)),
            out.worker,
            2,
        );
        assert_eq!(r.v, tx(IF_UPLINK, TxKind::Forward));
        assert_eq!(
            r.frame,
            eth(
                EXT_MAC,
                UPLINK_MAC,
                &tcp(NODE_IP, NP_LOCAL, EXT_CLIENT, cport, SYN | ACK, 63)
            )
        );
        assert_sums(&r.frame[14..]);
    }
}

#[test]
fn local_policies_without_local_backend_drop() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_UPLINK,
            &on_uplink(
                ROUTER_MAC,
                &tcp(EXT_CLIENT, 33100, NODE_IP, NP_LOCAL_NONE, SYN, 64),
            ),
            1,
        );
        assert_eq!(out.v, Verdict::Drop(DropReason::ServiceNoLocalBackend));
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 33101, CIP_ITP_NONE, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, Verdict::Drop(DropReason::ServiceNoLocalBackend));
        assert!(node.workers.iter().all(|w| w.ct.is_empty()));
    }
}

#[test]
fn internal_traffic_policy_local_only_uses_local_backends() {
    let snap = snap();
    let mut node = Node::new(1);
    for sport in 34000..34064 {
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_ITP, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward), "port {sport}");
        assert_eq!(out.frame, to_b(&tcp(POD_A, sport, POD_B, 8080, SYN, 63)));
    }
}

#[test]
fn nodeport_cluster_policy_remote_backend_snat_encap_and_reply_restored() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        for (i, cport) in [35000u16, 35001, 35002, 35003].into_iter().enumerate() {
            let now = 1 + i as u64;
            let out = node.request(
                &snap,
                IF_UPLINK,
                &on_uplink(
                    ROUTER_MAC,
                    &tcp(EXT_CLIENT, cport, NODE_IP, NP_CLUSTER, SYN, 64),
                ),
                now,
            );
            assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap), "n={n}");
            let inner = assert_encap(&out.frame);
            let p = port_at(&inner, 20);
            assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&p), "SNAT port {p}");
            assert_eq!(p % n, out.worker, "SNAT port {p} names its owner");
            assert_eq!(inner, tcp(NODE_IP, p, REMOTE_POD, 8080, SYN, 63));
            // The reply comes back through the tunnel to the SNAT port.
            let reply = vxlan_in(&tcp(REMOTE_POD, 8080, NODE_IP, p, SYN | ACK, 64));
            let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, now);
            assert_eq!(r.v, tx(IF_UPLINK, TxKind::Forward));
            assert_eq!(
                r.frame,
                eth(
                    EXT_MAC,
                    UPLINK_MAC,
                    &tcp(NODE_IP, NP_CLUSTER, EXT_CLIENT, cport, SYN | ACK, 63)
                )
            );
            assert_sums(&r.frame[14..]);
        }
    }
}

// ---- 5. hairpin -------------------------------------------------------------------------------

#[test]
fn hairpin_to_itself_comes_from_the_hairpin_address_and_the_reply_from_the_clusterip() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 36000, CIP_HAIRPIN, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_A, TxKind::Forward));
        let p = port_at(&out.frame, 34);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&p));
        assert_eq!(p % n, out.worker);
        assert_eq!(out.frame, to_a(&tcp(HAIRPIN, p, POD_A, 8080, SYN, 63)));
        assert_sums(&out.frame[14..]);
        let r = node.via_owner(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 8080, HAIRPIN, p, SYN | ACK, 64)),
            out.worker,
            2,
        );
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        assert_eq!(
            r.frame,
            to_a(&tcp(CIP_HAIRPIN, 80, POD_A, 36000, SYN | ACK, 63))
        );
    }
}

// ---- 6. masquerade ----------------------------------------------------------------------------

fn to_router(ip_packet: &[u8]) -> Vec<u8> {
    eth(ROUTER_MAC, UPLINK_MAC, ip_packet)
}

#[test]
fn masquerade_snat_to_the_node_via_the_gateway_and_reply_restored() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 37000 + n;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, INTERNET, 443, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
        let p = port_at(&out.frame, 34);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&p), "port {p}");
        assert_eq!(p % n, out.worker, "port {p} names its owner");
        assert_eq!(
            out.frame,
            to_router(&tcp(NODE_IP, p, INTERNET, 443, SYN, 63))
        );
        assert_sums(&out.frame[14..]);
        let reply = on_uplink(ROUTER_MAC, &tcp(INTERNET, 443, NODE_IP, p, SYN | ACK, 50));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        assert_eq!(
            r.frame,
            to_a(&tcp(INTERNET, 443, POD_A, sport, SYN | ACK, 49))
        );
        assert_eq!(
            node.workers[usize::from(out.worker)].stats.masq_new_flows,
            1
        );
        // UDP too.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, sport, INTERNET, 53, 64)),
            3,
        );
        let p = port_at(&out.frame, 34);
        assert_eq!(p % n, out.worker);
        assert_eq!(out.frame, to_router(&udp(NODE_IP, p, INTERNET, 53, 63)));
        let reply = on_uplink(ROUTER_MAC, &udp(INTERNET, 53, NODE_IP, p, 50));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 4);
        assert_eq!(r.frame, to_a(&udp(INTERNET, 53, POD_A, sport, 49)));
    }
}

#[test]
fn masquerade_port_collision_takes_the_next_candidate() {
    let snap = snap();
    let mut node = Node::new(1);
    let sport = 38000;
    let k = key(POD_A, sport, INTERNET, 443, TCP);
    let span = u32::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    let first = SNAT_PORTS.0 + (flow_hash(&k) % span) as u16;
    // Another pod's flow already owns (node, first) -> (INTERNET, 443).
    let other = key(POD_B, 9999, INTERNET, 443, TCP);
    let rw = NatRewrite::snat(NODE_IP, first);
    let ct = &mut node.workers[0].ct;
    let f = ct.new_flow(TCP, SYN, Some(rw), 0, 0);
    ct.insert(&other, &other.reply_key(&rw), f, 0)
        .expect("room");
    let out = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, sport, INTERNET, 443, SYN, 64)),
        1,
    );
    let next = if first == SNAT_PORTS.1 {
        SNAT_PORTS.0
    } else {
        first + 1
    };
    assert_eq!(
        out.frame,
        to_router(&tcp(NODE_IP, next, INTERNET, 443, SYN, 63))
    );
    // Without the other flow the first candidate is taken.
    let mut fresh = Node::new(1);
    let out = fresh.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, sport, INTERNET, 443, SYN, 64)),
        1,
    );
    assert_eq!(port_at(&out.frame, 34), first);
}

#[test]
fn masquerade_port_exhaustion_is_a_drop() {
    let snap = snapshot(&Opts {
        ports: (40000, 40003),
        ..Opts::default()
    });
    let mut node = Node::new(1);
    let mut ports: Vec<u16> = (0..4)
        .map(|i| {
            let out = node.request(
                &snap,
                IF_A,
                &from_a(&tcp(POD_A, 39000 + i, INTERNET, 443, SYN, 64)),
                1,
            );
            assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
            port_at(&out.frame, 34)
        })
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, vec![40000, 40001, 40002, 40003]);
    let out = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 39010, INTERNET, 443, SYN, 64)),
        1,
    );
    assert_eq!(out.v, Verdict::Drop(DropReason::NatPortExhausted));
    // Another destination can reuse the ports (the reply keys differ).
    let out = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 39011, INTERNET, 80, SYN, 64)),
        1,
    );
    assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
    // Once the flows expire (SYN_SENT: 120 s) the ports are free again.
    let out = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 39012, INTERNET, 443, SYN, 64)),
        121 * NS_PER_SEC,
    );
    assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
}

#[test]
fn masquerade_icmp_echo_translates_the_identifier() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&echo(POD_A, INTERNET, 8, 0x4242, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
        let id = port_at(&out.frame, 38);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&id));
        assert_eq!(id % n, out.worker);
        assert_eq!(out.frame, to_router(&echo(NODE_IP, INTERNET, 8, id, 63)));
        assert_sums(&out.frame[14..]);
        let reply = on_uplink(ROUTER_MAC, &echo(INTERNET, NODE_IP, 0, id, 50));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        assert_eq!(r.frame, to_a(&echo(INTERNET, POD_A, 0, 0x4242, 49)));
    }
}

#[test]
fn masquerade_off_sends_the_pod_address_unchanged() {
    let snap = snapshot(&Opts {
        masquerade: false,
        ..Opts::default()
    });
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 37500, INTERNET, 443, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
        assert_eq!(
            out.frame,
            to_router(&tcp(POD_A, 37500, INTERNET, 443, SYN, 63))
        );
        assert!(node.workers.iter().all(|w| w.ct.is_empty()));
    }
}

// ---- 7. ICMP errors about translated flows ----------------------------------------------------

#[test]
fn port_unreachable_from_the_backend_is_rewritten_to_come_from_the_service() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 48000 + n;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, sport, CIP_LOCAL, 53, 64)),
            1,
        );
        let delivered = out.frame[14..].to_vec();
        let err = icmp_err(POD_B, POD_A, 3, 3, [0; 4], &delivered, 64);
        let r = node.via_owner(&snap, IF_B, &from_b(&err), out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        let quoted = udp(POD_A, sport, CIP_LOCAL, 53, 63);
        assert_eq!(
            r.frame,
            to_a(&icmp_err(CIP_LOCAL, POD_A, 3, 3, [0; 4], &quoted, 63))
        );
        assert_sums(&r.frame[14..]);
        // The same from the remote backend of another service, through the tunnel.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, CIP_REMOTE, 80, SYN, 64)),
            3,
        );
        let inner = assert_encap(&out.frame);
        let err = vxlan_in(&icmp_err(REMOTE_POD, POD_A, 3, 3, [0; 4], &inner, 64));
        let r = node.via_owner(&snap, IF_UPLINK, &err, out.worker, 4);
        assert_eq!(r.v, tx(IF_A, TxKind::Decap));
        let quoted = tcp(POD_A, sport, CIP_REMOTE, 80, SYN, 63);
        assert_eq!(
            r.frame,
            to_a(&icmp_err(CIP_REMOTE, POD_A, 3, 3, [0; 4], &quoted, 63))
        );
    }
}

#[test]
fn fragmentation_needed_about_a_masqueraded_flow_reaches_the_pod() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 49000 + n;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, INTERNET, 443, ACK, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
        let sent = out.frame[14..].to_vec();
        let mtu = [0, 0, 0x05, 0x78];
        let err = on_uplink(ROUTER_MAC, &icmp_err(ROUTER, NODE_IP, 3, 4, mtu, &sent, 64));
        let r = node.via_owner(&snap, IF_UPLINK, &err, out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        let quoted = tcp(POD_A, sport, INTERNET, 443, ACK, 63);
        assert_eq!(
            r.frame,
            to_a(&icmp_err(ROUTER, POD_A, 3, 4, mtu, &quoted, 63)),
            "router keeps its address; the quote names the pod again"
        );
        assert_sums(&r.frame[14..]);
        // An error about no flow of ours from the uplink is not routed.
        let stray = tcp(NODE_IP, 40001, INTERNET, 444, ACK, 63);
        let err = on_uplink(
            ROUTER_MAC,
            &icmp_err(ROUTER, NODE_IP, 3, 4, mtu, &stray, 64),
        );
        let r = node.send_on(&snap, IF_UPLINK, &err, 0, 3);
        assert_eq!(r.v, Verdict::Drop(DropReason::UplinkUnexpected));
    }
}

// ---- 9. fragments and malformed input ---------------------------------------------------------

/// Makes `ip_packet` a fragment: MF (`first`) or a later one at offset 8 x 100.
fn fragment(mut p: Vec<u8>, first: bool) -> Vec<u8> {
    if first {
        p[6] = 0x20;
        p[7] = 0;
    } else {
        p[6] = 0;
        p[7] = 100;
    }
    p[10] = 0;
    p[11] = 0;
    let c = csum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

#[test]
fn fragments_to_services_and_snat_addresses_are_dropped() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        for first in [true, false] {
            let cases: [(u32, Vec<u8>); 4] = [
                (
                    IF_A,
                    from_a(&fragment(tcp(POD_A, 1, CIP_LOCAL, 80, ACK, 64), first)),
                ),
                (
                    IF_A,
                    from_a(&fragment(udp(POD_A, 1, CIP_REMOTE, 53, 64), first)),
                ),
                (
                    IF_UPLINK,
                    on_uplink(
                        ROUTER_MAC,
                        &fragment(tcp(EXT_CLIENT, 1, NODE_IP, NP_LOCAL, ACK, 64), first),
                    ),
                ),
                (
                    IF_A,
                    from_a(&fragment(udp(POD_A, 1, INTERNET, 53, 64), first)),
                ),
            ];
            for (i, (rx, frame)) in cases.iter().enumerate() {
                let out = node.send_on(&snap, *rx, frame, 0, 1);
                assert_eq!(
                    out.v,
                    Verdict::Drop(DropReason::ServiceFragment),
                    "case {i} first={first}"
                );
            }
        }
        assert!(node.workers.iter().all(|w| w.ct.is_empty()));
    }
}

#[test]
fn truncated_transport_to_a_service_is_dropped() {
    let snap = snap();
    let mut node = Node::new(2);
    // A TCP header cut to 10 bytes (IP total length says so).
    let full = tcp(POD_A, 1234, CIP_LOCAL, 80, SYN, 64);
    let mut cut = ip(POD_A, CIP_LOCAL, TCP, 64, &full[20..30]);
    cut.truncate(30);
    let out = node.send_on(&snap, IF_A, &from_a(&cut), 0, 1);
    assert_eq!(out.v, Verdict::Drop(DropReason::ServiceUnknownPort));
    // An ICMP error quoting a cut header about a service flow: not translated, not routed
    // from the uplink.
    let err = ip(
        ROUTER,
        NODE_IP,
        ICMP,
        64,
        &[3, 4, 0, 0, 0, 0, 0, 0, 0x45, 0],
    );
    let out = node.send_on(&snap, IF_UPLINK, &on_uplink(ROUTER_MAC, &err), 0, 1);
    assert_eq!(out.v, Verdict::Drop(DropReason::UplinkUnexpected));
}

/// Frames that reach the lb stage (with the flows `warm` sets up), for mutation.
fn service_frames(node: &mut Node, snap: &Snapshot) -> Vec<(u32, Vec<u8>)> {
    let masq = node.request(
        snap,
        IF_A,
        &from_a(&tcp(POD_A, 2000, INTERNET, 443, ACK, 64)),
        1,
    );
    let np = node.request(
        snap,
        IF_UPLINK,
        &on_uplink(
            ROUTER_MAC,
            &tcp(EXT_CLIENT, 2001, NODE_IP, NP_CLUSTER, SYN, 64),
        ),
        1,
    );
    let np_port = port_at(&np.frame, 84);
    let local = node.request(snap, IF_A, &from_a(&udp(POD_A, 2002, CIP_LOCAL, 53, 64)), 1);
    let masq_ip = masq.frame[14..].to_vec();
    let masq_port = port_at(&masq.frame, 34);
    vec![
        (IF_A, from_a(&tcp(POD_A, 2003, CIP_REMOTE, 80, SYN, 64))),
        (IF_A, from_a(&tcp(POD_A, 2004, CIP_EMPTY, 80, SYN, 64))),
        (IF_A, from_a(&udp(POD_A, 2005, CIP_EMPTY, 53, 64))),
        (IF_A, from_a(&tcp(POD_A, 2006, CIP_HAIRPIN, 80, ACK, 64))),
        (
            IF_UPLINK,
            on_uplink(
                ROUTER_MAC,
                &tcp(EXT_CLIENT, 2007, NODE_IP, NP_LOCAL, SYN, 64),
            ),
        ),
        (
            IF_UPLINK,
            on_uplink(ROUTER_MAC, &tcp(INTERNET, 443, NODE_IP, masq_port, ACK, 64)),
        ),
        (
            IF_UPLINK,
            vxlan_in(&tcp(REMOTE_POD, 8080, NODE_IP, np_port, ACK, 64)),
        ),
        (
            IF_B,
            from_b(&icmp_err(
                POD_B,
                POD_A,
                3,
                3,
                [0; 4],
                &local.frame[14..],
                64,
            )),
        ),
        (
            IF_UPLINK,
            on_uplink(
                ROUTER_MAC,
                &icmp_err(ROUTER, NODE_IP, 3, 4, [0, 0, 5, 0x78], &masq_ip, 64),
            ),
        ),
        (
            IF_UPLINK,
            on_uplink(ROUTER_MAC, &echo(INTERNET, NODE_IP, 0, masq_port, 64)),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_service_frames_never_panic(
        which in 0usize..10,
        mutations in proptest::collection::vec((0usize..200, any::<u8>()), 0..6),
        cut in proptest::option::of(0usize..200),
        fix_ip_sum in any::<bool>(),
        start in 0u16..2,
    ) {
        let snap = snap();
        let mut node = Node::new(2);
        let frames = service_frames(&mut node, &snap);
        let (rx, mut frame) = frames[which].clone();
        for (at, byte) in mutations {
            if let Some(b) = frame.get_mut(at) {
                *b = byte;
            }
        }
        if let Some(len) = cut {
            frame.truncate(len);
        }
        if fix_ip_sum && frame.len() >= 34 && frame[14] == 0x45 {
            frame[24] = 0;
            frame[25] = 0;
            let c = csum(&[&frame[14..34]]);
            frame[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let out = node.send_on(&snap, rx, &frame, start, 2);
        if let Verdict::Tx { .. } = out.v {
            if out.frame[12..14] == [0x08, 0x00] {
                prop_assert_eq!(csum(&[&out.frame[14..34]]), 0, "IPv4 header checksum of a sent frame");
            }
        }
    }
}

// ---- 10. no allocation ------------------------------------------------------------------------

/// As `Node::send_on`, into preallocated buffers.
#[allow(clippy::too_many_arguments)]
fn run_into(
    node: &mut Node,
    snap: &Snapshot,
    rx: u32,
    frame: &[u8],
    start: u16,
    now: u64,
    buf: &mut [u8],
    buf2: &mut [u8],
) -> Verdict {
    let n = node.n();
    buf[HEADROOM..HEADROOM + frame.len()].copy_from_slice(frame);
    let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, frame.len()) else {
        return Verdict::Drop(DropReason::FrameTooShort);
    };
    let w = usize::from(start);
    let mut ctx = Ctx {
        now_ns: now,
        arp: &mut node.arps[w],
        flows: Some(&mut node.workers[w]),
        steer: Steer {
            worker: start,
            workers: n,
        },
    };
    let v = process_ctx(&mut ctx, snap, rx, &mut pkt);
    let Verdict::Handoff { worker, resume } = v else {
        return v;
    };
    let len = pkt.len();
    buf2[HEADROOM..HEADROOM + len].copy_from_slice(pkt.data());
    let Some(mut pkt2) = PacketBuf::new(buf2, HEADROOM, len) else {
        return Verdict::Drop(DropReason::FrameTooShort);
    };
    let o = usize::from(worker);
    let mut ctx = Ctx {
        now_ns: now,
        arp: &mut node.arps[o],
        flows: Some(&mut node.workers[o]),
        steer: Steer { worker, workers: n },
    };
    process_resumed(&mut ctx, snap, rx, resume, &mut pkt2)
}

#[test]
fn no_allocation_for_new_and_established_service_flows() {
    let snap = snap();
    let mut node = Node::new(2);
    // Established flows (set up outside the measurement) and their replies.
    let mut established: Vec<(u32, Vec<u8>)> = Vec::new();
    let local = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 3000, CIP_LOCAL, 80, SYN, 64)),
        1,
    );
    assert_eq!(local.v, tx(IF_B, TxKind::Forward));
    established.push((IF_A, from_a(&tcp(POD_A, 3000, CIP_LOCAL, 80, ACK, 64))));
    established.push((IF_B, from_b(&tcp(POD_B, 8080, POD_A, 3000, ACK, 64))));
    let masq = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 3001, INTERNET, 443, SYN, 64)),
        1,
    );
    let p = port_at(&masq.frame, 34);
    established.push((IF_A, from_a(&tcp(POD_A, 3001, INTERNET, 443, ACK, 64))));
    established.push((
        IF_UPLINK,
        on_uplink(ROUTER_MAC, &tcp(INTERNET, 443, NODE_IP, p, ACK, 64)),
    ));
    let np = node.request(
        &snap,
        IF_UPLINK,
        &on_uplink(
            ROUTER_MAC,
            &tcp(EXT_CLIENT, 3002, NODE_IP, NP_CLUSTER, SYN, 64),
        ),
        1,
    );
    let np_port = port_at(&np.frame, 84);
    established.push((
        IF_UPLINK,
        vxlan_in(&tcp(REMOTE_POD, 8080, NODE_IP, np_port, ACK, 64)),
    ));
    // New flows of every kind, one frame each.
    let fresh: Vec<(u32, Vec<u8>)> = (0..50u16)
        .flat_map(|i| {
            [
                (IF_A, from_a(&tcp(POD_A, 20000 + i, CIP_LOCAL, 80, SYN, 64))),
                (IF_A, from_a(&udp(POD_A, 20000 + i, CIP_REMOTE, 53, 64))),
                (IF_A, from_a(&tcp(POD_A, 20000 + i, INTERNET, 443, SYN, 64))),
                (
                    IF_UPLINK,
                    on_uplink(
                        ROUTER_MAC,
                        &tcp(EXT_CLIENT, 20000 + i, NODE_IP, NP_CLUSTER, SYN, 64),
                    ),
                ),
            ]
        })
        .collect();
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let new_before: u64 = node
        .workers
        .iter()
        .map(|w| w.stats.lb_new_flows + w.stats.masq_new_flows)
        .sum();
    let hits_before: u64 = node.workers.iter().map(|w| w.stats.ct_hits).sum();
    let (sent, allocs) = counting_alloc::allocations_during(|| {
        let mut sent = 0u32;
        for (i, (rx, frame)) in fresh.iter().enumerate() {
            let start = (i % 2) as u16;
            if let Verdict::Tx { .. } =
                run_into(&mut node, &snap, *rx, frame, start, 2, &mut buf, &mut buf2)
            {
                sent += 1;
            }
            for (rx, frame) in &established {
                if let Verdict::Tx { .. } = run_into(
                    &mut node,
                    &snap,
                    *rx,
                    frame,
                    1 - start,
                    2,
                    &mut buf,
                    &mut buf2,
                ) {
                    sent += 1;
                }
            }
        }
        sent
    });
    assert_eq!(allocs, 0, "allocations on the per-packet path");
    let rounds = fresh.len() as u32;
    assert_eq!(
        sent,
        rounds * (1 + established.len() as u32),
        "every frame was sent"
    );
    let new_after: u64 = node
        .workers
        .iter()
        .map(|w| w.stats.lb_new_flows + w.stats.masq_new_flows)
        .sum();
    let hits_after: u64 = node.workers.iter().map(|w| w.stats.ct_hits).sum();
    assert_eq!(
        new_after - new_before,
        u64::from(rounds),
        "one new flow per fresh frame"
    );
    assert_eq!(
        hits_after - hits_before,
        u64::from(rounds) * established.len() as u64
    );
}

// ---- more ICMP errors and policies --------------------------------------------------------------

#[test]
fn error_from_the_outside_client_about_a_nodeport_snat_flow_goes_to_the_backend() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let cport = 35500 + n;
        let out = node.request(&snap, IF_UPLINK, &on_uplink(ROUTER_MAC, &udp_np(cport)), 1);
        assert_eq!(
            out.v,
            Verdict::Drop(DropReason::UplinkUnexpected),
            "no UDP NodePort: a node address is not a service address"
        );
        let out = node.request(
            &snap,
            IF_UPLINK,
            &on_uplink(
                EXT_MAC,
                &tcp(EXT_CLIENT, cport, NODE_IP, NP_CLUSTER, ACK, 64),
            ),
            1,
        );
        let inner = assert_encap(&out.frame);
        let p = port_at(&inner, 20);
        // The client answers our reply (node:nodePort -> client) with an ICMP error.
        let our_reply = tcp(NODE_IP, NP_CLUSTER, EXT_CLIENT, cport, ACK, 63);
        let err = on_uplink(
            EXT_MAC,
            &icmp_err(EXT_CLIENT, NODE_IP, 3, 3, [0; 4], &our_reply, 64),
        );
        let r = node.via_owner(&snap, IF_UPLINK, &err, out.worker, 2);
        assert_eq!(r.v, tx(IF_UPLINK, TxKind::Encap));
        let quoted = tcp(REMOTE_POD, 8080, NODE_IP, p, ACK, 63);
        assert_eq!(
            assert_encap(&r.frame),
            icmp_err(NODE_IP, REMOTE_POD, 3, 3, [0; 4], &quoted, 63),
            "the backend sees the error about its own reply"
        );
    }
}

fn udp_np(cport: u16) -> Vec<u8> {
    udp(EXT_CLIENT, cport, NODE_IP, NP_CLUSTER, 64)
}

#[test]
fn time_exceeded_about_a_masqueraded_echo_restores_the_identifier() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&echo(POD_A, INTERNET, 8, 0x4243, 64)),
            1,
        );
        let id = port_at(&out.frame, 38);
        let err = on_uplink(
            ROUTER_MAC,
            &icmp_err(ROUTER, NODE_IP, 11, 0, [0; 4], &out.frame[14..], 64),
        );
        let r = node.via_owner(&snap, IF_UPLINK, &err, out.worker, 2);
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        let quoted = echo(POD_A, INTERNET, 8, 0x4243, 63);
        assert_eq!(
            r.frame,
            to_a(&icmp_err(ROUTER, POD_A, 11, 0, [0; 4], &quoted, 63))
        );
        assert_ne!(id, 0x4243);
    }
}

#[test]
fn pods_reach_a_local_policy_nodeport_through_the_cluster_rotation() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 36500, NODE_IP, NP_LOCAL_NONE, SYN, 64)),
            1,
        );
        assert_eq!(
            out.v,
            tx(IF_UPLINK, TxKind::Encap),
            "kube-proxy's short-circuit"
        );
        assert_eq!(
            assert_encap(&out.frame),
            tcp(POD_A, 36500, REMOTE_POD, 8080, SYN, 63),
            "no SNAT for in-cluster clients"
        );
        let reply = vxlan_in(&tcp(REMOTE_POD, 8080, POD_A, 36500, SYN | ACK, 64));
        let r = node.via_owner(&snap, IF_UPLINK, &reply, out.worker, 2);
        assert_eq!(
            r.frame,
            to_a(&tcp(NODE_IP, NP_LOCAL_NONE, POD_A, 36500, SYN | ACK, 63))
        );
    }
}

#[test]
fn error_from_the_client_about_a_service_reply_goes_to_the_backend() {
    let snap = snap();
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 48500 + n;
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, sport, CIP_LOCAL, 53, 64)),
            1,
        );
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&udp(POD_B, 5353, POD_A, sport, 64)),
            out.worker,
            2,
        );
        // The client's socket is gone: it answers the reply (from the ClusterIP) with an error.
        let err = icmp_err(POD_A, CIP_LOCAL, 3, 3, [0; 4], &r.frame[14..], 64);
        let e = node.via_owner(&snap, IF_A, &from_a(&err), out.worker, 3);
        assert_eq!(e.v, tx(IF_B, TxKind::Forward));
        let quoted = udp(POD_B, 5353, POD_A, sport, 63);
        assert_eq!(
            e.frame,
            to_b(&icmp_err(POD_A, POD_B, 3, 3, [0; 4], &quoted, 63))
        );
    }
}

/// One UDP ClusterIP `CIP_LOCAL:53` whose table generation `generation` has these backends and
/// this rotation (indices into `backends`).
fn reselect_snapshot(generation: u64, backends: &[(Ipv4Addr, bool)], rotation: &[u32]) -> Snapshot {
    let mut b = ServiceTableBuilder::new(generation);
    let s = b
        .service(&ServiceSpec {
            backends: backends
                .iter()
                .map(|&(a, local)| be(a, 5353, local))
                .collect(),
            cluster: rot(rotation),
            local: RotationSpec::default(),
            affinity_timeout_s: 0,
            affinity_id: 0,
        })
        .expect("service");
    b.frontend(Frontend {
        addr: CIP_LOCAL,
        port: 53,
        proto: UDP,
        kind: FrontendKind::ClusterIp,
        service: s,
        local_only: false,
        keep_source: false,
    });
    snapshot_with(&Opts::default(), b.build().expect("table"))
}

#[test]
fn flows_of_a_removed_backend_are_balanced_again_and_pinned_not_serving_ones_stay() {
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 47000 + n;
        let q = from_a(&udp(POD_A, sport, CIP_LOCAL, 53, 64));
        // Generation 1: POD_B is the only backend.
        let g1 = reselect_snapshot(1, &[(POD_B, true)], &[0]);
        let out = node.request(&g1, IF_A, &q, 1);
        assert_eq!(out.frame, to_b(&udp(POD_A, sport, POD_B, 5353, 63)));
        let owner = out.worker;
        // Generation 2: POD_B is still a backend but not in rotation (not serving, or
        // terminating with a ready one elsewhere): the pinned flow keeps it.
        let g2 = reselect_snapshot(2, &[(POD_B, true), (REMOTE_POD, false)], &[1]);
        let out = node.via_owner(&g2, IF_A, &q, owner, 2);
        assert_eq!(out.frame, to_b(&udp(POD_A, sport, POD_B, 5353, 63)));
        // A new flow of the same client goes to the rotation's backend only.
        let other = from_a(&udp(POD_A, sport + 100, CIP_LOCAL, 53, 64));
        let o2 = node.request(&g2, IF_A, &other, 2);
        assert_eq!(o2.v, tx(IF_UPLINK, TxKind::Encap));
        // Generation 3: POD_B is gone from the service: the flow is forgotten and balanced
        // again (to the remote backend), counted; its old reply key no longer matches.
        let g3 = reselect_snapshot(3, &[(REMOTE_POD, false)], &[0]);
        let before: u64 = node.workers.iter().map(|w| w.stats.lb_reselected).sum();
        let out = node.via_owner(&g3, IF_A, &q, owner, 3);
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap));
        assert_eq!(
            assert_encap(&out.frame),
            udp(POD_A, sport, REMOTE_POD, 5353, 63)
        );
        let after: u64 = node.workers.iter().map(|w| w.stats.lb_reselected).sum();
        assert_eq!(after, before + 1);
        let stale = from_b(&udp(POD_B, 5353, POD_A, sport, 64));
        let r = node.send_on(&g3, IF_B, &stale, 0, 4);
        assert_eq!(
            r.frame,
            to_a(&udp(POD_B, 5353, POD_A, sport, 63)),
            "a late reply of the removed backend is not translated any more"
        );
        // The service deleted altogether: the flow is forgotten; the address is just an
        // address outside the cluster now, so the packet is masqueraded out the uplink (as
        // kube-proxy without a service CIDR), not DNATed to the old backend.
        let gone = snapshot_with(
            &Opts::default(),
            ServiceTableBuilder::new(4).build().expect("empty"),
        );
        let out = node.via_owner_or_any(&gone, IF_A, &q, 5);
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Forward));
        assert_eq!(&out.frame[14 + 16..14 + 20], &CIP_LOCAL.octets());
        assert_eq!(&out.frame[14 + 12..14 + 16], &NODE_IP.octets());
    }
}

// ---- network policy (the lb stage's policy verdicts) ------------------------------------------

use dataplane::policy::{
    Dir, Isolation, PeerSpec, PolicyBuilder, PolicyTable, PortSpec, ALLOW_AUDIT, ALLOW_ENFORCED,
};

const ID_A: u32 = 1;
const ID_B: u32 = 2;
const ID_REMOTE: u32 = 3;
const ENFORCED: Isolation = Isolation {
    enforced: true,
    audit: false,
};
const AUDITED: Isolation = Isolation {
    enforced: false,
    audit: true,
};

/// A policy table for this node: every pod's identity, this node's address, and `rules` run on
/// the builder with POD_A's and POD_B's endpoint ids.
fn policy(
    generation: u16,
    a: (Isolation, Isolation),
    b: (Isolation, Isolation),
    rules: impl FnOnce(&mut PolicyBuilder, u32, u32),
) -> PolicyTable {
    let mut p = PolicyBuilder::new(generation);
    p.identity(POD_A, ID_A)
        .identity(POD_B, ID_B)
        .identity(REMOTE_POD, ID_REMOTE)
        .node_addr(NODE_IP);
    let ea = p.endpoint(POD_A, a.0, a.1);
    let eb = p.endpoint(POD_B, b.0, b.1);
    rules(&mut p, ea, eb);
    p.build().expect("policy table")
}

fn snap_with_policy(table: PolicyTable) -> Snapshot {
    let o = Opts::default();
    snapshot_full(&o, services(&o), Some(table), None)
}

/// B (local) admits TCP 8080 from A only; A is not isolated.
fn b_admits_a_on_8080(generation: u16) -> PolicyTable {
    let open = Isolation::OPEN;
    policy(generation, (open, open), (ENFORCED, open), |p, _, eb| {
        p.allow(
            eb,
            Dir::Ingress,
            PeerSpec::Identity(ID_A),
            PortSpec::one(TCP, 8080),
            ALLOW_ENFORCED,
        );
    })
}

#[test]
fn policy_ingress_admits_allowed_flows_and_their_replies_and_denies_the_rest() {
    let snap = snap_with_policy(b_admits_a_on_8080(1));
    for n in WORKERS {
        let mut node = Node::new(n);
        let sport = 42000 + n;
        // A -> B:8080 allowed; the SYN-ACK (B's egress is open anyway) and the ACK ride on
        // the flow, on its owner.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, POD_B, 8080, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward), "n={n}");
        assert_eq!(out.frame, to_b(&tcp(POD_A, sport, POD_B, 8080, SYN, 63)));
        let owner = out.worker;
        let k = key(POD_A, sport, POD_B, 8080, TCP);
        assert_eq!(node.state(owner, &k, 1), Some(FlowState::TcpSynSent));
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 8080, POD_A, sport, SYN | ACK, 64)),
            owner,
            2,
        );
        assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        let a = node.via_owner(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, sport, POD_B, 8080, ACK, 64)),
            owner,
            3,
        );
        assert_eq!(a.v, tx(IF_B, TxKind::Forward));
        assert_eq!(node.state(owner, &k, 3), Some(FlowState::TcpEstablished));
        // Another port, another protocol, another source: denied, no state left behind.
        for (frame, rx, k) in [
            (
                from_a(&tcp(POD_A, sport, POD_B, 9090, SYN, 64)),
                IF_A,
                key(POD_A, sport, POD_B, 9090, TCP),
            ),
            (
                from_a(&udp(POD_A, sport, POD_B, 8080, 64)),
                IF_A,
                key(POD_A, sport, POD_B, 8080, UDP),
            ),
            (
                vxlan_in(&tcp(REMOTE_POD, sport, POD_B, 8080, SYN, 64)),
                IF_UPLINK,
                key(REMOTE_POD, sport, POD_B, 8080, TCP),
            ),
        ] {
            let d = node.request(&snap, rx, &frame, 4);
            assert_eq!(d.v, Verdict::Drop(DropReason::PolicyDeniedIngress), "n={n}");
            for w in 0..n {
                assert_eq!(node.state(w, &k, 4), None, "a denied flow leaves no entry");
            }
        }
        // B may open connections to A (A is not isolated, B's egress is open).
        let b = node.request(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 7000, POD_A, 22, SYN, 64)),
            5,
        );
        assert_eq!(b.v, tx(IF_A, TxKind::Forward));
        let flows: u64 = node.workers.iter().map(|w| w.stats.policy_flows).sum();
        assert_eq!(flows, 2, "A->B:8080 and B->A:22 tracked for policy");
    }
}

#[test]
fn policy_egress_is_enforced_on_the_source_node_before_encapsulation() {
    let open = Isolation::OPEN;
    // A may only send UDP 53 to 10.244.2.0/24 (REMOTE_POD's node) and TCP to B's identity.
    let table = policy(1, (open, ENFORCED), (open, open), |p, ea, _| {
        p.allow(
            ea,
            Dir::Egress,
            PeerSpec::IpBlock {
                cidr: (Ipv4Addr::new(10, 244, 2, 0), 24),
                except: vec![],
            },
            PortSpec::one(UDP, 53),
            ALLOW_ENFORCED,
        )
        .allow(
            ea,
            Dir::Egress,
            PeerSpec::Identity(ID_B),
            PortSpec::all_of(TCP),
            ALLOW_ENFORCED,
        );
    });
    let snap = snap_with_policy(table);
    for n in WORKERS {
        let mut node = Node::new(n);
        let d = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 43000, REMOTE_POD, 8080, SYN, 64)),
            1,
        );
        assert_eq!(d.v, Verdict::Drop(DropReason::PolicyDeniedEgress));
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&udp(POD_A, 43001, REMOTE_POD, 53, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_UPLINK, TxKind::Encap), "n={n}");
        let inner = assert_encap(&out.frame);
        assert_eq!(inner, udp(POD_A, 43001, REMOTE_POD, 53, 63));
        // The reply comes back through the tunnel to A, whose ingress is open: and it is the
        // flow's reply on its owner.
        let r = node.via_owner(
            &snap,
            IF_UPLINK,
            &vxlan_in(&udp(REMOTE_POD, 53, POD_A, 43001, 64)),
            out.worker,
            2,
        );
        assert_eq!(r.v, tx(IF_A, TxKind::Decap));
        // Masquerade to the internet is egress too: denied before any SNAT.
        let m = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 43002, INTERNET, 443, SYN, 64)),
            3,
        );
        assert_eq!(m.v, Verdict::Drop(DropReason::PolicyDeniedEgress));
        let masq: u64 = node.workers.iter().map(|w| w.stats.masq_new_flows).sum();
        assert_eq!(masq, 0, "no SNAT for a denied flow");
    }
}

#[test]
fn policy_sees_the_backend_and_target_port_after_dnat() {
    let snap = snap_with_policy(b_admits_a_on_8080(1));
    for n in WORKERS {
        let mut node = Node::new(n);
        // A -> ClusterIP:80 -> B:8080: allowed (the rule names the target port).
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 44000, CIP_LOCAL, 80, SYN, 64)),
            1,
        );
        assert_eq!(out.frame, to_b(&tcp(POD_A, 44000, POD_B, 8080, SYN, 63)));
        let r = node.via_owner(
            &snap,
            IF_B,
            &from_b(&tcp(POD_B, 8080, POD_A, 44000, SYN | ACK, 64)),
            out.worker,
            2,
        );
        assert_eq!(
            r.frame,
            to_a(&tcp(CIP_LOCAL, 80, POD_A, 44000, SYN | ACK, 63))
        );
    }
    // The same service, a policy naming the service port instead: denied.
    let open = Isolation::OPEN;
    let table = policy(1, (open, open), (ENFORCED, open), |p, _, eb| {
        p.allow(
            eb,
            Dir::Ingress,
            PeerSpec::Identity(ID_A),
            PortSpec::one(TCP, 80),
            ALLOW_ENFORCED,
        );
    });
    let snap = snap_with_policy(table);
    let mut node = Node::new(2);
    let d = node.request(
        &snap,
        IF_A,
        &from_a(&tcp(POD_A, 44001, CIP_LOCAL, 80, SYN, 64)),
        1,
    );
    assert_eq!(d.v, Verdict::Drop(DropReason::PolicyDeniedIngress));
    let new: u64 = node.workers.iter().map(|w| w.stats.lb_new_flows).sum();
    assert_eq!(new, 0, "a denied service flow is not tracked");
}

#[test]
fn a_policy_change_cuts_flows_it_denies_and_keeps_the_others() {
    let allow_both = |generation| {
        let open = Isolation::OPEN;
        policy(generation, (open, open), (ENFORCED, open), |p, _, eb| {
            p.allow(
                eb,
                Dir::Ingress,
                PeerSpec::Identity(ID_A),
                PortSpec {
                    proto: TCP,
                    lo: 8080,
                    hi: 8081,
                },
                ALLOW_ENFORCED,
            );
        })
    };
    let first = snap_with_policy(allow_both(1));
    // Generation 2 only admits 8080.
    let second = snap_with_policy(b_admits_a_on_8080(2));
    for n in WORKERS {
        let mut node = Node::new(n);
        let mut owners = Vec::new();
        for (i, port) in [8080u16, 8081].into_iter().enumerate() {
            let sport = 45000 + i as u16;
            let out = node.request(
                &first,
                IF_A,
                &from_a(&tcp(POD_A, sport, POD_B, port, SYN, 64)),
                1,
            );
            assert_eq!(out.v, tx(IF_B, TxKind::Forward));
            owners.push(out.worker);
            let r = node.via_owner(
                &first,
                IF_B,
                &from_b(&tcp(POD_B, port, POD_A, sport, SYN | ACK, 64)),
                out.worker,
                2,
            );
            assert_eq!(r.v, tx(IF_A, TxKind::Forward));
        }
        // After the change: the 8080 connection goes on, both ways...
        let keep = node.via_owner(
            &second,
            IF_A,
            &from_a(&tcp(POD_A, 45000, POD_B, 8080, ACK, 64)),
            owners[0],
            3,
        );
        assert_eq!(keep.v, tx(IF_B, TxKind::Forward), "n={n}");
        let keep = node.via_owner(
            &second,
            IF_B,
            &from_b(&tcp(POD_B, 8080, POD_A, 45000, ACK, 64)),
            owners[0],
            3,
        );
        assert_eq!(keep.v, tx(IF_A, TxKind::Forward));
        // ...the 8081 one is cut at its next packet, whichever way it goes.
        let cut = node.via_owner(
            &second,
            IF_B,
            &from_b(&tcp(POD_B, 8081, POD_A, 45001, ACK, 64)),
            owners[1],
            3,
        );
        assert_eq!(cut.v, Verdict::Drop(DropReason::PolicyDeniedIngress));
        let k = key(POD_A, 45001, POD_B, 8081, TCP);
        assert_eq!(node.state(owners[1], &k, 3), None, "the cut flow is gone");
        let again = node.via_owner(
            &second,
            IF_A,
            &from_a(&tcp(POD_A, 45001, POD_B, 8081, ACK, 64)),
            owners[1],
            4,
        );
        assert_eq!(again.v, Verdict::Drop(DropReason::PolicyDeniedIngress));
        let cuts: u64 = node.workers.iter().map(|w| w.stats.policy_cut).sum();
        assert_eq!(cuts, 1);
    }
}

#[test]
fn audit_mode_forwards_would_be_denied_flows_and_counts_each_once() {
    let open = Isolation::OPEN;
    let table = policy(1, (open, open), (AUDITED, open), |p, _, eb| {
        p.allow(
            eb,
            Dir::Ingress,
            PeerSpec::Identity(ID_A),
            PortSpec::one(TCP, 8080),
            ALLOW_AUDIT,
        );
    });
    let snap = snap_with_policy(table);
    for n in WORKERS {
        let mut node = Node::new(n);
        // Allowed by the audit policy: forwarded, not counted.
        let ok = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 46000, POD_B, 8080, SYN, 64)),
            1,
        );
        assert_eq!(ok.v, tx(IF_B, TxKind::Forward));
        // Not allowed: forwarded all the same, counted once for the flow.
        let out = node.request(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 46001, POD_B, 9999, SYN, 64)),
            1,
        );
        assert_eq!(out.v, tx(IF_B, TxKind::Forward), "n={n}");
        let next = node.via_owner(
            &snap,
            IF_A,
            &from_a(&tcp(POD_A, 46001, POD_B, 9999, ACK, 64)),
            out.worker,
            2,
        );
        assert_eq!(next.v, tx(IF_B, TxKind::Forward));
        let audits: u64 = node.workers.iter().map(|w| w.stats.policy_audit[0]).sum();
        assert_eq!(audits, 1);
        let flow = node.workers[usize::from(out.worker)]
            .ct
            .lookup(&key(POD_A, 46001, POD_B, 9999, TCP), 2)
            .copied()
            .expect("tracked");
        assert!(flow.policy_audit && flow.policy_gen == 1);
    }
}

#[test]
fn untracked_packets_to_an_isolated_pod_are_judged_one_by_one() {
    let snap = snap_with_policy(b_admits_a_on_8080(1));
    let mut node = Node::new(2);
    // A fragment (no ports): only an all-ports rule could admit it.
    let frag = fragment(tcp(POD_A, 47000, POD_B, 8080, ACK, 64), false);
    let d = node.request(&snap, IF_A, &from_a(&frag), 1);
    assert_eq!(d.v, Verdict::Drop(DropReason::PolicyDeniedIngress));
    // GRE (47): no ports, not tracked.
    let gre = ip(POD_A, POD_B, 47, 64, &[0, 0, 0x08, 0, 1, 2, 3, 4]);
    let d = node.request(&snap, IF_A, &from_a(&gre), 1);
    assert_eq!(d.v, Verdict::Drop(DropReason::PolicyDeniedIngress));
    // With an all-protocol rule from A, both pass.
    let open = Isolation::OPEN;
    let table = policy(2, (open, open), (ENFORCED, open), |p, _, eb| {
        p.allow(
            eb,
            Dir::Ingress,
            PeerSpec::Identity(ID_A),
            PortSpec::ALL,
            ALLOW_ENFORCED,
        );
    });
    let snap = snap_with_policy(table);
    assert_eq!(
        node.request(&snap, IF_A, &from_a(&gre), 2).v,
        tx(IF_B, TxKind::Forward)
    );
    assert_eq!(
        node.request(&snap, IF_A, &from_a(&frag), 2).v,
        tx(IF_B, TxKind::Forward)
    );
}

#[test]
fn pod_to_pod_steering_is_symmetric_and_backend_endpoints_follow_the_client() {
    use dataplane::stages::lb::{owner, role, FlowRole};
    let snap = snap();
    let table = snap.services();
    proptest!(|(a in any::<u32>(), b in any::<u32>(), sp in any::<u16>(), dp in any::<u16>(), n in 2u16..6)| {
        let k = FlowKey { src: Ipv4Addr::from(a), dst: Ipv4Addr::from(b), sport: sp, dport: dp, proto: TCP };
        let r = role(table, &k, false, false);
        let back = role(table, &k.reversed(), false, false);
        prop_assert_eq!(owner(&k, r, n), owner(&k.reversed(), back, n));
    });
    // A client talking to a backend endpoint directly is owned like its ClusterIP flow.
    let direct = key(POD_A, 5000, POD_B, 8080, TCP);
    assert_eq!(role(table, &direct, false, false), FlowRole::ToServer);
    assert_eq!(
        role(table, &direct.reversed(), false, false),
        FlowRole::FromServer
    );
    let via_cip = key(POD_A, 5000, CIP_LOCAL, 80, TCP);
    for n in 2..6 {
        assert_eq!(
            owner(&direct, FlowRole::ToServer, n),
            owner(&via_cip, FlowRole::ToFrontend, n)
        );
    }
}

#[test]
fn no_allocation_on_the_policy_path() {
    let snap = snap_with_policy(b_admits_a_on_8080(1));
    let mut node = Node::new(2);
    let frames: Vec<(u32, Vec<u8>)> = (0..100u16)
        .flat_map(|i| {
            [
                (IF_A, from_a(&tcp(POD_A, 30000 + i, POD_B, 8080, SYN, 64))),
                (
                    IF_B,
                    from_b(&tcp(POD_B, 8080, POD_A, 30000 + i, SYN | ACK, 64)),
                ),
                (IF_A, from_a(&tcp(POD_A, 30000 + i, POD_B, 9, SYN, 64))),
            ]
        })
        .collect();
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let (results, allocs) = counting_alloc::allocations_during(|| {
        let mut sent = 0u32;
        let mut denied = 0u32;
        for (i, (rx, frame)) in frames.iter().enumerate() {
            match run_into(
                &mut node,
                &snap,
                *rx,
                frame,
                (i % 2) as u16,
                2,
                &mut buf,
                &mut buf2,
            ) {
                Verdict::Tx { .. } => sent += 1,
                Verdict::Drop(DropReason::PolicyDeniedIngress) => denied += 1,
                _ => {}
            }
        }
        (sent, denied)
    });
    assert_eq!(allocs, 0, "allocations on the policy path");
    assert_eq!(results, (200, 100));
}

#[test]
fn host_firewall_admits_allowed_packets_to_the_kernel_and_drops_the_rest() {
    use dataplane::snapshot::HostPath;
    const IF_HOST: u32 = 40;
    const NET_MAC: Mac = Mac([0x02, 0, 0, 0, 0x40, 0x01]);
    const KERNEL_MAC: Mac = Mac([0x02, 0, 0, 0, 0x40, 0x02]);
    let mut p = PolicyBuilder::new(3);
    p.identity(POD_A, ID_A).node_addr(NODE_IP);
    let h = p.host(ENFORCED);
    p.allow(
        h,
        Dir::Ingress,
        PeerSpec::Any,
        PortSpec::one(TCP, 443),
        ALLOW_ENFORCED,
    );
    let table = p.build().expect("policy");
    let o = Opts::default();
    let build = |host: bool| {
        let path = HostPath {
            ifindex: IF_HOST,
            mac: NET_MAC,
            kernel_mac: KERNEL_MAC,
        };
        snapshot_full(&o, services(&o), Some(table.clone()), host.then_some(path))
    };
    let snap = build(true);
    for n in WORKERS {
        let mut node = Node::new(n);
        let syn = tcp(EXT_CLIENT, 50000, NODE_IP, 443, SYN, 64);
        let out = node.request(&snap, IF_UPLINK, &on_uplink(EXT_MAC, &syn), 1);
        assert_eq!(out.v, tx(IF_HOST, TxKind::ToHost), "n={n}");
        // Untouched but for the MACs: the kernel sees the client's packet as sent.
        assert_eq!(out.frame, eth(KERNEL_MAC, NET_MAC, &syn));
        for frame in [
            tcp(EXT_CLIENT, 50001, NODE_IP, 80, SYN, 64),
            udp(EXT_CLIENT, 50002, NODE_IP, 443, 64),
            echo(EXT_CLIENT, NODE_IP, 8, 7, 64),
        ] {
            let d = node.request(&snap, IF_UPLINK, &on_uplink(EXT_MAC, &frame), 1);
            assert_eq!(d.v, Verdict::Drop(DropReason::HostPolicyDenied), "n={n}");
        }
        // A NodePort on the node's address is still the service's.
        let np = node.request(
            &snap,
            IF_UPLINK,
            &on_uplink(
                EXT_MAC,
                &tcp(EXT_CLIENT, 50003, NODE_IP, NP_CLUSTER, SYN, 64),
            ),
            1,
        );
        assert_eq!(np.v, tx(IF_UPLINK, TxKind::Encap));
    }
    // Without the host path (no host policy here) nothing is delivered to the host.
    let snap = build(false);
    let mut node = Node::new(1);
    let d = node.request(
        &snap,
        IF_UPLINK,
        &on_uplink(EXT_MAC, &tcp(EXT_CLIENT, 50000, NODE_IP, 443, SYN, 64)),
        1,
    );
    assert_eq!(d.v, Verdict::Drop(DropReason::UplinkUnexpected));
}
