//! UMEM: the memory AF_XDP frames live in, one region per worker, split into fixed chunks.
//!
//! Backed by 2 MiB hugepages (`MAP_HUGETLB`) when the machine has them reserved
//! (`/proc/sys/vm/nr_hugepages`), else by normal pages with a warning: the TLB then misses more
//! often, and the kernel pins more pages. `MAP_POPULATE` faults everything in at start-up so
//! the per-packet path never page-faults.
//!
//! The memory is a memfd (hugetlb-backed when possible) mapped shared, so a hot restart can
//! hand it to the next agent: the fd travels over a unix socket with the AF_XDP sockets
//! registered on it, and the new process maps the same frames ([`UmemArea::from_fd`]) while
//! the kernel keeps receiving into them.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr::NonNull,
};

const HUGE_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Geometry of a UMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UmemConfig {
    /// Number of chunks (frames).
    pub frames: u32,
    /// Chunk size in bytes: 2048 or 4096 (aligned mode needs a power of two).
    pub frame_size: u32,
    /// Headroom the kernel leaves in front of received data in each chunk (beyond its own
    /// XDP_PACKET_HEADROOM), reserved for encapsulation headers pushed later.
    pub headroom: u32,
    /// Try 2 MiB hugepages first.
    pub hugepages: bool,
}

impl Default for UmemConfig {
    fn default() -> Self {
        Self {
            frames: 8192,
            frame_size: 4096,
            headroom: 256,
            hugepages: true,
        }
    }
}

/// Where a UMEM lives and its geometry: what a socket needs to register it (`XDP_UMEM_REG`).
/// Copyable, so sockets can be created off the worker thread that owns the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UmemRegion {
    pub addr: u64,
    pub len: u64,
    pub frame_size: u32,
    pub headroom: u32,
}

/// The mapped region.
pub struct UmemArea {
    ptr: NonNull<u8>,
    len: usize,
    config: UmemConfig,
    on_hugepages: bool,
    /// The memfd behind the mapping (what a hot restart hands over).
    fd: OwnedFd,
}

// SAFETY: the region is plain memory owned by this value; frames are handed between the
// kernel and one worker thread following the ring protocol.
unsafe impl Send for UmemArea {}

#[derive(Debug, thiserror::Error)]
pub enum UmemError {
    #[error("UMEM frame size {0} must be a power of two between 2048 and 65536")]
    FrameSize(u32),
    #[error("UMEM of {frames} frames must have at least one frame and at most 2^20")]
    Frames { frames: u32 },
    #[error("mapping {bytes} bytes for the UMEM failed: {source} (raise memlock / free memory)")]
    Mmap {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the handed-over UMEM holds {have} bytes, its geometry needs {want}")]
    Size { have: u64, want: u64 },
}

impl UmemArea {
    pub fn new(config: UmemConfig) -> Result<Self, UmemError> {
        if !config.frame_size.is_power_of_two() || !(2048..=65536).contains(&config.frame_size) {
            return Err(UmemError::FrameSize(config.frame_size));
        }
        if config.frames == 0 || config.frames > (1 << 20) {
            return Err(UmemError::Frames {
                frames: config.frames,
            });
        }
        let bytes = config.frames as usize * config.frame_size as usize;
        if config.hugepages {
            let len = bytes.div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
            match memfd(len, libc::MFD_HUGETLB | MFD_HUGE_2MB)
                .and_then(|fd| map(&fd, len).map(|ptr| (fd, ptr)))
            {
                Ok((fd, ptr)) => {
                    return Ok(Self {
                        ptr,
                        len,
                        config,
                        on_hugepages: true,
                        fd,
                    })
                }
                Err(e) => tracing::warn!(
                    bytes = len,
                    error = %e,
                    "no 2 MiB hugepages for the UMEM (reserve them: echo N > /proc/sys/vm/nr_hugepages); using normal pages"
                ),
            }
        }
        let mmap_err = |source| UmemError::Mmap { bytes, source };
        let fd = memfd(bytes, 0).map_err(mmap_err)?;
        let ptr = map(&fd, bytes).map_err(mmap_err)?;
        Ok(Self {
            ptr,
            len: bytes,
            config,
            on_hugepages: false,
            fd,
        })
    }

    /// Maps a UMEM another process created ([`UmemArea::fd`], handed over at a hot restart):
    /// the same frames, under this process's addresses.
    pub fn from_fd(fd: OwnedFd, config: UmemConfig) -> Result<Self, UmemError> {
        let want = u64::from(config.frames) * u64::from(config.frame_size);
        // SAFETY: a zeroed stat is a valid value of the plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on an fd we own into a live, writable stat.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(UmemError::Mmap {
                bytes: want as usize,
                source: std::io::Error::last_os_error(),
            });
        }
        let have = st.st_size as u64;
        if have < want {
            return Err(UmemError::Size { have, want });
        }
        let len = have as usize;
        let ptr = map(&fd, len).map_err(|source| UmemError::Mmap { bytes: len, source })?;
        Ok(Self {
            ptr,
            len,
            config,
            on_hugepages: is_hugetlb(&fd),
            fd,
        })
    }

    /// The memfd behind the mapping.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The region to register in sockets. The area must outlive every socket registered with it
    /// (the worker drops its ports first; the kernel also pins the pages while registered).
    pub fn region(&self) -> UmemRegion {
        UmemRegion {
            addr: self.addr(),
            len: self.len() as u64,
            frame_size: self.config.frame_size,
            headroom: self.config.headroom,
        }
    }
    pub fn config(&self) -> &UmemConfig {
        &self.config
    }
    pub fn on_hugepages(&self) -> bool {
        self.on_hugepages
    }
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    pub fn len(&self) -> usize {
        self.config.frames as usize * self.config.frame_size as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Start address (UMEM offset) of chunk `i`.
    pub fn frame_addr(&self, i: u32) -> u64 {
        u64::from(i) * u64::from(self.config.frame_size)
    }
    /// The chunk containing UMEM offset `addr`, and `addr`'s offset inside it. `None` if `addr`
    /// lies outside the UMEM (a kernel bug or a corrupted descriptor: never trust it blindly).
    #[inline]
    pub fn chunk_mut(&mut self, addr: u64) -> Option<(&mut [u8], usize)> {
        let fs = u64::from(self.config.frame_size);
        let base = addr & !(fs - 1);
        if base >= self.len() as u64 {
            return None;
        }
        // SAFETY: [base, base + frame_size) lies inside the mapping (checked above); the &mut
        // borrow of self guarantees no other slice into the area is alive in user space, and the
        // kernel does not touch a chunk while user space owns it (ring protocol).
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(base as usize), fs as usize)
        };
        Some((chunk, (addr - base) as usize))
    }
}

/// `MFD_HUGE_2MB` (21 << MFD_HUGE_SHIFT), not in every libc release.
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;

/// A memfd of `len` bytes.
fn memfd(len: usize, flags: libc::c_uint) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"sluice-umem".as_ptr(), libc::MFD_CLOEXEC | flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Whether `fd` lives on hugetlbfs (a hugetlb memfd).
fn is_hugetlb(fd: &OwnedFd) -> bool {
    // SAFETY: a zeroed statfs is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on an fd we own into a live, writable statfs.
    (unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == 0)
        && st.f_type == libc::HUGETLBFS_MAGIC as _
}

/// Maps `len` bytes of `fd` shared, faulted in (`MAP_POPULATE`).
fn map(fd: &OwnedFd, len: usize) -> std::io::Result<NonNull<u8>> {
    // SAFETY: shared mapping of a memfd we hold; result checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p as *mut u8).ok_or_else(std::io::Error::last_os_error)
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new`/`from_fd` mapped. Sockets using this UMEM are
        // dropped before it (the worker owns both and drops ports first); after a hot restart
        // the next process maps the same memfd, and the kernel keeps the pages it pinned.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(matches!(
            UmemArea::new(UmemConfig {
                frame_size: 3000,
                ..Default::default()
            }),
            Err(UmemError::FrameSize(3000))
        ));
        assert!(matches!(
            UmemArea::new(UmemConfig {
                frames: 0,
                ..Default::default()
            }),
            Err(UmemError::Frames { .. })
        ));
    }

    #[test]
    fn chunks_are_bounded() {
        let mut u = UmemArea::new(UmemConfig {
            frames: 4,
            frame_size: 2048,
            headroom: 0,
            hugepages: false,
        })
        .expect("map");
        let (chunk, off) = u.chunk_mut(2048 + 300).expect("inside");
        assert_eq!((chunk.len(), off), (2048, 300));
        chunk[0] = 7;
        assert!(u.chunk_mut(4 * 2048).is_none());
        assert!(u.chunk_mut(u64::MAX).is_none());
    }

    #[test]
    fn a_handed_over_umem_shows_the_same_frames() {
        let config = UmemConfig {
            frames: 4,
            frame_size: 2048,
            headroom: 0,
            hugepages: false,
        };
        let mut old = UmemArea::new(config).expect("map");
        old.chunk_mut(2048).expect("inside").0[5] = 42;
        let fd = old.fd().try_clone_to_owned().expect("dup");
        let mut new = UmemArea::from_fd(fd, config).expect("map again");
        assert_ne!(new.addr(), old.addr(), "a second mapping");
        assert_eq!(new.chunk_mut(2048).expect("inside").0[5], 42);
        new.chunk_mut(0).expect("inside").0[0] = 7;
        drop(new);
        assert_eq!(
            old.chunk_mut(0).expect("inside").0[0],
            7,
            "shared, not copied"
        );
        let small = UmemConfig {
            frames: 8,
            ..config
        };
        let fd = old.fd().try_clone_to_owned().expect("dup");
        assert!(matches!(
            UmemArea::from_fd(fd, small),
            Err(UmemError::Size {
                have: 8192,
                want: 16384
            })
        ));
    }
}
