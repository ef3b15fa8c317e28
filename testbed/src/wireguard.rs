//! WireGuard in the testbed: the nodes' key files, and the `kernel-wireguard` node kind.
//!
//! Keys: a node whose Node object carries the testbed-only private key annotation
//! ([`crate::plan::WG_PRIVATE_KEY_ANNOTATION`]) gets it written to `STATE_DIR/wireguard.key`
//! ([`write_key_file`]: base64 and a newline, mode 0600, as the agent's `control::wg::keys`
//! expects and `wg set ... private-key` reads) before anything on the node starts, so the public
//! key annotation the peers read is the key the node really has.
//!
//! A `kernel-wireguard` node is a kernel node ([`crate::kernel`]) whose VXLAN packets to the
//! other nodes travel in WireGuard, the shape of Cilium's WireGuard + VXLAN mode, with Debian's
//! `wireguard-go` as the tunnel (the machines have no kernel WireGuard module):
//!
//! ```text
//!   pod --veth--> kernel routing --> sluice-vx (vxlan, no `dev`, MTU 1390)
//!        outer UDP 8472 to peer InternalIP, mark 0
//!          --> rule `not fwmark 0xca6c lookup 51871`: PEER_IP/32 dev wgX (MTU 1440)
//!          --> wireguard-go (tun) seals --> its UDP socket, SO_MARK 0xca6c --> main table --> eth0
//!   eth0 UDP 51871 --> wireguard-go opens --> wgX --> local delivery --> sluice-vx --> pod
//! ```
//!
//! - `wireguard-go IFNAME` runs in the node namespace as a child of the testbed
//!   (`WG_PROCESS_FOREGROUND=1`, output in `STATE_DIR/wireguard-go.log`), stopped by pid on
//!   teardown ([`stop`]); `wg set` gives it the node's key file, listen port [`WG_PORT`], fwmark
//!   [`FWMARK`] and one peer per other node with a public key (endpoint `InternalIP:51871`,
//!   allowed-ips `InternalIP/32`). The tunnel has no address.
//! - The interface is not `wg0`: wireguard-go's control socket is `/var/run/wireguard/IFNAME.sock`
//!   in the one file system all namespaces share, so two nodes (or two tests) with the same
//!   interface name would collide. The name is `s{tag}w{index}`
//!   ([`crate::names::Names::wg_interface`]), unique per instance and node; `wg show NAME` works
//!   from anywhere.
//! - The vxlan device is created without `dev eth0`: with it, the kernel looks the outer route
//!   up with the uplink as output interface, which skips the tunnel's routes.
//! - MTUs: tunnel uplink - 60 ([`WIREGUARD_OVERHEAD_BYTES`], IPv4 outer), vxlan device and pods
//!   tunnel - 50 = uplink - 110 ([`pod_mtu`]), as sluice gives its pods.
use std::{
    fs::File,
    io::Write,
    net::Ipv4Addr,
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    agent,
    cmd::{self, CmdError},
    kernel::VXLAN_OVERHEAD_BYTES,
};

/// UDP port of every node's WireGuard (sluice's and Cilium's default).
pub const WG_PORT: u16 = control::wg::WIREGUARD_PORT;
/// Mark of wireguard-go's own UDP packets (0xca6c, Cilium's): they bypass [`ROUTE_TABLE`].
pub const FWMARK: &str = "0xca6c";
/// Routing table holding `PEER_IP/32 dev TUNNEL` for unmarked packets.
pub const ROUTE_TABLE: &str = "51871";
/// Outer IPv4 (20), UDP (8) and WireGuard transport header (16) and tag (16).
pub const WIREGUARD_OVERHEAD_BYTES: u32 = 60;
/// The userspace WireGuard implementation (Debian package `wireguard-go`), looked up in `PATH`.
pub const WIREGUARD_GO: &str = "wireguard-go";
/// Where wireguard-go puts its control sockets (`NAME.sock`), for every namespace alike.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long wireguard-go may take to create its interface and control socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long wireguard-go gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error(
        "node {node}: {WIREGUARD_GO} is not in PATH; install it (Debian: apt-get install \
         wireguard-go wireguard-tools) to run kernel-wireguard nodes"
    )]
    NotInstalled { node: String },
    #[error("node {node}: writing its WireGuard key file {path}: {source}")]
    KeyFile {
        node: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: creating the wireguard-go log {path}: {source}")]
    Log {
        node: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: cannot start wireguard-go ({command}): {source}")]
    Spawn {
        node: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `tail` starts with the log's path ([`agent::log_tail`]).
    #[error("node {node}: wireguard-go for {ifname} exited early ({status}); {tail}")]
    Exited {
        node: String,
        ifname: String,
        status: String,
        tail: String,
    },
    #[error(
        "node {node}: wireguard-go (pid {pid}) did not create interface {ifname} and its socket \
         {socket} within {READY_TIMEOUT:?}; {tail}"
    )]
    NotReady {
        node: String,
        pid: u32,
        ifname: String,
        socket: PathBuf,
        tail: String,
    },
    #[error("node {node}: configuring WireGuard interface {ifname}: {source}")]
    Configure {
        node: String,
        ifname: String,
        #[source]
        source: CmdError,
    },
    #[error("node {node}: sending signal {signal} to wireguard-go (pid {pid}): {source}")]
    Signal {
        node: String,
        pid: u32,
        signal: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: wireguard-go (pid {pid}) is still alive after SIGKILL")]
    Unkillable { node: String, pid: u32 },
}

/// A node's wireguard-go, as recorded in the instance state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// The tun interface in the node namespace (module doc: not `wg0`).
    pub ifname: String,
    /// The wireguard-go binary (its `/proc/PID/cmdline` proves a pid read back is still ours).
    pub bin: PathBuf,
    /// Recorded right after the spawn; `None` once stopped.
    pub pid: Option<u32>,
}

/// Another node as the tunnel's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub ip: Ipv4Addr,
    /// Base64, from the Node's public key annotation.
    pub public_key: String,
}

/// The tunnel's MTU on an uplink of `uplink_mtu` bytes.
pub fn tunnel_mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(WIREGUARD_OVERHEAD_BYTES)
}

/// The MTU of a kernel-wireguard node's vxlan device and pods (uplink - 110, as sluice's pods).
pub fn pod_mtu(uplink_mtu: u32) -> u32 {
    tunnel_mtu(uplink_mtu).saturating_sub(VXLAN_OVERHEAD_BYTES)
}

/// wireguard-go's control socket for `ifname`.
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// `name` in a directory of `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Writes `private_key` (base64) to `STATE_DIR/wireguard.key` with mode 0600 (module doc).
/// Returns the file's path.
pub fn write_key_file(
    node: &str,
    state_dir: &Path,
    private_key: &str,
) -> Result<PathBuf, WireguardError> {
    let path = control::wg::keys::key_path(state_dir);
    let err = |source| WireguardError::KeyFile {
        node: node.to_string(),
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    // `mode` applies only to a new file: an existing one is narrowed as well.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    file.write_all(format!("{}\n", private_key.trim()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    Ok(path)
}

/// Starts `bin IFNAME` in `netns` with its output appended to `log`. The caller records the pid
/// and then calls [`wait_ready`].
pub fn spawn(
    node: &str,
    netns: &str,
    bin: &Path,
    ifname: &str,
    log: &Path,
) -> Result<Child, WireguardError> {
    let log_err = |source| WireguardError::Log {
        node: node.to_string(),
        path: log.to_path_buf(),
        source,
    };
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    let mut command = cmd::in_netns(netns, &[]);
    command
        .arg(bin)
        .arg(ifname)
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C meant for the testbed CLI does not reach it.
        .process_group(0);
    command.spawn().map_err(|source| WireguardError::Spawn {
        node: node.to_string(),
        command: cmd::describe(&command),
        source,
    })
}

/// Waits (bounded) until `child` has created `ifname` in `netns` and its control socket.
pub fn wait_ready(
    node: &str,
    netns: &str,
    ifname: &str,
    log: &Path,
    child: &mut Child,
) -> Result<(), WireguardError> {
    let socket = socket_path(ifname);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(WireguardError::Exited {
                node: node.to_string(),
                ifname: ifname.to_string(),
                status: status.to_string(),
                tail: agent::log_tail(log),
            });
        }
        if socket.exists() && cmd::ip_in(netns, &["link", "show", ifname]).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(WireguardError::NotReady {
                node: node.to_string(),
                pid: child.id(),
                ifname: ifname.to_string(),
                socket,
                tail: agent::log_tail(log),
            });
        }
        thread::sleep(POLL);
    }
}

/// The `wg set` arguments for the tunnel (module doc).
pub fn wg_set_args(ifname: &str, key_file: &Path, peers: &[Peer]) -> Vec<String> {
    let mut args: Vec<String> = [
        "set",
        ifname,
        "private-key",
        &key_file.display().to_string(),
        "listen-port",
        &WG_PORT.to_string(),
        "fwmark",
        FWMARK,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for peer in peers {
        args.extend([
            "peer".to_string(),
            peer.public_key.clone(),
            "endpoint".to_string(),
            format!("{}:{WG_PORT}", peer.ip),
            "allowed-ips".to_string(),
            format!("{}/32", peer.ip),
        ]);
    }
    args
}

/// Keys, peers, MTU and policy routing of a running tunnel (module doc). Idempotent.
pub fn configure(
    node: &str,
    netns: &str,
    ifname: &str,
    key_file: &Path,
    peers: &[Peer],
    uplink_mtu: u32,
) -> Result<(), WireguardError> {
    let err = |source| WireguardError::Configure {
        node: node.to_string(),
        ifname: ifname.to_string(),
        source,
    };
    let set = wg_set_args(ifname, key_file, peers);
    let mut argv = vec!["netns", "exec", netns, "wg"];
    argv.extend(set.iter().map(String::as_str));
    cmd::run("ip", &argv).map_err(err)?;
    let mtu = tunnel_mtu(uplink_mtu).to_string();
    cmd::ip_in(netns, &["link", "set", ifname, "mtu", &mtu, "up"]).map_err(err)?;
    let rules = cmd::ip_in(netns, &["rule", "show", "table", ROUTE_TABLE]).map_err(err)?;
    if rules.trim().is_empty() {
        cmd::ip_in(
            netns,
            &["rule", "add", "not", "fwmark", FWMARK, "table", ROUTE_TABLE],
        )
        .map_err(err)?;
    }
    for peer in peers {
        cmd::ip_in(
            netns,
            &[
                "route",
                "replace",
                &format!("{}/32", peer.ip),
                "dev",
                ifname,
                "table",
                ROUTE_TABLE,
            ],
        )
        .map_err(err)?;
    }
    Ok(())
}

/// SIGTERM to wireguard-go, a bounded wait, then SIGKILL. With `child`, the exit is reaped;
/// without, liveness comes from `/proc` and `bin` ([`agent::runs_binary`]), so a reused pid is
/// never signalled. Removes the control socket a killed process leaves behind.
pub fn stop(
    node: &str,
    tunnel: &Tunnel,
    pid: u32,
    child: Option<&mut Child>,
) -> Result<(), WireguardError> {
    let mut child = child;
    let alive = |child: &mut Option<&mut Child>| match child {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => agent::runs_binary(pid, &tunnel.bin),
    };
    let send = |signal: i32| -> Result<(), WireguardError> {
        let raw = libc::pid_t::try_from(pid).map_err(|_| WireguardError::Signal {
            node: node.to_string(),
            pid,
            signal,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is wireguard-go's (checked
        // alive and running its binary just before, or our own unreaped child).
        if unsafe { libc::kill(raw, signal) } == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(WireguardError::Signal {
                node: node.to_string(),
                pid,
                signal,
                source,
            })
        }
    };
    if alive(&mut child) {
        send(libc::SIGTERM)?;
        for (grace, then_kill) in [(STOP_GRACE, true), (Duration::from_secs(2), false)] {
            let deadline = Instant::now() + grace;
            while alive(&mut child) && Instant::now() < deadline {
                thread::sleep(POLL);
            }
            if !alive(&mut child) {
                break;
            }
            if then_kill {
                send(libc::SIGKILL)?;
            }
        }
        if alive(&mut child) {
            return Err(WireguardError::Unkillable {
                node: node.to_string(),
                pid,
            });
        }
    }
    // wireguard-go removes it on SIGTERM; after SIGKILL it is left, and the name is ours.
    let _ = std::fs::remove_file(socket_path(&tunnel.ifname));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn mtus_leave_room_for_wireguard_and_vxlan() {
        assert_eq!(tunnel_mtu(1500), 1440);
        assert_eq!(pod_mtu(1500), 1390);
        assert_eq!(pod_mtu(9000), 8890);
        assert_eq!(pod_mtu(100), 0);
    }

    #[test]
    fn key_file_is_private_base64_and_a_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = "IMtFMu88FJkTORctIv3UxbXBgmI94VGJBOplTqCTwlg=";
        // An earlier, world-readable file is narrowed and replaced.
        let path = control::wg::keys::key_path(dir.path());
        std::fs::write(&path, "old key that is longer than the new one\n").expect("old");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let written = write_key_file("n1", dir.path(), key).expect("writes");
        assert_eq!(written, path);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{key}\n")
        );
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // What the agent will read back.
        let loaded = control::wg::load_or_create(dir.path()).expect("agent reads it");
        assert_eq!(loaded.to_base64(), key);
        let err = write_key_file("n1", &dir.path().join("missing"), key).expect_err("no dir");
        assert!(err.to_string().contains("node n1"), "{err}");
    }

    #[test]
    fn wg_set_names_every_peer_with_its_endpoint_and_address() {
        let peers = [
            Peer {
                ip: Ipv4Addr::new(172, 18, 0, 11),
                public_key: "A=".into(),
            },
            Peer {
                ip: Ipv4Addr::new(172, 18, 0, 13),
                public_key: "B=".into(),
            },
        ];
        let args = wg_set_args("sabcw1", Path::new("/s/wireguard.key"), &peers);
        assert_eq!(
            args.join(" "),
            "set sabcw1 private-key /s/wireguard.key listen-port 51871 fwmark 0xca6c \
             peer A= endpoint 172.18.0.11:51871 allowed-ips 172.18.0.11/32 \
             peer B= endpoint 172.18.0.13:51871 allowed-ips 172.18.0.13/32"
        );
    }

    #[test]
    fn stop_signals_only_our_process_and_reaps_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = child.id();
        let tunnel = Tunnel {
            ifname: "sl-no-such-wg".into(),
            bin: "/usr/bin/not-wireguard-go".into(),
            pid: Some(pid),
        };
        // Known by pid only and not running the recorded binary: not signalled.
        stop("n", &tunnel, pid, None).expect("nothing to stop");
        assert!(child.try_wait().expect("wait").is_none(), "still running");
        // Our own child: terminated and reaped.
        stop("n", &tunnel, pid, Some(&mut child)).expect("stops");
        assert!(child.try_wait().expect("wait").is_some(), "exited");
    }
}
