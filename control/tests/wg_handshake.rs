//! Interop of `control::wg::Device` with wireguard-go (Debian's package), privileged.
//!
//! Each test builds its own pair of network namespaces joined by a veth: "ours" holds a plain
//! UDP socket driven by a `Device`; "theirs" runs wireguard-go on a tun device configured with
//! `wg set`. Names carry the pid and a counter; namespaces and the wireguard-go process are
//! removed/killed (by pid) on drop, also on panic. Every wait is bounded.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::wg::{Action, Device, NoiseError, PeerConfig, PrivateKey, PublicKey, Session, Timers};

static COUNTER: AtomicU32 = AtomicU32::new(0);
const WG_PORT: u16 = 51871;
/// Tunnel addresses: ours (only inside the tunnel) and wireguard-go's tun.
const OUR_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const THEIR_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> anyhow::Result<Self> {
        run(&["ip", "netns", "add", &name])?;
        Ok(Self(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// wireguard-go in a namespace, killed by pid on drop.
struct WireguardGo {
    child: Child,
    netns: String,
    ifname: String,
}

impl WireguardGo {
    fn start(netns: &str, ifname: &str) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "wireguard-go", "-f", ifname])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let me = Self {
            child,
            netns: netns.to_owned(),
            ifname: ifname.to_owned(),
        };
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&sock).exists() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "wireguard-go did not create {sock}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    fn wg(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.netns, "wg"];
        full.extend_from_slice(args);
        run(&full)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // `ip netns exec` execs wireguard-go in place, so the child's pid is wireguard-go's.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.ifname));
    }
}

/// Two namespaces joined by a veth, wireguard-go in "theirs", our UDP socket in "ours".
struct Bed {
    wg: WireguardGo,
    socket: UdpSocket,
    their_addr: SocketAddr,
    their_key: PrivateKey,
    _ours: Netns,
    _theirs: Netns,
}

/// A UDP socket bound to `addr` inside namespace `netns` (created from a thread that entered it;
/// the socket stays in that namespace).
fn socket_in(netns: &str, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || -> anyhow::Result<UdpSocket> {
        let f = std::fs::File::open(&path)?;
        // SAFETY: setns on a valid namespace fd; only this short-lived thread changes namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        anyhow::ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
        Ok(UdpSocket::bind(addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("setns thread panicked"))?
}

fn bed(our_public: &PublicKey) -> anyhow::Result<Bed> {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let ours = Netns::new(format!("slwg-o-{pid}-{n}"))?;
    let theirs = Netns::new(format!("slwg-t-{pid}-{n}"))?;
    let subnet = 1 + (pid as u8 ^ n as u8) % 250;
    let our_ip = format!("10.98.{subnet}.1");
    let their_ip = format!("10.98.{subnet}.2");
    let (va, vb) = (
        format!("swa{}x{n}", pid % 100_000),
        format!("swb{}x{n}", pid % 100_000),
    );
    run(&[
        "ip", "link", "add", &va, "netns", &ours.0, "type", "veth", "peer", "name", &vb, "netns",
        &theirs.0,
    ])?;
    for (ns, dev, ip) in [(&ours.0, &va, &our_ip), (&theirs.0, &vb, &their_ip)] {
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            dev,
        ])?;
        run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    let ifname = format!("swg{}x{n}", pid % 100_000);
    let wg = WireguardGo::start(&theirs.0, &ifname)?;
    let their_key = PrivateKey::generate()?;
    let key_file = std::env::temp_dir().join(format!("slwg-{pid}-{n}.key"));
    std::fs::write(&key_file, their_key.to_base64())?;
    let socket = socket_in(&ours.0, format!("{our_ip}:{WG_PORT}").parse()?)?;
    let set = wg.wg(&[
        "set",
        &ifname,
        "private-key",
        &key_file.display().to_string(),
        "listen-port",
        "51871",
        "peer",
        &our_public.to_base64(),
        "endpoint",
        &format!("{our_ip}:{WG_PORT}"),
        "allowed-ips",
        &format!("{OUR_TUN_IP}/32"),
    ]);
    let _ = std::fs::remove_file(&key_file);
    set?;
    run(&[
        "ip",
        "-n",
        &theirs.0,
        "addr",
        "add",
        &format!("{THEIR_TUN_IP}/24"),
        "dev",
        &ifname,
    ])?;
    run(&["ip", "-n", &theirs.0, "link", "set", &ifname, "up"])?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(Bed {
        wg,
        socket,
        their_addr: format!("{their_ip}:{WG_PORT}").parse()?,
        their_key,
        _ours: ours,
        _theirs: theirs,
    })
}

struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

fn device(key: &PrivateKey, clock: &Clock) -> Device {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    Device::new(key, Timers::default(), clock.now(), unix)
}

/// Carries out `Send`s, returns the other actions.
fn execute(socket: &UdpSocket, actions: Vec<Action>) -> Vec<Action> {
    actions
        .into_iter()
        .filter(|a| match a {
            Action::Send { to, bytes } => {
                socket.send_to(bytes, to).expect("send");
                false
            }
            _ => true,
        })
        .collect()
}

/// Receives until `pred` accepts a datagram or `limit` passes; feeds handshake messages to the
/// device and returns (collected actions, transport messages seen).
fn pump(
    bed: &Bed,
    dev: &mut Device,
    clock: &Clock,
    limit: Duration,
    mut done: impl FnMut(&[Action], &[Vec<u8>]) -> bool,
) -> (Vec<Action>, Vec<Vec<u8>>) {
    let deadline = Instant::now() + limit;
    let (mut actions, mut transport) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline && !done(&actions, &transport) {
        match bed.socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let msg = &buf[..n];
                if msg.first() == Some(&4) {
                    transport.push(msg.to_vec());
                } else {
                    let out = dev.handle_datagram(from, msg, clock.now());
                    actions.extend(execute(&bed.socket, out));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                actions.extend(execute(&bed.socket, dev.tick(clock.now())));
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    (actions, transport)
}

fn established(actions: &[Action]) -> Option<Session> {
    actions.iter().find_map(|a| match a {
        Action::SessionEstablished { session, .. } => Some(session.clone()),
        _ => None,
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&ident.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

#[test]
fn we_initiate_wireguard_go_responds_and_answers_ping() -> anyhow::Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let clock = Clock(Instant::now());
    let ours = PrivateKey::generate()?;
    let bed = bed(&ours.public_key())?;
    let their_pub = bed.their_key.public_key();
    let mut dev = device(&ours, &clock);
    dev.add_peer(PeerConfig {
        public_key: their_pub,
        endpoint: bed.their_addr,
    });
    let first = dev.want_session(&their_pub, clock.now());
    execute(&bed.socket, first);
    let (actions, _) = pump(&bed, &mut dev, &clock, Duration::from_secs(10), |a, _| {
        established(a).is_some()
    });
    let session = established(&actions).expect("wireguard-go answered our initiation");
    assert!(session.is_initiator);
    assert!(actions.contains(&Action::SendKeepalive { peer: their_pub }));
    assert_eq!(dev.counters().handshakes_completed, 1);
    assert!(dev.latest_handshake(&their_pub).is_some());

    // Keepalive (counter 0) confirms the session for wireguard-go; then ping through the tunnel.
    bed.socket.send_to(
        &session.seal_transport(0, &[]).expect("seal"),
        bed.their_addr,
    )?;
    let payload = b"sluice-wg-interop";
    let ping = icmp_echo(OUR_TUN_IP, THEIR_TUN_IP, 0x5151, 1, payload);
    bed.socket.send_to(
        &session.seal_transport(1, &ping).expect("seal"),
        bed.their_addr,
    )?;
    let (_, transport) = pump(&bed, &mut dev, &clock, Duration::from_secs(10), |_, t| {
        t.iter()
            .any(|m| session.open_transport(m).is_ok_and(|(_, p)| !p.is_empty()))
    });
    let reply = transport
        .iter()
        .filter_map(|m| session.open_transport(m).ok())
        .map(|(_, p)| p)
        .find(|p| !p.is_empty())
        .expect("an encrypted echo reply from wireguard-go");
    assert_eq!(&reply[12..16], &THEIR_TUN_IP.octets(), "source");
    assert_eq!(&reply[16..20], &OUR_TUN_IP.octets(), "destination");
    assert_eq!(reply[9], 1, "ICMP");
    assert_eq!(reply[20], 0, "echo reply");
    assert_eq!(&reply[24..26], &0x5151u16.to_be_bytes(), "identifier");
    // WireGuard pads plaintext to 16 bytes: the IP total length says where the packet ends.
    let total = usize::from(u16::from_be_bytes([reply[2], reply[3]]));
    assert_eq!(total, ping.len());
    assert!(reply[..total].ends_with(payload));
    // wireguard-go reports the handshake too.
    let show = bed.wg.wg(&["show", &bed.wg.ifname, "latest-handshakes"])?;
    assert!(show.contains(&ours.public_key().to_base64()), "{show}");
    assert!(!show.trim().ends_with("\t0"), "{show}");
    Ok(())
}

#[test]
fn wireguard_go_initiates_and_we_respond() -> anyhow::Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let clock = Clock(Instant::now());
    let ours = PrivateKey::generate()?;
    let bed = bed(&ours.public_key())?;
    let their_pub = bed.their_key.public_key();
    let mut dev = device(&ours, &clock);
    dev.add_peer(PeerConfig {
        public_key: their_pub,
        endpoint: bed.their_addr,
    });
    bed.wg.wg(&[
        "set",
        &bed.wg.ifname,
        "peer",
        &ours.public_key().to_base64(),
        "persistent-keepalive",
        "1",
    ])?;
    let (actions, _) = pump(&bed, &mut dev, &clock, Duration::from_secs(10), |a, _| {
        established(a).is_some()
    });
    let session = established(&actions).expect("a session from wireguard-go's initiation");
    assert!(!session.is_initiator);
    assert_eq!(dev.counters().responses_sent, 1);
    // wireguard-go confirms with a keepalive on the new keys; we open it and confirm.
    let (_, transport) = pump(&bed, &mut dev, &clock, Duration::from_secs(10), |_, t| {
        t.iter().any(|m| session.open_transport(m).is_ok())
    });
    let msg = transport
        .iter()
        .find(|m| session.open_transport(m).is_ok())
        .expect("a transport message under the session we derived");
    let (_, packet) = session.open_transport(msg).expect("opens");
    assert!(packet.is_empty(), "a keepalive");
    let confirmed = dev.session_confirmed(&their_pub, session.local_index, clock.now());
    assert_eq!(
        confirmed,
        vec![Action::SessionConfirmed {
            peer: their_pub,
            local_index: session.local_index
        }]
    );
    assert!(dev.latest_handshake(&their_pub).is_some());
    Ok(())
}

#[test]
fn wrong_public_key_gives_no_session() -> anyhow::Result<()> {
    if !is_root() {
        println!("skipping: needs root");
        return Ok(());
    }
    let clock = Clock(Instant::now());
    let ours = PrivateKey::generate()?;
    // wireguard-go is told another key for us.
    let wrong = PrivateKey::generate()?.public_key();
    let bed = bed(&wrong)?;
    let their_pub = bed.their_key.public_key();
    let mut dev = device(&ours, &clock);
    dev.add_peer(PeerConfig {
        public_key: their_pub,
        endpoint: bed.their_addr,
    });
    // Our initiation: wireguard-go does not know our key and stays silent.
    execute(&bed.socket, dev.want_session(&their_pub, clock.now()));
    // Its initiations (persistent keepalive) are MAC'd for the wrong key: we refuse them.
    bed.wg.wg(&[
        "set",
        &bed.wg.ifname,
        "peer",
        &wrong.to_base64(),
        "persistent-keepalive",
        "1",
    ])?;
    let (actions, _) = pump(&bed, &mut dev, &clock, Duration::from_secs(4), |_, _| false);
    assert!(established(&actions).is_none(), "{actions:?}");
    assert!(
        dev.counters().initiations_received >= 1,
        "wireguard-go sent initiations"
    );
    assert_eq!(
        dev.counters().failures_for(NoiseError::BadMac1),
        dev.counters().initiations_received
    );
    assert_eq!(dev.counters().handshakes_completed, 0);
    assert_eq!(dev.latest_handshake(&their_pub), None);
    Ok(())
}
