//! Privileged tests of the AF_XDP layer and the workers on real veth pairs: frame ownership
//! (every UMEM frame comes back when its port goes), forwarding between two ports, one worker per
//! queue, and ring-size validation.
//!
//! ```text
//!  frames_all_come_back_after_port_removal, two_workers_each_own_their_queue:
//!    netns A (worker, XDP)                 netns B
//!    [xwA..]  <-------------- veth -------- [xwB..]   raw frames (AF_PACKET)
//!
//!  forwarding_between_two_ports_moves_frames_without_loss:
//!    netns P0                 netns N (worker, XDP on both)             netns P1
//!    [p0 10.78.0.2/32] --veth-- [l0] --AF_XDP-- worker --AF_XDP-- [l1] --veth-- [p1 10.78.0.3/32]
//!    default via 10.78.0.1 (the gateway the dataplane answers ARP and echo for)
//! ```
//!
//! AF_XDP sockets bind to an interface of the calling thread's network namespace, and the
//! *worker* thread creates them: [`Dataplane::start`] runs on a thread that has `setns`-ed into
//! the namespace holding the interfaces, so the workers it spawns inherit it. The XDP program is
//! attached the same way. Sockets used to send test traffic are created inside their namespace
//! and then used from the test thread (a socket keeps the namespace it was made in).
//!
//! Every namespace and interface name carries the pid and a counter; [`Namespaces`] deletes them
//! on drop, panic included. Every command and every wait is bounded in time. IPv6 is off in every
//! namespace so no router solicitations or MLD reports disturb exact counts.
//!
//! Root only: the tests print "skipping: needs root" otherwise (ring-size validation needs no
//! root and always runs).
use std::{
    fs::File,
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use dataplane::wire::Mac;
use dataplane::{
    runtime::{Dataplane, DataplaneConfig, RuntimeError, WorkerReport},
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, SnapshotBuilder},
    worker::{PortInfo, PortKind},
    xsk::{BindMode, RingSizes, UmemConfig},
    DropReason,
};
use xdp_redirect::Attachment;

mod common;

/// Any command we run (ip, ping, ethtool) must finish within this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A thread moved into a namespace must finish its work within this.
const NETNS_THREAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long worker counters may take to show frames we sent.
const COUNTER_WAIT: Duration = Duration::from_secs(5);
/// After the expected count is reached, wait this long for unexpected extra frames.
const COUNTER_SETTLE: Duration = Duration::from_millis(100);
/// Between unregistering a socket from the XSKMAP and removing the port: in-flight redirects end.
const UNREGISTER_GRACE: Duration = Duration::from_millis(20);

/// Frames per worker UMEM: small, so a leak of even a few frames shows.
const UMEM_FRAMES: u32 = 256;
/// Every ring: the fill ring then holds at most 64 frames per port, a quarter of the UMEM.
const RING_SIZE: u32 = 64;
/// Frames sent before waiting for the worker to have taken them all (well below `RING_SIZE`, so
/// neither the rx nor the fill ring can run short and the counts stay exact).
const SEND_BATCH: usize = 16;

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

fn config(workers: usize) -> DataplaneConfig {
    DataplaneConfig {
        workers,
        cores: None,
        umem: UmemConfig {
            frames: UMEM_FRAMES,
            frame_size: 4096,
            headroom: 256,
            hugepages: false,
        },
        rings: RingSizes {
            rx: RING_SIZE,
            tx: RING_SIZE,
            fill: RING_SIZE,
            completion: RING_SIZE,
        },
        batch: 16,
        conntrack_capacity: 1 << 12,
        affinity_entries: 1 << 10,
        timeouts: Default::default(),
        idle_spin: Duration::from_micros(50),
        idle_poll_ms: 10,
    }
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

/// Runs `program args`, panicking with its stderr if it fails; returns its stdout.
fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    must("ip", args)
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// Network namespaces created by one test, deleted on drop (with every interface in them).
/// Declared before anything that lives in them, so it is dropped last.
struct Namespaces {
    names: Vec<String>,
    /// pid + counter: makes every name unique.
    tag: String,
}

impl Namespaces {
    fn new() -> Self {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self {
            names: Vec::new(),
            tag: format!("{pid}n{n}"),
        }
    }

    /// Creates namespace `xw-TAG-suffix` (loopback up, IPv6 off) and returns its name.
    fn add(&mut self, suffix: &str) -> String {
        let name = format!("xw-{}-{suffix}", self.tag);
        // Registered before it exists: a failure below still cleans up.
        self.names.push(name.clone());
        ip(&["netns", "add", &name]);
        must(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// An interface name unique to this test: `xw` + `prefix` + tag, within IFNAMSIZ - 1.
    fn ifname(&self, prefix: &str) -> String {
        let name = format!("{prefix}{}", self.tag);
        assert!(name.len() <= 15, "interface name {name} too long");
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for netns in &self.names {
            // Best effort, no panic in drop.
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

/// Creates veth `a` in `netns_a` and its peer `b` in `netns_b` with the given MACs, both up.
/// `queues`: numrxqueues/numtxqueues of both ends (`None`: the kernel's default of one).
fn veth(
    netns_a: &str,
    a: &str,
    mac_a: Mac,
    netns_b: &str,
    b: &str,
    mac_b: Mac,
    queues: Option<u32>,
) {
    let q = queues.map(|q| q.to_string());
    let mut args: Vec<&str> = vec!["-n", netns_a, "link", "add", a];
    if let Some(q) = &q {
        args.extend(["numrxqueues", q, "numtxqueues", q]);
    }
    args.extend(["type", "veth", "peer", "name", b]);
    if let Some(q) = &q {
        args.extend(["numrxqueues", q, "numtxqueues", q]);
    }
    args.extend(["netns", netns_b]);
    ip(&args);
    for (netns, ifname, mac) in [(netns_a, a, mac_a), (netns_b, b, mac_b)] {
        ip(&[
            "-n",
            netns,
            "link",
            "set",
            "dev",
            ifname,
            "address",
            &mac_str(mac),
        ]);
        ip(&["-n", netns, "link", "set", "dev", ifname, "up"]);
    }
}

fn mac_str(mac: Mac) -> String {
    mac.0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `f` on a new thread that has first joined network namespace `netns` and returns its
/// result; threads `f` spawns inherit the namespace. The calling thread never changes namespace.
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

fn ifindex_in(netns: &str, ifname: &str) -> u32 {
    let name = ifname.to_string();
    in_netns(netns, move || xdp_redirect::ifindex(&name)).expect("interface exists")
}

/// Starts the dataplane from inside `netns`: its workers (which create the sockets) live there.
fn start_in(netns: &str, cfg: DataplaneConfig) -> Dataplane {
    in_netns(netns, move || Dataplane::start(cfg)).expect("starting the dataplane")
}

/// Attaches the XDP program to `ifname` in `netns`, natively (veth supports it).
fn attach_in(netns: &str, ifname: &str) -> Attachment {
    let name = ifname.to_string();
    in_netns(netns, move || Attachment::attach(&name, false))
        .unwrap_or_else(|e| panic!("attaching XDP to {ifname}: {e}"))
}

/// Puts the socket of `port` into the XSKMAP of `att`.
fn register(att: &mut Attachment, port: &PortInfo) {
    // SAFETY: the fd belongs to the port's socket, open until the port is removed, which happens
    // only after this call; the map takes its own reference to the socket.
    let fd = unsafe { BorrowedFd::borrow_raw(port.fd) };
    att.register_socket(port.queue, fd)
        .expect("registering the socket in the XSKMAP");
}

/// Raw AF_PACKET sender on one interface, created inside its namespace.
struct RawSender {
    socket: OwnedFd,
    ifindex: u32,
}

impl RawSender {
    /// `qdisc_bypass`: transmit directly on the tx queue `cpu % queues` (PACKET_QDISC_BYPASS),
    /// which on veth is also the peer's rx queue.
    fn open_in(netns: &str, ifname: &str, qdisc_bypass: bool) -> Self {
        let name = ifname.to_string();
        in_netns(netns, move || {
            let ifindex = xdp_redirect::ifindex(&name).expect("sending interface exists");
            // SAFETY: plain socket(2) call; protocol 0 means the socket receives nothing.
            let raw =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: raw is a fresh, valid descriptor that nothing else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(raw) };
            if qdisc_bypass {
                let one: libc::c_int = 1;
                // SAFETY: setsockopt on our socket with a valid pointer to a c_int and its size.
                let rc = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_PACKET,
                        libc::PACKET_QDISC_BYPASS,
                        std::ptr::from_ref(&one).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(
                    rc,
                    0,
                    "PACKET_QDISC_BYPASS: {}",
                    std::io::Error::last_os_error()
                );
            }
            RawSender { socket, ifindex }
        })
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(self.ifindex).expect("ifindex fits i32");
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame is valid for frame.len() bytes, addr is a valid sockaddr_ll of the given
        // size, and the socket stays open for the call.
        let n = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
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
            "sending a {}-byte frame: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
    }
}

/// Pins the calling thread to `cpu`; false if this process may not run there.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Frame accounting

/// The report of `worker`, checking the one invariant that holds at any instant: a worker can
/// never have more free frames than it owns (more would mean a frame was freed twice).
fn report(dp: &Dataplane, worker: usize) -> WorkerReport {
    let r = dp.reports().swap_remove(worker);
    assert!(
        r.free_frames <= r.total_frames,
        "worker {worker}: {} free frames of {} (a frame was freed twice)",
        r.free_frames,
        r.total_frames
    );
    r
}

/// Asks every worker for its port stats (which also makes it publish its counters and free-frame
/// gauge at that instant) and checks, per worker, that free frames plus the frames its ports
/// hold add up to all it owns. Returns the port stats.
fn check_frames_accounted(dp: &Dataplane) -> Vec<dataplane::worker::PortStatus> {
    let stats = dp.port_stats().expect("port stats");
    for r in dp.reports() {
        let in_kernel: u64 = stats
            .iter()
            .filter(|s| s.worker == r.id)
            .map(|s| u64::from(s.frames_in_kernel))
            .sum();
        assert_eq!(
            r.free_frames + in_kernel,
            r.total_frames,
            "worker {}: {} free + {in_kernel} held by ports != {} owned; ports: {stats:?}",
            r.id,
            r.free_frames,
            r.total_frames
        );
    }
    stats
}

/// Waits (bounded) until `worker` has taken at least `want` frames from its rx rings.
fn wait_rx(dp: &Dataplane, worker: usize, want: u64) {
    let deadline = Instant::now() + COUNTER_WAIT;
    loop {
        let r = report(dp, worker);
        if r.counters.rx_packets >= want {
            return;
        }
        if Instant::now() >= deadline {
            let ports = dp.port_stats().unwrap_or_default();
            panic!(
                "worker {worker} received {} of {want} frames within {COUNTER_WAIT:?}; \
                 counters {:?}; ports {ports:?}",
                r.counters.rx_packets, r.counters
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded) until `worker`'s rx count stops growing for [`COUNTER_SETTLE`]; returns it.
fn wait_settled(dp: &Dataplane, worker: usize) -> u64 {
    let deadline = Instant::now() + COUNTER_WAIT;
    let mut last = report(dp, worker).counters.rx_packets;
    loop {
        thread::sleep(COUNTER_SETTLE);
        let now = report(dp, worker).counters.rx_packets;
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "worker {worker} still receiving after {COUNTER_WAIT:?}"
        );
        last = now;
    }
}

/// Sends `frames` in batches of [`SEND_BATCH`], each time waiting until `worker` has received
/// them all, so no ring overflows and the counts are exact. Returns the worker's rx count after.
fn send_paced(dp: &Dataplane, worker: usize, sender: &RawSender, frames: &[Vec<u8>]) -> u64 {
    let mut expect = report(dp, worker).counters.rx_packets;
    for batch in frames.chunks(SEND_BATCH) {
        for f in batch {
            sender.send(f);
        }
        expect += batch.len() as u64;
        wait_rx(dp, worker, expect);
    }
    expect
}

/// Removes every port and checks each worker has all its frames back.
fn remove_and_check_all_free(dp: &Dataplane, ports: &[PortInfo]) {
    for p in ports {
        assert!(
            dp.remove_port(p.ifindex, p.queue).expect("remove_port"),
            "port {p:?} was not found for removal"
        );
    }
    // Port stats make every worker publish its gauge now; none has a port left.
    let left = dp.port_stats().expect("port stats");
    assert!(left.is_empty(), "ports left after removal: {left:?}");
    for r in dp.reports() {
        assert_eq!(
            r.free_frames, r.total_frames,
            "worker {} leaked frames: {} free of {} after removing every port; counters {:?}",
            r.id, r.free_frames, r.total_frames, r.counters
        );
        assert_eq!(r.counters.frames_leaked, 0, "worker {}", r.id);
        assert_eq!(r.counters.bad_descriptors, 0, "worker {}", r.id);
    }
    // Removing again finds nothing and changes nothing.
    for p in ports {
        assert!(
            !dp.remove_port(p.ifindex, p.queue).expect("remove_port"),
            "port {p:?} removed twice"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

const GW_1: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const PEER_1: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const A_MAC: Mac = Mac([0x02, 0x77, 0, 0, 0, 0xa]);
const B_MAC: Mac = Mac([0x02, 0x77, 0, 0, 0, 0xb]);

#[test]
fn frames_all_come_back_after_port_removal() {
    require_root!();
    let mut ns = Namespaces::new();
    let netns_a = ns.add("a");
    let netns_b = ns.add("b");
    let (if_a, if_b) = (ns.ifname("xwa"), ns.ifname("xwb"));
    veth(&netns_a, &if_a, A_MAC, &netns_b, &if_b, B_MAC, None);
    let ifx_a = ifindex_in(&netns_a, &if_a);

    let dp = start_in(&netns_a, config(1));
    let mut att = attach_in(&netns_a, &if_a);
    // The peer is a pod on A's veth: ARP for the gateway and echo to it are answered, UDP to an
    // unknown address is dropped (no route).
    let mut b = SnapshotBuilder::new(7, GW_1);
    b.interface(InterfaceEntry {
        ifindex: ifx_a,
        mac: A_MAC,
        role: InterfaceRole::Pod,
    });
    b.endpoint(
        PEER_1,
        EndpointEntry {
            ifindex: ifx_a,
            mac: B_MAC,
        },
    );
    dp.publish(b.build());

    assert_eq!(report(&dp, 0).free_frames, u64::from(UMEM_FRAMES));
    let port = dp.add_port(ifx_a, 0).expect("add_port");
    assert_eq!((port.worker, port.ifindex, port.queue), (0, ifx_a, 0));
    assert_eq!(port.mode, BindMode::Copy, "veth AF_XDP is copy mode only");
    register(&mut att, &port);

    // While the port exists its fill ring holds frames.
    let stats = check_frames_accounted(&dp);
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert!(stats[0].frames_in_kernel > 0, "{stats:?}");
    let r = report(&dp, 0);
    assert!(
        r.free_frames < r.total_frames,
        "no frame in the fill ring while the port exists: {r:?}"
    );

    // 500 frames in three kinds, interleaved.
    const N: usize = 500;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| match i % 3 {
            0 => common::arp(1, B_MAC, PEER_1, Mac([0; 6]), GW_1),
            1 => {
                let icmp = common::icmp_echo(0x77, i as u16, &[0x5a; 32]);
                let mut f = common::eth(A_MAC, B_MAC, 0x0800);
                f.extend(common::ipv4(PEER_1, GW_1, 1, 64, icmp.len()));
                f.extend(icmp);
                f
            }
            _ => {
                let udp = common::udp(40000, 9, &[0xa5; 18]);
                let mut f = common::eth(A_MAC, B_MAC, 0x0800);
                f.extend(common::ipv4(
                    PEER_1,
                    Ipv4Addr::new(10, 77, 9, 9),
                    17,
                    64,
                    udp.len(),
                ));
                f.extend(udp);
                f
            }
        })
        .collect();
    let (arps, echos) = (N.div_ceil(3) as u64, (N + 1) as u64 / 3);
    let udps = N as u64 - arps - echos;
    let sender = RawSender::open_in(&netns_b, &if_b, false);
    let rx = send_paced(&dp, 0, &sender, &frames);
    assert_eq!(rx, N as u64);
    thread::sleep(COUNTER_SETTLE);
    let stats = check_frames_accounted(&dp);
    let c = report(&dp, 0).counters;
    assert_eq!(c.rx_packets, N as u64, "extra frames arrived: {c:?}");
    assert_eq!(c.arp_replies, arps, "{c:?}");
    assert_eq!(c.gateway_echo_replies, echos, "{c:?}");
    assert_eq!(c.drops[DropReason::NoRoute as usize], udps, "{c:?}");
    assert_eq!(c.dropped, udps, "{c:?}");
    assert_eq!(c.tx_packets, arps + echos, "{c:?}");
    assert_eq!(c.tx_kick_errors, 0, "{c:?}");
    assert_eq!(c.bad_descriptors, 0, "{c:?}");
    let k = stats[0].kernel;
    assert_eq!(
        (k.rx_dropped, k.rx_ring_full, k.rx_fill_ring_empty_descs),
        (0, 0, 0),
        "the kernel dropped frames: {k:?}"
    );
    assert!(report(&dp, 0).free_frames < u64::from(UMEM_FRAMES));

    // Now bursts of twice a ring, 1 ms apart, without waiting for the worker: the
    // kernel drops what does not fit (fill ring empty), while the worker receives, transmits and
    // refills concurrently. Whatever got through, every frame must still be accounted for.
    const BURST: usize = 4 * UMEM_FRAMES as usize;
    for chunk in frames
        .iter()
        .cycle()
        .take(BURST)
        .collect::<Vec<_>>()
        .chunks(2 * RING_SIZE as usize)
    {
        for f in chunk {
            sender.send(f);
        }
        thread::sleep(Duration::from_millis(1));
    }
    let settled = wait_settled(&dp, 0);
    let burst_rx = settled - N as u64;
    assert!(
        burst_rx > 0 && burst_rx <= BURST as u64,
        "{burst_rx} frames of a {BURST}-frame burst received"
    );
    let k = check_frames_accounted(&dp)[0].kernel;
    assert_eq!(
        burst_rx + k.rx_dropped + k.rx_ring_full,
        BURST as u64,
        "every frame of the burst is either received or counted as dropped by the kernel: \
         {burst_rx} received, kernel {k:?}"
    );
    let c = report(&dp, 0).counters;
    assert_eq!(c.bad_descriptors, 0, "{c:?}");
    assert_eq!(c.tx_kick_errors, 0, "{c:?}");
    assert_eq!(
        c.rx_packets,
        c.tx_packets + c.dropped,
        "every received frame is either sent or dropped: {c:?}"
    );

    att.unregister_socket(0).expect("unregister");
    drop(att);
    thread::sleep(UNREGISTER_GRACE);
    remove_and_check_all_free(&dp, &[port]);
}

const GW_2: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const POD_0: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const POD_1: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 3);
const L0_MAC: Mac = Mac([0x02, 0x78, 0, 0, 0x10, 0]);
const L1_MAC: Mac = Mac([0x02, 0x78, 0, 0, 0x11, 0]);
const P0_MAC: Mac = Mac([0x0a, 0x78, 0, 0, 0x20, 0]);
const P1_MAC: Mac = Mac([0x0a, 0x78, 0, 0, 0x21, 0]);
const UDP_PORT: u16 = 7788;

/// Configures a pod end as the CNI does: one /32 address, the gateway on-link, default via it,
/// tx checksum offload off (AF_XDP copies frames without finishing partial checksums).
fn configure_pod(netns: &str, ifname: &str, addr: Ipv4Addr) {
    let cidr = format!("{addr}/32");
    let gw = GW_2.to_string();
    ip(&["-n", netns, "addr", "add", &cidr, "dev", ifname]);
    ip(&[
        "-n", netns, "route", "add", &gw, "dev", ifname, "scope", "link",
    ]);
    ip(&["-n", netns, "route", "add", "default", "via", &gw]);
    must(
        "ip",
        &["netns", "exec", netns, "ethtool", "-K", ifname, "tx", "off"],
    );
}

#[test]
fn forwarding_between_two_ports_moves_frames_without_loss() {
    require_root!();
    let mut ns = Namespaces::new();
    let node = ns.add("n");
    let pod0 = ns.add("p0");
    let pod1 = ns.add("p1");
    let (l0, p0) = (ns.ifname("xwl0"), ns.ifname("xwp0"));
    let (l1, p1) = (ns.ifname("xwl1"), ns.ifname("xwp1"));
    veth(&node, &l0, L0_MAC, &pod0, &p0, P0_MAC, None);
    veth(&node, &l1, L1_MAC, &pod1, &p1, P1_MAC, None);
    configure_pod(&pod0, &p0, POD_0);
    configure_pod(&pod1, &p1, POD_1);
    let (ifx0, ifx1) = (ifindex_in(&node, &l0), ifindex_in(&node, &l1));

    let dp = start_in(&node, config(1));
    let mut att0 = attach_in(&node, &l0);
    let mut att1 = attach_in(&node, &l1);
    let mut b = SnapshotBuilder::new(3, GW_2);
    for (ifindex, mac) in [(ifx0, L0_MAC), (ifx1, L1_MAC)] {
        b.interface(InterfaceEntry {
            ifindex,
            mac,
            role: InterfaceRole::Pod,
        });
    }
    for (addr, ifindex, mac) in [(POD_0, ifx0, P0_MAC), (POD_1, ifx1, P1_MAC)] {
        b.endpoint(addr, EndpointEntry { ifindex, mac });
    }
    dp.publish(b.build());
    let port0 = dp.add_port(ifx0, 0).expect("add_port l0");
    let port1 = dp.add_port(ifx1, 0).expect("add_port l1");
    register(&mut att0, &port0);
    register(&mut att1, &port1);
    let stats = check_frames_accounted(&dp);
    assert_eq!(stats.len(), 2, "{stats:?}");

    // Ping p1 from p0: ARP for the gateway on both sides, echo both ways through the worker.
    const PINGS: u64 = 5;
    let count = PINGS.to_string();
    let target = POD_1.to_string();
    let out = run(
        "ip",
        &[
            "netns", "exec", &pod0, "ping", "-n", "-q", "-c", &count, "-i", "0.05", "-W", "2",
            "-w", "10", &target,
        ],
    );
    assert!(
        out.status.success(),
        "ping {target} from {pod0} through the worker failed: {}{}; counters {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        report(&dp, 0).counters
    );
    let c = report(&dp, 0).counters;
    assert!(
        c.forwarded >= 2 * PINGS,
        "{PINGS} echo requests and replies should be forwarded: {c:?}"
    );
    assert!(
        c.arp_replies >= 2,
        "both pods must ARP for the gateway: {c:?}"
    );

    // UDP from a socket in p0 to a socket in p1: every datagram arrives, intact and once.
    let receiver = in_netns(&pod1, || {
        let s = UdpSocket::bind((POD_1, UDP_PORT)).expect("bind the receiver in p1");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        s
    });
    let sender = in_netns(&pod0, || {
        let s = UdpSocket::bind((POD_0, 0)).expect("bind the sender in p0");
        s.connect((POD_1, UDP_PORT)).expect("connect");
        s
    });
    const DATAGRAMS: u32 = 400;
    let forwarded_before = report(&dp, 0).counters.forwarded;
    let mut seen = vec![false; DATAGRAMS as usize];
    let mut buf = [0u8; 2048];
    for batch in (0..DATAGRAMS).collect::<Vec<_>>().chunks(SEND_BATCH) {
        for &seq in batch {
            let mut msg = seq.to_be_bytes().to_vec();
            msg.resize(200, (seq % 251) as u8);
            sender.send(&msg).expect("send a datagram");
        }
        for _ in batch {
            let (n, from) = receiver.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "datagram lost ({e}); received {} of {DATAGRAMS}; counters {:?}; ports {:?}",
                    seen.iter().filter(|s| **s).count(),
                    report(&dp, 0).counters,
                    dp.port_stats()
                )
            });
            assert_eq!(from.ip(), POD_0, "datagram from an unexpected source");
            assert_eq!(n, 200, "datagram length changed");
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            assert!(seq < DATAGRAMS, "unknown sequence number {seq}");
            assert!(
                buf[4..n].iter().all(|b| *b == (seq % 251) as u8),
                "payload of datagram {seq} corrupted"
            );
            assert!(!seen[seq as usize], "datagram {seq} delivered twice");
            seen[seq as usize] = true;
        }
    }
    assert!(seen.iter().all(|s| *s));
    thread::sleep(COUNTER_SETTLE);
    let stats = check_frames_accounted(&dp);
    let c = report(&dp, 0).counters;
    assert!(
        c.forwarded - forwarded_before >= u64::from(DATAGRAMS),
        "datagrams arrived without being counted as forwarded: {c:?}"
    );
    assert_eq!(c.bad_descriptors, 0, "{c:?}");
    assert_eq!(c.tx_kick_errors, 0, "{c:?}");
    assert_eq!(c.drops[DropReason::TxRingFull as usize], 0, "{c:?}");
    for s in &stats {
        assert_eq!(
            (s.kernel.rx_dropped, s.kernel.rx_ring_full),
            (0, 0),
            "kernel dropped frames on {s:?}"
        );
    }

    for att in [&mut att0, &mut att1] {
        att.unregister_socket(0).expect("unregister");
    }
    drop(att0);
    drop(att1);
    thread::sleep(UNREGISTER_GRACE);
    remove_and_check_all_free(&dp, &[port0, port1]);
}

#[test]
fn bad_ring_sizes_are_refused() {
    // No root needed: sizes are checked before any memory or socket is set up.
    let with_rings = |rx, tx, fill, completion| DataplaneConfig {
        rings: RingSizes {
            rx,
            tx,
            fill,
            completion,
        },
        ..config(1)
    };
    let cases: [(&str, DataplaneConfig, &str, u32); 7] = [
        (
            "rx not a power of two",
            with_rings(100, 64, 64, 64),
            "rx",
            100,
        ),
        (
            "tx not a power of two",
            with_rings(64, 63, 64, 64),
            "tx",
            63,
        ),
        ("fill below 16", with_rings(64, 64, 8, 64), "fill", 8),
        (
            "completion above 65536",
            with_rings(64, 64, 64, 131072),
            "completion",
            131072,
        ),
        (
            "completion zero",
            with_rings(64, 64, 64, 0),
            "completion",
            0,
        ),
        (
            "batch zero",
            DataplaneConfig {
                batch: 0,
                ..config(1)
            },
            "batch",
            0,
        ),
        (
            "batch above the rx ring",
            DataplaneConfig {
                batch: 128,
                ..config(1)
            },
            "batch",
            128,
        ),
    ];
    for (what, cfg, want_ring, want_size) in cases {
        match Dataplane::start(cfg) {
            Err(RuntimeError::Rings { ring, size }) => {
                assert_eq!((ring, size), (want_ring, want_size), "{what}");
                let msg = RuntimeError::Rings { ring, size }.to_string();
                assert!(
                    msg.contains(want_ring) && msg.contains(&want_size.to_string()),
                    "{what}: message must name the ring and the size: {msg}"
                );
            }
            Err(other) => panic!("{what}: expected RuntimeError::Rings, got {other:?}"),
            Ok(_) => panic!("{what}: the dataplane started"),
        }
    }
    match Dataplane::start(config(0)) {
        Err(RuntimeError::NoWorkers) => {}
        Err(other) => panic!("no workers: expected NoWorkers, got {other:?}"),
        Ok(_) => panic!("no workers: the dataplane started"),
    }
}

const Q_GW: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);

#[test]
fn two_workers_each_own_their_queue() {
    require_root!();
    let mut ns = Namespaces::new();
    let netns = ns.add("q");
    let (if_rx, if_tx) = (ns.ifname("xwq"), ns.ifname("xwr"));
    // Both ends in one namespace, two queues each (as the CNI does for two workers).
    veth(&netns, &if_rx, A_MAC, &netns, &if_tx, B_MAC, Some(2));
    let ifx = ifindex_in(&netns, &if_rx);

    let dp = start_in(&netns, config(2));
    assert_eq!(dp.workers(), 2);
    let mut att = attach_in(&netns, &if_rx);
    let mut b = SnapshotBuilder::new(11, Q_GW);
    b.interface(InterfaceEntry {
        ifindex: ifx,
        mac: A_MAC,
        role: InterfaceRole::Uplink,
    });
    dp.publish(b.build());

    let port0 = dp.add_port(ifx, 0).expect("add_port queue 0");
    let port1 = dp.add_port(ifx, 1).expect("add_port queue 1");
    assert_eq!((port0.worker, port0.queue), (0, 0));
    assert_eq!((port1.worker, port1.queue), (1, 1));
    register(&mut att, &port0);
    register(&mut att, &port1);

    // A second socket on a taken queue and a socket on a queue the veth lacks are refused,
    // naming the queue, and cost no frame.
    let dup = dp.add_port(ifx, 1).expect_err("second socket on queue 1");
    assert!(
        matches!(dup, RuntimeError::Worker { worker: 1, .. }),
        "unexpected error {dup:?}"
    );
    let missing = dp
        .add_port(ifx, 2)
        .expect_err("socket on queue 2 of a 2-queue veth");
    assert!(
        matches!(missing, RuntimeError::Worker { worker: 0, .. })
            && missing.to_string().contains("queue 2"),
        "error must come from worker 0 and name the queue: {missing}"
    );

    let stats = check_frames_accounted(&dp);
    let mut owners: Vec<(usize, u32, u32)> = stats
        .iter()
        .map(|s| (s.worker, s.ifindex, s.queue))
        .collect();
    owners.sort_unstable();
    assert_eq!(owners, vec![(0, ifx, 0), (1, ifx, 1)], "{stats:?}");
    for r in dp.reports() {
        assert!(
            r.free_frames < r.total_frames,
            "worker {}: no frame in its fill ring: {r:?}",
            r.id
        );
    }

    // Traffic into each queue reaches only the worker owning it. With PACKET_QDISC_BYPASS the
    // kernel sends on tx queue (cpu % queues), and a veth delivers on the peer's rx queue of the
    // same number: a sender pinned to cpu q feeds rx queue q.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("only {cpus} cpu: skipping the per-queue traffic part");
    } else {
        const PER_QUEUE: usize = 48;
        let frame = {
            let udp = common::udp(40000, 9, &[0xa5; 18]);
            let mut f = common::eth(A_MAC, B_MAC, 0x0800);
            f.extend(common::ipv4(
                Ipv4Addr::new(10, 79, 0, 2),
                Ipv4Addr::new(10, 79, 9, 9),
                17,
                64,
                udp.len(),
            ));
            f.extend(udp);
            f
        };
        let sender = RawSender::open_in(&netns, &if_tx, true);
        for queue in 0..2usize {
            let before: Vec<u64> = dp.reports().iter().map(|r| r.counters.rx_packets).collect();
            let frames = vec![frame.clone(); PER_QUEUE];
            thread::scope(|s| {
                s.spawn(|| {
                    assert!(pin_to(queue), "cannot pin the sender to cpu {queue}");
                    send_paced(&dp, queue, &sender, &frames);
                });
            });
            thread::sleep(COUNTER_SETTLE);
            let after: Vec<u64> = dp.reports().iter().map(|r| r.counters.rx_packets).collect();
            let mut want = before.clone();
            want[queue] += PER_QUEUE as u64;
            assert_eq!(
                after, want,
                "frames sent into queue {queue} must reach worker {queue} only"
            );
        }
        for r in dp.reports() {
            assert_eq!(r.generation, 11, "worker {} runs an old snapshot", r.id);
            assert_eq!(
                // On an uplink only VXLAN for this node is the dataplane's business; this node
                // has no overlay configured, so the UDP frames are `uplink_unexpected`.
                r.counters.drops[DropReason::UplinkUnexpected as usize],
                PER_QUEUE as u64,
                "worker {}: {:?}",
                r.id,
                r.counters
            );
        }
    }

    check_frames_accounted(&dp);
    for queue in 0..2 {
        att.unregister_socket(queue).expect("unregister");
    }
    drop(att);
    thread::sleep(UNREGISTER_GRACE);
    remove_and_check_all_free(&dp, &[port0, port1]);
}

/// Rings of `n` descriptors each.
fn rings_of(n: u32) -> RingSizes {
    RingSizes {
        rx: n,
        tx: n,
        fill: n,
        completion: n,
    }
}

/// A veth pair `<name>a` (netns `a`, XDP attached, a port of `kind` on queue 0 registered) to
/// `<name>b` (netns `b`) that nothing sends on. MACs come from a hash of the name.
fn idle_port(
    ns: &Namespaces,
    (netns_a, netns_b): (&str, &str),
    dp: &Dataplane,
    name: &str,
    kind: PortKind,
) -> (Attachment, u32) {
    let (a, b) = (
        ns.ifname(&format!("{name}a")),
        ns.ifname(&format!("{name}b")),
    );
    let tag = name
        .bytes()
        .fold(0u16, |h, c| h.wrapping_mul(31).wrapping_add(c.into()));
    let [hi, lo] = tag.to_be_bytes();
    let mac_a = Mac([0x02, 0, 0xa0, hi, lo, 1]);
    let mac_b = Mac([0x02, 0, 0xb0, hi, lo, 2]);
    veth(netns_a, &a, mac_a, netns_b, &b, mac_b, None);
    let ifx = ifindex_in(netns_a, &a);
    let mut att = attach_in(netns_a, &a);
    let port = dp.add_port_as(ifx, 0, kind).expect("add_port_as");
    register(&mut att, &port);
    (att, ifx)
}

/// The uplink's fill ring is kept full from the start, like a NIC's rx ring: another node's
/// burst (its worker forwarding at once what waited in its rings during a hot restart) lands in
/// frames already posted. Before, the uplink started at an endpoint's small share and grew only
/// after the ring had run dry; node2 dropped (`rx_fill_ring_empty_descs`) the part of node1's
/// burst beyond it. Endpoints still start small and share what the uplink leaves, and the kind
/// travels with a hot restart.
#[test]
fn an_uplink_port_holds_its_full_fill_share_from_the_start() {
    require_root!();
    let mut ns = Namespaces::new();
    let netns_a = ns.add("a");
    let netns_b = ns.add("b");
    let mut cfg = config(1);
    // A fill budget of 1024 (half the UMEM). The uplink comes first, as in the agent: alone,
    // its share is the whole budget, so it fills its ring (512) at once and keeps it (fill
    // rings are never taken back). The two endpoints then start at 64 (a thirty-second of the
    // UMEM) and would grow with traffic to an equal share of the budget, 341.
    cfg.umem.frames = 2048;
    cfg.rings = rings_of(512);
    let rings = cfg.rings;
    let dp = start_in(&netns_a, cfg);
    let mut atts = Vec::new();
    let mut ifindexes = Vec::new();
    for (i, kind) in [PortKind::Uplink, PortKind::Endpoint, PortKind::Endpoint]
        .into_iter()
        .enumerate()
    {
        let (att, ifx) = idle_port(&ns, (&netns_a, &netns_b), &dp, &format!("u{i}"), kind);
        atts.push(att);
        ifindexes.push((ifx, kind));
    }
    let held = |stats: &[dataplane::worker::PortStatus], ifx: u32| {
        stats
            .iter()
            .find(|s| s.ifindex == ifx)
            .map(|s| s.frames_in_kernel)
    };
    let want = |kind| match kind {
        PortKind::Uplink => 512,
        PortKind::Endpoint => 64,
    };
    let deadline = Instant::now() + COUNTER_WAIT;
    let stats = loop {
        let stats = check_frames_accounted(&dp);
        let settled = ifindexes
            .iter()
            .all(|(ifx, kind)| held(&stats, *ifx) == Some(want(*kind)));
        if settled || Instant::now() >= deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for (ifx, kind) in &ifindexes {
        assert_eq!(
            held(&stats, *ifx),
            Some(want(*kind)),
            "{kind:?} port {ifx}: frames in its fill ring; ports {stats:?}"
        );
    }

    // An adopted port's kind is set by the agent that claims it (an older agent did not say):
    // switched to an uplink, the last endpoint fills at once to the uplink cap of a worker with
    // three ports, 341.
    let (switched, _) = ifindexes[2];
    dp.set_port_kind(switched, 0, PortKind::Uplink)
        .expect("set_port_kind");
    let deadline = Instant::now() + COUNTER_WAIT;
    let stats = loop {
        let stats = check_frames_accounted(&dp);
        if held(&stats, switched) == Some(341) || Instant::now() >= deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(held(&stats, switched), Some(341), "ports {stats:?}");
    ifindexes[2].1 = PortKind::Uplink;

    // The kind travels with the worker's state (a hot restart keeps the uplink full).
    let mut dp = dp;
    let states = dp.handover().expect("handover");
    let (meta, _fds) = states[0].meta(rings);
    let meta: dataplane::handover::WorkerMeta =
        serde_json::from_str(&serde_json::to_string(&meta).expect("serialises")).expect("parses");
    for (ifx, kind) in &ifindexes {
        let p = meta.ports.iter().find(|p| p.ifindex == *ifx).expect("port");
        assert_eq!(p.kind, *kind, "{meta:?}");
    }
    drop(states);
    drop(atts);
}

/// Many ports on one worker: with a fixed share per port, the first ports added kept the big
/// shares of a worker with few ports and the pool ran dry (every frame in some fill ring, none
/// left for handoff copies, later ports with empty fill rings). Now idle ports hold a small
/// start share, a reserve stays free, and every port has frames to receive into.
#[test]
fn many_idle_ports_leave_free_frames_and_every_port_gets_some() {
    require_root!();
    const PORTS: usize = 12;
    let mut ns = Namespaces::new();
    let netns_a = ns.add("a");
    let netns_b = ns.add("b");
    let mut cfg = config(1);
    cfg.umem.frames = 1024;
    cfg.rings = rings_of(512);
    let dp = start_in(&netns_a, cfg);
    let mut atts = Vec::new();
    for i in 0..PORTS {
        let (att, _) = idle_port(
            &ns,
            (&netns_a, &netns_b),
            &dp,
            &format!("m{i}"),
            PortKind::Endpoint,
        );
        atts.push(att);
    }
    // Let the worker refill every port (bounded wait).
    let deadline = Instant::now() + COUNTER_WAIT;
    let stats = loop {
        let stats = check_frames_accounted(&dp);
        if stats.iter().all(|s| s.frames_in_kernel > 0) || Instant::now() >= deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(stats.len(), PORTS);
    for s in &stats {
        assert!(
            s.frames_in_kernel > 0,
            "a port without fill frames: {stats:?}"
        );
    }
    let r = report(&dp, 0);
    assert!(
        r.free_frames >= 1024 / 8,
        "the reserve for frames in flight is gone: {} free; ports {stats:?}",
        r.free_frames
    );
    drop(atts);
}
