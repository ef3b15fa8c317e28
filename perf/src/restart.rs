//! Agent restarts under traffic: the figures of a restart scenario ([`crate::scenario::Scenario::restart`]).
//!
//! ```text
//!   gen (client pod) --UDP at a fixed rate, per-flow sequence numbers--> sink (server pod)
//!            |                 signal          exited      ready (conf + socket answer)
//!   agent of the client's node: ---old--->|........|--new agent starting-->|--forwarding--
//!   sink:    ...received... [ before | longest gap (outage) | after ] ...received...
//! ```
//!
//! The runner restarts one node's agent during a UDP stream (SIGTERM: a planned restart; SIGKILL:
//! a crash) and records three `CLOCK_MONOTONIC` instants ([`RestartTimes`]): the signal, the old
//! process gone, the new one ready. Every namespace on the machine shares that clock, so they
//! compare directly with the send and receive timestamps of the packets that bracket the sink's
//! longest gap ([`crate::seq::SeqGap`]). [`outcome`] derives the figures: sent, received, lost
//! (`sent - received`, so loss before the first and after the last received packet counts
//! too), the outage (the longest gap, in packets and in ms of the sender's and of the
//! receiver's clock) and where it lies against the restart. [`warnings`] says when the
//! measurement does not add up: a gap that began well before the signal, or ended well after
//! the new agent said it was ready, traffic that never resumed, or loss outside the outage.
//!
//! Limits: "ready" is what the testbed can see (the CNI config written and the agent socket
//! answering, polled every `testbed::agent::READY_POLL`), not the first packet forwarded; the
//! outage says how long forwarding really stopped. Send timestamps have one send batch's
//! resolution (32 packets at 50 kpps: 0.64 ms). A `sendmmsg` the kernel refuses during the
//! outage (an ICMP error, an unresolved neighbour) reuses its sequence numbers, so the outage in
//! packets can be smaller than rate x outage in ms: `send_errors` says when. There is no kernel
//! baseline: the kernel path has no agent to restart.

use serde::{Deserialize, Serialize};

use crate::gen::GenReport;
use crate::metrics::{Better, Metric};
use crate::sink::SinkReport;

/// How the agent is stopped before the new one starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartHow {
    /// SIGTERM: the agent detaches its XDP programs and exits, then a new one starts (a cold
    /// restart).
    Term,
    /// SIGKILL: the kernel closes the agent's bpf_links and sockets with the process (a crash).
    Kill,
    /// A hot restart (a planned one, an upgrade): the new agent starts while the old one runs
    /// and takes its dataplane over; the old one exits by itself. The "signal" instant is the
    /// new agent's start.
    Hot,
}

impl RestartHow {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartHow::Term => "term",
            RestartHow::Kill => "kill",
            RestartHow::Hot => "hot",
        }
    }

    /// The signal that stops the old agent (`None`: none is sent, the old agent hands over).
    pub fn signal(self) -> Option<i32> {
        match self {
            RestartHow::Term => Some(libc::SIGTERM),
            RestartHow::Kill => Some(libc::SIGKILL),
            RestartHow::Hot => None,
        }
    }
}

/// When the restart happened, `CLOCK_MONOTONIC` ns (the clock of the packets' timestamps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartTimes {
    /// Just before the signal was sent.
    pub signal_ns: u64,
    /// When the old agent was seen gone (reaped).
    pub exited_ns: u64,
    /// When the new agent was seen ready (CNI config written, socket answering).
    pub ready_ns: u64,
}

/// One restart made during a run, and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub how: RestartHow,
    /// The node whose agent was restarted.
    pub node: String,
    pub old_pid: u32,
    pub new_pid: Option<u32>,
    /// The signal was planned this long after the generator started (`--restart-at`).
    pub planned_at_s: f64,
    pub times: RestartTimes,
    /// Missing when the traffic's reports are (see the mode's errors).
    pub outcome: Option<RestartOutcome>,
}

/// The figures of one restart under traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestartOutcome {
    pub sent: u64,
    /// Distinct packets the sink received.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// `sendmmsg` calls refused during the run (their sequence numbers were reused).
    pub send_errors: u64,
    /// The signal, after the generator started.
    pub signal_after_start_ms: f64,
    pub signal_to_exit_ms: f64,
    pub signal_to_ready_ms: f64,
    /// Packets missing in the longest gap (0: no gap).
    pub outage_packets: u64,
    /// The longest gap on the sender's clock: last packet before it to first after it.
    pub outage_ms: f64,
    /// The same on the receiver's clock.
    pub outage_rx_ms: f64,
    /// Sender's time of the last packet before the gap, after the signal (negative: before).
    pub gap_start_after_signal_ms: Option<f64>,
    /// Sender's time of the first packet after the gap, after the new agent was ready
    /// (negative: before it was seen ready).
    pub gap_end_after_ready_ms: Option<f64>,
    /// `lost - outage_packets`: loss before the first, after the last received packet, or in
    /// other gaps.
    pub lost_outside_outage: u64,
    /// Gaps the sink found (the outage is the longest).
    pub gap_count: u64,
    /// The next longest gaps, placed against the signal (at most `seq::MAX_GAPS - 1`).
    #[serde(default)]
    pub other_gaps: Vec<GapPlace>,
    /// A packet sent after the new agent was ready reached the sink.
    pub resumed: bool,
    /// The generator's end after the new agent was ready (negative: the restart outlasted the
    /// traffic and the outage is not measured).
    pub traffic_end_after_ready_ms: f64,
}

/// A gap other than the outage, placed in time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GapPlace {
    pub missing: u64,
    /// Sender's time of the last packet before it, after the signal (negative: before).
    pub start_after_signal_ms: f64,
    /// Sender's time across it.
    pub span_ms: f64,
}

/// `a - b` in ms, for instants that may come in either order.
fn ms_between(a: u64, b: u64) -> f64 {
    (i128::from(a) - i128::from(b)) as f64 / 1e6
}

/// The figures of a restart from the generator's and the sink's reports.
pub fn outcome(gen: &GenReport, sink: &SinkReport, t: &RestartTimes) -> RestartOutcome {
    let received = sink.seq.received;
    let lost = gen.sent.saturating_sub(received);
    let gap = sink.longest_gap;
    let outage_packets = gap.map_or(0, |g| g.missing);
    RestartOutcome {
        sent: gen.sent,
        received,
        lost,
        send_errors: gen.send_errors,
        signal_after_start_ms: ms_between(t.signal_ns, gen.start_ns),
        signal_to_exit_ms: ms_between(t.exited_ns, t.signal_ns),
        signal_to_ready_ms: ms_between(t.ready_ns, t.signal_ns),
        outage_packets,
        outage_ms: gap.map_or(0.0, |g| g.send_span_ns() as f64 / 1e6),
        outage_rx_ms: gap.map_or(0.0, |g| g.rx_span_ns() as f64 / 1e6),
        gap_start_after_signal_ms: gap.map(|g| ms_between(g.before.send_ts_ns, t.signal_ns)),
        gap_end_after_ready_ms: gap.map(|g| ms_between(g.after.send_ts_ns, t.ready_ns)),
        lost_outside_outage: lost.saturating_sub(outage_packets),
        gap_count: sink.gap_count,
        other_gaps: sink
            .gaps
            .iter()
            .skip(1)
            .map(|g| GapPlace {
                missing: g.missing,
                start_after_signal_ms: ms_between(g.before.send_ts_ns, t.signal_ns),
                span_ms: g.send_span_ns() as f64 / 1e6,
            })
            .collect(),
        resumed: sink.last_packet.is_some_and(|p| p.send_ts_ns >= t.ready_ns),
        traffic_end_after_ready_ms: ms_between(
            gen.start_ns.saturating_add(gen.duration_ns),
            t.ready_ns,
        ),
    }
}

/// How far the outage may lie outside [signal, ready] before the measurement is suspect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Margins {
    /// Packets sent this long before the signal may be lost with the old agent (in its rings,
    /// or in flight).
    pub before_signal_ms: f64,
    /// The new agent may forward this long after the testbed saw it ready.
    pub after_ready_ms: f64,
    /// Loss outside the outage tolerated, in packets.
    pub lost_outside: u64,
}

/// The margins the runner and the smoke test use.
pub const MARGINS: Margins = Margins {
    before_signal_ms: 50.0,
    after_ready_ms: 500.0,
    lost_outside: 64,
};

/// What does not add up in a restart's figures (empty: the outage lies between the signal and
/// the new agent's readiness, within `m`, and accounts for the loss).
pub fn warnings(o: &RestartOutcome, m: &Margins) -> Vec<String> {
    let mut w = Vec::new();
    if o.traffic_end_after_ready_ms < 0.0 {
        w.push(format!(
            "the new agent was ready {:.0} ms after the traffic ended: the outage is not \
             measured; use a longer --duration or an earlier --restart-at",
            -o.traffic_end_after_ready_ms
        ));
    } else if !o.resumed {
        w.push(format!(
            "no packet sent after the new agent was ready ({:.0} ms after the signal) reached the \
             sink: forwarding did not resume",
            o.signal_to_ready_ms
        ));
    }
    if let Some(start) = o.gap_start_after_signal_ms {
        if start < -m.before_signal_ms {
            w.push(format!(
                "the longest gap began {:.1} ms before the signal (margin {} ms): loss that the \
                 restart did not cause",
                -start, m.before_signal_ms
            ));
        }
    }
    if let Some(end) = o.gap_end_after_ready_ms {
        if end > m.after_ready_ms {
            w.push(format!(
                "the longest gap ended {end:.1} ms after the new agent was seen ready (margin {} \
                 ms): the agent answers before it forwards",
                m.after_ready_ms
            ));
        }
    }
    if o.lost_outside_outage > m.lost_outside {
        let places: Vec<String> = o
            .other_gaps
            .iter()
            .map(|g| {
                format!(
                    "{} at {:+.1} ms from the signal",
                    g.missing, g.start_after_signal_ms
                )
            })
            .collect();
        w.push(format!(
            "{} of the {} packets lost are outside the longest gap (before the first or after \
             the last packet received, or in {} other gaps{}{})",
            o.lost_outside_outage,
            o.lost,
            o.gap_count.saturating_sub(1),
            if places.is_empty() {
                ""
            } else {
                ", the longest: "
            },
            places.join(", ")
        ));
    }
    if o.send_errors > 0 {
        w.push(format!(
            "the generator had {} sendmmsg calls refused (their sequence numbers were reused): \
             the outage in packets understates rate x outage_ms",
            o.send_errors
        ));
    }
    w
}

/// The restart's figures as table rows.
pub fn metrics(o: &RestartOutcome) -> Vec<Metric> {
    vec![
        Metric::new("lost_packets", "pkt", Better::Lower, o.lost as f64),
        Metric::new(
            "outage_packets",
            "pkt",
            Better::Lower,
            o.outage_packets as f64,
        ),
        Metric::new("outage_ms", "ms", Better::Lower, o.outage_ms),
        Metric::new("outage_rx_ms", "ms", Better::Lower, o.outage_rx_ms),
        Metric::new("agent_exit_ms", "ms", Better::Lower, o.signal_to_exit_ms),
        Metric::new("agent_ready_ms", "ms", Better::Lower, o.signal_to_ready_ms),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::StopReason;
    use crate::hist::LatencySummary;
    use crate::seq::{FlowTable, SeqStats};

    const MS: u64 = 1_000_000;

    fn gen(sent: u64) -> GenReport {
        GenReport {
            kind: "gen".into(),
            dst: "10.0.0.2:9000".into(),
            frame_bytes: 64,
            payload_bytes: 18,
            flows: 1,
            batch: 1,
            sent,
            start_ns: 1_000 * MS,
            send_errors: 0,
            duration_ns: 4_000 * MS,
            achieved_pps: 1000.0,
            target_pps: Some(1000),
            rate_reached: true,
            stopped_by: StopReason::Duration,
        }
    }

    /// A sink that got packets 0..n at 1 kpps from t = 1 s, except `lost`.
    fn sink(n: u32, lost: std::ops::Range<u32>) -> SinkReport {
        let mut t = FlowTable::default();
        for s in (0..n).filter(|s| !lost.contains(s)) {
            let ts = 1_000 * MS + u64::from(s) * MS;
            t.record_at(0, s, ts, ts + MS / 10);
        }
        SinkReport {
            kind: "sink".into(),
            bind: "0.0.0.0:9000".into(),
            seq: t.totals(),
            malformed: 0,
            flows: 1,
            bytes: 0,
            duration_ns: 0,
            rate_pps: 0.0,
            expected: None,
            missing_vs_expected: None,
            latency: LatencySummary::default(),
            stopped_by: StopReason::Duration,
            longest_gap: t.longest_gap(),
            gaps: t.gaps(),
            gap_count: t.gap_count(),
            last_packet: t.last_sent(),
            histogram: None,
        }
    }

    /// Signal at 2.5 s, exit at 2.52 s, ready at 3.2 s.
    fn times() -> RestartTimes {
        RestartTimes {
            signal_ns: 2_500 * MS,
            exited_ns: 2_520 * MS,
            ready_ns: 3_200 * MS,
        }
    }

    #[test]
    fn an_outage_between_signal_and_ready_adds_up() {
        // Packets 1500..2250 (sent 2.5 s .. 3.25 s) lost.
        let o = outcome(&gen(4000), &sink(4000, 1500..2250), &times());
        assert_eq!((o.sent, o.received, o.lost), (4000, 3250, 750));
        assert_eq!(o.outage_packets, 750);
        assert_eq!(o.lost_outside_outage, 0);
        assert!((o.outage_ms - 751.0).abs() < 1e-9, "{}", o.outage_ms);
        assert!((o.outage_rx_ms - 751.0).abs() < 1e-9);
        assert!((o.signal_after_start_ms - 1500.0).abs() < 1e-9);
        assert!((o.signal_to_exit_ms - 20.0).abs() < 1e-9);
        assert!((o.signal_to_ready_ms - 700.0).abs() < 1e-9);
        assert_eq!(o.gap_start_after_signal_ms, Some(-1.0));
        assert_eq!(o.gap_end_after_ready_ms, Some(50.0));
        assert!(o.resumed);
        assert!((o.traffic_end_after_ready_ms - 1800.0).abs() < 1e-9);
        assert_eq!(warnings(&o, &MARGINS), Vec::<String>::new());
        assert_eq!((o.gap_count, o.other_gaps.len()), (1, 0));
        let names: Vec<String> = metrics(&o).into_iter().map(|m| m.name).collect();
        assert!(names.contains(&"outage_ms".to_string()), "{names:?}");
        assert_eq!(
            metrics(&o)
                .iter()
                .find(|m| m.name == "lost_packets")
                .map(|m| m.value),
            Some(750.0)
        );
    }

    #[test]
    fn no_loss_is_no_outage_and_no_warning() {
        let o = outcome(&gen(4000), &sink(4000, 0..0), &times());
        assert_eq!((o.lost, o.outage_packets), (0, 0));
        assert_eq!(o.outage_ms, 0.0);
        assert_eq!(o.gap_start_after_signal_ms, None);
        assert!(o.resumed);
        assert!(warnings(&o, &MARGINS).is_empty());
    }

    #[test]
    fn suspect_measurements_are_named() {
        // A gap long before the signal (0.5 s .. 0.8 s of traffic).
        let early = outcome(&gen(4000), &sink(4000, 500..800), &times());
        let w = warnings(&early, &MARGINS);
        assert!(w.iter().any(|x| x.contains("before the signal")), "{w:?}");
        // Forwarding back 1.3 s after ready.
        let late = outcome(&gen(4000), &sink(4000, 1500..3500), &times());
        let w = warnings(&late, &MARGINS);
        assert!(w.iter().any(|x| x.contains("after the new agent")), "{w:?}");
        // Never resumed: everything from the signal on is lost, and that is no gap.
        let dead = outcome(&gen(4000), &sink(4000, 1500..4000), &times());
        assert_eq!((dead.outage_packets, dead.lost_outside_outage), (0, 2500));
        assert!(!dead.resumed);
        let w = warnings(&dead, &MARGINS);
        assert!(w.iter().any(|x| x.contains("did not resume")), "{w:?}");
        // Two outages: the second is placed against the signal.
        let mut t = FlowTable::default();
        for s in (0..4000u32).filter(|s| !(1500..1800).contains(s) && !(2200..2300).contains(s)) {
            let ts = 1_000 * MS + u64::from(s) * MS;
            t.record_at(0, s, ts, ts);
        }
        let mut twice = sink(0, 0..0);
        twice.seq = t.totals();
        twice.longest_gap = t.longest_gap();
        twice.gaps = t.gaps();
        twice.gap_count = t.gap_count();
        twice.last_packet = t.last_sent();
        let o = outcome(&gen(4000), &twice, &times());
        assert_eq!(
            (o.outage_packets, o.lost_outside_outage, o.gap_count),
            (300, 100, 2)
        );
        assert_eq!(o.other_gaps.len(), 1);
        assert!((o.other_gaps[0].start_after_signal_ms - 699.0).abs() < 1e-9);
        let w = warnings(&o, &MARGINS);
        assert!(
            w.iter()
                .any(|x| x.contains("1 other gaps, the longest: 100 at +699.0 ms")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|x| x.contains("outside the longest gap")),
            "{w:?}"
        );
        // Ready after the traffic: the outage is not measured.
        let t = RestartTimes {
            ready_ns: 6_000 * MS,
            ..times()
        };
        let w = warnings(&outcome(&gen(4000), &sink(4000, 1500..4000), &t), &MARGINS);
        assert!(
            w.iter().any(|x| x.contains("after the traffic ended")),
            "{w:?}"
        );
        // Refused sends are said.
        let mut g = gen(4000);
        g.send_errors = 3;
        let w = warnings(&outcome(&g, &sink(4000, 1500..2250), &times()), &MARGINS);
        assert!(w.iter().any(|x| x.contains("refused")), "{w:?}");
    }

    #[test]
    fn loss_counts_what_never_arrived_even_at_the_ends() {
        // Sink totals say 0 lost for a missing tail; the outcome counts it from `sent`.
        let s = sink(3000, 0..0);
        assert_eq!(
            s.seq,
            SeqStats {
                received: 3000,
                ..Default::default()
            }
        );
        let o = outcome(&gen(4000), &s, &times());
        assert_eq!(o.lost, 1000);
        assert_eq!(o.lost_outside_outage, 1000);
    }

    #[test]
    fn signals_are_the_usual_ones() {
        assert_eq!(RestartHow::Term.signal(), Some(libc::SIGTERM));
        assert_eq!(RestartHow::Kill.signal(), Some(libc::SIGKILL));
        assert_eq!(RestartHow::Hot.signal(), None);
        assert_eq!(
            serde_json::to_value(RestartHow::Kill).expect("serialises"),
            serde_json::json!("kill")
        );
    }
}
