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
//! Root only: every test but the unknown-interface one prints "skipping: needs root" otherwise.
//! Every command runs with a time limit, every wait is bounded.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use xdp_redirect::{Action, AttachMode, Attachment, Error, PassKey, RuleAction, MAX_QUEUES};

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
const IPPROTO_UDP: u8 = 17;

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
    h[12..16].copy_from_slice(&[10, 77, 0, 2]);
    h[16..20].copy_from_slice(&[10, 77, 0, 1]);
    h.extend_from_slice(options);
    let sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
    h.extend_from_slice(l4);
    ethernet(ETHERTYPE_IPV4, &h)
}

/// A UDP header (no payload) to `port`.
fn udp_header(port: u16) -> [u8; 8] {
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&8u16.to_be_bytes());
    udp
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
