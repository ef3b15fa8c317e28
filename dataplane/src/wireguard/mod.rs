//! WireGuard transport messages, sealed and opened in place in the frame (sans-IO: no socket,
//! no clock, no allocation, no lock).
//!
//! sluice carries every cross-node VXLAN packet inside WireGuard on UDP 51871, as Cilium's
//! WireGuard + VXLAN mode: the plaintext of a transport message is the whole VXLAN IPv4 packet.
//!
//! ```text
//!  before seal:  [ headroom ........ ][ IPv4 | UDP 8472 | VXLAN | inner Ethernet frame ][ tailroom ]
//!  after seal:   [ .. ][IPv4][UDP 51871][type 4|0 0 0|receiver idx|counter][ ciphertext | pad ][tag]
//!                       <- push_outer ->  <------------ seal: 16 B header, padded to 16, 16 B tag ------>
//! ```
//!
//! Transport message (WireGuard paper section 5.4.6, wireguard-go `device/noise-protocol.go`
//! `MessageTransportHeaderSize = 16`):
//!
//! ```text
//!  msg = type (u8, 4) || reserved (3 zero bytes) || receiver (u32 LE) || counter (u64 LE)
//!        || AEAD(T_send, counter, P || zero padding to a multiple of 16, empty AD)
//! ```
//! The AEAD nonce is 32 zero bits followed by the counter as 64-bit little-endian. An empty
//! plaintext is a keepalive.
//!
//! The handshake (Noise IKpsk2, cookies, timers) lives in control; it hands established
//! sessions to the workers as [`Session`]s (see [`SessionKeys`]). Workers:
//! - seal with [`seal`] / [`seal_packet`] using a per-(worker, peer) [`CounterBlock`] (nonce
//!   uniqueness across workers: `session` module doc), then [`push_outer_ipv4_udp`];
//! - route received UDP 51871 payloads by [`classify`]: handshake messages go to control, transport
//!   messages to [`open`] / [`open_packet`], which checks the sliding replay window shared by all
//!   receivers (`replay` module doc: lock-free, tagged words).
//!
//! Every failure is an [`OpenError`] / [`SealError`] variant for the pipeline to count as a
//! numbered drop reason.
mod aead;
pub mod replay;
pub mod session;

use std::{net::Ipv4Addr, ops::Range, sync::Arc};

use crate::{
    packet::PacketBuf,
    wire::{ipv4, udp},
};

pub use aead::{nonce_bytes, TAG_LEN};
pub use replay::{ReplayError, ReplayWindow, REPLAY_WINDOW};
pub use session::{
    CounterBlock, PeerId, Session, SessionError, SessionKeys, COUNTER_BLOCK, REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME_NS, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME_NS,
};

/// sluice's WireGuard UDP port (as Cilium).
pub const WIREGUARD_PORT: u16 = 51871;
/// Message type of a transport data message.
pub const MESSAGE_TRANSPORT: u8 = 4;
/// Bytes of the transport header (type, reserved, receiver index, counter).
pub const TRANSPORT_HEADER_LEN: usize = 16;
/// Smallest transport message: header and tag around an empty (keepalive) plaintext.
pub const MIN_TRANSPORT_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;
/// Plaintexts are padded with zeros to a multiple of this.
pub const PADDING_MULTIPLE: usize = 16;
/// Outer IPv4 (no options) + UDP header bytes written by [`push_outer_ipv4_udp`].
pub const OUTER_IPV4_UDP_LEN: usize = 20 + udp::HEADER_LEN;
/// Worst-case growth of a plaintext by WireGuard over IPv4: outer IPv4 + UDP, transport header,
/// tag and up to 15 bytes of padding (DESIGN.md's 60 bytes, rounded for the padding).
pub const WIREGUARD_OVERHEAD_BYTES: usize =
    OUTER_IPV4_UDP_LEN + MIN_TRANSPORT_LEN + PADDING_MULTIPLE - 1;

/// `n` rounded up to the WireGuard padding multiple.
#[inline]
pub fn padded_len(n: usize) -> usize {
    n.div_ceil(PADDING_MULTIPLE) * PADDING_MULTIPLE
}

/// Why a message could not be sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The session is older than REJECT_AFTER_TIME (180 s): a new handshake is needed.
    #[error("WireGuard session expired (older than 180 s); start a new handshake")]
    Expired,
    /// The session's counters reached REJECT_AFTER_MESSAGES: a new handshake is needed.
    #[error("WireGuard session used up its message counters; start a new handshake")]
    CounterExhausted,
    /// Fewer than 16 bytes (header), or 16 + 28 with the outer IPv4/UDP, in front of the frame.
    #[error(
        "no headroom in the frame for the WireGuard/outer headers; reserve more UMEM headroom"
    )]
    NoHeadroom,
    /// Not enough room behind the frame for padding and tag (up to 31 bytes).
    #[error("no tailroom in the frame for WireGuard padding and tag; reserve more tailroom")]
    NoTailroom,
    /// The plaintext range is not inside the buffer, or the message would exceed 65507 bytes.
    #[error("plaintext range outside the frame or too long for one UDP datagram")]
    BadPlaintext,
}

/// Why a received message was not accepted (or, for `Keepalive`, why nothing is forwarded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than header + tag (32 bytes).
    #[error("WireGuard transport message shorter than 32 bytes")]
    Short,
    /// The first four bytes are not type 4 with three zero reserved bytes (wireguard-go reads
    /// them as one little-endian u32 type, so a non-zero reserved byte is an unknown type).
    #[error("not a WireGuard transport message (type/reserved bytes)")]
    BadType,
    /// No session has this receiver index (unknown, rekeyed away, or never established).
    #[error("no WireGuard session for this receiver index")]
    UnknownReceiver,
    /// The counter was already received.
    #[error("replayed WireGuard counter")]
    Replayed,
    /// The counter is behind the replay window.
    #[error("WireGuard counter too old for the replay window")]
    TooOld,
    /// The replay window slot stayed contended by other receivers (dropped, not spun on).
    #[error("WireGuard replay window contended")]
    ReplayContended,
    /// The Poly1305 tag does not verify (wrong key, corrupted or forged).
    #[error("WireGuard message failed authentication")]
    AuthFailed,
    /// The session is older than REJECT_AFTER_TIME (180 s).
    #[error("WireGuard session expired")]
    SessionExpired,
    /// The counter is at or above REJECT_AFTER_MESSAGES.
    #[error("WireGuard counter beyond the session's message limit")]
    CounterExhausted,
    /// The authentic plaintext is not an IPv4 packet.
    #[error("WireGuard plaintext is not IPv4")]
    NotIpv4,
    /// The inner IPv4 total length is shorter than its header or longer than the plaintext.
    #[error("WireGuard plaintext IPv4 length does not fit the message")]
    InnerLength,
    /// An authentic empty message: a keepalive from `peer` (accepted, counted, not forwarded).
    #[error("WireGuard keepalive")]
    Keepalive { peer: PeerId },
}

impl From<ReplayError> for OpenError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Replayed => OpenError::Replayed,
            ReplayError::TooOld => OpenError::TooOld,
            ReplayError::Contended => OpenError::ReplayContended,
        }
    }
}

/// Kinds of WireGuard messages on the UDP port, by type and (handshake) exact size as
/// wireguard-go checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Type 1, 148 bytes: for control's handshake.
    HandshakeInitiation,
    /// Type 2, 92 bytes: for control's handshake.
    HandshakeResponse,
    /// Type 3, 64 bytes: for control's handshake.
    CookieReply,
    /// Type 4, at least 32 bytes: for [`open`].
    Transport,
    /// Anything else (drop).
    Unknown,
}

/// What a UDP 51871 payload is, from its first four bytes and its length.
pub fn classify(payload: &[u8]) -> MessageKind {
    let Some(head) = payload.first_chunk::<4>() else {
        return MessageKind::Unknown;
    };
    match (u32::from_le_bytes(*head), payload.len()) {
        (1, 148) => MessageKind::HandshakeInitiation,
        (2, 92) => MessageKind::HandshakeResponse,
        (3, 64) => MessageKind::CookieReply,
        (4, n) if n >= MIN_TRANSPORT_LEN => MessageKind::Transport,
        _ => MessageKind::Unknown,
    }
}

/// Finds sessions by our receiver index. Implemented by [`SessionTable`]; the pipeline may
/// implement it on its own table.
pub trait SessionLookup {
    fn by_receiver_index(&self, receiver_index: u32) -> Option<&Session>;
}

/// An immutable set of sessions sorted by receiver index (built by control, published to the
/// workers like a snapshot; lookups are a binary search, no allocation).
#[derive(Debug, Default, Clone)]
pub struct SessionTable {
    by_index: Vec<Arc<Session>>,
}

impl SessionTable {
    /// A table of `sessions`; with duplicate receiver indices the last one wins.
    pub fn new(sessions: impl IntoIterator<Item = Arc<Session>>) -> Self {
        let mut by_index: Vec<Arc<Session>> = sessions.into_iter().collect();
        // Stable sort, then keep the last of equal indices.
        by_index.sort_by_key(|s| s.receiver_index());
        let mut out: Vec<Arc<Session>> = Vec::with_capacity(by_index.len());
        for s in by_index {
            match out.last_mut() {
                Some(last) if last.receiver_index() == s.receiver_index() => *last = s,
                _ => out.push(s),
            }
        }
        SessionTable { by_index: out }
    }
    pub fn len(&self) -> usize {
        self.by_index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.by_index.iter()
    }
}

impl SessionLookup for SessionTable {
    #[inline]
    fn by_receiver_index(&self, receiver_index: u32) -> Option<&Session> {
        self.by_index
            .binary_search_by_key(&receiver_index, |s| s.receiver_index())
            .ok()
            .map(|i| &*self.by_index[i])
    }
}

/// Seals `buf[plaintext]` in place into a transport message and returns the message's range
/// in `buf`: the 16-byte header goes into the 16 bytes in front of the plaintext, zero padding
/// and the 16-byte tag behind it. `now_ns` is the batch time (for the session's age).
///
/// Needs `plaintext.start >= 16` and `padded_len(plaintext.len()) + 16` bytes from
/// `plaintext.start` inside `buf`; on any error `buf` is unchanged and no counter is used.
#[inline]
pub fn seal(
    session: &Session,
    block: &mut CounterBlock,
    buf: &mut [u8],
    plaintext: Range<usize>,
    now_ns: u64,
) -> Result<Range<usize>, SealError> {
    seal_within(session, block, buf, plaintext, usize::MAX, now_ns)
}

/// The padded length of a `len`-byte plaintext when the tunnel carries at most `mtu` bytes of
/// plaintext: padding to 16 never makes it exceed `mtu` (as WireGuard pads: `min(round_up(len,
/// 16), mtu)`), so a packet that fits the MTU is never made too big by its padding.
#[inline]
pub fn padded_len_within(len: usize, mtu: usize) -> usize {
    padded_len(len).min(len.max(mtu))
}

/// [`seal`] with the padding limited by the tunnel MTU `mtu` (plaintext bytes).
#[inline]
pub fn seal_within(
    session: &Session,
    block: &mut CounterBlock,
    buf: &mut [u8],
    plaintext: Range<usize>,
    mtu: usize,
    now_ns: u64,
) -> Result<Range<usize>, SealError> {
    let Range { start, end } = plaintext;
    if start > end || end > buf.len() {
        return Err(SealError::BadPlaintext);
    }
    if start < TRANSPORT_HEADER_LEN {
        return Err(SealError::NoHeadroom);
    }
    let padded_end = start + padded_len_within(end - start, mtu);
    let msg_end = padded_end + TAG_LEN;
    if msg_end > buf.len() {
        return Err(SealError::NoTailroom);
    }
    if msg_end - (start - TRANSPORT_HEADER_LEN) + OUTER_IPV4_UDP_LEN > usize::from(u16::MAX) {
        return Err(SealError::BadPlaintext);
    }
    if session.expired(now_ns) {
        return Err(SealError::Expired);
    }
    let counter = block.next_counter(session)?;
    buf[end..padded_end].fill(0);
    let header = &mut buf[start - TRANSPORT_HEADER_LEN..start];
    header[..4].copy_from_slice(&[MESSAGE_TRANSPORT, 0, 0, 0]);
    header[4..8].copy_from_slice(&session.peer_index().to_le_bytes());
    header[8..16].copy_from_slice(&counter.to_le_bytes());
    let tag = session
        .send
        .seal(counter, &mut buf[start..padded_end])
        .ok_or(SealError::BadPlaintext)?;
    buf[padded_end..msg_end].copy_from_slice(&tag);
    Ok(start - TRANSPORT_HEADER_LEN..msg_end)
}

/// [`seal`] on a [`PacketBuf`]: the frame's bytes are the plaintext; afterwards the frame is the
/// transport message (grown 16 bytes to the front, padding and tag at the back).
#[inline]
pub fn seal_packet(
    session: &Session,
    block: &mut CounterBlock,
    pkt: &mut PacketBuf<'_>,
    now_ns: u64,
) -> Result<(), SealError> {
    seal_packet_within(session, block, pkt, usize::MAX, now_ns)
}

/// [`seal_packet`] with the padding limited by the tunnel MTU `mtu` (plaintext bytes; see
/// [`padded_len_within`]).
#[inline]
pub fn seal_packet_within(
    session: &Session,
    block: &mut CounterBlock,
    pkt: &mut PacketBuf<'_>,
    mtu: usize,
    now_ns: u64,
) -> Result<(), SealError> {
    let len = pkt.len();
    let msg_len = TRANSPORT_HEADER_LEN + padded_len_within(len, mtu) + TAG_LEN;
    if pkt.headroom() < TRANSPORT_HEADER_LEN {
        return Err(SealError::NoHeadroom);
    }
    if pkt.tailroom() < msg_len - TRANSPORT_HEADER_LEN - len {
        return Err(SealError::NoTailroom);
    }
    pkt.push_front(TRANSPORT_HEADER_LEN)
        .map_err(|_| SealError::NoHeadroom)?;
    let plaintext = TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len;
    pkt.set_len(msg_len).map_err(|_| SealError::NoTailroom)?;
    match seal_within(session, block, pkt.data_mut(), plaintext, mtu, now_ns) {
        Ok(_) => Ok(()),
        Err(e) => {
            // Give the frame back as it was (seal left the bytes unchanged).
            let _ = pkt.pull_front(TRANSPORT_HEADER_LEN);
            let _ = pkt.set_len(len);
            Err(e)
        }
    }
}

/// The outer headers [`push_outer_ipv4_udp`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OuterUdp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ttl: u8,
}

/// Writes an outer IPv4 header (20 bytes, DF set, header checksum computed) and a UDP header
/// in front of the frame (a sealed transport message) and grows the frame over them.
///
/// The UDP checksum is 0 ("none", allowed over IPv4 by RFC 768): every byte of the payload is
/// covered by the Poly1305 tag, which rejects any corruption a checksum would catch, so
/// computing it would cost a pass over the packet for nothing. Receivers accept it: Linux's UDP
/// socket under wireguard-go and the Linux WireGuard module take zero-checksum IPv4 UDP. DF is
/// set: sluice never fragments, the pod MTU leaves room for the overhead.
pub fn push_outer_ipv4_udp(pkt: &mut PacketBuf<'_>, outer: &OuterUdp) -> Result<(), SealError> {
    let msg_len = pkt.len();
    if pkt.headroom() < OUTER_IPV4_UDP_LEN {
        return Err(SealError::NoHeadroom);
    }
    if msg_len + OUTER_IPV4_UDP_LEN > usize::from(u16::MAX) {
        return Err(SealError::BadPlaintext);
    }
    pkt.push_front(OUTER_IPV4_UDP_LEN)
        .map_err(|_| SealError::NoHeadroom)?;
    let data = pkt.data_mut();
    let repr = ipv4::Repr {
        src: outer.src,
        dst: outer.dst,
        protocol: 17,
        ttl: outer.ttl,
        payload_len: udp::HEADER_LEN + msg_len,
    };
    ipv4::emit_df(&mut data[..20], &repr).map_err(|_| SealError::BadPlaintext)?;
    udp::emit(
        &mut data[20..OUTER_IPV4_UDP_LEN],
        outer.src_port,
        outer.dst_port,
        msg_len,
    )
    .map_err(|_| SealError::BadPlaintext)?;
    Ok(())
}

/// A transport message that was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Whose session it came in on.
    pub peer: PeerId,
    /// Our receiver index of that session.
    pub receiver_index: u32,
    /// Its counter.
    pub counter: u64,
    /// Where the plaintext (the inner IPv4 packet, padding stripped) is in the message.
    pub plaintext: Range<usize>,
}

/// Opens the transport message `msg` (a UDP payload) in place: checks type and length, finds
/// the session by our receiver index, pre-checks the counter against the replay window,
/// verifies and decrypts, then marks the counter in the window (only now: forgeries never move
/// it), and strips the padding by the inner IPv4 total length.
///
/// An authentic empty plaintext is [`OpenError::Keepalive`] (its counter is marked). On every
/// error before authentication `msg` is unchanged; on `AuthFailed` the AEAD has zeroed the
/// ciphertext (the frame is dropped either way).
#[inline]
pub fn open<L: SessionLookup + ?Sized>(
    sessions: &L,
    msg: &mut [u8],
    now_ns: u64,
) -> Result<Opened, OpenError> {
    if msg.len() < MIN_TRANSPORT_LEN {
        return Err(OpenError::Short);
    }
    let (header, body) = msg.split_at_mut(TRANSPORT_HEADER_LEN);
    if header[..4] != [MESSAGE_TRANSPORT, 0, 0, 0] {
        return Err(OpenError::BadType);
    }
    let mut idx = [0u8; 4];
    idx.copy_from_slice(&header[4..8]);
    let receiver_index = u32::from_le_bytes(idx);
    let mut ctr = [0u8; 8];
    ctr.copy_from_slice(&header[8..16]);
    let counter = u64::from_le_bytes(ctr);
    let session = sessions
        .by_receiver_index(receiver_index)
        .ok_or(OpenError::UnknownReceiver)?;
    if session.expired(now_ns) {
        return Err(OpenError::SessionExpired);
    }
    if counter >= REJECT_AFTER_MESSAGES {
        return Err(OpenError::CounterExhausted);
    }
    session.replay.precheck(counter)?;
    let (ciphertext, tag_bytes) = body.split_at_mut(body.len() - TAG_LEN);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(tag_bytes);
    if !session.recv.open(counter, ciphertext, &tag) {
        return Err(OpenError::AuthFailed);
    }
    session.replay.check_and_mark(counter)?;
    if ciphertext.is_empty() {
        return Err(OpenError::Keepalive {
            peer: session.peer(),
        });
    }
    if ciphertext[0] >> 4 != 4 || ciphertext.len() < 20 {
        return Err(OpenError::NotIpv4);
    }
    let total = usize::from(u16::from_be_bytes([ciphertext[2], ciphertext[3]]));
    let header_len = usize::from(ciphertext[0] & 0x0f) * 4;
    if header_len < 20 || total < header_len || total > ciphertext.len() {
        return Err(OpenError::InnerLength);
    }
    Ok(Opened {
        peer: session.peer(),
        receiver_index,
        counter,
        plaintext: TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + total,
    })
}

/// [`open`] on a [`PacketBuf`] holding the transport message (the UDP payload): on success the
/// frame is narrowed to the plaintext (the inner IPv4 packet); on error it is left as it was.
#[inline]
pub fn open_packet<L: SessionLookup + ?Sized>(
    sessions: &L,
    pkt: &mut PacketBuf<'_>,
    now_ns: u64,
) -> Result<Opened, OpenError> {
    let opened = open(sessions, pkt.data_mut(), now_ns)?;
    // Cannot fail: the plaintext range lies inside the message.
    pkt.pull_front(opened.plaintext.start)
        .map_err(|_| OpenError::InnerLength)?;
    pkt.set_len(opened.plaintext.len())
        .map_err(|_| OpenError::InnerLength)?;
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(created_ns: u64) -> (Session, Session) {
        let a = SessionKeys {
            receiver_index: 0x1111_1111,
            peer_index: 0x2222_2222,
            send_key: [0xa1; 32],
            recv_key: [0xb2; 32],
            created_ns,
            initiator: true,
            peer: 2,
        };
        let b = SessionKeys {
            receiver_index: a.peer_index,
            peer_index: a.receiver_index,
            send_key: a.recv_key,
            recv_key: a.send_key,
            created_ns,
            initiator: false,
            peer: 1,
        };
        (
            Session::new(&a).expect("session"),
            Session::new(&b).expect("session"),
        )
    }

    /// A minimal IPv4 packet of `total` bytes (header + zero payload).
    fn ipv4_packet(total: usize) -> Vec<u8> {
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p
    }

    const HEAD: usize = 64;

    fn sealed(a: &Session, block: &mut CounterBlock, pt: &[u8]) -> (Vec<u8>, Range<usize>) {
        let mut buf = vec![0xeeu8; HEAD + pt.len() + 64];
        buf[HEAD..HEAD + pt.len()].copy_from_slice(pt);
        let r = seal(a, block, &mut buf, HEAD..HEAD + pt.len(), 0).expect("seal");
        (buf, r)
    }

    #[test]
    fn seal_then_open_round_trips_and_pads() {
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let mut block = CounterBlock::default();
        for len in [20usize, 21, 31, 32, 33, 100, 1400] {
            let pt = ipv4_packet(len);
            let (mut buf, r) = sealed(&a, &mut block, &pt);
            assert_eq!(r.len(), 16 + padded_len(len) + 16, "len {len}");
            assert_eq!(classify(&buf[r.clone()]), MessageKind::Transport);
            // The header names the receiver: the peer's index.
            assert_eq!(
                &buf[r.start..r.start + 8],
                &[4, 0, 0, 0, 0x22, 0x22, 0x22, 0x22]
            );
            let opened = open(&table, &mut buf[r.clone()], 0).expect("open");
            assert_eq!(opened.peer, 1);
            let msg = &buf[r];
            assert_eq!(&msg[opened.plaintext.clone()], &pt[..]);
            // The padding decrypted to zeros.
            assert!(msg[16 + len..16 + padded_len(len)].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn keepalive_is_authenticated_and_reported() {
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let mut block = CounterBlock::default();
        let (mut buf, r) = sealed(&a, &mut block, &[]);
        assert_eq!(r.len(), 32);
        assert_eq!(
            open(&table, &mut buf[r.clone()], 0),
            Err(OpenError::Keepalive { peer: 1 })
        );
        // Its counter was marked: the same keepalive again is a replay.
        assert_eq!(open(&table, &mut buf[r], 0), Err(OpenError::Replayed));
    }

    #[test]
    fn every_open_error_has_its_cause() {
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let mut block = CounterBlock::default();
        let (buf, r) = sealed(&a, &mut block, &ipv4_packet(60));
        let msg = buf[r].to_vec();
        let try_open = |m: &[u8], now: u64| open(&table, &mut m.to_vec(), now);

        assert_eq!(try_open(&msg[..31], 0), Err(OpenError::Short));
        let mut bad = msg.clone();
        bad[0] = 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::BadType));
        let mut bad = msg.clone();
        bad[2] = 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::BadType));
        let mut bad = msg.clone();
        bad[4] ^= 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::UnknownReceiver));
        let mut bad = msg.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::AuthFailed));
        let mut bad = msg.clone();
        bad[20] ^= 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::AuthFailed));
        // A changed counter is a different nonce: not authentic.
        let mut bad = msg.clone();
        bad[8] ^= 1;
        assert_eq!(try_open(&bad, 0), Err(OpenError::AuthFailed));
        let mut bad = msg.clone();
        bad[8..16].copy_from_slice(&REJECT_AFTER_MESSAGES.to_le_bytes());
        assert_eq!(try_open(&bad, 0), Err(OpenError::CounterExhausted));
        assert_eq!(
            try_open(&msg, REJECT_AFTER_TIME_NS),
            Err(OpenError::SessionExpired)
        );
        // Forgeries and expired attempts did not mark the counter.
        assert!(try_open(&msg, 0).is_ok());
        assert_eq!(try_open(&msg, 0), Err(OpenError::Replayed));

        // Authentic but not IPv4 / bad length.
        let mut v6 = ipv4_packet(60);
        v6[0] = 0x60;
        let (buf, r) = sealed(&a, &mut block, &v6);
        assert_eq!(try_open(&buf[r], 0), Err(OpenError::NotIpv4));
        let mut long = ipv4_packet(60);
        long[2..4].copy_from_slice(&200u16.to_be_bytes());
        let (buf, r) = sealed(&a, &mut block, &long);
        assert_eq!(try_open(&buf[r], 0), Err(OpenError::InnerLength));
        let mut short = ipv4_packet(60);
        short[2..4].copy_from_slice(&10u16.to_be_bytes());
        let (buf, r) = sealed(&a, &mut block, &short);
        assert_eq!(try_open(&buf[r], 0), Err(OpenError::InnerLength));
        let (buf, r) = sealed(&a, &mut block, &[0x45; 7]);
        assert_eq!(try_open(&buf[r], 0), Err(OpenError::NotIpv4));
    }

    #[test]
    fn old_counters_are_too_old() {
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let mut block = CounterBlock::default();
        let (first, r0) = sealed(&a, &mut block, &ipv4_packet(20));
        for _ in 0..REPLAY_WINDOW {
            let (mut buf, r) = sealed(&a, &mut block, &ipv4_packet(20));
            open(&table, &mut buf[r], 0).expect("open");
        }
        assert_eq!(
            open(&table, &mut first[r0].to_vec(), 0),
            Err(OpenError::TooOld)
        );
    }

    #[test]
    fn seal_errors_leave_the_frame_alone() {
        let (a, _) = pair(0);
        let mut block = CounterBlock::default();
        let mut buf = vec![7u8; 100];
        assert_eq!(
            seal(&a, &mut block, &mut buf, 10..50, 0),
            Err(SealError::NoHeadroom)
        );
        assert_eq!(
            seal(&a, &mut block, &mut buf, 16..81, 0),
            Err(SealError::NoTailroom)
        );
        assert_eq!(
            seal(&a, &mut block, &mut buf, Range { start: 50, end: 40 }, 0),
            Err(SealError::BadPlaintext)
        );
        assert_eq!(
            seal(&a, &mut block, &mut buf, 16..200, 0),
            Err(SealError::BadPlaintext)
        );
        assert_eq!(
            seal(&a, &mut block, &mut buf, 16..40, REJECT_AFTER_TIME_NS),
            Err(SealError::Expired)
        );
        assert!(buf.iter().all(|&x| x == 7));
        assert_eq!(a.counters_taken(), 0, "no counter used by failed seals");
        // 16 + 64 + 16 bytes fit in 100.
        assert_eq!(seal(&a, &mut block, &mut buf, 16..80, 0), Ok(0..96));
    }

    #[test]
    fn packet_wrappers_and_outer_headers() {
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let mut block = CounterBlock::default();
        let pt = ipv4_packet(101);
        let mut buf = vec![0u8; 256];
        buf[100..201].copy_from_slice(&pt);
        let mut pkt = PacketBuf::new(&mut buf, 100, 101).expect("pkt");
        seal_packet(&a, &mut block, &mut pkt, 0).expect("seal");
        assert_eq!((pkt.head(), pkt.len()), (84, 16 + 112 + 16));
        let outer = OuterUdp {
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(192, 0, 2, 2),
            src_port: WIREGUARD_PORT,
            dst_port: WIREGUARD_PORT,
            ttl: 64,
        };
        push_outer_ipv4_udp(&mut pkt, &outer).expect("outer");
        assert_eq!((pkt.head(), pkt.len()), (56, 28 + 144));
        let ip = ipv4::Packet::new_checked(pkt.data()).expect("ipv4");
        assert!(ip.verify_checksum() && ip.dont_fragment());
        assert_eq!(
            (ip.src(), ip.dst(), ip.protocol()),
            (outer.src, outer.dst, 17)
        );
        assert_eq!(ip.total_len(), 28 + 144);
        let d = udp::Datagram::new_checked(ip.payload()).expect("udp");
        assert_eq!((d.dst_port(), d.len(), d.checksum()), (51871, 8 + 144, 0));

        pkt.pull_front(OUTER_IPV4_UDP_LEN).expect("pull");
        let opened = open_packet(&table, &mut pkt, 0).expect("open");
        assert_eq!(opened.plaintext, 16..117);
        assert_eq!(pkt.data(), &pt[..]);
        assert_eq!(pkt.head(), 100);

        // Too little room: the frame is unchanged.
        let mut small = vec![0u8; 140];
        let mut pkt = PacketBuf::new(&mut small, 20, 101).expect("pkt");
        assert_eq!(
            seal_packet(&a, &mut block, &mut pkt, 0),
            Err(SealError::NoTailroom)
        );
        assert_eq!((pkt.head(), pkt.len()), (20, 101));
        let mut pkt = PacketBuf::new(&mut small, 10, 101).expect("pkt");
        assert_eq!(
            seal_packet(&a, &mut block, &mut pkt, 0),
            Err(SealError::NoHeadroom)
        );
        assert_eq!(
            push_outer_ipv4_udp(&mut pkt, &outer),
            Err(SealError::NoHeadroom)
        );
    }

    #[test]
    fn padding_never_exceeds_the_tunnel_mtu() {
        assert_eq!(
            padded_len_within(1390, 1390),
            1390,
            "1390 fits: not padded to 1392"
        );
        assert_eq!(
            padded_len_within(1385, 1390),
            1390,
            "padded only up to the MTU"
        );
        assert_eq!(padded_len_within(1370, 1390), 1376);
        assert_eq!(
            padded_len_within(1400, 1390),
            1400,
            "over the MTU anyway: no padding to make it worse"
        );
        assert_eq!(padded_len_within(0, 1390), 0);
        let (a, b) = pair(0);
        let mut block = CounterBlock::default();
        let mut buf = vec![0x45u8; TRANSPORT_HEADER_LEN + 1390 + TAG_LEN + 64];
        buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + 4].copy_from_slice(&[0x45, 0, 0x05, 0x6e]);
        let plain = TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + 1390;
        let msg = seal_within(&a, &mut block, &mut buf, plain, 1390, 0).unwrap();
        assert_eq!(msg.len(), TRANSPORT_HEADER_LEN + 1390 + TAG_LEN);
        let table = SessionTable::new([Arc::new(b)]);
        let opened = open(&table, &mut buf[msg], 0).unwrap();
        assert_eq!(opened.plaintext.len(), 1390);
    }

    #[test]
    fn classify_by_type_and_size() {
        assert_eq!(classify(&[1; 148][..]), MessageKind::Unknown);
        let mut m = [0u8; 148];
        m[0] = 1;
        assert_eq!(classify(&m), MessageKind::HandshakeInitiation);
        assert_eq!(classify(&m[..92]), MessageKind::Unknown);
        m[0] = 2;
        assert_eq!(classify(&m[..92]), MessageKind::HandshakeResponse);
        m[0] = 3;
        assert_eq!(classify(&m[..64]), MessageKind::CookieReply);
        m[0] = 4;
        assert_eq!(classify(&m[..32]), MessageKind::Transport);
        assert_eq!(classify(&m[..31]), MessageKind::Unknown);
        assert_eq!(classify(&[]), MessageKind::Unknown);
    }

    #[test]
    fn table_finds_by_index_and_last_duplicate_wins() {
        let (a, b) = pair(0);
        let (a2, _) = pair(5);
        let t = SessionTable::new([Arc::new(a), Arc::new(b), Arc::new(a2)]);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.by_receiver_index(0x1111_1111).map(|s| s.created_ns()),
            Some(5)
        );
        assert_eq!(t.by_receiver_index(0x2222_2222).map(|s| s.peer()), Some(1));
        assert!(t.by_receiver_index(3).is_none());
    }

    #[test]
    fn concurrent_seal_and_open_deliver_each_message_once() {
        // Two senders seal to one session; two receivers open everything both produced (each
        // message given to both receivers): each message is accepted exactly once.
        let (a, b) = pair(0);
        let table = SessionTable::new([Arc::new(b)]);
        let msgs: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let a = &a;
                    s.spawn(move || {
                        let mut block = CounterBlock::default();
                        (0..3000)
                            .map(|_| {
                                let (buf, r) = sealed(a, &mut block, &ipv4_packet(40));
                                buf[r].to_vec()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("sender"))
                .collect()
        });
        let ok = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (msgs, table, ok) = (&msgs, &table, &ok);
                s.spawn(move || {
                    for m in msgs {
                        match open(table, &mut m.clone(), 0) {
                            Ok(_) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(OpenError::Replayed | OpenError::TooOld) => {}
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                });
            }
        });
        // The senders' counters interleave by blocks of 256 and all stay below ~6600, inside
        // the 8128 window whatever the arrival order: every message is accepted exactly once.
        assert_eq!(ok.load(std::sync::atomic::Ordering::Relaxed), 6000);
    }
}
