//! One AF_XDP socket bound to one (interface, rx queue), with its four rings.
//!
//! The first socket of a worker registers the worker's UMEM (`XDP_UMEM_REG`); later ones bind
//! with `XDP_SHARED_UMEM` to it. Every socket gets its own fill and completion ring (each is on
//! a different (interface, queue), which the kernel requires since 5.10), so a frame received on
//! one interface can be transmitted on another without a user-space copy.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{
    ring::{ConsRing, ProdRing, RingMap},
    sys,
    umem::UmemRegion,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSizes {
    pub rx: u32,
    pub tx: u32,
    pub fill: u32,
    pub completion: u32,
}

impl Default for RingSizes {
    fn default() -> Self {
        Self {
            rx: 2048,
            tx: 2048,
            fill: 2048,
            completion: 2048,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("AF_XDP socket on ifindex {ifindex} queue {queue}: {step}: {source}")]
pub struct SocketError {
    pub ifindex: u32,
    pub queue: u32,
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// How the kernel ended up moving frames for this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BindMode {
    ZeroCopy,
    Copy,
}

pub struct XskSocket {
    // Rings are dropped (unmapped) before the fd is closed: field order matters.
    pub rx: ConsRing<sys::xdp_desc>,
    pub tx: ProdRing<sys::xdp_desc>,
    pub fill: ProdRing<u64>,
    pub completion: ConsRing<u64>,
    fd: OwnedFd,
    ifindex: u32,
    queue: u32,
    mode: BindMode,
}

fn setsockopt<T>(fd: &OwnedFd, opt: libc::c_int, val: &T) -> std::io::Result<()> {
    // SAFETY: val points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            sys::SOL_XDP,
            opt,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt<T: Default>(fd: BorrowedFd<'_>, opt: libc::c_int) -> std::io::Result<T> {
    let mut val = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: val is a live, writable T of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            sys::SOL_XDP,
            opt,
            &mut val as *mut T as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(val)
}

type Rings = (
    RingMap<sys::xdp_desc>,
    RingMap<sys::xdp_desc>,
    RingMap<u64>,
    RingMap<u64>,
);

/// Maps the four rings of a socket whose ring sizes were set to `sizes`.
fn map_rings(fd: &OwnedFd, sizes: RingSizes) -> Result<Rings, (&'static str, std::io::Error)> {
    let off: sys::xdp_mmap_offsets =
        getsockopt(fd.as_fd(), sys::XDP_MMAP_OFFSETS).map_err(|e| ("XDP_MMAP_OFFSETS", e))?;
    let raw = fd.as_raw_fd();
    let rx =
        RingMap::map(raw, sys::XDP_PGOFF_RX_RING, &off.rx, sizes.rx).map_err(|e| ("mmap rx", e))?;
    let tx =
        RingMap::map(raw, sys::XDP_PGOFF_TX_RING, &off.tx, sizes.tx).map_err(|e| ("mmap tx", e))?;
    let fill = RingMap::map(raw, sys::XDP_UMEM_PGOFF_FILL_RING, &off.fr, sizes.fill)
        .map_err(|e| ("mmap fill", e))?;
    let completion = RingMap::map(
        raw,
        sys::XDP_UMEM_PGOFF_COMPLETION_RING,
        &off.cr,
        sizes.completion,
    )
    .map_err(|e| ("mmap completion", e))?;
    Ok((rx, tx, fill, completion))
}

impl XskSocket {
    /// Creates a socket on (`ifindex`, `queue`). With `shared_with = Some(fd)` of a bound socket
    /// that uses `umem`, binds with `XDP_SHARED_UMEM`; otherwise registers `umem` itself.
    pub fn new(
        umem: &UmemRegion,
        ifindex: u32,
        queue: u32,
        sizes: RingSizes,
        shared_with: Option<BorrowedFd<'_>>,
    ) -> Result<Self, SocketError> {
        let err = |step, source| SocketError {
            ifindex,
            queue,
            step,
            source,
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(sys::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("socket(AF_XDP)", std::io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if shared_with.is_none() {
            let reg = sys::xdp_umem_reg {
                addr: umem.addr,
                len: umem.len,
                chunk_size: umem.frame_size,
                headroom: umem.headroom,
                flags: 0,
                tx_metadata_len: 0,
            };
            setsockopt(&fd, sys::XDP_UMEM_REG, &reg).map_err(|e| err("XDP_UMEM_REG", e))?;
        }
        setsockopt(&fd, sys::XDP_UMEM_FILL_RING, &sizes.fill)
            .map_err(|e| err("XDP_UMEM_FILL_RING", e))?;
        setsockopt(&fd, sys::XDP_UMEM_COMPLETION_RING, &sizes.completion)
            .map_err(|e| err("XDP_UMEM_COMPLETION_RING", e))?;
        setsockopt(&fd, sys::XDP_RX_RING, &sizes.rx).map_err(|e| err("XDP_RX_RING", e))?;
        setsockopt(&fd, sys::XDP_TX_RING, &sizes.tx).map_err(|e| err("XDP_TX_RING", e))?;
        let rings = map_rings(&fd, sizes).map_err(|(step, e)| err(step, e))?;
        let mut addr = sys::sockaddr_xdp {
            sxdp_family: sys::AF_XDP as u16,
            sxdp_flags: sys::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        if let Some(shared) = shared_with {
            // The kernel refuses other flags with XDP_SHARED_UMEM; need-wakeup and copy/zero-copy
            // are inherited from the socket that registered the UMEM.
            addr.sxdp_flags = sys::XDP_SHARED_UMEM;
            addr.sxdp_shared_umem_fd = shared.as_raw_fd() as u32;
        }
        // SAFETY: addr is a valid sockaddr_xdp of the size passed.
        let r = unsafe {
            libc::bind(
                raw,
                &addr as *const sys::sockaddr_xdp as *const libc::sockaddr,
                std::mem::size_of::<sys::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(err("bind", std::io::Error::last_os_error()));
        }
        Ok(Self::from_parts(fd, rings, ifindex, queue))
    }

    /// Takes over a bound socket another process created (a hot restart hands its fd over a
    /// unix socket): maps its rings again with the same `sizes`. The ring indices live in the
    /// shared mapping, so the rings continue where the other process left them: what the
    /// kernel received meanwhile waits on rx, what it has not sent yet on tx.
    pub fn adopt(
        fd: OwnedFd,
        ifindex: u32,
        queue: u32,
        sizes: RingSizes,
    ) -> Result<Self, SocketError> {
        let rings = map_rings(&fd, sizes).map_err(|(step, source)| SocketError {
            ifindex,
            queue,
            step,
            source,
        })?;
        Ok(Self::from_parts(fd, rings, ifindex, queue))
    }

    fn from_parts(fd: OwnedFd, rings: Rings, ifindex: u32, queue: u32) -> Self {
        let opts: u32 = getsockopt(fd.as_fd(), sys::XDP_OPTIONS).unwrap_or(0);
        let mode = if opts & sys::XDP_OPTIONS_ZEROCOPY != 0 {
            BindMode::ZeroCopy
        } else {
            BindMode::Copy
        };
        let (rx, tx, fill, completion) = rings;
        Self {
            rx: ConsRing::new(rx),
            tx: ProdRing::new(tx),
            fill: ProdRing::new(fill),
            completion: ConsRing::new(completion),
            fd,
            ifindex,
            queue,
            mode,
        }
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
    pub fn queue(&self) -> u32 {
        self.queue
    }
    pub fn mode(&self) -> BindMode {
        self.mode
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Kicks the kernel to transmit (copy mode transmits only from sendto). Transient errors
    /// (EAGAIN, EBUSY, ENOBUFS, ENETDOWN) are returned for counting, never fatal.
    #[inline]
    pub fn kick_tx(&self) -> Result<(), i32> {
        // SAFETY: zero-length sendto on our own socket.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(())
    }

    /// Wakes the kernel to refill rx (only when the fill ring asks for it).
    #[inline]
    pub fn kick_rx(&self) {
        // SAFETY: zero-length non-blocking recvfrom on our own socket.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    /// The kernel's drop counters for this socket.
    pub fn kernel_stats(&self) -> std::io::Result<sys::xdp_statistics> {
        getsockopt(self.fd.as_fd(), sys::XDP_STATISTICS)
    }
}
