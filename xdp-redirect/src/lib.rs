//! Loader for sluice's XDP program (the only kernel code in sluice).
//!
//! One [`Attachment`] per interface: its own copy of the program and maps, attached through a
//! bpf_link, so dropping it (or the agent dying) detaches the program and leaves nothing behind.
//! While attached and with no AF_XDP socket registered for a queue, the program passes every frame
//! to the kernel (fail-open).
//!
//! What the program redirects is decided by, in this order (full detail in `ebpf/src/main.rs`):
//! 1. a whole-ethertype rule ([`Attachment::set_rule`] with [`PassKey::ethertype`]);
//! 2. IPv4 destination addresses ([`Attachment::set_dst_addr`]): any protocol, every fragment;
//! 3. not for fragments: TCP/UDP by destination port, first an exact [`PassKey::ipv4`] rule,
//!    then the port tables ([`Attachment::set_port`], [`Attachment::set_port_range`]); ICMP
//!    echo replies by identifier and ICMP errors by the quoted packet's source port or echo
//!    identifier ([`PortProtocol::IcmpEchoId`], the TCP/UDP tables);
//! 4. a whole-protocol rule ([`PassKey::ipv4`] with port 0);
//! 5. only with the host firewall on ([`Attachment::set_host_firewall`]) and for traffic to one
//!    of the node's own addresses that nothing above claimed: failsafe ports, ICMP errors and
//!    flows the node sent pass, the rest is redirected for host policy (see `hostfw`);
//! 6. the default ([`Attachment::set_default`]).
//!
//! An uplink is set to default Pass with the agent's traffic claimed by Redirect entries; a pod
//! veth keeps the default Redirect. For a reconcile, build the wanted sets and hand them to
//! [`Attachment::replace_ports`] and [`Attachment::replace_dst_addrs`]: only what differs is
//! written, so an entry present before and after is never missing in between.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    ops::RangeInclusive,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

mod hostfw;
mod ports;
pub use hostfw::{
    monotonic_ns, Failsafe, HostFirewall, HostFlow, HostFwMeta, DEFAULT_HOST_FLOW_CAPACITY,
    MIN_HOST_FLOW_CAPACITY,
};
use hostfw::{HostFwState, TcLink};
pub use ports::{PortClaims, PortProtocol};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, XskMap},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
pub use xdp_redirect_common::{
    Action, PassKey, RuleAction, HOST_FLOW_ICMP_TIMEOUT_NS, HOST_FLOW_TCP_TIMEOUT_NS,
    HOST_FLOW_UDP_TIMEOUT_NS, MAX_CLUSTER_NODES, MAX_DST_ADDRS, MAX_HOST_ADDRS, MAX_QUEUES,
};
use xdp_redirect_common::{
    HostFlowKey, HostFlowValue, NeighEntry, CONFIG_DEFAULT_ACTION, CONFIG_SNOOP_ARP,
    HOST_FLOWS_MIN, PORT_TABLE_WORDS,
};

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
    #[error("hot restart of the XDP program on {ifname}: {what}")]
    Handover { ifname: String, what: String },
    #[error("interface {ifname} does not exist")]
    NoInterface { ifname: String },
    #[error("rx queue {queue} on {ifname} is beyond the XSKMAP size {max}")]
    QueueTooLarge {
        ifname: String,
        queue: u32,
        max: u32,
    },
    #[error(
        "{proto} port range {lo}..={hi} on {ifname} is empty (the first port must not exceed \
         the last)"
    )]
    EmptyPortRange {
        ifname: String,
        proto: PortProtocol,
        lo: u16,
        hi: u16,
    },
    #[error(
        "{wanted} destination addresses for {ifname} exceed the DST_ADDRS map size {max}; \
         claim fewer LoadBalancer/external IPs or raise MAX_DST_ADDRS"
    )]
    TooManyDstAddrs {
        ifname: String,
        wanted: usize,
        max: u32,
    },
    #[error("IP protocol {proto} has no port table (only TCP 6, UDP 17 and ICMP 1 have one)")]
    UnsupportedProtocol { proto: u8 },
    #[error(
        "host firewall on {ifname}: failsafe entry {index} has IP protocol {proto}; only TCP (6), \
         UDP (17) and ICMP (1, with ICMP types as ports) are supported"
    )]
    FailsafeProtocol {
        ifname: String,
        index: usize,
        proto: u8,
    },
    #[error(
        "host firewall on {ifname}: failsafe entry {index} ({proto}) has port range {lo}..={hi}, \
         which is empty or (for ICMP types) beyond 255"
    )]
    FailsafeRange {
        ifname: String,
        index: usize,
        proto: u8,
        lo: u16,
        hi: u16,
    },
    #[error(
        "host firewall on {ifname}: {wanted} addresses in {map} exceed its size {max}; list \
         fewer or raise the limit in xdp-redirect-common"
    )]
    TooManyHostFirewallAddrs {
        ifname: String,
        map: &'static str,
        wanted: usize,
        max: u32,
    },
    #[error(
        "host firewall on {ifname}: the HOST_FLOWS map holds {capacity} entries; attach the \
         interface with Attachment::attach_with and AttachOptions::host_flow_capacity of at \
         least {min} (the uplink; DEFAULT_HOST_FLOW_CAPACITY is {default})"
    )]
    HostFlowsTooSmall {
        ifname: String,
        capacity: u32,
        min: u32,
        default: u32,
    },
    #[error(
        "host firewall on {ifname}: the calling thread's network namespace has no such \
         interface with index {ifindex}; call set_host_firewall from the namespace the \
         interface was attached in"
    )]
    WrongNamespace { ifname: String, ifindex: u32 },
}

impl TryFrom<u8> for PortProtocol {
    type Error = Error;
    fn try_from(proto: u8) -> Result<Self, Error> {
        PortProtocol::from_ip_proto(proto).ok_or(Error::UnsupportedProtocol { proto })
    }
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

/// How [`Attachment::attach_with`] loads and attaches the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// Fall back to generic (SKB) mode when the driver has no native XDP.
    pub allow_generic: bool,
    /// Entries of the `HOST_FLOWS` LRU map (flows the node sent, for the host firewall). The
    /// kernel preallocates an LRU map (about 72 bytes per entry), so only the uplink should ask
    /// for [`DEFAULT_HOST_FLOW_CAPACITY`]; [`Attachment::set_host_firewall`] refuses to turn the
    /// firewall on with fewer than [`MIN_HOST_FLOW_CAPACITY`] entries.
    pub host_flow_capacity: u32,
}

impl AttachOptions {
    /// A pod veth: no host firewall (a one-entry `HOST_FLOWS` map).
    pub const fn pod(allow_generic: bool) -> Self {
        Self {
            allow_generic,
            host_flow_capacity: HOST_FLOWS_MIN,
        }
    }
    /// An uplink: room for [`DEFAULT_HOST_FLOW_CAPACITY`] node flows.
    pub const fn uplink(allow_generic: bool) -> Self {
        Self {
            allow_generic,
            host_flow_capacity: DEFAULT_HOST_FLOW_CAPACITY,
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
    ports: Array<MapData, u64>,
    dst_addrs: HashMap<MapData, u32, u8>,
    /// What `ports` holds, per [`PortProtocol`] (in `PortProtocol::ALL` order): only this
    /// attachment writes the map, so the copy is exact and writes can be diffs.
    port_claims: [PortClaims; 3],
    /// What `dst_addrs` holds.
    dst_addr_claims: BTreeMap<Ipv4Addr, RuleAction>,
    host_addrs: HashMap<MapData, u32, u8>,
    cluster_nodes: HashMap<MapData, u32, u8>,
    failsafe: Array<MapData, u64>,
    host_flows: HashMap<MapData, HostFlowKey, HostFlowValue>,
    host_flow_capacity: u32,
    /// What the host firewall maps hold, and whether the firewall is on.
    host_fw: HostFwState,
    /// The TC egress program's link (TCX on kernels from 6.6), while the firewall is on.
    tc_link: Option<TcLink>,
    /// The loaded TC egress program (a duplicate fd): what attaches it again, also in an
    /// attachment taken over from a previous agent.
    tc_prog: Option<OwnedFd>,
    /// Duplicates of the maps' fds, in [`MAP_NAMES`] order: what a hot restart hands over.
    map_fds: Vec<OwnedFd>,
    /// The XDP program's bpf_link. Closing the last fd of it detaches the program: this
    /// process's copy when dropped, unless a hot restart handed a copy to the next agent.
    link: OwnedFd,
    // Owns the programs (and the TC link): dropped last, which detaches the TC egress program.
    // `None` for an attachment taken over from a previous agent (it has the maps and the link,
    // not the program object).
    ebpf: Option<Ebpf>,
}

/// The maps a hot restart hands over, in the order of their fds.
pub const MAP_NAMES: [&str; 11] = [
    "XSKS",
    "RULES",
    "CONFIG",
    "NEIGH",
    "ACTIONS",
    "PORTS",
    "DST_ADDRS",
    "HOST_ADDRS",
    "CLUSTER_NODES",
    "FAILSAFE",
    "HOST_FLOWS",
];

/// An attachment as a hot restart carries it: this, and its fds (the link, the maps in
/// [`MAP_NAMES`] order, then the TC program and link if `tc_prog` and `tc_link`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentMeta {
    pub ifname: String,
    pub ifindex: u32,
    pub native: bool,
    pub host_flow_capacity: u32,
    /// What `PORTS` holds: (table in [`PortProtocol::ALL`] order, word index, word), non-zero
    /// words only (the handing agent's exact mirror: reading 6144 words back would cost a
    /// syscall each while the workers are stopped).
    pub port_words: Vec<(u8, u32, u64)>,
    /// What `DST_ADDRS` holds: (address, passed rather than redirected).
    pub dst_addrs: Vec<(Ipv4Addr, bool)>,
    /// What the host firewall maps hold.
    pub host_fw: HostFwMeta,
    /// Fds after the maps: the loaded TC program, then its TCX link (when attached).
    pub tc_prog: bool,
    pub tc_link: bool,
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

impl AttachmentMeta {
    /// How many fds travel with it.
    pub fn fd_count(&self) -> usize {
        1 + MAP_NAMES.len() + usize::from(self.tc_prog) + usize::from(self.tc_link)
    }
}

/// `XDP_FLAGS_SKB_MODE` and `XDP_FLAGS_DRV_MODE` (linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `BPF_LINK_CREATE`, `BPF_XDP` and `BPF_TCX_EGRESS` (linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_XDP: u32 = 37;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// The fd of a map as `Ebpf::take_map` returns it (the kinds this program has).
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::XskMap(m) => Some(m.fd().as_fd()),
        _ => None,
    }
}

/// Attaches XDP program `prog_fd` to `ifindex` through a bpf_link (`BPF_LINK_CREATE`, as
/// aya does), keeping the link's fd: a hot restart passes it to the next agent, so the
/// program stays attached while the agents change.
fn link_create_xdp(prog_fd: i32, ifindex: u32, flags: u32) -> std::io::Result<OwnedFd> {
    link_create(prog_fd, ifindex, BPF_XDP, flags)
}

/// `BPF_LINK_CREATE` of `prog_fd` on `ifindex` for `attach_type` (XDP, TCX).
pub(crate) fn link_create(
    prog_fd: i32,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    // union bpf_attr, link_create: prog_fd, target_ifindex, attach_type, flags (the rest 0:
    // for TCX, no relative program and any revision).
    let mut attr = [0u32; 16];
    attr[0] = prog_fd as u32;
    attr[1] = ifindex;
    attr[2] = attach_type;
    attr[3] = flags;
    // SAFETY: bpf(2) with a zeroed attr of the size passed; the kernel reads only the
    // link_create fields above and returns a new fd or -1.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: r is a fresh fd the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
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
    /// The host firewall cannot be turned on (see [`AttachOptions::pod`]); an uplink uses
    /// [`Attachment::attach_with`].
    pub fn attach(ifname: &str, allow_generic: bool) -> Result<Self, Error> {
        Self::attach_with(ifname, &AttachOptions::pod(allow_generic))
    }

    /// [`Attachment::attach`] with options (e.g. [`AttachOptions::uplink`]).
    pub fn attach_with(ifname: &str, options: &AttachOptions) -> Result<Self, Error> {
        let allow_generic = options.allow_generic;
        let host_flow_capacity = options.host_flow_capacity.max(HOST_FLOWS_MIN);
        let ifindex = ifindex(ifname)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("HOST_FLOWS", host_flow_capacity)
            .load(PROGRAM_OBJECT)
            .map_err(|e| Error::Load {
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
        let prog_fd = program
            .fd()
            .map_err(|e| prog_err("fd", e))?
            .as_fd()
            .as_raw_fd();
        let (link, mode) = match link_create_xdp(prog_fd, ifindex, XDP_FLAGS_DRV_MODE) {
            Ok(link) => (link, AttachMode::Native),
            Err(native) if allow_generic => {
                match link_create_xdp(prog_fd, ifindex, XDP_FLAGS_SKB_MODE) {
                    Ok(link) => {
                        tracing::warn!(ifname, %native, "native XDP unavailable; attached in generic (SKB) mode");
                        (link, AttachMode::Generic)
                    }
                    Err(generic) => {
                        return Err(Error::Attach {
                            ifname: ifname.into(),
                            native: native.to_string(),
                            generic: generic.to_string(),
                        })
                    }
                }
            }
            Err(native) => {
                return Err(Error::Attach {
                    ifname: ifname.into(),
                    native: native.to_string(),
                    generic: "not tried".into(),
                })
            }
        };
        let mut maps = Vec::with_capacity(MAP_NAMES.len());
        for name in MAP_NAMES {
            let map = ebpf.take_map(name).ok_or(Error::MissingMap { map: name })?;
            let dup = map_fd(&map)
                .and_then(|fd| fd.try_clone_to_owned().ok())
                .ok_or(Error::MissingMap { map: name })?;
            maps.push((map, dup));
        }
        let meta = AttachmentMeta {
            ifname: ifname.into(),
            ifindex,
            native: mode == AttachMode::Native,
            host_flow_capacity,
            port_words: Vec::new(),
            dst_addrs: Vec::new(),
            host_fw: HostFwMeta::default(),
            tc_prog: false,
            tc_link: false,
        };
        Self::from_parts(meta, link, maps, Some(ebpf))
    }

    /// Takes over an attachment a previous agent handed over ([`Attachment::handover`]): the
    /// XDP program stays attached throughout (this process now holds its link), with every map
    /// as it was. The mirrors of the port and address tables come with `meta`.
    pub fn adopt(meta: AttachmentMeta, fds: Vec<OwnedFd>) -> Result<Self, Error> {
        let want = meta.fd_count();
        if fds.len() != want {
            return Err(Error::Handover {
                ifname: meta.ifname.clone(),
                what: format!(
                    "{} file descriptors handed over, {want} expected (the link, {} maps, the \
                     TC program and link when the host firewall had them)",
                    fds.len(),
                    MAP_NAMES.len()
                ),
            });
        }
        if ifindex(&meta.ifname).ok() != Some(meta.ifindex) {
            return Err(Error::Handover {
                ifname: meta.ifname.clone(),
                what: format!(
                    "interface index {} is no longer {} in this network namespace",
                    meta.ifindex, meta.ifname
                ),
            });
        }
        let mut fds = fds.into_iter();
        let link = fds.next().ok_or_else(|| Error::Handover {
            ifname: meta.ifname.clone(),
            what: "no link fd".into(),
        })?;
        let mut maps = Vec::with_capacity(MAP_NAMES.len());
        for (name, fd) in MAP_NAMES.into_iter().zip(fds.by_ref()) {
            let map_err = |e: aya::maps::MapError| Error::Map {
                ifname: meta.ifname.clone(),
                map: name,
                source: Box::new(e),
            };
            let dup = fd.try_clone().map_err(|e| Error::Handover {
                ifname: meta.ifname.clone(),
                what: format!("duplicating the {name} fd: {e}"),
            })?;
            let data = MapData::from_fd(fd).map_err(map_err)?;
            let map = Map::from_map_data(data).map_err(map_err)?;
            maps.push((map, dup));
        }
        let mut claims = BTreeMap::new();
        for (addr, pass) in &meta.dst_addrs {
            claims.insert(
                *addr,
                if *pass {
                    RuleAction::Pass
                } else {
                    RuleAction::Redirect
                },
            );
        }
        let mut words = Vec::with_capacity(meta.port_words.len());
        for &(table, index, word) in &meta.port_words {
            if usize::from(table) >= PortProtocol::ALL.len() || index >= PORT_TABLE_WORDS {
                return Err(Error::Handover {
                    ifname: meta.ifname.clone(),
                    what: format!("port table word {table}/{index} does not exist"),
                });
            }
            words.push((usize::from(table), index, word));
        }
        let host_fw = HostFwState::from_meta(&meta.host_fw).ok_or_else(|| Error::Handover {
            ifname: meta.ifname.clone(),
            what: "a failsafe table word does not exist".into(),
        })?;
        let tc_prog = if meta.tc_prog { fds.next() } else { None };
        let tc_link = if meta.tc_link { fds.next() } else { None };
        let mut a = Self::from_parts(meta, link, maps, None)?;
        for (table, index, word) in words {
            a.port_claims[table].set_word(index, word);
        }
        a.dst_addr_claims = claims;
        a.host_fw = host_fw;
        a.tc_prog = tc_prog;
        a.tc_link = tc_link.map(TcLink::Fd);
        Ok(a)
    }

    /// What a hot restart hands to the next agent: the description and the fds to pass (the
    /// link, the maps in [`MAP_NAMES`] order, then the TC program and its TCX link when the
    /// host firewall has them). Refused for a TC program attached by netlink (kernels before
    /// 6.6): that link belongs to the program object, which does not travel.
    pub fn handover(&self) -> Result<(AttachmentMeta, Vec<BorrowedFd<'_>>), Error> {
        if matches!(self.tc_link, Some(TcLink::Netlink(_))) {
            return Err(Error::Handover {
                ifname: self.ifname.clone(),
                what: "the host firewall's TC program is attached by netlink (a kernel before \
                       6.6, no TCX) and cannot be handed over (stop the agent for a cold \
                       restart)"
                    .into(),
            });
        }
        let mut fds = vec![self.link.as_fd()];
        fds.extend(self.map_fds.iter().map(|f| f.as_fd()));
        if let Some(p) = &self.tc_prog {
            fds.push(p.as_fd());
        }
        if let Some(TcLink::Fd(l)) = &self.tc_link {
            fds.push(l.as_fd());
        }
        let mut port_words = Vec::new();
        for (table, claims) in self.port_claims.iter().enumerate() {
            port_words.extend(
                PortClaims::new()
                    .changed_words(claims)
                    .map(|(i, w)| (table as u8, i, w)),
            );
        }
        Ok((
            AttachmentMeta {
                ifname: self.ifname.clone(),
                ifindex: self.ifindex,
                native: self.mode == AttachMode::Native,
                host_flow_capacity: self.host_flow_capacity,
                port_words,
                dst_addrs: self
                    .dst_addr_claims
                    .iter()
                    .map(|(a, r)| (*a, *r == RuleAction::Pass))
                    .collect(),
                host_fw: self.host_fw.meta(),
                tc_prog: self.tc_prog.is_some(),
                tc_link: matches!(self.tc_link, Some(TcLink::Fd(_))),
            },
            fds,
        ))
    }

    fn from_parts(
        meta: AttachmentMeta,
        link: OwnedFd,
        maps: Vec<(Map, OwnedFd)>,
        ebpf: Option<Ebpf>,
    ) -> Result<Self, Error> {
        let ifname = meta.ifname.as_str();
        let map_err = |map, e| Error::Map {
            ifname: ifname.into(),
            map,
            source: Box::new(e),
        };
        let mut taken = maps.into_iter();
        let mut map_fds = Vec::with_capacity(MAP_NAMES.len());
        let mut next = |name: &'static str| -> Result<Map, Error> {
            let (m, dup) = taken.next().ok_or(Error::MissingMap { map: name })?;
            map_fds.push(dup);
            Ok(m)
        };
        let xsks = XskMap::try_from(next("XSKS")?).map_err(|e| map_err("XSKS", e))?;
        let rules = HashMap::try_from(next("RULES")?).map_err(|e| map_err("RULES", e))?;
        let config = Array::try_from(next("CONFIG")?).map_err(|e| map_err("CONFIG", e))?;
        let neigh = HashMap::try_from(next("NEIGH")?).map_err(|e| map_err("NEIGH", e))?;
        let actions = PerCpuArray::try_from(next("ACTIONS")?).map_err(|e| map_err("ACTIONS", e))?;
        let ports = Array::try_from(next("PORTS")?).map_err(|e| map_err("PORTS", e))?;
        let dst_addrs =
            HashMap::try_from(next("DST_ADDRS")?).map_err(|e| map_err("DST_ADDRS", e))?;
        let host_addrs =
            HashMap::try_from(next("HOST_ADDRS")?).map_err(|e| map_err("HOST_ADDRS", e))?;
        let cluster_nodes =
            HashMap::try_from(next("CLUSTER_NODES")?).map_err(|e| map_err("CLUSTER_NODES", e))?;
        let failsafe = Array::try_from(next("FAILSAFE")?).map_err(|e| map_err("FAILSAFE", e))?;
        let host_flows =
            HashMap::try_from(next("HOST_FLOWS")?).map_err(|e| map_err("HOST_FLOWS", e))?;
        Ok(Self {
            ifname: meta.ifname.clone(),
            ifindex: meta.ifindex,
            mode: if meta.native {
                AttachMode::Native
            } else {
                AttachMode::Generic
            },
            xsks,
            rules,
            config,
            neigh,
            actions,
            ports,
            dst_addrs,
            port_claims: std::array::from_fn(|_| PortClaims::new()),
            dst_addr_claims: BTreeMap::new(),
            host_addrs,
            cluster_nodes,
            failsafe,
            host_flows,
            host_flow_capacity: meta.host_flow_capacity,
            host_fw: HostFwState::default(),
            tc_link: None,
            tc_prog: None,
            map_fds,
            link,
            ebpf,
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

    /// Claims WireGuard transport messages (type 4) to UDP `port` for the dataplane and leaves
    /// every other message to that port (handshakes, cookie replies) to the kernel; 0 turns it
    /// off. Takes precedence over the port rules for that UDP port.
    pub fn set_wireguard_port(&mut self, port: u16) -> Result<(), Error> {
        self.config
            .set(xdp_redirect_common::CONFIG_WG_PORT, u32::from(port), 0)
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

    fn claims_index(proto: PortProtocol) -> usize {
        match proto {
            PortProtocol::Tcp => 0,
            PortProtocol::Udp => 1,
            PortProtocol::IcmpEchoId => 2,
        }
    }

    /// What the `PORTS` table of `proto` holds.
    pub fn ports(&self, proto: PortProtocol) -> &PortClaims {
        &self.port_claims[Self::claims_index(proto)]
    }

    /// Makes the `PORTS` table of `proto` equal to `target`, writing only the words that differ
    /// (two bits per port, 32 ports per word): entries equal in both are never touched, so a
    /// reconcile does not open a gap for ports that stay claimed. Returns the words written.
    /// On an error the table holds a mix of old and new words (and [`Attachment::ports`]
    /// says which); calling again with the same target finishes the job.
    pub fn replace_ports(
        &mut self,
        proto: PortProtocol,
        target: &PortClaims,
    ) -> Result<usize, Error> {
        let k = Self::claims_index(proto);
        let base = proto.table() * PORT_TABLE_WORDS;
        let changed: Vec<(u32, u64)> = self.port_claims[k].changed_words(target).collect();
        for &(index, word) in &changed {
            if let Err(e) = self.ports.set(base + index, word, 0) {
                return Err(self.map_err("PORTS", e));
            }
            self.port_claims[k].set_word(index, word);
        }
        Ok(changed.len())
    }

    /// Sets the entry of one `proto` port (or ICMP echo identifier): [`RuleAction::Redirect`]
    /// claims it for the dataplane, [`RuleAction::Pass`] leaves it to the kernel even inside a
    /// claimed range or on an interface whose default is Redirect.
    pub fn set_port(
        &mut self,
        proto: PortProtocol,
        port: u16,
        action: RuleAction,
    ) -> Result<(), Error> {
        let mut target = self.ports(proto).clone();
        target.set(port, action);
        self.replace_ports(proto, &target).map(drop)
    }

    /// Removes the entry of one `proto` port: its packets fall through to the protocol rule and
    /// the default. Removing an absent entry is not an error.
    pub fn remove_port(&mut self, proto: PortProtocol, port: u16) -> Result<(), Error> {
        let mut target = self.ports(proto).clone();
        target.remove(port);
        self.replace_ports(proto, &target).map(drop)
    }

    fn check_range(&self, proto: PortProtocol, ports: &RangeInclusive<u16>) -> Result<(), Error> {
        if ports.is_empty() {
            return Err(Error::EmptyPortRange {
                ifname: self.ifname.clone(),
                proto,
                lo: *ports.start(),
                hi: *ports.end(),
            });
        }
        Ok(())
    }

    /// Sets the entry of every `proto` port in `ports` (e.g. the masquerade range
    /// `61000..=65535`). An empty range is an error.
    pub fn set_port_range(
        &mut self,
        proto: PortProtocol,
        ports: RangeInclusive<u16>,
        action: RuleAction,
    ) -> Result<(), Error> {
        self.check_range(proto, &ports)?;
        let mut target = self.ports(proto).clone();
        target.set_range(ports, action);
        self.replace_ports(proto, &target).map(drop)
    }

    /// Removes the entry of every `proto` port in `ports`. An empty range is an error.
    pub fn remove_port_range(
        &mut self,
        proto: PortProtocol,
        ports: RangeInclusive<u16>,
    ) -> Result<(), Error> {
        self.check_range(proto, &ports)?;
        let mut target = self.ports(proto).clone();
        target.remove_range(ports);
        self.replace_ports(proto, &target).map(drop)
    }

    /// Removes every entry of the `PORTS` table of `proto`.
    pub fn clear_ports(&mut self, proto: PortProtocol) -> Result<(), Error> {
        self.replace_ports(proto, &PortClaims::new()).map(drop)
    }

    /// What the `DST_ADDRS` map holds.
    pub fn dst_addrs(&self) -> &BTreeMap<Ipv4Addr, RuleAction> {
        &self.dst_addr_claims
    }

    fn dst_key(addr: Ipv4Addr) -> u32 {
        // The program compares the address as read from the packet (network order).
        u32::from_ne_bytes(addr.octets())
    }

    /// Every IPv4 packet to `addr` (any protocol, every fragment) gets `action`
    /// (LoadBalancer ingress IPs and externalIPs: [`RuleAction::Redirect`]).
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr, action: RuleAction) -> Result<(), Error> {
        if self.dst_addr_claims.get(&addr) == Some(&action) {
            return Ok(());
        }
        if !self.dst_addr_claims.contains_key(&addr)
            && self.dst_addr_claims.len() >= MAX_DST_ADDRS as usize
        {
            return Err(Error::TooManyDstAddrs {
                ifname: self.ifname.clone(),
                wanted: self.dst_addr_claims.len() + 1,
                max: MAX_DST_ADDRS,
            });
        }
        if let Err(e) = self.dst_addrs.insert(Self::dst_key(addr), action as u8, 0) {
            return Err(self.map_err("DST_ADDRS", e));
        }
        self.dst_addr_claims.insert(addr, action);
        Ok(())
    }

    /// Removes the entry for `addr`; removing an absent one is not an error.
    pub fn remove_dst_addr(&mut self, addr: Ipv4Addr) -> Result<(), Error> {
        match self.dst_addrs.remove(&Self::dst_key(addr)) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(self.map_err("DST_ADDRS", e)),
        }
        self.dst_addr_claims.remove(&addr);
        Ok(())
    }

    /// Makes `DST_ADDRS` equal to `target`: removes the addresses not in it, then adds or
    /// changes the others; addresses with the same action in both are never touched. More than
    /// [`MAX_DST_ADDRS`] addresses is an error before anything changes.
    pub fn replace_dst_addrs(
        &mut self,
        target: &BTreeMap<Ipv4Addr, RuleAction>,
    ) -> Result<(), Error> {
        if target.len() > MAX_DST_ADDRS as usize {
            return Err(Error::TooManyDstAddrs {
                ifname: self.ifname.clone(),
                wanted: target.len(),
                max: MAX_DST_ADDRS,
            });
        }
        let stale: Vec<Ipv4Addr> = self
            .dst_addr_claims
            .keys()
            .filter(|a| !target.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            self.remove_dst_addr(addr)?;
        }
        for (&addr, &action) in target {
            self.set_dst_addr(addr, action)?;
        }
        Ok(())
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
