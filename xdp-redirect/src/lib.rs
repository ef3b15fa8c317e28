//! Loader for sluice's XDP program (the only kernel code in sluice).
//!
//! One [`Attachment`] per interface: its own copy of the program and maps, attached through a
//! bpf_link, so dropping it (or the agent dying) detaches the program and leaves nothing behind.
//! While attached and with no AF_XDP socket registered for a queue, the program passes every frame
//! to the kernel (fail-open); see `ebpf/src/main.rs`.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, XskMap},
    programs::{Xdp, XdpMode},
    Ebpf,
};
pub use xdp_redirect_common::{Action, PassKey, RuleAction, MAX_QUEUES};
use xdp_redirect_common::{NeighEntry, CONFIG_DEFAULT_ACTION, CONFIG_SNOOP_ARP};

/// The eBPF object built by `build.rs` (nightly, bpfel-unknown-none, with BTF).
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-redirect.o"));

const PROGRAM_NAME: &str = "xdp_redirect";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the XDP program for {ifname}: {source}")]
    Load {
        ifname: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("XDP program {what} for {ifname}: {source}")]
    Program {
        ifname: String,
        what: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching XDP to {ifname} failed in native mode ({native}) and in generic mode ({generic})")]
    Attach {
        ifname: String,
        native: String,
        generic: String,
    },
    #[error("XDP map {map} on {ifname}: {source}")]
    Map {
        ifname: String,
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("XDP map {map} missing from the program object (rebuild xdp-redirect)")]
    MissingMap { map: &'static str },
    #[error("XDP program {program} missing from the program object (rebuild xdp-redirect)")]
    MissingProgram { program: &'static str },
    #[error("interface {ifname} does not exist")]
    NoInterface { ifname: String },
    #[error("rx queue {queue} on {ifname} is beyond the XSKMAP size {max}")]
    QueueTooLarge {
        ifname: String,
        queue: u32,
        max: u32,
    },
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Driver (native) XDP: the fast path, and what AF_XDP copy mode on veth wants.
    Native,
    /// Generic (SKB) XDP: fallback when the driver has no native XDP.
    Generic,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// The XDP program attached to one interface.
pub struct Attachment {
    ifname: String,
    ifindex: u32,
    mode: AttachMode,
    xsks: XskMap<MapData>,
    rules: HashMap<MapData, PassKey, u8>,
    config: Array<MapData, u32>,
    neigh: HashMap<MapData, u32, NeighEntry>,
    actions: PerCpuArray<MapData, u64>,
    // Owns the program and its bpf_link: dropped last, which detaches the program.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Interface index of `ifname` in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(ifname).map_err(|_| Error::NoInterface {
        ifname: ifname.into(),
    })?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::NoInterface {
            ifname: ifname.into(),
        });
    }
    Ok(idx)
}

impl Attachment {
    /// Loads a fresh copy of the program and attaches it to `ifname`, natively if the driver
    /// allows, else in generic mode (logged as a warning: generic mode is several times slower).
    pub fn attach(ifname: &str, allow_generic: bool) -> Result<Self, Error> {
        let ifindex = ifindex(ifname)?;
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT).map_err(|e| Error::Load {
            ifname: ifname.into(),
            source: Box::new(e),
        })?;
        let prog_err = |what, e| Error::Program {
            ifname: ifname.into(),
            what,
            source: Box::new(e),
        };
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(Error::MissingProgram {
                program: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(|e| prog_err("type", e))?;
        program.load().map_err(|e| prog_err("load", e))?;
        let mode = match program.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(_) => AttachMode::Native,
            Err(native) if allow_generic => match program.attach_to_if_index(ifindex, XdpMode::Skb)
            {
                Ok(_) => {
                    tracing::warn!(ifname, %native, "native XDP unavailable; attached in generic (SKB) mode");
                    AttachMode::Generic
                }
                Err(generic) => {
                    return Err(Error::Attach {
                        ifname: ifname.into(),
                        native: native.to_string(),
                        generic: generic.to_string(),
                    })
                }
            },
            Err(native) => {
                return Err(Error::Attach {
                    ifname: ifname.into(),
                    native: native.to_string(),
                    generic: "not tried".into(),
                })
            }
        };
        let map_err = |map, e| Error::Map {
            ifname: ifname.into(),
            map,
            source: Box::new(e),
        };
        let xsks = XskMap::try_from(
            ebpf.take_map("XSKS")
                .ok_or(Error::MissingMap { map: "XSKS" })?,
        )
        .map_err(|e| map_err("XSKS", e))?;
        let rules = HashMap::try_from(
            ebpf.take_map("RULES")
                .ok_or(Error::MissingMap { map: "RULES" })?,
        )
        .map_err(|e| map_err("RULES", e))?;
        let neigh = HashMap::try_from(
            ebpf.take_map("NEIGH")
                .ok_or(Error::MissingMap { map: "NEIGH" })?,
        )
        .map_err(|e| map_err("NEIGH", e))?;
        let config = Array::try_from(
            ebpf.take_map("CONFIG")
                .ok_or(Error::MissingMap { map: "CONFIG" })?,
        )
        .map_err(|e| map_err("CONFIG", e))?;
        let actions = PerCpuArray::try_from(
            ebpf.take_map("ACTIONS")
                .ok_or(Error::MissingMap { map: "ACTIONS" })?,
        )
        .map_err(|e| map_err("ACTIONS", e))?;
        Ok(Self {
            ifname: ifname.into(),
            ifindex,
            mode,
            xsks,
            rules,
            config,
            neigh,
            actions,
            _ebpf: ebpf,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    fn map_err(&self, map: &'static str, e: aya::maps::MapError) -> Error {
        Error::Map {
            ifname: self.ifname.clone(),
            map,
            source: Box::new(e),
        }
    }

    /// Starts redirecting frames of rx `queue` to the AF_XDP socket `fd`.
    pub fn register_socket(&mut self, queue: u32, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if queue >= MAX_QUEUES {
            return Err(Error::QueueTooLarge {
                ifname: self.ifname.clone(),
                queue,
                max: MAX_QUEUES,
            });
        }
        let raw = fd.as_fd().as_raw_fd();
        self.xsks
            .set(queue, raw, 0)
            .map_err(|e| self.map_err("XSKS", e))
    }

    /// Stops redirecting rx `queue`: its frames go to the kernel again.
    pub fn unregister_socket(&mut self, queue: u32) -> Result<(), Error> {
        match self.xsks.unset(queue) {
            Ok(()) => Ok(()),
            // Deleting an absent entry is not an error for us.
            Err(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(self.map_err("XSKS", e)),
        }
    }

    /// What happens to traffic no rule matches. A fresh attachment redirects everything.
    pub fn set_default(&mut self, action: RuleAction) -> Result<(), Error> {
        self.config
            .set(CONFIG_DEFAULT_ACTION, action as u32, 0)
            .map_err(|e| self.map_err("CONFIG", e))
    }

    /// Records every ARP sender seen on this interface in the `NEIGH` map (used on the uplink).
    pub fn set_arp_snooping(&mut self, on: bool) -> Result<(), Error> {
        self.config
            .set(CONFIG_SNOOP_ARP, u32::from(on), 0)
            .map_err(|e| self.map_err("CONFIG", e))
    }

    /// ARP senders the program has seen: (address, MAC, CLOCK_MONOTONIC ns when last seen).
    pub fn neighbors(&self) -> Vec<(std::net::Ipv4Addr, [u8; 6], u64)> {
        self.neigh
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, e)| (std::net::Ipv4Addr::from(u32::from_be(ip)), e.mac, e.seen_ns))
            .collect()
    }

    /// Adds or replaces the rule for traffic matching `key`.
    pub fn set_rule(&mut self, key: PassKey, action: RuleAction) -> Result<(), Error> {
        self.rules
            .insert(key, action as u8, 0)
            .map_err(|e| self.map_err("RULES", e))
    }

    /// Removes the rule for `key`, if any.
    pub fn remove_rule(&mut self, key: &PassKey) -> Result<(), Error> {
        match self.rules.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(self.map_err("RULES", e)),
        }
    }

    /// The program's action counters, summed over CPUs, indexed by [`Action`].
    pub fn counters(&self) -> Result<[u64; Action::COUNT as usize], Error> {
        let mut out = [0u64; Action::COUNT as usize];
        for action in Action::ALL {
            let per_cpu = self
                .actions
                .get(&(action as u32), 0)
                .map_err(|e| self.map_err("ACTIONS", e))?;
            out[action as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
