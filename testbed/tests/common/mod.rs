//! Helpers shared by the privileged testbed tests (`sluice_e2e`, `overlay_e2e`, `testbed`), each
//! of which includes this module with `mod common;`. A test file uses only part of it, hence the
//! `dead_code` allowance.
//!
//! Each including test file declares `const INSTANCE_PREFIX: char`, the first letter of its
//! instance names (see [`unique_instance`]), so that two test binaries never build the same
//! instance.
//!
//! Every command runs under `timeout -s KILL`, every wait is bounded, every process started here
//! is killed (by pid) and reaped when its [`Proc`] is dropped.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, ExitStatus, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use control::{
    api::{self, Request},
    status::Status,
};
use testbed::{Mode, Testbed, UpOptions};

/// Pod MTU is 1390 on the testbed's 1500-byte fabric; no frame carries more than this much TCP
/// payload, so a transfer of N bytes takes at least N / this many data packets.
pub const MAX_PAYLOAD_PER_PACKET: u64 = 1400;
/// How long the workers may take to publish their counters after traffic stops.
pub const COUNTERS_SETTLE: Duration = Duration::from_secs(3);
/// The agent's status answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns from the test with "skipping: needs root" unless it runs as root.
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!("skipping: needs root");
            return;
        }
    };
}
pub(crate) use require_root;

/// `{INSTANCE_PREFIX}{pid}n{counter}z`: unique per test, and no instance name is a prefix of
/// another's namespace names.
pub fn unique_instance() -> String {
    format!(
        "{}{}n{}z",
        crate::INSTANCE_PREFIX,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Takes `lock`; a test that panicked while holding it poisons it, but the lock itself is still
/// good.
pub fn hold(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// `testbed/clusters/{name}`.
pub fn cluster(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clusters")
        .join(name)
}

pub fn python() -> &'static str {
    // Debian's interpreter starts faster than a pyenv shim.
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Writes `content` to `path` by rename, so the agent never reads a half-written file.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over the cluster file");
}

/// A temporary directory for a testbed's state root and cluster files.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A new directory holding `yaml` as [`Env::cluster_file`].
    pub fn with_cluster(yaml: &str) -> Self {
        let env = Self::new();
        std::fs::write(env.cluster_file(), yaml).expect("write cluster file");
        env
    }

    /// `cluster.yaml` in the directory (written by [`Env::with_cluster`]).
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.path().join("cluster.yaml")
    }

    pub fn state_root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Options for a sluice-mode instance of `cluster_file` with a unique instance name.
    pub fn options(&self, cluster_file: &Path, workers: u32) -> UpOptions {
        let mut opts = UpOptions::new(cluster_file);
        for bin in [&opts.sluice_bin, &opts.cni_bin] {
            assert!(
                bin.is_file(),
                "{} is missing: run `cargo build -p control --bins` first",
                bin.display()
            );
        }
        opts.instance = Some(unique_instance());
        opts.mode = Mode::Sluice { workers };
        opts.state_root = self.state_root();
        opts
    }

    /// Options for a kernel-mode instance named `instance` of [`Env::cluster_file`]; needs only
    /// the CNI plugin.
    pub fn kernel_options(&self, instance: &str) -> UpOptions {
        let mut opts = UpOptions::new(self.cluster_file());
        assert!(
            opts.cni_bin.is_file(),
            "{} is missing: run `cargo build -p control --bin sluice-cni` first",
            opts.cni_bin.display()
        );
        opts.instance = Some(instance.to_string());
        opts.mode = Mode::Kernel;
        opts.state_root = self.state_root();
        opts
    }

    pub fn up_with(&self, opts: UpOptions) -> Testbed {
        let mode = opts.mode;
        let started = Instant::now();
        let tb = Testbed::up(opts).unwrap_or_else(|e| panic!("testbed up: {e}"));
        eprintln!(
            "testbed {} up in {:?} ({mode:?})",
            tb.instance(),
            started.elapsed()
        );
        tb
    }

    pub fn up(&self, cluster_file: &Path, workers: u32) -> Testbed {
        self.up_with(self.options(cluster_file, workers))
    }
}

// ---------------------------------------------------------------------------------------------
// Agent status over its local API.

pub fn try_status(tb: &Testbed, node: &str) -> Result<Status, String> {
    let socket = &tb.node(node).map_err(|e| e.to_string())?.agent_socket;
    let response = api::call(socket, &Request::Status, STATUS_TIMEOUT)
        .map_err(|e| format!("status call to {node}'s agent: {e}"))?;
    let value = response
        .status
        .ok_or_else(|| format!("{node}'s status answer has no status"))?;
    serde_json::from_value::<Status>(value).map_err(|e| format!("decoding status: {e}"))
}

pub fn status(tb: &Testbed, node: &str) -> Status {
    try_status(tb, node).unwrap_or_else(|e| panic!("{e}"))
}

/// The status once the workers' published counters stop moving (they publish when idle), so
/// that a "before" reading does not lag traffic that just happened.
pub fn settled_status(tb: &Testbed, node: &str) -> Status {
    let deadline = Instant::now() + COUNTERS_SETTLE;
    let mut last = status(tb, node);
    loop {
        thread::sleep(Duration::from_millis(150));
        let now = status(tb, node);
        if now.totals == last.totals || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Polls the status until `done` holds (bounded); returns the last status either way so the
/// caller's assertion shows what was seen.
pub fn status_when(
    tb: &Testbed,
    node: &str,
    within: Duration,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + within;
    loop {
        let s = status(tb, node);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A drop counter by its reason name (`frame_too_short`, ...). The testbed crate does not depend
/// on `dataplane`, so `Status::drop_count(DropReason)` is not reachable from here.
pub fn drops(s: &Status, reason: &str) -> u64 {
    s.drops
        .iter()
        .find(|d| d.reason == reason)
        .map(|d| d.count)
        .unwrap_or_else(|| panic!("status has no drop reason {reason:?}: {:?}", s.drops))
}

/// Drop reasons that grew between two readings, except `ipv6_unsupported` (the pods' kernels
/// send IPv6 — DAD, router solicitations, MLD reports — on their own schedule, and sluice drops
/// it) and the reasons in `tolerated` up to their given growth.
pub fn unexpected_drops(
    before: &Status,
    after: &Status,
    tolerated: &[(&str, u64)],
) -> Vec<(String, u64)> {
    after
        .drops
        .iter()
        .map(|d| (d.reason.clone(), d.count - drops(before, &d.reason)))
        .filter(|(reason, n)| {
            *n > 0
                && reason != "ipv6_unsupported"
                && !tolerated.iter().any(|(r, max)| r == reason && n <= max)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Commands in the testbed's namespaces, always under `timeout`.

pub fn timed<'a>(seconds: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["timeout", "-s", "KILL", seconds];
    v.extend_from_slice(argv);
    v
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn in_pod(tb: &Testbed, pod: &str, seconds: &str, argv: &[&str]) -> Output {
    tb.exec_in_pod(pod, &timed(seconds, argv))
        .unwrap_or_else(|e| panic!("running {argv:?} in {pod}: {e}"))
}

/// Runs `argv` in `node`'s namespace (10 s at most) and asserts it succeeded.
pub fn in_node(tb: &Testbed, node: &str, argv: &[&str]) -> Output {
    let out = tb
        .exec_in_node(node, &timed("10", argv))
        .unwrap_or_else(|e| panic!("running {argv:?} in {node}: {e}"));
    assert!(out.status.success(), "{argv:?} in {node}:\n{}", text(&out));
    out
}

pub fn pod_ip(tb: &Testbed, pod: &str) -> Ipv4Addr {
    tb.pod(pod).expect("pod").ip
}

/// `count` echo requests from `from` to `to`, 0.2 s apart.
pub fn ping(tb: &Testbed, from: &str, to: Ipv4Addr, count: u32) -> Output {
    let count = count.to_string();
    let to = to.to_string();
    in_pod(
        tb,
        from,
        "20",
        &["ping", "-n", "-c", &count, "-i", "0.2", "-W", "2", &to],
    )
}

/// Single pings from `from` to the pod `to` until one gets through (bounded): for an agent
/// that just started, or uplink neighbours not resolved yet. The number of attempts.
pub fn try_ping_within(
    tb: &Testbed,
    from: &str,
    to: &str,
    within: Duration,
) -> Result<u32, String> {
    let ip = pod_ip(tb, to);
    let deadline = Instant::now() + within;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = in_pod(
            tb,
            from,
            "5",
            &["ping", "-n", "-c", "1", "-W", "1", &ip.to_string()],
        );
        if out.status.success() {
            return Ok(attempts);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no ping {from} -> {to} ({ip}) got through in {within:?} ({attempts} attempts); last:\n{}",
                text(&out)
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// [`try_ping_within`], panicking when no ping gets through.
pub fn ping_within(tb: &Testbed, from: &str, to: &str, within: Duration) -> u32 {
    try_ping_within(tb, from, to, within).unwrap_or_else(|e| panic!("{e}"))
}

/// A process we started, killed (by pid) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    /// Takes over `child`, which must have a piped stdout.
    pub fn new(mut child: Child) -> Self {
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, stdout }
    }

    /// Starts `argv` in `pod` and waits for its first stdout line (a server saying it is ready).
    pub fn start_in_pod(tb: &Testbed, pod: &str, seconds: &str, argv: &[&str]) -> (Self, String) {
        let child = tb
            .spawn_in_pod(pod, &timed(seconds, argv))
            .unwrap_or_else(|e| panic!("starting {argv:?} in {pod}: {e}"));
        let mut process = Self::new(child);
        let first = process.line();
        (process, first)
    }

    /// The next stdout line ("" at end of output: the `timeout` wrapper bounds the wait).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_string()
    }

    /// The rest of stdout and stderr once the process has exited.
    pub fn finish(mut self) -> (String, String, ExitStatus) {
        let mut out = String::new();
        let _ = self.stdout.read_to_string(&mut out);
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        let status = self.child.wait().expect("wait for the process");
        (out, err, status)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic from Python sockets.

/// Prints "ready", accepts one connection on port argv[1], prints the number of bytes read
/// until EOF, or -1 when a byte was not `s`.
const TCP_SINK: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(30)
n = 0
ok = True
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if b.strip(b"s"):
        ok = False
    n += len(b)
print(n if ok else -1, flush=True)
"#;

/// Connects to argv[1]:argv[2] and sends argv[3] bytes of `s`, then closes.
const TCP_SOURCE: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
left = int(sys.argv[3])
chunk = b"s" * 65536
while left > 0:
    n = c.send(chunk[:min(left, len(chunk))])
    left -= n
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
print("sent", flush=True)
"#;

/// Prints "ready", then counts distinct datagram sequence numbers on port argv[1] until argv[2]
/// arrived or the socket is quiet for 2 s; prints the count.
pub const UDP_SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# 16 MiB (SO_RCVBUFFORCE as root): a burst released after a pause (a restart held the
# datagrams in the rx rings) must not overflow the default ~200 KiB while Python catches up.
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(2)
expected = int(sys.argv[2])
print("ready", flush=True)
seen = set()
while len(seen) < expected:
    try:
        b, _ = s.recvfrom(2048)
    except socket.timeout:
        break
    seen.add(int(b.split(b" ")[0]))
print(len(seen), flush=True)
"#;

/// Sends argv[3] numbered datagrams of argv[4] bytes to argv[1]:argv[2], paced at 1 ms.
pub const UDP_SOURCE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2]))
size = int(sys.argv[4])
for i in range(int(sys.argv[3])):
    msg = (str(i) + " ").encode()
    s.sendto(msg + b"u" * max(0, size - len(msg)), dst)
    time.sleep(0.001)
print("sent", flush=True)
"#;

/// A [`probe_name`]'s connect + answer timeout, in seconds.
const PROBE_TIMEOUT_S: &str = "1.5";

/// argv: name, TCP port, seconds. Prints "ready"; answers the first line of every connection
/// with `name`. Ends after `seconds` (SIGALRM).
pub const NAME_SERVER: &str = r#"
import signal, socket, sys, threading
name, port, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
signal.alarm(seconds)
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen(64)
def conn(c):
    try:
        c.settimeout(5)
        c.makefile("rb").readline()
        c.sendall((name + "\n").encode())
    except OSError:
        pass
    finally:
        c.close()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    threading.Thread(target=conn, args=(c,), daemon=True).start()
"#;

/// argv: host, port, timeout. One TCP request; prints the answer, or `error:CLASS`.
pub const NAME_PROBE: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"hi\n")
    line = s.makefile("rb").readline().decode().strip()
    print(line if line else "error:empty", flush=True)
except Exception as e:
    print("error:" + type(e).__name__, flush=True)
"#;

/// One TCP request from `from` to `ip:port`: the server's name, or `Err(error class)`.
pub fn probe_name(tb: &Testbed, from: &str, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let (ip, port) = (ip.to_string(), port.to_string());
    let out = tb
        .exec_in_pod(
            from,
            &timed(
                "10",
                &[python(), "-c", NAME_PROBE, &ip, &port, PROBE_TIMEOUT_S],
            ),
        )
        .unwrap_or_else(|e| panic!("probe from {from}: {e}"));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match line.strip_prefix("error:") {
        Some(class) => Err(class.to_string()),
        None if out.status.success() && !line.is_empty() => Ok(line),
        None => Err(format!("probe failed: {}", text(&out))),
    }
}

/// A paced UDP stream ([`UDP_SOURCE`], about one 64-byte datagram per millisecond) from one pod
/// to a [`UDP_SINK`] in another on port 9999, running while a test restarts things.
pub struct PacedStream {
    sink: Proc,
    source: Proc,
    pub datagrams: u64,
}

impl PacedStream {
    pub fn start(tb: &Testbed, from: &str, to: &str, datagrams: u64) -> Self {
        let to_ip = pod_ip(tb, to).to_string();
        let count = datagrams.to_string();
        let (sink, ready) =
            Proc::start_in_pod(tb, to, "40", &[python(), "-c", UDP_SINK, "9999", &count]);
        assert_eq!(ready, "ready", "UDP sink in {to} did not start");
        let source = tb
            .spawn_in_pod(
                from,
                &timed(
                    "40",
                    &[python(), "-c", UDP_SOURCE, &to_ip, "9999", &count, "64"],
                ),
            )
            .unwrap_or_else(|e| panic!("UDP source in {from}: {e}"));
        Self {
            sink,
            source: Proc::new(source),
            datagrams,
        }
    }

    /// Waits for both ends: the distinct datagrams the sink received (the source must have
    /// sent them all), and the sink's stderr.
    pub fn finish(self) -> (u64, String) {
        let (out, err, _) = self.source.finish();
        assert_eq!(out.trim(), "sent", "the UDP source: {err}");
        let (count, err, _) = self.sink.finish();
        let received = count
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the UDP sink printed {count:?} ({err})"));
        (received, err)
    }
}

/// Per node: the AF_XDP queues whose kernel counters show a drop (ring full, fill ring empty)
/// and the agent's counted drop reasons, so a loss names the ring or reason that took it.
pub fn ring_losses(tb: &Testbed, nodes: &[&str]) -> String {
    let mut out = String::new();
    for node in nodes {
        let status = match try_status(tb, node) {
            Ok(s) => s,
            Err(e) => {
                out.push_str(&format!("{node}: no status ({e})\n"));
                continue;
            }
        };
        for i in &status.interfaces {
            for q in &i.queues {
                if q.kernel_rx_dropped + q.kernel_rx_ring_full + q.kernel_rx_fill_ring_empty > 0 {
                    out.push_str(&format!("{node} {} {q:?}\n", i.name));
                }
            }
        }
        for d in status.drops.iter().filter(|d| d.count > 0) {
            out.push_str(&format!("{node} drop {} {}\n", d.reason, d.count));
        }
    }
    out
}

/// Transfers `bytes` of `s` over TCP from the pod `from` to the pod `to` (port 5201); returns
/// what the sink counted. Panics when the sink saw a byte that is not `s`.
pub fn tcp_transfer(tb: &Testbed, from: &str, to: &str, bytes: u64) -> u64 {
    let to_ip = pod_ip(tb, to).to_string();
    let (sink, ready) = Proc::start_in_pod(tb, to, "45", &[python(), "-c", TCP_SINK, "5201"]);
    assert_eq!(ready, "ready", "TCP sink in {to} did not start");
    let started = Instant::now();
    let size = bytes.to_string();
    let out = in_pod(
        tb,
        from,
        "40",
        &[python(), "-c", TCP_SOURCE, &to_ip, "5201", &size],
    );
    assert!(
        out.status.success(),
        "TCP source {from} -> {to} failed:\n{}",
        text(&out)
    );
    let elapsed = started.elapsed();
    let (rest, err, status) = sink.finish();
    let received = rest
        .trim()
        .parse::<i64>()
        .unwrap_or_else(|_| panic!("TCP sink output {rest:?} ({status}), stderr:\n{err}"));
    let received = u64::try_from(received).unwrap_or_else(|_| {
        panic!("TCP {from} -> {to}: the sink received bytes that were not sent")
    });
    eprintln!(
        "TCP {from} -> {to}: {received} bytes in {elapsed:?} ({:.0} Mbit/s)",
        received as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
    );
    received
}

/// Sends `count` numbered datagrams of `size` bytes from the pod `from` to the pod `to` (port
/// 5202); returns how many distinct ones arrived.
pub fn udp_datagrams(tb: &Testbed, from: &str, to: &str, count: u64, size: u32) -> u64 {
    let to_ip = pod_ip(tb, to).to_string();
    let expected = count.to_string();
    let (sink, ready) =
        Proc::start_in_pod(tb, to, "30", &[python(), "-c", UDP_SINK, "5202", &expected]);
    assert_eq!(ready, "ready", "UDP sink in {to} did not start");
    let size = size.to_string();
    let out = in_pod(
        tb,
        from,
        "30",
        &[python(), "-c", UDP_SOURCE, &to_ip, "5202", &expected, &size],
    );
    assert!(
        out.status.success(),
        "UDP source {from} -> {to}:\n{}",
        text(&out)
    );
    let (rest, err, status) = sink.finish();
    rest.trim()
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("UDP sink output {rest:?} ({status}), stderr:\n{err}"))
}

// ---------------------------------------------------------------------------------------------
// Frames on the fabric.

/// Every frame on an interface of the fabric namespace, written to a file as (u32 length, bytes)
/// records. Prints "ready", stops at stdin EOF, after argv[3] seconds or 100000 frames, then
/// prints the frame count.
const FRAME_CAPTURE: &str = r#"
import socket, sys, select, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
# A 64 MiB receive buffer (SO_RCVBUFFORCE, root): the default ~200 KiB overflows when the
# machine is busy and the capture falls behind.
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
s.bind((sys.argv[1], 0))
out = open(sys.argv[2], "wb")
deadline = time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
n = 0
while time.monotonic() < deadline and n < 100000:
    r, _, _ = select.select([s, sys.stdin], [], [], 0.2)
    if s in r:
        b = s.recv(65535)
        out.write(struct.pack("<I", len(b)) + b)
        n += 1
    elif sys.stdin in r and not sys.stdin.readline():
        break
while n < 100000:
    try:
        b = s.recv(65535, socket.MSG_DONTWAIT)
    except BlockingIOError:
        break
    out.write(struct.pack("<I", len(b)) + b)
    n += 1
out.close()
# PACKET_STATISTICS (SOL_PACKET 263, option 6): frames the kernel dropped for this socket.
_, drops = struct.unpack("<II", s.getsockopt(263, 6, 8))
print(n, drops, flush=True)
"#;

/// A capture of every frame on one interface of the fabric namespace (a Python `AF_PACKET`
/// socket, at most 60 s and 100000 frames); [`FabricCapture::stop`] returns the frames. The
/// process is killed by pid if the test panics first.
pub struct FabricCapture {
    proc: Proc,
    file: PathBuf,
}

impl FabricCapture {
    /// Starts capturing on `ifname` (in the fabric namespace) into `file`, and returns once the
    /// socket is bound.
    pub fn start(tb: &Testbed, ifname: &str, file: &Path) -> Self {
        let file_arg = file.display().to_string();
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", tb.fabric_netns()])
            .args(timed(
                "90",
                &[python(), "-c", FRAME_CAPTURE, ifname, &file_arg, "60"],
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut proc = Proc::new(command.spawn().expect("capture starts"));
        let ready = proc.line();
        assert_eq!(ready, "ready", "capture on {ifname} did not start");
        Self {
            proc,
            file: file.to_path_buf(),
        }
    }

    /// Stops the capture and returns every frame it saw, in order.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        drop(self.proc.child.stdin.take());
        let (count, err, status) = self.proc.finish();
        assert!(status.success(), "capture ({status}): {count}{err}");
        let bytes = std::fs::read(&self.file).expect("read the capture");
        let mut frames = Vec::new();
        let mut rest = bytes.as_slice();
        while rest.len() >= 4 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(frame) = rest.get(4..4 + len) else {
                break;
            };
            frames.push(frame.to_vec());
            rest = &rest[4 + len..];
        }
        let mut words = count.split_whitespace().map(|w| w.parse::<usize>().ok());
        let (counted, drops) = (words.next().flatten(), words.next().flatten());
        assert_eq!(
            counted,
            Some(frames.len()),
            "capture file holds every frame counted ({count})"
        );
        assert_eq!(
            drops,
            Some(0),
            "the capture socket dropped frames (the kernel's PACKET_STATISTICS): what it saw is \
             not everything that passed ({count})"
        );
        frames
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// What the fabric saw: IPv4 frames by kind, and anything that should not be there.
#[derive(Debug, Default)]
pub struct FabricReport {
    /// UDP 51871 <-> 51871 between the two node addresses.
    pub wireguard: usize,
    /// VXLAN (UDP to 8472) between the two node addresses.
    pub clear_vxlan: usize,
    /// Descriptions of every other IPv4 frame.
    pub other_ipv4: Vec<String>,
    /// Frames containing an inner address pair or a payload marker.
    pub leaks: Vec<String>,
}

/// Sorts captured fabric frames: WireGuard (UDP 51871 both ways) and clear VXLAN (to 8472)
/// between the `nodes`, any other IPv4, and leaks (a frame holding the `pods`' address pair,
/// `marker`, or the 64-byte `s`/`u` payloads of [`tcp_transfer`]/[`udp_datagrams`]).
pub fn inspect_fabric(
    frames: &[Vec<u8>],
    pods: (Ipv4Addr, Ipv4Addr),
    nodes: (Ipv4Addr, Ipv4Addr),
    marker: &[u8],
) -> FabricReport {
    let mut report = FabricReport::default();
    let (a, b) = (pods.0.octets(), pods.1.octets());
    let pair_ab: Vec<u8> = a.iter().chain(&b).copied().collect();
    let pair_ba: Vec<u8> = b.iter().chain(&a).copied().collect();
    let tcp_payload = [b's'; 64];
    let udp_payload = [b'u'; 64];
    let needles: [(&str, &[u8]); 5] = [
        ("pod address pair a->b", &pair_ab),
        ("pod address pair b->a", &pair_ba),
        ("ping marker", marker),
        ("TCP payload", &tcp_payload),
        ("UDP payload", &udp_payload),
    ];
    for (i, frame) in frames.iter().enumerate() {
        for (what, needle) in needles {
            if contains_bytes(frame, needle) {
                report.leaks.push(format!("frame {i}: {what}"));
            }
        }
        if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
            continue; // ARP, IPv6 neighbour discovery: no pod traffic
        }
        let ip = &frame[14..];
        let describe = || format!("frame {i}: {:02x?}", &ip[..ip.len().min(28)]);
        if ip.len() < 28 {
            report.other_ipv4.push(describe());
            continue;
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let ports = ip.get(header_len..header_len + 4).map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        });
        // IGMP reports that interfaces send when they come up: no pod traffic.
        if ip[9] == 2 && dst.is_multicast() {
            continue;
        }
        let between_nodes = (src, dst) == nodes || (dst, src) == nodes;
        let udp = ip[9] == 17 && between_nodes;
        if udp && ports == Some((51871, 51871)) {
            report.wireguard += 1;
        } else if udp && ports.is_some_and(|(_, dport)| dport == 8472) {
            report.clear_vxlan += 1;
            report.other_ipv4.push(describe());
        } else {
            report.other_ipv4.push(describe());
        }
    }
    report
}
