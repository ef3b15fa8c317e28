//! WireGuard through the whole pipeline, sans-IO (issue 7): node 1's pod sends to node 2's pod,
//! node 1 encapsulates in VXLAN and seals for node 2, node 2 opens and decapsulates.
//!
//! Sessions come from two mirrored [`SessionKeys`] (what control's handshake would hand each
//! node). Expected transport messages are computed independently with RustCrypto's
//! ChaCha20-Poly1305 (the library seals with `ring`), and the plaintext is compared with what
//! the same input gives on a snapshot without WireGuard, so the outputs are checked byte for
//! byte. Every worker runs with a real `Flows` (the seal path needs its counter blocks).
mod common;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static GLOBAL: counting_alloc::Counting = counting_alloc::Counting;

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use chacha20poly1305::{aead::AeadInPlace, ChaCha20Poly1305, Key, KeyInit, Nonce};
use common::*;
use dataplane::{
    affinity::Affinity,
    conntrack::{Config, Conntrack, Timeouts},
    packet::PacketBuf,
    pipeline::process_ctx,
    snapshot::{
        EndpointEntry, InterfaceEntry, InterfaceRole, OverlayConfig, RemoteNode, Snapshot,
        SnapshotBuilder, WgPeer, WireguardConfig,
    },
    stages::{
        encap::derived_vtep_mac,
        lb::{Flows, Steer, WG_BLOCKS},
        neighbor::ArpThrottle,
    },
    wire::checksum,
    wireguard::{
        self as wg, padded_len, padded_len_within, CounterBlock, PeerId, Session, SessionKeys,
        SessionTable, COUNTER_BLOCK, REJECT_AFTER_TIME_NS, TAG_LEN, TRANSPORT_HEADER_LEN,
        WIREGUARD_PORT,
    },
    Ctx, DropReason, TxKind, Verdict,
};

// ---- two nodes, mirrored sessions ------------------------------------------------------

/// Node 1's receiver index (node 2 writes it into what it sends to node 1).
const NODE1_INDEX: u32 = 0x1111_0001;
/// Node 2's receiver index (node 1 writes it into what it sends to node 2).
const NODE2_INDEX: u32 = 0x2222_0002;
/// T_send of node 1 = T_recv of node 2.
const KEY_1_TO_2: [u8; 32] = [0x12; 32];
const KEY_2_TO_1: [u8; 32] = [0x21; 32];
/// How node 1 numbers node 2, and node 2 numbers node 1.
const NODE2_PEER_ID: PeerId = 2;
const NODE1_PEER_ID: PeerId = 1;
/// The batch clock of every run (sessions are created at 0).
const NOW_NS: u64 = 1_000_000;
/// Where the outer headers are in a sealed frame.
const OUTER_IP_AT: usize = 14;
const MSG_AT: usize = 14 + 20 + 8;
/// Uplink MTU minus this is the pod MTU (VXLAN 50 + WireGuard 60).
const POD_MTU_OVERHEAD: u16 = 110;

/// Node 1's session with node 2, and node 2's with node 1: one handshake seen from both sides.
fn session_pair() -> (Arc<Session>, Arc<Session>) {
    let node1 = SessionKeys {
        receiver_index: NODE1_INDEX,
        peer_index: NODE2_INDEX,
        send_key: KEY_1_TO_2,
        recv_key: KEY_2_TO_1,
        created_ns: 0,
        initiator: true,
        peer: NODE2_PEER_ID,
    };
    let node2 = SessionKeys {
        receiver_index: NODE2_INDEX,
        peer_index: NODE1_INDEX,
        send_key: KEY_2_TO_1,
        recv_key: KEY_1_TO_2,
        created_ns: 0,
        initiator: false,
        peer: NODE1_PEER_ID,
    };
    (
        Arc::new(Session::new(&node1).expect("node 1 session")),
        Arc::new(Session::new(&node2).expect("node 2 session")),
    )
}

/// How a node knows the other one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    /// A peer with an established session.
    Session,
    /// A peer (key published) without a session yet.
    NoSession,
    /// Not a WireGuard peer at all (no entry).
    NotAPeer,
}

fn wg_config(
    peer_ip: Ipv4Addr,
    peer_id: PeerId,
    session: &Arc<Session>,
    state: PeerState,
    strict: bool,
) -> WireguardConfig {
    let peers = match state {
        PeerState::Session => vec![WgPeer {
            node_ip: peer_ip,
            id: peer_id,
            send: Some(Arc::clone(session)),
        }],
        PeerState::NoSession => vec![WgPeer {
            node_ip: peer_ip,
            id: peer_id,
            send: None,
        }],
        PeerState::NotAPeer => Vec::new(),
    };
    let sessions = match state {
        PeerState::Session => SessionTable::new([Arc::clone(session)]),
        _ => SessionTable::default(),
    };
    WireguardConfig {
        port: WIREGUARD_PORT,
        strict,
        peers,
        sessions,
    }
}

fn overlay(node_ip: Ipv4Addr, uplink_mtu: u16) -> OverlayConfig {
    OverlayConfig {
        uplink_mtu,
        ..overlay_config(node_ip)
    }
}

/// As `common::node1(true)`, with the uplink MTU and WireGuard given.
fn node1_snap(uplink_mtu: u16, wg: Option<WireguardConfig>) -> Snapshot {
    let mut b = SnapshotBuilder::new(1, GATEWAY);
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
    b.overlay(overlay(NODE_IP, uplink_mtu));
    b.remote(RemoteNode {
        pod_net: Ipv4Addr::new(10, 244, 2, 0),
        prefix_len: 24,
        vtep_ip: PEER_IP,
        vtep_mac: derived_vtep_mac(PEER_IP),
        next_hop: PEER_IP,
    });
    b.neighbor(PEER_IP, PEER_UPLINK_MAC);
    if let Some(wg) = wg {
        b.wireguard(wg);
    }
    b.build()
}

/// As `common::node2()`, with the uplink MTU and WireGuard given.
fn node2_snap(uplink_mtu: u16, wg: Option<WireguardConfig>) -> Snapshot {
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
    b.overlay(overlay(PEER_IP, uplink_mtu));
    b.remote(RemoteNode {
        pod_net: Ipv4Addr::new(10, 244, 1, 0),
        prefix_len: 24,
        vtep_ip: NODE_IP,
        vtep_mac: derived_vtep_mac(NODE_IP),
        next_hop: NODE_IP,
    });
    b.neighbor(NODE_IP, UPLINK_MAC);
    if let Some(wg) = wg {
        b.wireguard(wg);
    }
    b.build()
}

/// Node 1 sealing for node 2 with `session` (1500-byte uplink).
fn node1_wg(session: &Arc<Session>, state: PeerState, strict: bool) -> Snapshot {
    node1_snap(
        UPLINK_MTU,
        Some(wg_config(PEER_IP, NODE2_PEER_ID, session, state, strict)),
    )
}

/// Node 2 opening node 1's messages with `session` (1500-byte uplink).
fn node2_wg(session: &Arc<Session>, state: PeerState, strict: bool) -> Snapshot {
    node2_snap(
        UPLINK_MTU,
        Some(wg_config(NODE_IP, NODE1_PEER_ID, session, state, strict)),
    )
}

/// One worker: its flow state (conntrack, WireGuard counter blocks) and ARP memory.
struct Worker {
    flows: Flows,
    arp: ArpThrottle,
    steer: Steer,
}

impl Worker {
    fn new(worker: u16, workers: u16) -> Self {
        let ct = Conntrack::new(Config {
            capacity: 1024,
            seed: 7,
            timeouts: Timeouts::default(),
        })
        .expect("conntrack");
        Worker {
            flows: Flows::new(ct, Arc::new(Affinity::new(64))),
            arp: ArpThrottle::default(),
            steer: Steer { worker, workers },
        }
    }

    fn single() -> Self {
        Self::new(0, 1)
    }

    /// Runs `frame` received on `rx` through the pipeline; the verdict and the frame after it.
    fn run(&mut self, snap: &Snapshot, rx: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
        self.run_at(NOW_NS, snap, rx, frame)
    }

    /// [`Worker::run`] in a batch at `now_ns`.
    fn run_at(
        &mut self,
        now_ns: u64,
        snap: &Snapshot,
        rx: u32,
        frame: &[u8],
    ) -> (Verdict, Vec<u8>) {
        let mut buf = chunk_with(frame);
        let mut pkt = PacketBuf::new(&mut buf, HEADROOM, frame.len()).expect("frame fits");
        let mut ctx = Ctx {
            now_ns,
            arp: &mut self.arp,
            flows: Some(&mut self.flows),
            steer: self.steer,
        };
        let v = process_ctx(&mut ctx, snap, rx, &mut pkt);
        (v, pkt.data().to_vec())
    }

    /// This worker's WireGuard counters for `peer`: tx packets, tx bytes, rx packets, rx bytes.
    fn wg_counters(&self, peer: PeerId) -> [u64; 4] {
        self.flows.wg_peers[peer as usize % WG_BLOCKS]
    }
}

// ---- frames and independent expectations ---------------------------------------------

/// Pod A -> REMOTE_POD, UDP with `data_len` bytes of payload (IPv4 total 28 + data_len, DF).
fn pod_udp(data_len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..data_len).map(|i| (i % 251) as u8).collect();
    from_a(REMOTE_POD, 17, 64, &udp(5000, 80, &data))
}

/// The small pod packet most tests send.
fn pod_hello() -> Vec<u8> {
    from_a(REMOTE_POD, 17, 64, &udp(5000, 80, b"hello over wireguard"))
}

/// RFC 1071 Internet checksum, written here so the expected headers do not come from the
/// code under test.
fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The outer IPv4 header sluice writes for WireGuard: no options, ID 0, DF, TTL 64, UDP.
fn outer_ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = inet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// `msg` (a transport message) in a frame node 1 sends to node 2 on UDP 51871 -> 51871.
fn wg_frame_from_node1(msg: &[u8]) -> Vec<u8> {
    let mut f = eth(PEER_UPLINK_MAC, UPLINK_MAC, 0x0800);
    f.extend(outer_ipv4(NODE_IP, PEER_IP, 8 + msg.len()));
    f.extend(udp(WIREGUARD_PORT, WIREGUARD_PORT, msg));
    f
}

/// The transport message for `plaintext` under `key`, computed with RustCrypto: header,
/// ciphertext of the plaintext zero-padded to `padded`, tag.
fn expected_message(
    key: &[u8; 32],
    receiver: u32,
    counter: u64,
    plaintext: &[u8],
    padded: usize,
) -> Vec<u8> {
    let mut body = plaintext.to_vec();
    body.resize(padded, 0);
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    let tag = ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut body)
        .expect("RustCrypto seal");
    let mut msg = vec![4, 0, 0, 0];
    msg.extend_from_slice(&receiver.to_le_bytes());
    msg.extend_from_slice(&counter.to_le_bytes());
    msg.extend(body);
    msg.extend_from_slice(&tag);
    msg
}

/// Seals `plaintext` (an IPv4 packet) with the library's `seal`, as a sender would.
fn seal_with(session: &Session, block: &mut CounterBlock, plaintext: &[u8]) -> Vec<u8> {
    let start = TRANSPORT_HEADER_LEN;
    let mut buf = vec![0u8; start + padded_len(plaintext.len()) + TAG_LEN];
    buf[start..start + plaintext.len()].copy_from_slice(plaintext);
    let msg = wg::seal(
        session,
        block,
        &mut buf,
        start..start + plaintext.len(),
        NOW_NS,
    )
    .expect("seal");
    buf[msg].to_vec()
}

/// The transport message's counter in a sealed frame.
fn counter_of(frame: &[u8]) -> u64 {
    let mut c = [0u8; 8];
    c.copy_from_slice(&frame[MSG_AT + 8..MSG_AT + 16]);
    u64::from_le_bytes(c)
}

/// What node 1 sends for `input` without WireGuard: the clear VXLAN frame.
fn clear_vxlan(uplink_mtu: u16, input: &[u8]) -> Vec<u8> {
    let (v, out) = Worker::single().run(&node1_snap(uplink_mtu, None), IF_A, input);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_UPLINK,
            kind: TxKind::Encap
        },
        "the clear reference run"
    );
    out
}

/// What node 2 delivers to its pod for `input` sent in clear VXLAN (no WireGuard anywhere).
fn clear_delivery(uplink_mtu: u16, input: &[u8]) -> Vec<u8> {
    let wire = clear_vxlan(uplink_mtu, input);
    let (v, out) = Worker::single().run(&node2_snap(uplink_mtu, None), IF_UPLINK, &wire);
    assert_eq!(
        v,
        Verdict::Tx {
            ifindex: IF_B,
            kind: TxKind::Decap
        },
        "the clear reference delivery"
    );
    out
}

const SEALED: Verdict = Verdict::Tx {
    ifindex: IF_UPLINK,
    kind: TxKind::EncapEncrypted,
};
const CLEAR: Verdict = Verdict::Tx {
    ifindex: IF_UPLINK,
    kind: TxKind::Encap,
};
const DELIVERED: Verdict = Verdict::Tx {
    ifindex: IF_B,
    kind: TxKind::Decap,
};

// ---- 1. sealing on node 1 ------------------------------------------------------------

#[test]
fn pod_to_remote_pod_is_sealed_byte_for_byte() {
    let (s1, s2) = session_pair();
    let snap = node1_wg(&s1, PeerState::Session, false);
    let node2_sessions = SessionTable::new([s2]);
    let input = pod_hello();
    let clear = clear_vxlan(UPLINK_MTU, &input);
    let vxlan_ip = &clear[14..];
    let mut worker = Worker::single();
    for counter in 0..3u64 {
        let (v, out) = worker.run(&snap, IF_A, &input);
        assert_eq!(v, SEALED, "packet {counter}");
        // Independently built: Ethernet to the next hop, outer IPv4 (ID 0, DF, TTL 64,
        // checksum), UDP 51871 -> 51871 with checksum 0, then the transport message to node
        // 2's index with this counter, the clear VXLAN packet padded to 16 inside.
        let msg = expected_message(
            &KEY_1_TO_2,
            NODE2_INDEX,
            counter,
            vxlan_ip,
            padded_len(vxlan_ip.len()),
        );
        let expected = wg_frame_from_node1(&msg);
        assert_eq!(out, expected, "sealed frame, counter {counter}");
        // The same, field by field (so a failure says which).
        assert_eq!(&out[0..14], &eth(PEER_UPLINK_MAC, UPLINK_MAC, 0x0800)[..]);
        let ip = &out[OUTER_IP_AT..OUTER_IP_AT + 20];
        assert_eq!(ip[6] & 0x40, 0x40, "DF");
        assert_eq!((ip[8], ip[9]), (64, 17), "TTL 64, UDP");
        assert!(checksum::verify(ip), "outer IPv4 checksum");
        assert_eq!(&ip[12..16], &NODE_IP.octets());
        assert_eq!(&ip[16..20], &PEER_IP.octets());
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            out.len() - 14
        );
        assert_eq!(
            &out[34..38],
            &[0xca, 0x9f, 0xca, 0x9f],
            "UDP 51871 -> 51871"
        );
        assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0");
        assert_eq!(&out[MSG_AT..MSG_AT + 4], &[4, 0, 0, 0]);
        assert_eq!(&out[MSG_AT + 4..MSG_AT + 8], &NODE2_INDEX.to_le_bytes());
        assert_eq!(counter_of(&out), counter);
        // The tag opens with node 2's session to exactly the clear VXLAN packet.
        let mut msg = out[MSG_AT..].to_vec();
        let opened = wg::open(&node2_sessions, &mut msg, NOW_NS).expect("node 2 opens it");
        assert_eq!(opened.counter, counter);
        assert_eq!(&msg[opened.plaintext], vxlan_ip);
    }
    let c = worker.wg_counters(NODE2_PEER_ID);
    assert_eq!(c[0], 3, "tx packets counted for node 2");
    assert!(c[1] > 0, "tx bytes counted for node 2");
}

// ---- 2. opening on node 2 ------------------------------------------------------------

#[test]
fn sealed_frame_is_delivered_on_node2_like_clear_vxlan() {
    let (s1, s2) = session_pair();
    let n1 = node1_wg(&s1, PeerState::Session, false);
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let input = pod_hello();
    let expected = clear_delivery(UPLINK_MTU, &input);
    let (mut w1, mut w2) = (Worker::single(), Worker::single());
    for i in 0..3 {
        let (v, wire) = w1.run(&n1, IF_A, &input);
        assert_eq!(v, SEALED);
        let (v, out) = w2.run(&n2, IF_UPLINK, &wire);
        assert_eq!(v, DELIVERED, "packet {i}");
        assert_eq!(out, expected, "the pod gets what clear VXLAN delivers");
    }
    assert_eq!(w2.flows.wg_opened, 3);
    let c = w2.wg_counters(NODE1_PEER_ID);
    assert_eq!(c[2], 3, "rx packets counted for node 1");
    assert_eq!(
        c[3],
        3 * (clear_vxlan(UPLINK_MTU, &input).len() - 14) as u64,
        "rx bytes are the plaintext (the VXLAN IPv4 packet)"
    );
}

// ---- 3. no session / not a peer --------------------------------------------------------

#[test]
fn without_a_session_it_goes_clear_or_is_dropped_in_strict_mode() {
    let (s1, _) = session_pair();
    let input = pod_hello();
    let clear = clear_vxlan(UPLINK_MTU, &input);
    for state in [PeerState::NoSession, PeerState::NotAPeer] {
        let mut w = Worker::single();
        let (v, out) = w.run(&node1_wg(&s1, state, false), IF_A, &input);
        assert_eq!(v, CLEAR, "{state:?}, not strict");
        assert_eq!(out, clear, "{state:?}: the clear VXLAN frame");
        let (v, _) = w.run(&node1_wg(&s1, state, true), IF_A, &input);
        assert_eq!(
            v,
            Verdict::Drop(DropReason::WgNoSession),
            "{state:?}, strict"
        );
        assert_eq!(
            w.wg_counters(NODE2_PEER_ID),
            [0; 4],
            "{state:?}: nothing sealed"
        );
    }
    assert_eq!(s1.counters_taken(), 0, "the session was never used");
}

// ---- 4. receive errors ---------------------------------------------------------------

fn node2_drop(w: &mut Worker, snap: &Snapshot, frame: &[u8]) -> DropReason {
    match w.run(snap, IF_UPLINK, frame).0 {
        Verdict::Drop(r) => r,
        v => panic!("expected a drop, got {v:?}"),
    }
}

#[test]
fn keepalive_is_counted_not_forwarded() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let mut block = CounterBlock::default();
    let keepalive = wg_frame_from_node1(&seal_with(&s1, &mut block, &[]));
    let mut w = Worker::single();
    assert_eq!(node2_drop(&mut w, &n2, &keepalive), DropReason::WgKeepalive);
    // It was authentic: its counter is used up.
    assert_eq!(node2_drop(&mut w, &n2, &keepalive), DropReason::WgReplay);
}

#[test]
fn unknown_receiver_index_is_an_unknown_session() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let (_, wire) = Worker::single().run(
        &node1_wg(&s1, PeerState::Session, false),
        IF_A,
        &pod_hello(),
    );
    let mut w = Worker::single();
    let mut bad = wire.clone();
    bad[MSG_AT + 4] ^= 0xff;
    assert_eq!(node2_drop(&mut w, &n2, &bad), DropReason::WgUnknownSession);
    // A node without any session does not know node 2's index either.
    let none = node2_wg(&s2, PeerState::NoSession, false);
    assert_eq!(
        node2_drop(&mut w, &none, &wire),
        DropReason::WgUnknownSession
    );
    // The original is still fine.
    assert_eq!(w.run(&n2, IF_UPLINK, &wire).0, DELIVERED);
}

#[test]
fn replayed_message_is_dropped() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let (_, wire) = Worker::single().run(
        &node1_wg(&s1, PeerState::Session, false),
        IF_A,
        &pod_hello(),
    );
    let mut w = Worker::single();
    assert_eq!(w.run(&n2, IF_UPLINK, &wire).0, DELIVERED);
    assert_eq!(node2_drop(&mut w, &n2, &wire), DropReason::WgReplay);
    // On another worker of the same node too (the window is the session's).
    assert_eq!(
        node2_drop(&mut Worker::new(1, 2), &n2, &wire),
        DropReason::WgReplay
    );
}

#[test]
fn forged_or_corrupted_message_fails_authentication() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let (_, wire) = Worker::single().run(
        &node1_wg(&s1, PeerState::Session, false),
        IF_A,
        &pod_hello(),
    );
    let mut w = Worker::single();
    for at in [MSG_AT + 16, MSG_AT + 30, wire.len() - 1, MSG_AT + 8] {
        let mut bad = wire.clone();
        bad[at] ^= 0x01;
        assert_eq!(
            node2_drop(&mut w, &n2, &bad),
            DropReason::WgAuthFailed,
            "byte {at} flipped"
        );
    }
    // Forgeries did not move the replay window: the genuine message is accepted.
    assert_eq!(w.run(&n2, IF_UPLINK, &wire).0, DELIVERED);
    assert_eq!(w.flows.wg_opened, 1);
}

#[test]
fn plaintext_from_another_address_is_a_source_mismatch() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    // A correct VXLAN packet to node 2, but its IPv4 source is not node 1, sealed with node
    // 1's session (a peer may only send its own VXLAN packets through its tunnel).
    let mut vx = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &pod_hello());
    vx[26..30].copy_from_slice(&[172, 18, 0, 99]);
    vx[24..26].copy_from_slice(&[0, 0]);
    let c = inet_checksum(&vx[14..34]);
    vx[24..26].copy_from_slice(&c.to_be_bytes());
    let mut block = CounterBlock::default();
    let frame = wg_frame_from_node1(&seal_with(&s1, &mut block, &vx[14..]));
    let mut w = Worker::single();
    assert_eq!(
        node2_drop(&mut w, &n2, &frame),
        DropReason::WgSourceMismatch
    );
    // The same packet from node 1's own address is delivered (so the source was the cause).
    let good = vxlan_frame(PEER_IP, VXLAN_PORT, 0x08, VNI, &pod_hello());
    let frame = wg_frame_from_node1(&seal_with(&s1, &mut block, &good[14..]));
    assert_eq!(w.run(&n2, IF_UPLINK, &frame).0, DELIVERED);
}

#[test]
fn truncated_or_mistyped_message_is_malformed() {
    let (s1, s2) = session_pair();
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let (_, wire) = Worker::single().run(
        &node1_wg(&s1, PeerState::Session, false),
        IF_A,
        &pod_hello(),
    );
    let msg = &wire[MSG_AT..];
    let mut w = Worker::single();
    // Shorter than header + tag, with consistent outer lengths.
    for len in [0, 1, 16, 31] {
        assert_eq!(
            node2_drop(&mut w, &n2, &wg_frame_from_node1(&msg[..len])),
            DropReason::WgMalformed,
            "{len}-byte message"
        );
    }
    // Type 4 with a non-zero reserved byte, and a handshake type, on the transport path.
    for (at, value) in [(1, 1u8), (0, 1)] {
        let mut bad = msg.to_vec();
        bad[at] = value;
        assert_eq!(
            node2_drop(&mut w, &n2, &wg_frame_from_node1(&bad)),
            DropReason::WgMalformed,
            "byte {at} = {value}"
        );
    }
    assert_eq!(w.run(&n2, IF_UPLINK, &wire).0, DELIVERED);
}

#[test]
fn clear_vxlan_from_a_peer_is_refused_only_in_strict_mode() {
    let (_, s2) = session_pair();
    let input = pod_hello();
    let clear = clear_vxlan(UPLINK_MTU, &input);
    let expected = clear_delivery(UPLINK_MTU, &input);
    let mut w = Worker::single();
    assert_eq!(
        node2_drop(&mut w, &node2_wg(&s2, PeerState::Session, true), &clear),
        DropReason::WgCleartext
    );
    assert_eq!(
        node2_drop(&mut w, &node2_wg(&s2, PeerState::NoSession, true), &clear),
        DropReason::WgCleartext,
        "a peer without a session yet is still a peer"
    );
    let (v, out) = w.run(&node2_wg(&s2, PeerState::Session, false), IF_UPLINK, &clear);
    assert_eq!((v, out), (DELIVERED, expected.clone()), "not strict");
    // A node that is not a WireGuard peer may send clear VXLAN even in strict mode.
    let (v, out) = w.run(&node2_wg(&s2, PeerState::NotAPeer, true), IF_UPLINK, &clear);
    assert_eq!((v, out), (DELIVERED, expected), "strict, not a peer");
}

#[test]
fn expired_session_neither_seals_nor_opens() {
    let (s1, s2) = session_pair();
    let n1 = node1_wg(&s1, PeerState::Session, false);
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let (_, wire) = Worker::single().run(&n1, IF_A, &pod_hello());
    let expired_at = REJECT_AFTER_TIME_NS;
    let (v, _) = Worker::single().run_at(expired_at, &n1, IF_A, &pod_hello());
    assert_eq!(
        v,
        Verdict::Drop(DropReason::WgSealFailed),
        "sealing at 180 s"
    );
    let (v, _) = Worker::single().run_at(expired_at, &n2, IF_UPLINK, &wire);
    assert_eq!(
        v,
        Verdict::Drop(DropReason::WgUnknownSession),
        "opening at 180 s"
    );
    // Just before, both work.
    assert_eq!(
        Worker::single()
            .run_at(expired_at - 1, &n2, IF_UPLINK, &wire)
            .0,
        DELIVERED
    );
}

// ---- 5. MTU --------------------------------------------------------------------------

#[test]
fn maximal_pod_packet_is_sealed_into_exactly_the_uplink_mtu() {
    for uplink_mtu in [1500u16, 1450] {
        let (s1, s2) = session_pair();
        let n1 = node1_snap(
            uplink_mtu,
            Some(wg_config(
                PEER_IP,
                NODE2_PEER_ID,
                &s1,
                PeerState::Session,
                false,
            )),
        );
        let n2 = node2_snap(
            uplink_mtu,
            Some(wg_config(
                NODE_IP,
                NODE1_PEER_ID,
                &s2,
                PeerState::Session,
                false,
            )),
        );
        let pod_mtu = usize::from(uplink_mtu - POD_MTU_OVERHEAD);
        let tunnel_mtu = usize::from(uplink_mtu) - 20 - 8 - TRANSPORT_HEADER_LEN - TAG_LEN;
        let (mut w1, mut w2) = (Worker::single(), Worker::single());
        // The maximal packet, and smaller ones whose padding fits below the MTU.
        let sizes = [pod_mtu, pod_mtu - 1, pod_mtu - 15, pod_mtu - 20, 100];
        for (counter, ip_len) in (0u64..).zip(sizes) {
            let input = pod_udp(ip_len - 28);
            let clear = clear_vxlan(uplink_mtu, &input);
            let plain = &clear[14..];
            assert_eq!(plain.len(), ip_len + 50);
            let padded = padded_len_within(plain.len(), tunnel_mtu);
            let (v, out) = w1.run(&n1, IF_A, &input);
            assert_eq!(v, SEALED, "MTU {uplink_mtu}, pod packet {ip_len}");
            let msg = expected_message(&KEY_1_TO_2, NODE2_INDEX, counter, plain, padded);
            assert_eq!(
                out,
                wg_frame_from_node1(&msg),
                "MTU {uplink_mtu}, pod packet {ip_len}"
            );
            assert!(out.len() - 14 <= usize::from(uplink_mtu));
            if ip_len == pod_mtu {
                assert_eq!(
                    out.len() - 14,
                    usize::from(uplink_mtu),
                    "the maximal packet fills the uplink MTU exactly"
                );
            }
            // Node 2 strips the padding and delivers what clear VXLAN delivers.
            let (v, delivered) = w2.run(&n2, IF_UPLINK, &out);
            assert_eq!(v, DELIVERED, "MTU {uplink_mtu}, pod packet {ip_len}");
            assert_eq!(delivered, clear_delivery(uplink_mtu, &input));
        }
        // One byte more than the pod MTU does not fit the tunnel (it would fit clear VXLAN): with
        // DF the pod learns the tunnel's MTU (ICMP fragmentation needed, RFC 1191), without DF
        // it is a counted drop, never a silent one.
        let (v, icmp) = w1.run(&n1, IF_A, &pod_udp(pod_mtu + 1 - 28));
        assert_eq!(
            v,
            Verdict::Tx {
                ifindex: IF_A,
                kind: TxKind::IcmpError
            },
            "MTU {uplink_mtu}: pod packet of {} bytes with DF",
            pod_mtu + 1
        );
        assert_eq!((icmp[34], icmp[35]), (3, 4), "fragmentation needed");
        assert_eq!(
            u16::from_be_bytes([icmp[40], icmp[41]]),
            pod_mtu as u16,
            "next-hop MTU = uplink MTU - 110"
        );
        let mut no_df = pod_udp(pod_mtu + 1 - 28);
        no_df[20] = 0; // flags: DF off
        let c = inet_checksum(&{
            let mut h = no_df[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        no_df[24..26].copy_from_slice(&c.to_be_bytes());
        let (v, _) = w1.run(&n1, IF_A, &no_df);
        assert_eq!(v, Verdict::Drop(DropReason::OversizeNoDf));
        assert_eq!(
            s1.counters_taken(),
            COUNTER_BLOCK,
            "one block, no counter for the drop"
        );
    }
}

#[test]
fn padding_is_limited_by_the_mtu_at_1450() {
    // Pod MTU 1340: the VXLAN packet is 1390 bytes, which pads to 1392 unlimited; the tunnel
    // carries 1390 bytes of plaintext, so the padding stops there.
    assert_eq!(padded_len(1390), 1392);
    assert_eq!(padded_len_within(1390, 1450 - 60), 1390);
    let (s1, _) = session_pair();
    let n1 = node1_snap(
        1450,
        Some(wg_config(
            PEER_IP,
            NODE2_PEER_ID,
            &s1,
            PeerState::Session,
            false,
        )),
    );
    let (v, out) = Worker::single().run(&n1, IF_A, &pod_udp(1340 - 28));
    assert_eq!(v, SEALED);
    assert_eq!(out.len() - MSG_AT, TRANSPORT_HEADER_LEN + 1390 + TAG_LEN);
}

// ---- 6. counter blocks across workers ------------------------------------------------

#[test]
fn two_workers_use_disjoint_counters_and_the_receiver_takes_both_interleaved() {
    let (s1, s2) = session_pair();
    let n1 = node1_wg(&s1, PeerState::Session, false);
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let input = pod_hello();
    let expected = clear_delivery(UPLINK_MTU, &input);
    let mut senders = [Worker::new(0, 2), Worker::new(1, 2)];
    let mut receivers = [Worker::new(0, 2), Worker::new(1, 2)];
    const PER_WORKER: usize = 600; // more than two blocks each
    let mut seen: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..PER_WORKER {
        for (w, sender) in senders.iter_mut().enumerate() {
            let (v, wire) = sender.run(&n1, IF_A, &input);
            assert_eq!(v, SEALED, "worker {w}, packet {i}");
            seen[w].push(counter_of(&wire));
            // Received in the order sent, on alternating receiving workers.
            let (v, out) = receivers[(i + w) % 2].run(&n2, IF_UPLINK, &wire);
            assert_eq!(
                v,
                DELIVERED,
                "worker {w}, packet {i}, counter {}",
                counter_of(&wire)
            );
            assert_eq!(out, expected);
        }
    }
    let a: BTreeSet<u64> = seen[0].iter().copied().collect();
    let b: BTreeSet<u64> = seen[1].iter().copied().collect();
    assert_eq!(a.len(), PER_WORKER, "worker 0 repeated a counter");
    assert_eq!(b.len(), PER_WORKER, "worker 1 repeated a counter");
    assert!(a.is_disjoint(&b), "the workers shared counters");
    for (w, s) in seen.iter().enumerate() {
        assert!(s.windows(2).all(|p| p[0] < p[1]), "worker {w} went back");
    }
    // Interleaved blocks: worker 1's first counter is ahead of worker 0's second.
    assert_eq!((seen[0][0], seen[1][0]), (0, COUNTER_BLOCK));
    assert_eq!(
        receivers.iter().map(|r| r.flows.wg_opened).sum::<u64>(),
        2 * PER_WORKER as u64
    );
    for (w, s) in senders.iter().enumerate() {
        assert_eq!(
            s.wg_counters(NODE2_PEER_ID)[0],
            PER_WORKER as u64,
            "worker {w}"
        );
    }
}

// ---- 7. no allocation ----------------------------------------------------------------

#[test]
fn seal_and_open_through_the_pipeline_allocate_nothing() {
    let (s1, s2) = session_pair();
    let n1 = node1_wg(&s1, PeerState::Session, false);
    let n2 = node2_wg(&s2, PeerState::Session, false);
    let inputs = [pod_hello(), pod_udp(1390 - 28), pod_udp(700)];
    let (mut w1, mut w2) = (Worker::single(), Worker::single());
    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|f| chunk_with(f)).collect();
    let mut sealed = 0u64;
    let mut delivered = 0u64;
    let mut pass = |w1: &mut Worker, w2: &mut Worker, sealed: &mut u64, delivered: &mut u64| {
        for (input, buf) in inputs.iter().zip(bufs.iter_mut()) {
            buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
            let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, input.len()) else {
                continue;
            };
            let mut ctx = Ctx {
                now_ns: NOW_NS,
                arp: &mut w1.arp,
                flows: Some(&mut w1.flows),
                steer: w1.steer,
            };
            if process_ctx(&mut ctx, &n1, IF_A, &mut pkt) == SEALED {
                *sealed += 1;
            }
            // Node 2 receives the frame where node 1 left it.
            let (head, len) = (pkt.head(), pkt.len());
            let Some(mut pkt) = PacketBuf::new(buf, head, len) else {
                continue;
            };
            let mut ctx = Ctx {
                now_ns: NOW_NS,
                arp: &mut w2.arp,
                flows: Some(&mut w2.flows),
                steer: w2.steer,
            };
            if process_ctx(&mut ctx, &n2, IF_UPLINK, &mut pkt) == DELIVERED {
                *delivered += 1;
            }
        }
    };
    pass(&mut w1, &mut w2, &mut sealed, &mut delivered);
    const ROUNDS: u64 = 3000;
    let ((), allocs) = counting_alloc::allocations_during(|| {
        for _ in 0..ROUNDS {
            pass(&mut w1, &mut w2, &mut sealed, &mut delivered);
        }
    });
    assert_eq!(allocs, 0, "allocations on the seal/open path");
    // Every packet really was sealed and opened (new counter blocks were taken on the way).
    let n = (ROUNDS + 1) * inputs.len() as u64;
    assert_eq!((sealed, delivered), (n, n));
    assert!(s1.counters_taken() > COUNTER_BLOCK);
}
