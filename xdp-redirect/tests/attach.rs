//! Privileged tests of the XDP program and its loader on real veth pairs.
//!
//! Each test builds its own pair of network namespaces (pid + counter in every name), removed by
//! [`Pair`]'s drop even when the test panics:
//!
//! ```text
//!   netns A                          netns B
//!   [xa..  10.77.0.1/24] ----veth---- [xb..  10.77.0.2/24]
//!    XDP program (rx side)             traffic source: ping, raw AF_PACKET frames
//! ```
//!
//! `Attachment::attach` works on the current network namespace of the calling thread, so the
//! attach runs on a dedicated thread that has `setns`-ed into A (the harness's other threads never
//! change namespace); the `Attachment` itself is then used from the test thread. Raw frames are
//! sent from a thread that has `setns`-ed into B. IPv6 is disabled in both namespaces so that no
//! router solicitations or MLD reports disturb the counters.
//!
//! Raw frames carry a destination MAC that is not A's, so the kernel drops them as
//! `PACKET_OTHERHOST` after `XDP_PASS` and never answers: counter deltas for them are exact.
//! Ping-based checks assert lower bounds (ARP may add frames).
//!
//! The host firewall tests (at the end) also use A as "the node": real TCP/UDP/ping between
//! the namespaces, with a minimal AF_XDP socket bound on A's queue 0 taking every frame the
//! program redirects, so that only what the program passes reaches A's kernel.
//!
//! Root only: every test but the unknown-interface one prints "skipping: needs root" otherwise.
//! Every command runs with a time limit, every wait is bounded.
use std::{
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use std::{collections::BTreeMap, net::Ipv4Addr};

use xdp_redirect::{
    Action, AttachMode, AttachOptions, Attachment, Error, Failsafe, HostFirewall, HostFlow,
    PassKey, PortClaims, PortProtocol, RuleAction, MAX_DST_ADDRS, MAX_HOST_ADDRS, MAX_QUEUES,
};

/// Any command we run (ip, ping) must finish within this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A thread moved into a namespace must finish its work within this.
const NETNS_THREAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long counters may take to show frames we sent (veth runs XDP in softirq right after the
/// send, so this is generous).
const COUNTER_WAIT: Duration = Duration::from_secs(3);
/// After the expected number of frames is counted, wait this long for any unexpected extra ones.
const COUNTER_SETTLE: Duration = Duration::from_millis(100);

const ADDR_A: &str = "10.77.0.1";
const ADDR_B: &str = "10.77.0.2";
const PREFIX_LEN: u8 = 24;
/// Echo requests per ping run.
const PINGS: u64 = 3;

/// Destination MAC of raw frames: not A's address (A's veth gets a random one from the kernel
/// with the locally administered bit set, never this fixed value), so A's kernel drops them.
const OTHER_HOST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x77, 0x00, 0x99];
const SOURCE_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x77, 0x00, 0x02];

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_GRE: u8 = 47;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Runs `program args`, killing it (by its own pid, through `Child::kill`) after
/// [`COMMAND_TIMEOUT`].
fn run(program: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} {args:?} did not finish within {COMMAND_TIMEOUT:?}");
            }
            Err(e) => panic!("waiting for {program} {args:?}: {e}"),
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collecting output of {program} {args:?}: {e}"))
}

/// Runs `ip args`, panicking with its stderr if it fails; returns its stdout.
fn ip(args: &[&str]) -> String {
    let out = run("ip", args);
    assert!(
        out.status.success(),
        "ip {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// Two namespaces joined by a veth pair, both deleted on drop (which deletes the veths too).
struct Pair {
    netns_a: String,
    netns_b: String,
    /// The veth end in A: where the XDP program goes.
    if_a: String,
    /// The veth end in B: where traffic comes from.
    if_b: String,
}

impl Pair {
    /// Creates the namespaces (IPv6 off, loopback up) and the veth pair with addresses, both ends
    /// up.
    fn new() -> Self {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pair = Pair {
            netns_a: format!("xr-{pid}-{n}-a"),
            netns_b: format!("xr-{pid}-{n}-b"),
            // At most 2 + 7 + 1 + 4 = 14 bytes: within IFNAMSIZ - 1.
            if_a: format!("xa{pid}n{n}"),
            if_b: format!("xb{pid}n{n}"),
        };
        // The guard exists before the first namespace: a failure below still cleans up.
        for netns in [&pair.netns_a, &pair.netns_b] {
            ip(&["netns", "add", netns]);
            let out = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    netns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            );
            assert!(
                out.status.success(),
                "disabling IPv6 in {netns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ip(&["-n", netns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n",
            &pair.netns_a,
            "link",
            "add",
            &pair.if_a,
            "type",
            "veth",
            "peer",
            "name",
            &pair.if_b,
            "netns",
            &pair.netns_b,
        ]);
        for (netns, ifname, addr) in [
            (&pair.netns_a, &pair.if_a, ADDR_A),
            (&pair.netns_b, &pair.if_b, ADDR_B),
        ] {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            ip(&["-n", netns, "addr", "add", &cidr, "dev", ifname]);
            ip(&["-n", netns, "link", "set", ifname, "up"]);
        }
        pair
    }

    /// Attaches the program to A's veth from a thread inside A.
    fn attach(&self) -> Result<Attachment, Error> {
        let ifname = self.if_a.clone();
        in_netns(&self.netns_a, move || Attachment::attach(&ifname, false))
    }

    /// Takes over a handed-over attachment of A's veth (in A's namespace, as the next agent).
    fn adopt(
        &self,
        meta: xdp_redirect::AttachmentMeta,
        fds: Vec<OwnedFd>,
    ) -> Result<Attachment, Error> {
        in_netns(&self.netns_a, move || Attachment::adopt(meta, fds))
    }

    /// `ip -d link show` of A's veth.
    fn link_details(&self) -> String {
        ip(&["-n", &self.netns_a, "-d", "link", "show", "dev", &self.if_a])
    }

    /// Pings A from B ([`PINGS`] echo requests); true if every one was answered.
    fn ping_a_from_b(&self) -> bool {
        let count = PINGS.to_string();
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns_b,
                "ping",
                "-n",
                "-q",
                "-c",
                &count,
                "-i",
                "0.2",
                "-W",
                "2",
                "-w",
                "10",
                ADDR_A,
            ],
        );
        if !out.status.success() {
            eprintln!(
                "ping {ADDR_A} from {} failed ({}): {}{}",
                self.netns_b,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    /// Sends `frames` as they are on B's veth, through an AF_PACKET socket made inside B.
    /// Returns one result per frame (the frame's length, or the send error).
    fn send_raw(&self, frames: Vec<Vec<u8>>) -> Vec<std::io::Result<usize>> {
        let ifname = self.if_b.clone();
        in_netns(&self.netns_b, move || send_frames(&ifname, &frames))
    }

    /// Like [`Pair::send_raw`] but every send must succeed.
    fn send_all(&self, frames: &[Vec<u8>]) {
        for (i, result) in self.send_raw(frames.to_vec()).into_iter().enumerate() {
            let sent = result.unwrap_or_else(|e| panic!("sending frame {i} on {}: {e}", self.if_b));
            assert_eq!(sent, frames[i].len(), "frame {i} sent short");
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for netns in [&self.netns_a, &self.netns_b] {
            // Best effort, no panic in drop; a namespace that never got created fails quietly.
            let out = run("ip", &["netns", "del", netns]);
            if !out.status.success() {
                eprintln!(
                    "cleanup: ip netns del {netns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Runs `f` on a new thread that has first joined network namespace `netns`
/// (`/run/netns/NAME`), and returns its result. The calling thread never changes namespace.
/// A panic in `f` is re-raised here; a thread that takes longer than [`NETNS_THREAD_TIMEOUT`]
/// fails the test.
fn in_netns<T, F>(netns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{netns}");
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: file is an open namespace file descriptor for the whole call; setns only
            // changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            let _ = tx.send(f());
        })
        .expect("spawning a thread");
    match rx.recv_timeout(NETNS_THREAD_TIMEOUT) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("thread in {netns} ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("thread in {netns} did not finish within {NETNS_THREAD_TIMEOUT:?}")
        }
    }
}

/// Sends each frame on `ifname` (in the calling thread's namespace) through one AF_PACKET raw
/// socket.
fn send_frames(ifname: &str, frames: &[Vec<u8>]) -> Vec<std::io::Result<usize>> {
    let ifindex = xdp_redirect::ifindex(ifname).expect("sending interface exists");
    // SAFETY: plain socket(2) call; protocol 0 means the socket receives nothing.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: raw is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits i32");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&OTHER_HOST_MAC);
    frames
        .iter()
        .map(|frame| {
            // SAFETY: frame is valid for frame.len() bytes, addr is a valid sockaddr_ll of the
            // given size, and socket stays open for the call.
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
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Counters

type Counters = [u64; Action::COUNT as usize];

fn counters(att: &Attachment) -> Counters {
    att.counters().expect("reading the ACTIONS map")
}

fn delta(before: &Counters, after: &Counters) -> Counters {
    std::array::from_fn(|i| after[i] - before[i])
}

/// Waits until the counters have grown by at least `frames` in total (bounded by
/// [`COUNTER_WAIT`]), then [`COUNTER_SETTLE`] more for extras; returns the growth.
fn growth_after(att: &Attachment, before: &Counters, frames: u64) -> Counters {
    let deadline = Instant::now() + COUNTER_WAIT;
    loop {
        let d = delta(before, &counters(att));
        if d.iter().sum::<u64>() >= frames || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(COUNTER_SETTLE);
    delta(before, &counters(att))
}

/// Sends `frames` from B and returns how the counters grew.
fn classify(pair: &Pair, att: &Attachment, frames: &[Vec<u8>]) -> Counters {
    let before = counters(att);
    pair.send_all(frames);
    growth_after(att, &before, frames.len() as u64)
}

/// A counter array with the given counts, for exact comparisons.
fn expect_counts(counts: &[(Action, u64)]) -> Counters {
    let mut out = [0; Action::COUNT as usize];
    for &(action, n) in counts {
        out[action as usize] = n;
    }
    out
}

/// Exact comparison of counter growth, printed by name.
fn assert_counts(got: Counters, want: Counters, what: &str) {
    assert!(
        got == want,
        "{what}: counters grew by [{}], expected [{}]",
        show(&got),
        show(&want)
    );
}

fn show(c: &Counters) -> String {
    Action::ALL
        .iter()
        .map(|a| format!("{}={}", a.as_str(), c[*a as usize]))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Frames

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&OTHER_HOST_MAC);
    frame.extend_from_slice(&SOURCE_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn arp_request() -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    arp.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&1u16.to_be_bytes()); // request
    arp.extend_from_slice(&SOURCE_MAC);
    arp.extend_from_slice(&[10, 77, 0, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 77, 0, 1]);
    ethernet(ETHERTYPE_ARP, &arp)
}

/// IPv4 header (no options, not fragmented) from 10.77.0.2 to 10.77.0.1 followed by `l4`.
fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_with(proto, &[], 0, l4)
}

/// IPv4 header from 10.77.0.2 to 10.77.0.1 with `options` (a multiple of 4 bytes, at most 40)
/// and the flags/fragment-offset field `fragment`, followed by `l4`.
fn ipv4_with(proto: u8, options: &[u8], fragment: u16, l4: &[u8]) -> Vec<u8> {
    ethernet(
        ETHERTYPE_IPV4,
        &ipv4_packet([10, 77, 0, 2], [10, 77, 0, 1], proto, options, fragment, l4),
    )
}

/// A frame from 10.77.0.2 to `dst` (no options) with the flags/fragment-offset field
/// `fragment`, followed by `l4`.
fn ipv4_to(dst: Ipv4Addr, proto: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    ethernet(
        ETHERTYPE_IPV4,
        &ipv4_packet([10, 77, 0, 2], dst.octets(), proto, &[], fragment, l4),
    )
}

/// An IPv4 packet (no Ethernet header) with a correct header checksum.
fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    options: &[u8],
    fragment: u16,
    l4: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "bad IPv4 options"
    );
    let header_len = 20 + options.len();
    let total = u16::try_from(header_len + l4.len()).expect("small packet");
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (header_len / 4) as u8;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&fragment.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    h.extend_from_slice(options);
    let sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// A UDP header (no payload) to `port`.
fn udp_header(port: u16) -> [u8; 8] {
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&8u16.to_be_bytes());
    udp
}

/// A TCP header (SYN, no payload) from `src_port` to `dst_port`.
fn tcp_header(src_port: u16, dst_port: u16) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp
}

/// A UDP header (no payload) from `src_port` to `dst_port`.
fn udp_ports(src_port: u16, dst_port: u16) -> [u8; 8] {
    let mut udp = udp_header(dst_port);
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp
}

fn tcp_to(port: u16) -> Vec<u8> {
    ipv4(IPPROTO_TCP, &tcp_header(40000, port))
}

/// An ICMP echo message (`icmp_type` 8 request or 0 reply) with identifier `id`.
fn echo(icmp_type: u8, id: u16) -> [u8; 8] {
    let mut icmp = [icmp_type, 0, 0, 0, 0, 0, 0, 1];
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp
}

/// An ICMP error (`icmp_type`, `code`) from B to A quoting `quoted` (an IPv4 packet A sent).
fn icmp_error(icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    ipv4(IPPROTO_ICMP, &icmp)
}

/// A packet A (10.77.0.1) sent to B, as quoted in an ICMP error: IP header and 8 bytes of `l4`.
fn sent_by_a(proto: u8, options: &[u8], fragment: u16, l4: &[u8]) -> Vec<u8> {
    ipv4_packet(
        [10, 77, 0, 1],
        [10, 77, 0, 2],
        proto,
        options,
        fragment,
        &l4[..8],
    )
}

fn icmp_echo() -> Vec<u8> {
    ipv4(IPPROTO_ICMP, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
}

fn udp_to(port: u16) -> Vec<u8> {
    ipv4(IPPROTO_UDP, &udp_header(port))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn attaches_natively_on_veth_and_detaches_on_drop() {
    require_root!();
    let pair = Pair::new();
    assert!(
        !pair.link_details().contains("prog/xdp"),
        "a fresh veth must carry no XDP program"
    );
    let att = pair.attach().expect("attach to veth");
    assert_eq!(att.mode(), AttachMode::Native);
    assert_eq!(att.ifname(), pair.if_a);
    let details = pair.link_details();
    // Native mode shows as "xdp" (generic would be "xdpgeneric") with the program's id.
    assert!(
        details.contains("prog/xdp id"),
        "no XDP program shown after attach:\n{details}"
    );
    assert!(
        details.contains(" xdp ") && !details.contains("xdpgeneric"),
        "not shown as native XDP:\n{details}"
    );
    drop(att);
    let details = pair.link_details();
    assert!(
        !details.contains("prog/xdp") && !details.contains(" xdp "),
        "XDP program still attached after the Attachment was dropped:\n{details}"
    );
    // The interface is free again: a second attachment works.
    let again = pair.attach().expect("re-attach after drop");
    assert_eq!(again.mode(), AttachMode::Native);
}

#[test]
fn second_attach_to_the_same_interface_fails_and_names_it() {
    require_root!();
    let pair = Pair::new();
    let _first = pair.attach().expect("first attach");
    let err = pair
        .attach()
        .expect_err("a second native attach on the same veth must fail");
    assert!(
        matches!(err, Error::Attach { .. }),
        "unexpected error {err:?}"
    );
    assert!(
        err.to_string().contains(&pair.if_a),
        "error does not name the interface: {err}"
    );
}

#[test]
fn without_a_socket_everything_passes_to_the_kernel() {
    require_root!();
    let pair = Pair::new();
    let att = pair.attach().expect("attach to veth");
    let before = counters(&att);
    assert!(
        pair.ping_a_from_b(),
        "ping must work through the program when no AF_XDP socket is registered (fail-open)"
    );
    let d = growth_after(&att, &before, PINGS);
    assert!(
        d[Action::PassNoSocket as usize] >= PINGS,
        "expected at least {PINGS} pass_no_socket, got {}",
        show(&d)
    );
    assert_eq!(d[Action::Redirected as usize], 0, "{}", show(&d));
    assert_eq!(d[Action::PassRule as usize], 0, "{}", show(&d));
    assert_eq!(d[Action::PassShort as usize], 0, "{}", show(&d));
}

#[test]
fn default_pass_and_rules() {
    require_root!();
    let pair = Pair::new();
    let mut att = pair.attach().expect("attach to veth");
    let arp = arp_request();
    let icmp = icmp_echo();
    let dns = udp_to(53);
    let other_udp = udp_to(54);
    let all = [arp, icmp, dns, other_udp];
    use Action::{PassNoSocket as NoSocket, PassRule as Rule};

    // A fresh attachment redirects everything; with no socket all of it is passed as no-socket.
    let fresh = expect_counts(&[(NoSocket, 4)]);
    assert_counts(classify(&pair, &att, &all), fresh, "fresh attachment");

    // Default Pass: everything is left to the kernel by rule.
    att.set_default(RuleAction::Pass).expect("set default");
    assert_counts(
        classify(&pair, &att, &all),
        expect_counts(&[(Rule, 4)]),
        "default Pass",
    );
    // A Redirect rule overrides the Pass default (ICMP then falls through to no-socket).
    let icmp_key = PassKey::ipv4(IPPROTO_ICMP, 0);
    att.set_rule(icmp_key, RuleAction::Redirect)
        .expect("set rule");
    assert_counts(
        classify(&pair, &att, &all),
        expect_counts(&[(Rule, 3), (NoSocket, 1)]),
        "default Pass with an ICMP Redirect rule",
    );
    att.remove_rule(&icmp_key).expect("remove rule");

    // Default Redirect with ARP passed by ethertype: ARP by rule, IPv4 finds no socket.
    att.set_default(RuleAction::Redirect).expect("set default");
    let arp_key = PassKey::ethertype(ETHERTYPE_ARP);
    att.set_rule(arp_key, RuleAction::Pass).expect("set rule");
    let arp_only = expect_counts(&[(Rule, 1), (NoSocket, 3)]);
    assert_counts(classify(&pair, &att, &all), arp_only, "ARP Pass rule");

    // ICMP passed by protocol: now ICMP by rule too, UDP still finds no socket.
    att.set_rule(icmp_key, RuleAction::Pass).expect("set rule");
    assert_counts(
        classify(&pair, &att, &all),
        expect_counts(&[(Rule, 2), (NoSocket, 2)]),
        "ARP and ICMP Pass rules",
    );

    // A port rule matches only its port.
    let dns_key = PassKey::ipv4(IPPROTO_UDP, 53);
    att.set_rule(dns_key, RuleAction::Pass).expect("set rule");
    assert_counts(
        classify(&pair, &att, &all),
        expect_counts(&[(Rule, 3), (NoSocket, 1)]),
        "ARP, ICMP and UDP/53 Pass rules",
    );

    // Removing rules restores the previous behaviour, step by step.
    att.remove_rule(&dns_key).expect("remove rule");
    att.remove_rule(&icmp_key).expect("remove rule");
    assert_counts(
        classify(&pair, &att, &all),
        arp_only,
        "after removing the ICMP and UDP/53 rules",
    );
    att.remove_rule(&arp_key).expect("remove rule");
    assert_counts(
        classify(&pair, &att, &all),
        fresh,
        "after removing every rule",
    );
    // Removing an absent rule is not an error.
    att.remove_rule(&arp_key)
        .expect("removing an absent rule is Ok");

    // Real traffic with default Pass: ping works, and every frame is counted by rule.
    att.set_default(RuleAction::Pass).expect("set default");
    let before = counters(&att);
    assert!(pair.ping_a_from_b(), "ping with default Pass");
    let d = growth_after(&att, &before, PINGS);
    assert!(
        d[Rule as usize] >= PINGS,
        "expected at least {PINGS} pass_rule, got {}",
        show(&d)
    );
    assert_eq!(d[NoSocket as usize], 0, "{}", show(&d));
    assert_eq!(d[Action::Redirected as usize], 0, "{}", show(&d));
}

#[test]
fn short_frames_pass_and_are_counted() {
    require_root!();
    let pair = Pair::new();
    let att = pair.attach().expect("attach to veth");

    // The kernel refuses to send less than an Ethernet header on an Ethernet device
    // (AF_PACKET: dev_validate_header, min_header_len 14), so such frames cannot reach XDP
    // from a veth peer.
    let tiny = ethernet(ETHERTYPE_IPV4, &[])[..12].to_vec();
    let results = pair.send_raw(vec![tiny]);
    let err = results[0]
        .as_ref()
        .expect_err("a 12-byte frame was accepted by AF_PACKET on veth");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "unexpected: {err}");

    // IPv4 ethertype, but the frame ends early: 14 bytes (no IPv4 header at all), 15 bytes
    // (version/IHL only, no protocol), 36 bytes (full IPv4 header and UDP source port, but no
    // destination port).
    let full = udp_to(53);
    let frames = vec![
        full[..14].to_vec(),
        full[..15].to_vec(),
        full[..36].to_vec(),
    ];
    assert_counts(
        classify(&pair, &att, &frames),
        expect_counts(&[(Action::PassShort, 3)]),
        "truncated IPv4 frames",
    );

    // A bare 14-byte header of another ethertype is classifiable: default applies.
    let bare_arp = ethernet(ETHERTYPE_ARP, &[]);
    assert_counts(
        classify(&pair, &att, &[bare_arp]),
        expect_counts(&[(Action::PassNoSocket, 1)]),
        "14-byte ARP frame",
    );
}

#[test]
fn queue_beyond_map_is_rejected() {
    require_root!();
    let pair = Pair::new();
    let mut att = pair.attach().expect("attach to veth");
    let not_a_socket = File::open("/dev/null").expect("open /dev/null");
    for queue in [MAX_QUEUES, MAX_QUEUES + 1, u32::MAX] {
        let err = att
            .register_socket(queue, not_a_socket.as_fd())
            .expect_err("queue beyond the XSKMAP accepted");
        match &err {
            Error::QueueTooLarge {
                ifname,
                queue: q,
                max,
            } => {
                assert_eq!(ifname, &pair.if_a);
                assert_eq!(*q, queue);
                assert_eq!(*max, MAX_QUEUES);
            }
            other => panic!("expected QueueTooLarge for queue {queue}, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&pair.if_a) && msg.contains(&queue.to_string()),
            "message must name interface and queue: {msg}"
        );
    }
    // A queue in range but an fd that is no AF_XDP socket: the kernel refuses, reported as a
    // map error on XSKS (not a panic, not success).
    let err = att
        .register_socket(0, not_a_socket.as_fd())
        .expect_err("/dev/null accepted as an AF_XDP socket");
    assert!(
        matches!(err, Error::Map { map: "XSKS", .. }),
        "unexpected error {err:?}"
    );
    // Nothing registered, so unregistering is a no-op that succeeds.
    att.unregister_socket(0)
        .expect("unregistering an empty queue is Ok");
}

#[test]
fn unknown_interface_is_a_clear_error() {
    // No root needed: the interface lookup comes before loading anything.
    let err = Attachment::attach("nonexist0", true).expect_err("attach to a missing interface");
    match &err {
        Error::NoInterface { ifname } => assert_eq!(ifname, "nonexist0"),
        other => panic!("expected NoInterface, got {other:?}"),
    }
    assert!(
        err.to_string().contains("nonexist0"),
        "message must name the interface: {err}"
    );
    // A name that cannot be an interface name at all is the same error, not a panic.
    let err = Attachment::attach("bad\0name", true).expect_err("attach to a name with NUL");
    assert!(matches!(err, Error::NoInterface { .. }), "got {err:?}");
}

#[test]
fn ipv4_header_length_is_honoured() {
    require_root!();
    let pair = Pair::new();
    let mut att = pair.attach().expect("attach to veth");
    att.set_rule(PassKey::ipv4(IPPROTO_UDP, 53), RuleAction::Pass)
        .expect("set rule");
    // Eight bytes of options (NOP padding): the port is found after them, not at offset 20.
    // A program that ignored IHL would read the NOPs (0x0101) as the port and not see 53.
    let with_options = ipv4_with(IPPROTO_UDP, &[1; 8], 0, &udp_header(53));
    assert_counts(
        classify(&pair, &att, &[with_options]),
        expect_counts(&[(Action::PassRule, 1)]),
        "UDP/53 behind IPv4 options",
    );
    let other_port = ipv4_with(IPPROTO_UDP, &[1; 8], 0, &udp_header(54));
    assert_counts(
        classify(&pair, &att, &[other_port]),
        expect_counts(&[(Action::PassNoSocket, 1)]),
        "UDP/54 behind IPv4 options",
    );
    // An IHL below 5 is no valid header: the default applies (no rule lookup, not "short").
    let mut bad_ihl = udp_to(53);
    bad_ihl[14] = 0x44;
    assert_counts(
        classify(&pair, &att, &[bad_ihl]),
        expect_counts(&[(Action::PassNoSocket, 1)]),
        "IPv4 with IHL 4",
    );
}

/// Fragments of one UDP datagram must be classified alike, or the first fragment goes one way
/// (kernel or AF_XDP) and the rest the other, and neither side can reassemble the datagram.
#[test]
fn fragments_of_one_datagram_are_classified_alike() {
    require_root!();
    let pair = Pair::new();
    let mut att = pair.attach().expect("attach to veth");
    // Uplink-like setup inverted: redirect by default, leave UDP/53 to the kernel.
    att.set_rule(PassKey::ipv4(IPPROTO_UDP, 53), RuleAction::Pass)
        .expect("set rule");
    const MORE_FRAGMENTS: u16 = 0x2000;
    // First fragment: offset 0, MF set, carries the real UDP header (port 53) and 8 data bytes.
    let mut first_l4 = udp_header(53).to_vec();
    first_l4.extend_from_slice(&[0xaa; 8]);
    let first = ipv4_with(IPPROTO_UDP, &[], MORE_FRAGMENTS, &first_l4);
    // Last fragment: offset 2 (16 bytes), no UDP header, data bytes that are not 0x0035 where
    // a port would be.
    let last = ipv4_with(IPPROTO_UDP, &[], 2, &[0xbb; 8]);
    let got_first = classify(&pair, &att, &[first]);
    let got_last = classify(&pair, &att, &[last]);
    assert_counts(
        got_last,
        got_first,
        "last fragment classified unlike the first fragment",
    );
}

// ---------------------------------------------------------------------------------------------
// Service claims on an uplink-like interface (default Pass): what the program redirects shows as
// pass_no_socket (no AF_XDP socket is registered), what it leaves to the kernel as pass_rule.

/// An uplink-like attachment: everything passes to the kernel unless claimed.
fn uplink(pair: &Pair) -> Attachment {
    let mut att = pair.attach().expect("attach to veth");
    att.set_default(RuleAction::Pass).expect("set default Pass");
    att
}

/// Sends each `(name, frame, redirected)` alone and checks that exactly that one frame was
/// redirected (counted as pass_no_socket) or left to the kernel (pass_rule).
fn assert_claims(pair: &Pair, att: &Attachment, cases: &[(&str, Vec<u8>, bool)], when: &str) {
    for (name, frame, redirected) in cases {
        let want = if *redirected {
            expect_counts(&[(Action::PassNoSocket, 1)])
        } else {
            expect_counts(&[(Action::PassRule, 1)])
        };
        let what = format!(
            "{when}: {name} should be {}",
            if *redirected { "redirected" } else { "passed" }
        );
        assert_counts(
            classify(pair, att, std::slice::from_ref(frame)),
            want,
            &what,
        );
    }
}

#[test]
fn claimed_node_ports_are_redirected_per_protocol_and_neighbours_pass() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    use PortProtocol::{Tcp, Udp};
    use RuleAction::{Pass, Redirect};

    // Exact NodePorts: TCP 30080 and UDP 30081. 32000 plays the healthCheckNodePort: not claimed.
    att.set_port(Tcp, 30080, Redirect).expect("claim TCP 30080");
    att.set_port(Udp, 30081, Redirect).expect("claim UDP 30081");
    assert_claims(
        &pair,
        &att,
        &[
            ("TCP 30080", tcp_to(30080), true),
            ("TCP 30079", tcp_to(30079), false),
            ("TCP 30081", tcp_to(30081), false),
            ("UDP 30080 (claimed for TCP only)", udp_to(30080), false),
            ("UDP 30081", udp_to(30081), true),
            ("TCP 32000 (health check)", tcp_to(32000), false),
            // A first fragment of a datagram to a claimed port: fragments never match ports.
            (
                "first fragment of UDP 30081",
                ipv4_with(IPPROTO_UDP, &[], 0x2000, &udp_header(30081)),
                false,
            ),
        ],
        "exact NodePorts",
    );

    // The whole NodePort range claimed for TCP, the health check port kept by an explicit Pass;
    // the masquerade range claimed for UDP.
    att.set_port_range(Tcp, 30000..=32767, Redirect)
        .expect("claim TCP 30000-32767");
    att.set_port(Tcp, 32000, Pass).expect("TCP 32000 Pass");
    att.set_port_range(Udp, 61000..=65535, Redirect)
        .expect("claim UDP 61000-65535");
    assert_claims(
        &pair,
        &att,
        &[
            ("TCP 30000", tcp_to(30000), true),
            ("TCP 30079", tcp_to(30079), true),
            ("TCP 32767", tcp_to(32767), true),
            ("TCP 29999", tcp_to(29999), false),
            ("TCP 32768", tcp_to(32768), false),
            ("TCP 32000 (health check Pass)", tcp_to(32000), false),
            ("UDP 61000", udp_to(61000), true),
            ("UDP 63333", udp_to(63333), true),
            ("UDP 65535", udp_to(65535), true),
            ("UDP 60999", udp_to(60999), false),
            ("TCP 65535 (claimed for UDP only)", tcp_to(65535), false),
        ],
        "ranges",
    );
    assert_eq!(att.ports(Tcp).len(), 2768, "TCP entries");
    assert_eq!(att.ports(Udp).get(61000), Some(Redirect));

    // An exact RULES entry is consulted before the port tables, so the VXLAN rule and other
    // exceptions keep their meaning.
    att.set_rule(PassKey::ipv4(IPPROTO_UDP, 63000), Pass)
        .expect("set rule");
    att.set_rule(PassKey::ipv4(IPPROTO_UDP, 8472), Redirect)
        .expect("set rule");
    assert_claims(
        &pair,
        &att,
        &[
            ("UDP 63000 (RULES Pass)", udp_to(63000), false),
            ("UDP 8472 (RULES Redirect)", udp_to(8472), true),
        ],
        "RULES before port tables",
    );

    // Removing and clearing restore Pass.
    att.remove_port_range(Udp, 61000..=62999)
        .expect("release UDP 61000-62999");
    att.remove_port(Tcp, 30000).expect("release TCP 30000");
    assert_claims(
        &pair,
        &att,
        &[
            ("UDP 61000", udp_to(61000), false),
            ("UDP 62999", udp_to(62999), false),
            ("UDP 64000", udp_to(64000), true),
            ("TCP 30000", tcp_to(30000), false),
            ("TCP 30001", tcp_to(30001), true),
        ],
        "after releasing parts",
    );
    att.clear_ports(Tcp).expect("clear TCP");
    att.clear_ports(Udp).expect("clear UDP");
    assert!(att.ports(Tcp).is_empty() && att.ports(Udp).is_empty());
    assert_claims(
        &pair,
        &att,
        &[
            ("TCP 30001", tcp_to(30001), false),
            ("UDP 64000", udp_to(64000), false),
            ("UDP 8472 (RULES Redirect)", udp_to(8472), true),
        ],
        "after clearing",
    );

    // Bad input is an error that names what was wrong.
    #[allow(clippy::reversed_empty_ranges)]
    let err = att
        .set_port_range(Tcp, 32767..=30000, Redirect)
        .expect_err("an empty range must be refused");
    assert!(
        matches!(
            err,
            Error::EmptyPortRange {
                lo: 32767,
                hi: 30000,
                ..
            }
        ),
        "got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&pair.if_a) && msg.contains("32767..=30000") && msg.contains("tcp"),
        "message must name interface, protocol and range: {msg}"
    );
    let err = PortProtocol::try_from(IPPROTO_GRE).expect_err("GRE has no port table");
    assert!(
        matches!(err, Error::UnsupportedProtocol { proto: 47 }),
        "{err:?}"
    );
    assert_eq!(PortProtocol::try_from(IPPROTO_TCP).ok(), Some(Tcp));
}

#[test]
fn replacing_port_claims_writes_only_the_difference() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    let mut first = PortClaims::new();
    first.set(30080, RuleAction::Redirect);
    first.set(31500, RuleAction::Redirect);
    first.set_range(61000..=65535, RuleAction::Redirect);
    let written = att
        .replace_ports(PortProtocol::Udp, &first)
        .expect("first reconcile");
    // 30080 and 31500 are in two words; 61000..=65535 covers words 1906..=2047.
    assert_eq!(written, 2 + (2047 - 61000 / 32 + 1), "words written");
    assert!(att.ports(PortProtocol::Udp) == &first);

    // Next reconcile: 31500 goes, 30090 comes (same word as 30080), the range stays.
    let mut second = first.clone();
    second.remove(31500);
    second.set(30090, RuleAction::Redirect);
    let written = att
        .replace_ports(PortProtocol::Udp, &second)
        .expect("second reconcile");
    assert_eq!(written, 2, "only the words of 31500 and 30090 change");
    assert_eq!(
        att.replace_ports(PortProtocol::Udp, &second)
            .expect("no-op reconcile"),
        0,
        "an unchanged set writes nothing"
    );
    assert_claims(
        &pair,
        &att,
        &[
            ("UDP 30080", udp_to(30080), true),
            ("UDP 30090", udp_to(30090), true),
            ("UDP 31500 (dropped from the set)", udp_to(31500), false),
            ("UDP 62000", udp_to(62000), true),
            ("TCP 30090 (other table)", tcp_to(30090), false),
        ],
        "after replacing",
    );
}

#[test]
fn icmp_echo_replies_are_redirected_by_claimed_identifier() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    use PortProtocol::IcmpEchoId;
    att.set_port(IcmpEchoId, 0x1234, RuleAction::Redirect)
        .expect("claim id 0x1234");
    att.set_port_range(IcmpEchoId, 40000..=40099, RuleAction::Redirect)
        .expect("claim ids 40000-40099");
    let reply = |id| ipv4(IPPROTO_ICMP, &echo(0, id));
    let request = |id| ipv4(IPPROTO_ICMP, &echo(8, id));
    assert_claims(
        &pair,
        &att,
        &[
            ("echo reply id 0x1234", reply(0x1234), true),
            ("echo reply id 0x1235", reply(0x1235), false),
            ("echo reply id 0x3412 (byte-swapped)", reply(0x3412), false),
            ("echo reply id 40000", reply(40000), true),
            ("echo reply id 40099", reply(40099), true),
            ("echo reply id 40100", reply(40100), false),
            // Echo requests are the kernel's to answer, whatever their identifier.
            ("echo request id 0x1234", request(0x1234), false),
        ],
        "claimed identifiers",
    );
    // A truncated ICMP header is too short to classify.
    let truncated = ipv4(IPPROTO_ICMP, &echo(0, 0x1234)[..4]);
    assert_counts(
        classify(&pair, &att, &[truncated]),
        expect_counts(&[(Action::PassShort, 1)]),
        "echo reply cut after 4 bytes",
    );
    att.clear_ports(IcmpEchoId).expect("clear ICMP ids");
    assert_claims(
        &pair,
        &att,
        &[
            ("echo reply id 0x1234", reply(0x1234), false),
            ("echo reply id 40000", reply(40000), false),
        ],
        "after clearing",
    );
}

#[test]
fn icmp_errors_follow_the_claims_of_the_packet_they_quote() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    use PortProtocol::{IcmpEchoId, Tcp, Udp};
    att.set_port(Udp, 61000, RuleAction::Redirect)
        .expect("claim UDP");
    att.set_port(Tcp, 61001, RuleAction::Redirect)
        .expect("claim TCP");
    att.set_port(IcmpEchoId, 777, RuleAction::Redirect)
        .expect("claim ICMP id");
    // What A (the node) sent, as quoted back by B: the node's port is the *source* port.
    let udp_from = |src| sent_by_a(IPPROTO_UDP, &[], 0, &udp_ports(src, 53));
    let tcp_from = |src| sent_by_a(IPPROTO_TCP, &[], 0, &tcp_header(src, 443));
    let unreachable = |quoted: &[u8]| icmp_error(3, 3, quoted);
    assert_claims(
        &pair,
        &att,
        &[
            (
                "port unreachable quoting UDP from 61000",
                unreachable(&udp_from(61000)),
                true,
            ),
            (
                "port unreachable quoting UDP from 60999",
                unreachable(&udp_from(60999)),
                false,
            ),
            (
                "port unreachable quoting UDP *to* 61000",
                unreachable(&sent_by_a(IPPROTO_UDP, &[], 0, &udp_ports(5353, 61000))),
                false,
            ),
            (
                "time exceeded quoting TCP from 61001",
                icmp_error(11, 0, &tcp_from(61001)),
                true,
            ),
            (
                "fragmentation needed quoting TCP from 61000 (UDP claim only)",
                icmp_error(3, 4, &tcp_from(61000)),
                false,
            ),
            (
                "parameter problem quoting an echo request with id 777",
                icmp_error(12, 0, &sent_by_a(IPPROTO_ICMP, &[], 0, &echo(8, 777))),
                true,
            ),
            (
                "host unreachable quoting an echo *reply* with id 777",
                icmp_error(3, 1, &sent_by_a(IPPROTO_ICMP, &[], 0, &echo(0, 777))),
                false,
            ),
            (
                "port unreachable quoting UDP from 61000 behind 8 bytes of IP options",
                unreachable(&sent_by_a(IPPROTO_UDP, &[1; 8], 0, &udp_ports(61000, 53))),
                true,
            ),
            (
                "port unreachable quoting a later fragment",
                unreachable(&sent_by_a(IPPROTO_UDP, &[], 0x0002, &udp_ports(61000, 53))),
                false,
            ),
            (
                "port unreachable with a truncated quote (IP header only)",
                unreachable(&udp_from(61000)[..20]),
                false,
            ),
            (
                "redirect (type 5) quoting UDP from 61000: not an error we follow",
                icmp_error(5, 1, &udp_from(61000)),
                false,
            ),
        ],
        "ICMP errors",
    );
}

#[test]
fn claimed_destination_addresses_take_every_packet() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    let lb = Ipv4Addr::new(10, 77, 0, 100);
    let other = Ipv4Addr::new(10, 77, 0, 101);
    let node = Ipv4Addr::new(10, 77, 0, 1);
    att.set_dst_addr(lb, RuleAction::Redirect)
        .expect("claim the LoadBalancer IP");
    let every_kind = |dst: Ipv4Addr| {
        vec![
            ("UDP 53", ipv4_to(dst, IPPROTO_UDP, 0, &udp_header(53))),
            (
                "TCP 80",
                ipv4_to(dst, IPPROTO_TCP, 0, &tcp_header(40000, 80)),
            ),
            (
                "ICMP echo request",
                ipv4_to(dst, IPPROTO_ICMP, 0, &echo(8, 1)),
            ),
            ("GRE", ipv4_to(dst, IPPROTO_GRE, 0, &[0; 8])),
            (
                "first fragment",
                ipv4_to(dst, IPPROTO_UDP, 0x2000, &udp_header(53)),
            ),
            (
                "later fragment",
                ipv4_to(dst, IPPROTO_UDP, 0x0003, &[0xbb; 8]),
            ),
        ]
    };
    let cases = |dst: Ipv4Addr, redirected: bool| -> Vec<(&'static str, Vec<u8>, bool)> {
        every_kind(dst)
            .into_iter()
            .map(|(name, frame)| (name, frame, redirected))
            .collect()
    };
    assert_claims(&pair, &att, &cases(lb, true), "to the claimed address");
    assert_claims(&pair, &att, &cases(other, false), "to another address");
    assert_claims(&pair, &att, &cases(node, false), "to the node address");

    // Reconcile to a new set: `other` joins, `lb` stays; then `lb` goes.
    let mut wanted = BTreeMap::from([(lb, RuleAction::Redirect), (other, RuleAction::Redirect)]);
    att.replace_dst_addrs(&wanted).expect("reconcile");
    assert_eq!(att.dst_addrs(), &wanted);
    assert_claims(&pair, &att, &cases(other, true), "to the added address");
    wanted.remove(&lb);
    att.replace_dst_addrs(&wanted).expect("reconcile");
    assert_claims(&pair, &att, &cases(lb, false), "to the removed address");
    assert_claims(&pair, &att, &cases(other, true), "to the kept address");
    att.remove_dst_addr(other).expect("remove");
    att.remove_dst_addr(other)
        .expect("removing an absent address is Ok");
    assert!(att.dst_addrs().is_empty());
    assert_claims(&pair, &att, &cases(other, false), "after removing");

    // Pass works too: on a redirect-by-default interface, one address stays with the kernel.
    att.set_default(RuleAction::Redirect)
        .expect("default Redirect");
    att.set_dst_addr(node, RuleAction::Pass)
        .expect("Pass the node address");
    assert_claims(
        &pair,
        &att,
        &cases(node, false),
        "Pass address, default Redirect",
    );
    assert_claims(&pair, &att, &cases(lb, true), "default Redirect");
    att.set_default(RuleAction::Pass).expect("default Pass");
    att.remove_dst_addr(node).expect("remove");

    // The map holds MAX_DST_ADDRS addresses; one more is refused by name, nothing changes.
    let full: BTreeMap<Ipv4Addr, RuleAction> = (0..MAX_DST_ADDRS)
        .map(|i| (Ipv4Addr::from(0x0a50_0000 + i), RuleAction::Redirect))
        .collect();
    att.replace_dst_addrs(&full).expect("fill DST_ADDRS");
    let err = att
        .set_dst_addr(Ipv4Addr::new(10, 81, 0, 0), RuleAction::Redirect)
        .expect_err("one address beyond MAX_DST_ADDRS");
    assert!(matches!(err, Error::TooManyDstAddrs { .. }), "{err:?}");
    let mut too_many = full.clone();
    too_many.insert(lb, RuleAction::Redirect);
    let err = att
        .replace_dst_addrs(&too_many)
        .expect_err("a set beyond MAX_DST_ADDRS");
    let msg = err.to_string();
    assert!(
        msg.contains(&pair.if_a) && msg.contains(&(MAX_DST_ADDRS + 1).to_string()),
        "message must name the interface and the count: {msg}"
    );
    assert_eq!(att.dst_addrs(), &full, "a refused replace changed the set");
    assert_claims(
        &pair,
        &att,
        &[
            (
                "UDP to the last of the full set",
                ipv4_to(
                    Ipv4Addr::from(0x0a50_0000 + MAX_DST_ADDRS - 1),
                    IPPROTO_UDP,
                    0,
                    &udp_header(53),
                ),
                true,
            ),
            (
                "UDP to the LB address (refused)",
                ipv4_to(lb, IPPROTO_UDP, 0, &udp_header(53)),
                false,
            ),
        ],
        "full map",
    );
    att.replace_dst_addrs(&BTreeMap::new())
        .expect("empty the map");
    assert!(att.dst_addrs().is_empty());
}

/// A UDP datagram to `port` whose payload starts with WireGuard message type `kind`.
fn wg_message(port: u16, kind: u8) -> Vec<u8> {
    let mut l4 = udp_header(port).to_vec();
    let mut body = vec![0u8; 32];
    body[0] = kind;
    l4[4..6].copy_from_slice(&(8 + body.len() as u16).to_be_bytes());
    l4.extend_from_slice(&body);
    ipv4(IPPROTO_UDP, &l4)
}

#[test]
fn wireguard_transport_goes_to_the_dataplane_and_handshakes_to_the_kernel() {
    require_root!();
    let pair = Pair::new();
    let mut att = uplink(&pair);
    // Off: every message to the port is the kernel's (the uplink's default).
    assert_claims(
        &pair,
        &att,
        &[("transport, not claimed", wg_message(51871, 4), false)],
        "WireGuard off",
    );
    att.set_wireguard_port(51871)
        .expect("claim WireGuard transport");
    // Even a Redirect claim on the port does not take the handshakes from the kernel.
    att.set_port(PortProtocol::Udp, 51871, RuleAction::Redirect)
        .expect("claim UDP 51871");
    assert_claims(
        &pair,
        &att,
        &[
            ("transport data (type 4)", wg_message(51871, 4), true),
            ("handshake initiation (type 1)", wg_message(51871, 1), false),
            ("handshake response (type 2)", wg_message(51871, 2), false),
            ("cookie reply (type 3)", wg_message(51871, 3), false),
            ("empty datagram", udp_to(51871), false),
            ("transport to another port", wg_message(51872, 4), false),
        ],
        "WireGuard on",
    );
    att.set_wireguard_port(0).expect("release");
    att.remove_port(PortProtocol::Udp, 51871)
        .expect("release UDP 51871");
    assert_claims(
        &pair,
        &att,
        &[("transport after release", wg_message(51871, 4), false)],
        "WireGuard off again",
    );
}

// ---------------------------------------------------------------------------------------------
// Host firewall. A is the node (10.77.0.1), B a client outside it. Raw-frame cases run without
// an AF_XDP socket, so "redirected" shows as pass_no_socket as above; the end-to-end test binds
// a real AF_XDP socket on A's queue 0, so that every redirected frame is taken away from the
// kernel and only what the program passes can make a connection work.

const NODE: [u8; 4] = [10, 77, 0, 1];
const CLIENT: [u8; 4] = [10, 77, 0, 2];
/// A cluster node's address (sent as a raw frame's source from B).
const OTHER_NODE: [u8; 4] = [10, 77, 0, 3];

/// An uplink-like attachment with room for host flows.
fn fw_uplink(pair: &Pair) -> Attachment {
    let ifname = pair.if_a.clone();
    let mut att = in_netns(&pair.netns_a, move || {
        Attachment::attach_with(&ifname, &AttachOptions::uplink(false))
    })
    .expect("attach to veth");
    att.set_default(RuleAction::Pass).expect("set default Pass");
    att
}

/// `set_host_firewall` on a thread in A (the TC program is attached by interface name);
/// returns the attachment and the result.
fn set_fw(
    pair: &Pair,
    att: Attachment,
    fw: Option<HostFirewall>,
) -> (Attachment, Result<(), Error>) {
    in_netns(&pair.netns_a, move || {
        let mut att = att;
        let result = att.set_host_firewall(fw.as_ref());
        (att, result)
    })
}

fn firewall(failsafe: Vec<Failsafe>) -> HostFirewall {
    HostFirewall {
        node_addrs: vec![Ipv4Addr::from(NODE)],
        cluster_nodes: vec![Ipv4Addr::from(OTHER_NODE)],
        failsafe,
    }
}

/// A frame from `src` to `dst` (no options) with the flags/fragment-offset field `fragment`.
fn ip_frame(src: [u8; 4], dst: [u8; 4], proto: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    ethernet(
        ETHERTYPE_IPV4,
        &ipv4_packet(src, dst, proto, &[], fragment, l4),
    )
}

fn tcp_from(src: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    ip_frame(src, NODE, IPPROTO_TCP, 0, &tcp_header(src_port, dst_port))
}

fn udp_from(src: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    ip_frame(src, NODE, IPPROTO_UDP, 0, &udp_ports(src_port, dst_port))
}

fn icmp_from(src: [u8; 4], icmp_type: u8, id: u16) -> Vec<u8> {
    ip_frame(src, NODE, IPPROTO_ICMP, 0, &echo(icmp_type, id))
}

/// Sends each `(name, frame, action)` alone and checks that exactly that one frame was counted
/// under `action`.
fn assert_actions(pair: &Pair, att: &Attachment, cases: &[(&str, Vec<u8>, Action)], when: &str) {
    for (name, frame, action) in cases {
        assert_counts(
            classify(pair, att, std::slice::from_ref(frame)),
            expect_counts(&[(*action, 1)]),
            &format!("{when}: {name} should count as {}", action.as_str()),
        );
    }
}

#[test]
fn host_firewall_decides_unclaimed_traffic_to_the_node() {
    require_root!();
    let pair = Pair::new();
    let att = fw_uplink(&pair);
    use Action::{
        PassFailsafe as Failsafe_, PassHostFlow as Flow, PassIcmpError as IcmpErr,
        PassNoSocket as Redirected, PassRule as Rule,
    };
    let failsafe = vec![
        Failsafe::tcp(22..=22),
        Failsafe::tcp(50000..=50001),
        Failsafe::udp(8472..=8472).from_nodes_only(),
        Failsafe {
            proto: IPPROTO_ICMP,
            ports: 8..=8,
            nodes_only: true,
        },
    ];
    let everything = |when: &str| -> Vec<(String, Vec<u8>)> {
        vec![
            ("TCP 22".into(), tcp_from(CLIENT, 40000, 22)),
            ("TCP 23".into(), tcp_from(CLIENT, 40000, 23)),
            (format!("{when} ICMP unreachable"), {
                let quoted = sent_by_a(IPPROTO_UDP, &[], 0, &udp_ports(5353, 53));
                icmp_error(3, 3, &quoted)
            }),
        ]
    };
    // (e) Off: the old behaviour, everything to the node address passes by the default.
    for (name, frame) in everything("off") {
        assert_counts(
            classify(&pair, &att, &[frame]),
            expect_counts(&[(Rule, 1)]),
            &format!("firewall off: {name}"),
        );
    }
    let (mut att, result) = set_fw(&pair, att, Some(firewall(failsafe.clone())));
    result.expect("host firewall on");
    assert!(att.host_firewall_on());
    let quoting = sent_by_a(IPPROTO_TCP, &[], 0, &tcp_header(40000, 443));
    assert_actions(
        &pair,
        &att,
        &[
            // (a)/(b) Failsafe ports pass, the rest is redirected.
            ("TCP 22", tcp_from(CLIENT, 40000, 22), Failsafe_),
            ("TCP 50000", tcp_from(CLIENT, 40000, 50000), Failsafe_),
            ("TCP 50001", tcp_from(CLIENT, 40000, 50001), Failsafe_),
            ("TCP 50002", tcp_from(CLIENT, 40000, 50002), Redirected),
            ("TCP 23", tcp_from(CLIENT, 40000, 23), Redirected),
            (
                "UDP 22 (failsafe is TCP only)",
                udp_from(CLIENT, 40000, 22),
                Redirected,
            ),
            // (c) Nodes only: from a cluster node it passes, from anyone else it is redirected.
            (
                "UDP 8472 from a non-node",
                udp_from(CLIENT, 40000, 8472),
                Redirected,
            ),
            (
                "UDP 8472 from a node",
                udp_from(OTHER_NODE, 40000, 8472),
                Failsafe_,
            ),
            (
                "echo request from a non-node",
                icmp_from(CLIENT, 8, 7),
                Redirected,
            ),
            (
                "echo request from a node",
                icmp_from(OTHER_NODE, 8, 7),
                Failsafe_,
            ),
            // ICMP errors for the kernel's own connections.
            ("unreachable", icmp_error(3, 4, &quoting), IcmpErr),
            ("source quench", icmp_error(4, 0, &quoting), IcmpErr),
            ("redirect", icmp_error(5, 1, &quoting), IcmpErr),
            ("time exceeded", icmp_error(11, 0, &quoting), IcmpErr),
            ("parameter problem", icmp_error(12, 0, &quoting), IcmpErr),
            (
                "echo reply of no flow",
                icmp_from(CLIENT, 0, 99),
                Redirected,
            ),
            // Fragments are redirected, even those of a failsafe port.
            (
                "first fragment to TCP 22",
                ip_frame(CLIENT, NODE, IPPROTO_TCP, 0x2000, &tcp_header(40000, 22)),
                Redirected,
            ),
            (
                "later fragment",
                ip_frame(CLIENT, NODE, IPPROTO_UDP, 0x0003, &[0xbb; 8]),
                Redirected,
            ),
            (
                "GRE",
                ip_frame(CLIENT, NODE, IPPROTO_GRE, 0, &[0; 8]),
                Redirected,
            ),
            // Not a node address: the default as before.
            (
                "TCP 23 to another address",
                ip_frame(
                    CLIENT,
                    [10, 77, 0, 50],
                    IPPROTO_TCP,
                    0,
                    &tcp_header(40000, 23),
                ),
                Rule,
            ),
        ],
        "firewall on",
    );

    // Every existing rule keeps its precedence over the firewall.
    att.set_port(PortProtocol::Tcp, 22, RuleAction::Redirect)
        .expect("claim TCP 22");
    att.set_rule(PassKey::ipv4(IPPROTO_TCP, 23), RuleAction::Pass)
        .expect("RULES TCP 23 Pass");
    att.set_rule(PassKey::ipv4(IPPROTO_GRE, 0), RuleAction::Pass)
        .expect("RULES GRE Pass");
    att.set_port(PortProtocol::IcmpEchoId, 99, RuleAction::Pass)
        .expect("ICMP id 99 Pass");
    assert_actions(
        &pair,
        &att,
        &[
            (
                "TCP 22 claimed by a port entry",
                tcp_from(CLIENT, 40000, 22),
                Redirected,
            ),
            ("TCP 23 passed by RULES", tcp_from(CLIENT, 40000, 23), Rule),
            (
                "GRE passed by RULES",
                ip_frame(CLIENT, NODE, IPPROTO_GRE, 0, &[0; 8]),
                Rule,
            ),
            (
                "echo reply id 99 passed by its port entry",
                icmp_from(CLIENT, 0, 99),
                Rule,
            ),
        ],
        "claims before the firewall",
    );
    att.set_dst_addr(Ipv4Addr::from(NODE), RuleAction::Pass)
        .expect("DST_ADDRS node Pass");
    assert_actions(
        &pair,
        &att,
        &[(
            "TCP 24 with DST_ADDRS Pass",
            tcp_from(CLIENT, 40000, 24),
            Rule,
        )],
        "DST_ADDRS before the firewall",
    );
    att.remove_dst_addr(Ipv4Addr::from(NODE)).expect("remove");
    att.clear_ports(PortProtocol::Tcp).expect("clear");
    att.clear_ports(PortProtocol::IcmpEchoId).expect("clear");
    att.remove_rule(&PassKey::ipv4(IPPROTO_TCP, 23))
        .expect("remove");
    att.remove_rule(&PassKey::ipv4(IPPROTO_GRE, 0))
        .expect("remove");

    // (d) Flows the node sent: TCP and UDP by (source, source port, destination port), echo
    // replies by (source, identifier).
    let client = Ipv4Addr::from(CLIENT);
    let flow = |proto, remote_port, local_port, node_opened| HostFlow {
        proto,
        remote_addr: client,
        remote_port,
        local_port,
        node_opened,
    };
    att.add_host_flows(&[
        flow(IPPROTO_TCP, 443, 40000, true),
        flow(IPPROTO_UDP, 53, 40001, false),
        flow(IPPROTO_ICMP, 0, 99, true),
    ])
    .expect("add flows");
    assert_actions(
        &pair,
        &att,
        &[
            ("TCP reply", tcp_from(CLIENT, 443, 40000), Flow),
            (
                "TCP from another port",
                tcp_from(CLIENT, 444, 40000),
                Redirected,
            ),
            (
                "TCP to another port",
                tcp_from(CLIENT, 443, 40002),
                Redirected,
            ),
            (
                "TCP from another host",
                tcp_from(OTHER_NODE, 443, 40000),
                Redirected,
            ),
            (
                "UDP with the TCP flow's ports",
                udp_from(CLIENT, 443, 40000),
                Redirected,
            ),
            ("UDP reply", udp_from(CLIENT, 53, 40001), Flow),
            ("echo reply id 99", icmp_from(CLIENT, 0, 99), Flow),
            ("echo reply id 98", icmp_from(CLIENT, 0, 98), Redirected),
        ],
        "node flows",
    );
    // Timeouts: a UDP flow last seen 181 s ago is over, one seen 170 s ago is not.
    let now = xdp_redirect::monotonic_ns();
    let secs = |s: u64| s * 1_000_000_000;
    if now > secs(3600) {
        att.add_host_flows_at(&[flow(IPPROTO_UDP, 53, 41000, false)], now - secs(181))
            .expect("add an old flow");
        att.add_host_flows_at(&[flow(IPPROTO_UDP, 53, 41001, false)], now - secs(170))
            .expect("add a recent flow");
        att.add_host_flows_at(&[flow(IPPROTO_TCP, 443, 41002, true)], now - secs(181))
            .expect("add a TCP flow");
        assert_actions(
            &pair,
            &att,
            &[
                (
                    "UDP flow idle 181 s",
                    udp_from(CLIENT, 53, 41000),
                    Redirected,
                ),
                ("UDP flow idle 170 s", udp_from(CLIENT, 53, 41001), Flow),
                (
                    "TCP flow idle 181 s (2 h timeout)",
                    tcp_from(CLIENT, 443, 41002),
                    Flow,
                ),
            ],
            "flow timeouts",
        );
    } else {
        eprintln!("skipping the timeout cases: the machine has been up for less than an hour");
    }
    // After a policy change, flows the node did not open go back through the workers.
    let removed = att.clear_host_flows().expect("clear flows");
    assert!(removed >= 1, "the UDP flow must be removed ({removed})");
    assert_actions(
        &pair,
        &att,
        &[
            (
                "UDP reply after clearing",
                udp_from(CLIENT, 53, 40001),
                Redirected,
            ),
            (
                "TCP reply of a node-opened flow",
                tcp_from(CLIENT, 443, 40000),
                Flow,
            ),
        ],
        "after clear_host_flows",
    );

    // Reconfiguring: a changed failsafe list and node set apply without turning off.
    let (att, result) = set_fw(
        &pair,
        att,
        Some(HostFirewall {
            node_addrs: vec![Ipv4Addr::from(NODE)],
            cluster_nodes: vec![client],
            failsafe: vec![Failsafe::udp(8472..=8472).from_nodes_only()],
        }),
    );
    result.expect("reconfigure");
    assert_actions(
        &pair,
        &att,
        &[
            (
                "TCP 22 no longer failsafe",
                tcp_from(CLIENT, 40000, 22),
                Redirected,
            ),
            (
                "UDP 8472 from the new node",
                udp_from(CLIENT, 40000, 8472),
                Failsafe_,
            ),
            (
                "UDP 8472 from a former node",
                udp_from(OTHER_NODE, 40000, 8472),
                Redirected,
            ),
        ],
        "reconfigured",
    );

    // (e) Off again: the old behaviour, and no flow is left behind.
    let (att, result) = set_fw(&pair, att, None);
    result.expect("host firewall off");
    assert!(!att.host_firewall_on());
    assert!(
        att.host_flows().expect("read flows").is_empty(),
        "turning off empties HOST_FLOWS"
    );
    for (name, frame) in everything("off again") {
        assert_counts(
            classify(&pair, &att, &[frame]),
            expect_counts(&[(Rule, 1)]),
            &format!("firewall off again: {name}"),
        );
    }
}

#[test]
fn host_firewall_refuses_bad_configuration_by_name() {
    require_root!();
    let pair = Pair::new();
    // A pod-sized attachment has no room for host flows.
    let att = pair.attach().expect("attach");
    let (att, result) = set_fw(&pair, att, Some(firewall(vec![])));
    let err = result.expect_err("a one-entry HOST_FLOWS map");
    assert!(matches!(err, Error::HostFlowsTooSmall { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&pair.if_a) && err.to_string().contains("attach_with"),
        "{err}"
    );
    assert!(!att.host_firewall_on());
    drop(att);

    let att = fw_uplink(&pair);
    let too_many = HostFirewall {
        node_addrs: (0..=MAX_HOST_ADDRS)
            .map(|i| Ipv4Addr::from(0x0a4e_0000 + i))
            .collect(),
        ..HostFirewall::default()
    };
    let (att, result) = set_fw(&pair, att, Some(too_many));
    let err = result.expect_err("more node addresses than HOST_ADDRS holds");
    assert!(
        matches!(
            err,
            Error::TooManyHostFirewallAddrs {
                map: "HOST_ADDRS",
                ..
            }
        ),
        "{err:?}"
    );
    let bad = firewall(vec![Failsafe {
        proto: IPPROTO_GRE,
        ports: 0..=0,
        nodes_only: false,
    }]);
    let (att, result) = set_fw(&pair, att, Some(bad));
    let err = result.expect_err("GRE failsafe");
    assert!(
        matches!(err, Error::FailsafeProtocol { index: 0, .. }),
        "{err:?}"
    );
    assert!(
        !att.host_firewall_on(),
        "a refused configuration changed the flag"
    );
    // Nothing changed: traffic to the node still passes by the default.
    assert_actions(
        &pair,
        &att,
        &[("TCP 23", tcp_from(CLIENT, 40000, 23), Action::PassRule)],
        "after refused configurations",
    );
    // Called from a namespace where the interface does not exist: refused by name.
    let mut att = att;
    let err = att
        .set_host_firewall(Some(&firewall(vec![])))
        .expect_err("the test thread is not in A");
    assert!(matches!(err, Error::WrongNamespace { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// A minimal AF_XDP socket (copy mode, RX ring only): takes the frames the program redirects
// away from the kernel, and lets the test look at them.

const XSK_FRAMES: u32 = 64;
const XSK_FRAME_SIZE: u32 = 4096;

struct Xsk {
    fd: OwnedFd,
    umem: *mut libc::c_void,
    rx_map: *mut libc::c_void,
    rx_len: usize,
    rx_off: libc::xdp_ring_offset,
    fill_map: *mut libc::c_void,
    fill_len: usize,
    fill_off: libc::xdp_ring_offset,
}

// SAFETY: the mappings belong to this value alone and are only touched through `&mut self` (or
// in drop); the kernel side of the rings is synchronised by the producer/consumer atomics.
unsafe impl Send for Xsk {}

fn sockopt<T>(fd: &OwnedFd, name: libc::c_int, value: &T, what: &str) {
    // SAFETY: value points to a valid T of the given size for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "AF_XDP {what}: {}", std::io::Error::last_os_error());
}

fn map_ring(fd: &OwnedFd, len: usize, offset: libc::off_t, what: &str) -> *mut libc::c_void {
    // SAFETY: mapping a ring of the socket at the offset the kernel defines for it; the result
    // is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            offset,
        )
    };
    assert!(
        p != libc::MAP_FAILED,
        "mmap {what}: {}",
        std::io::Error::last_os_error()
    );
    p
}

impl Xsk {
    /// Binds to queue 0 of `ifname` in the calling thread's namespace, with every UMEM frame in
    /// the fill ring.
    fn bind(ifname: &str) -> Xsk {
        let ifindex = xdp_redirect::ifindex(ifname).expect("interface exists");
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            raw >= 0,
            "AF_XDP socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem_len = (XSK_FRAMES * XSK_FRAME_SIZE) as usize;
        // SAFETY: an anonymous private mapping; checked below.
        let umem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(umem != libc::MAP_FAILED, "mmap UMEM");
        let reg = libc::xdp_umem_reg {
            addr: umem as u64,
            len: umem_len as u64,
            chunk_size: XSK_FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        sockopt(&fd, libc::XDP_UMEM_REG, &reg, "UMEM_REG");
        sockopt(&fd, libc::XDP_UMEM_FILL_RING, &XSK_FRAMES, "fill ring");
        sockopt(
            &fd,
            libc::XDP_UMEM_COMPLETION_RING,
            &XSK_FRAMES,
            "completion ring",
        );
        sockopt(&fd, libc::XDP_RX_RING, &XSK_FRAMES, "rx ring");
        // SAFETY: xdp_mmap_offsets is plain data.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: off and len are valid for writing for the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                std::ptr::from_mut(&mut off).cast(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "XDP_MMAP_OFFSETS: {}",
            std::io::Error::last_os_error()
        );
        let rx_len =
            off.rx.desc as usize + XSK_FRAMES as usize * std::mem::size_of::<libc::xdp_desc>();
        let rx_map = map_ring(&fd, rx_len, libc::XDP_PGOFF_RX_RING, "rx ring");
        let fill_len = off.fr.desc as usize + XSK_FRAMES as usize * 8;
        let fill_map = map_ring(
            &fd,
            fill_len,
            libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            "fill ring",
        );
        let mut xsk = Xsk {
            fd,
            umem,
            rx_map,
            rx_len,
            rx_off: off.rx,
            fill_map,
            fill_len,
            fill_off: off.fr,
        };
        for i in 0..XSK_FRAMES {
            xsk.give_frame(u64::from(i * XSK_FRAME_SIZE));
        }
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: 0,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: addr is a valid sockaddr_xdp of the given size.
        let rc = unsafe {
            libc::bind(
                xsk.fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind AF_XDP to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        xsk
    }

    fn counter(map: *mut libc::c_void, offset: u64) -> &'static AtomicU32 {
        // SAFETY: offset is the kernel's offset of a u32 ring index inside the mapping, which
        // lives as long as the Xsk (callers do not keep the reference beyond a method call).
        unsafe { &*map.cast::<u8>().add(offset as usize).cast::<AtomicU32>() }
    }

    /// Puts the frame at `addr` into the fill ring (it never holds more than XSK_FRAMES).
    fn give_frame(&mut self, addr: u64) {
        let producer = Self::counter(self.fill_map, self.fill_off.producer);
        let at = producer.load(Ordering::Relaxed);
        let slot = (at % XSK_FRAMES) as usize;
        // SAFETY: slot < XSK_FRAMES u64 descriptors follow fill_off.desc in the mapping.
        unsafe {
            self.fill_map
                .cast::<u8>()
                .add(self.fill_off.desc as usize)
                .cast::<u64>()
                .add(slot)
                .write(addr);
        }
        producer.store(at.wrapping_add(1), Ordering::Release);
    }

    /// Every frame received so far (the frames go back to the fill ring).
    fn take_frames(&mut self) -> Vec<Vec<u8>> {
        let producer = Self::counter(self.rx_map, self.rx_off.producer).load(Ordering::Acquire);
        let consumer = Self::counter(self.rx_map, self.rx_off.consumer);
        let mut at = consumer.load(Ordering::Relaxed);
        let mut frames = Vec::new();
        while at != producer {
            let slot = (at % XSK_FRAMES) as usize;
            // SAFETY: slot < XSK_FRAMES descriptors follow rx_off.desc in the mapping; the
            // producer's release store made this one visible.
            let desc = unsafe {
                self.rx_map
                    .cast::<u8>()
                    .add(self.rx_off.desc as usize)
                    .cast::<libc::xdp_desc>()
                    .add(slot)
                    .read()
            };
            let end = desc.addr as usize + desc.len as usize;
            assert!(
                end <= (XSK_FRAMES * XSK_FRAME_SIZE) as usize,
                "descriptor beyond UMEM"
            );
            // SAFETY: addr..addr+len lies inside the UMEM (checked above), written by the kernel
            // before it published the descriptor.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    self.umem.cast::<u8>().add(desc.addr as usize),
                    desc.len as usize,
                )
            };
            frames.push(bytes.to_vec());
            at = at.wrapping_add(1);
            consumer.store(at, Ordering::Release);
            self.give_frame(desc.addr - desc.addr % u64::from(XSK_FRAME_SIZE));
        }
        frames
    }
}

impl Drop for Xsk {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mappings made in bind; nothing refers to them after.
        unsafe {
            libc::munmap(self.rx_map, self.rx_len);
            libc::munmap(self.fill_map, self.fill_len);
            libc::munmap(self.umem, (XSK_FRAMES * XSK_FRAME_SIZE) as usize);
        }
    }
}

/// (protocol, source port, destination port, TCP flags) of an IPv4 TCP/UDP frame.
fn l4_summary(frame: &[u8]) -> Option<(u8, u16, u16, u8)> {
    if frame.len() < 34 || frame[12..14] != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = frame.get(14 + ihl..)?;
    let proto = frame[23];
    if l4.len() < 4 {
        return None;
    }
    let flags = if proto == IPPROTO_TCP {
        *l4.get(13)?
    } else {
        0
    };
    Some((
        proto,
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
        flags,
    ))
}

// ---------------------------------------------------------------------------------------------
// Real sockets in the namespaces.

/// Accepts one connection on `listener` (within the time limit), echoes what it reads once.
fn echo_once(listener: TcpListener) -> thread::JoinHandle<bool> {
    thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return false,
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).is_ok() && stream.write_all(&buf).is_ok()
    })
}

/// Connects to `addr` from a thread in `netns`, sends 4 bytes and reads them back.
fn tcp_round_trip(netns: &str, addr: &str, timeout: Duration) -> std::io::Result<[u8; 4]> {
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf)
    })
}

fn listen_in(netns: &str, addr: &str) -> TcpListener {
    let addr = addr.to_string();
    in_netns(netns, move || TcpListener::bind(&addr)).expect("listen")
}

/// Names of the TCX egress programs on `ifname` in `netns` (queried from the kernel; Debian's
/// bpftool 7.1 does not show TCX links).
fn tc_egress_programs(netns: &str, ifname: &str) -> Vec<String> {
    let name = ifname.to_string();
    in_netns(netns, move || {
        aya::programs::SchedClassifier::query_tcx(&name, aya::programs::TcAttachType::Egress)
            .map(|(_, programs)| {
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_string())
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("querying TCX egress programs of {ifname}: {e}"))
}

#[test]
fn host_firewall_end_to_end_with_an_af_xdp_socket_taking_redirected_frames() {
    require_root!();
    let pair = Pair::new();
    let mut att = fw_uplink(&pair);
    let ifname = pair.if_a.clone();
    let mut xsk = in_netns(&pair.netns_a, move || Xsk::bind(&ifname));
    att.register_socket(0, xsk.fd.as_fd())
        .expect("register the AF_XDP socket");
    let node = ADDR_A.to_string();
    let fw = firewall(vec![Failsafe::tcp(2222..=2222)]);
    // A connection the node opened before the firewall was on (kubelet's watch, say).
    let early_listener = listen_in(&pair.netns_b, &format!("{ADDR_B}:8081"));
    let early_peer: std::net::SocketAddr = format!("{ADDR_B}:8081").parse().expect("address");
    let mut early_client = in_netns(&pair.netns_a, move || {
        TcpStream::connect_timeout(&early_peer, Duration::from_secs(3))
    })
    .expect("connect before the firewall is on");
    early_listener.set_nonblocking(true).expect("nonblocking");
    let accept_deadline = Instant::now() + Duration::from_secs(5);
    let mut early_server = loop {
        match early_listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < accept_deadline, "accept timed out");
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let (att, result) = set_fw(&pair, att, Some(fw.clone()));
    result.expect("host firewall on");
    let early_port = early_client.local_addr().expect("local address").port();
    let seeded = att.host_flows().expect("read flows");
    assert!(
        seeded.iter().any(|(f, _)| f.proto == IPPROTO_TCP
            && f.remote_port == 8081
            && f.local_port == early_port
            && f.node_opened),
        "the node's open connection was not seeded into HOST_FLOWS: {seeded:?}"
    );
    // The server speaks first: only the seeded flow lets its data in (the node has sent
    // nothing since the firewall went on).
    early_server.set_nonblocking(false).expect("blocking");
    early_server.write_all(b"push").expect("server push");
    early_client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut pushed = [0u8; 4];
    early_client
        .read_exact(&mut pushed)
        .expect("data on a connection opened before the firewall went on");
    assert_eq!(&pushed, b"push");
    drop((early_client, early_server, early_listener));
    let tc = || tc_egress_programs(&pair.netns_a, &pair.if_a);
    assert_eq!(
        tc(),
        ["host_flows"],
        "the TC egress program after turning on"
    );
    let c = |att: &Attachment| counters(att);

    // (a) A failsafe port: the connection reaches the node's listening socket.
    let before = c(&att);
    let server = echo_once(listen_in(&pair.netns_a, &format!("{node}:2222")));
    let got = tcp_round_trip(
        &pair.netns_b,
        &format!("{node}:2222"),
        Duration::from_secs(3),
    );
    assert_eq!(got.expect("connection to the failsafe port"), *b"ping");
    assert!(
        server.join().expect("server thread"),
        "server side of the failsafe connection"
    );
    let d = delta(&before, &c(&att));
    assert!(d[Action::PassFailsafe as usize] >= 3, "{}", show(&d));

    // (b) A port that is not failsafe: the SYN goes to the AF_XDP socket, never to the
    // listening socket, and the connection fails.
    let _ = xsk.take_frames();
    let before = c(&att);
    let listener_2223 = listen_in(&pair.netns_a, &format!("{node}:2223"));
    let got = tcp_round_trip(
        &pair.netns_b,
        &format!("{node}:2223"),
        Duration::from_secs(1),
    );
    assert!(
        got.is_err(),
        "a connection to a non-failsafe port worked: {got:?}"
    );
    let d = delta(&before, &c(&att));
    assert!(d[Action::Redirected as usize] >= 1, "{}", show(&d));
    let frames = xsk.take_frames();
    assert!(
        frames.iter().any(
            |f| matches!(l4_summary(f), Some((IPPROTO_TCP, _, 2223, flags)) if flags & 0x02 != 0)
        ),
        "no SYN to port 2223 on the AF_XDP socket ({} frames)",
        frames.len()
    );

    // (d) Connections the node opens get their replies (TC flow -> XDP_PASS): TCP, UDP, ping.
    let before = c(&att);
    let server = echo_once(listen_in(&pair.netns_b, &format!("{ADDR_B}:8080")));
    let got = tcp_round_trip(
        &pair.netns_a,
        &format!("{ADDR_B}:8080"),
        Duration::from_secs(3),
    );
    assert_eq!(got.expect("node-opened TCP connection"), *b"ping");
    assert!(server.join().expect("server thread"));
    let peer = format!("{ADDR_B}:5353");
    let udp_server = in_netns(&pair.netns_b, {
        let peer = peer.clone();
        move || UdpSocket::bind(peer)
    })
    .expect("bind UDP in B");
    let echo = thread::spawn(move || {
        udp_server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        match udp_server.recv_from(&mut buf) {
            Ok((n, from)) => udp_server.send_to(&buf[..n], from).is_ok(),
            Err(_) => false,
        }
    });
    let udp_reply = in_netns(&pair.netns_a, {
        let peer = peer.clone();
        move || -> std::io::Result<Vec<u8>> {
            let s = UdpSocket::bind(format!("{ADDR_A}:0"))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(b"dns?", &peer)?;
            let mut buf = [0u8; 16];
            let n = s.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        }
    });
    assert_eq!(udp_reply.expect("node-opened UDP flow"), b"dns?");
    assert!(echo.join().expect("UDP echo thread"));
    let ping = run(
        "ip",
        &[
            "netns",
            "exec",
            &pair.netns_a,
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-w",
            "10",
            ADDR_B,
        ],
    );
    assert!(
        ping.status.success(),
        "ping from the node with the firewall on: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let d = delta(&before, &c(&att));
    assert!(
        d[Action::PassHostFlow as usize] >= 2 + 1 + 2,
        "SYN-ACK and data, the UDP reply, 2 echo replies: {}",
        show(&d)
    );
    let flows = att.host_flows().expect("read flows");
    let b = Ipv4Addr::from(CLIENT);
    assert!(
        flows.iter().any(|(f, _)| f.proto == IPPROTO_TCP
            && f.remote_addr == b
            && f.remote_port == 8080
            && f.node_opened),
        "no node-opened TCP flow to {ADDR_B}:8080 in {flows:?}"
    );
    assert!(
        flows
            .iter()
            .any(|(f, _)| f.proto == IPPROTO_UDP && f.remote_port == 5353),
        "no UDP flow in {flows:?}"
    );
    assert!(
        flows
            .iter()
            .any(|(f, _)| f.proto == IPPROTO_ICMP && f.node_opened),
        "no echo flow in {flows:?}"
    );
    let stray: Vec<_> = xsk
        .take_frames()
        .iter()
        .filter_map(|f| l4_summary(f))
        .filter(|&(_, src, _, _)| src == 8080 || src == 5353)
        .collect();
    assert!(
        stray.is_empty(),
        "replies of node flows were redirected: {stray:?}"
    );

    // (e) Off: the old behaviour (default Pass), the TC program is gone.
    let (att, result) = set_fw(&pair, att, None);
    result.expect("host firewall off");
    let server = echo_once(listener_2223);
    let got = tcp_round_trip(
        &pair.netns_b,
        &format!("{node}:2223"),
        Duration::from_secs(3),
    );
    assert_eq!(got.expect("port 2223 with the firewall off"), *b"ping");
    assert!(server.join().expect("server thread"));
    assert!(
        tc().is_empty(),
        "the TC program is still attached after turning the firewall off"
    );
    let flows_before = att.host_flows().expect("flows").len();
    assert_eq!(flows_before, 0, "turning off empties HOST_FLOWS");

    // On again, then dropped: the TC program goes with the Attachment.
    let (att, result) = set_fw(&pair, att, Some(fw));
    result.expect("host firewall on again");
    assert_eq!(
        tc(),
        ["host_flows"],
        "the TC program after turning on again"
    );
    drop(att);
    assert!(tc().is_empty(), "the TC program outlived its Attachment");
    assert!(
        !pair.link_details().contains("prog/xdp"),
        "the XDP program outlived its Attachment"
    );
    drop(xsk);
}

#[test]
fn a_handed_over_attachment_keeps_the_program_attached_with_its_maps() {
    require_root!();
    let pair = Pair::new();
    let mut old = pair.attach().expect("attach to veth");
    old.set_default(RuleAction::Pass).expect("default");
    old.set_port(PortProtocol::Udp, 8472, RuleAction::Redirect)
        .expect("claim a port");
    old.set_dst_addr(Ipv4Addr::new(10, 0, 9, 9), RuleAction::Redirect)
        .expect("claim an address");
    let (meta, fds) = old.handover().expect("handover");
    assert_eq!(meta.ifname, pair.if_a);
    assert_eq!(fds.len(), xdp_redirect::MAP_NAMES.len() + 1);
    // What another process receives over SCM_RIGHTS: its own fds for the same kernel objects.
    let owned: Vec<_> = fds
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let prog_id = |d: &str| {
        d.split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    };
    let before = prog_id(&pair.link_details()).expect("attached");
    drop(old);
    let mut new = pair.adopt(meta, owned).expect("adopt");
    assert_eq!(
        prog_id(&pair.link_details()).as_deref(),
        Some(before.as_str()),
        "the same program stays attached when the first owner is gone"
    );
    assert_eq!(
        new.ports(PortProtocol::Udp).get(8472),
        Some(RuleAction::Redirect),
        "claims are read back from the map"
    );
    assert_eq!(
        new.dst_addrs().get(&Ipv4Addr::new(10, 0, 9, 9)),
        Some(&RuleAction::Redirect)
    );
    // The adopted maps are the live ones: the program still passes by default, and a claim
    // removed through them is gone from the kernel's table (re-read by another adoption).
    new.remove_port(PortProtocol::Udp, 8472).expect("unclaim");
    let (meta2, fds2) = new.handover().expect("handover again");
    let owned2: Vec<_> = fds2
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let third = pair.adopt(meta2, owned2).expect("adopt again");
    assert_eq!(third.ports(PortProtocol::Udp).get(8472), None);
    drop(new);
    drop(third);
    assert!(
        !pair.link_details().contains("prog/xdp"),
        "the program is detached once the last holder of its link is gone"
    );
}

#[test]
fn a_takeover_with_the_wrong_fds_is_refused_by_name() {
    require_root!();
    let pair = Pair::new();
    let old = pair.attach().expect("attach");
    let (meta, fds) = old.handover().expect("handover");
    let short: Vec<_> = fds[..3]
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let err = pair
        .adopt(meta.clone(), short)
        .expect_err("3 fds are not enough");
    assert!(err.to_string().contains(&pair.if_a), "{err}");
    let mut moved = meta;
    moved.ifindex += 1000;
    let all: Vec<_> = fds
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let err = pair.adopt(moved, all).expect_err("another interface index");
    assert!(err.to_string().contains("no longer"), "{err}");
}
