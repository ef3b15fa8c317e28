//! Placeholder until perf::hlog and perf::plot land.

use std::path::Path;

use anyhow::Result;

use perf::scenario::Scenario;

use crate::run::ModeHistograms;

pub type ModeHists<'a> = (&'a str, &'a ModeHistograms, f64, f64);

pub fn write_all(
    _dir: &Path,
    _scenario: &Scenario,
    _start_unix_s: f64,
    _modes: &[ModeHists<'_>],
) -> Result<Vec<String>> {
    Ok(Vec::new())
}
