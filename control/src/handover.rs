//! Hot restart: the running agent hands its dataplane to the next one over a unix socket, the
//! way Envoy's hot restart hands over listeners.
//!
//! ```text
//!  new agent (same --state-dir)                old agent
//!  connect <state-dir>/handover.sock  ------>  (listening since start)
//!  Hello {workers, UMEM, rings}       ------>  compatible? else Refused {reason}: it runs on,
//!                                              the new agent exits with the reason
//!                                              unlinks its API socket; workers stop between
//!                                              two batches (dataplane::handover)
//!                          <------  State {generation, applied cluster state, worker and
//!                                   attachment descriptions, WireGuard sessions} + fds
//!                                   (SCM_RIGHTS): UMEM memfds, AF_XDP sockets, XDP links and
//!                                   maps, the WireGuard socket; then each worker's flow records,
//!                                   then the session-affinity records (when there are any)
//!  maps UMEM and rings, imports flows
//!  and affinity entries,
//!  takes the XDP links, publishes its first
//!  snapshot: its workers forward
//!  Ack::Running                       ------>  exits without detaching anything
//!                      (or Ack::Failed / hang-up: the old agent takes its own state back,
//!                       restarts its workers and runs on)
//! ```
//!
//! Nothing the kernel sees changes: the XDP programs stay attached (their links now held by
//! the new process), the sockets stay bound and registered in the XSKMAPs, and what arrives
//! while neither agent runs a worker waits in the rx rings. See `dataplane::handover` for what
//! a worker carries and the limits.
//!
//! Framing: each message is `[u32 length][u32 fd count]` then `length` bytes of JSON (or raw
//! flow records); its fds ride on the header's `sendmsg`, at most [`FDS_PER_MSG`] each, and
//! the rest on one-byte messages that follow.
use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
};

/// The socket in the state directory.
pub const SOCKET_NAME: &str = "handover.sock";
/// Bumped when the messages change: agents of different protocols never hand over.
pub const PROTOCOL_VERSION: u32 = 1;
/// Fds attached to one `sendmsg` (the kernel allows 253).
pub const FDS_PER_MSG: usize = 200;
/// Largest message accepted (flow records of a full conntrack are 54 B x 2^20 per worker).
pub const MAX_MESSAGE_BYTES: u32 = 1 << 30;

/// The new agent introduces itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub version: u32,
    pub pid: u32,
    pub node: String,
    pub workers: usize,
    pub frames: u32,
    pub frame_size: u32,
    pub rings: [u32; 4],
}

/// An XDP attachment as it travels (`xdp_redirect::AttachmentMeta`); its fds follow the
/// workers' in the message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachmentWire {
    pub ifname: String,
    pub ifindex: u32,
    pub native: bool,
    pub host_flow_capacity: u32,
    pub port_words: Vec<(u8, u32, u64)>,
    pub dst_addrs: Vec<(std::net::Ipv4Addr, bool)>,
    #[serde(default)]
    pub host_fw: HostFwWire,
    #[serde(default)]
    pub tc_prog: bool,
    #[serde(default)]
    pub tc_link: bool,
}

/// `xdp_redirect::HostFwMeta` as it travels.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFwWire {
    pub on: bool,
    pub node_addrs: Vec<std::net::Ipv4Addr>,
    pub cluster_nodes: Vec<std::net::Ipv4Addr>,
    pub failsafe_words: Vec<(u8, u32, u64)>,
}

impl AttachmentWire {
    /// How many fds travel with it.
    pub fn fd_count(&self) -> usize {
        1 + xdp_redirect::MAP_NAMES.len() + usize::from(self.tc_prog) + usize::from(self.tc_link)
    }
}

impl From<&xdp_redirect::AttachmentMeta> for AttachmentWire {
    fn from(m: &xdp_redirect::AttachmentMeta) -> Self {
        Self {
            ifname: m.ifname.clone(),
            ifindex: m.ifindex,
            native: m.native,
            host_flow_capacity: m.host_flow_capacity,
            port_words: m.port_words.clone(),
            dst_addrs: m.dst_addrs.clone(),
            host_fw: HostFwWire {
                on: m.host_fw.on,
                node_addrs: m.host_fw.node_addrs.clone(),
                cluster_nodes: m.host_fw.cluster_nodes.clone(),
                failsafe_words: m.host_fw.failsafe_words.clone(),
            },
            tc_prog: m.tc_prog,
            tc_link: m.tc_link,
        }
    }
}

impl From<AttachmentWire> for xdp_redirect::AttachmentMeta {
    fn from(w: AttachmentWire) -> Self {
        Self {
            ifname: w.ifname,
            ifindex: w.ifindex,
            native: w.native,
            host_flow_capacity: w.host_flow_capacity,
            port_words: w.port_words,
            dst_addrs: w.dst_addrs,
            host_fw: xdp_redirect::HostFwMeta {
                on: w.host_fw.on,
                node_addrs: w.host_fw.node_addrs,
                cluster_nodes: w.host_fw.cluster_nodes,
                failsafe_words: w.host_fw.failsafe_words,
            },
            tc_prog: w.tc_prog,
            tc_link: w.tc_link,
        }
    }
}

/// Everything but the flow records. Fds, in order: each worker's (UMEM, then one per port),
/// then the uplink's attachment (link, then maps), then each endpoint's, then the WireGuard
/// socket when `wireguard` is there.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// The old agent's snapshot generation: the new one continues above it, so no flow's
    /// service-table tag can match a table it has not been checked against.
    pub generation: u64,
    /// The applied cluster state (cluster-file format).
    pub cluster_yaml: String,
    pub workers: Vec<dataplane::handover::WorkerMeta>,
    pub uplink: Option<AttachmentWire>,
    /// (container id, attachment) of every attached pod.
    pub endpoints: Vec<(String, AttachmentWire)>,
    /// The WireGuard slow path: sessions (keys, counters, replay windows) and peers.
    #[serde(default)]
    pub wireguard: Option<crate::wg_runtime::WgHandover>,
    /// Session-affinity entries (`dataplane::affinity` records) in the message after the flow
    /// records; none, and no message, when 0 (also from an agent that did not carry them).
    #[serde(default)]
    pub affinity_entries: usize,
}

impl State {
    /// How many fds the message carries.
    pub fn fd_count(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.ports.len() + 1)
            .sum::<usize>()
            + self.uplink.as_ref().map_or(0, AttachmentWire::fd_count)
            + self
                .endpoints
                .iter()
                .map(|(_, a)| a.fd_count())
                .sum::<usize>()
            + usize::from(self.wireguard.is_some())
    }
}

/// The old agent's answer to [`Hello`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Reply {
    /// It keeps running; why it would not hand over.
    Refused { reason: String },
    /// Followed by the fds, one flow-record message per worker, and the affinity records
    /// (when `affinity_entries > 0`).
    State(Box<State>),
}

/// The new agent's last word.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ack {
    /// Its workers forward: the old agent may exit.
    Running,
    /// It gave up: the old agent takes its state back.
    Failed { error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("hot-restart socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("hot-restart message of {0} bytes is over the limit of {MAX_MESSAGE_BYTES}")]
    TooLong(u32),
    #[error("hot-restart message carried {got} file descriptors, its header said {want}")]
    Fds { got: usize, want: usize },
    #[error("hot-restart message does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the other agent hung up")]
    HungUp,
}

/// Sends one message: `bytes` and `fds`.
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|l| *l <= MAX_MESSAGE_BYTES)
        .ok_or(WireError::TooLong(u32::MAX))?;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let mut chunks = fds.chunks(FDS_PER_MSG);
    send_with_fds(stream, &header, chunks.next().unwrap_or(&[]))?;
    for chunk in chunks {
        send_with_fds(stream, &[0u8], chunk)?;
    }
    (&*stream).write_all(bytes)?;
    Ok(())
}

/// Receives one message of [`send`].
pub fn recv(stream: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut header = [0u8; 8];
    let mut fds = Vec::new();
    let mut got = recv_with_fds(stream, &mut header, &mut fds)?;
    while got < header.len() {
        let n = (&*stream).read(&mut header[got..])?;
        if n == 0 {
            return Err(WireError::HungUp);
        }
        got += n;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let want = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLong(len));
    }
    while fds.len() < want {
        let before = fds.len();
        let mut one = [0u8; 1];
        recv_with_fds(stream, &mut one, &mut fds)?;
        if fds.len() == before {
            return Err(WireError::Fds { got: before, want });
        }
    }
    if fds.len() != want {
        return Err(WireError::Fds {
            got: fds.len(),
            want,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    (&*stream).read_exact(&mut bytes).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::HungUp
        } else {
            WireError::Io(e)
        }
    })?;
    Ok((bytes, fds))
}

/// Sends a JSON message.
pub fn send_json<T: serde::Serialize>(
    stream: &UnixStream,
    value: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    send(stream, &serde_json::to_vec(value)?, fds)
}

/// Receives a JSON message.
pub fn recv_json<T: serde::de::DeserializeOwned>(
    stream: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    let (bytes, fds) = recv(stream)?;
    Ok((serde_json::from_slice(&bytes)?, fds))
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<i32>()) as u32) as usize }
}

fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = vec![0u8; cmsg_space(fds.len().max(1))];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer has room for one header and fds.len() ints (CMSG_SPACE).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            let data = libc::CMSG_DATA(cmsg) as *mut i32;
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg points to live buffers (above).
        let r = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            if (r as usize) < bytes.len() {
                // The fds went with the first bytes; the rest is plain data.
                (&*stream).write_all(&bytes[r as usize..])?;
            }
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

/// Reads up to `buf.len()` bytes and the fds that came with them (appended to `fds`).
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, WireError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = vec![0u8; cmsg_space(FDS_PER_MSG)];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    let n = loop {
        // SAFETY: msg points to live buffers (above).
        let r = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    // SAFETY: walking the control messages the kernel wrote into `control` (bounded by
    // msg_controllen); SCM_RIGHTS data is an array of fds now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const i32;
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / 4 {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(WireError::Fds {
            got: fds.len(),
            want: usize::MAX,
        });
    }
    if n == 0 && !buf.is_empty() {
        return Err(WireError::HungUp);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd_with(byte: u8) -> OwnedFd {
        let f = tempfile::tempfile().expect("temp file");
        (&f).write_all(&[byte]).expect("write");
        OwnedFd::from(f)
    }

    fn first_byte(fd: OwnedFd) -> u8 {
        let mut f = std::fs::File::from(fd);
        let mut b = [0u8; 1];
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_exact(&mut b).expect("read");
        b[0]
    }

    #[test]
    fn messages_carry_their_fds_in_order_past_one_sendmsg() {
        let (a, b) = UnixStream::pair().expect("pair");
        let files: Vec<OwnedFd> = (0..450).map(|i| memfd_with((i % 251) as u8)).collect();
        let payload = vec![7u8; 3 << 20]; // larger than a socket buffer
        let sender = std::thread::spawn(move || {
            let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            send(&a, &payload, &borrowed).expect("send");
            send_json(&a, &Ack::Running, &[]).expect("send ack");
        });
        let (bytes, fds) = recv(&b).expect("recv");
        assert_eq!(bytes.len(), 3 << 20);
        assert!(bytes.iter().all(|x| *x == 7));
        assert_eq!(fds.len(), 450);
        for (i, fd) in fds.into_iter().enumerate() {
            assert_eq!(first_byte(fd), (i % 251) as u8, "fd {i} in order");
        }
        let (ack, none): (Ack, _) = recv_json(&b).expect("ack");
        assert_eq!(ack, Ack::Running);
        assert!(none.is_empty());
        sender.join().expect("sender");
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        let (a, b) = UnixStream::pair().expect("pair");
        // A length over the limit.
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&(MAX_MESSAGE_BYTES + 1).to_le_bytes());
        (&a).write_all(&h).expect("write");
        assert!(matches!(recv(&b), Err(WireError::TooLong(_))));
        // Fds promised, none sent.
        let mut h = [0u8; 8];
        h[4..].copy_from_slice(&3u32.to_le_bytes());
        (&a).write_all(&h).expect("write");
        (&a).write_all(&[0u8]).expect("write");
        assert!(matches!(recv(&b), Err(WireError::Fds { got: 0, want: 3 })));
        // JSON that is not a Reply.
        send(&a, b"{\"nope\":1}", &[]).expect("send");
        assert!(matches!(recv_json::<Reply>(&b), Err(WireError::Decode(_))));
        // A hang-up in the middle of a message.
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&100u32.to_le_bytes());
        (&a).write_all(&h).expect("write");
        (&a).write_all(&[1, 2, 3]).expect("write");
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::HungUp)));
        assert!(matches!(recv(&b), Err(WireError::HungUp)));
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn the_fd_count_follows_what_the_state_carries() {
        let wg = crate::wg_runtime::WgHandover {
            public_key: [1; 32],
            port: 51871,
            sessions: vec![crate::wg_runtime::SessionHandover {
                peer: [2; 32],
                receiver_index: 1,
                peer_index: 2,
                send_key: [3; 32],
                recv_key: [4; 32],
                created_ns: 5,
                initiator: true,
                peer_id: 1,
                sendable: true,
                counters_taken: 7,
                replay_words: vec![0; 256],
                replay_max: 0,
            }],
            peers: Vec::new(),
            next_peer_id: 2,
        };
        let s = State {
            generation: 3,
            cluster_yaml: String::new(),
            workers: Vec::new(),
            uplink: None,
            endpoints: Vec::new(),
            wireguard: Some(wg),
            affinity_entries: 2,
        };
        assert_eq!(s.fd_count(), 1);
        let bytes = serde_json::to_vec(&Reply::State(Box::new(s))).expect("encode");
        let back: Reply = serde_json::from_slice(&bytes).expect("decode");
        let Reply::State(back) = back else {
            panic!("not a state")
        };
        assert_eq!(back.fd_count(), 1);
        assert_eq!(back.affinity_entries, 2);
        assert_eq!(
            back.wireguard.expect("wireguard").sessions[0].counters_taken,
            7
        );
        // From an agent that did not carry affinity entries: none, and no message to read.
        let mut old: serde_json::Value = serde_json::from_slice(&bytes).expect("decode");
        old["State"]
            .as_object_mut()
            .expect("the state object")
            .remove("affinity_entries")
            .expect("the field was there");
        let Reply::State(back) = serde_json::from_value(old).expect("decode") else {
            panic!("not a state")
        };
        assert_eq!(back.affinity_entries, 0);
    }
}
