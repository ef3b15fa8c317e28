//! The host firewall's kernel side: what the XDP program passes to the kernel by itself for
//! traffic addressed to the node, and the TC egress program that records the node's own flows.
//!
//! ```text
//!   uplink rx --XDP--> [rules, port claims, DST_ADDRS, WireGuard]  (unchanged precedence)
//!                        | unclaimed, to a HOST_ADDRS address, firewall on
//!                        v
//!        fragment? -> redirect | failsafe port / ICMP type? -> XDP_PASS (pass_failsafe)
//!        ICMP error? -> XDP_PASS (pass_icmp_error) | node flow in HOST_FLOWS? -> XDP_PASS
//!        (pass_host_flow) | else redirect: the workers apply host policy and re-inject
//!        allowed packets through the re-injection veth pair.
//!   uplink tx --TC egress (host_flows)--> HOST_FLOWS[(proto, remote, remote port, local port)]
//! ```
//!
//! Decisions and their limits:
//! - The TC program is attached through TCX (a bpf_link, kernel 6.6 and later) and owned by the
//!   [`Attachment`]: dropping it, turning the firewall off, or the agent dying (the link's fd is
//!   closed with the process) detaches it. On older kernels aya falls back to a netlink `clsact`
//!   filter, which outlives a crashed agent; that is harmless: it only refreshes a bounded LRU
//!   map (one lookup per outbound packet) that nothing reads once the XDP program is gone.
//! - A flow is recorded when the node *sends*; inbound packets never refresh it (no write per
//!   received packet on a map shared by all CPUs). A UDP flow on which the node stays silent for
//!   180 s goes back through the workers.
//! - Flows the node opened (outbound TCP SYN, ICMP echo request, or a connection of the node's
//!   found in `/proc/thread-self/net/tcp` when the firewall is turned on) survive
//!   [`Attachment::clear_host_flows`]; the others (replies of connections the firewall let in,
//!   UDP) are removed so that their next inbound packet meets the new host policy.
//! - Failsafe entries are kept in `PortClaims` words (the same two-bit layout as `PORTS`):
//!   "nodes only" is stored as the Redirect bits and "anywhere" as the Pass bits; where entries
//!   overlap, "anywhere" wins.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    ops::RangeInclusive,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::programs::{
    tc::{qdisc_add_clsact, TcAttachType},
    SchedClassifier,
};
use xdp_redirect_common::{
    port_bits, HostFlowKey, HostFlowValue, CONFIG_HOST_FIREWALL, FAILSAFE_ANYWHERE,
    FAILSAFE_NODES_ONLY, FAILSAFE_TABLE_ICMP_TYPE, FAILSAFE_TABLE_TCP, FAILSAFE_TABLE_UDP,
    HOST_FLOW_NODE_OPENED, MAX_CLUSTER_NODES, MAX_HOST_ADDRS, PORT_TABLE_WORDS,
};

use crate::{ifindex, Attachment, Error, PortClaims, RuleAction};

// The failsafe encoding borrows PortClaims' Redirect/Pass bits (module doc).
const _: () = assert!(port_bits(RuleAction::Redirect) == FAILSAFE_NODES_ONLY);
const _: () = assert!(port_bits(RuleAction::Pass) == FAILSAFE_ANYWHERE);

/// `HOST_FLOWS` entries for an uplink: about 4.7 MB of kernel memory (LRU maps are
/// preallocated, about 72 bytes per entry).
pub const DEFAULT_HOST_FLOW_CAPACITY: u32 = 65536;
/// The fewest `HOST_FLOWS` entries with which [`Attachment::set_host_firewall`] turns the
/// firewall on.
pub const MIN_HOST_FLOW_CAPACITY: u32 = 1024;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TC_PROGRAM: &str = "host_flows";

/// Traffic to the node that the XDP program always passes (SSH, kube-apiserver, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failsafe {
    /// IP protocol: 6 TCP, 17 UDP, or 1 ICMP (then `ports` are ICMP types, 0..=255).
    pub proto: u8,
    /// Destination ports (or ICMP types), inclusive.
    pub ports: RangeInclusive<u16>,
    /// Only from a source in [`HostFirewall::cluster_nodes`].
    pub nodes_only: bool,
}

impl Failsafe {
    pub fn tcp(ports: RangeInclusive<u16>) -> Self {
        Self {
            proto: PROTO_TCP,
            ports,
            nodes_only: false,
        }
    }
    pub fn udp(ports: RangeInclusive<u16>) -> Self {
        Self {
            proto: PROTO_UDP,
            ports,
            nodes_only: false,
        }
    }
    /// The same entry, restricted to cluster nodes.
    pub fn from_nodes_only(mut self) -> Self {
        self.nodes_only = true;
        self
    }
}

/// The host firewall's configuration of one interface (the uplink).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFirewall {
    /// This node's own IPv4 addresses: traffic to them is the firewall's. At most
    /// [`MAX_HOST_ADDRS`].
    pub node_addrs: Vec<Ipv4Addr>,
    /// The cluster's node addresses, for "nodes only" failsafe entries. At most
    /// [`MAX_CLUSTER_NODES`].
    pub cluster_nodes: Vec<Ipv4Addr>,
    pub failsafe: Vec<Failsafe>,
}

impl HostFirewall {
    /// The failsafe ports of issue 6: SSH 22, kube-apiserver 6443, KubePrism 7445, kubelet
    /// 10250, Talos apid/trustd 50000-50001, etcd 2379-2380 (TCP, from anywhere), and the VXLAN
    /// and WireGuard UDP ports from cluster nodes only (0: left out).
    pub fn default_failsafe(vxlan_port: u16, wireguard_port: u16) -> Vec<Failsafe> {
        let mut list = vec![
            Failsafe::tcp(22..=22),
            Failsafe::tcp(6443..=6443),
            Failsafe::tcp(7445..=7445),
            Failsafe::tcp(10250..=10250),
            Failsafe::tcp(50000..=50001),
            Failsafe::tcp(2379..=2380),
        ];
        for port in [vxlan_port, wireguard_port] {
            if port != 0 {
                list.push(Failsafe::udp(port..=port).from_nodes_only());
            }
        }
        list
    }
}

/// A flow the node sent, as held in `HOST_FLOWS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostFlow {
    /// IP protocol: 6, 17, or 1 (ICMP echo: `remote_port` 0, `local_port` the identifier).
    pub proto: u8,
    pub remote_addr: Ipv4Addr,
    pub remote_port: u16,
    pub local_port: u16,
    /// The node opened it (kept by [`Attachment::clear_host_flows`]).
    pub node_opened: bool,
}

impl HostFlow {
    fn key(&self) -> HostFlowKey {
        HostFlowKey {
            proto: self.proto,
            pad: 0,
            remote_port: self.remote_port,
            local_port: self.local_port,
            pad2: 0,
            remote_addr: u32::from_ne_bytes(self.remote_addr.octets()),
        }
    }

    fn from_entry(key: &HostFlowKey, value: &HostFlowValue) -> Self {
        Self {
            proto: key.proto,
            remote_addr: Ipv4Addr::from(key.remote_addr.to_ne_bytes()),
            remote_port: key.remote_port,
            local_port: key.local_port,
            node_opened: value.flags & HOST_FLOW_NODE_OPENED != 0,
        }
    }
}

/// What the host firewall maps of one attachment hold (only the attachment writes them).
#[derive(Default)]
pub(crate) struct HostFwState {
    on: bool,
    node_addrs: BTreeSet<Ipv4Addr>,
    cluster_nodes: BTreeSet<Ipv4Addr>,
    /// TCP ports, UDP ports, ICMP types (the `FAILSAFE` tables in order).
    failsafe: [PortClaims; 3],
}

/// How the TC egress program is attached.
pub(crate) enum TcLink {
    /// A TCX bpf_link (6.6+) whose fd we hold: closing it detaches.
    Fd(std::os::fd::OwnedFd),
    /// A netlink filter (older kernels), owned by the program object.
    Netlink(aya::programs::tc::SchedClassifierLinkId),
}

/// [`HostFwState`] as a hot restart carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFwMeta {
    pub on: bool,
    pub node_addrs: Vec<Ipv4Addr>,
    pub cluster_nodes: Vec<Ipv4Addr>,
    /// (table, word index, word), non-zero words.
    pub failsafe_words: Vec<(u8, u32, u64)>,
}

impl HostFwState {
    pub(crate) fn meta(&self) -> HostFwMeta {
        let mut failsafe_words = Vec::new();
        for (t, claims) in self.failsafe.iter().enumerate() {
            failsafe_words.extend(
                PortClaims::new()
                    .changed_words(claims)
                    .map(|(i, w)| (t as u8, i, w)),
            );
        }
        HostFwMeta {
            on: self.on,
            node_addrs: self.node_addrs.iter().copied().collect(),
            cluster_nodes: self.cluster_nodes.iter().copied().collect(),
            failsafe_words,
        }
    }

    pub(crate) fn from_meta(m: &HostFwMeta) -> Option<Self> {
        let mut failsafe: [PortClaims; 3] = Default::default();
        for &(t, i, w) in &m.failsafe_words {
            if usize::from(t) >= failsafe.len() || i >= xdp_redirect_common::PORT_TABLE_WORDS {
                return None;
            }
            failsafe[usize::from(t)].set_word(i, w);
        }
        Some(Self {
            on: m.on,
            node_addrs: m.node_addrs.iter().copied().collect(),
            cluster_nodes: m.cluster_nodes.iter().copied().collect(),
            failsafe,
        })
    }
}

/// The `FAILSAFE` tables (TCP, UDP, ICMP type) for `entries`, or the first bad entry.
fn failsafe_tables(ifname: &str, entries: &[Failsafe]) -> Result<[PortClaims; 3], Error> {
    let mut tables: [PortClaims; 3] = Default::default();
    for (index, entry) in entries.iter().enumerate() {
        match entry.proto {
            PROTO_TCP | PROTO_UDP | PROTO_ICMP => {}
            proto => {
                return Err(Error::FailsafeProtocol {
                    ifname: ifname.into(),
                    index,
                    proto,
                })
            }
        }
        let (lo, hi) = (*entry.ports.start(), *entry.ports.end());
        if lo > hi || (entry.proto == PROTO_ICMP && hi > 255) {
            return Err(Error::FailsafeRange {
                ifname: ifname.into(),
                index,
                proto: entry.proto,
                lo,
                hi,
            });
        }
    }
    // "Nodes only" first, so that "anywhere" wins where entries overlap.
    for nodes_only in [true, false] {
        for entry in entries.iter().filter(|e| e.nodes_only == nodes_only) {
            let k = match entry.proto {
                PROTO_TCP => 0,
                PROTO_UDP => 1,
                _ => 2,
            };
            let action = if nodes_only {
                RuleAction::Redirect
            } else {
                RuleAction::Pass
            };
            tables[k].set_range(entry.ports.clone(), action);
        }
    }
    Ok(tables)
}

fn addr_key(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn is_enoent(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
        || matches!(e, aya::maps::MapError::KeyNotFound)
}

/// TCP states of `/proc/net/tcp` (include/net/tcp_states.h).
const TCP_SYN_SENT: u8 = 0x02;
const TCP_LISTEN: u8 = 0x0a;
const TCP_CLOSE: u8 = 0x07;
const TCP_TIME_WAIT: u8 = 0x06;

/// `ADDR:PORT` of `/proc/net/{tcp,udp}`: the address as the hex of its in-memory (network
/// order) u32 read natively, the port in hex.
fn parse_proc_endpoint(field: &str) -> Option<(Ipv4Addr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let addr = u32::from_str_radix(addr, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((Ipv4Addr::from(addr.to_ne_bytes()), port))
}

/// The node's open connections in `proc_net` (`/proc/thread-self/net` in production) whose
/// local address is one of `node_addrs`: TCP connections (node-opened when their local port
/// has no listening socket) and connected UDP sockets.
pub(crate) fn node_connections(proc_net: &Path, node_addrs: &BTreeSet<Ipv4Addr>) -> Vec<HostFlow> {
    let mut flows = Vec::new();
    for (file, proto) in [("tcp", PROTO_TCP), ("udp", PROTO_UDP)] {
        let Ok(text) = std::fs::read_to_string(proc_net.join(file)) else {
            continue;
        };
        let mut listening = BTreeSet::new();
        let mut candidates = Vec::new();
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Some((laddr, lport)), Some((raddr, rport)), Ok(state)) = (
                parse_proc_endpoint(local),
                parse_proc_endpoint(remote),
                u8::from_str_radix(state, 16),
            ) else {
                continue;
            };
            if proto == PROTO_TCP && state == TCP_LISTEN {
                listening.insert(lport);
                continue;
            }
            let closed = proto == PROTO_TCP && (state == TCP_CLOSE || state == TCP_TIME_WAIT);
            if raddr.is_unspecified() || closed || !node_addrs.contains(&laddr) {
                continue;
            }
            candidates.push((raddr, rport, lport, state));
        }
        for (raddr, rport, lport, state) in candidates {
            flows.push(HostFlow {
                proto,
                remote_addr: raddr,
                remote_port: rport,
                local_port: lport,
                node_opened: proto == PROTO_TCP
                    && (state == TCP_SYN_SENT || !listening.contains(&lport)),
            });
        }
    }
    flows
}

impl Attachment {
    /// Whether the host firewall is on.
    pub fn host_firewall_on(&self) -> bool {
        self.host_fw.on
    }

    /// Turns the host firewall on with `fw` (or updates it), or off with `None`.
    ///
    /// On: writes the node addresses, cluster nodes and failsafe tables (only what differs),
    /// attaches the TC egress program if it is not attached, and when the firewall was off
    /// seeds `HOST_FLOWS` with the node's open connections (`/proc/thread-self/net/tcp` and
    /// `udp`), so that turning it on cuts none of them; then sets the flag. Off: clears the flag
    /// first, then detaches the TC program and empties every host firewall map.
    ///
    /// Must run on a thread in the interface's network namespace (the TC program is attached
    /// by interface name). Everything is checked before anything changes; a map error midway
    /// leaves the previous flag in place and calling again finishes the job.
    pub fn set_host_firewall(&mut self, fw: Option<&HostFirewall>) -> Result<(), Error> {
        let Some(fw) = fw else {
            return self.host_firewall_off();
        };
        if self.host_flow_capacity < MIN_HOST_FLOW_CAPACITY {
            return Err(Error::HostFlowsTooSmall {
                ifname: self.ifname.clone(),
                capacity: self.host_flow_capacity,
                min: MIN_HOST_FLOW_CAPACITY,
                default: DEFAULT_HOST_FLOW_CAPACITY,
            });
        }
        let node_addrs: BTreeSet<Ipv4Addr> = fw.node_addrs.iter().copied().collect();
        let cluster_nodes: BTreeSet<Ipv4Addr> = fw.cluster_nodes.iter().copied().collect();
        for (map, wanted, max) in [
            ("HOST_ADDRS", node_addrs.len(), MAX_HOST_ADDRS),
            ("CLUSTER_NODES", cluster_nodes.len(), MAX_CLUSTER_NODES),
        ] {
            if wanted > max as usize {
                return Err(Error::TooManyHostFirewallAddrs {
                    ifname: self.ifname.clone(),
                    map,
                    wanted,
                    max,
                });
            }
        }
        let tables = failsafe_tables(&self.ifname, &fw.failsafe)?;
        if self.tc_link.is_none() {
            self.check_namespace()?;
        }
        self.sync_addrs(true, &node_addrs)?;
        self.sync_addrs(false, &cluster_nodes)?;
        self.sync_failsafe(&tables)?;
        self.attach_tc()?;
        if !self.host_fw.on {
            let proc_net = Path::new("/proc/thread-self/net");
            let existing = node_connections(proc_net, &self.host_fw.node_addrs);
            self.add_host_flows(&existing)?;
            self.set_flag(true)?;
        }
        Ok(())
    }

    fn host_firewall_off(&mut self) -> Result<(), Error> {
        self.set_flag(false)?;
        match self.tc_link.take() {
            // Closing our fd of the TCX link detaches the program.
            Some(TcLink::Fd(fd)) => drop(fd),
            Some(TcLink::Netlink(link)) => {
                let program = self.tc_program()?;
                if let Err(e) = program.detach(link) {
                    return Err(Error::Program {
                        ifname: self.ifname.clone(),
                        what: "detach from tc egress",
                        source: Box::new(e),
                    });
                }
            }
            None => {}
        }
        self.remove_host_flows(|_| true)?;
        self.sync_addrs(true, &BTreeSet::new())?;
        self.sync_addrs(false, &BTreeSet::new())?;
        self.sync_failsafe(&Default::default())
    }

    fn set_flag(&mut self, on: bool) -> Result<(), Error> {
        self.config
            .set(CONFIG_HOST_FIREWALL, u32::from(on), 0)
            .map_err(|e| self.map_err("CONFIG", e))?;
        self.host_fw.on = on;
        Ok(())
    }

    fn tc_program(&mut self) -> Result<&mut SchedClassifier, Error> {
        let ifname = self.ifname.clone();
        self.ebpf
            .as_mut()
            .ok_or_else(|| Error::Handover {
                ifname: ifname.clone(),
                what: "an attachment taken over from a previous agent has no TC program; \
                       restart the agent (cold) to turn the host firewall on"
                    .into(),
            })?
            .program_mut(TC_PROGRAM)
            .ok_or(Error::MissingProgram {
                program: TC_PROGRAM,
            })?
            .try_into()
            .map_err(|e| Error::Program {
                ifname,
                what: "type",
                source: Box::new(e),
            })
    }

    /// The TC program is attached by name: the calling thread must see this interface.
    fn check_namespace(&self) -> Result<(), Error> {
        if ifindex(&self.ifname).ok() != Some(self.ifindex) {
            return Err(Error::WrongNamespace {
                ifname: self.ifname.clone(),
                ifindex: self.ifindex,
            });
        }
        Ok(())
    }

    /// Loads (once) and attaches the TC egress program, if it is not attached.
    fn attach_tc(&mut self) -> Result<(), Error> {
        if self.tc_link.is_some() {
            return Ok(());
        }
        self.check_namespace()?;
        let ifname = self.ifname.clone();
        let prog_err = |what, e| Error::Program {
            ifname: ifname.clone(),
            what,
            source: Box::new(e),
        };
        if self.tc_prog.is_none() {
            let program = self.tc_program()?;
            if program.fd().is_err() {
                program
                    .load()
                    .map_err(|e| prog_err("load (tc egress)", e))?;
            }
            let dup = program
                .fd()
                .map_err(|e| prog_err("fd (tc egress)", e))?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Handover {
                    ifname: ifname.clone(),
                    what: format!("duplicating the TC program's fd: {e}"),
                })?;
            self.tc_prog = Some(dup);
        }
        let prog_fd = self.tc_prog.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        // TCX (6.6+) through our own bpf_link fd, as for XDP: a hot restart passes it on.
        let first = match crate::link_create(prog_fd, self.ifindex, crate::BPF_TCX_EGRESS, 0) {
            Ok(fd) => {
                self.tc_link = Some(TcLink::Fd(fd));
                return Ok(());
            }
            Err(e) => e,
        };
        // Kernels before 6.6 (no TCX): a netlink filter, which needs the clsact qdisc.
        if let Err(e) = qdisc_add_clsact(&ifname) {
            tracing::debug!(ifname, %e, "adding the clsact qdisc");
        }
        let program = self.tc_program()?;
        let link = program.attach(&ifname, TcAttachType::Egress).map_err(|e| {
            tracing::warn!(ifname, %first, "TCX attach failed");
            prog_err("attach to tc egress", e)
        })?;
        self.tc_link = Some(TcLink::Netlink(link));
        Ok(())
    }

    /// Makes `HOST_ADDRS` (`host`) or `CLUSTER_NODES` equal to `target`.
    fn sync_addrs(&mut self, host: bool, target: &BTreeSet<Ipv4Addr>) -> Result<(), Error> {
        let (map, name, current) = if host {
            (
                &mut self.host_addrs,
                "HOST_ADDRS",
                &mut self.host_fw.node_addrs,
            )
        } else {
            (
                &mut self.cluster_nodes,
                "CLUSTER_NODES",
                &mut self.host_fw.cluster_nodes,
            )
        };
        let map_err = |e| Error::Map {
            ifname: self.ifname.clone(),
            map: name,
            source: Box::new(e),
        };
        let stale: Vec<Ipv4Addr> = current.difference(target).copied().collect();
        for addr in stale {
            match map.remove(&addr_key(addr)) {
                Ok(()) => {}
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(map_err(e)),
            }
            current.remove(&addr);
        }
        let new: Vec<Ipv4Addr> = target.difference(current).copied().collect();
        for addr in new {
            map.insert(addr_key(addr), 1, 0).map_err(map_err)?;
            current.insert(addr);
        }
        Ok(())
    }

    /// Makes the `FAILSAFE` tables equal to `target`, writing only the words that differ.
    fn sync_failsafe(&mut self, target: &[PortClaims; 3]) -> Result<(), Error> {
        let tables = [
            FAILSAFE_TABLE_TCP,
            FAILSAFE_TABLE_UDP,
            FAILSAFE_TABLE_ICMP_TYPE,
        ];
        for (k, table) in tables.into_iter().enumerate() {
            let changed: Vec<(u32, u64)> =
                self.host_fw.failsafe[k].changed_words(&target[k]).collect();
            for (index, word) in changed {
                if let Err(e) = self.failsafe.set(table * PORT_TABLE_WORDS + index, word, 0) {
                    return Err(self.map_err("FAILSAFE", e));
                }
                self.host_fw.failsafe[k].set_word(index, word);
            }
        }
        Ok(())
    }

    /// Adds `flows` to `HOST_FLOWS` as seen now (e.g. connections the agent knows of).
    pub fn add_host_flows(&mut self, flows: &[HostFlow]) -> Result<(), Error> {
        self.add_host_flows_at(flows, monotonic_ns())
    }

    /// Adds `flows` to `HOST_FLOWS` as last seen at `seen_ns` (CLOCK_MONOTONIC ns, the clock of
    /// `bpf_ktime_get_ns`).
    pub fn add_host_flows_at(&mut self, flows: &[HostFlow], seen_ns: u64) -> Result<(), Error> {
        for flow in flows {
            let value = HostFlowValue {
                seen_ns,
                flags: if flow.node_opened {
                    HOST_FLOW_NODE_OPENED
                } else {
                    0
                },
            };
            if let Err(e) = self.host_flows.insert(flow.key(), value, 0) {
                return Err(self.map_err("HOST_FLOWS", e));
            }
        }
        Ok(())
    }

    /// The flows in `HOST_FLOWS` with the CLOCK_MONOTONIC ns when the node last sent on each.
    pub fn host_flows(&self) -> Result<Vec<(HostFlow, u64)>, Error> {
        let mut out = Vec::new();
        for entry in self.host_flows.iter() {
            match entry {
                Ok((key, value)) => out.push((HostFlow::from_entry(&key, &value), value.seen_ns)),
                // Evicted or deleted between two steps of the walk.
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(self.map_err("HOST_FLOWS", e)),
            }
        }
        Ok(out)
    }

    /// After a host policy change: removes every flow the node did not open (replies of
    /// connections the firewall let in, UDP), so that their next inbound packets go through the
    /// workers and meet the new policy. Flows the node opened stay (their replies would
    /// otherwise be judged as inbound connections to an ephemeral port). Returns how many were
    /// removed. Best effort against concurrent inserts by the TC program: an entry created
    /// during the walk may survive.
    pub fn clear_host_flows(&mut self) -> Result<usize, Error> {
        self.remove_host_flows(|flow| !flow.node_opened)
    }

    fn remove_host_flows(&mut self, remove: impl Fn(&HostFlow) -> bool) -> Result<usize, Error> {
        let doomed: Vec<HostFlowKey> = self
            .host_flows()?
            .into_iter()
            .filter(|(flow, _)| remove(flow))
            .map(|(flow, _)| flow.key())
            .collect();
        let mut removed = 0;
        for key in doomed {
            match self.host_flows.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(self.map_err("HOST_FLOWS", e)),
            }
        }
        Ok(removed)
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns` (0 if it cannot be read).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failsafe_tables_encode_ranges_and_anywhere_wins_overlaps() {
        let entries = vec![
            Failsafe::tcp(22..=22),
            Failsafe::udp(8472..=8472).from_nodes_only(),
            Failsafe::tcp(2379..=2380).from_nodes_only(),
            Failsafe::tcp(2380..=2381),
            Failsafe {
                proto: PROTO_ICMP,
                ports: 8..=8,
                nodes_only: true,
            },
        ];
        let t = failsafe_tables("up0", &entries).expect("valid entries");
        use RuleAction::{Pass as Anywhere, Redirect as NodesOnly};
        assert_eq!(t[0].get(22), Some(Anywhere));
        assert_eq!(t[0].get(23), None);
        assert_eq!(t[0].get(2379), Some(NodesOnly));
        assert_eq!(t[0].get(2380), Some(Anywhere), "anywhere wins the overlap");
        assert_eq!(t[0].get(2381), Some(Anywhere));
        assert_eq!(t[1].get(8472), Some(NodesOnly));
        assert_eq!(t[1].get(22), None, "TCP entries stay out of the UDP table");
        assert_eq!(t[2].get(8), Some(NodesOnly));
        assert_eq!(t[2].len(), 1);
    }

    #[test]
    fn bad_failsafe_entries_are_refused_by_index() {
        let gre = Failsafe {
            proto: 47,
            ports: 0..=0,
            nodes_only: false,
        };
        let err = failsafe_tables("up0", &[Failsafe::tcp(22..=22), gre]).expect_err("GRE");
        assert!(
            matches!(
                err,
                Error::FailsafeProtocol {
                    index: 1,
                    proto: 47,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("up0"), "{err}");
        #[allow(clippy::reversed_empty_ranges)]
        let empty = Failsafe::tcp(23..=22);
        let err = failsafe_tables("up0", &[empty]).expect_err("empty range");
        assert!(
            matches!(err, Error::FailsafeRange { lo: 23, hi: 22, .. }),
            "{err:?}"
        );
        let icmp = Failsafe {
            proto: PROTO_ICMP,
            ports: 0..=256,
            nodes_only: false,
        };
        let err = failsafe_tables("up0", &[icmp]).expect_err("ICMP type 256");
        assert!(
            matches!(err, Error::FailsafeRange { hi: 256, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn default_failsafe_has_the_issue_ports() {
        let list = HostFirewall::default_failsafe(8472, 51871);
        let t = failsafe_tables("up0", &list).expect("valid");
        for port in [22, 6443, 7445, 10250, 50000, 50001, 2379, 2380] {
            assert_eq!(t[0].get(port), Some(RuleAction::Pass), "TCP {port}");
        }
        assert_eq!(t[0].len(), 8);
        assert_eq!(
            t[1].get(8472),
            Some(RuleAction::Redirect),
            "VXLAN nodes only"
        );
        assert_eq!(
            t[1].get(51871),
            Some(RuleAction::Redirect),
            "WireGuard nodes only"
        );
        assert_eq!(HostFirewall::default_failsafe(8472, 0).len(), 7);
    }

    #[test]
    fn node_connections_are_read_from_proc_net() {
        let dir = std::env::temp_dir().join(format!("xr-procnet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // 10.0.0.5 is 0500000A as the kernel prints it; 127.0.0.1 is 0100007F.
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue\n\
             0: 0500000A:0016 00000000:0000 0A 00000000:00000000\n\
             1: 0500000A:0016 0200000A:C350 01 00000000:00000000\n\
             2: 0500000A:9C40 0100000A:192B 01 00000000:00000000\n\
             3: 0500000A:9C41 0100000A:192B 02 00000000:00000000\n\
             4: 0500000A:9C42 0100000A:192B 06 00000000:00000000\n\
             5: 0100007F:9C43 0100007F:192B 01 00000000:00000000\n\
             garbage line\n";
        let udp = "  sl  local_address rem_address   st\n\
             0: 0500000A:D431 0300000A:0035 01 00000000:00000000\n\
             1: 0500000A:0035 00000000:0000 07 00000000:00000000\n";
        std::fs::write(dir.join("tcp"), tcp).expect("write tcp");
        std::fs::write(dir.join("udp"), udp).expect("write udp");
        let node = BTreeSet::from([Ipv4Addr::new(10, 0, 0, 5)]);
        let mut got = node_connections(&dir, &node);
        got.sort();
        let _ = std::fs::remove_dir_all(&dir);
        let flow = |proto, remote: [u8; 4], remote_port, local_port, node_opened| HostFlow {
            proto,
            remote_addr: Ipv4Addr::from(remote),
            remote_port,
            local_port,
            node_opened,
        };
        let mut want = vec![
            // SSH connection in (local port 22 is listening): not node-opened.
            flow(PROTO_TCP, [10, 0, 0, 2], 50000, 22, false),
            // Established to 10.0.0.1:6443 from 40000, and a SYN_SENT from 40001.
            flow(PROTO_TCP, [10, 0, 0, 1], 6443, 40000, true),
            flow(PROTO_TCP, [10, 0, 0, 1], 6443, 40001, true),
            // Connected UDP socket to a resolver; the unconnected one is left out.
            flow(PROTO_UDP, [10, 0, 0, 3], 53, 54321, false),
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
