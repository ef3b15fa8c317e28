//! Host-local IP address management for pod interfaces, persisted on disk.
//!
//! The layout follows the reference `host-local` plugin so that an operator who knows it can read
//! the state with `ls` and `cat`:
//!
//! ```text
//! <data_dir>/lock               flock(2)ed (exclusive) around every operation
//! <data_dir>/last_reserved_ip   the address handed out last; allocation continues after it
//! <data_dir>/10.244.1.7         one file per allocated address: "<container id>\n<ifname>"
//! ```
//!
//! Design decisions and limits:
//! - The pool is the pod CIDR minus its network address, the gateway and the broadcast address.
//!   A /31 or /32 therefore has no usable address.
//! - Allocation is round-robin after `last_reserved_ip`, so an address just released is not
//!   handed out again at once (a peer may still have it in its caches).
//! - A specific address can be requested (host-local's `CNI_ARGS` `IP=<addr>`). As upstream
//!   (`allocator.Get` with a `requestedIP`): it must be in the range (podCIDR without network and
//!   broadcast), must not be the gateway, and is reserved only if no file names it; a reserved
//!   request also becomes `last_reserved_ip`. Unlike upstream, a repeated ADD of the same
//!   container and ifname that already holds the requested address gets it back (ADD is
//!   idempotent here, see [`Pool::allocate`]), and one that holds a *different* address is
//!   refused rather than given a second one. There is one range (the node's podCIDR), so "not in
//!   any range" and "not in this range" are the same error.
//! - An address file is written to a temporary file first and then hard-linked to its final
//!   name: `link(2)` fails when the name exists, so a crash never leaves an empty, ownerless
//!   reservation and two writers can never own one address even without the lock.
//! - The lock is `flock(2)` on an open file description: it serialises separate processes and
//!   also separate [`Pool`] values in one process (tests rely on that).
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "lock";
/// Name of the file that remembers the address handed out last.
pub const LAST_RESERVED_FILE: &str = "last_reserved_ip";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("the pod IP pool {cidr} is exhausted ({size} usable addresses, all allocated in {dir}); delete stale pods or give the node a larger podCIDR")]
    Exhausted {
        cidr: Ipv4Net,
        size: u64,
        dir: PathBuf,
    },
    #[error("the gateway {gateway} is not inside the pod CIDR {cidr}; fix `gateway` or `podCIDR` in the CNI config")]
    GatewayOutsideCidr { gateway: Ipv4Addr, cidr: Ipv4Net },
    /// Upstream: "failed to allocate all requested IPs: <ip>" (no range contains it).
    #[error("failed to allocate all requested IPs: {ip} is not in range set {first}-{last} (the usable addresses of podCIDR {cidr}); request an address inside it, or none")]
    RequestedOutsideRange {
        ip: Ipv4Addr,
        cidr: Ipv4Net,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    /// Upstream: "requested ip <ip> is subnet's gateway".
    #[error("requested ip {ip} is subnet's gateway (podCIDR {cidr}); request another address")]
    RequestedGateway { ip: Ipv4Addr, cidr: Ipv4Net },
    /// Upstream: "requested IP address <ip> is not available in range set <range>".
    #[error("requested IP address {ip} is not available in range set {first}-{last}: {path} gives it to container {holder:?} interface {holder_ifname:?}; delete that pod (CNI DEL) or request another address")]
    RequestedTaken {
        ip: Ipv4Addr,
        first: Ipv4Addr,
        last: Ipv4Addr,
        path: PathBuf,
        holder: String,
        holder_ifname: String,
    },
    #[error("requested IP address {requested} for container {container_id:?} interface {ifname:?}, which already holds {held} ({dir}); DEL the container before adding it with another address")]
    RequestedButHoldsAnother {
        requested: Ipv4Addr,
        held: Ipv4Addr,
        container_id: String,
        ifname: String,
        dir: PathBuf,
    },
    #[error("IPAM state {path}: {source} (check that the CNI data directory is writable)")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An allocation: who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

/// The address pool of one node, backed by files in `dir`.
#[derive(Clone, Debug)]
pub struct Pool {
    dir: PathBuf,
    cidr: Ipv4Net,
    gateway: Ipv4Addr,
}

/// Holds the exclusive flock until dropped (closing the file releases it).
struct LockGuard {
    _file: File,
}

impl Pool {
    /// A pool over `cidr` (host bits are ignored) with `gateway` reserved, stored in `dir`
    /// (created on first use). Fails when the gateway is not inside the CIDR.
    pub fn new(
        dir: impl Into<PathBuf>,
        cidr: Ipv4Net,
        gateway: Ipv4Addr,
    ) -> Result<Self, IpamError> {
        let cidr = cidr.trunc();
        if !cidr.contains(&gateway) {
            return Err(IpamError::GatewayOutsideCidr { gateway, cidr });
        }
        Ok(Self {
            dir: dir.into(),
            cidr,
            gateway,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// Number of addresses the pool can hand out.
    pub fn size(&self) -> u64 {
        let (first, last) = self.host_range();
        if last < first {
            return 0;
        }
        let span = u64::from(u32::from(last)) - u64::from(u32::from(first)) + 1;
        if self.in_host_range(self.gateway) {
            span - 1
        } else {
            span
        }
    }

    /// Returns the address of (`container_id`, `ifname`).
    ///
    /// Without `requested`: the one it already holds if any (ADD is idempotent), otherwise the
    /// next free one after `last_reserved_ip`. With `requested` (`CNI_ARGS` `IP=`): exactly that
    /// address, if it is in the range, not the gateway, and free or already held by this
    /// container and ifname; otherwise an error that names the address and, when it is taken,
    /// its holder. Nothing is written when the request is refused.
    pub fn allocate(
        &self,
        container_id: &str,
        ifname: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = requested {
            self.check_requested(ip)?;
        }
        let _lock = self.lock()?;
        let mut held = None;
        for allocation in self.read_allocations()? {
            if allocation.container_id == container_id && allocation.ifname == ifname {
                if self.is_allocatable(allocation.ip) && held.is_none() {
                    held = Some(allocation.ip);
                } else {
                    // Left over from an older podCIDR, or a duplicate: it is ours, drop it.
                    self.remove_address_file(allocation.ip)?;
                }
            }
        }
        if let Some(ip) = requested {
            return self.reserve_requested(container_id, ifname, ip, held);
        }
        if let Some(ip) = held {
            return Ok(ip);
        }

        let (first, last) = self.host_range();
        let size = self.size();
        if size == 0 {
            return Err(self.exhausted(size));
        }
        let start = match self.read_last_reserved()? {
            Some(ip) if self.in_host_range(ip) => next_in_range(ip, first, last),
            _ => first,
        };
        let content = format!("{container_id}\n{ifname}");
        let mut candidate = start;
        // One pass over the host range: bounded by its size (at most 2^32 but in practice a /24).
        loop {
            if candidate != self.gateway && self.try_reserve(candidate, &content)? {
                self.write_last_reserved(candidate)?;
                return Ok(candidate);
            }
            candidate = next_in_range(candidate, first, last);
            if candidate == start {
                return Err(self.exhausted(size));
            }
        }
    }

    /// Releases every address held by (`container_id`, `ifname`) and returns them. Releasing
    /// something that holds nothing is not an error (CNI DEL is idempotent).
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for allocation in self.read_allocations()? {
            if allocation.container_id == container_id && allocation.ifname == ifname {
                self.remove_address_file(allocation.ip)?;
                released.push(allocation.ip);
            }
        }
        Ok(released)
    }

    /// The address held by (`container_id`, `ifname`), if any.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        Ok(self
            .read_allocations()?
            .into_iter()
            .find(|a| {
                a.container_id == container_id && a.ifname == ifname && self.is_allocatable(a.ip)
            })
            .map(|a| a.ip))
    }

    /// Every allocation on disk, sorted by address.
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let _lock = self.lock()?;
        self.read_allocations()
    }

    /// The checks of a requested address that need no state: in the range, not the gateway.
    fn check_requested(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.in_host_range(ip) {
            let (first, last) = self.host_range();
            return Err(IpamError::RequestedOutsideRange {
                ip,
                cidr: self.cidr,
                first,
                last,
            });
        }
        if ip == self.gateway {
            return Err(IpamError::RequestedGateway {
                ip,
                cidr: self.cidr,
            });
        }
        Ok(())
    }

    /// Reserves `ip` (already checked by [`Self::check_requested`]) for the container, which
    /// holds `held` (an allocatable address) or nothing. Called with the lock held.
    fn reserve_requested(
        &self,
        container_id: &str,
        ifname: &str,
        ip: Ipv4Addr,
        held: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        match held {
            Some(held) if held == ip => return Ok(ip),
            Some(held) => {
                return Err(IpamError::RequestedButHoldsAnother {
                    requested: ip,
                    held,
                    container_id: container_id.to_string(),
                    ifname: ifname.to_string(),
                    dir: self.dir.clone(),
                })
            }
            None => {}
        }
        if self.try_reserve(ip, &format!("{container_id}\n{ifname}"))? {
            self.write_last_reserved(ip)?;
            return Ok(ip);
        }
        // Another container's file: name it. (Under the lock nobody removes it meanwhile; a
        // writer that ignores the lock could, then the holder reads as empty.)
        let path = self.dir.join(ip.to_string());
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(IpamError::Io { path, source: e }),
        };
        let mut lines = text.lines();
        let (first, last) = self.host_range();
        Err(IpamError::RequestedTaken {
            ip,
            first,
            last,
            holder: lines.next().unwrap_or_default().trim().to_string(),
            holder_ifname: lines.next().unwrap_or_default().trim().to_string(),
            path,
        })
    }

    fn exhausted(&self, size: u64) -> IpamError {
        IpamError::Exhausted {
            cidr: self.cidr,
            size,
            dir: self.dir.clone(),
        }
    }

    fn io_err(&self, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
        let path = path.to_path_buf();
        move |source| IpamError::Io { path, source }
    }

    fn lock(&self) -> Result<LockGuard, IpamError> {
        fs::create_dir_all(&self.dir).map_err(self.io_err(&self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.io_err(&path))?;
        file.lock().map_err(self.io_err(&path))?;
        Ok(LockGuard { _file: file })
    }

    /// First and last host address (network and broadcast excluded). `last < first` when the
    /// prefix leaves no host addresses.
    fn host_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let network = u32::from(self.cidr.network());
        let broadcast = u32::from(self.cidr.broadcast());
        if broadcast.saturating_sub(network) < 2 {
            return (
                Ipv4Addr::from(network.wrapping_add(1)),
                Ipv4Addr::from(network),
            );
        }
        (Ipv4Addr::from(network + 1), Ipv4Addr::from(broadcast - 1))
    }

    fn in_host_range(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.host_range();
        first <= ip && ip <= last
    }

    fn is_allocatable(&self, ip: Ipv4Addr) -> bool {
        self.in_host_range(ip) && ip != self.gateway
    }

    /// Creates the address file with `content` unless it exists. Returns whether it was created.
    fn try_reserve(&self, ip: Ipv4Addr, content: &str) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        if path.exists() {
            return Ok(false);
        }
        let tmp = self.dir.join(format!(".{ip}.tmp.{}", std::process::id()));
        write_file(&tmp, content).map_err(self.io_err(&tmp))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(IpamError::Io { path, source: e }),
        }
    }

    fn remove_address_file(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(IpamError::Io { path, source: e }),
        }
    }

    fn read_last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        match fs::read_to_string(&path) {
            // A garbled file only costs round-robin order: start from the beginning.
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IpamError::Io { path, source: e }),
        }
    }

    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        let tmp = self
            .dir
            .join(format!(".{LAST_RESERVED_FILE}.tmp.{}", std::process::id()));
        write_file(&tmp, &ip.to_string()).map_err(self.io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(self.io_err(&path))
    }

    /// Reads all address files. Files whose name is not an IPv4 address (lock, temporaries,
    /// last_reserved_ip) are skipped; an address file without an ifname line counts with an
    /// empty ifname (older host-local files hold only the container id).
    fn read_allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(IpamError::Io {
                    path: self.dir.clone(),
                    source: e,
                })
            }
        };
        let mut allocations = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io_err(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(IpamError::Io { path, source: e }),
            };
            let mut lines = text.lines();
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            allocations.push(Allocation {
                ip,
                container_id,
                ifname,
            });
        }
        allocations.sort_by_key(|a| a.ip);
        Ok(allocations)
    }
}

fn next_in_range(ip: Ipv4Addr, first: Ipv4Addr, last: Ipv4Addr) -> Ipv4Addr {
    if ip >= last {
        first
    } else {
        Ipv4Addr::from(u32::from(ip) + 1)
    }
}

fn write_file(path: &Path, content: &str) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Arc, thread};

    use super::*;

    fn pool(dir: &Path, cidr: &str) -> Pool {
        let cidr: Ipv4Net = cidr.parse().expect("test cidr");
        let gateway = Ipv4Addr::from(u32::from(cidr.network()) + 1);
        Pool::new(dir, cidr, gateway).expect("pool")
    }

    #[test]
    fn pool_excludes_network_gateway_and_broadcast() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(pool(dir.path(), "10.1.0.0/24").size(), 253);
        assert_eq!(pool(dir.path(), "10.1.0.0/30").size(), 1);
        assert_eq!(pool(dir.path(), "10.1.0.0/31").size(), 0);
        let p = pool(dir.path(), "10.1.0.0/30");
        assert_eq!(
            p.allocate("c1", "eth0", None).expect("allocate"),
            Ipv4Addr::new(10, 1, 0, 2)
        );
    }

    #[test]
    fn allocation_is_round_robin_and_writes_host_local_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.1.0.0/29"); // hosts .1-.6, gateway .1 -> .2..=.6
        let a = p.allocate("a", "eth0", None).expect("a");
        let b = p.allocate("b", "eth0", None).expect("b");
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3))
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("10.1.0.2")).expect("file"),
            "a\neth0"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(LAST_RESERVED_FILE)).expect("last"),
            "10.1.0.3"
        );
        // Releasing a does not make the next allocation reuse .2: it continues after .3.
        assert_eq!(p.release("a", "eth0").expect("release"), vec![a]);
        assert!(!dir.path().join("10.1.0.2").exists());
        assert_eq!(
            p.allocate("c", "eth0", None).expect("c"),
            Ipv4Addr::new(10, 1, 0, 4)
        );
        assert_eq!(
            p.allocate("d", "eth0", None).expect("d"),
            Ipv4Addr::new(10, 1, 0, 5)
        );
        assert_eq!(
            p.allocate("e", "eth0", None).expect("e"),
            Ipv4Addr::new(10, 1, 0, 6)
        );
        // Wraps around past the broadcast and skips the gateway: .2 is free again.
        assert_eq!(
            p.allocate("f", "eth0", None).expect("f"),
            Ipv4Addr::new(10, 1, 0, 2)
        );
    }

    #[test]
    fn allocation_continues_from_last_reserved_across_pool_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        pool(dir.path(), "10.1.0.0/24")
            .allocate("a", "eth0", None)
            .expect("a");
        let fresh = pool(dir.path(), "10.1.0.0/24");
        assert_eq!(
            fresh.allocate("b", "eth0", None).expect("b"),
            Ipv4Addr::new(10, 1, 0, 3)
        );
    }

    #[test]
    fn allocate_is_idempotent_per_container_and_ifname() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.1.0.0/24");
        let first = p.allocate("a", "eth0", None).expect("first");
        assert_eq!(p.allocate("a", "eth0", None).expect("again"), first);
        assert_eq!(p.lookup("a", "eth0").expect("lookup"), Some(first));
        let other_if = p.allocate("a", "net1", None).expect("other ifname");
        assert_ne!(other_if, first);
        assert_eq!(p.allocations().expect("list").len(), 2);
    }

    #[test]
    fn release_of_unknown_container_is_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(&dir.path().join("not-yet-created"), "10.1.0.0/24");
        assert_eq!(
            p.release("nobody", "eth0").expect("release"),
            Vec::<Ipv4Addr>::new()
        );
        assert_eq!(p.lookup("nobody", "eth0").expect("lookup"), None);
    }

    #[test]
    fn exhausted_pool_names_the_cidr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.9.0.0/30");
        p.allocate("a", "eth0", None).expect("the only address");
        let err = p
            .allocate("b", "eth0", None)
            .expect_err("pool of one is full");
        assert!(
            matches!(err, IpamError::Exhausted { size: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("10.9.0.0/30"), "{err}");
        // The holder still gets its address back.
        assert_eq!(
            p.allocate("a", "eth0", None).expect("idempotent"),
            Ipv4Addr::new(10, 9, 0, 2)
        );
    }

    #[test]
    fn gateway_outside_cidr_is_rejected() {
        let cidr: Ipv4Net = "10.1.0.0/24".parse().expect("cidr");
        let err = Pool::new("/nonexistent", cidr, Ipv4Addr::new(10, 2, 0, 1)).expect_err("outside");
        assert!(err.to_string().contains("10.2.0.1"), "{err}");
    }

    #[test]
    fn stale_address_outside_the_cidr_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("10.7.0.9"), "a\neth0").expect("stale file");
        let p = pool(dir.path(), "10.1.0.0/24");
        assert_eq!(
            p.allocate("a", "eth0", None).expect("allocate"),
            Ipv4Addr::new(10, 1, 0, 2)
        );
        assert!(!dir.path().join("10.7.0.9").exists());
    }

    #[test]
    fn a_requested_free_address_is_reserved_and_becomes_last_reserved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.244.1.0/24");
        let want = Ipv4Addr::new(10, 244, 1, 10);
        assert_eq!(p.allocate("a", "eth0", Some(want)).expect("free"), want);
        assert_eq!(
            fs::read_to_string(dir.path().join("10.244.1.10")).expect("file"),
            "a\neth0"
        );
        // As host-local: the request moves the round-robin cursor.
        assert_eq!(
            fs::read_to_string(dir.path().join(LAST_RESERVED_FILE)).expect("last"),
            "10.244.1.10"
        );
        assert_eq!(
            p.allocate("b", "eth0", None).expect("next"),
            Ipv4Addr::new(10, 244, 1, 11)
        );
        assert_eq!(p.lookup("a", "eth0").expect("lookup"), Some(want));
    }

    #[test]
    fn a_requested_address_already_held_by_the_same_container_is_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.244.1.0/24");
        let want = Ipv4Addr::new(10, 244, 1, 10);
        p.allocate("a", "eth0", Some(want)).expect("first ADD");
        assert_eq!(p.allocate("a", "eth0", Some(want)).expect("again"), want);
        assert_eq!(p.allocations().expect("list").len(), 1);
        // Same container, other ifname: that is another holder.
        let err = p
            .allocate("a", "net1", Some(want))
            .expect_err("held by a/eth0");
        assert!(
            matches!(err, IpamError::RequestedTaken { ref holder_ifname, .. } if holder_ifname == "eth0"),
            "{err:?}"
        );
    }

    #[test]
    fn a_requested_address_held_by_another_container_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.244.1.0/24");
        let want = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(
            p.allocate("first", "eth0", None).expect("round robin"),
            want
        );
        let err = p.allocate("second", "eth0", Some(want)).expect_err("taken");
        match &err {
            IpamError::RequestedTaken {
                ip, holder, path, ..
            } => {
                assert_eq!(*ip, want);
                assert_eq!(holder, "first");
                assert_eq!(path, &dir.path().join("10.244.1.2"));
            }
            other => panic!("wrong error {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with(
                "requested IP address 10.244.1.2 is not available in range set 10.244.1.1-10.244.1.254"
            ),
            "{text}"
        );
        assert!(text.contains("\"first\""), "{text}");
        // Nothing was written for the refused container, and the holder keeps its address.
        assert_eq!(p.lookup("second", "eth0").expect("lookup"), None);
        assert_eq!(p.lookup("first", "eth0").expect("lookup"), Some(want));
        assert_eq!(p.allocations().expect("list").len(), 1);
    }

    #[test]
    fn a_request_from_a_container_holding_another_address_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.244.1.0/24");
        let held = p.allocate("a", "eth0", None).expect("round robin");
        let want = Ipv4Addr::new(10, 244, 1, 10);
        let err = p.allocate("a", "eth0", Some(want)).expect_err("holds .2");
        assert!(
            matches!(err, IpamError::RequestedButHoldsAnother { requested, held: h, .. } if requested == want && h == held),
            "{err:?}"
        );
        assert!(err.to_string().contains("10.244.1.10"), "{err}");
        assert!(!dir.path().join("10.244.1.10").exists());
        assert_eq!(p.lookup("a", "eth0").expect("lookup"), Some(held));
    }

    #[test]
    fn requests_outside_the_range_or_for_the_gateway_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pool(dir.path(), "10.244.1.0/24");
        for outside in [
            Ipv4Addr::new(10, 244, 2, 10),  // another node's CIDR
            Ipv4Addr::new(10, 244, 1, 0),   // network address
            Ipv4Addr::new(10, 244, 1, 255), // broadcast
        ] {
            let err = p
                .allocate("a", "eth0", Some(outside))
                .expect_err("outside the range");
            assert!(
                matches!(err, IpamError::RequestedOutsideRange { ip, .. } if ip == outside),
                "{outside}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("failed to allocate all requested IPs: {outside}")),
                "{text}"
            );
            assert!(text.contains("10.244.1.1-10.244.1.254"), "{text}");
            assert!(text.contains("10.244.1.0/24"), "{text}");
        }
        let gateway = Ipv4Addr::new(10, 244, 1, 1);
        let err = p.allocate("a", "eth0", Some(gateway)).expect_err("gateway");
        assert!(matches!(err, IpamError::RequestedGateway { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("requested ip 10.244.1.1 is subnet's gateway"),
            "{err}"
        );
        // Refused requests leave no state behind.
        assert!(p.allocations().expect("list").is_empty());
        assert!(!dir.path().join(LAST_RESERVED_FILE).exists());
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 20;
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let dir = Arc::clone(&dir);
                thread::spawn(move || {
                    // A Pool per thread: separate lock file descriptions, as separate processes.
                    let p = pool(dir.path(), "10.1.0.0/24");
                    (0..PER_THREAD)
                        .map(|i| {
                            p.allocate(&format!("c-{t}-{i}"), "eth0", None)
                                .expect("allocate")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for handle in handles {
            for ip in handle.join().expect("thread") {
                assert!(seen.insert(ip), "{ip} handed out twice");
            }
        }
        assert_eq!(seen.len(), THREADS * PER_THREAD);
        let on_disk = pool(dir.path(), "10.1.0.0/24").allocations().expect("list");
        assert_eq!(on_disk.len(), THREADS * PER_THREAD);
    }
}
