//! The service tables workers read (part of the snapshot, shared by `Arc` so a neighbour or
//! pod change does not rebuild them): frontends, backends, rotations and Maglev tables, built by
//! control from its `ServicePlan` (the Maglev tables are computed there, never in a worker).
//!
//! ```text
//!  frontend index (open addressing, key = addr<<24 | port<<8 | proto)
//!     -> frontends[i] { service, kind, local_only, keep_source }
//!          -> services[s] { backends: span, cluster/local rotation: member span + maglev (table, len) }
//!               maglev[table][hash % len] -> backend index within the service -> backends[..]
//! ```
//!
//! Lookups are one probe in the common case whatever the number of services (the index is at
//! most half full); the per-packet path allocates nothing. Maglev entries are `u16` (a service
//! port has at most 65535 backends), so Cilium's default table of 16381 entries costs 32 KiB per
//! rotation. Tables are `Arc<[u16]>` shared with control's plan and with the previous table, so a
//! rebuild after one Service changed copies spans and indexes, not Maglev tables.
use std::{net::Ipv4Addr, sync::Arc};

use crate::{snapshot::FlatIndex, wire::ipv4};

/// What made an address a frontend (as `control::services::FrontendKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    /// Traffic to this kind comes from outside the cluster (externalTrafficPolicy applies).
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// One `(address, port, protocol)` the dataplane answers for a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// IP protocol number (6 or 17).
    pub proto: u8,
    pub kind: FrontendKind,
    /// Index of the service port in the table.
    pub service: u32,
    /// New flows use the local rotation (externalTrafficPolicy / internalTrafficPolicy Local).
    pub local_only: bool,
    /// externalTrafficPolicy Local on an external frontend: the client's address is kept (no
    /// SNAT even for traffic that entered from outside).
    pub keep_source: bool,
}

/// A backend: where a flow is DNATed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Runs on this node.
    pub local: bool,
}

/// A rotation as control gives it: indices into the service's backends (ascending) and the
/// Maglev table over them (empty: selection by hash modulo the members).
///
/// The table is shared, not copied: a table rebuilt because one Service changed reuses every
/// other rotation's Maglev table (at 10,000 Services these are hundreds of MiB). An entry that
/// is not one of the service's backends selects nothing (the flow is rejected as if the service
/// had no backend); control builds the tables from the members, so that never happens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationSpec {
    pub members: Vec<u32>,
    pub maglev: Arc<[u16]>,
}

/// A service port as control gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub backends: Vec<Backend>,
    pub cluster: RotationSpec,
    pub local: RotationSpec,
    /// `sessionAffinity: ClientIP` timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// Names the service port in the affinity table across table rebuilds (control hashes its
    /// namespace, name and port); 0: use the position in the table.
    pub affinity_id: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    #[inline]
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rotation {
    members: Span,
    maglev: Span,
}

/// A service port in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    backends: Span,
    cluster: Rotation,
    local: Rotation,
    /// Session affinity timeout in nanoseconds; 0 = none.
    pub affinity_timeout_ns: u64,
    /// Key of the service port in the affinity table (stable across table rebuilds).
    pub affinity_id: u32,
}

impl Service {
    pub fn has_affinity(&self) -> bool {
        self.affinity_timeout_ns != 0
    }
}

/// Why a table could not be built (control reports it; the previous table stays in use).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceTableError {
    #[error("service port {0} has {1} backends; at most 65535 are supported")]
    TooManyBackends(u32, usize),
    #[error("service port {0}: rotation member {1} is not one of its {2} backends")]
    BadMember(u32, u32, usize),
    #[error("frontend {0}:{1}/{2} refers to service port {3}, which does not exist")]
    BadService(Ipv4Addr, u16, u8, u32),
    #[error("frontend {0}:{1}/{2} is listed twice")]
    DuplicateFrontend(Ipv4Addr, u16, u8),
}

/// The whole table; see the module doc.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    generation: u64,
    frontends: Vec<Frontend>,
    index_keys: Vec<u64>,
    index_pos: Vec<u32>,
    index_shift: u32,
    services: Vec<Service>,
    backends: Vec<Backend>,
    members: Vec<u16>,
    /// Maglev tables, shared with control's plan and with earlier tables; a rotation's
    /// `maglev` span is (index here, table length).
    maglev: Vec<Arc<[u16]>>,
    /// Addresses that are frontends for some port (ClusterIPs, LB IPs, externalIPs; not node
    /// addresses): traffic to them that matches no frontend is dropped, not routed.
    service_addrs: FlatIndex,
    /// Addresses of every backend: their traffic may be a reply of a translated flow.
    backend_addrs: FlatIndex,
    /// (address, port, protocol) of every backend, open addressing (0: empty): the server side
    /// of a flow, which flow steering needs (`stages::lb::owner`).
    backend_eps: Vec<u64>,
}

#[inline]
fn frontend_key(addr: Ipv4Addr, port: u16, proto: u8) -> u64 {
    u64::from(u32::from(addr)) << 24 | u64::from(port) << 8 | u64::from(proto)
}

#[inline]
fn mix64(mut k: u64) -> u64 {
    // murmur3 fmix64
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

impl ServiceTable {
    /// An empty table (no services).
    pub fn empty() -> Arc<ServiceTable> {
        Arc::new(ServiceTable::default())
    }

    /// The plan generation this table was built from (shown by `sluice service list`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn frontends(&self) -> &[Frontend] {
        &self.frontends
    }

    /// The frontend for a destination.
    #[inline]
    pub fn frontend(&self, addr: Ipv4Addr, port: u16, proto: u8) -> Option<&Frontend> {
        if self.index_keys.is_empty() {
            return None;
        }
        let key = frontend_key(addr, port, proto);
        let mask = self.index_keys.len() - 1;
        let mut at = (mix64(key) >> self.index_shift) as usize;
        loop {
            let k = self.index_keys[at];
            if k == key {
                return self.frontends.get(self.index_pos[at] as usize);
            }
            if k == 0 {
                return None;
            }
            at = (at + 1) & mask;
        }
    }

    /// Whether `addr` is a ClusterIP, LoadBalancer IP or externalIP of some service.
    #[inline]
    pub fn is_service_addr(&self, addr: Ipv4Addr) -> bool {
        self.service_addrs.get(u32::from(addr)).is_some()
    }

    /// Whether `addr` is a backend of some service.
    #[inline]
    pub fn is_backend_addr(&self, addr: Ipv4Addr) -> bool {
        self.backend_addrs.get(u32::from(addr)).is_some()
    }

    /// Whether (`addr`, `port`, `proto`) is a backend endpoint of some service.
    #[inline]
    pub fn is_backend_endpoint(&self, addr: Ipv4Addr, port: u16, proto: u8) -> bool {
        if self.backend_eps.is_empty() {
            return false;
        }
        let key = frontend_key(addr, port, proto);
        let mask = self.backend_eps.len() - 1;
        let mut at = mix64(key) as usize & mask;
        loop {
            match self.backend_eps[at] {
                0 => return false,
                k if k == key => return true,
                _ => at = (at + 1) & mask,
            }
        }
    }

    #[inline]
    pub fn service(&self, i: u32) -> Option<&Service> {
        self.services.get(i as usize)
    }

    /// The backend of `svc` with index `i` (as stored in conntrack / affinity).
    #[inline]
    pub fn backend(&self, svc: &Service, i: u32) -> Option<&Backend> {
        let r = svc.backends.range();
        self.backends
            .get(r.start + i as usize)
            .filter(|_| i < svc.backends.len)
    }

    /// Chooses a backend for a new flow with `hash`: the rotation's Maglev entry, or the hash
    /// modulo its members. `None`: the rotation is empty (no backend: reject). Returns the
    /// backend's index within the service and the backend.
    #[inline]
    pub fn select(&self, svc: &Service, local_only: bool, hash: u32) -> Option<(u32, &Backend)> {
        let rot = if local_only { svc.local } else { svc.cluster };
        if rot.members.len == 0 {
            return None;
        }
        let i = if rot.maglev.len != 0 {
            let table = self.maglev.get(rot.maglev.start as usize)?;
            u32::from(*table.get((hash % rot.maglev.len) as usize)?)
        } else {
            let members = &self.members[rot.members.range()];
            u32::from(members[(hash % rot.members.len) as usize])
        };
        self.backend(svc, i).map(|b| (i, b))
    }

    /// Whether a rotation has any backend.
    #[inline]
    pub fn has_backends(&self, svc: &Service, local_only: bool) -> bool {
        let rot = if local_only { svc.local } else { svc.cluster };
        rot.members.len != 0
    }

    /// The members (backend indices) of a rotation.
    #[inline]
    pub fn rotation_members(&self, svc: &Service, local_only: bool) -> &[u16] {
        let rot = if local_only { svc.local } else { svc.cluster };
        &self.members[rot.members.range()]
    }

    /// The backends of a service port (for listings and tests).
    pub fn backends_of(&self, svc: &Service) -> &[Backend] {
        &self.backends[svc.backends.range()]
    }

    /// The Maglev table of a rotation (empty when selection is by modulo).
    pub fn maglev_of(&self, svc: &Service, local_only: bool) -> &[u16] {
        let rot = if local_only { svc.local } else { svc.cluster };
        if rot.maglev.len == 0 {
            return &[];
        }
        self.maglev
            .get(rot.maglev.start as usize)
            .map_or(&[], |t| &t[..])
    }
}

/// Builds a [`ServiceTable`].
#[derive(Debug, Default)]
pub struct ServiceTableBuilder {
    table: ServiceTable,
}

impl ServiceTableBuilder {
    pub fn new(generation: u64) -> Self {
        Self {
            table: ServiceTable {
                generation,
                ..ServiceTable::default()
            },
        }
    }

    /// Adds a service port; returns its index for [`Frontend::service`].
    pub fn service(&mut self, spec: &ServiceSpec) -> Result<u32, ServiceTableError> {
        let t = &mut self.table;
        let id = t.services.len() as u32;
        if spec.backends.len() > usize::from(u16::MAX) {
            return Err(ServiceTableError::TooManyBackends(id, spec.backends.len()));
        }
        let n = spec.backends.len();
        let mut rotation = |r: &RotationSpec| -> Result<Rotation, ServiceTableError> {
            // Members only: the Maglev table is shared and not scanned (its entries are
            // checked when a flow selects one, see `RotationSpec`).
            for &m in &r.members {
                if m as usize >= n {
                    return Err(ServiceTableError::BadMember(id, m, n));
                }
            }
            let members = Span {
                start: t.members.len() as u32,
                len: r.members.len() as u32,
            };
            t.members.extend(r.members.iter().map(|&m| m as u16));
            // A Maglev table over no members would choose nothing: keep it empty.
            let maglev = if r.members.is_empty() || r.maglev.is_empty() {
                Span::default()
            } else {
                let s = Span {
                    start: t.maglev.len() as u32,
                    len: r.maglev.len() as u32,
                };
                t.maglev.push(Arc::clone(&r.maglev));
                s
            };
            Ok(Rotation { members, maglev })
        };
        let cluster = rotation(&spec.cluster)?;
        let local = rotation(&spec.local)?;
        let backends = Span {
            start: t.backends.len() as u32,
            len: n as u32,
        };
        t.backends.extend_from_slice(&spec.backends);
        t.services.push(Service {
            backends,
            cluster,
            local,
            affinity_timeout_ns: u64::from(spec.affinity_timeout_s) * 1_000_000_000,
            affinity_id: if spec.affinity_id == 0 {
                id
            } else {
                spec.affinity_id
            },
        });
        Ok(id)
    }

    pub fn frontend(&mut self, f: Frontend) -> &mut Self {
        self.table.frontends.push(f);
        self
    }

    pub fn build(mut self) -> Result<ServiceTable, ServiceTableError> {
        let t = &mut self.table;
        for f in &t.frontends {
            if f.service as usize >= t.services.len() {
                return Err(ServiceTableError::BadService(
                    f.addr, f.port, f.proto, f.service,
                ));
            }
        }
        let n = t.frontends.len().max(1);
        let slots = (n * 2).next_power_of_two().max(8);
        t.index_keys = vec![0; slots];
        t.index_pos = vec![0; slots];
        t.index_shift = 64 - slots.trailing_zeros();
        let mask = slots - 1;
        for (pos, f) in t.frontends.iter().enumerate() {
            let key = frontend_key(f.addr, f.port, f.proto);
            let mut at = (mix64(key) >> t.index_shift) as usize;
            loop {
                if t.index_keys[at] == key {
                    return Err(ServiceTableError::DuplicateFrontend(
                        f.addr, f.port, f.proto,
                    ));
                }
                if t.index_keys[at] == 0 {
                    break;
                }
                at = (at + 1) & mask;
            }
            t.index_keys[at] = key;
            t.index_pos[at] = pos as u32;
        }
        let mut addrs: Vec<u32> = t
            .frontends
            .iter()
            .filter(|f| f.kind != FrontendKind::NodePort)
            .map(|f| u32::from(f.addr))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        t.service_addrs = FlatIndex::build(addrs.into_iter());
        // Both indexes take duplicates as they come (a backend of several service ports):
        // sized for every entry, no sort (at 100,000 backends sorting was most of a rebuild).
        t.backend_addrs = FlatIndex::build(t.backends.iter().map(|b| u32::from(b.addr)));
        let entries: usize = t
            .frontends
            .iter()
            .filter_map(|f| t.services.get(f.service as usize))
            .map(|svc| svc.backends.len as usize)
            .sum();
        if entries > 0 {
            let slots = (entries * 2).next_power_of_two().max(8);
            t.backend_eps = vec![0; slots];
            for f in &t.frontends {
                let Some(svc) = t.services.get(f.service as usize) else {
                    continue;
                };
                for b in &t.backends[svc.backends.range()] {
                    let k = frontend_key(b.addr, b.port, f.proto);
                    if k == 0 {
                        continue;
                    }
                    let mut at = mix64(k) as usize & (slots - 1);
                    while t.backend_eps[at] != 0 && t.backend_eps[at] != k {
                        at = (at + 1) & (slots - 1);
                    }
                    t.backend_eps[at] = k;
                }
            }
        }
        Ok(self.table)
    }
}

/// Whether the dataplane load-balances this protocol (kube-proxy: TCP, UDP, SCTP; sluice: TCP
/// and UDP).
#[inline]
pub const fn is_lb_protocol(proto: u8) -> bool {
    proto == ipv4::PROTO_TCP || proto == ipv4::PROTO_UDP
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(last: u8, port: u16, local: bool) -> Backend {
        Backend {
            addr: Ipv4Addr::new(10, 244, 0, last),
            port,
            local,
        }
    }

    fn fe(addr: [u8; 4], port: u16, service: u32) -> Frontend {
        Frontend {
            addr: Ipv4Addr::from(addr),
            port,
            proto: ipv4::PROTO_TCP,
            kind: FrontendKind::ClusterIp,
            service,
            local_only: false,
            keep_source: false,
        }
    }

    #[test]
    fn frontends_found_exactly_and_selection_follows_maglev() {
        let mut bld = ServiceTableBuilder::new(7);
        let s = bld
            .service(&ServiceSpec {
                backends: vec![b(5, 8080, true), b(6, 8080, false)],
                cluster: RotationSpec {
                    members: vec![0, 1],
                    maglev: vec![1, 0, 1].into(),
                },
                local: RotationSpec {
                    members: vec![0],
                    maglev: vec![0, 0, 0].into(),
                },
                affinity_timeout_s: 0,
                affinity_id: 0,
            })
            .unwrap();
        bld.frontend(fe([10, 96, 0, 10], 80, s));
        let t = bld.build().unwrap();
        assert_eq!(t.generation(), 7);
        let f = t
            .frontend(Ipv4Addr::new(10, 96, 0, 10), 80, ipv4::PROTO_TCP)
            .unwrap();
        assert!(t
            .frontend(Ipv4Addr::new(10, 96, 0, 10), 81, ipv4::PROTO_TCP)
            .is_none());
        assert!(t
            .frontend(Ipv4Addr::new(10, 96, 0, 10), 80, ipv4::PROTO_UDP)
            .is_none());
        assert!(t.is_service_addr(Ipv4Addr::new(10, 96, 0, 10)));
        assert!(t.is_backend_addr(Ipv4Addr::new(10, 244, 0, 6)));
        assert!(!t.is_backend_addr(Ipv4Addr::new(10, 244, 0, 7)));
        let svc = t.service(f.service).unwrap();
        assert_eq!(t.select(svc, false, 0).unwrap().1.addr.octets()[3], 6);
        assert_eq!(t.select(svc, false, 1).unwrap().1.addr.octets()[3], 5);
        assert_eq!(t.select(svc, false, 5).unwrap().1.addr.octets()[3], 6);
        assert_eq!(t.select(svc, true, 2).unwrap().1.addr.octets()[3], 5);
    }

    #[test]
    fn backends_shared_by_service_ports_are_indexed_once_each() {
        let mut bld = ServiceTableBuilder::new(1);
        let spec = |port| ServiceSpec {
            backends: vec![b(5, port, true), b(6, port, false)],
            cluster: RotationSpec {
                members: vec![0, 1],
                maglev: vec![1, 0, 1].into(),
            },
            ..ServiceSpec::default()
        };
        // Two service ports with the same backends, each behind two frontends (ClusterIP
        // and a second address): every (backend, port, protocol) comes four times.
        let s1 = bld.service(&spec(8080)).unwrap();
        let s2 = bld.service(&spec(8080)).unwrap();
        let s3 = bld.service(&spec(9090)).unwrap();
        bld.frontend(fe([10, 96, 0, 10], 80, s1));
        bld.frontend(fe([10, 96, 0, 11], 80, s1));
        bld.frontend(fe([10, 96, 0, 12], 80, s2));
        bld.frontend(fe([10, 96, 0, 13], 80, s2));
        bld.frontend(fe([10, 96, 0, 14], 90, s3));
        let t = bld.build().unwrap();
        for host in [5, 6] {
            let addr = Ipv4Addr::new(10, 244, 0, host);
            assert!(t.is_backend_addr(addr));
            assert!(t.is_backend_endpoint(addr, 8080, ipv4::PROTO_TCP));
            assert!(t.is_backend_endpoint(addr, 9090, ipv4::PROTO_TCP));
            assert!(!t.is_backend_endpoint(addr, 8080, ipv4::PROTO_UDP));
            assert!(!t.is_backend_endpoint(addr, 8081, ipv4::PROTO_TCP));
        }
        assert!(!t.is_backend_endpoint(Ipv4Addr::new(10, 244, 0, 7), 8080, ipv4::PROTO_TCP));
        assert!(!t.is_backend_addr(Ipv4Addr::new(10, 244, 0, 7)));
    }

    #[test]
    fn empty_rotation_selects_nothing_and_modulo_without_maglev() {
        let mut bld = ServiceTableBuilder::new(1);
        let s = bld
            .service(&ServiceSpec {
                backends: vec![b(5, 1, false), b(6, 2, false), b(7, 3, false)],
                cluster: RotationSpec {
                    members: vec![0, 2],
                    maglev: vec![].into(),
                },
                local: RotationSpec::default(),
                affinity_timeout_s: 30,
                affinity_id: 0,
            })
            .unwrap();
        let t = {
            bld.frontend(fe([10, 96, 0, 1], 53, s));
            bld.build().unwrap()
        };
        let svc = *t.service(s).unwrap();
        assert!(svc.has_affinity());
        assert_eq!(svc.affinity_timeout_ns, 30_000_000_000);
        assert!(t.select(&svc, true, 3).is_none());
        assert!(!t.has_backends(&svc, true));
        assert_eq!(t.select(&svc, false, 0).unwrap().1.port, 1);
        assert_eq!(t.select(&svc, false, 1).unwrap().1.port, 3);
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let mut bld = ServiceTableBuilder::new(1);
        let bad = bld.service(&ServiceSpec {
            backends: vec![b(5, 1, false)],
            cluster: RotationSpec {
                members: vec![1],
                maglev: vec![].into(),
            },
            ..ServiceSpec::default()
        });
        assert_eq!(bad, Err(ServiceTableError::BadMember(0, 1, 1)));
        let mut bld = ServiceTableBuilder::new(1);
        let s = bld.service(&ServiceSpec::default()).unwrap();
        bld.frontend(fe([10, 96, 0, 1], 53, s));
        bld.frontend(fe([10, 96, 0, 1], 53, s));
        assert!(matches!(
            bld.build(),
            Err(ServiceTableError::DuplicateFrontend(..))
        ));
        let mut bld = ServiceTableBuilder::new(1);
        bld.frontend(fe([10, 96, 0, 1], 53, 4));
        assert!(matches!(
            bld.build(),
            Err(ServiceTableError::BadService(..))
        ));
    }

    #[test]
    fn many_frontends_all_found() {
        let mut bld = ServiceTableBuilder::new(1);
        let s = bld.service(&ServiceSpec::default()).unwrap();
        for i in 0..5000u32 {
            bld.frontend(fe((0x0a60_0000 + i).to_be_bytes(), (i % 7) as u16 + 1, s));
        }
        let t = bld.build().unwrap();
        for i in 0..5000u32 {
            let a = Ipv4Addr::from(0x0a60_0000 + i);
            assert!(t.frontend(a, (i % 7) as u16 + 1, ipv4::PROTO_TCP).is_some());
            assert!(t.frontend(a, 9, ipv4::PROTO_TCP).is_none());
        }
    }
}
