//! Per-flow and per-packet cost of network policy (issue 6):
//! `cargo bench -p dataplane --bench policy` (about 40 s; `-- --test` runs each case once).
//! Figures of the last run and how to read them: `docs/bench-policy.md`.
//!
//! The claim under test: the cost of a policy decision does not grow with the number of
//! policies (`policy.rs` answers in a bounded number of probes), and a packet of an established
//! flow pays nothing for policy beyond its conntrack hit (`stages::lb`: a flow is judged once,
//! later packets ride on the cached verdict).
//!
//! **Group `policy_check`**: `PolicyTable::check` for a new flow to one measured endpoint
//! (a local pod, ingress isolated), with N = 1, 100 and 10 000 policies, each of which adds a
//! rule that applies to that endpoint (the worst case for it: every policy selects it). The
//! cluster has 10 000 remote pods (10.245.0.0/18) in every table, so only the policies change
//! with N. Three shapes:
//! - `identity/N`: policy i allows identity i on TCP port 1000 + i; pod p has identity
//!   p mod N. Each query comes from a pod spread over the 10 000 and targets its identity's
//!   port (allowed). One hash probe per (peer kind, protocol): expected flat.
//! - `ipblock/N`: policy i allows ipBlock 20.0.0.0 + 256 i /24 except its upper /25 on TCP 80.
//!   Queries come from the allowed halves, spread over the N blocks. The address's CIDR class
//!   is a binary search over the 2N + 2 intervals the prefixes cut: **logarithmic in N**, by
//!   design (a longest-prefix match, as an LPM trie in Cilium's ipcache is).
//! - `ports/N`: policy i allows one identity (every pod's) on TCP ports 1000 + 5i ..= 1002 + 5i.
//!   All ranges share one rule key, so the port is found by a binary search over N disjoint
//!   ranges: **logarithmic in N**, by design.
//! - `identity-hot/N`: the `identity/N` table with 16 queries only, so the table's lines stay in
//!   cache: what growth remains is the lookups' own, not the memory's.
//! - `none`: the empty table (`check` returns at once): the loop and query overhead alone.
//!
//! Queries (source, port) are 4096 precomputed pairs read round robin, spread by hashing, so
//! larger tables pay their cache misses as real traffic would. Ratios are to `*/1` of the same
//! shape in the same run.
//!
//! **Group `policy_pipeline`**: whole frames through `pipeline::process_ctx` on one worker
//! (`Steer::SINGLE`) with its own `Flows` (conntrack of 2^16), no I/O. A node with 16 client
//! and 16 server pods (one veth each), no services, no NAT. 64 B UDP frames with valid checksums
//! from a client to a server's port 9000. All clients share one identity, all servers another
//! (identities are label sets). With policies on, every client is egress isolated and every
//! server ingress isolated by N policies: policy 0 is the measured one (clients may send UDP
//! 9000 to servers, servers admit it from clients); policies 1..N each add, to every one of the
//! 32 pods, a rule for another identity (one of the 10 000 remote pods) on another UDP port.
//! So a new flow is judged twice (egress of the client, ingress of the server) against tables of
//! N rules per endpoint (320 000 rules in all at N = 10 000).
//! - `off/new`, `off/established`: policies off (empty table). No packet is tracked (pod to pod
//!   without services is stateless), so both are plain forwarding: the **baselines**.
//! - `on/new/N`: the first packet of a flow never seen: policy check (egress + ingress),
//!   conntrack insert, forward. Timed by batches of 1024 with `iter_custom`; between batches,
//!   untimed, the batch's flows are removed again.
//! - `on/established/N`: a later packet of one of 4096 flows already in conntrack (tracked for
//!   policy): conntrack hit, verdict cached under the current policy generation, forward.
//! - `restore`: the 64 B copy that writes each frame anew (the pipeline rewrites in place),
//!   included in every case above.
//!
//! The bench checks its own setup: every measured frame is forwarded to the server's veth; a
//! frame to a port no policy allows is dropped with `policy_denied_egress`; `on/new` creates
//! one policy-tracked flow per frame; `on/established` creates none and hits conntrack.
//!
//! At the end it prints a table of ratios (median ns per iteration over all timed calls,
//! measured here, next to criterion's own estimates).
use std::{
    cell::RefCell,
    collections::BTreeMap,
    hint::black_box,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use dataplane::{
    affinity::Affinity,
    conntrack::{Config, Conntrack, FlowKey, Timeouts},
    packet::PacketBuf,
    pipeline::process_ctx,
    policy::{
        Dir, Isolation, PeerSpec, PolicyBuilder, PolicyTable, PolicyVerdict, PortSpec,
        ALLOW_ENFORCED,
    },
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, Snapshot, SnapshotBuilder},
    stages::{
        lb::{Flows, Steer},
        neighbor::ArpThrottle,
    },
    wire::{checksum, Mac},
    Ctx, DropReason, TxKind, Verdict,
};

const POLICY_COUNTS: [usize; 3] = [1, 100, 10_000];
/// Remote pods of the cluster (identities for the check tables and filler rules).
const REMOTE_PODS: usize = 10_000;
const QUERIES: usize = 4096;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ENFORCED: Isolation = Isolation {
    enforced: true,
    audit: false,
};
/// The batch clock of every pipeline case: flows never expire during the run.
const NOW_NS: u64 = 1_000_000_000;

fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn remote_pod(p: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + p as u32)
}

// ---- timing record: ratios printed at the end ------------------------------------------------

/// Every timed call's ns per iteration, by case id (criterion keeps its estimates in files;
/// this keeps the run's own, for the ratio table).
#[derive(Default)]
struct Record(RefCell<BTreeMap<String, Vec<f64>>>);

impl Record {
    fn add(&self, id: &str, iters: u64, took: Duration) {
        if iters == 0 {
            return;
        }
        self.0
            .borrow_mut()
            .entry(id.to_string())
            .or_default()
            .push(took.as_nanos() as f64 / iters as f64);
    }

    fn median(&self, id: &str) -> Option<f64> {
        let map = self.0.borrow();
        let mut v = map.get(id)?.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }
}

fn fmt_ratio(case: Option<f64>, base: Option<f64>) -> String {
    match (case, base) {
        (Some(c), Some(b)) if b > 0.0 => format!("{c:8.1} ns  x{:.2}", c / b),
        (Some(c), _) => format!("{c:8.1} ns  x-"),
        _ => "       - (not run)".into(),
    }
}

// ---- group policy_check ----------------------------------------------------------------------

/// The measured endpoint: a local pod, ingress isolated.
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

#[derive(Clone, Copy)]
struct Query {
    src: Ipv4Addr,
    port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Identity,
    IpBlock,
    Ports,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Identity => "identity",
            Shape::IpBlock => "ipblock",
            Shape::Ports => "ports",
        }
    }
}

fn block(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(20, 0, 0, 0)) + 256 * i as u32)
}

/// A table of `n` policies of `shape` for [`ENDPOINT`] and queries it allows.
fn check_table(shape: Shape, n: usize) -> (PolicyTable, Vec<Query>) {
    let mut b = PolicyBuilder::new(1);
    // One identity for every pod in the port-range shape (the ranges then share one key).
    let identity_of = |p: usize| match shape {
        Shape::Identity => 1 + (p % n) as u32,
        _ => 1,
    };
    for p in 0..REMOTE_PODS {
        b.identity(remote_pod(p), identity_of(p));
    }
    b.identity(ENDPOINT, n as u32 + 10);
    let ep = b.endpoint(ENDPOINT, ENFORCED, Isolation::OPEN);
    for i in 0..n {
        let (peer, port) = match shape {
            Shape::Identity => (
                PeerSpec::Identity(1 + i as u32),
                PortSpec::one(TCP, 1000 + i as u16),
            ),
            Shape::IpBlock => (
                PeerSpec::IpBlock {
                    cidr: (block(i), 24),
                    except: vec![(Ipv4Addr::from(u32::from(block(i)) + 128), 25)],
                },
                PortSpec::one(TCP, 80),
            ),
            Shape::Ports => {
                let lo = 1000 + 5 * i as u16;
                (
                    PeerSpec::Identity(1),
                    PortSpec {
                        proto: TCP,
                        lo,
                        hi: lo + 2,
                    },
                )
            }
        };
        b.allow(ep, Dir::Ingress, peer, port, ALLOW_ENFORCED);
    }
    let table = b.build().expect("the bench's policies are valid");
    let queries = (0..QUERIES as u64)
        .map(|q| {
            let h = mix(q ^ 0x9e37);
            match shape {
                Shape::Identity => {
                    let p = (h % REMOTE_PODS as u64) as usize;
                    Query {
                        src: remote_pod(p),
                        port: 1000 + (p % n) as u16,
                    }
                }
                Shape::IpBlock => {
                    let i = (h % n as u64) as u32;
                    Query {
                        src: Ipv4Addr::from(
                            u32::from(block(i as usize)) + 1 + (h >> 40) as u32 % 127,
                        ),
                        port: 80,
                    }
                }
                Shape::Ports => {
                    let p = (h % REMOTE_PODS as u64) as usize;
                    let i = ((h >> 32) % n as u64) as u16;
                    Query {
                        src: remote_pod(p),
                        port: 1000 + 5 * i + (h >> 48) as u16 % 3,
                    }
                }
            }
        })
        .collect();
    (table, queries)
}

/// `check` of `qs` round robin against `t`.
fn bench_queries(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rec: &Record,
    id: &str,
    t: &PolicyTable,
    qs: &[Query],
) {
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        let mut i = 0usize;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let q = qs[i % qs.len()];
                i += 1;
                black_box(t.check(black_box(q.src), ENDPOINT, TCP, black_box(q.port)));
            }
            let took = start.elapsed();
            rec.add(&format!("policy_check/{id}"), iters, took);
            took
        })
    });
}

fn bench_check(c: &mut Criterion, rec: &Record) {
    let mut g = c.benchmark_group("policy_check");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(1));
    g.warm_up_time(Duration::from_millis(300));

    let (empty, qs) = (PolicyTable::empty(), check_table(Shape::Identity, 1).1);
    bench_queries(&mut g, rec, "none", &empty, &qs);
    for shape in [Shape::Identity, Shape::IpBlock, Shape::Ports] {
        for n in POLICY_COUNTS {
            let started = Instant::now();
            let (table, queries) = check_table(shape, n);
            let built = started.elapsed();
            // The setup is what it says: every query is allowed, and a port (or source) no
            // policy names is denied.
            for q in &queries {
                assert_eq!(
                    table.check(q.src, ENDPOINT, TCP, q.port),
                    PolicyVerdict::Allow,
                    "{shape:?}/{n}: {}:{}",
                    q.src,
                    q.port
                );
            }
            let denied = PolicyVerdict::Deny(DropReason::PolicyDeniedIngress);
            assert_eq!(table.check(remote_pod(0), ENDPOINT, TCP, 999), denied);
            assert_eq!(
                table.check(Ipv4Addr::new(30, 0, 0, 1), ENDPOINT, TCP, 80),
                denied
            );
            eprintln!(
                "policy_check {}/{n}: table built in {built:?}",
                shape.name()
            );
            bench_queries(
                &mut g,
                rec,
                &format!("{}/{n}", shape.name()),
                &table,
                &queries,
            );
            if shape == Shape::Identity {
                // The same table, 16 queries only: hot in cache, so what is left of any growth
                // is the algorithm's (the probes), not memory's.
                bench_queries(
                    &mut g,
                    rec,
                    &format!("identity-hot/{n}"),
                    &table,
                    &queries[..16],
                );
            }
        }
    }
    g.finish();
}

// ---- group policy_pipeline -------------------------------------------------------------------

const CLIENTS: usize = 16;
const SERVERS: usize = 16;
const PODS: usize = CLIENTS + SERVERS;
const SERVER_PORT: u16 = 9000;
const DENIED_PORT: u16 = 9001;
const CLIENT_ID: u32 = 1;
const SERVER_ID: u32 = 2;
/// Remote pod `p` has identity `REMOTE_ID0 + p`.
const REMOTE_ID0: u32 = 10;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const IF_POD0: u32 = 100;
const HEADROOM: usize = 256;
const FRAME_LEN: usize = 64;
const ESTABLISHED_FLOWS: usize = 4096;
const NEW_FLOW_BATCH: usize = 1024;
/// Distinct new-flow frames, reused batch after batch (their flows are removed in between).
const NEW_FLOW_POOL: usize = 16 * NEW_FLOW_BATCH;
const CT_CAPACITY: usize = 1 << 16;

/// Pod `i`: clients are 0..CLIENTS, servers CLIENTS..PODS.
fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i as u8)
}

fn lxc_mac(i: usize) -> Mac {
    Mac([0x02, 0, 0, 0, 1, i as u8])
}

fn pod_mac(i: usize) -> Mac {
    Mac([0x0a, 0, 0, 0, 1, i as u8])
}

fn ifindex(i: usize) -> u32 {
    IF_POD0 + i as u32
}

/// A 64 B UDP frame from pod `from` to pod `to` (valid IPv4 and UDP checksums).
fn udp_frame(from: usize, to: usize, sport: u16, dport: u16) -> [u8; FRAME_LEN] {
    let (src, dst) = (pod_addr(from), pod_addr(to));
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&lxc_mac(from).0);
    f[6..12].copy_from_slice(&pod_mac(from).0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64; // TTL
    f[23] = UDP;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let ip_sum = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    for (k, b) in f[42..].iter_mut().enumerate() {
        *b = k as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&f[26..34]);
    pseudo[9] = UDP;
    pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
    let sum = match !checksum::fold(checksum::sum(&pseudo) + checksum::sum(&f[34..])) {
        0 => 0xffff,
        s => s,
    };
    f[40..42].copy_from_slice(&sum.to_be_bytes());
    f
}

fn node(policy: Arc<PolicyTable>) -> Snapshot {
    let mut b = SnapshotBuilder::new(1, GATEWAY);
    for i in 0..PODS {
        b.interface(InterfaceEntry {
            ifindex: ifindex(i),
            mac: lxc_mac(i),
            role: InterfaceRole::Pod,
        });
        b.endpoint(
            pod_addr(i),
            EndpointEntry {
                ifindex: ifindex(i),
                mac: pod_mac(i),
            },
        );
    }
    b.policy(policy);
    b.build()
}

/// `n` policies selecting every client (egress) and every server (ingress); see the module doc.
fn pipeline_policies(n: usize) -> PolicyTable {
    let mut b = PolicyBuilder::new(1);
    for i in 0..CLIENTS {
        b.identity(pod_addr(i), CLIENT_ID);
    }
    for i in CLIENTS..PODS {
        b.identity(pod_addr(i), SERVER_ID);
    }
    for p in 0..REMOTE_PODS {
        b.identity(remote_pod(p), REMOTE_ID0 + p as u32);
    }
    let clients: Vec<u32> = (0..CLIENTS)
        .map(|i| b.endpoint(pod_addr(i), Isolation::OPEN, ENFORCED))
        .collect();
    let servers: Vec<u32> = (CLIENTS..PODS)
        .map(|i| b.endpoint(pod_addr(i), ENFORCED, Isolation::OPEN))
        .collect();
    let serve = PortSpec::one(UDP, SERVER_PORT);
    for &c in &clients {
        b.allow(
            c,
            Dir::Egress,
            PeerSpec::Identity(SERVER_ID),
            serve,
            ALLOW_ENFORCED,
        );
    }
    for &s in &servers {
        b.allow(
            s,
            Dir::Ingress,
            PeerSpec::Identity(CLIENT_ID),
            serve,
            ALLOW_ENFORCED,
        );
    }
    for i in 1..n {
        let peer = PeerSpec::Identity(REMOTE_ID0 + ((i - 1) % REMOTE_PODS) as u32);
        let port = PortSpec::one(UDP, 10_000 + (i % 50_000) as u16);
        for &c in &clients {
            b.allow(c, Dir::Egress, peer.clone(), port, ALLOW_ENFORCED);
        }
        for &s in &servers {
            b.allow(s, Dir::Ingress, peer.clone(), port, ALLOW_ENFORCED);
        }
    }
    b.build().expect("the bench's policies are valid")
}

fn flows() -> Flows {
    Flows::new(
        Conntrack::new(Config {
            capacity: CT_CAPACITY,
            seed: 0x5eed,
            timeouts: Timeouts::default(),
        })
        .expect("capacity is a power of two"),
        Arc::new(Affinity::new(64)),
    )
}

/// A measured frame and where it must go.
struct Pkt {
    frame: [u8; FRAME_LEN],
    rx: u32,
    tx: u32,
    key: FlowKey,
}

fn pkt(flow: u64, sport_base: u16) -> Pkt {
    let h = mix(flow ^ 0xfeed);
    let client = (flow % CLIENTS as u64) as usize;
    let server = CLIENTS + (h % SERVERS as u64) as usize;
    let sport = sport_base.wrapping_add((flow / CLIENTS as u64) as u16);
    Pkt {
        frame: udp_frame(client, server, sport, SERVER_PORT),
        rx: ifindex(client),
        tx: ifindex(server),
        key: FlowKey {
            src: pod_addr(client),
            dst: pod_addr(server),
            sport,
            dport: SERVER_PORT,
            proto: UDP,
        },
    }
}

#[inline(always)]
fn run(ctx: &mut Ctx<'_>, snap: &Snapshot, buf: &mut [u8], p: &Pkt) -> Verdict {
    buf[HEADROOM..HEADROOM + FRAME_LEN].copy_from_slice(&p.frame);
    let mut pkt = PacketBuf::new(buf, HEADROOM, FRAME_LEN).expect("a 2048 B chunk holds 64 B");
    process_ctx(ctx, snap, p.rx, &mut pkt)
}

fn ctx<'a>(arp: &'a mut ArpThrottle, flows: &'a mut Flows) -> Ctx<'a> {
    Ctx {
        now_ns: NOW_NS,
        arp,
        flows: Some(flows),
        steer: Steer::SINGLE,
    }
}

fn forwarded(v: Verdict, p: &Pkt) -> bool {
    v == Verdict::Tx {
        ifindex: p.tx,
        kind: TxKind::Forward,
    }
}

/// Runs `pkts` round robin; every verdict must be the expected forward (counted, asserted
/// after the case).
fn bench_forward(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rec: &Record,
    id: &str,
    snap: &Snapshot,
    flows: &mut Flows,
    pkts: &[Pkt],
) {
    let mut arp = ArpThrottle::default();
    let mut buf = vec![0u8; 2048];
    let mut wrong = 0u64;
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        let mut i = 0usize;
        b.iter_custom(|iters| {
            let mut cx = ctx(&mut arp, &mut *flows);
            let start = Instant::now();
            for _ in 0..iters {
                let p = &pkts[i % pkts.len()];
                i += 1;
                let v = run(&mut cx, snap, &mut buf, black_box(p));
                if !forwarded(black_box(v), p) {
                    wrong += 1;
                }
            }
            let took = start.elapsed();
            rec.add(&format!("policy_pipeline/{id}"), iters, took);
            took
        })
    });
    assert_eq!(wrong, 0, "{id}: every frame is forwarded to its server");
}

/// New flows, timed by batches; the batch's flows are removed (untimed) after each batch.
fn bench_new(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rec: &Record,
    id: &str,
    snap: &Snapshot,
    flows: &mut Flows,
    pool: &[Pkt],
) {
    let mut arp = ArpThrottle::default();
    let mut buf = vec![0u8; 2048];
    let mut wrong = 0u64;
    let mut sent = 0u64;
    let tracked_before = flows.stats.policy_flows;
    let len_before = flows.ct.len();
    let mut next = 0usize;
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let size = left.min(NEW_FLOW_BATCH as u64) as usize;
                let from = next;
                next = (next + size) % pool.len();
                let batch = (from..from + size).map(|k| &pool[k % pool.len()]);
                {
                    let mut cx = ctx(&mut arp, &mut *flows);
                    let start = Instant::now();
                    for p in batch.clone() {
                        let v = run(&mut cx, snap, &mut buf, black_box(p));
                        if !forwarded(black_box(v), p) {
                            wrong += 1;
                        }
                    }
                    timed += start.elapsed();
                }
                for p in batch {
                    flows.ct.remove(&p.key);
                }
                sent += size as u64;
                left -= size as u64;
            }
            rec.add(&format!("policy_pipeline/{id}"), iters, timed);
            timed
        })
    });
    assert_eq!(wrong, 0, "{id}: every new flow is forwarded to its server");
    assert_eq!(
        flows.ct.len(),
        len_before,
        "{id}: the batches' flows were removed"
    );
    let tracked = flows.stats.policy_flows - tracked_before;
    if snap.policy().is_active() {
        assert_eq!(
            tracked, sent,
            "{id}: one policy-tracked flow per new-flow frame"
        );
    } else {
        assert_eq!(tracked, 0, "{id}: nothing is tracked with policies off");
    }
}

fn bench_pipeline(c: &mut Criterion, rec: &Record) {
    let mut g = c.benchmark_group("policy_pipeline");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(1));
    g.warm_up_time(Duration::from_millis(300));

    let established: Vec<Pkt> = (0..ESTABLISHED_FLOWS as u64)
        .map(|f| pkt(f, 1024))
        .collect();
    // Source ports from 20 000 on: never an established flow's (1024 + 4096 / 16 at most).
    let pool: Vec<Pkt> = (0..NEW_FLOW_POOL as u64).map(|f| pkt(f, 20_000)).collect();

    // The copy alone.
    {
        let mut buf = vec![0u8; 2048];
        g.bench_function(BenchmarkId::from_parameter("restore"), |b| {
            let mut i = 0usize;
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let p = &established[i % established.len()];
                    i += 1;
                    buf[HEADROOM..HEADROOM + FRAME_LEN].copy_from_slice(black_box(&p.frame));
                    black_box(&mut buf);
                }
                let took = start.elapsed();
                rec.add("policy_pipeline/restore", iters, took);
                took
            })
        });
    }

    // Policies off: stateless forwarding, the baselines.
    let off = node(Arc::new(PolicyTable::empty()));
    let mut fl = flows();
    bench_new(&mut g, rec, "off/new", &off, &mut fl, &pool);
    bench_forward(&mut g, rec, "off/established", &off, &mut fl, &established);
    assert!(fl.ct.is_empty(), "policies off: no flow state");
    assert_eq!(fl.stats.ct_hits, 0);

    for n in POLICY_COUNTS {
        let started = Instant::now();
        let snap = node(Arc::new(pipeline_policies(n)));
        eprintln!(
            "policy_pipeline {n} policies: table built in {:?}",
            started.elapsed()
        );
        let mut fl = flows();
        let mut arp = ArpThrottle::default();
        let mut buf = vec![0u8; 2048];
        // A port no policy allows: the client's egress denies it.
        let denied = Pkt {
            frame: udp_frame(0, CLIENTS, 5555, DENIED_PORT),
            rx: ifindex(0),
            tx: ifindex(CLIENTS),
            key: FlowKey {
                src: pod_addr(0),
                dst: pod_addr(CLIENTS),
                sport: 5555,
                dport: DENIED_PORT,
                proto: UDP,
            },
        };
        assert_eq!(
            run(&mut ctx(&mut arp, &mut fl), &snap, &mut buf, &denied),
            Verdict::Drop(DropReason::PolicyDeniedEgress),
            "{n} policies: a port no policy allows is denied"
        );
        // Fill: the first packet of every established flow (judged, tracked).
        for p in &established {
            let v = run(&mut ctx(&mut arp, &mut fl), &snap, &mut buf, p);
            assert!(
                forwarded(v, p),
                "{n} policies: fill packet {:?}: {v:?}",
                p.key
            );
        }
        assert_eq!(
            fl.ct.len(),
            ESTABLISHED_FLOWS,
            "every filled flow is tracked"
        );
        assert_eq!(fl.stats.policy_flows, ESTABLISHED_FLOWS as u64);
        let before = fl.stats;
        bench_forward(
            &mut g,
            rec,
            &format!("on/established/{n}"),
            &snap,
            &mut fl,
            &established,
        );
        assert_eq!(
            fl.stats.policy_flows, before.policy_flows,
            "established packets create no flow"
        );
        if fl.stats.ct_hits == before.ct_hits {
            eprintln!("on/established/{n} skipped by the filter");
        }
        bench_new(&mut g, rec, &format!("on/new/{n}"), &snap, &mut fl, &pool);
        eprintln!(
            "policy_pipeline {n} policies: conntrack len {} evictions {:?}",
            fl.ct.len(),
            fl.ct.stats().evictions
        );
    }
    g.finish();
}

fn print_ratios(rec: &Record) {
    let m = |id: &str| rec.median(id);
    println!();
    println!("ratios (median ns per iteration over every timed call of this run, loop included)");
    println!("policy_check: ratio to the 1-policy table of the same shape");
    println!(
        "  {:<22} {}",
        "none (empty table)",
        fmt_ratio(m("policy_check/none"), None)
    );
    for shape in ["identity", "identity-hot", "ipblock", "ports"] {
        let base = m(&format!("policy_check/{shape}/1"));
        for n in POLICY_COUNTS {
            let id = format!("{shape}/{n}");
            println!(
                "  {id:<22} {}",
                fmt_ratio(m(&format!("policy_check/{id}")), base)
            );
        }
    }
    println!("policy_pipeline: ratio to policies off (same frames), restore included in both");
    let restore = m("policy_pipeline/restore");
    println!(
        "  {:<22} {}",
        "restore (copy only)",
        fmt_ratio(restore, None)
    );
    for kind in ["new", "established"] {
        let base = m(&format!("policy_pipeline/off/{kind}"));
        println!("  {:<22} {}", format!("off/{kind}"), fmt_ratio(base, base));
        for n in POLICY_COUNTS {
            let id = format!("on/{kind}/{n}");
            println!(
                "  {id:<22} {}",
                fmt_ratio(m(&format!("policy_pipeline/{id}")), base)
            );
        }
    }
}

fn main() {
    let rec = Record::default();
    let mut c = Criterion::default().configure_from_args();
    bench_check(&mut c, &rec);
    bench_pipeline(&mut c, &rec);
    c.final_summary();
    print_ratios(&rec);
}
