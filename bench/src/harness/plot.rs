//! SVG plots of a [`BenchResult`](super::schema::BenchResult)'s runs.
//!
//! Drawn with plotters' SVG backend and its built-in ("naive") font
//! metrics: text is written as SVG `<text>` and the viewer picks the font,
//! so no font files are needed to render. Every plot writes a valid SVG even
//! with no data (it then says "no data").
//!
//! - [`ttft_cdf`] — the TTFT CDF, one line per run.
//! - [`goodput_vs_load`] — goodput against offered rate (or concurrency),
//!   one line per (policy, deployment).
//! - [`hit_ratio_timeline`] — the cumulative token cache hit ratio over
//!   time, one line per run.

use super::schema::Run;
use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// Pixel size of every plot.
const SIZE: (u32, u32) = (960, 600);
/// Most points drawn per line; longer sample lists are thinned evenly
/// (their first and last point always kept).
const MAX_POINTS: usize = 2000;
/// Stroke width of data lines (axes and ticks are 1).
const SERIES_WIDTH: u32 = 2;
/// Positive TTFTs are drawn within these bounds (seconds: 1 ns, about
/// 11.6 days): plotters' log axis does not finish over hundreds of decades.
const TTFT_BOUNDS_S: (f64, f64) = (1e-9, 1e6);
/// Above this max/min spread the TTFT axis is logarithmic.
const LOG_SPREAD: f64 = 100.0;

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Writes the TTFT CDF of every run to `path` (SVG): x is TTFT in seconds
/// (logarithmic when the samples span more than 100×), y the fraction of
/// completed requests at or below it. Runs without samples are left out.
pub fn ttft_cdf(runs: &[Run], path: &Path) -> anyhow::Result<()> {
    write_svg(path, &render_ttft_cdf(runs)?)
}

/// Writes goodput against offered load to `path` (SVG): one line per
/// (policy, deployment), x the offered rate in req/s (or the concurrency
/// when no run has a rate), y goodput in req/s.
pub fn goodput_vs_load(runs: &[Run], path: &Path) -> anyhow::Result<()> {
    write_svg(path, &render_goodput(runs)?)
}

/// Writes each run's cumulative token cache hit ratio over time to `path`
/// (SVG). Runs without a timeline are left out.
pub fn hit_ratio_timeline(runs: &[Run], path: &Path) -> anyhow::Result<()> {
    write_svg(path, &render_hit_ratio(runs)?)
}

/// Whether a goodput-vs-load plot says anything: at least two runs share a
/// policy and differ in offered rate or concurrency.
pub fn has_load_sweep(runs: &[Run]) -> bool {
    runs.iter().enumerate().any(|(i, a)| {
        runs[i + 1..]
            .iter()
            .any(|b| a.policy == b.policy && (a.rate_rps != b.rate_rps || a.concurrency != b.concurrency))
    })
}

fn write_svg(path: &Path, svg: &str) -> anyhow::Result<()> {
    std::fs::write(path, svg).with_context(|| format!("writing plot {}", path.display()))
}

/// The x axis of the goodput plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadAxis {
    Rate,
    Concurrency,
}

fn load_axis(runs: &[Run]) -> LoadAxis {
    if runs.iter().any(|r| r.rate_rps.is_some()) || !runs.iter().any(|r| r.concurrency.is_some()) {
        LoadAxis::Rate
    } else {
        LoadAxis::Concurrency
    }
}

/// TTFT CDF lines, x in seconds; samples sorted (defensively) and thinned.
fn cdf_series(runs: &[Run]) -> Vec<Series> {
    runs.iter()
        .filter_map(|r| {
            let mut s: Vec<f64> = r.ttft_samples_ms.iter().copied().filter(|v| v.is_finite() && *v >= 0.0).collect();
            if s.is_empty() {
                return None;
            }
            s.sort_by(f64::total_cmp);
            let n = s.len();
            let points = thin(n).map(|i| (ttft_s(s[i]), (i + 1) as f64 / n as f64)).collect();
            Some(Series { label: r.label.clone(), points })
        })
        .collect()
}

/// A TTFT sample (ms) as the x of the CDF (s), kept within [`TTFT_BOUNDS_S`].
fn ttft_s(ms: f64) -> f64 {
    let s = ms / 1000.0;
    if s > 0.0 {
        s.clamp(TTFT_BOUNDS_S.0, TTFT_BOUNDS_S.1)
    } else {
        s
    }
}

/// Indices `0..n`, at most [`MAX_POINTS`] of them, evenly spread, the
/// first and last included.
fn thin(n: usize) -> impl Iterator<Item = usize> {
    let step = n.div_ceil(MAX_POINTS).max(1);
    (0..n).filter(move |i| i % step == 0 || *i + 1 == n)
}

fn goodput_series(runs: &[Run]) -> (LoadAxis, Vec<Series>) {
    let axis = load_axis(runs);
    let mut groups: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    // Keep first-seen order of groups for stable colours.
    let mut order: Vec<(String, String)> = Vec::new();
    for r in runs {
        let x = match axis {
            LoadAxis::Rate => r.rate_rps,
            LoadAxis::Concurrency => r.concurrency.map(f64::from),
        };
        let Some(x) = x.filter(|x| x.is_finite()) else { continue };
        if !r.goodput_rps.is_finite() {
            continue;
        }
        let key = (r.policy.clone(), r.deployment.name());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push((x, r.goodput_rps));
    }
    let series = order
        .into_iter()
        .filter_map(|key| {
            let mut points = groups.remove(&key)?;
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Some(Series { label: format!("{} {}", key.0, key.1), points })
        })
        .collect();
    (axis, series)
}

fn hit_ratio_series(runs: &[Run]) -> Vec<Series> {
    runs.iter()
        .filter_map(|r| {
            let pts: Vec<(f64, f64)> =
                r.hit_ratio_timeline.iter().copied().filter(|(t, h)| t.is_finite() && h.is_finite()).collect();
            if pts.is_empty() {
                return None;
            }
            let n = pts.len();
            Some(Series { label: r.label.clone(), points: thin(n).map(|i| pts[i]).collect() })
        })
        .collect()
}

/// Whether an axis over `[lo, hi]` (lo > 0) should be logarithmic.
fn wants_log(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo > LOG_SPREAD
}

fn bounds(series: &[Series], pick: impl Fn(&(f64, f64)) -> f64) -> Option<(f64, f64)> {
    let mut it = series.iter().flat_map(|s| s.points.iter()).map(pick);
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

/// `0..hi` padded by 5%, or `0..1` when there is nothing above zero.
fn linear_from_zero(hi: f64) -> Range<f64> {
    if hi > 0.0 && hi.is_finite() {
        0.0..pad(hi, 1.05)
    } else {
        0.0..1.0
    }
}

/// `v * by`, or `v` where that overflows.
fn pad(v: f64, by: f64) -> f64 {
    let p = v * by;
    if p.is_finite() {
        p
    } else {
        v
    }
}

fn render_ttft_cdf(runs: &[Run]) -> anyhow::Result<String> {
    let series = cdf_series(runs);
    let spec = ChartSpec {
        title: "TTFT CDF",
        x_desc: "TTFT (s)",
        y_desc: "fraction of completed requests",
        legend: SeriesLabelPosition::LowerRight,
        markers: false,
    };
    let positive = bounds(&series, |p| p.0).filter(|(lo, hi)| wants_log(*lo, *hi));
    match positive {
        Some((lo, hi)) => render(&spec, &series, (lo / 1.2..pad(hi, 1.2)).log_scale(), 0.0..1.0),
        None => {
            let hi = bounds(&series, |p| p.0).map_or(0.0, |b| b.1);
            render::<RangedCoordf64, _>(&spec, &series, linear_from_zero(hi), 0.0..1.0)
        }
    }
}

fn render_goodput(runs: &[Run]) -> anyhow::Result<String> {
    let (axis, series) = goodput_series(runs);
    let spec = ChartSpec {
        title: "Goodput vs offered load",
        x_desc: match axis {
            LoadAxis::Rate => "offered rate (req/s)",
            LoadAxis::Concurrency => "concurrency",
        },
        y_desc: "goodput (req/s)",
        legend: SeriesLabelPosition::UpperLeft,
        markers: true,
    };
    let x_hi = bounds(&series, |p| p.0).map_or(0.0, |b| b.1);
    let y_hi = bounds(&series, |p| p.1).map_or(0.0, |b| b.1);
    render::<RangedCoordf64, _>(&spec, &series, linear_from_zero(x_hi), linear_from_zero(y_hi))
}

fn render_hit_ratio(runs: &[Run]) -> anyhow::Result<String> {
    let series = hit_ratio_series(runs);
    let spec = ChartSpec {
        title: "Token cache hit ratio over time",
        x_desc: "time into the run (s)",
        y_desc: "cumulative token hit ratio",
        legend: SeriesLabelPosition::LowerRight,
        markers: false,
    };
    let x_hi = bounds(&series, |p| p.0).map_or(0.0, |b| b.1);
    render::<RangedCoordf64, _>(&spec, &series, linear_from_zero(x_hi), 0.0..1.0)
}

struct ChartSpec {
    title: &'static str,
    x_desc: &'static str,
    y_desc: &'static str,
    legend: SeriesLabelPosition,
    /// Mark each point (sparse data) as well as joining them.
    markers: bool,
}

/// Renders `series` as lines into an SVG string: one `<polyline>` per
/// series (legend swatches are rectangles), plus a "no data" note when
/// there is nothing to draw.
fn render<X, XS>(spec: &ChartSpec, series: &[Series], x: XS, y: Range<f64>) -> anyhow::Result<String>
where
    XS: AsRangedCoord<CoordDescType = X, Value = f64>,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, spec, series, x, y).map_err(|e| anyhow!("drawing {}: {e}", spec.title))?;
        root.present().map_err(|e| anyhow!("drawing {}: {e}", spec.title))?;
    }
    Ok(svg)
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw<X, XS>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    spec: &ChartSpec,
    series: &[Series],
    x: XS,
    y: Range<f64>,
) -> DrawResult
where
    XS: AsRangedCoord<CoordDescType = X, Value = f64>,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(spec.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .x_label_formatter(&|v| axis_label(*v))
        .y_label_formatter(&|v| axis_label(*v))
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let color = color(i);
        let style = color.stroke_width(SERIES_WIDTH);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.label.as_str())
            .legend(move |(px, py)| Rectangle::new([(px, py - 3), (px + 18, py + 3)], color.filled()));
        if spec.markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    if series.is_empty() {
        let (w, h) = root.dim_in_pixel();
        let style = ("sans-serif", 28).into_font().color(&BLACK.mix(0.6)).pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new("no data", ((w / 2) as i32, (h / 2) as i32), style))?;
    } else {
        chart
            .configure_series_labels()
            .position(spec.legend.clone())
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// Series colours (Tableau 10), reused in turn past ten series.
fn color(i: usize) -> RGBAColor {
    const TABLEAU: [(u8, u8, u8); 10] = [
        (0x1f, 0x77, 0xb4),
        (0xff, 0x7f, 0x0e),
        (0x2c, 0xa0, 0x2c),
        (0xd6, 0x27, 0x28),
        (0x94, 0x67, 0xbd),
        (0x8c, 0x56, 0x4b),
        (0xe3, 0x77, 0xc2),
        (0x7f, 0x7f, 0x7f),
        (0xbc, 0xbd, 0x22),
        (0x17, 0xbe, 0xcf),
    ];
    let (r, g, b) = TABLEAU[i % TABLEAU.len()];
    RGBColor(r, g, b).to_rgba()
}

/// Axis tick text: few digits, more for small values.
fn axis_label(v: f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::harness::report::tests::{empty_run, sample};

    /// Data lines in a rendered plot: polylines (or paths) drawn at the
    /// series width; axes and ticks are polylines of width 1.
    pub(crate) fn series_lines(svg: &str) -> usize {
        let width = format!("stroke-width=\"{SERIES_WIDTH}\"");
        svg.split('<')
            .filter(|el| (el.starts_with("polyline") || el.starts_with("path")) && el.contains(&width))
            .count()
    }

    fn assert_svg(svg: &str) {
        let t = svg.trim_start();
        assert!(t.starts_with("<svg") || t.starts_with("<?xml"), "not SVG: {}", &t[..t.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn cdf_draws_one_line_per_run_with_samples() {
        let r = sample();
        let svg = render_ttft_cdf(&r.runs).unwrap();
        assert_svg(&svg);
        let with_samples = r.runs.iter().filter(|r| !r.ttft_samples_ms.is_empty()).count();
        assert_eq!(series_lines(&svg), with_samples);
        for run in &r.runs {
            assert!(svg.contains(&run.label.replace('&', "&amp;")), "legend lacks {}", run.label);
        }
        assert!(!svg.contains("no data"));
    }

    #[test]
    fn cdf_is_monotone_and_ends_at_one() {
        let r = sample();
        for s in cdf_series(&r.runs) {
            assert!(s.points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1), "{}", s.label);
            assert_eq!(s.points.last().map(|p| p.1), Some(1.0));
        }
    }

    #[test]
    fn cdf_thins_long_sample_lists() {
        let mut run = empty_run("many");
        run.ttft_samples_ms = (0..50_000).map(f64::from).collect();
        let s = cdf_series(std::slice::from_ref(&run));
        assert!(s[0].points.len() <= MAX_POINTS + 1);
        assert_eq!(s[0].points.first(), Some(&(0.0, 1.0 / 50_000.0)));
        assert_eq!(s[0].points.last(), Some(&(49.999, 1.0)));
    }

    #[test]
    fn log_scale_only_for_wide_ranges() {
        assert!(wants_log(0.01, 5.0));
        assert!(!wants_log(0.1, 5.0));
        assert!(!wants_log(0.0, 5.0));
    }

    #[test]
    fn goodput_groups_by_policy_and_deployment() {
        let r = sample();
        assert!(has_load_sweep(&r.runs));
        let (axis, series) = goodput_series(&r.runs);
        assert_eq!(axis, LoadAxis::Rate);
        let kv = series.iter().find(|s| s.label == "kv-centric 1P1D").unwrap();
        assert_eq!(kv.points.len(), 2);
        assert!(kv.points[0].0 < kv.points[1].0);
        let svg = render_goodput(&r.runs).unwrap();
        assert_svg(&svg);
        assert_eq!(series_lines(&svg), series.len());
    }

    #[test]
    fn goodput_uses_concurrency_when_no_rates() {
        let mut a = empty_run("c4");
        a.concurrency = Some(4);
        a.goodput_rps = 1.0;
        let mut b = empty_run("c8");
        b.concurrency = Some(8);
        b.goodput_rps = 1.5;
        let runs = [a, b];
        assert!(has_load_sweep(&runs));
        let (axis, series) = goodput_series(&runs);
        assert_eq!(axis, LoadAxis::Concurrency);
        assert_eq!(series[0].points, vec![(4.0, 1.0), (8.0, 1.5)]);
        assert!(!has_load_sweep(&runs[..1]));
    }

    #[test]
    fn hit_ratio_draws_one_line_per_timeline() {
        let r = sample();
        let svg = render_hit_ratio(&r.runs).unwrap();
        assert_svg(&svg);
        assert_eq!(series_lines(&svg), r.runs.iter().filter(|r| !r.hit_ratio_timeline.is_empty()).count());
    }

    #[test]
    fn empty_data_says_no_data() {
        let empty = [empty_run("nothing")];
        for runs in [&[][..], &empty[..]] {
            for svg in [render_ttft_cdf(runs).unwrap(), render_goodput(runs).unwrap(), render_hit_ratio(runs).unwrap()]
            {
                assert_svg(&svg);
                assert!(svg.contains("no data"));
                assert_eq!(series_lines(&svg), 0);
            }
        }
    }

    #[test]
    fn writes_files_and_reports_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        let p = dir.path().join("cdf.svg");
        ttft_cdf(&r.runs, &p).unwrap();
        assert_svg(&std::fs::read_to_string(&p).unwrap());
        let bad = dir.path().join("missing-dir").join("x.svg");
        let err = hit_ratio_timeline(&r.runs, &bad).unwrap_err();
        assert!(format!("{err:#}").contains("x.svg"));
    }

    #[test]
    fn extreme_values_render() {
        let mut a = empty_run("huge");
        a.ttft_samples_ms = vec![1e-300, 1.0, f64::MAX, f64::INFINITY, f64::NAN];
        a.hit_ratio_timeline = vec![(0.0, 0.5), (f64::MAX, 1.0), (f64::NAN, 0.2)];
        a.rate_rps = Some(f64::MAX);
        a.goodput_rps = f64::MAX;
        let mut b = empty_run("zero");
        b.ttft_samples_ms = vec![0.0, 0.0];
        b.rate_rps = Some(0.0);
        for runs in [vec![a.clone(), b.clone()], vec![a], vec![b]] {
            for svg in
                [render_ttft_cdf(&runs).unwrap(), render_goodput(&runs).unwrap(), render_hit_ratio(&runs).unwrap()]
            {
                assert_svg(&svg);
            }
        }
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(axis_label(0.0), "0");
        assert_eq!(axis_label(0.05), "0.05");
        assert_eq!(axis_label(0.5), "0.5");
        assert_eq!(axis_label(2.0), "2");
        assert_eq!(axis_label(12.5), "12.5");
        assert_eq!(axis_label(250.0), "250");
    }
}
