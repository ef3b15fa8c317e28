//! Preallocated `sendmmsg`/`recvmmsg` batches over one contiguous buffer.
//!
//! The buffer, the iovecs and the message headers are allocated once; the raw pointers inside
//! the headers are refreshed from the buffer right before every system call, so they never
//! outlive a borrow of the buffer.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// `batch` slots of `slot_bytes` each.
pub struct Batch {
    buf: Vec<u8>,
    slot_bytes: usize,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct; all-zero (null pointers, zero lengths) is valid.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    pub fn new(batch: usize, slot_bytes: usize) -> Self {
        let batch = batch.max(1);
        Self {
            buf: vec![0; batch * slot_bytes],
            slot_bytes,
            iovecs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            msgs: (0..batch).map(|_| empty_mmsghdr()).collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.msgs.len()
    }

    /// Slot `i` (whole slot) for writing a packet.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let s = self.slot_bytes;
        &mut self.buf[i * s..(i + 1) * s]
    }

    /// The bytes received into slot `i` by the last [`Self::recv`].
    pub fn received(&self, i: usize) -> &[u8] {
        let s = self.slot_bytes;
        let len = (self.msgs[i].msg_len as usize).min(s);
        &self.buf[i * s..i * s + len]
    }

    fn point(&mut self, from: usize, n: usize) {
        let base = self.buf.as_mut_ptr();
        for i in from..from + n {
            // SAFETY: i < capacity, so the slot lies inside `buf`.
            self.iovecs[i].iov_base = unsafe { base.add(i * self.slot_bytes) }.cast();
            self.iovecs[i].iov_len = self.slot_bytes;
            let m = &mut self.msgs[i];
            m.msg_hdr.msg_iov = &mut self.iovecs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = std::ptr::null_mut();
            m.msg_hdr.msg_namelen = 0;
            m.msg_len = 0;
        }
    }

    /// Sends slots `from..from + n` on a connected socket; returns how many went out.
    pub fn send(&mut self, sock: &UdpSocket, from: usize, n: usize) -> io::Result<usize> {
        let n = n.min(self.capacity().saturating_sub(from));
        self.point(from, n);
        // SAFETY: msgs[from..from+n] point at iovecs and buffer slots owned by `self`, which
        // stay borrowed (and unmoved) for the duration of the call; the socket is connected, so
        // no destination address is needed.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr().add(from),
                n as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Receives up to a whole batch: blocks for the first datagram (up to the socket's receive
    /// timeout), then takes what is already queued (`MSG_WAITFORONE`). Datagrams longer than a
    /// slot are truncated.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let n = self.capacity();
        self.point(0, n);
        // SAFETY: every msgs[i] points at iovecs[i] and a slot of `buf`, all owned by `self`
        // and unmoved during the call; no timeout struct is passed.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

/// `true` for the errors a receive timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
