//! WireGuard between nodes: keys and the handshake (issue 7, parts 1-2).
//!
//! ```text
//!   <state-dir>/wireguard.key ──keys::load_or_create──> PrivateKey ──> Node annotation
//!   ClusterState Nodes ──keys::peers_from_cluster──> NodePeer{key, InternalIP:51871}
//!   UDP :51871 (types 1-3, passed by XDP) ──> device::Device ──> Action::Send / Session*
//!                                                  │ noise (messages, MACs, cookies)
//!                                                  └ timers (rekey, retries, keepalive)
//! ```
//!
//! Design: everything here is sans-IO (quinn-proto / boringtun `noise/` style): the agent's
//! slow-path thread owns the socket and the clock, calls [`Device`] with datagrams and `now_ns`,
//! and carries out the returned [`Action`]s. Transport messages (type 4) are sealed and opened by
//! the workers (`dataplane::wireguard`), which receive each [`Session`]'s keys from the agent.
//! Message formats, constructions and timers follow the WireGuard whitepaper §5-6 and
//! wireguard-go (`device/noise-protocol.go`, `cookie.go`, `timers.go`); interoperability with
//! wireguard-go is tested in `control/tests/wg_handshake.rs`.
pub mod crypto;
pub mod device;
pub mod keys;
pub mod noise;
pub mod timers;

pub use device::{Action, Counters, Device, PeerConfig, PeerStatus};
pub use keys::{
    load_or_create, peers_from_cluster, KeyError, NodePeer, NodePeers, PrivateKey, PublicKey,
    PUBLIC_KEY_ANNOTATION, WIREGUARD_PORT,
};
pub use noise::{NoiseError, Session};
pub use timers::Timers;
