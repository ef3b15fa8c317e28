//! Services and NAT: what kube-proxy does for a node, per packet, in the worker.
//!
//! ```text
//! packet ──> key (TCP/UDP ports, ICMP echo id; an ICMP error: its quoted packet, reversed)
//!        ──> stateful? (to a frontend, to a SNAT address, from a backend, leaving the cluster,
//!            an ICMP error, anything from the uplink) ── no ──> unchanged
//!        ──> owner worker = f(key) ── not us ──> Verdict::Handoff (handoff.rs)
//!        ──> conntrack hit ──> apply the flow's rewrite for this direction (nat.rs)
//!        ──> frontend hit ──> backend (affinity table, Maglev or modulo over the rotation)
//!                              none: TCP RST / ICMP port unreachable, or drop for Local policies
//!                          ──> DNAT (+ SNAT for hairpin, and for external traffic to a remote
//!                              backend unless externalTrafficPolicy Local) ──> conntrack insert
//!        ──> pod traffic leaving the cluster ──> masquerade: SNAT to the node ──> insert
//! ```
//!
//! **Flow steering** (both directions of a flow must meet the worker that holds its conntrack
//! entry). The owner is computed from the packet's key alone, identically for both directions
//! ([`owner`], [`FlowRole`]):
//! 1. destination is a frontend: hash of the *source* endpoint (the client);
//! 2. destination is a SNAT address (this node's addresses, the hairpin address): the
//!    destination port modulo the number of workers — the port was *chosen* by the owner among
//!    the ports that map to itself, so a reply names its worker without any lookup;
//! 3. destination is a backend endpoint (address, port, protocol of a service's backend): hash
//!    of the source (the client), the same as rule 1 — a flow to a pod's service port, through
//!    the ClusterIP or directly, is owned by its client's hash;
//! 4. source is a backend endpoint: hash of the destination (the client): replies of rules 1
//!    and 3, translated or not;
//! 5. otherwise: a symmetric hash of both endpoints (pod-to-pod flows tracked for policy, and
//!    masqueraded flows, whose replies come back by rule 2).
//!
//! A masqueraded flow picks its source port among those that rule 2 maps to its owner.
//! Limit: a client whose own source endpoint happens to be a backend endpoint of the same
//! protocol (its ephemeral port equal to one of its own service target ports) is steered by
//! rule 3 on the way out and rule 3 on the way back (to the other end): such a flow may miss its
//! entry and be tracked twice. ICMP errors use the key of the packet they
//! quote, reversed, so they reach the flow's owner too. With one worker nothing is steered.
//!
//! **Not done**: fragments to services or of masqueraded flows are dropped (`service_fragment`:
//! no reassembly); `loadBalancerSourceRanges`; flows to a removed backend keep it until they
//! expire (kube-proxy deletes UDP conntrack entries of removed endpoints).
use std::{net::Ipv4Addr, sync::Arc};

use crate::{
    affinity::Affinity,
    classify::Ipv4Meta,
    conntrack::{Conntrack, Direction, FlowKey},
    drop_reason::DropReason,
    packet::PacketBuf,
    pipeline::Resume,
    policy::{policy_port, PolicyTable, PolicyVerdict},
    services::{is_lb_protocol, Frontend, ServiceTable},
    snapshot::{InterfaceEntry, NatConfig, Snapshot},
    stages::{icmp_error, nat, nat::NatRewrite, reject},
    wire::{be16, be32, icmp, ipv4},
    Ctx, Verdict,
};

/// At most this many candidate source ports are tried per new SNAT flow.
const PORT_TRIES: u32 = 64;

/// Which worker this is, of how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steer {
    pub worker: u16,
    pub workers: u16,
}

impl Steer {
    pub const SINGLE: Steer = Steer {
        worker: 0,
        workers: 1,
    };
}

/// Counters the lb stage keeps (plain integers: one owner).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbStats {
    pub lb_new_flows: u64,
    pub masq_new_flows: u64,
    pub ct_hits: u64,
    /// Flows whose backend was removed from the service: forgotten and balanced again.
    pub lb_reselected: u64,
    /// Flows tracked only because a policy isolates one of their ends.
    pub policy_flows: u64,
    /// Flows (or untracked packets) forwarded under an audit verdict, by the side that would
    /// have denied them: ingress, egress, host.
    pub policy_audit: [u64; 3],
    /// Established flows removed because a policy change denies them.
    pub policy_cut: u64,
}

/// Per-worker blocks of WireGuard send counters, by peer id modulo this size (a collision only
/// retires a block early: nonces stay unique).
pub const WG_BLOCKS: usize = 64;

/// A worker's flow state: conntrack and session affinity, allocated once.
pub struct Flows {
    pub ct: Conntrack,
    /// This worker's WireGuard send counters (see `wireguard::CounterBlock`).
    pub wg_blocks: [crate::wireguard::CounterBlock; WG_BLOCKS],
    /// WireGuard transport messages this worker opened.
    pub wg_opened: u64,
    /// WireGuard traffic per peer slot: tx packets, tx bytes, rx packets, rx bytes.
    pub wg_peers: crate::stats::WgPeerCounters,
    /// Shared by every worker of the dataplane (see `affinity`).
    pub affinity: Arc<Affinity>,
    pub stats: LbStats,
}

impl Flows {
    pub fn new(ct: Conntrack, affinity: Arc<Affinity>) -> Self {
        Self {
            ct,
            wg_blocks: [crate::wireguard::CounterBlock::default(); WG_BLOCKS],
            wg_opened: 0,
            wg_peers: [[0; 4]; WG_BLOCKS],
            affinity,
            stats: LbStats::default(),
        }
    }
}

/// Where the packet entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From a pod on this node.
    Pod,
    /// From another node, decapsulated.
    Overlay,
    /// From outside, on the uplink (NodePort, LoadBalancer, replies to SNATed flows).
    Uplink,
}

/// The outcome: go on routing the (possibly rewritten) packet, or stop here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lb {
    Continue(Ipv4Meta),
    Done(Verdict),
}

/// A packet's flow key and what kind of packet it is.
#[derive(Clone, Copy, Debug)]
struct L4 {
    key: FlowKey,
    tcp_flags: u8,
    /// An ICMP error: `key` is its quoted packet's key, reversed (the direction the error
    /// travels in the flow).
    error: bool,
}

#[inline]
fn l4_of(meta: &Ipv4Meta, frame: &[u8]) -> Option<L4> {
    if meta.fragment {
        return None;
    }
    let end = (meta.l3 + meta.total_len).min(frame.len());
    let l4 = meta.l4;
    let mut key = FlowKey {
        src: meta.src,
        dst: meta.dst,
        sport: 0,
        dport: 0,
        proto: meta.protocol,
    };
    match meta.protocol {
        ipv4::PROTO_TCP if end >= l4 + 14 => {
            key.sport = be16(frame, l4);
            key.dport = be16(frame, l4 + 2);
            Some(L4 {
                key,
                tcp_flags: frame[l4 + 13],
                error: false,
            })
        }
        ipv4::PROTO_UDP if end >= l4 + 8 => {
            key.sport = be16(frame, l4);
            key.dport = be16(frame, l4 + 2);
            Some(L4 {
                key,
                tcp_flags: 0,
                error: false,
            })
        }
        ipv4::PROTO_ICMP if end >= l4 + 8 => {
            let t = frame[l4];
            match t {
                icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY => {
                    let id = be16(frame, l4 + 4);
                    if t == icmp::TYPE_ECHO_REQUEST {
                        key.sport = id;
                    } else {
                        key.dport = id;
                    }
                    Some(L4 {
                        key,
                        tcp_flags: 0,
                        error: false,
                    })
                }
                t if icmp::is_error(t) => {
                    let q = l4 + icmp::HEADER_LEN;
                    if end < q + ipv4::MIN_HEADER_LEN || frame[q] >> 4 != 4 {
                        return None;
                    }
                    let qihl = usize::from(frame[q] & 0x0f) * 4;
                    let qt = q + qihl;
                    let qproto = frame[q + 9];
                    let mut quoted = FlowKey {
                        src: Ipv4Addr::from(be32(frame, q + 12)),
                        dst: Ipv4Addr::from(be32(frame, q + 16)),
                        sport: 0,
                        dport: 0,
                        proto: qproto,
                    };
                    match qproto {
                        ipv4::PROTO_TCP | ipv4::PROTO_UDP if end >= qt + 4 => {
                            quoted.sport = be16(frame, qt);
                            quoted.dport = be16(frame, qt + 2);
                        }
                        ipv4::PROTO_ICMP if end >= qt + 8 => {
                            let id = be16(frame, qt + 4);
                            match frame[qt] {
                                icmp::TYPE_ECHO_REQUEST => quoted.sport = id,
                                icmp::TYPE_ECHO_REPLY => quoted.dport = id,
                                _ => return None,
                            }
                        }
                        _ => return None,
                    }
                    Some(L4 {
                        key: quoted.reversed(),
                        tcp_flags: 0,
                        error: true,
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[inline]
fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[inline]
fn endpoint_hash(addr: Ipv4Addr, port: u16) -> u32 {
    (mix(u64::from(u32::from(addr)) << 16 | u64::from(port)) >> 32) as u32
}

/// The hash new flows choose their backend with (the whole 5-tuple).
#[inline]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let a = u64::from(u32::from(k.src)) << 32 | u64::from(u32::from(k.dst));
    let b = u64::from(k.sport) << 32 | u64::from(k.dport) << 16 | u64::from(k.proto);
    (mix(a ^ mix(b)) >> 32) as u32
}

/// The hash affinity services choose with (the client address only, so every worker agrees).
#[inline]
pub fn client_hash(client: Ipv4Addr) -> u32 {
    (mix(u64::from(u32::from(client)) | 1 << 40) >> 32) as u32
}

/// What the packet's destination is, for flow steering (module doc, "Flow steering").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowRole {
    /// To a service frontend: the source is the client.
    ToFrontend,
    /// To a SNAT address (this node, the hairpin address): the port names the owner.
    ToSnatAddr,
    /// To a backend endpoint (address, port, protocol of some service): the source is the
    /// client.
    ToServer,
    /// From a backend endpoint: the destination is the client.
    FromServer,
    /// Anything else: both ends count the same (a symmetric hash).
    Peer,
}

/// The role of a packet with key `k` (see [`FlowRole`]).
#[inline]
pub fn role(table: &ServiceTable, k: &FlowKey, to_frontend: bool, to_snat_addr: bool) -> FlowRole {
    if to_frontend {
        FlowRole::ToFrontend
    } else if to_snat_addr {
        FlowRole::ToSnatAddr
    } else if table.is_backend_endpoint(k.dst, k.dport, k.proto) {
        FlowRole::ToServer
    } else if table.is_backend_endpoint(k.src, k.sport, k.proto) {
        FlowRole::FromServer
    } else {
        FlowRole::Peer
    }
}

/// The worker that owns the flow of a packet with key `k` (module doc, "Flow steering").
#[inline]
pub fn owner(k: &FlowKey, role: FlowRole, workers: u16) -> u16 {
    let n = u32::from(workers.max(1));
    let v = match role {
        FlowRole::ToFrontend | FlowRole::ToServer => endpoint_hash(k.src, k.sport) % n,
        FlowRole::ToSnatAddr => u32::from(k.dport) % n,
        FlowRole::FromServer => endpoint_hash(k.dst, k.dport) % n,
        FlowRole::Peer => {
            (endpoint_hash(k.src, k.sport) ^ endpoint_hash(k.dst, k.dport)).rotate_left(7) % n
        }
    };
    v as u16
}

/// Re-reads the addresses after a rewrite (ICMP errors may or may not change the outer ones).
#[inline]
fn reread(meta: &Ipv4Meta, frame: &[u8]) -> Ipv4Meta {
    let mut m = *meta;
    m.src = Ipv4Addr::from(be32(frame, meta.l3 + 12));
    m.dst = Ipv4Addr::from(be32(frame, meta.l3 + 16));
    m
}

#[inline]
fn apply(meta: &Ipv4Meta, rw: &NatRewrite, pkt: &mut PacketBuf<'_>) -> Lb {
    match nat::rewrite(meta, rw, pkt) {
        Ok(()) => Lb::Continue(reread(meta, pkt.data())),
        Err(r) => Lb::Done(Verdict::Drop(r)),
    }
}

/// Rejects a packet to a service port: TCP RST, ICMP port unreachable for UDP, else a drop.
/// Only to a sender on a directly attached interface (a pod, or the uplink's L2 neighbour);
/// packets from another node are dropped (the reject would have to go back through the tunnel).
#[inline]
fn reject(
    origin: Origin,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    reason: DropReason,
) -> Verdict {
    if origin == Origin::Overlay {
        return Verdict::Drop(reason);
    }
    match meta.protocol {
        ipv4::PROTO_TCP => reject::tcp_reset(rx, meta, pkt, reason),
        ipv4::PROTO_UDP => icmp_error::port_unreachable(meta.dst, rx, meta, pkt, reason),
        _ => Verdict::Drop(reason),
    }
}

/// A free SNAT source port for a flow `k` translated to (`src`, port) and `dst`: one that maps
/// to this worker (steering rule 2) and whose reply key no live flow uses.
#[inline]
fn alloc_port(
    ct: &Conntrack,
    k: &FlowKey,
    src: Ipv4Addr,
    dst: Option<(Ipv4Addr, u16)>,
    ports: (u16, u16),
    steer: Steer,
    now_ns: u64,
) -> Option<u16> {
    let (lo, hi) = (u32::from(ports.0), u32::from(ports.1));
    if hi < lo {
        return None;
    }
    let n = u32::from(steer.workers.max(1));
    let w = u32::from(steer.worker);
    let align = |p: u32| p + (w + n - p % n) % n;
    let first = align(lo);
    if first > hi {
        return None;
    }
    let span = hi - lo + 1;
    let mut p = align(lo + flow_hash(k) % span);
    for _ in 0..PORT_TRIES.min(span / n + 1) {
        if p > hi {
            p = first;
        }
        let rw = NatRewrite {
            src: Some((src, p as u16)),
            dst,
        };
        if !ct.contains(&k.reply_key(&rw), now_ns) {
            return Some(p as u16);
        }
        p += n;
    }
    None
}

/// Runs the stage; see the module doc. `steered`: the packet was handed over by another worker
/// (do not steer again). `resume`: where the owner goes on if it is handed over.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn run(
    ctx: &mut Ctx<'_>,
    snap: &Snapshot,
    origin: Origin,
    rx: &InterfaceEntry,
    meta: &Ipv4Meta,
    pkt: &mut PacketBuf<'_>,
    steered: bool,
    resume: Resume,
) -> Lb {
    let table: &ServiceTable = snap.services();
    let nat_cfg: Option<&NatConfig> = snap.nat();
    let policy = snap.policy();
    let pol_on = policy.is_active();
    if table.is_empty() && nat_cfg.is_none() && !pol_on {
        return match origin {
            Origin::Uplink => Lb::Done(Verdict::Drop(DropReason::UplinkUnexpected)),
            _ => Lb::Continue(*meta),
        };
    }
    let to_snat_addr = nat_cfg.is_some_and(|n| n.is_snat_addr(meta.dst));
    let Some(l4) = l4_of(meta, pkt.data()) else {
        // Fragments, other protocols, truncated transport headers: never translated.
        let to_service = table.is_service_addr(meta.dst);
        let leaving = origin == Origin::Pod
            && nat_cfg.is_some_and(|n| n.masquerade)
            && !snap.in_cluster(meta.dst);
        return if meta.fragment && (to_service || to_snat_addr || leaving) {
            Lb::Done(Verdict::Drop(DropReason::ServiceFragment))
        } else if to_service {
            Lb::Done(Verdict::Drop(DropReason::ServiceUnknownPort))
        } else if origin == Origin::Uplink {
            // Fragments and other protocols for the node itself (host firewall on): judged
            // alone, port 0.
            let key = FlowKey {
                src: meta.src,
                dst: meta.dst,
                sport: 0,
                dport: 0,
                proto: meta.protocol,
            };
            match (snap.host_path(), nat_cfg) {
                (Some(host), Some(n)) if n.node_addrs.contains(&meta.dst) => {
                    Lb::Done(to_host(ctx, policy, host, &key, pkt))
                }
                _ => Lb::Done(Verdict::Drop(DropReason::UplinkUnexpected)),
            }
        } else if pol_on {
            match judge_untracked(ctx, policy, meta.src, meta.dst, meta.protocol) {
                Some(r) => Lb::Done(Verdict::Drop(r)),
                None => Lb::Continue(*meta),
            }
        } else {
            Lb::Continue(*meta)
        };
    };
    let k = l4.key;
    let fe: Option<Frontend> = if is_lb_protocol(k.proto) {
        table.frontend(k.dst, k.dport, k.proto).copied()
    } else {
        None
    };
    let to_snat_addr = nat_cfg.is_some_and(|n| n.is_snat_addr(k.dst));
    let to_service = table.is_service_addr(k.dst);
    let masquerade = origin == Origin::Pod
        && !l4.error
        && nat_cfg.is_some_and(|n| n.masquerade)
        && !to_service
        && !snap.in_cluster(k.dst);
    let policy_tracked = pol_on && (policy.isolates(k.src) || policy.isolates(k.dst));
    let stateful = fe.is_some()
        || to_snat_addr
        || to_service
        || l4.error
        || masquerade
        || origin == Origin::Uplink
        || policy_tracked
        || table.is_backend_addr(k.src);
    if !stateful {
        return Lb::Continue(*meta);
    }
    let steer = ctx.steer;
    if steer.workers > 1 && !steered {
        let o = owner(
            &k,
            role(table, &k, fe.is_some(), to_snat_addr),
            steer.workers,
        );
        if o != steer.worker {
            return Lb::Done(Verdict::Handoff { worker: o, resume });
        }
    }
    let now = ctx.now_ns;
    let Some(flows) = ctx.flows.as_deref_mut() else {
        return Lb::Done(Verdict::Drop(DropReason::NoFlowState));
    };
    // A service flow records the service table generation it was checked against (`backend`).
    let table_gen = table.generation() as u16;
    let pgen = policy.generation();
    let mut hit = flows.ct.track_origin(&k, l4.tcp_flags, !l4.error, now);
    if let Some((Direction::Original, _, flow)) = hit {
        if let (Some((addr, port)), false) = (flow.nat.and_then(|n| n.dst), l4.error) {
            if flow.backend != table_gen {
                // The table changed since this flow was checked: is its backend still one of
                // the service's (in any state: not-serving ones keep their pinned flows)? If
                // not, or the service is gone, the flow is forgotten and this packet starts
                // over, as Cilium reselects for a removed backend (kube-proxy deletes the
                // conntrack entries of removed UDP endpoints). A TCP connection then gets a
                // RST from its new backend instead of hanging.
                let alive = fe
                    .and_then(|f| table.service(f.service))
                    .is_some_and(|svc| {
                        table
                            .backends_of(svc)
                            .iter()
                            .any(|b| b.addr == addr && b.port == port)
                    });
                if alive {
                    flows.ct.set_backend(&k, table_gen);
                } else {
                    flows.ct.remove(&k);
                    flows.stats.lb_reselected += 1;
                    hit = None;
                }
            }
        }
    }
    if let Some((dir, orig, flow)) = hit {
        flows.stats.ct_hits += 1;
        if !l4.error && flow.policy_gen != pgen && (pol_on || flow.policy_gen != 0) {
            // The policy changed since this flow was judged: judge its original direction
            // again (after DNAT, before SNAT) and cut it if it is now denied.
            let (dst, dport) = flow
                .nat
                .and_then(|n| n.dst)
                .unwrap_or((orig.dst, orig.dport));
            let port = policy_port(orig.proto, dport);
            match policy.check(orig.src, dst, orig.proto, port) {
                PolicyVerdict::Deny(r) => {
                    flows.ct.remove(&k);
                    flows.stats.policy_cut += 1;
                    return Lb::Done(Verdict::Drop(r));
                }
                PolicyVerdict::Audit(r) => {
                    flows.stats.policy_audit[audit_slot(r)] += 1;
                    flows.ct.set_policy(&k, pgen, true);
                }
                PolicyVerdict::Allow => {
                    flows.ct.set_policy(&k, pgen, false);
                }
            }
        }
        return match flow.rewrite_for(&orig, dir) {
            Some(rw) => apply(meta, &rw, pkt),
            None => Lb::Continue(*meta),
        };
    }
    if l4.error {
        // An error about no flow of ours.
        return match origin {
            Origin::Uplink => Lb::Done(Verdict::Drop(DropReason::UplinkUnexpected)),
            _ if pol_on => match judge_untracked(ctx, policy, meta.src, meta.dst, meta.protocol) {
                Some(r) => Lb::Done(Verdict::Drop(r)),
                None => Lb::Continue(*meta),
            },
            _ => Lb::Continue(*meta),
        };
    }
    if let Some(fe) = fe {
        let Some(svc) = table.service(fe.service) else {
            return Lb::Done(Verdict::Drop(DropReason::ServiceNoBackend));
        };
        // In-cluster clients of an external frontend use the cluster rotation (kube-proxy's
        // short-circuit for externalTrafficPolicy Local).
        let local_only = fe.local_only && !(origin == Origin::Pod && fe.kind.is_external());
        let picked = if svc.has_affinity() {
            let remembered = flows
                .affinity
                .get(k.src, svc.affinity_id, now)
                .and_then(|a| {
                    // Only while that backend is still in the rotation new flows use.
                    table
                        .rotation_members(svc, local_only)
                        .iter()
                        .map(|&i| u32::from(i))
                        .find(|&i| table.backend(svc, i).is_some_and(|b| b.addr == a))
                });
            let choice = match remembered {
                Some(i) => table.backend(svc, i).map(|b| (i, b)),
                None => table.select(svc, local_only, client_hash(k.src)),
            };
            if let Some((_, b)) = choice {
                flows
                    .affinity
                    .put(k.src, svc.affinity_id, b.addr, now, svc.affinity_timeout_ns);
            }
            choice
        } else {
            table.select(svc, local_only, flow_hash(&k))
        };
        let Some((_, backend)) = picked else {
            if local_only {
                return Lb::Done(Verdict::Drop(DropReason::ServiceNoLocalBackend));
            }
            return Lb::Done(reject(origin, rx, meta, pkt, DropReason::ServiceNoBackend));
        };
        let backend = *backend;
        let dst = Some((backend.addr, backend.port));
        let snat_src = match nat_cfg {
            Some(n) if backend.addr == k.src => Some(n.hairpin_addr),
            Some(n)
                if fe.kind.is_external()
                    && !fe.keep_source
                    && origin != Origin::Pod
                    && !backend.local =>
            {
                n.node_addr()
            }
            _ => None,
        };
        let mut rw = NatRewrite { src: None, dst };
        if let (Some(src), Some(n)) = (snat_src, nat_cfg) {
            let Some(port) = alloc_port(&flows.ct, &k, src, dst, n.ports, steer, now) else {
                return Lb::Done(Verdict::Drop(DropReason::NatPortExhausted));
            };
            rw.src = Some((src, port));
        }
        let mut flow = flows
            .ct
            .new_flow(k.proto, l4.tcp_flags, Some(rw), table_gen, now);
        if pol_on {
            let port = policy_port(k.proto, backend.port);
            if let Some(r) = judge_new(flows, policy, &mut flow, k.src, backend.addr, k.proto, port)
            {
                return Lb::Done(Verdict::Drop(r));
            }
        }
        // A live flow evicted to make room is counted in the table's stats.
        let _ = flows.ct.insert(&k, &k.reply_key(&rw), flow, now);
        flows.stats.lb_new_flows += 1;
        return apply(meta, &rw, pkt);
    }
    if to_service {
        return Lb::Done(reject(
            origin,
            rx,
            meta,
            pkt,
            DropReason::ServiceUnknownPort,
        ));
    }
    if masquerade {
        let Some(n) = nat_cfg else {
            return Lb::Continue(*meta);
        };
        // ICMP: only echo requests start a flow (the identifier is the "port").
        if k.proto == ipv4::PROTO_ICMP && k.dport != 0 {
            return Lb::Continue(*meta);
        }
        let Some(src) = n.node_addr() else {
            return Lb::Continue(*meta);
        };
        let Some(port) = alloc_port(&flows.ct, &k, src, None, n.ports, steer, now) else {
            return Lb::Done(Verdict::Drop(DropReason::NatPortExhausted));
        };
        let rw = NatRewrite::snat(src, port);
        let mut flow = flows.ct.new_flow(k.proto, l4.tcp_flags, Some(rw), 0, now);
        if pol_on {
            let port = policy_port(k.proto, k.dport);
            if let Some(r) = judge_new(flows, policy, &mut flow, k.src, k.dst, k.proto, port) {
                return Lb::Done(Verdict::Drop(r));
            }
        }
        let _ = flows.ct.insert(&k, &k.reply_key(&rw), flow, now);
        flows.stats.masq_new_flows += 1;
        return apply(meta, &rw, pkt);
    }
    if policy_tracked && origin != Origin::Uplink {
        // A flow of an isolated pod, untranslated: judged and tracked, so its replies pass.
        let mut flow = flows.ct.new_flow(k.proto, l4.tcp_flags, None, 0, now);
        let port = policy_port(k.proto, k.dport);
        if let Some(r) = judge_new(flows, policy, &mut flow, k.src, k.dst, k.proto, port) {
            return Lb::Done(Verdict::Drop(r));
        }
        let _ = flows.ct.insert(&k, &k.reversed(), flow, now);
        flows.stats.policy_flows += 1;
        return Lb::Continue(*meta);
    }
    if origin == Origin::Uplink && !in_snat_range(nat_cfg, &k) {
        if let (Some(host), Some(n)) = (snap.host_path(), nat_cfg) {
            if n.node_addrs.contains(&k.dst) {
                return Lb::Done(to_host(ctx, policy, host, &k, pkt));
            }
        }
    }
    match origin {
        Origin::Uplink => Lb::Done(Verdict::Drop(DropReason::UplinkUnexpected)),
        _ => Lb::Continue(*meta),
    }
}

/// Whether `k`'s destination port is in the SNAT range (a reply to a translated flow that is
/// gone: never the host's; the kernel's ephemeral ports are below the range).
#[inline]
fn in_snat_range(nat_cfg: Option<&NatConfig>, k: &FlowKey) -> bool {
    matches!(k.proto, ipv4::PROTO_TCP | ipv4::PROTO_UDP)
        && nat_cfg.is_some_and(|n| (n.ports.0..=n.ports.1).contains(&k.dport))
}

/// A packet for this node that the uplink's XDP program sent to the workers because the host
/// firewall is on (failsafe ports and the node's own flows never get here: XDP passes them).
/// Judged on its own by the host policy; admitted ones are re-injected into the kernel.
#[inline]
fn to_host(
    ctx: &mut Ctx<'_>,
    policy: &PolicyTable,
    host: &crate::snapshot::HostPath,
    k: &FlowKey,
    pkt: &mut PacketBuf<'_>,
) -> Verdict {
    let port = policy_port(k.proto, k.dport);
    match policy.check_host(k.src, k.proto, port) {
        PolicyVerdict::Deny(r) => return Verdict::Drop(r),
        PolicyVerdict::Audit(r) => {
            if let Some(flows) = ctx.flows.as_deref_mut() {
                flows.stats.policy_audit[audit_slot(r)] += 1;
            }
        }
        PolicyVerdict::Allow => {}
    }
    let d = pkt.data_mut();
    d[0..6].copy_from_slice(&host.kernel_mac.0);
    d[6..12].copy_from_slice(&host.mac.0);
    Verdict::Tx {
        ifindex: host.ifindex,
        kind: crate::TxKind::ToHost,
    }
}

/// The slot of `LbStats::policy_audit` for an audit verdict's reason.
#[inline]
fn audit_slot(r: DropReason) -> usize {
    match r {
        DropReason::PolicyDeniedIngress => 0,
        DropReason::PolicyDeniedEgress => 1,
        _ => 2,
    }
}

/// Judges a new flow from `src` to `dst` (after DNAT) and marks `flow` with the verdict:
/// `Some(reason)` when it is denied (nothing is inserted), else `None` (audit counted).
#[allow(clippy::too_many_arguments)]
#[inline]
fn judge_new(
    flows: &mut Flows,
    policy: &PolicyTable,
    flow: &mut crate::conntrack::Flow,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Option<DropReason> {
    flow.policy_gen = policy.generation();
    match policy.check(src, dst, proto, port) {
        PolicyVerdict::Deny(r) => Some(r),
        PolicyVerdict::Audit(r) => {
            flows.stats.policy_audit[audit_slot(r)] += 1;
            flow.policy_audit = true;
            None
        }
        PolicyVerdict::Allow => None,
    }
}

/// Judges a packet that cannot be tracked (a fragment, a protocol without ports, an ICMP error
/// about no flow) on its own, with port 0: `Some(reason)` to drop it.
#[inline]
fn judge_untracked(
    ctx: &mut Ctx<'_>,
    policy: &PolicyTable,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
) -> Option<DropReason> {
    if !policy.isolates(src) && !policy.isolates(dst) {
        return None;
    }
    match policy.check(src, dst, proto, 0) {
        PolicyVerdict::Deny(r) => Some(r),
        PolicyVerdict::Audit(r) => {
            if let Some(flows) = ctx.flows.as_deref_mut() {
                flows.stats.policy_audit[audit_slot(r)] += 1;
            }
            None
        }
        PolicyVerdict::Allow => None,
    }
}
