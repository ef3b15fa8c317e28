//! Files written next to `report.json`: HdrHistogram interval logs of every latency histogram
//! (one file per kind, one interval per mode or agent worker, tagged) and the latency spectrum
//! plot, sluice against the baseline.

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use perf::scenario::{Scenario, Traffic};

use crate::run::ModeHistograms;

/// `(mode, histograms, traffic start s after the run start, traffic length s)`.
pub type ModeHists<'a> = (&'a str, &'a ModeHistograms, f64, f64);

/// Writes what there is to write; returns the file names (relative to `dir`).
pub fn write_all(
    dir: &Path,
    scenario: &Scenario,
    start_unix_s: f64,
    modes: &[ModeHists<'_>],
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let latency = match scenario.traffic {
        Traffic::UdpStream => Some(("one-way", "one-way latency")),
        Traffic::UdpRequestResponse => Some(("rtt", "round-trip latency")),
        Traffic::TcpStream => None,
    };
    if let Some((stem, what)) = latency {
        let intervals: Vec<(String, f64, f64, &Histogram<u64>)> = modes
            .iter()
            .filter_map(|(m, h, s, l)| {
                h.latency
                    .as_ref()
                    .map(|x| ((*m).to_string(), *s, *l, x.hdr()))
            })
            .collect();
        if !intervals.is_empty() {
            let name = format!("{stem}.hlog");
            perf::hlog::write_interval_log(&dir.join(&name), start_unix_s, &intervals)
                .with_context(|| format!("writing {name}"))?;
            files.push(name);
            let series: Vec<(&str, &Histogram<u64>)> = intervals
                .iter()
                .map(|(m, _, _, h)| (m.as_str(), *h))
                .collect();
            let versus = if scenario.policies.is_some() {
                "NetworkPolicies on vs off"
            } else {
                "sluice vs kernel baseline"
            };
            let svg = perf::plot::latency_spectrum_svg(
                &format!("{}: {what}, {versus}", scenario.name),
                &series,
            );
            perf::plot::write_svg(&dir.join("latency.svg"), &svg).context("writing latency.svg")?;
            files.push("latency.svg".into());
        }
    }
    for (stem, packet) in [("agent-batch", false), ("agent-packet", true)] {
        let intervals: Vec<(String, f64, f64, &Histogram<u64>)> = modes
            .iter()
            .flat_map(|(_, h, s, l)| {
                h.agent.iter().map(move |(tag, b, p)| {
                    let x = if packet { p } else { b };
                    (tag.clone(), *s, *l, x.hdr())
                })
            })
            .collect();
        if !intervals.is_empty() {
            let name = format!("{stem}.hlog");
            perf::hlog::write_interval_log(&dir.join(&name), start_unix_s, &intervals)
                .with_context(|| format!("writing {name}"))?;
            files.push(name);
        }
    }
    Ok(files)
}
