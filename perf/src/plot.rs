//! Self-contained SVG plots: the HdrHistogram latency percentile spectrum and cost-versus-size
//! curves.
//!
//! ```text
//!  µs |                                   /|
//!     |                          ________/ |   one polyline per series,
//!     |  ___________------------'          |   legend top left,
//!     +-----+-------+-------+-------+------+   skipped (empty) series noted
//!     0%   90%     99%    99.9%  99.99% 99.999%   x = log10(1/(1-p))
//! ```
//!
//! Design: plain text, no plotting crate, no external fonts, scripts or stylesheets (generic
//! `sans-serif` only), so the file opens anywhere and diffs readably. The spectrum is the plot
//! HdrHistogram's own tools draw: percentile on a log scale of `1/(1-p)` so the tail gets as much
//! room as the body, latency on a linear axis. Histogram values are nanoseconds (as everywhere in
//! `perf`) and are plotted in microseconds.
//!
//! Limits: the spectrum's x axis stops at 99.999 %; the points above it (up to the maximum) are
//! drawn on the right edge, so the edge shows the range from p99.999 to the maximum. Non-finite
//! points and, on a log x axis, points with x <= 0 are left out of curves.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

/// Width of every plot, in SVG user units (pixels when opened as is).
pub const WIDTH_PX: f64 = 800.0;
/// Height of every plot.
pub const HEIGHT_PX: f64 = 480.0;
const MARGIN_LEFT_PX: f64 = 80.0;
const MARGIN_RIGHT_PX: f64 = 30.0;
const MARGIN_TOP_PX: f64 = 40.0;
const MARGIN_BOTTOM_PX: f64 = 60.0;
/// Quantile iteration resolution: HdrHistogram's own default for percentile distributions.
const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Right end of the spectrum's x axis: log10(1/(1-0.99999)).
const SPECTRUM_X_MAX: f64 = 5.0;
/// Series colours, reused in order (colour-blind safe Okabe-Ito palette).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// The latency percentile spectrum of `series` (name, histogram in nanoseconds) as an SVG
/// document. Empty histograms are left out and named in a note on the plot.
pub fn latency_spectrum_svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let mut curves = Vec::new();
    let mut notes = Vec::new();
    for (name, h) in series {
        if h.is_empty() {
            notes.push(format!("{name}: no samples, not drawn"));
            continue;
        }
        let points: Vec<(f64, f64)> = h
            .iter_quantiles(TICKS_PER_HALF_DISTANCE)
            .map(|v| {
                (
                    spectrum_x(v.quantile_iterated_to()),
                    v.value_iterated_to() as f64 / 1000.0,
                )
            })
            .collect();
        curves.push(Curve {
            name: (*name).to_owned(),
            points,
        });
    }
    let y_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let x = Axis {
        lo: 0.0,
        hi: SPECTRUM_X_MAX,
        ticks: ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
            .iter()
            .enumerate()
            .map(|(i, label)| (i as f64, (*label).to_owned()))
            .collect(),
    };
    let y = linear_axis(0.0, y_max);
    render(&Figure {
        title,
        x_label: "percentile",
        y_label: "latency (µs)",
        x,
        y,
        curves: &curves,
        notes: &notes,
        markers: false,
    })
}

/// Curves through `series` (name, points (x, y)) as an SVG document, with a log10 x axis when
/// `log_x`. Series with nothing plottable are left out and named in a note on the plot.
pub fn curve_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, &[(f64, f64)])],
    log_x: bool,
) -> String {
    let mut curves = Vec::new();
    let mut notes = Vec::new();
    for (name, points) in series {
        let plottable: Vec<(f64, f64)> = points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
            .map(|&(x, y)| (if log_x { x.log10() } else { x }, y))
            .collect();
        let left_out = points.len() - plottable.len();
        if plottable.is_empty() {
            notes.push(format!("{name}: no plottable points, not drawn"));
            continue;
        }
        if left_out > 0 {
            notes.push(format!(
                "{name}: {left_out} point(s) left out (not finite{})",
                if log_x { " or x <= 0" } else { "" }
            ));
        }
        curves.push(Curve {
            name: (*name).to_owned(),
            points: plottable,
        });
    }
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let (x_lo, x_hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_lo, y_hi) = all().fold((0.0_f64, 0.0_f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let x = if curves.is_empty() {
        linear_axis(0.0, 1.0)
    } else if log_x {
        log10_axis(x_lo, x_hi)
    } else {
        linear_axis(x_lo, x_hi)
    };
    render(&Figure {
        title,
        x_label,
        y_label,
        x,
        y: linear_axis(y_lo, y_hi),
        curves: &curves,
        notes: &notes,
        markers: true,
    })
}

/// Writes `svg` to `path`; the error names the file.
pub fn write_svg(path: &Path, svg: &str) -> std::io::Result<()> {
    std::fs::write(path, svg).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot write the SVG plot {}: {e}; check that its directory exists and is writable",
                path.display()
            ),
        )
    })
}

/// Position of quantile `q` on the spectrum's x axis: log10(1/(1-q)), clamped into the axis.
fn spectrum_x(q: f64) -> f64 {
    if q >= 1.0 {
        return SPECTRUM_X_MAX;
    }
    (-(1.0 - q).log10()).clamp(0.0, SPECTRUM_X_MAX)
}

struct Curve {
    name: String,
    /// Points in axis space (x already log10 where the axis is logarithmic).
    points: Vec<(f64, f64)>,
}

/// A linear axis in axis space, with labelled ticks.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// Fraction 0..=1 of the way along the axis, clamped.
    fn frac(&self, v: f64) -> f64 {
        let span = self.hi - self.lo;
        if span <= 0.0 || !span.is_finite() {
            return 0.0;
        }
        ((v - self.lo) / span).clamp(0.0, 1.0)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let m = raw / magnitude;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A linear axis covering `lo..=hi` with about five ticks on round numbers.
fn linear_axis(lo: f64, hi: f64) -> Axis {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() && lo <= hi {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        hi = lo + lo.abs().max(1.0);
    }
    let step = nice_step((hi - lo) / 5.0);
    lo = (lo / step).floor() * step;
    hi = (hi / step).ceil() * step;
    let mut ticks = Vec::new();
    let n = ((hi - lo) / step).round() as i64;
    for i in 0..=n.clamp(0, 100) {
        let v = lo + i as f64 * step;
        ticks.push((v, format_number(v, step)));
    }
    Axis { lo, hi, ticks }
}

/// A log10 axis (in exponent space) from the power of ten at or below `lo` to the one at or
/// above `hi` (both > 0), ticks on every power of ten.
fn log10_axis(lo: f64, hi: f64) -> Axis {
    // `lo` and `hi` are already log10 values.
    let mut lo_e = lo.floor();
    let mut hi_e = hi.ceil();
    if hi_e <= lo_e {
        lo_e -= 1.0;
        hi_e += 1.0;
    }
    let ticks = (lo_e as i64..=hi_e as i64)
        .take(60)
        .map(|e| {
            (
                e as f64,
                format_number(10f64.powi(e as i32), 10f64.powi(e as i32)),
            )
        })
        .collect();
    Axis {
        lo: lo_e,
        hi: hi_e,
        ticks,
    }
}

/// `v` with as many decimals as `step` needs, e-notation when very large or small.
fn format_number(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let a = v.abs();
    if !(1e-3..1e7).contains(&a) {
        return format!("{v:e}");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// Escapes text for XML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

struct Figure<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x: Axis,
    y: Axis,
    curves: &'a [Curve],
    notes: &'a [String],
    /// Draw a dot on every point (curves with few points).
    markers: bool,
}

fn render(f: &Figure<'_>) -> String {
    let left = MARGIN_LEFT_PX;
    let right = WIDTH_PX - MARGIN_RIGHT_PX;
    let top = MARGIN_TOP_PX;
    let bottom = HEIGHT_PX - MARGIN_BOTTOM_PX;
    let px = |v: f64| left + f.x.frac(v) * (right - left);
    let py = |v: f64| bottom - f.y.frac(v) * (bottom - top);

    let mut s = String::new();
    // Writing to a String cannot fail: the fmt::Results below are ignored on purpose.
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH_PX}" height="{HEIGHT_PX}" viewBox="0 0 {WIDTH_PX} {HEIGHT_PX}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH_PX}" height="{HEIGHT_PX}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH_PX / 2.0,
        escape(f.title)
    );

    // Grid and tick labels.
    let _ = writeln!(s, r##"<g stroke="#dddddd" stroke-width="1">"##);
    for (v, _) in &f.x.ticks {
        let x = px(*v);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}"/>"#
        );
    }
    for (v, _) in &f.y.ticks {
        let y = py(*v);
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}"/>"#
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        r#"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        right - left,
        bottom - top
    );
    for (v, label) in &f.x.ticks {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(*v),
            bottom + 16.0,
            escape(label)
        );
    }
    for (v, label) in &f.y.ticks {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            py(*v) + 4.0,
            escape(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        HEIGHT_PX - 20.0,
        escape(f.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0:.1}" text-anchor="middle" transform="rotate(-90 18 {0:.1})">{1}</text>"#,
        (top + bottom) / 2.0,
        escape(f.y_label)
    );

    // Curves.
    for (i, c) in f.curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut pts = String::new();
        for (x, y) in &c.points {
            let _ = write!(pts, "{:.1},{:.1} ", px(*x), py(*y));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            pts.trim_end()
        );
        if f.markers {
            for (x, y) in &c.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    px(*x),
                    py(*y)
                );
            }
        }
    }

    // Legend and notes, top left inside the plot area.
    let mut line_y = top + 18.0;
    for (i, c) in f.curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{line_y:.1}" x2="{:.1}" y2="{line_y:.1}" stroke="{colour}" stroke-width="3"/>"#,
            left + 10.0,
            left + 34.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            left + 40.0,
            line_y + 4.0,
            escape(&c.name)
        );
        line_y += 16.0;
    }
    for note in f.notes {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#666666" font-style="italic">{}</text>"##,
            left + 10.0,
            line_y + 4.0,
            escape(note)
        );
        line_y += 16.0;
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal well-formedness check: one root element, balanced and properly nested tags,
    /// quoted attributes, no raw `<` or stray `&` in text. Returns the element names in order.
    fn check_xml(doc: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = Vec::new();
        let mut roots = 0;
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open]);
            rest = &rest[open..];
            if let Some(after) = rest.strip_prefix("<?") {
                let end = after.find("?>").expect("unterminated <?");
                rest = &after[end + 2..];
                continue;
            }
            if let Some(after) = rest.strip_prefix("<!--") {
                let end = after.find("-->").expect("unterminated comment");
                rest = &after[end + 3..];
                continue;
            }
            let end = tag_end(rest);
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().expect("close tag without open tag");
                assert_eq!(open, name.trim(), "mis-nested </{name}>");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name_end = body.find(|c: char| c.is_whitespace()).unwrap_or(body.len());
            let name = &body[..name_end];
            assert!(!name.is_empty(), "empty tag name in <{tag}>");
            check_attributes(&body[name_end..]);
            if stack.is_empty() {
                roots += 1;
            }
            elements.push(name.to_owned());
            if !self_closing {
                stack.push(name.to_owned());
            }
        }
        check_text(rest);
        assert!(stack.is_empty(), "unclosed elements: {stack:?}");
        assert_eq!(roots, 1, "exactly one root element");
        elements
    }

    fn tag_end(s: &str) -> usize {
        let mut in_quote = false;
        for (i, c) in s.char_indices() {
            match c {
                '"' => in_quote = !in_quote,
                '<' if i > 0 && !in_quote => panic!("'<' inside a tag: {s:.60}"),
                '>' if !in_quote => return i,
                _ => {}
            }
        }
        panic!("unterminated tag: {s:.60}")
    }

    fn check_attributes(mut attrs: &str) {
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                return;
            }
            let eq = attrs.find('=').expect("attribute without '='");
            let name = &attrs[..eq];
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'),
                "bad attribute name {name:?}"
            );
            let value = attrs[eq + 1..]
                .strip_prefix('"')
                .expect("attribute value not quoted");
            let close = value.find('"').expect("unterminated attribute value");
            check_text(&value[..close]);
            attrs = &value[close + 1..];
        }
    }

    fn check_text(t: &str) {
        assert!(!t.contains('<'), "raw '<' in text {t:?}");
        let mut rest = t;
        while let Some(amp) = rest.find('&') {
            rest = &rest[amp + 1..];
            let semi = rest.find(';').expect("'&' without ';'");
            let entity = &rest[..semi];
            assert!(
                ["amp", "lt", "gt", "quot", "apos"].contains(&entity),
                "unknown entity &{entity};"
            );
            rest = &rest[semi + 1..];
        }
    }

    fn attr<'a>(tag_text: &'a str, name: &str) -> Option<&'a str> {
        let key = format!(" {name}=\"");
        let at = tag_text.find(&key)? + key.len();
        let len = tag_text[at..].find('"')?;
        Some(&tag_text[at..at + len])
    }

    /// The `points` of every polyline, as (x, y) pairs.
    fn polylines(doc: &str) -> Vec<Vec<(f64, f64)>> {
        doc.lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                attr(l, "points")
                    .expect("polyline has points")
                    .split_whitespace()
                    .map(|pair| {
                        let (x, y) = pair.split_once(',').expect("x,y");
                        (x.parse().expect("x number"), y.parse().expect("y number"))
                    })
                    .collect()
            })
            .collect()
    }

    fn assert_inside_viewbox(doc: &str) {
        let svg = doc
            .lines()
            .find(|l| l.starts_with("<svg"))
            .expect("svg element");
        let vb: Vec<f64> = attr(svg, "viewBox")
            .expect("viewBox")
            .split_whitespace()
            .map(|v| v.parse().expect("viewBox number"))
            .collect();
        assert_eq!(vb.len(), 4);
        let inside = |x: f64, y: f64| {
            x.is_finite()
                && y.is_finite()
                && (vb[0]..=vb[0] + vb[2]).contains(&x)
                && (vb[1]..=vb[1] + vb[3]).contains(&y)
        };
        for line in polylines(doc) {
            for (x, y) in line {
                assert!(inside(x, y), "({x}, {y}) outside viewBox {vb:?}");
            }
        }
        for l in doc.lines().filter(|l| l.starts_with("<circle")) {
            let x: f64 = attr(l, "cx").expect("cx").parse().expect("cx number");
            let y: f64 = attr(l, "cy").expect("cy").parse().expect("cy number");
            assert!(inside(x, y), "circle ({x}, {y}) outside viewBox {vb:?}");
        }
    }

    fn latency_hist(values_ns: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("bounds");
        for v in values_ns {
            h.record(v).expect("in range");
        }
        h
    }

    #[test]
    fn spectrum_is_well_formed_with_one_polyline_per_series() {
        let fast = latency_hist((1..=10_000).map(|i| 20_000 + i));
        let slow = latency_hist((1..=10_000).map(|i| 50_000 + 30 * i));
        let doc = latency_spectrum_svg(
            "pod-to-pod <udp> & friends",
            &[("sluice", &fast), ("kernel", &slow)],
        );
        let elements = check_xml(&doc);
        assert_eq!(elements.iter().filter(|e| *e == "polyline").count(), 2);
        assert_inside_viewbox(&doc);
        assert!(doc.contains("pod-to-pod &lt;udp&gt; &amp; friends"));
        assert!(doc.contains(">sluice</text>") && doc.contains(">kernel</text>"));
        for label in ["90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(doc.contains(&format!(">{label}</text>")), "x tick {label}");
        }
        assert!(!doc.contains("script") && !doc.contains("@font-face") && !doc.contains("href"));
    }

    #[test]
    fn spectrum_rises_left_to_right_and_slower_series_sits_higher() {
        let fast = latency_hist((1..=10_000).map(|i| 20_000 + i));
        let slow = latency_hist((1..=10_000).map(|i| 50_000 + 30 * i));
        let doc = latency_spectrum_svg("t", &[("fast", &fast), ("slow", &slow)]);
        let lines = polylines(&doc);
        assert_eq!(lines.len(), 2);
        for line in &lines {
            assert!(line.len() > 10, "enough quantile points: {}", line.len());
            for w in line.windows(2) {
                assert!(w[1].0 >= w[0].0, "x never goes back: {w:?}");
                // SVG y grows downwards: higher latency, smaller y.
                assert!(
                    w[1].1 <= w[0].1,
                    "latency never falls with percentile: {w:?}"
                );
            }
        }
        // At the first point (p0) and the last (max), the slow series is above the fast one.
        assert!(lines[1][0].1 < lines[0][0].1);
        assert!(lines[1].last().expect("point").1 < lines[0].last().expect("point").1);
        // The slow series' maximum (350 µs) reaches the top tick region: y near the plot top.
        let top_y = lines[1].last().expect("point").1;
        assert!(top_y < HEIGHT_PX / 2.0, "max plotted high: {top_y}");
    }

    #[test]
    fn spectrum_skips_empty_histograms_with_a_note() {
        let full = latency_hist([1_000, 2_000, 3_000]);
        let empty = latency_hist([]);
        let doc = latency_spectrum_svg("t", &[("baseline", &empty), ("sluice", &full)]);
        check_xml(&doc);
        assert_eq!(polylines(&doc).len(), 1);
        assert!(doc.contains("baseline: no samples, not drawn"));
        assert_inside_viewbox(&doc);

        let doc = latency_spectrum_svg("t", &[("a", &empty)]);
        check_xml(&doc);
        assert!(polylines(&doc).is_empty());
        assert!(doc.contains("a: no samples"));
    }

    #[test]
    fn spectrum_single_value_histogram_is_flat_and_finite() {
        let h = latency_hist([7_000; 100]);
        let doc = latency_spectrum_svg("t", &[("one", &h)]);
        check_xml(&doc);
        assert_inside_viewbox(&doc);
        let line = &polylines(&doc)[0];
        assert!(line.iter().all(|p| (p.1 - line[0].1).abs() < 0.05));
    }

    #[test]
    fn spectrum_x_positions_match_percentiles() {
        assert_eq!(spectrum_x(0.0), 0.0);
        assert!((spectrum_x(0.9) - 1.0).abs() < 1e-9);
        assert!((spectrum_x(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(spectrum_x(1.0), SPECTRUM_X_MAX);
        assert_eq!(spectrum_x(0.999_999_9), SPECTRUM_X_MAX);
    }

    #[test]
    fn curve_log_x_is_well_formed_and_ordered() {
        let min: Vec<(f64, f64)> = [1.0_f64, 16.0, 256.0, 4096.0, 65536.0]
            .iter()
            .map(|&x| (x, 20.0 + x.log2()))
            .collect();
        let median: Vec<(f64, f64)> = min.iter().map(|&(x, y)| (x, y * 1.1)).collect();
        let doc = curve_svg(
            "cost vs endpoints",
            "endpoints",
            "ns per packet",
            &[("min", &min), ("median", &median)],
            true,
        );
        check_xml(&doc);
        assert_inside_viewbox(&doc);
        let lines = polylines(&doc);
        assert_eq!(lines.len(), 2);
        // Equal steps in log x are equal steps on screen (16x each).
        let xs: Vec<f64> = lines[0].iter().map(|p| p.0).collect();
        let d0 = xs[1] - xs[0];
        for w in xs.windows(2) {
            assert!(((w[1] - w[0]) - d0).abs() < 0.2, "log spacing {xs:?}");
        }
        for label in ["1", "10", "100", "1000", "10000", "100000"] {
            assert!(doc.contains(&format!(">{label}</text>")), "tick {label}");
        }
        assert_eq!(doc.matches("<circle").count(), 10);
    }

    #[test]
    fn curve_leaves_out_unplottable_points_and_notes_them() {
        let pts = [
            (0.0, 1.0),
            (10.0, f64::NAN),
            (100.0, 3.0),
            (1000.0, f64::INFINITY),
        ];
        let nothing = [(-1.0, 2.0)];
        let doc = curve_svg("t", "x", "y", &[("some", &pts), ("none", &nothing)], true);
        check_xml(&doc);
        assert_inside_viewbox(&doc);
        let lines = polylines(&doc);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 1);
        assert!(doc.contains("some: 3 point(s) left out"));
        assert!(doc.contains("none: no plottable points"));

        let doc = curve_svg("t", "x", "y", &[], false);
        check_xml(&doc);
        assert!(polylines(&doc).is_empty());
    }

    #[test]
    fn curve_linear_negative_values_stay_inside() {
        let pts = [(-5.0, -2.0), (0.0, 0.0), (5.0, 7.5)];
        let doc = curve_svg("t", "x", "y", &[("s", &pts)], false);
        check_xml(&doc);
        assert_inside_viewbox(&doc);
        let line = &polylines(&doc)[0];
        // Left to right, bottom to top.
        assert!(line[0].0 < line[1].0 && line[1].0 < line[2].0);
        assert!(line[0].1 > line[1].1 && line[1].1 > line[2].1);
    }

    #[test]
    fn nice_steps_are_round() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(42.0), 50.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
        let a = linear_axis(0.0, 347.0);
        assert_eq!(a.lo, 0.0);
        assert!(a.hi >= 347.0 && a.hi <= 400.0);
        assert!(a.ticks.len() >= 4 && a.ticks.len() <= 11);
    }

    #[test]
    fn write_svg_names_the_file_on_error() {
        let dir = std::env::temp_dir().join(format!("sluice-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("p.svg");
        write_svg(&path, "<svg/>").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "<svg/>");
        let bad = dir.join("missing-dir").join("p.svg");
        let err = write_svg(&bad, "<svg/>").expect_err("no such directory");
        assert!(err.to_string().contains("missing-dir"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
