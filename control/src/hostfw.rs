//! The host firewall's re-injection veth pair: how packets for the node itself that the workers
//! allowed reach the kernel.
//!
//! ```text
//!   uplink --XDP redirect--> worker: host policy allows --AF_XDP tx--> [sluice_net]
//!                                                                         | veth
//!   kernel stack (kubelet, sshd, ...) <-- local delivery <-- [sluice_host] (no address)
//! ```
//!
//! The workers write each allowed frame with `sluice_host`'s MAC as destination and transmit it
//! on `sluice_net`; the kernel receives it on `sluice_host` and delivers it locally, because the
//! destination is one of the node's addresses (Linux accepts a local address on any interface,
//! the "weak host" model). Replies leave by the kernel's normal routes (the uplink), where the
//! XDP program's TC egress recorder (`xdp_redirect::Attachment::set_host_firewall`) learns the
//! flow, so the rest of the connection is passed at XDP without the workers.
//!
//! What [`HostPair::ensure`] sets, and why:
//! - both ends up, no address (flushed), IPv6 disabled: the pair carries nothing of its own (no
//!   link-local address, no router solicitations, no DAD);
//! - `rp_filter` 0 on both: a re-injected packet's source is routed via the uplink, so strict
//!   reverse-path filtering on `sluice_host` would drop it. The kernel uses
//!   max(`conf/all/rp_filter`, `conf/<if>/rp_filter`): with `all` = 1 (strict) the
//!   per-interface 0 does not help. `ensure` does not change `all` (that is the node's policy)
//!   but reports it in [`HostPair::warnings`] and logs it; 2 (loose) is fine.
//!
//! Commands are iproute2 run with arguments (never a shell), as in `cni::netops`; sysctls are
//! written under `/proc/sys/net`, which is the calling thread's network namespace, like the
//! commands it spawns.
use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Command,
};

/// The end the kernel receives on.
pub const DEFAULT_HOST_IFNAME: &str = "sluice_host";
/// The end the dataplane transmits on.
pub const DEFAULT_NET_IFNAME: &str = "sluice_net";

#[derive(Debug, thiserror::Error)]
pub enum HostFwError {
    #[error("cannot run `{command}`: {source} (is iproute2 installed on the node?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed something unexpected for {ifname}: {detail}")]
    Output {
        command: String,
        ifname: String,
        detail: String,
    },
    #[error("setting {path} to {value} for interface {ifname}: {source}")]
    Sysctl {
        path: PathBuf,
        ifname: String,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{ifname:?} is not a usable interface name (1 to 15 bytes, no '/', ':', '%' or \
         whitespace); choose another"
    )]
    BadName { ifname: String },
    #[error("{host:?} and {net:?} name the same interface; give the two ends different names")]
    SameName { host: String, net: String },
    #[error(
        "interface {ifname} exists but is a {kind}, not a veth; delete it (`ip link del \
         {ifname}`) or choose another name"
    )]
    NotVeth { ifname: String, kind: String },
    #[error(
        "{host} and {net} are not the two ends of one veth pair ({detail}); delete them (`ip \
         link del {host}`, `ip link del {net}`) and retry"
    )]
    NotPeers {
        host: String,
        net: String,
        detail: String,
    },
}

/// One end of the pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairEnd {
    pub ifname: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The re-injection veth pair, as [`HostPair::ensure`] left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPair {
    /// The end the kernel receives on (frames must carry its MAC as destination).
    pub host: PairEnd,
    /// The end the dataplane transmits on (its AF_XDP TX socket binds here).
    pub net: PairEnd,
    /// Settings of the node that defeat the pair (e.g. strict `all.rp_filter`), also logged.
    pub warnings: Vec<String>,
}

/// What `ip -d -j link show` says about an interface.
#[derive(Debug, serde::Deserialize)]
struct LinkJson {
    ifindex: u32,
    #[serde(default)]
    address: String,
    /// The peer's name, for a veth whose peer is in the same namespace.
    #[serde(default)]
    link: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, serde::Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

fn check_name(ifname: &str) -> Result<(), HostFwError> {
    let bad = ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(HostFwError::BadName {
            ifname: ifname.into(),
        });
    }
    Ok(())
}

/// Runs `ip args`; `Ok(None)` when it fails because the device does not exist.
fn ip_maybe(args: &[&str]) -> Result<Option<String>, HostFwError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| HostFwError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("does not exist") || stderr.contains("Cannot find device") {
        return Ok(None);
    }
    Err(HostFwError::Failed {
        command,
        status: out.status.to_string(),
        stderr,
    })
}

fn ip(args: &[&str]) -> Result<String, HostFwError> {
    let command = format!("ip {}", args.join(" "));
    ip_maybe(args)?.ok_or_else(|| HostFwError::Failed {
        command,
        status: "exit status: 1".into(),
        stderr: "device does not exist".into(),
    })
}

/// The interface `ifname` in the calling thread's namespace, if it exists.
fn link(ifname: &str) -> Result<Option<LinkJson>, HostFwError> {
    let args = ["-d", "-j", "link", "show", "dev", ifname];
    let Some(text) = ip_maybe(&args)? else {
        return Ok(None);
    };
    let output_err = |detail: String| HostFwError::Output {
        command: format!("ip {}", args.join(" ")),
        ifname: ifname.into(),
        detail,
    };
    let mut links: Vec<LinkJson> =
        serde_json::from_str(&text).map_err(|e| output_err(e.to_string()))?;
    if links.len() != 1 {
        return Err(output_err(format!("{} interfaces listed", links.len())));
    }
    Ok(links.pop())
}

fn kind(link: &LinkJson) -> &str {
    link.linkinfo
        .as_ref()
        .and_then(|i| i.info_kind.as_deref())
        .unwrap_or("device without a kind")
}

fn parse_mac(ifname: &str, text: &str) -> Result<[u8; 6], HostFwError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || HostFwError::Output {
        command: format!("ip -d -j link show dev {ifname}"),
        ifname: ifname.into(),
        detail: format!("MAC address {text:?}"),
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Writes `value` to `path`; a missing file is not an error when `optional` (no IPv6).
fn write_sysctl(
    path: &Path,
    ifname: &str,
    value: &'static str,
    optional: bool,
) -> Result<(), HostFwError> {
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(e) if optional && e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(HostFwError::Sysctl {
            path: path.into(),
            ifname: ifname.into(),
            value,
            source,
        }),
    }
}

fn read_sysctl(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn conf(family: &str, ifname: &str, key: &str) -> PathBuf {
    Path::new("/proc/sys/net")
        .join(family)
        .join("conf")
        .join(ifname)
        .join(key)
}

/// The warning for a strict `net.ipv4.conf.all.rp_filter`, if it is strict.
fn rp_filter_warning(all: Option<&str>, host: &str) -> Option<String> {
    (all == Some("1")).then(|| {
        format!(
            "net.ipv4.conf.all.rp_filter is 1 (strict): the effective rp_filter of {host} is \
             max(all, {host}) = 1, so the kernel drops re-injected packets whose source it \
             routes via another interface; set net.ipv4.conf.all.rp_filter to 0 or 2 (loose)"
        )
    })
}

/// The error for a pair of which only one end exists (`host_present`: the host end).
fn half_pair(host: &str, net: &str, present_link: &LinkJson, host_present: bool) -> HostFwError {
    let (present, absent) = if host_present {
        (host, net)
    } else {
        (net, host)
    };
    if kind(present_link) != "veth" {
        return HostFwError::NotVeth {
            ifname: present.into(),
            kind: kind(present_link).into(),
        };
    }
    HostFwError::NotPeers {
        host: host.into(),
        net: net.into(),
        detail: format!("{present} exists, {absent} does not"),
    }
}

impl HostPair {
    /// Creates the pair `host_name` (kernel side) / `net_name` (dataplane side) in the calling
    /// thread's network namespace, or checks and re-applies the settings of an existing one
    /// (see the module doc). Idempotent; an interface of another kind, or two veths that are
    /// not each other's peer, are errors that name them.
    pub fn ensure(host_name: &str, net_name: &str) -> Result<HostPair, HostFwError> {
        Self::ensure_with_queues(host_name, net_name, 1)
    }

    /// [`HostPair::ensure`], creating the pair with `queues` tx and rx queues on each end (one
    /// per worker, so every worker has a socket to transmit on). An existing pair keeps its
    /// queues.
    pub fn ensure_with_queues(
        host_name: &str,
        net_name: &str,
        queues: u32,
    ) -> Result<HostPair, HostFwError> {
        check_name(host_name)?;
        check_name(net_name)?;
        if host_name == net_name {
            return Err(HostFwError::SameName {
                host: host_name.into(),
                net: net_name.into(),
            });
        }
        match (link(host_name)?, link(net_name)?) {
            (None, None) => {
                let q = queues.max(1).to_string();
                ip(&[
                    "link",
                    "add",
                    host_name,
                    "numtxqueues",
                    &q,
                    "numrxqueues",
                    &q,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    net_name,
                    "numtxqueues",
                    &q,
                    "numrxqueues",
                    &q,
                ])?;
                tracing::info!(
                    host = host_name,
                    net = net_name,
                    "created the re-injection veth pair"
                );
            }
            (Some(host), Some(net)) => {
                for (name, l) in [(host_name, &host), (net_name, &net)] {
                    if kind(l) != "veth" {
                        return Err(HostFwError::NotVeth {
                            ifname: name.into(),
                            kind: kind(l).into(),
                        });
                    }
                }
                if host.link.as_deref() != Some(net_name) {
                    return Err(HostFwError::NotPeers {
                        host: host_name.into(),
                        net: net_name.into(),
                        detail: format!(
                            "the peer of {host_name} is {}",
                            host.link.as_deref().unwrap_or("in another namespace")
                        ),
                    });
                }
            }
            (Some(l), None) => return Err(half_pair(host_name, net_name, &l, true)),
            (None, Some(l)) => return Err(half_pair(host_name, net_name, &l, false)),
        }
        for name in [host_name, net_name] {
            // Before the link goes up: no link-local address, no DAD, no router solicitation.
            write_sysctl(&conf("ipv6", name, "disable_ipv6"), name, "1", true)?;
            write_sysctl(&conf("ipv4", name, "rp_filter"), name, "0", false)?;
            ip(&["addr", "flush", "dev", name])?;
            ip(&["link", "set", "dev", name, "up"])?;
        }
        let mut warnings = Vec::new();
        let all = read_sysctl(&conf("ipv4", "all", "rp_filter"));
        if let Some(w) = rp_filter_warning(all.as_deref(), host_name) {
            tracing::warn!("{w}");
            warnings.push(w);
        }
        let end = |name: &str| -> Result<PairEnd, HostFwError> {
            let l = link(name)?.ok_or_else(|| HostFwError::Output {
                command: format!("ip -d -j link show dev {name}"),
                ifname: name.into(),
                detail: "the interface vanished while being set up".into(),
            })?;
            Ok(PairEnd {
                ifname: name.into(),
                ifindex: l.ifindex,
                mac: parse_mac(name, &l.address)?,
            })
        };
        Ok(HostPair {
            host: end(host_name)?,
            net: end(net_name)?,
            warnings,
        })
    }

    /// Deletes the pair (both ends go with either). Deleting an absent pair is not an error.
    pub fn remove(&self) -> Result<(), HostFwError> {
        Self::remove_named(&self.host.ifname)
    }

    /// Deletes the veth `host_name` and its peer, if it exists (e.g. at agent shutdown without a
    /// [`HostPair`] at hand).
    pub fn remove_named(host_name: &str) -> Result<(), HostFwError> {
        check_name(host_name)?;
        ip_maybe(&["link", "del", "dev", host_name]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        fs::File,
        net::{Ipv4Addr, UdpSocket},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        process::Output,
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn run(program: &str, args: &[&str]) -> Output {
        // `ip` and `sysctl` finish on their own; these are local, non-blocking operations.
        Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
    }

    /// A network namespace named after the pid and a counter, deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new() -> Self {
            let name = format!(
                "shfw-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let ns = Netns(name);
            let out = run("ip", &["netns", "add", &ns.0]);
            assert!(out.status.success(), "ip netns add {}: {:?}", ns.0, out);
            ns
        }

        /// Runs `f` on a new thread inside the namespace (panics propagate).
        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let path = format!("/run/netns/{}", self.0);
            std::thread::spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let out = run("ip", &["netns", "del", &self.0]);
            if !out.status.success() {
                eprintln!("cleanup: ip netns del {}: {:?}", self.0, out.stderr);
            }
        }
    }

    fn must_ip(args: &[&str]) {
        ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let sum: u32 = bytes
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        !(((folded & 0xffff) + (folded >> 16)) as u16)
    }

    /// An Ethernet/IPv4/UDP frame (UDP checksum 0: none, allowed in IPv4).
    fn udp_frame(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Transmits `frame` on interface `ifindex` through an AF_PACKET socket (as a worker's TX
    /// on `sluice_net` would).
    fn send_raw(ifindex: u32, frame: &[u8]) {
        // SAFETY: plain socket(2) call; protocol 0 receives nothing.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr are valid for the given lengths during the call.
        let n = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends a UDP datagram on the pair's net end to `dst`:`port` and returns what a socket
    /// bound there received within `wait`.
    fn reinject(
        pair: &HostPair,
        dst: Ipv4Addr,
        port: u16,
        wait: Duration,
    ) -> Option<(Vec<u8>, Ipv4Addr)> {
        let socket = UdpSocket::bind((dst, port)).expect("bind UDP");
        socket.set_read_timeout(Some(wait)).expect("timeout");
        let src = Ipv4Addr::new(192, 0, 2, 7);
        let frame = udp_frame(pair.host.mac, pair.net.mac, src, dst, port, b"reinjected");
        send_raw(pair.net.ifindex, &frame);
        let mut buf = [0u8; 64];
        match socket.recv_from(&mut buf) {
            Ok((n, std::net::SocketAddr::V4(from))) => Some((buf[..n].to_vec(), *from.ip())),
            _ => None,
        }
    }

    #[test]
    fn bad_names_are_refused_without_root() {
        for name in ["", "a/b", "with space", "sixteen_bytes_xx", "a:b"] {
            let err = HostPair::ensure(name, "sluice_net").expect_err(name);
            assert!(
                matches!(err, HostFwError::BadName { .. }),
                "{name}: {err:?}"
            );
        }
        let err = HostPair::ensure("same", "same").expect_err("same names");
        assert!(matches!(err, HostFwError::SameName { .. }), "{err:?}");
    }

    #[test]
    fn strict_all_rp_filter_is_reported() {
        assert_eq!(rp_filter_warning(Some("0"), "sluice_host"), None);
        assert_eq!(rp_filter_warning(Some("2"), "sluice_host"), None);
        assert_eq!(rp_filter_warning(None, "sluice_host"), None);
        let w = rp_filter_warning(Some("1"), "sluice_host").expect("strict");
        assert!(
            w.contains("sluice_host") && w.contains("all.rp_filter"),
            "{w}"
        );
    }

    #[test]
    fn host_pair_is_created_idempotently_delivers_reinjected_frames_and_is_removed() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let ns = Netns::new();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let host = format!("sh{}n{n}", std::process::id());
        let net = format!("sn{}n{n}", std::process::id());
        let (h, t) = (host.clone(), net.clone());
        ns.run(move || {
            let node = Ipv4Addr::new(10, 79, 0, 1);
            must_ip(&["link", "set", "lo", "up"]);
            must_ip(&["addr", "add", "10.79.0.1/32", "dev", "lo"]);
            std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0").expect("all.rp_filter");

            let pair = HostPair::ensure(&h, &t).expect("create the pair");
            assert_eq!(pair.host.ifname, h);
            assert_eq!(pair.net.ifname, t);
            assert!(pair.host.ifindex > 0 && pair.net.ifindex > 0);
            assert_ne!(pair.host.ifindex, pair.net.ifindex);
            assert_ne!(pair.host.mac, pair.net.mac);
            assert!(pair.warnings.is_empty(), "{:?}", pair.warnings);
            for name in [&h, &t] {
                let shown = ip(&["-j", "addr", "show", "dev", name]).expect("addr show");
                assert!(shown.contains("\"UP\""), "{name} is not up: {shown}");
                assert!(!shown.contains("\"inet"), "{name} has an address: {shown}");
                assert_eq!(
                    read_sysctl(&conf("ipv4", name, "rp_filter")).as_deref(),
                    Some("0")
                );
                assert_eq!(
                    read_sysctl(&conf("ipv6", name, "disable_ipv6")).as_deref(),
                    Some("1")
                );
            }
            // Idempotent: the same interfaces, settings re-applied.
            std::fs::write(conf("ipv4", &h, "rp_filter"), "1").expect("spoil rp_filter");
            let again = HostPair::ensure(&h, &t).expect("ensure again");
            assert_eq!(again, pair, "a second ensure made a different pair");
            assert_eq!(
                read_sysctl(&conf("ipv4", &h, "rp_filter")).as_deref(),
                Some("0")
            );

            // What a worker does: a frame to the node's address, sent on the net end, reaches
            // a socket of the namespace.
            let got = reinject(&pair, node, 9999, Duration::from_secs(3));
            assert_eq!(
                got,
                Some((b"reinjected".to_vec(), Ipv4Addr::new(192, 0, 2, 7))),
                "the re-injected datagram did not arrive"
            );

            // Strict `all` defeats the per-interface 0: reported, and the frame is dropped.
            std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "1").expect("all strict");
            let strict = HostPair::ensure(&h, &t).expect("ensure with strict all");
            assert!(
                strict
                    .warnings
                    .iter()
                    .any(|w| w.contains(&h) && w.contains("rp_filter")),
                "{:?}",
                strict.warnings
            );
            assert_eq!(
                reinject(&pair, node, 9998, Duration::from_millis(500)),
                None,
                "delivered despite strict rp_filter: the warning's premise is wrong"
            );
            std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0").expect("all off");

            pair.remove().expect("remove");
            assert!(link(&h).expect("ip").is_none(), "{h} still exists");
            assert!(link(&t).expect("ip").is_none(), "{t} still exists");
            pair.remove().expect("removing an absent pair is Ok");

            // A non-veth interface under the name is refused by name.
            must_ip(&["link", "add", &h, "type", "bridge"]);
            let err = HostPair::ensure(&h, &t).expect_err("a bridge under the host name");
            assert!(matches!(err, HostFwError::NotVeth { .. }), "{err:?}");
            assert!(err.to_string().contains(&h), "{err}");
            assert!(link(&t).expect("ip").is_none(), "ensure created {t} anyway");
        });
        drop(ns);
    }
}
