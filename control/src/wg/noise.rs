//! WireGuard's handshake, sans-IO: Noise_IKpsk2 messages (whitepaper §5.4.2-5.4.5), MAC1/MAC2
//! and cookie replies (§5.4.7), built and consumed as byte arrays. No sockets, no clock, no RNG:
//! times come in as `now_ns` and randomness (ephemeral keys, nonces) as arguments, so every step
//! is reproducible in a test. [`super::device`] owns the peers, the index table and the timers.
//!
//! Message layouts (all integers little-endian, as wireguard-go's `noise-protocol.go`):
//!
//! ```text
//! initiation (148 B): type=1 | 3×0 | sender u32 | ephemeral 32 | static 32+16 | timestamp 12+16 | mac1 16 | mac2 16
//! response    (92 B): type=2 | 3×0 | sender u32 | receiver u32 | ephemeral 32 | empty 0+16 | mac1 16 | mac2 16
//! cookie      (64 B): type=3 | 3×0 | receiver u32 | nonce 24 | cookie 16+16
//! transport (32+ B): type=4 | 3×0 | receiver u32 | counter u64 | packet+16
//! ```
//!
//! The pre-shared key is all zeros (sluice does not use the psk slot); it still enters the hash
//! chain as `Q` in `KDF3`, exactly as WireGuard without a psk.
use std::net::SocketAddr;

use x25519_dalek::{PublicKey as DhPublic, StaticSecret};

use super::crypto::{
    self, aead_open, aead_seal, hash, kdf1, kdf2, kdf3, mac, HASH_LEN, MAC_LEN, TAG_LEN,
    TIMESTAMP_LEN, XNONCE_LEN,
};
use super::keys::{PrivateKey, PublicKey, KEY_LEN};

/// Noise protocol name: the first chaining key is `HASH(CONSTRUCTION)`.
pub const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// WireGuard's identifier, mixed into the first hash.
pub const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
/// Label of the MAC1 key: `HASH(LABEL_MAC1 ‖ receiver's static public key)`.
pub const LABEL_MAC1: &[u8] = b"mac1----";
/// Label of the cookie encryption key: `HASH(LABEL_COOKIE ‖ receiver's static public key)`.
pub const LABEL_COOKIE: &[u8] = b"cookie--";

/// Message type of handshake initiations.
pub const MSG_INITIATION: u8 = 1;
/// Message type of handshake responses.
pub const MSG_RESPONSE: u8 = 2;
/// Message type of cookie replies.
pub const MSG_COOKIE_REPLY: u8 = 3;
/// Message type of transport data.
pub const MSG_TRANSPORT: u8 = 4;

/// Size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Size of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Transport header (type, receiver, counter) before the sealed packet.
pub const TRANSPORT_HEADER_LEN: usize = 16;
/// Smallest transport message: header and tag (a keepalive).
pub const TRANSPORT_MIN_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;

/// Why a handshake message was refused. Numbered and stable (used as a counter index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum NoiseError {
    /// Length does not match the message type.
    #[error("message has the wrong length for its type")]
    BadLength = 0,
    /// Unknown message type or non-zero reserved bytes.
    #[error("unknown message type or non-zero reserved bytes")]
    BadType = 1,
    /// MAC1 does not verify: not meant for this node's key, or corrupted.
    #[error("MAC1 does not verify (message not addressed to this node's public key)")]
    BadMac1 = 2,
    /// Under load and MAC2 missing or stale: a cookie reply was sent instead.
    #[error("under load and MAC2 missing or stale; answered with a cookie reply")]
    CookieRequired = 3,
    /// The initiator's static key did not decrypt (wrong keys on one side).
    #[error("the static key does not decrypt (initiator uses a different key for this node)")]
    DecryptStatic = 4,
    /// The initiator's static key is not a configured peer.
    #[error("initiation from a public key that is not a configured peer")]
    UnknownPeer = 5,
    /// The timestamp did not decrypt.
    #[error("the timestamp does not decrypt")]
    DecryptTimestamp = 6,
    /// The timestamp is not newer than the last accepted one from this peer (replay).
    #[error("initiation timestamp not newer than the last accepted one (replay)")]
    Replay = 7,
    /// Initiations from this peer arrive faster than one per flood interval.
    #[error("initiations from this peer arrive too fast (flood)")]
    Flood = 8,
    /// The receiver index is not one of ours.
    #[error("receiver index unknown")]
    UnknownIndex = 9,
    /// The message does not fit the handshake's state (e.g. a response nobody waits for).
    #[error("message does not match the handshake state")]
    UnexpectedState = 10,
    /// The response's empty payload did not decrypt (wrong keys on one side).
    #[error("the response does not decrypt (responder uses different keys)")]
    DecryptResponse = 11,
    /// A Diffie-Hellman result was all zeros (low-order public key).
    #[error("a Diffie-Hellman result is all zeros (invalid public key)")]
    BadPublicKey = 12,
    /// A cookie reply did not decrypt, or answers no initiation of ours.
    #[error("cookie reply does not decrypt or answers nothing we sent")]
    BadCookieReply = 13,
    /// A transport message did not decrypt.
    #[error("transport message does not decrypt")]
    DecryptTransport = 14,
    /// The OS RNG failed.
    #[error("the OS random number generator failed")]
    Rng = 15,
}

impl NoiseError {
    /// Number of variants (size of a counter array indexed by `self as usize`).
    pub const COUNT: usize = 16;
    /// Every variant, in number order.
    pub const ALL: [NoiseError; Self::COUNT] = [
        Self::BadLength,
        Self::BadType,
        Self::BadMac1,
        Self::CookieRequired,
        Self::DecryptStatic,
        Self::UnknownPeer,
        Self::DecryptTimestamp,
        Self::Replay,
        Self::Flood,
        Self::UnknownIndex,
        Self::UnexpectedState,
        Self::DecryptResponse,
        Self::BadPublicKey,
        Self::BadCookieReply,
        Self::DecryptTransport,
        Self::Rng,
    ];

    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadLength => "bad_length",
            Self::BadType => "bad_type",
            Self::BadMac1 => "bad_mac1",
            Self::CookieRequired => "cookie_required",
            Self::DecryptStatic => "decrypt_static",
            Self::UnknownPeer => "unknown_peer",
            Self::DecryptTimestamp => "decrypt_timestamp",
            Self::Replay => "replay",
            Self::Flood => "flood",
            Self::UnknownIndex => "unknown_index",
            Self::UnexpectedState => "unexpected_state",
            Self::DecryptResponse => "decrypt_response",
            Self::BadPublicKey => "bad_public_key",
            Self::BadCookieReply => "bad_cookie_reply",
            Self::DecryptTransport => "decrypt_transport",
            Self::Rng => "rng",
        }
    }
}

/// `C0 = HASH(CONSTRUCTION)` and `H0 = HASH(C0 ‖ IDENTIFIER)`.
pub fn initial_chain() -> ([u8; HASH_LEN], [u8; HASH_LEN]) {
    let c0 = hash(&[CONSTRUCTION]);
    let h0 = hash(&[&c0, IDENTIFIER]);
    (c0, h0)
}

fn dh(secret: &StaticSecret, public: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], NoiseError> {
    let shared = secret.diffie_hellman(&DhPublic::from(*public));
    if !shared.was_contributory() {
        return Err(NoiseError::BadPublicKey);
    }
    Ok(shared.to_bytes())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The message type byte, after checking the three reserved bytes are zero.
pub fn message_type(msg: &[u8]) -> Result<u8, NoiseError> {
    match msg {
        [t, 0, 0, 0, ..] => Ok(*t),
        _ => Err(NoiseError::BadType),
    }
}

/// A completed handshake's transport keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// Our index: the receiver index the peer puts in transport messages to us.
    pub local_index: u32,
    /// The peer's index: what we put in transport messages to the peer.
    pub remote_index: u32,
    /// Key sealing our transport messages.
    pub send_key: [u8; HASH_LEN],
    /// Key opening the peer's transport messages.
    pub recv_key: [u8; HASH_LEN],
    /// Whether we sent the initiation. A responder may only send once the initiator has used
    /// the session (WireGuard's key confirmation).
    pub is_initiator: bool,
    /// When the keys were derived (`now_ns` of the caller's clock).
    pub created_ns: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("is_initiator", &self.is_initiator)
            .field("created_ns", &self.created_ns)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A transport message (type 4) carrying `packet` with nonce `counter`. Slow-path helper
    /// (keepalives, tests); the workers seal in place.
    pub fn seal_transport(&self, counter: u64, packet: &[u8]) -> Option<Vec<u8>> {
        let sealed = aead_seal(&self.send_key, counter, packet, &[])?;
        let mut msg = Vec::with_capacity(TRANSPORT_HEADER_LEN + sealed.len());
        msg.extend_from_slice(&[MSG_TRANSPORT, 0, 0, 0]);
        msg.extend_from_slice(&self.remote_index.to_le_bytes());
        msg.extend_from_slice(&counter.to_le_bytes());
        msg.extend_from_slice(&sealed);
        Some(msg)
    }

    /// Opens a transport message addressed to this session: `(counter, packet)`. No replay
    /// window here (the workers keep it).
    pub fn open_transport(&self, msg: &[u8]) -> Result<(u64, Vec<u8>), NoiseError> {
        if msg.len() < TRANSPORT_MIN_LEN {
            return Err(NoiseError::BadLength);
        }
        if message_type(msg)? != MSG_TRANSPORT {
            return Err(NoiseError::BadType);
        }
        if u32_at(msg, 4) != self.local_index {
            return Err(NoiseError::UnknownIndex);
        }
        let counter = u64::from_le_bytes(array_at(msg, 8));
        let packet = aead_open(&self.recv_key, counter, &msg[TRANSPORT_HEADER_LEN..], &[])
            .ok_or(NoiseError::DecryptTransport)?;
        Ok((counter, packet))
    }
}

/// This node's static key with the values derived from it once.
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    /// `HASH(LABEL_MAC1 ‖ our public key)`: checks MAC1 of messages sent to us.
    mac1_key: [u8; HASH_LEN],
    /// `HASH(LABEL_COOKIE ‖ our public key)`: encrypts the cookie replies we send.
    cookie_key: [u8; HASH_LEN],
}

impl Identity {
    /// Derives everything from `private`.
    pub fn new(private: &PrivateKey) -> Self {
        let secret = StaticSecret::from(*private.as_bytes());
        let public = PublicKey(DhPublic::from(&secret).to_bytes());
        Self {
            mac1_key: hash(&[LABEL_MAC1, &public.0]),
            cookie_key: hash(&[LABEL_COOKIE, &public.0]),
            secret,
            public,
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Whether MAC1 of `msg` (an initiation or response addressed to us) verifies.
    pub fn check_mac1(&self, msg: &[u8]) -> bool {
        if msg.len() < 2 * MAC_LEN {
            return false;
        }
        let mac1_at = msg.len() - 2 * MAC_LEN;
        let expected = mac(&self.mac1_key, &[&msg[..mac1_at]]);
        crypto::ct_eq(&expected, &msg[mac1_at..mac1_at + MAC_LEN])
    }
}

/// What an initiation told us, before the peer-specific checks (replay, flood).
#[derive(Clone)]
pub struct Initiation {
    /// The initiator's static public key (decrypted).
    pub remote_static: PublicKey,
    /// The initiator's index.
    pub sender_index: u32,
    remote_ephemeral: [u8; KEY_LEN],
    /// The decrypted TAI64N timestamp.
    pub timestamp: [u8; TIMESTAMP_LEN],
    hash: [u8; HASH_LEN],
    chain_key: [u8; HASH_LEN],
}

/// Decrypts an initiation addressed to `id` (MAC1 checked by the caller, §5.4.2 responder side).
pub fn open_initiation(id: &Identity, msg: &[u8]) -> Result<Initiation, NoiseError> {
    if msg.len() != INITIATION_LEN {
        return Err(NoiseError::BadLength);
    }
    if message_type(msg)? != MSG_INITIATION {
        return Err(NoiseError::BadType);
    }
    let sender_index = u32_at(msg, 4);
    let ephemeral: [u8; KEY_LEN] = array_at(msg, 8);
    let (c0, h0) = initial_chain();
    let mut h = hash(&[&h0, &id.public.0]);
    let mut c = kdf1(&c0, &ephemeral);
    h = hash(&[&h, &ephemeral]);
    let (c1, k) = kdf2(&c, &dh(&id.secret, &ephemeral)?);
    c = c1;
    let sealed_static = &msg[40..88];
    let static_bytes = aead_open(&k, 0, sealed_static, &h).ok_or(NoiseError::DecryptStatic)?;
    let remote_static: [u8; KEY_LEN] =
        <[u8; KEY_LEN]>::try_from(static_bytes.as_slice()).map_err(|_| NoiseError::BadLength)?;
    h = hash(&[&h, sealed_static]);
    let (c2, k) = kdf2(&c, &dh(&id.secret, &remote_static)?);
    c = c2;
    let sealed_ts = &msg[88..116];
    let ts = aead_open(&k, 0, sealed_ts, &h).ok_or(NoiseError::DecryptTimestamp)?;
    let timestamp =
        <[u8; TIMESTAMP_LEN]>::try_from(ts.as_slice()).map_err(|_| NoiseError::BadLength)?;
    h = hash(&[&h, sealed_ts]);
    Ok(Initiation {
        remote_static: PublicKey(remote_static),
        sender_index,
        remote_ephemeral: ephemeral,
        timestamp,
        hash: h,
        chain_key: c,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Zeroed,
    InitiationCreated,
    InitiationConsumed,
}

/// Handshake state with one peer (wireguard-go's `Handshake`).
pub struct Handshake {
    remote_static: PublicKey,
    psk: [u8; HASH_LEN],
    state: State,
    hash: [u8; HASH_LEN],
    chain_key: [u8; HASH_LEN],
    local_ephemeral: Option<StaticSecret>,
    remote_ephemeral: [u8; KEY_LEN],
    /// Our index for the handshake in flight (0 when none).
    pub local_index: u32,
    remote_index: u32,
    last_timestamp: [u8; TIMESTAMP_LEN],
    last_initiation_consumed_ns: Option<u64>,
}

impl Handshake {
    /// A fresh handshake with `remote_static` (pre-shared key all zeros).
    pub fn new(remote_static: PublicKey) -> Self {
        Self {
            remote_static,
            psk: [0u8; HASH_LEN],
            state: State::Zeroed,
            hash: [0u8; HASH_LEN],
            chain_key: [0u8; HASH_LEN],
            local_ephemeral: None,
            remote_ephemeral: [0u8; KEY_LEN],
            local_index: 0,
            remote_index: 0,
            last_timestamp: [0u8; TIMESTAMP_LEN],
            last_initiation_consumed_ns: None,
        }
    }

    /// Whether an initiation of ours waits for its response.
    pub fn awaiting_response(&self) -> bool {
        self.state == State::InitiationCreated
    }

    fn clear(&mut self) {
        self.state = State::Zeroed;
        self.hash = [0u8; HASH_LEN];
        self.chain_key = [0u8; HASH_LEN];
        self.local_ephemeral = None;
        self.remote_ephemeral = [0u8; KEY_LEN];
        self.local_index = 0;
    }

    /// Builds an initiation (§5.4.2) with our index `local_index`, the ephemeral private key
    /// `ephemeral` (random) and the TAI64N `timestamp`. MAC1/MAC2 are left zero: fill them with
    /// [`CookieGenerator::add_macs`].
    pub fn create_initiation(
        &mut self,
        id: &Identity,
        local_index: u32,
        ephemeral: [u8; KEY_LEN],
        timestamp: [u8; TIMESTAMP_LEN],
    ) -> Result<[u8; INITIATION_LEN], NoiseError> {
        let (c0, h0) = initial_chain();
        let e = StaticSecret::from(ephemeral);
        let e_pub = DhPublic::from(&e).to_bytes();
        let mut h = hash(&[&h0, &self.remote_static.0]);
        let mut c = kdf1(&c0, &e_pub);
        h = hash(&[&h, &e_pub]);
        let (c1, k) = kdf2(&c, &dh(&e, &self.remote_static.0)?);
        c = c1;
        let sealed_static = aead_seal(&k, 0, &id.public.0, &h).ok_or(NoiseError::BadLength)?;
        h = hash(&[&h, &sealed_static]);
        let (c2, k) = kdf2(&c, &dh(&id.secret, &self.remote_static.0)?);
        c = c2;
        let sealed_ts = aead_seal(&k, 0, &timestamp, &h).ok_or(NoiseError::BadLength)?;
        h = hash(&[&h, &sealed_ts]);

        let mut msg = [0u8; INITIATION_LEN];
        msg[0] = MSG_INITIATION;
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        msg[8..40].copy_from_slice(&e_pub);
        msg[40..88].copy_from_slice(&sealed_static);
        msg[88..116].copy_from_slice(&sealed_ts);

        self.hash = h;
        self.chain_key = c;
        self.local_ephemeral = Some(e);
        self.local_index = local_index;
        self.state = State::InitiationCreated;
        Ok(msg)
    }

    /// Accepts a decrypted initiation from this handshake's peer: the timestamp must be newer
    /// than the last accepted one and the previous initiation at least `flood_interval_ns` ago.
    pub fn accept_initiation(
        &mut self,
        init: &Initiation,
        now_ns: u64,
        flood_interval_ns: u64,
    ) -> Result<(), NoiseError> {
        if init.remote_static != self.remote_static {
            return Err(NoiseError::UnknownPeer);
        }
        if init.timestamp <= self.last_timestamp {
            return Err(NoiseError::Replay);
        }
        if self
            .last_initiation_consumed_ns
            .is_some_and(|last| now_ns < last.saturating_add(flood_interval_ns))
        {
            return Err(NoiseError::Flood);
        }
        self.hash = init.hash;
        self.chain_key = init.chain_key;
        self.remote_ephemeral = init.remote_ephemeral;
        self.remote_index = init.sender_index;
        self.last_timestamp = init.timestamp;
        self.last_initiation_consumed_ns = Some(now_ns);
        self.local_ephemeral = None;
        self.state = State::InitiationConsumed;
        Ok(())
    }

    /// Builds the response (§5.4.3) to the accepted initiation and derives the session (we are
    /// the responder). MACs are left zero.
    pub fn create_response(
        &mut self,
        local_index: u32,
        ephemeral: [u8; KEY_LEN],
        now_ns: u64,
    ) -> Result<([u8; RESPONSE_LEN], Session), NoiseError> {
        if self.state != State::InitiationConsumed {
            return Err(NoiseError::UnexpectedState);
        }
        let e = StaticSecret::from(ephemeral);
        let e_pub = DhPublic::from(&e).to_bytes();
        let mut c = kdf1(&self.chain_key, &e_pub);
        let mut h = hash(&[&self.hash, &e_pub]);
        c = kdf1(&c, &dh(&e, &self.remote_ephemeral)?);
        c = kdf1(&c, &dh(&e, &self.remote_static.0)?);
        let (c3, tau, k) = kdf3(&c, &self.psk);
        c = c3;
        h = hash(&[&h, &tau]);
        let sealed_empty = aead_seal(&k, 0, &[], &h).ok_or(NoiseError::BadLength)?;

        let mut msg = [0u8; RESPONSE_LEN];
        msg[0] = MSG_RESPONSE;
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        msg[8..12].copy_from_slice(&self.remote_index.to_le_bytes());
        msg[12..44].copy_from_slice(&e_pub);
        msg[44..60].copy_from_slice(&sealed_empty);

        let (recv_key, send_key) = kdf2(&c, &[]);
        let session = Session {
            local_index,
            remote_index: self.remote_index,
            send_key,
            recv_key,
            is_initiator: false,
            created_ns: now_ns,
        };
        self.clear();
        Ok((msg, session))
    }

    /// Consumes a response to our initiation (§5.4.3 initiator side; MAC1 checked and the
    /// receiver index matched by the caller) and derives the session (we are the initiator).
    pub fn consume_response(
        &mut self,
        id: &Identity,
        msg: &[u8],
        now_ns: u64,
    ) -> Result<Session, NoiseError> {
        if msg.len() != RESPONSE_LEN {
            return Err(NoiseError::BadLength);
        }
        if message_type(msg)? != MSG_RESPONSE {
            return Err(NoiseError::BadType);
        }
        if self.state != State::InitiationCreated || u32_at(msg, 8) != self.local_index {
            return Err(NoiseError::UnexpectedState);
        }
        let Some(e) = self.local_ephemeral.as_ref() else {
            return Err(NoiseError::UnexpectedState);
        };
        let remote_index = u32_at(msg, 4);
        let e_remote: [u8; KEY_LEN] = array_at(msg, 12);
        let mut c = kdf1(&self.chain_key, &e_remote);
        let mut h = hash(&[&self.hash, &e_remote]);
        c = kdf1(&c, &dh(e, &e_remote)?);
        c = kdf1(&c, &dh(&id.secret, &e_remote)?);
        let (c3, tau, k) = kdf3(&c, &self.psk);
        c = c3;
        h = hash(&[&h, &tau]);
        aead_open(&k, 0, &msg[44..60], &h).ok_or(NoiseError::DecryptResponse)?;
        let (send_key, recv_key) = kdf2(&c, &[]);
        let session = Session {
            local_index: self.local_index,
            remote_index,
            send_key,
            recv_key,
            is_initiator: true,
            created_ns: now_ns,
        };
        self.clear();
        Ok(session)
    }
}

/// The bytes a cookie is bound to: the source IP address then the port, big-endian.
fn source_bytes(src: &SocketAddr) -> Vec<u8> {
    let mut out = match src.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    out.extend_from_slice(&src.port().to_be_bytes());
    out
}

/// Responder side of cookies (wireguard-go's `CookieChecker`): a random secret, changed every
/// `refresh_ns`, from which the cookie of a source address is `MAC(secret, ip ‖ port)`.
#[derive(Default)]
pub struct CookieChecker {
    secret: [u8; HASH_LEN],
    secret_set_ns: Option<u64>,
}

impl CookieChecker {
    /// Whether MAC2 of `msg` is `MAC(cookie(src), msg up to MAC2)` with a secret younger than
    /// `refresh_ns`.
    pub fn check_mac2(&self, msg: &[u8], src: &SocketAddr, now_ns: u64, refresh_ns: u64) -> bool {
        let Some(set) = self.secret_set_ns else {
            return false;
        };
        if now_ns.saturating_sub(set) > refresh_ns || msg.len() < 2 * MAC_LEN {
            return false;
        }
        let cookie = mac(&self.secret, &[&source_bytes(src)]);
        let mac2_at = msg.len() - MAC_LEN;
        crypto::ct_eq(&mac(&cookie, &[&msg[..mac2_at]]), &msg[mac2_at..])
    }

    /// A cookie reply (§5.4.7) to `msg` (an initiation or response whose sender index is
    /// `receiver`) from `src`, encrypted with `id`'s cookie key, the random `nonce` and `msg`'s
    /// MAC1 as associated data. `new_secret` is used when the secret is older than `refresh_ns`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_reply(
        &mut self,
        id: &Identity,
        msg: &[u8],
        receiver: u32,
        src: &SocketAddr,
        now_ns: u64,
        refresh_ns: u64,
        new_secret: [u8; HASH_LEN],
        nonce: [u8; XNONCE_LEN],
    ) -> Result<[u8; COOKIE_REPLY_LEN], NoiseError> {
        if msg.len() < 2 * MAC_LEN {
            return Err(NoiseError::BadLength);
        }
        if self
            .secret_set_ns
            .is_none_or(|set| now_ns.saturating_sub(set) > refresh_ns)
        {
            self.secret = new_secret;
            self.secret_set_ns = Some(now_ns);
        }
        let cookie = mac(&self.secret, &[&source_bytes(src)]);
        let mac1_at = msg.len() - 2 * MAC_LEN;
        let sealed = crypto::xaead_seal(
            &id.cookie_key,
            &nonce,
            &cookie,
            &msg[mac1_at..mac1_at + MAC_LEN],
        )
        .ok_or(NoiseError::BadLength)?;
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        reply[0] = MSG_COOKIE_REPLY;
        reply[4..8].copy_from_slice(&receiver.to_le_bytes());
        reply[8..32].copy_from_slice(&nonce);
        reply[32..64].copy_from_slice(&sealed);
        Ok(reply)
    }
}

/// Initiator side of MACs (wireguard-go's `CookieGenerator`), one per peer: MAC1 keyed by the
/// peer's public key, MAC2 with the last cookie the peer sent, while younger than `refresh_ns`.
pub struct CookieGenerator {
    mac1_key: [u8; HASH_LEN],
    cookie_key: [u8; HASH_LEN],
    cookie: [u8; MAC_LEN],
    cookie_set_ns: Option<u64>,
    last_mac1: Option<[u8; MAC_LEN]>,
}

impl CookieGenerator {
    /// MAC keys for messages to `remote`.
    pub fn new(remote: &PublicKey) -> Self {
        Self {
            mac1_key: hash(&[LABEL_MAC1, &remote.0]),
            cookie_key: hash(&[LABEL_COOKIE, &remote.0]),
            cookie: [0u8; MAC_LEN],
            cookie_set_ns: None,
            last_mac1: None,
        }
    }

    /// Whether a cookie younger than `refresh_ns` is held (MAC2 will be set).
    pub fn has_cookie(&self, now_ns: u64, refresh_ns: u64) -> bool {
        self.cookie_set_ns
            .is_some_and(|set| now_ns.saturating_sub(set) <= refresh_ns)
    }

    /// Fills MAC1 and (when a fresh cookie is held) MAC2 of an initiation or response.
    pub fn add_macs(&mut self, msg: &mut [u8], now_ns: u64, refresh_ns: u64) {
        if msg.len() < 2 * MAC_LEN {
            return;
        }
        let mac1_at = msg.len() - 2 * MAC_LEN;
        let mac2_at = mac1_at + MAC_LEN;
        let mac1 = mac(&self.mac1_key, &[&msg[..mac1_at]]);
        msg[mac1_at..mac2_at].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let mac2 = if self.has_cookie(now_ns, refresh_ns) {
            mac(&self.cookie, &[&msg[..mac2_at]])
        } else {
            [0u8; MAC_LEN]
        };
        msg[mac2_at..].copy_from_slice(&mac2);
    }

    /// Takes the cookie from a reply to our last MAC'd message.
    pub fn consume_reply(&mut self, reply: &[u8], now_ns: u64) -> Result<(), NoiseError> {
        if reply.len() != COOKIE_REPLY_LEN {
            return Err(NoiseError::BadLength);
        }
        let last_mac1 = self.last_mac1.ok_or(NoiseError::BadCookieReply)?;
        let nonce: [u8; XNONCE_LEN] = array_at(reply, 8);
        let cookie = crypto::xaead_open(&self.cookie_key, &nonce, &reply[32..64], &last_mac1)
            .ok_or(NoiseError::BadCookieReply)?;
        self.cookie =
            <[u8; MAC_LEN]>::try_from(cookie.as_slice()).map_err(|_| NoiseError::BadCookieReply)?;
        self.cookie_set_ns = Some(now_ns);
        Ok(())
    }
}

/// Sender index of an initiation or response, receiver index of a response, cookie reply or
/// transport message: `(sender, receiver)` where present.
pub fn indices(msg: &[u8]) -> (Option<u32>, Option<u32>) {
    match (message_type(msg), msg.len()) {
        (Ok(MSG_INITIATION), INITIATION_LEN) => (Some(u32_at(msg, 4)), None),
        (Ok(MSG_RESPONSE), RESPONSE_LEN) => (Some(u32_at(msg, 4)), Some(u32_at(msg, 8))),
        (Ok(MSG_COOKIE_REPLY), COOKIE_REPLY_LEN) => (None, Some(u32_at(msg, 4))),
        (Ok(MSG_TRANSPORT), n) if n >= TRANSPORT_MIN_LEN => (None, Some(u32_at(msg, 4))),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_bytes([n; 32])
    }

    #[test]
    fn construction_hash_chain_matches_reference() {
        // Computed with CPython's hashlib.blake2s (independent implementation); C0 is the
        // well-known first chaining key of WireGuard implementations.
        let (c0, h0) = initial_chain();
        assert_eq!(
            hex(&c0),
            "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
        );
        assert_eq!(
            hex(&h0),
            "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
        );
    }

    struct Pair {
        a: Identity,
        b: Identity,
        ha: Handshake,
        hb: Handshake,
        ga: CookieGenerator,
    }

    fn pair() -> Pair {
        let (ka, kb) = (key(1), key(2));
        Pair {
            ha: Handshake::new(kb.public_key()),
            hb: Handshake::new(ka.public_key()),
            ga: CookieGenerator::new(&kb.public_key()),
            a: Identity::new(&ka),
            b: Identity::new(&kb),
        }
    }

    #[test]
    fn handshake_derives_mirrored_keys() {
        let mut p = pair();
        let mut init =
            p.ha.create_initiation(&p.a, 11, [3; 32], crypto::tai64n(1))
                .expect("init");
        p.ga.add_macs(&mut init, 0, 120);
        assert!(p.b.check_mac1(&init));
        let opened = open_initiation(&p.b, &init).expect("open");
        assert_eq!(opened.remote_static, p.a.public_key());
        assert_eq!(opened.sender_index, 11);
        p.hb.accept_initiation(&opened, 0, 20).expect("accept");
        let (resp, sb) = p.hb.create_response(22, [4; 32], 5).expect("resp");
        let mut resp = resp;
        CookieGenerator::new(&p.a.public_key()).add_macs(&mut resp, 0, 120);
        assert!(p.a.check_mac1(&resp));
        assert!(
            !p.b.check_mac1(&resp),
            "MAC1 is keyed by the receiver's key"
        );
        let sa = p.ha.consume_response(&p.a, &resp, 6).expect("consume");
        assert_eq!((sa.local_index, sa.remote_index), (11, 22));
        assert_eq!((sb.local_index, sb.remote_index), (22, 11));
        assert_eq!(sa.send_key, sb.recv_key);
        assert_eq!(sa.recv_key, sb.send_key);
        assert_ne!(sa.send_key, sa.recv_key);
        assert!(sa.is_initiator && !sb.is_initiator);
        let msg = sa.seal_transport(0, b"ping").expect("seal");
        assert_eq!(
            sb.open_transport(&msg).expect("open"),
            (0, b"ping".to_vec())
        );
        // A second response to the same initiation is not accepted.
        assert_eq!(
            p.ha.consume_response(&p.a, &resp, 7).err(),
            Some(NoiseError::UnexpectedState)
        );
    }

    #[test]
    fn replayed_and_stale_initiations_are_rejected() {
        let mut p = pair();
        let init =
            p.ha.create_initiation(&p.a, 1, [3; 32], crypto::tai64n(5_000_000_000))
                .expect("init");
        let opened = open_initiation(&p.b, &init).expect("open");
        p.hb.accept_initiation(&opened, 0, 20).expect("first");
        assert_eq!(
            p.hb.accept_initiation(&opened, 1_000_000_000, 20),
            Err(NoiseError::Replay)
        );
        let older =
            p.ha.create_initiation(&p.a, 2, [5; 32], crypto::tai64n(4_000_000_000))
                .expect("init");
        let older = open_initiation(&p.b, &older).expect("open");
        assert_eq!(
            p.hb.accept_initiation(&older, 2_000_000_000, 20),
            Err(NoiseError::Replay)
        );
        let newer =
            p.ha.create_initiation(&p.a, 3, [6; 32], crypto::tai64n(6_000_000_000))
                .expect("init");
        let newer = open_initiation(&p.b, &newer).expect("open");
        assert_eq!(
            p.hb.accept_initiation(&newer, 10, 20),
            Err(NoiseError::Flood)
        );
        p.hb.accept_initiation(&newer, 30, 20)
            .expect("after flood interval");
    }

    #[test]
    fn initiation_for_another_key_does_not_open() {
        let mut p = pair();
        let third = Identity::new(&key(9));
        let init =
            p.ha.create_initiation(&p.a, 1, [3; 32], crypto::tai64n(1))
                .expect("init");
        assert!(!third.check_mac1(&init));
        assert_eq!(
            open_initiation(&third, &init).err(),
            Some(NoiseError::DecryptStatic)
        );
    }

    #[test]
    fn cookie_reply_enables_mac2() {
        let mut p = pair();
        let src: SocketAddr = "10.0.0.1:51871".parse().expect("addr");
        let mut checker = CookieChecker::default();
        let mut init =
            p.ha.create_initiation(&p.a, 7, [3; 32], crypto::tai64n(1))
                .expect("init");
        p.ga.add_macs(&mut init, 0, 120);
        assert!(!checker.check_mac2(&init, &src, 0, 120), "no cookie yet");
        let reply = checker
            .create_reply(&p.b, &init, 7, &src, 0, 120, [8; 32], [9; 24])
            .expect("reply");
        assert_eq!(indices(&reply), (None, Some(7)));
        p.ga.consume_reply(&reply, 1).expect("cookie");
        p.ga.add_macs(&mut init, 2, 120);
        assert!(checker.check_mac2(&init, &src, 3, 120));
        let other: SocketAddr = "10.0.0.2:51871".parse().expect("addr");
        assert!(
            !checker.check_mac2(&init, &other, 3, 120),
            "cookie is per source"
        );
        assert!(!checker.check_mac2(&init, &src, 200, 120), "secret expired");
        // A reply replayed after a new MAC1 does not decrypt (bound to the old MAC1).
        let mut init2 =
            p.ha.create_initiation(&p.a, 8, [4; 32], crypto::tai64n(2))
                .expect("init");
        p.ga.add_macs(&mut init2, 4, 120);
        assert_eq!(
            p.ga.consume_reply(&reply, 5),
            Err(NoiseError::BadCookieReply)
        );
    }

    #[test]
    fn parsers_never_panic_on_short_or_garbage_input() {
        let p = pair();
        let mut hs = Handshake::new(p.a.public_key());
        for len in 0..200 {
            let msg = vec![len as u8; len];
            let _ = open_initiation(&p.b, &msg);
            let _ = hs.consume_response(&p.b, &msg, 0);
            let _ = indices(&msg);
            let _ = p.b.check_mac1(&msg);
            let _ = CookieGenerator::new(&p.a.public_key()).consume_reply(&msg, 0);
        }
    }
}
