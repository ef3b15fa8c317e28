//! Named figures with a direction, sluice / baseline ratios, and the comparison of two reports.
//!
//! Every mode of a run reduces its raw results to a list of [`Metric`]s (`rx_pps`,
//! `one_way_p99_us`, ...). Ratios and comparisons work on those lists by name, so a new
//! scenario's figures get ratios and `compare` rows without code here.
//!
//! Ratio rules: `ratio = sluice / baseline`. It is undefined (`None`, `null` in JSON) when either
//! value is not finite or negative, or when the baseline is 0 (a 0/0 loss is "no loss in
//! either", not a ratio of 1). Whether a ratio is good depends on the metric: for
//! [`Better::Higher`] (rates) above 1 is better, for [`Better::Lower`] (latencies, loss) below 1
//! is better; [`score`] turns both into "above 1 is better".

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Which direction of a metric is an improvement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        }
    }
}

/// One figure of one mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub value: f64,
    /// Set when something other than the dataplane bounded this figure (`"generator"`): the
    /// figure is then not the dataplane's capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_by: Option<String>,
}

impl Metric {
    pub fn new(name: &str, unit: &str, better: Better, value: f64) -> Self {
        Self {
            name: name.into(),
            unit: unit.into(),
            better,
            value,
            limited_by: None,
        }
    }
}

/// `value / baseline`, or `None` when that is not a meaningful number (see the module doc).
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    let usable = |x: f64| x.is_finite() && x >= 0.0;
    if !usable(value) || !usable(baseline) || baseline == 0.0 {
        return None;
    }
    Some(value / baseline)
}

/// A ratio turned into "how many times better": above 1 better, below 1 worse, whatever the
/// metric's direction. `None` for a zero ratio of a lower-is-better metric (infinitely better)
/// or an undefined ratio.
pub fn score(better: Better, ratio: Option<f64>) -> Option<f64> {
    let r = ratio?;
    match better {
        Better::Higher => Some(r),
        Better::Lower if r > 0.0 => Some(1.0 / r),
        Better::Lower => None,
    }
}

/// How a ratio reads, with `tolerance` (e.g. 0.05) around 1 counting as the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Better,
    Same,
    Worse,
    /// No ratio (see [`ratio`]).
    Undefined,
}

pub fn verdict(better: Better, ratio: Option<f64>, tolerance: f64) -> Verdict {
    match (ratio, better) {
        (None, _) => Verdict::Undefined,
        (Some(r), _) if (r - 1.0).abs() <= tolerance => Verdict::Same,
        (Some(r), Better::Higher) if r > 1.0 => Verdict::Better,
        (Some(r), Better::Lower) if r < 1.0 => Verdict::Better,
        (Some(_), _) => Verdict::Worse,
    }
}

/// Tolerance for [`Ratio::verdict`]: differences under 5 % read as "same".
pub const RATIO_TOLERANCE: f64 = 0.05;

/// sluice against the baseline for one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub metric: String,
    pub unit: String,
    pub better: Better,
    /// Human form of `better`, so a reader of the JSON need not know the enum.
    pub direction: String,
    pub sluice: f64,
    pub baseline: f64,
    /// sluice / baseline; `null` when undefined.
    pub ratio: Option<f64>,
    pub verdict: Verdict,
    /// Why the ratio is undefined or not the dataplane's (generator-limited figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Ratios for every metric present in both lists, in the order of `sluice`.
pub fn ratios(sluice: &[Metric], baseline: &[Metric]) -> Vec<Ratio> {
    sluice
        .iter()
        .filter_map(|s| {
            let b = baseline.iter().find(|b| b.name == s.name)?;
            let r = ratio(s.value, b.value);
            let limited: Vec<String> = [("sluice", s), ("baseline", b)]
                .iter()
                .filter_map(|(who, m)| {
                    m.limited_by
                        .as_ref()
                        .map(|l| format!("{who} run limited by the {l}"))
                })
                .collect();
            let note = if !limited.is_empty() {
                Some(format!(
                    "{}: the ratio compares the load, not the dataplanes' capacity",
                    limited.join(", ")
                ))
            } else if r.is_none() {
                Some(if b.value == 0.0 && s.value == 0.0 {
                    "both zero".to_string()
                } else if b.value == 0.0 {
                    "baseline is zero".to_string()
                } else {
                    "a value is not a finite, non-negative number".to_string()
                })
            } else {
                None
            };
            Some(Ratio {
                metric: s.name.clone(),
                unit: s.unit.clone(),
                better: s.better,
                direction: s.better.as_str().into(),
                sluice: s.value,
                baseline: b.value,
                ratio: r,
                verdict: verdict(s.better, r, RATIO_TOLERANCE),
                note,
            })
        })
        .collect()
}

/// One line of `sluice-perf compare A B`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompareRow {
    /// `MODE/metric` for a mode's figure, `ratio/metric` for a sluice/baseline ratio.
    pub key: String,
    pub unit: String,
    pub better: Better,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// B / A.
    pub b_over_a: Option<f64>,
    /// (B - A) / A in percent.
    pub change_pct: Option<f64>,
    pub verdict: Verdict,
    /// Worse than A by more than the threshold.
    pub regression: bool,
}

/// What `compare` reads from a report: `modes.*.metrics` and `ratios` (as `ratio/NAME`, same
/// direction as the metric).
pub fn report_figures(report: &serde_json::Value) -> Vec<(String, String, Better, f64)> {
    let mut out = Vec::new();
    if let Some(modes) = report.get("modes").and_then(|m| m.as_object()) {
        for (mode, m) in modes {
            let metrics: Vec<Metric> = m
                .get("metrics")
                .cloned()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            for x in metrics {
                out.push((format!("{mode}/{}", x.name), x.unit, x.better, x.value));
            }
        }
    }
    let ratios: Vec<Ratio> = report
        .get("ratios")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    for r in ratios {
        if let Some(v) = r.ratio {
            out.push((format!("ratio/{}", r.metric), "x".into(), r.better, v));
        }
    }
    out
}

/// Rows for every figure of A or B (A's order, then B's extras). `threshold_pct`: how much
/// worse counts as a regression.
pub fn compare(
    a: &serde_json::Value,
    b: &serde_json::Value,
    threshold_pct: f64,
) -> Vec<CompareRow> {
    let fa = report_figures(a);
    let fb = report_figures(b);
    let mut keys: Vec<(String, String, Better)> = fa
        .iter()
        .map(|(k, u, d, _)| (k.clone(), u.clone(), *d))
        .collect();
    for (k, u, d, _) in &fb {
        if !keys.iter().any(|(x, _, _)| x == k) {
            keys.push((k.clone(), u.clone(), *d));
        }
    }
    let get = |f: &[(String, String, Better, f64)], k: &str| {
        f.iter().find(|(x, _, _, _)| x == k).map(|(_, _, _, v)| *v)
    };
    keys.into_iter()
        .map(|(key, unit, better)| {
            let (va, vb) = (get(&fa, &key), get(&fb, &key));
            let r = match (va, vb) {
                (Some(x), Some(y)) => ratio(y, x),
                _ => None,
            };
            let change_pct = r.map(|r| (r - 1.0) * 100.0);
            let v = verdict(better, r, threshold_pct / 100.0);
            CompareRow {
                key,
                unit,
                better,
                a: va,
                b: vb,
                b_over_a: r,
                change_pct,
                verdict: v,
                regression: v == Verdict::Worse,
            }
        })
        .collect()
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// The table `compare` prints.
pub fn render_compare(rows: &[CompareRow], threshold_pct: f64) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<28} {:>8} {:>14} {:>14} {:>8} {:>9}  verdict",
        "metric", "unit", "A", "B", "B/A", "change"
    );
    for r in rows {
        let change = r.change_pct.map_or("-".into(), |c| format!("{c:+.1}%"));
        let verdict = match r.verdict {
            Verdict::Better => "better".to_string(),
            Verdict::Same => "same".to_string(),
            Verdict::Worse => format!("REGRESSION ({})", r.better.as_str()),
            Verdict::Undefined => "n/a".to_string(),
        };
        let _ = writeln!(
            t,
            "{:<28} {:>8} {:>14} {:>14} {:>8} {:>9}  {}",
            r.key,
            r.unit,
            num(r.a),
            num(r.b),
            r.b_over_a.map_or("-".into(), |x| format!("{x:.3}")),
            change,
            verdict
        );
    }
    let n = rows.iter().filter(|r| r.regression).count();
    let _ = writeln!(
        t,
        "{n} regression(s) beyond {threshold_pct}% (noise between runs on this machine is 20-30 %; \
         the ratio/ rows, measured against a baseline in the same run, are the steadier ones)"
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratio_handles_zero_nan_and_negative() {
        assert_eq!(ratio(2.0, 4.0), Some(0.5));
        assert_eq!(ratio(0.0, 4.0), Some(0.0));
        assert_eq!(ratio(4.0, 0.0), None);
        assert_eq!(ratio(0.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        assert_eq!(ratio(1.0, f64::NAN), None);
        assert_eq!(ratio(f64::INFINITY, 1.0), None);
        assert_eq!(ratio(-1.0, 1.0), None);
    }

    #[test]
    fn direction_decides_better_and_worse() {
        assert_eq!(verdict(Better::Higher, Some(1.5), 0.05), Verdict::Better);
        assert_eq!(verdict(Better::Higher, Some(0.5), 0.05), Verdict::Worse);
        assert_eq!(verdict(Better::Lower, Some(0.5), 0.05), Verdict::Better);
        assert_eq!(verdict(Better::Lower, Some(1.5), 0.05), Verdict::Worse);
        assert_eq!(verdict(Better::Lower, Some(1.04), 0.05), Verdict::Same);
        assert_eq!(verdict(Better::Higher, Some(0.96), 0.05), Verdict::Same);
        assert_eq!(verdict(Better::Higher, None, 0.05), Verdict::Undefined);
        assert_eq!(score(Better::Higher, Some(2.0)), Some(2.0));
        assert_eq!(score(Better::Lower, Some(0.5)), Some(2.0));
        assert_eq!(score(Better::Lower, Some(0.0)), None);
        assert_eq!(score(Better::Lower, None), None);
    }

    #[test]
    fn ratios_pair_by_name_and_note_generator_limits_and_zeros() {
        let mut rx = Metric::new("rx_pps", "pps", Better::Higher, 500.0);
        rx.limited_by = Some("generator".into());
        let sluice = vec![
            rx,
            Metric::new("p99_us", "us", Better::Lower, 30.0),
            Metric::new("loss_pct", "%", Better::Lower, 0.0),
            Metric::new("only_sluice", "x", Better::Lower, 1.0),
        ];
        let baseline = vec![
            Metric::new("loss_pct", "%", Better::Lower, 0.0),
            Metric::new("p99_us", "us", Better::Lower, 60.0),
            Metric::new("rx_pps", "pps", Better::Higher, 1000.0),
        ];
        let r = ratios(&sluice, &baseline);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].metric, "rx_pps");
        assert_eq!(r[0].ratio, Some(0.5));
        assert_eq!(r[0].verdict, Verdict::Worse);
        assert!(r[0].note.as_deref().unwrap_or("").contains("generator"));
        assert_eq!(r[1].ratio, Some(0.5));
        assert_eq!(r[1].verdict, Verdict::Better);
        assert_eq!(r[1].direction, "lower is better");
        assert_eq!(r[2].ratio, None);
        assert_eq!(r[2].verdict, Verdict::Undefined);
        assert_eq!(r[2].note.as_deref(), Some("both zero"));
        let v = serde_json::to_value(&r[2]).expect("serialises");
        assert!(v["ratio"].is_null());
    }

    fn report(pps: f64, p99: f64, ratio_pps: f64) -> serde_json::Value {
        json!({
            "modes": {
                "sluice": {"metrics": [
                    {"name": "rx_pps", "unit": "pps", "better": "higher", "value": pps},
                    {"name": "p99_us", "unit": "us", "better": "lower", "value": p99}
                ]}
            },
            "ratios": [{"metric": "rx_pps", "unit": "pps", "better": "higher",
                        "direction": "higher is better", "sluice": pps, "baseline": 1.0,
                        "ratio": ratio_pps, "verdict": "better"}]
        })
    }

    #[test]
    fn compare_marks_regressions_by_direction() {
        let a = report(1000.0, 50.0, 1.0);
        let b = report(800.0, 40.0, 1.02);
        let rows = compare(&a, &b, 5.0);
        assert_eq!(rows.len(), 3);
        let pps = &rows[0];
        assert_eq!(pps.key, "sluice/rx_pps");
        assert_eq!(pps.b_over_a, Some(0.8));
        assert!((pps.change_pct.unwrap_or(0.0) + 20.0).abs() < 1e-9);
        assert!(pps.regression, "fewer pps is worse");
        let p99 = &rows[1];
        assert_eq!(p99.verdict, Verdict::Better);
        assert!(!p99.regression, "lower latency is better");
        assert_eq!(rows[2].key, "ratio/rx_pps");
        assert_eq!(rows[2].verdict, Verdict::Same);
        let text = render_compare(&rows, 5.0);
        assert!(text.contains("REGRESSION"), "{text}");
        assert!(text.contains("-20.0%"), "{text}");
        assert!(text.contains("1 regression(s)"), "{text}");
    }

    #[test]
    fn compare_keeps_figures_present_in_one_report_only() {
        let a = report(1000.0, 50.0, 1.0);
        let b = json!({"modes": {"kernel": {"metrics": [
            {"name": "rx_pps", "unit": "pps", "better": "higher", "value": 5.0}]}}});
        let rows = compare(&a, &b, 5.0);
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| !r.regression));
        let k = rows
            .iter()
            .find(|r| r.key == "kernel/rx_pps")
            .expect("B's extra row");
        assert_eq!((k.a, k.b), (None, Some(5.0)));
        assert_eq!(k.verdict, Verdict::Undefined);
        // Garbage in: no rows, no panic.
        assert!(compare(&json!(1), &json!({"modes": 3}), 5.0).is_empty());
    }
}
