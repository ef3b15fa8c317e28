//! The node's WireGuard key pair and its peers.
//!
//! - The private key is a Curve25519 scalar drawn from the OS RNG on first start and clamped as
//!   `wg genkey` does; it is kept base64-encoded (exactly `wg genkey`'s output, one line) in
//!   `<state-dir>/wireguard.key`, created with mode 0600 (written to a temporary file and renamed,
//!   so a crash never leaves half a key). A key file that group or others can read is refused.
//! - The public key is published on the node's Node object as the annotation
//!   [`PUBLIC_KEY_ANNOTATION`] (Cilium's is `network.cilium.io/wg-pub-key`); every other Node with
//!   that annotation is a peer, reached at its InternalIP on [`WIREGUARD_PORT`].
use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::cluster::ClusterState;

use super::crypto;

/// UDP port of sluice's WireGuard (Cilium's default).
pub const WIREGUARD_PORT: u16 = 51871;
/// Node annotation that carries a node's WireGuard public key (base64).
pub const PUBLIC_KEY_ANNOTATION: &str = "network.sluice.io/wg-pub-key";
/// File name of the private key inside the state directory.
pub const KEY_FILE_NAME: &str = "wireguard.key";
/// Length of Curve25519 keys.
pub const KEY_LEN: usize = 32;

/// Errors of key handling; each names the file or Node concerned.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file exists but cannot be read or its permissions checked.
    #[error("cannot read WireGuard key file {path}: {source}; check the state directory")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error("cannot write WireGuard key file {path}: {source}; make the state directory writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "WireGuard key file {path} has mode {mode:03o}, readable by group or others; \
         run `chmod 600 {path}` (and consider the key compromised if others could log in)"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// The key file does not hold a base64 32-byte key.
    #[error(
        "WireGuard key file {path} does not hold a base64 32-byte key ({reason}); \
         restore it from a backup, or delete it to generate a new key (peers then need the new \
         public key)"
    )]
    BadKeyFile { path: PathBuf, reason: String },
    /// A Node's public-key annotation is not a base64 32-byte key.
    #[error(
        "Node {node}: annotation {PUBLIC_KEY_ANNOTATION}={value:?} is not a base64 32-byte \
         WireGuard public key ({reason}); fix or remove the annotation"
    )]
    BadPeerKey {
        node: String,
        value: String,
        reason: String,
    },
    /// A Node has a key but no usable InternalIP.
    #[error("Node {node} has a WireGuard key but no IPv4 InternalIP: {reason}")]
    PeerWithoutAddress { node: String, reason: String },
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {0}; check /dev/urandom and getrandom(2)")]
    Rng(getrandom::Error),
}

/// Decodes a base64 32-byte key; the error says what is wrong.
fn decode_key(text: &str) -> Result<[u8; KEY_LEN], String> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|e| format!("invalid base64: {e}"))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "{} bytes after base64 decoding, want {KEY_LEN}",
            bytes.len()
        )
    })
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Base64, as `wg pubkey` prints it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parses base64 (as `wg pubkey` prints it); the error says what is wrong.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        decode_key(text).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A Curve25519 private key (clamped). `Debug` does not print it; it is overwritten on drop.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A new key from the OS RNG, clamped like `wg genkey`.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        crypto::random_bytes(&mut bytes).map_err(KeyError::Rng)?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key from its 32 bytes (clamped on the way in, as `wg` does).
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        Self(bytes)
    }

    /// Parses base64 (as `wg genkey` prints it).
    pub fn from_base64(text: &str) -> Result<Self, String> {
        decode_key(text).map(Self::from_bytes)
    }

    /// Base64, as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// The raw scalar.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The matching public key (`wg pubkey`).
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // Best effort (no zeroize dependency): black_box keeps the store from being elided,
        // though the optimiser may have left copies elsewhere.
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// Path of the key file inside `state_dir`.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE_NAME)
}

/// Loads the node's private key from `<state_dir>/wireguard.key`, or generates one and stores it
/// there (mode 0600) when the file does not exist. Refuses a file that group or others can read.
pub fn load_or_create(state_dir: &Path) -> Result<PrivateKey, KeyError> {
    let path = key_path(state_dir);
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::InsecurePermissions { path, mode });
            }
            let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            PrivateKey::from_base64(&text).map_err(|reason| KeyError::BadKeyFile { path, reason })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate()?;
            store(&path, &key)?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Read { path, source }),
    }
}

/// Writes `key` to `path` with mode 0600 through a temporary file and a rename.
fn store(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("key.tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(format!("{}\n", key.to_base64()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// Another node this node talks WireGuard to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePeer {
    /// The Node's `metadata.name`.
    pub node: String,
    /// From the [`PUBLIC_KEY_ANNOTATION`] annotation.
    pub public_key: PublicKey,
    /// The Node's InternalIP and [`WIREGUARD_PORT`].
    pub endpoint: SocketAddrV4,
    /// Outer source address accepted from this peer (the node IP, VXLAN's outer source).
    pub allowed_source: Ipv4Addr,
}

/// The peers found in a [`ClusterState`], and the Nodes that could not be peers and why.
#[derive(Debug, Default)]
pub struct NodePeers {
    /// Nodes with a valid key and address, in Node name order.
    pub peers: Vec<NodePeer>,
    /// Nodes without the annotation: not peers (yet); traffic to them is not encrypted.
    pub without_key: Vec<String>,
    /// Nodes whose annotation or address is unusable.
    pub invalid: Vec<KeyError>,
}

/// Every Node except `local_node` as a WireGuard peer.
pub fn peers_from_cluster(state: &ClusterState, local_node: &str) -> NodePeers {
    let mut out = NodePeers::default();
    for node in &state.nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if name == local_node {
            continue;
        }
        let Some(value) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PUBLIC_KEY_ANNOTATION))
        else {
            out.without_key.push(name.to_owned());
            continue;
        };
        let public_key = match PublicKey::from_base64(value) {
            Ok(k) => k,
            Err(reason) => {
                out.invalid.push(KeyError::BadPeerKey {
                    node: name.to_owned(),
                    value: value.clone(),
                    reason,
                });
                continue;
            }
        };
        let internal_ip = match state.node_info(name) {
            Ok(info) => info.internal_ip,
            Err(e) => {
                out.invalid.push(KeyError::PeerWithoutAddress {
                    node: name.to_owned(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        out.peers.push(NodePeer {
            node: name.to_owned(),
            public_key,
            endpoint: SocketAddrV4::new(internal_ip, WIREGUARD_PORT),
            allowed_source: internal_ip,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn key_is_created_0600_and_reused() {
        let dir = tempdir();
        let first = load_or_create(dir.path()).expect("create");
        let path = key_path(dir.path());
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.trim(), first.to_base64());
        assert_eq!(
            text.trim().len(),
            44,
            "wg genkey prints 44 base64 characters"
        );
        let second = load_or_create(dir.path()).expect("reuse");
        assert_eq!(first.as_bytes(), second.as_bytes());
        assert_eq!(first.public_key(), second.public_key());
    }

    #[test]
    fn world_readable_key_is_refused_with_chmod_hint() {
        let dir = tempdir();
        load_or_create(dir.path()).expect("create");
        let path = key_path(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(dir.path()).expect_err("must refuse");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn garbage_key_file_is_an_error_naming_the_file() {
        let dir = tempdir();
        let path = key_path(dir.path());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(b"not a key\n"))
            .expect("write");
        let msg = load_or_create(dir.path()).expect_err("bad").to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 §6.1: Alice's private key and public key.
        let hex = |s: &str| -> [u8; 32] {
            let mut out = [0u8; 32];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
            }
            out
        };
        let private = PrivateKey::from_bytes(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            private.public_key().0,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate().expect("rng");
        let b = PrivateKey::generate().expect("rng");
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xc0, 0x40);
    }

    fn node(name: &str, ip: &str, key: Option<&str>) -> String {
        let annotations = key
            .map(|k| format!("  annotations:\n    {PUBLIC_KEY_ANNOTATION}: \"{k}\"\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{annotations}spec:\n  \
             podCIDR: 10.1.{}.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n",
            &ip[ip.len() - 1..]
        )
    }

    #[test]
    fn peers_come_from_annotated_nodes() {
        let key_b = PrivateKey::generate().expect("rng").public_key();
        let docs = [
            node(
                "a",
                "172.18.0.1",
                Some(
                    &PrivateKey::generate()
                        .expect("rng")
                        .public_key()
                        .to_base64(),
                ),
            ),
            node("b", "172.18.0.2", Some(&key_b.to_base64())),
            node("c", "172.18.0.3", None),
            node("d", "172.18.0.4", Some("AAAA")),
        ]
        .join("---\n");
        let state = crate::cluster::parse_str(&docs, "test.yaml").expect("parse");
        let peers = peers_from_cluster(&state, "a");
        assert_eq!(
            peers.peers,
            vec![NodePeer {
                node: "b".into(),
                public_key: key_b,
                endpoint: "172.18.0.2:51871".parse().expect("addr"),
                allowed_source: Ipv4Addr::new(172, 18, 0, 2),
            }]
        );
        assert_eq!(peers.without_key, vec!["c".to_owned()]);
        assert_eq!(peers.invalid.len(), 1);
        let msg = peers.invalid[0].to_string();
        assert!(msg.contains("Node d") && msg.contains("3 bytes"), "{msg}");
    }
}
