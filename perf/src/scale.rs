//! Scale curves: the pipeline's per-packet cost as a table grows (issue 3, part 6).
//!
//! Needs in perf/Cargo.toml `[dependencies]`: `dataplane = { workspace = true }`.
//!
//! ```text
//!  for size in sizes:                       snapshot with `size` entries in the table
//!    warm up, then repeats x [ Instant ─ packets x (restore frame, pipeline::process) ─ Instant ]
//!    -> min and median ns/packet over the repeats
//! ```
//!
//! Design: sans-IO, like the criterion bench `dataplane/benches/pipeline.rs` (`endpoints/N`), but
//! a plain loop so `sluice-perf` can run it and write the curve (JSON + SVG). The clock is read
//! twice per repeat, never per packet. Destinations rotate over [`DESTINATIONS`] addresses spread
//! evenly across the table, so the lookups touch the whole sorted table rather than one
//! cache-hot key; every iteration restores the frame (forwarding rewrites MACs and TTL), the same
//! restore the bench's `restore_only` baseline measures. Run it from an optimised build: the
//! JSON says whether it was ([`OPTIMIZED_BUILD`]), and the SVG title says so when it was not.
//!
//! Limits: one core, one frame size (64 B UDP); figures include the frame restore; the table is
//! built with `SnapshotBuilder`, whose inserts are linear, so building the largest tables takes
//! seconds (not measured; see [`MAX_TABLE_SIZE`]). Sizes are clamped into `1..=`[`MAX_TABLE_SIZE`]; the report states
//! the size actually measured. More tables (services, policies, conntrack) are more
//! [`ScaleTable`] variants.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use dataplane::{
    packet::PacketBuf,
    pipeline::process_ctx,
    snapshot::{EndpointEntry, InterfaceEntry, InterfaceRole, Snapshot, SnapshotBuilder},
    wire::{checksum, Mac},
};
use serde::Serialize;

use crate::plot;

/// Distinct destination addresses cycled through (fewer when the table is smaller).
pub const DESTINATIONS: u32 = 1024;
/// Largest table measured. `SnapshotBuilder` inserts in linear time, so building is quadratic:
/// in a debug build the default run (up to 65,536) took 25 s, mostly building; 262,144 entries
/// take about sixteen times as long to build as 65,536.
/// (Endpoints are numbered from 10.128.0.0, clear of the sender's 10.244.0.0/16 up to 2^22.)
pub const MAX_TABLE_SIZE: u32 = 1 << 18;
/// Frame size measured, bytes (Ethernet header to end of UDP payload, padded).
pub const FRAME_BYTES: usize = 64;
/// False when this code was built without optimisation (figures then mean little).
pub const OPTIMIZED_BUILD: bool = !cfg!(debug_assertions);

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const SENDER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const SENDER_IFINDEX: u32 = 7;
/// Endpoints of the table get interfaces from here up (one host-side veth per pod).
const FIRST_TABLE_IFINDEX: u32 = 100;
const TABLE_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const SENDER_HOST_MAC: Mac = Mac([0x02, 0, 0, 0, 0xa, 0x1]);
const SENDER_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xa, 0x2]);
const TABLE_HOST_MAC: Mac = Mac([0x02, 0, 0, 0, 0xb, 0x1]);
const TABLE_POD_MAC: Mac = Mac([0x0a, 0, 0, 0, 0xb, 0x2]);
/// Room in front of the frame, like UMEM headroom.
const HEADROOM: usize = 256;
const CHUNK_BYTES: usize = 2048;

/// Which table grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleTable {
    /// Local pod endpoints (and their host-side interfaces): exact /32 lookups when forwarding.
    Endpoints,
}

impl ScaleTable {
    /// Every table a scale run can grow.
    pub const ALL: [ScaleTable; 1] = [ScaleTable::Endpoints];

    /// The name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleTable::Endpoints => "endpoints",
        }
    }

    /// The table named `name` ([`ScaleTable::as_str`]), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleOptions {
    /// Table sizes, measured in this order.
    pub sizes: Vec<u32>,
    /// Packets per timed repeat.
    pub packets: u32,
    /// Timed repeats per size (min and median are taken over these).
    pub repeats: u32,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        Self {
            sizes: vec![1, 16, 256, 4096, 65536],
            packets: 200_000,
            repeats: 5,
        }
    }
}

/// One size of the curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ScalePoint {
    /// Entries in the table (as measured, after clamping).
    pub size: u32,
    pub ns_per_packet_min: f64,
    pub ns_per_packet_median: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScaleReport {
    /// Which table grew ([`ScaleTable::as_str`]).
    pub table: String,
    /// One point per requested size, in the requested order.
    pub points: Vec<ScalePoint>,
}

impl ScaleReport {
    /// `{"table": "endpoints", "unit": "ns/packet", "optimized_build": bool, "points": [{"size",
    /// "ns_per_packet_min", "ns_per_packet_median"}, ...]}`. `optimized_build` is false in a debug
    /// build, whose figures are several times the release ones and not comparable with them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "table": self.table,
            "unit": "ns/packet",
            "optimized_build": OPTIMIZED_BUILD,
            "points": self.points.iter().map(|p| serde_json::json!({
                "size": p.size,
                "ns_per_packet_min": p.ns_per_packet_min,
                "ns_per_packet_median": p.ns_per_packet_median,
            })).collect::<Vec<_>>(),
        })
    }

    /// The curve as an SVG (log x: table size; y: ns per packet; min and median series).
    pub fn to_svg(&self) -> String {
        let min: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|p| (f64::from(p.size), p.ns_per_packet_min))
            .collect();
        let median: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|p| (f64::from(p.size), p.ns_per_packet_median))
            .collect();
        plot::curve_svg(
            &format!(
                "pipeline cost vs {} table size ({FRAME_BYTES} B UDP, one core{})",
                self.table,
                if OPTIMIZED_BUILD { "" } else { ", DEBUG BUILD" }
            ),
            &format!("{} in table (log scale)", self.table),
            "ns per packet",
            &[("min", &min), ("median", &median)],
            true,
        )
    }
}

/// Runs the endpoints scale curve.
pub fn run_scale(opts: &ScaleOptions) -> ScaleReport {
    run_scale_table(ScaleTable::Endpoints, opts)
}

/// Runs the scale curve of `table`. `packets` and `repeats` of 0 count as 1.
pub fn run_scale_table(table: ScaleTable, opts: &ScaleOptions) -> ScaleReport {
    let packets = opts.packets.max(1);
    let repeats = opts.repeats.max(1);
    let points = opts
        .sizes
        .iter()
        .map(|&requested| {
            let size = requested.clamp(1, MAX_TABLE_SIZE);
            let bench = match table {
                ScaleTable::Endpoints => Bench::endpoints(size),
            };
            let mut samples = bench.measure(packets, repeats);
            samples.sort_by(f64::total_cmp);
            ScalePoint {
                size,
                ns_per_packet_min: samples.first().copied().unwrap_or(f64::NAN),
                ns_per_packet_median: median(&samples),
            }
        })
        .collect();
    ScaleReport {
        table: table.as_str().to_owned(),
        points,
    }
}

/// Median of sorted `v` (mean of the middle two when even); NaN when empty.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A snapshot, the frames to push through it and the interface they arrive on.
struct Bench {
    snap: Snapshot,
    rx_ifindex: u32,
    /// One frame per destination, each [`FRAME_BYTES`] long.
    frames: Vec<[u8; FRAME_BYTES]>,
}

impl Bench {
    /// The sender pod plus `size` endpoints, each behind its own host interface; destinations
    /// spread evenly over them.
    fn endpoints(size: u32) -> Self {
        let mut b = SnapshotBuilder::new(1, GATEWAY);
        b.interface(InterfaceEntry {
            ifindex: SENDER_IFINDEX,
            mac: SENDER_HOST_MAC,
            role: InterfaceRole::Pod,
        });
        b.endpoint(
            SENDER,
            EndpointEntry {
                ifindex: SENDER_IFINDEX,
                mac: SENDER_MAC,
            },
        );
        for i in 0..size {
            b.interface(InterfaceEntry {
                ifindex: FIRST_TABLE_IFINDEX + i,
                mac: TABLE_HOST_MAC,
                role: InterfaceRole::Pod,
            });
            b.endpoint(
                table_address(i),
                EndpointEntry {
                    ifindex: FIRST_TABLE_IFINDEX + i,
                    mac: TABLE_POD_MAC,
                },
            );
        }
        let n = DESTINATIONS.min(size);
        let frames = (0..n)
            .map(|k| {
                // k * size / n: evenly spread, first entry included, all distinct as n <= size.
                let i = (u64::from(k) * u64::from(size) / u64::from(n)) as u32;
                udp_frame(SENDER, table_address(i))
            })
            .collect();
        Self {
            snap: b.build(),
            rx_ifindex: SENDER_IFINDEX,
            frames,
        }
    }

    /// Runs `packets` frames through the pipeline, cycling over the destinations.
    #[inline(never)]
    fn run(&self, chunk: &mut [u8; CHUNK_BYTES], packets: u32) {
        let mut frames = self.frames.iter().cycle();
        // One ARP memory for the run, as a worker keeps one (`process` would zero a fresh 1 KiB
        // table per packet and measure that).
        let mut arp = dataplane::stages::neighbor::ArpThrottle::default();
        for _ in 0..packets {
            let Some(frame) = frames.next() else { return };
            chunk[HEADROOM..HEADROOM + FRAME_BYTES].copy_from_slice(frame);
            if let Some(mut pkt) = PacketBuf::new(&mut chunk[..], HEADROOM, FRAME_BYTES) {
                let mut ctx = dataplane::Ctx::stateless(0, &mut arp);
                black_box(process_ctx(
                    &mut ctx,
                    &self.snap,
                    black_box(self.rx_ifindex),
                    &mut pkt,
                ));
            }
        }
    }

    /// ns per packet of each of `repeats` timed runs of `packets`, after one warm-up run.
    fn measure(&self, packets: u32, repeats: u32) -> Vec<f64> {
        let mut chunk = [0u8; CHUNK_BYTES];
        self.run(&mut chunk, packets);
        (0..repeats)
            .map(|_| {
                let t0 = Instant::now();
                self.run(&mut chunk, packets);
                t0.elapsed().as_nanos() as f64 / f64::from(packets)
            })
            .collect()
    }
}

fn table_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(TABLE_BASE) + i)
}

/// A 64-byte Ethernet/IPv4/UDP frame from `src` (the sender pod) to `dst`, TTL 64, 18 bytes of
/// payload and Ethernet padding; the IPv4 checksum is correct, the UDP checksum 0 (allowed).
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; FRAME_BYTES] {
    const PAYLOAD: usize = 18;
    let mut f = [0u8; FRAME_BYTES];
    f[0..6].copy_from_slice(&SENDER_HOST_MAC.0);
    f[6..12].copy_from_slice(&SENDER_MAC.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    let total = (20 + 8 + PAYLOAD) as u16;
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&1u16.to_be_bytes());
    udp[2..4].copy_from_slice(&2u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::{TxKind, Verdict};

    fn tiny(sizes: Vec<u32>) -> ScaleOptions {
        ScaleOptions {
            sizes,
            packets: 2_000,
            repeats: 3,
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = ScaleOptions::default();
        assert_eq!(d.sizes, [1, 16, 256, 4096, 65536]);
        assert_eq!(d.packets, 200_000);
        assert_eq!(d.repeats, 5);
    }

    #[test]
    fn every_destination_is_forwarded_to_its_endpoint() {
        // The curve must measure the forwarding path, not a drop.
        for size in [1, 3, 16, 1500] {
            let bench = Bench::endpoints(size);
            assert_eq!(bench.frames.len() as u32, DESTINATIONS.min(size));
            let mut seen = std::collections::BTreeSet::new();
            for frame in &bench.frames {
                let mut chunk = [0u8; CHUNK_BYTES];
                chunk[HEADROOM..HEADROOM + FRAME_BYTES].copy_from_slice(frame);
                let mut pkt = PacketBuf::new(&mut chunk[..], HEADROOM, FRAME_BYTES).expect("fits");
                let v = dataplane::pipeline::process(&bench.snap, bench.rx_ifindex, &mut pkt);
                let Verdict::Tx { ifindex, kind } = v else {
                    panic!("size {size}: frame dropped: {v:?}");
                };
                assert_eq!(kind, TxKind::Forward);
                assert!((FIRST_TABLE_IFINDEX..FIRST_TABLE_IFINDEX + size).contains(&ifindex));
                seen.insert(ifindex);
            }
            assert_eq!(seen.len(), bench.frames.len(), "destinations distinct");
        }
    }

    #[test]
    fn destinations_spread_over_the_whole_table() {
        let size = 65536;
        let n = DESTINATIONS.min(size);
        let last = (u64::from(n - 1) * u64::from(size) / u64::from(n)) as u32;
        assert!(
            last >= size - size / n,
            "last destination near the end: {last}"
        );
        let f = udp_frame(SENDER, table_address(last));
        assert_eq!(&f[30..34], &table_address(last).octets());
        assert!(checksum::verify(&f[14..34]), "IPv4 header checksum");
    }

    #[test]
    fn tiny_run_gives_finite_positive_values_in_size_order() {
        let report = run_scale(&tiny(vec![64, 1, 8]));
        assert_eq!(report.table, "endpoints");
        let sizes: Vec<u32> = report.points.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [64, 1, 8]);
        for p in &report.points {
            assert!(
                p.ns_per_packet_min.is_finite() && p.ns_per_packet_min > 0.0,
                "{p:?}"
            );
            assert!(p.ns_per_packet_median.is_finite(), "{p:?}");
            assert!(p.ns_per_packet_median >= p.ns_per_packet_min, "{p:?}");
        }
    }

    #[test]
    fn zero_size_packets_and_repeats_are_clamped() {
        let report = run_scale(&ScaleOptions {
            sizes: vec![0],
            packets: 0,
            repeats: 0,
        });
        assert_eq!(report.points.len(), 1);
        assert_eq!(report.points[0].size, 1);
        assert!(report.points[0].ns_per_packet_min > 0.0);
        assert_eq!(
            report.points[0].ns_per_packet_min,
            report.points[0].ns_per_packet_median
        );
    }

    #[test]
    fn json_shape() {
        let report = ScaleReport {
            table: "endpoints".to_owned(),
            points: vec![
                ScalePoint {
                    size: 1,
                    ns_per_packet_min: 20.5,
                    ns_per_packet_median: 21.0,
                },
                ScalePoint {
                    size: 4096,
                    ns_per_packet_min: 30.0,
                    ns_per_packet_median: 31.5,
                },
            ],
        };
        let j = report.to_json();
        assert_eq!(j["table"], "endpoints");
        assert_eq!(j["unit"], "ns/packet");
        assert_eq!(j["optimized_build"], !cfg!(debug_assertions));
        let points = j["points"].as_array().expect("points array");
        assert_eq!(points.len(), 2);
        assert_eq!(points[1]["size"], 4096);
        assert_eq!(points[1]["ns_per_packet_min"], 30.0);
        assert_eq!(points[1]["ns_per_packet_median"], 31.5);
        assert_eq!(points[0].as_object().expect("object").len(), 3);

        let svg = report.to_svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("endpoints in table"));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn table_names_round_trip() {
        for t in ScaleTable::ALL {
            assert_eq!(ScaleTable::from_name(t.as_str()), Some(t));
        }
        assert_eq!(ScaleTable::from_name("nope"), None);
    }
}
