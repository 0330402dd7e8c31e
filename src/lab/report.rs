//! `pmemvm report`: reads the JSON that `pmemvm bench faults` or
//! `pmemvm bench flush` wrote, prints its summary and, on request, draws it
//! as an SVG: latency histograms per event for faults, flush latency
//! against dirty pages for flush, or against the region size when the
//! bench swept regions. Repeats (3 or more) draw as whiskers: the least and
//! greatest per-repeat p50.
//!
//! The JSON is read into structs of its own rather than the bench's: those
//! are made to be written, and only the fields read here are required, so
//! a file from a build with more fields still reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::bench::{table, FaultEvent, LatencySummary, Spread};
use super::checks::{self, Check};
use super::crash::bench::{CrashEnd, CrashReport};
use super::flush::{self, FlushBenchConfigRecord, FlushSummaryRow};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: no \"bench\" field naming the kind: not a pmemvm bench report", path.display())]
    NoBenchKind { path: PathBuf },
    #[error("{}: unknown bench kind {kind:?}: expected \"faults\" or \"flush\"", path.display())]
    UnknownBench { path: PathBuf, kind: String },
    #[error("{} is not a bench {kind} report: {source}", path.display())]
    Shape {
        path: PathBuf,
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("nothing to draw: {0}")]
    NothingToDraw(String),
    #[error("cannot draw the figure: {0}")]
    Draw(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn draw_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw(e.to_string())
}

#[derive(Debug, Deserialize)]
struct SkippedEngine {
    engine: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
pub struct FaultReport {
    config: FaultConfig,
    summary: Vec<FaultRow>,
    #[serde(default)]
    skipped_engines: Vec<SkippedEngine>,
    runs: Vec<FaultRun>,
}

#[derive(Debug, Deserialize)]
struct FaultConfig {
    pages: u64,
    pattern: String,
    backing: String,
    repeat: u32,
}

#[derive(Debug, Deserialize)]
struct FaultRow {
    engine: String,
    event: String,
    #[serde(flatten)]
    latency: LatencySummary,
    per_second: f64,
    #[serde(default)]
    spread: Option<Spread>,
}

#[derive(Debug, Deserialize)]
struct FaultRun {
    engine: String,
    tsc_khz: u32,
    steps: Vec<FaultStep>,
}

#[derive(Debug, Deserialize)]
struct FaultStep {
    /// None for calibration steps.
    event: Option<String>,
    ticks: Vec<u64>,
}

#[derive(Debug, Deserialize)]
pub struct FlushReport {
    config: FlushBenchConfigRecord,
    summary: Vec<FlushSummaryRow>,
    #[serde(default)]
    checks: Vec<Check>,
    #[serde(default)]
    skipped_engines: Vec<SkippedEngine>,
}

/// A bench report, of any kind.
#[derive(Debug)]
pub enum Report {
    Faults(FaultReport),
    Flush(FlushReport),
    Crash(CrashReport),
}

/// Reads a bench report, telling the kinds apart by its "bench" field.
pub fn load(path: &Path) -> Result<Report, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses the text of a bench report; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Report, ReportError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| ReportError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let kind = value
        .get("bench")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| ReportError::NoBenchKind {
            path: path.to_path_buf(),
        })?
        .to_string();
    let shape = |kind| {
        let path = path.to_path_buf();
        move |source| ReportError::Shape { path, kind, source }
    };
    let report = match kind.as_str() {
        "faults" => Report::Faults(serde_json::from_value(value).map_err(shape("faults"))?),
        "flush" => Report::Flush(serde_json::from_value(value).map_err(shape("flush"))?),
        "crash" => Report::Crash(serde_json::from_value(value).map_err(shape("crash"))?),
        _ => {
            return Err(ReportError::UnknownBench {
                path: path.to_path_buf(),
                kind,
            })
        }
    };
    if let Report::Faults(r) = &report {
        // Ticks become ns through the TSC rate: without it there is no time.
        if let Some(run) = r
            .runs
            .iter()
            .find(|run| run.tsc_khz == 0 && run.steps.iter().any(|s| !s.ticks.is_empty()))
        {
            return Err(ReportError::Invalid {
                path: path.to_path_buf(),
                what: format!("a run of engine {} has tsc_khz 0", run.engine),
            });
        }
    }
    Ok(report)
}

/// A flush is one sample per request, a few per run: too few for a
/// histogram, so it stays in the printed summary only.
const NOT_HISTOGRAMMED: &str = "flush";

fn event_label(event: &str) -> String {
    FaultEvent::from_key(event).map_or_else(|| event.replace('_', " "), |e| e.label().to_string())
}

/// Known events first, in the bench's order; others after, by name.
fn event_rank(event: &str) -> (usize, String) {
    let known = FaultEvent::ALL.iter().position(|e| e.key() == event);
    (known.unwrap_or(FaultEvent::ALL.len()), event.to_string())
}

/// Formats a latency for a table or an axis: ns, µs or ms, with at most
/// three significant digits.
fn fmt_ns(ns: f64) -> String {
    let (value, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{value:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text} {unit}")
}

impl Report {
    /// A short text summary: the settings and the summary rows.
    pub fn summary(&self) -> String {
        match self {
            Self::Faults(r) => r.summary_text(),
            Self::Flush(r) => r.summary_text(),
            Self::Crash(r) => r.table(),
        }
    }

    /// The figure as SVG text.
    pub fn svg(&self) -> Result<String, ReportError> {
        match self {
            Self::Faults(r) => r.svg(),
            Self::Flush(r) => r.svg(),
            Self::Crash(r) => crash_svg(r),
        }
    }
}

/// Acknowledged records per round (log scale), one series per engine and
/// way of ending, with any round that lost records marked in red.
fn crash_svg(r: &CrashReport) -> Result<String, ReportError> {
    let rounds = r.series.iter().map(|s| s.rounds.len()).max().unwrap_or(0);
    let acked_max = r
        .series
        .iter()
        .flat_map(|s| s.rounds.iter().map(|x| x.check.acked))
        .max()
        .unwrap_or(0);
    if rounds == 0 {
        return Err(ReportError::NothingToDraw(
            "the report holds no rounds".into(),
        ));
    }
    let lost: u64 = r.series.iter().map(|s| s.lost()).sum();
    let acked: u64 = r.series.iter().map(|s| s.sum(|x| x.check.acked)).sum();
    let total_rounds: usize = r.series.iter().map(|s| s.rounds.len()).sum();
    let subtitle = format!(
        "{lost} of {acked} acknowledged records lost in {total_rounds} rounds; {} vCPU(s), seed {}",
        r.vcpus, r.seed
    );
    let engines: Vec<&str> = {
        let mut e: Vec<&str> = r.series.iter().map(|s| s.engine.as_str()).collect();
        e.dedup();
        e
    };
    let color_of = |engine: &str| {
        let i = engines.iter().position(|e| *e == engine).unwrap_or(0);
        engine_color(engine, i)
    };
    let legend: Vec<LegendEntry> = r
        .series
        .iter()
        .map(|s| LegendEntry {
            label: format!(
                "{} {} ({})",
                s.engine,
                s.end.name(),
                if s.end == CrashEnd::Cut {
                    "triangles"
                } else {
                    "dots"
                }
            ),
            color: color_of(&s.engine),
            dashed: s.end == CrashEnd::Cut,
        })
        .chain([LegendEntry {
            label: "red cross: a round that lost records".into(),
            color: RGBColor(214, 39, 40),
            dashed: false,
        }])
        .collect();
    let (width, height, legend_w) = (1200u32, 700u32, 330u32);
    let y_hi = (acked_max.max(1) as f64) * 2.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, rest) = root.split_vertically(78);
        draw_heading(&head, "Crash rounds: acknowledged against lost", &subtitle)?;
        let (plot, legend_area) = rest.split_horizontally(width - legend_w);
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..rounds as f64, (0.5f64..y_hi).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("records acknowledged (log scale; 0 drawn at the axis)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(draw_err)?;
        for s in &r.series {
            let color = color_of(&s.engine);
            let points = s
                .rounds
                .iter()
                .enumerate()
                .map(|(i, x)| (i as f64, (x.check.acked as f64).max(0.5)));
            match s.end {
                CrashEnd::Kill => chart
                    .draw_series(points.map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(draw_err)?,
                CrashEnd::Cut => chart
                    .draw_series(points.map(|p| TriangleMarker::new(p, 4, color.stroke_width(1))))
                    .map_err(draw_err)?,
            };
            chart
                .draw_series(
                    s.rounds
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| x.check.lost > 0)
                        .map(|(i, x)| {
                            Cross::new(
                                (i as f64, (x.check.lost as f64).max(0.5)),
                                8,
                                RGBColor(214, 39, 40).stroke_width(3),
                            )
                        }),
                )
                .map_err(draw_err)?;
        }
        draw_legend_column(&legend_area, &legend)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

impl FaultReport {
    fn summary_text(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "bench faults: {} pages per op, pattern {}, backing {}, {} repeat(s), {} run(s)\n",
            c.pages,
            c.pattern,
            c.backing,
            c.repeat,
            self.runs.len()
        );
        let _ = writeln!(out, "{}", table::fault_header());
        for r in &self.summary {
            let event = event_label(&r.event);
            let row = table::fault_row(
                &r.engine,
                &event,
                &r.latency,
                r.per_second,
                r.spread.as_ref(),
            );
            let _ = writeln!(out, "{row}");
        }
        for s in &self.skipped_engines {
            let _ = writeln!(out, "{}", table::skipped(&s.engine, &s.reason));
        }
        out
    }

    /// Engines in the order their runs first appear.
    fn engines(&self) -> Vec<&str> {
        let mut engines: Vec<&str> = Vec::new();
        for run in &self.runs {
            if !engines.contains(&run.engine.as_str()) {
                engines.push(&run.engine);
            }
        }
        engines
    }

    /// One panel per event with samples: per engine, every sample in ns.
    fn panels(&self) -> Vec<HistogramPanel> {
        let mut by_event: BTreeMap<(usize, String), BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
        for run in &self.runs {
            let khz = f64::from(run.tsc_khz);
            for step in &run.steps {
                let Some(event) = step.event.as_deref() else {
                    continue;
                };
                if event == NOT_HISTOGRAMMED || step.ticks.is_empty() {
                    continue;
                }
                by_event
                    .entry(event_rank(event))
                    .or_default()
                    .entry(&run.engine)
                    .or_default()
                    .extend(step.ticks.iter().map(|&t| t as f64 * 1e6 / khz));
            }
        }
        let engines = self.engines();
        by_event
            .into_iter()
            .map(|((_, event), mut samples)| HistogramPanel {
                title: event_label(&event),
                series: engines
                    .iter()
                    .filter_map(|e| samples.remove(e).map(|ns| (e.to_string(), ns)))
                    .collect(),
            })
            .collect()
    }

    fn svg(&self) -> Result<String, ReportError> {
        let panels = self.panels();
        if panels.is_empty() {
            return Err(ReportError::NothingToDraw(
                "the runs hold no access samples".into(),
            ));
        }
        let engines = self.engines();
        let legend: Vec<LegendEntry> = engines
            .iter()
            .enumerate()
            .map(|(i, e)| LegendEntry {
                label: format!("engine {e}"),
                color: engine_color(e, i),
                dashed: false,
            })
            .chain([LegendEntry {
                label: "dashed: the engine's p99".into(),
                color: RGBColor(90, 90, 90),
                dashed: true,
            }])
            .collect();
        let cols = panels.len().min(3);
        let rows = panels.len().div_ceil(cols);
        let (panel_w, panel_h) = (520, 340);
        let (title_h, legend_h) = (78, 36);
        // Two panels' width at least, so that the heading fits.
        let size = (
            (cols.max(2) * panel_w) as u32,
            (title_h + legend_h + rows * panel_h + 10) as u32,
        );
        let c = &self.config;
        let subtitle = format!(
            "{} pages per op, pattern {}, backing {}, {} run(s); ns = ticks × 1e6 / tsc_khz; log-spaced bins",
            c.pages,
            c.pattern,
            c.backing,
            self.runs.len()
        );
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err)?;
            let (head, rest) = root.split_vertically(title_h as u32);
            draw_heading(&head, "pmemvm bench faults: latency per access", &subtitle)?;
            let (legend_area, grid) = rest.split_vertically(legend_h as u32);
            draw_legend_row(&legend_area, &legend)?;
            let grid = grid.margin(0, 10, 0, 0);
            for (area, panel) in grid.split_evenly((rows, cols)).iter().zip(&panels) {
                draw_histogram(area, panel, &engines)?;
            }
            root.present().map_err(draw_err)?;
        }
        Ok(svg)
    }
}

/// The samples of one fault event, per engine.
struct HistogramPanel {
    title: String,
    series: Vec<(String, Vec<f64>)>,
}

/// Log-spaced bin edges from `lo` to `hi` (both above 0): about 24 bins a
/// decade, at least 12 so that a narrow spread still shows its shape.
fn log_bin_edges(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = if hi > lo * 1.01 {
        (lo, hi)
    } else {
        (lo / 1.05, hi * 1.05)
    };
    let decades = (hi / lo).log10();
    let bins = ((decades * 24.0).ceil() as usize).clamp(12, 120);
    (0..=bins)
        .map(|i| lo * 10f64.powf(decades * i as f64 / bins as f64))
        .collect()
}

/// The share (%) of `samples` in each bin; samples outside the edges go
/// to the first or last bin.
fn bin_shares(samples: &[f64], edges: &[f64]) -> Vec<f64> {
    let bins = edges.len().saturating_sub(1);
    let mut counts = vec![0u64; bins];
    if bins == 0 {
        return Vec::new();
    }
    for &s in samples {
        let i = edges.partition_point(|&e| e <= s).saturating_sub(1);
        counts[i.min(bins - 1)] += 1;
    }
    let total = samples.len().max(1) as f64;
    counts
        .into_iter()
        .map(|c| c as f64 * 100.0 / total)
        .collect()
}

/// The outline of a histogram: up and down at every edge.
fn step_outline(edges: &[f64], shares: &[f64]) -> Vec<(f64, f64)> {
    let mut points = Vec::with_capacity(2 * edges.len() + 2);
    for (i, &share) in shares.iter().enumerate() {
        let prev = if i == 0 { 0.0 } else { shares[i - 1] };
        points.push((edges[i], prev));
        points.push((edges[i], share));
    }
    if let (Some(&last_edge), Some(&last)) = (edges.last(), shares.last()) {
        points.push((last_edge, last));
        points.push((last_edge, 0.0));
    }
    points
}

/// A log axis around `lo..hi` (both above 0) with a little room either
/// side; widened to whole decades when it would hold fewer than two
/// powers of ten, which are the only ticks a log axis labels then.
fn log_axis(lo: f64, hi: f64) -> (f64, f64) {
    let (padded_lo, padded_hi) = (lo / 1.3, hi * 1.3);
    let powers = padded_hi.log10().floor() - padded_lo.log10().ceil() + 1.0;
    if powers >= 2.0 {
        return (padded_lo, padded_hi);
    }
    let floor = 10f64.powf(lo.log10().floor());
    let ceil = 10f64.powf(hi.log10().ceil());
    (floor, if ceil > floor { ceil } else { floor * 10.0 })
}

/// The `q` quantile of `samples`, nearest rank.
fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted.get(rank - 1).copied()
}

fn draw_histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &HistogramPanel,
    engines: &[&str],
) -> Result<(), ReportError> {
    let all = || panel.series.iter().flat_map(|(_, ns)| ns.iter().copied());
    // A zero tick count would sit at minus infinity on a log axis; it goes
    // to the first bin instead.
    let lo = all()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .min(1e12);
    let hi = all().fold(lo, f64::max);
    let lo = if lo.is_finite() { lo } else { 1.0 };
    let edges = log_bin_edges(lo, hi);
    let (x_lo, x_hi) = log_axis(edges[0], edges[edges.len() - 1]);
    let series: Vec<(&str, Vec<f64>)> = panel
        .series
        .iter()
        .map(|(engine, ns)| (engine.as_str(), bin_shares(ns, &edges)))
        .collect();
    let top = series
        .iter()
        .flat_map(|(_, shares)| shares.iter().copied())
        .fold(1.0, f64::max)
        * 1.12;
    let samples: usize = panel.series.iter().map(|(_, ns)| ns.len()).sum();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} ({samples} samples)", panel.title),
            ("sans-serif", 19),
        )
        .margin(8)
        // Room for the last tick label, centred on the right edge.
        .margin_right(30)
        .x_label_area_size(46)
        .y_label_area_size(58)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_desc("latency (log scale)")
        .y_desc("% of the engine's samples")
        .x_label_formatter(&|v| fmt_ns(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    for (engine, shares) in &series {
        let index = engines.iter().position(|e| e == engine).unwrap_or(0);
        let color = engine_color(engine, index);
        chart
            .draw_series(LineSeries::new(
                step_outline(&edges, shares),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?;
    }
    // The tail hardly shows as a share of samples: its p99 is marked.
    for (engine, ns) in &panel.series {
        let Some(p99) = quantile(ns, 0.99) else {
            continue;
        };
        let index = engines.iter().position(|e| e == engine).unwrap_or(0);
        let p99 = p99.max(edges[0]);
        chart
            .draw_series(DashedLineSeries::new(
                [(p99, 0.0), (p99, top)],
                6,
                5,
                engine_color(engine, index).stroke_width(1),
            ))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// x, p50 in µs, and the least and greatest per-repeat p50 in µs.
type Point = (f64, f64, Option<(f64, f64)>);

/// One line of a flush figure.
struct Curve {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<Point>,
}

/// A point of a flush row: its p50, and the whisker of its repeats.
fn flush_point(x: f64, r: &FlushSummaryRow) -> Point {
    let whisker = r
        .spread
        .map(|s: Spread| (s.min_p50_ns as f64 / 1e3, s.max_p50_ns as f64 / 1e3));
    (x, r.latency.p50_ns as f64 / 1e3, whisker)
}

impl FlushReport {
    fn summary_text(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "bench flush: layout {}, backing {}, {} measured round(s), {} repeat(s)\n",
            c.layout.name(),
            c.backing,
            c.rounds,
            c.repeat
        );
        out.push_str(&flush::table(&self.summary));
        for s in &self.skipped_engines {
            let _ = writeln!(out, "{}", table::skipped(&s.engine, &s.reason));
        }
        if !self.checks.is_empty() {
            out.push_str(&checks::table(&self.checks));
        }
        out
    }

    fn cases(&self) -> Vec<&str> {
        let mut cases: Vec<&str> = Vec::new();
        for r in &self.summary {
            if !cases.contains(&r.case.as_str()) {
                cases.push(&r.case);
            }
        }
        cases
    }

    /// Flush latency by dirty count, one curve per case (the first region).
    fn by_dirty(&self) -> Vec<Curve> {
        let region = self.summary.first().map_or(0, |r| r.region_pages);
        let rows = || {
            self.summary
                .iter()
                .filter(move |r| r.region_pages == region && r.latency.samples > 0)
        };
        self.cases()
            .into_iter()
            .enumerate()
            .map(|(i, case)| {
                let mut points: Vec<_> = rows()
                    .filter(|r| r.case == case)
                    .map(|r| flush_point(r.dirty as f64 + 1.0, r))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Curve {
                    label: case.to_string(),
                    color: case_color(case, i),
                    dashed: false,
                    points,
                }
            })
            .filter(|c| !c.points.is_empty())
            .collect()
    }

    /// Flush latency by region size, one curve per case and dirty count:
    /// solid for the fewest dirty pages, dashed for more.
    fn by_region(&self) -> Vec<Curve> {
        let mut dirty: Vec<u64> = self
            .summary
            .iter()
            .map(|r| r.dirty)
            .filter(|&d| d > 0)
            .collect();
        dirty.sort_unstable();
        dirty.dedup();
        let mut curves = Vec::new();
        for (i, case) in self.cases().into_iter().enumerate() {
            for (k, &d) in dirty.iter().enumerate() {
                let mut points: Vec<_> = self
                    .summary
                    .iter()
                    .filter(|r| r.case == case && r.dirty == d && r.latency.samples > 0)
                    .map(|r| flush_point((r.region_pages * 4096) as f64 / (1 << 20) as f64, r))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                if !points.is_empty() {
                    curves.push(Curve {
                        label: format!("{case}, {d} dirty"),
                        color: case_color(case, i),
                        dashed: k > 0,
                        points,
                    });
                }
            }
        }
        curves
    }

    fn svg(&self) -> Result<String, ReportError> {
        let regions = &self.config.region_pages;
        let c = &self.config;
        if regions.len() > 1 {
            let curves = self.by_region();
            let ticks: Vec<f64> = regions
                .iter()
                .map(|&p| (p * 4096) as f64 / (1 << 20) as f64)
                .collect();
            let subtitle = format!(
                "layout {}, backing {}, {} round(s), {} repeat(s); solid: fewest dirty pages, dashed: more",
                c.layout.name(),
                c.backing,
                c.rounds,
                c.repeat
            );
            draw_curves(
                "pmemvm bench flush: flush latency (p50) by region size",
                &subtitle,
                "pmem region size (MiB, log scale)",
                &ticks,
                &|x| format!("{x:.0}"),
                &curves,
            )
        } else {
            let curves = self.by_dirty();
            let mut ticks: Vec<f64> = curves
                .iter()
                .flat_map(|c| c.points.iter().map(|p| p.0))
                .collect();
            ticks.sort_by(f64::total_cmp);
            ticks.dedup();
            let subtitle = format!(
                "layout {}, region {} pages, backing {}, {} round(s), {} repeat(s)",
                c.layout.name(),
                regions.first().copied().unwrap_or(0),
                c.backing,
                c.rounds,
                c.repeat
            );
            // Dirty counts are drawn at dirty + 1 so that 0 has a place
            // on the log axis; the ticks are the counts themselves.
            draw_curves(
                "pmemvm bench flush: flush latency (p50) by dirty pages",
                &subtitle,
                "dirty pages before the flush (log scale of dirty + 1)",
                &ticks,
                &|x| format!("{:.0}", x - 1.0),
                &curves,
            )
        }
    }
}

/// A log-log figure of flush latency curves, with whiskers where the
/// points have them.
fn draw_curves(
    title: &str,
    subtitle: &str,
    x_desc: &str,
    ticks: &[f64],
    x_label: &dyn Fn(f64) -> String,
    curves: &[Curve],
) -> Result<String, ReportError> {
    let ys = || {
        curves.iter().flat_map(|c| {
            c.points
                .iter()
                .flat_map(|&(_, y, w)| [Some(y), w.map(|w| w.0), w.map(|w| w.1)])
                .flatten()
        })
    };
    let y_lo = ys().filter(|&y| y > 0.0).fold(f64::INFINITY, f64::min);
    let y_hi = ys().fold(0.0, f64::max);
    if curves.is_empty() || ticks.is_empty() || !y_lo.is_finite() {
        return Err(ReportError::NothingToDraw(
            "the summary holds no row with samples".into(),
        ));
    }
    let (y_lo, y_hi) = log_axis(y_lo, y_hi);
    let (x_lo, x_hi) = (ticks[0] / 1.6, ticks[ticks.len() - 1] * 1.6);
    let legend: Vec<LegendEntry> = curves
        .iter()
        .map(|c| LegendEntry {
            label: c.label.clone(),
            color: c.color,
            dashed: c.dashed,
        })
        .collect();
    let (width, height, legend_w) = (1200u32, 700u32, 330u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, rest) = root.split_vertically(78);
        draw_heading(&head, title, subtitle)?;
        let (plot, legend_area) = rest.split_horizontally(width - legend_w);
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(ticks.to_vec()),
                (y_lo..y_hi).log_scale(),
            )
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("flush latency, p50 (log scale)")
            .x_label_formatter(&|x| x_label(*x))
            .y_label_formatter(&|us| fmt_ns(*us * 1e3))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(draw_err)?;
        for curve in curves {
            let color = curve.color;
            let line: Vec<(f64, f64)> = curve.points.iter().map(|p| (p.0, p.1)).collect();
            if curve.dashed {
                chart
                    .draw_series(DashedLineSeries::new(
                        line.clone(),
                        6,
                        5,
                        color.stroke_width(2),
                    ))
                    .map_err(draw_err)?;
            } else {
                chart
                    .draw_series(LineSeries::new(line.clone(), color.stroke_width(3)))
                    .map_err(draw_err)?;
            }
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(draw_err)?;
            chart
                .draw_series(curve.points.iter().filter_map(|&(x, _, w)| {
                    let (lo, hi) = w?;
                    Some(PathElement::new(
                        vec![(x, lo), (x, hi)],
                        color.stroke_width(2),
                    ))
                }))
                .map_err(draw_err)?;
        }
        draw_legend_column(&legend_area, &legend)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 120, 20),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
];

/// Fixed colours for the known engines, so that both figures agree.
fn engine_color(engine: &str, index: usize) -> RGBColor {
    match engine {
        "kernel" => PALETTE[0],
        "uffd" => PALETTE[1],
        "prefault" => PALETTE[2],
        _ => PALETTE[3 + index % 3],
    }
}

/// Probe cases in their engine's colour, peers and host baselines in
/// their own.
fn case_color(case: &str, index: usize) -> RGBColor {
    if let Some(engine) = case.strip_prefix("probe ") {
        return engine_color(engine, index);
    }
    if case.starts_with("peer fsync") {
        return RGBColor(214, 39, 40);
    }
    if case.starts_with("peer msync") {
        return RGBColor(23, 190, 207);
    }
    let method = case.strip_prefix("host ").unwrap_or(case);
    if method.starts_with("fdatasync") {
        RGBColor(30, 30, 30)
    } else if method.starts_with("fsync") {
        RGBColor(148, 103, 189)
    } else if method.starts_with("msync") {
        RGBColor(140, 86, 75)
    } else {
        PALETTE[3 + index % 3]
    }
}

struct LegendEntry {
    label: String,
    color: RGBColor,
    dashed: bool,
}

fn text_style(size: u32, color: RGBColor, h_pos: HPos) -> TextStyle<'static> {
    TextStyle {
        font: ("sans-serif", size).into_font(),
        color: color.to_backend_color(),
        pos: Pos::new(h_pos, VPos::Center),
    }
}

/// A title and a smaller line under it, centred.
fn draw_heading<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    subtitle: &str,
) -> Result<(), ReportError> {
    let (w, _) = area.dim_in_pixel();
    area.draw(&Text::new(
        title,
        (w as i32 / 2, 26),
        text_style(26, BLACK, HPos::Center),
    ))
    .map_err(draw_err)?;
    area.draw(&Text::new(
        subtitle,
        (w as i32 / 2, 58),
        text_style(16, RGBColor(80, 80, 80), HPos::Center),
    ))
    .map_err(draw_err)?;
    Ok(())
}

fn draw_legend_mark<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entry: &LegendEntry,
    (x, y): (i32, i32),
) -> Result<(), ReportError> {
    let line = vec![(x, y), (x + 32, y)];
    if entry.dashed {
        area.draw(&DashedPathElement::new(
            line,
            6,
            5,
            entry.color.stroke_width(1),
        ))
    } else {
        area.draw(&PathElement::new(line, entry.color.stroke_width(3)))
    }
    .map_err(draw_err)?;
    area.draw(&Text::new(
        entry.label.clone(),
        (x + 40, y),
        text_style(17, BLACK, HPos::Left),
    ))
    .map_err(draw_err)
}

/// Legend entries side by side, centred in the strip.
fn draw_legend_row<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<(), ReportError> {
    let (w, h) = area.dim_in_pixel();
    // About 9 px a character at this size, plus the mark and a gap.
    let widths: Vec<i32> = entries
        .iter()
        .map(|e| 40 + 9 * e.label.chars().count() as i32 + 36)
        .collect();
    let mut x = (w as i32 - widths.iter().sum::<i32>()).max(0) / 2;
    for (entry, width) in entries.iter().zip(widths) {
        draw_legend_mark(area, entry, (x, h as i32 / 2))?;
        x += width;
    }
    Ok(())
}

/// Legend entries one under another, from the top of the area.
fn draw_legend_column<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<(), ReportError> {
    for (i, entry) in entries.iter().enumerate() {
        draw_legend_mark(area, entry, (10, 40 + 30 * i as i32))?;
    }
    Ok(())
}

/// `pmemvm report`: prints the summary and writes the SVG if asked.
pub fn run(json: &Path, svg: Option<&Path>) -> Result<String, ReportError> {
    let report = load(json)?;
    let mut out = report.summary();
    if let Some(path) = svg {
        let text = report.svg()?;
        std::fs::write(path, text).map_err(|source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        let _ = writeln!(out, "figure written to {}", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two engines at 2 GHz (2 ticks a ns): a calibration step, two
    /// events and a flush, as `bench faults` writes them.
    fn faults_json(tsc_khz: u32) -> String {
        let step = |event: &str, ticks: &[u64]| {
            serde_json::json!({
                "event": if event.is_empty() { serde_json::Value::Null } else { event.into() },
                "calibration": event.is_empty(),
                "ticks": ticks,
            })
        };
        let run = |engine: &str, slow: u64| {
            serde_json::json!({
                "engine": engine,
                "repeat": 0,
                "tsc_khz": tsc_khz,
                "steps": [
                    step("", &[]),
                    step("first_read", &[2000 * slow, 2100 * slow, 2200 * slow, 90_000]),
                    step("first_write", &[4000 * slow, 4100 * slow, 4300 * slow]),
                    step("flush", &[1_000_000]),
                ],
            })
        };
        let row = |engine: &str, event: &str| {
            serde_json::json!({
                "engine": engine, "event": event, "samples": 3, "p50_ns": 1050,
                "p99_ns": 45000, "mean_ns": 1100.5, "max_ns": 45000,
                "per_second": 908_677.0, "kvm_per_sample": {"pf_taken": 1.0},
            })
        };
        serde_json::json!({
            "bench": "faults",
            "config": {"engines": ["kernel", "uffd"], "ops": ["read"], "pattern": "seq",
                       "pages": 3, "populate": null, "backing": "ext4", "repeat": 1, "seed": 1},
            "host": {"kind": "test", "kernel": "6.1"},
            "summary": [row("kernel", "first_read"), row("uffd", "mkwrite")],
            "skipped_engines": [{"engine": "prefault", "reason": "not built"}],
            "runs": [run("kernel", 1), run("uffd", 10)],
        })
        .to_string()
    }

    fn flush_json() -> String {
        let row = |case: &str, dirty: u64, p50_ns: u64| {
            serde_json::json!({
                "case": case, "dirty": dirty, "samples": 3, "p50_ns": p50_ns,
                "p99_ns": p50_ns * 3, "mean_ns": p50_ns as f64, "max_ns": p50_ns * 3,
                "p50_vs_fdatasync": 1.0, "writeback_pages": null, "region_pages": 4096,
                "spread": {"median_p50_ns": p50_ns, "min_p50_ns": p50_ns / 2,
                           "max_p50_ns": p50_ns * 2, "percent": 150.0},
            })
        };
        serde_json::json!({
            "bench": "flush",
            "config": {"engines": ["kernel"], "dirty": [0, 1, 64], "layout": "contiguous",
                       "region_pages": [4096], "populate": null, "backing": "tmpfs",
                       "rounds": 3, "repeat": 3},
            "host": {"kind": "test", "kernel": "6.1"},
            "summary": [
                row("probe kernel", 0, 20_000), row("host fdatasync", 0, 5_000),
                row("probe kernel", 1, 30_000), row("host fdatasync", 1, 800_000),
                row("probe kernel", 64, 90_000), row("host fdatasync", 64, 2_000_000),
            ],
            "skipped_engines": [],
            "probe_runs": [],
            "host_syncs": [],
        })
        .to_string()
    }

    /// The text of every <text> element of an SVG.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    fn parse_str(text: &str) -> Result<Report, ReportError> {
        parse(Path::new("test.json"), text)
    }

    #[test]
    fn crash_report_is_summarised_and_drawn_with_its_losses() {
        use super::super::crash::bench::{CrashSeries, RoundRecord};
        use super::super::crash::RoundCheck;
        let round = |i: u32, acked: u64, lost: u64| RoundRecord {
            round: i,
            seed: 7,
            delay_us: 100,
            round_us: 40_000,
            check: RoundCheck {
                acked,
                intact: acked + 3,
                lost,
                ..RoundCheck::default()
            },
            syncs: 4,
            pages_synced: 9,
            full_vcpus: 0,
            flushes: 5,
        };
        let report = CrashReport {
            bench: "crash".into(),
            vcpus: 2,
            seed: 1,
            region_pages: 4096,
            max_delay_us: 40_000,
            flush_mask: 15,
            series: vec![
                CrashSeries {
                    engine: "kernel".into(),
                    end: CrashEnd::Kill,
                    rounds: vec![round(0, 900, 0), round(1, 0, 0)],
                    stalled: 1,
                },
                CrashSeries {
                    engine: "uffd".into(),
                    end: CrashEnd::Cut,
                    rounds: vec![round(0, 500, 2), round(1, 700, 0)],
                    stalled: 0,
                },
            ],
            failures: vec!["pmemvm bench crash --engine uffd --end cut --first-round 0".into()],
            elapsed_s: 1.0,
        };
        let parsed = parse_str(&serde_json::to_string(&report).unwrap()).unwrap();
        let text = parsed.summary();
        assert!(text.contains("kernel     kill"), "{text}");
        assert!(
            text.contains("LOST: pmemvm bench crash --engine uffd"),
            "{text}"
        );
        let svg = parsed.svg().unwrap();
        assert!(
            svg.contains("2 of 2100 acknowledged records lost in 4 rounds"),
            "{svg}"
        );
    }

    #[test]
    fn faults_report_is_summarised_and_drawn() {
        let report = parse_str(&faults_json(2_000_000)).unwrap();
        let summary = report.summary();
        assert!(summary.contains("3 pages per op, pattern seq"), "{summary}");
        assert!(summary.contains("first read"), "{summary}");
        assert!(summary.contains("mkwrite (write after read)"), "{summary}");
        // The bench's own table: p50 1050 ns, per second 908.7 k.
        assert!(summary.contains("1050 ns"), "{summary}");
        assert!(summary.contains("908.7 k"), "{summary}");
        assert!(summary.contains("skipped engine prefault"), "{summary}");

        let svg = report.svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let texts = svg_texts(&svg);
        for wanted in [
            "engine kernel",
            "engine uffd",
            "first read (8 samples)",
            "first write (6 samples)",
            "latency (log scale)",
        ] {
            assert!(texts.iter().any(|t| t == wanted), "{wanted}: {texts:?}");
        }
        // Flushes are too few for a histogram; calibration steps have none.
        assert!(!texts.iter().any(|t| t.starts_with("flush")), "{texts:?}");
        assert!(texts.iter().any(|t| t.ends_with(" µs")), "{texts:?}");
    }

    #[test]
    fn fault_ticks_become_ns_through_tsc_khz() {
        let Report::Faults(report) = parse_str(&faults_json(2_000_000)).unwrap() else {
            panic!("not a faults report");
        };
        let panels = report.panels();
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["first read", "first write"]);
        let (engine, ns) = &panels[0].series[0];
        assert_eq!(engine, "kernel");
        assert_eq!(ns, &[1000.0, 1050.0, 1100.0, 45_000.0]);
        assert_eq!(panels[0].series[1].0, "uffd");
    }

    #[test]
    fn log_bins_hold_every_sample() {
        let edges = log_bin_edges(100.0, 100_000.0);
        assert_eq!(edges.len(), 3 * 24 + 1);
        assert!((edges[0] - 100.0).abs() < 1e-9);
        assert!((edges[edges.len() - 1] - 100_000.0).abs() < 1e-6);
        assert!(edges.windows(2).all(|w| w[1] > w[0]));
        // Below, at and above the range, all counted.
        let shares = bin_shares(&[0.0, 100.0, 1000.0, 100_000.0, 1e9], &edges);
        assert!((shares.iter().sum::<f64>() - 100.0).abs() < 1e-9);
        assert_eq!(shares[0], 40.0);
        assert_eq!(shares[shares.len() - 1], 40.0);
        assert_eq!(shares[24], 20.0);
        // One value still gets a range of its own.
        let edges = log_bin_edges(50.0, 50.0);
        assert_eq!(edges.len(), 13);
        assert!(edges[0] < 50.0 && edges[12] > 50.0);
    }

    #[test]
    fn log_axis_keeps_two_labelled_decades() {
        assert_eq!(log_axis(20.0, 600.0), (10.0, 1000.0));
        assert_eq!(log_axis(1.5, 1.7), (1.0, 10.0));
        let (lo, hi) = log_axis(30_000.0, 40_000_000.0);
        assert!((lo - 30_000.0 / 1.3).abs() < 1e-6 && (hi - 52_000_000.0).abs() < 1e-3);
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.99), Some(5.0));
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.5), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn flush_report_is_summarised_and_drawn() {
        let report = parse_str(&flush_json()).unwrap();
        let summary = report.summary();
        assert!(
            summary.contains("layout contiguous, backing tmpfs"),
            "{summary}"
        );
        assert!(summary.contains("region 16 MiB (4096 pages)"), "{summary}");
        assert!(summary.contains("150.0%!"), "{summary}");
        assert!(summary.contains("host fdatasync"), "{summary}");
        // The bench's own table, in µs: p50 2 ms at 64 dirty pages.
        assert!(summary.contains("2000.0"), "{summary}");

        let texts = svg_texts(&report.svg().unwrap());
        for wanted in [
            "probe kernel",
            "host fdatasync",
            // Dirty counts are the ticks, 0 among them.
            "0",
            "1",
            "64",
        ] {
            assert!(texts.iter().any(|t| t == wanted), "{wanted}: {texts:?}");
        }
        assert!(texts.iter().any(|t| t == "1 ms"), "{texts:?}");
    }

    #[test]
    fn a_region_sweep_is_drawn_by_region_size() {
        let mut v: serde_json::Value = serde_json::from_str(&flush_json()).unwrap();
        v["config"]["region_pages"] = serde_json::json!([4096, 1_048_576]);
        let rows = v["summary"].as_array().unwrap().clone();
        let mut big = rows.clone();
        for r in &mut big {
            r["region_pages"] = 1_048_576.into();
        }
        v["summary"] = rows.into_iter().chain(big).collect();
        let report = parse_str(&v.to_string()).unwrap();
        assert!(report.summary().contains("region 4096 MiB (1048576 pages)"));
        let texts = svg_texts(&report.svg().unwrap());
        for wanted in [
            "pmemvm bench flush: flush latency (p50) by region size",
            "probe kernel, 1 dirty",
            "host fdatasync, 64 dirty",
            "16",
            "4096",
        ] {
            assert!(texts.iter().any(|t| t == wanted), "{wanted}: {texts:?}");
        }
    }

    #[test]
    fn bad_input_gives_its_own_error() {
        let missing = std::env::temp_dir().join("pmemvm-report-test-no-such-file.json");
        let err = load(&missing).unwrap_err();
        assert!(matches!(err, ReportError::Read { .. }), "{err}");
        assert!(err.to_string().contains("no-such-file"), "{err}");

        let err = parse_str("{\"bench\": ").unwrap_err();
        assert!(matches!(err, ReportError::Json { .. }), "{err}");
        let err = parse_str("[1, 2]").unwrap_err();
        assert!(matches!(err, ReportError::NoBenchKind { .. }), "{err}");
        let err = parse_str(r#"{"bench": "boot"}"#).unwrap_err();
        assert!(
            matches!(&err, ReportError::UnknownBench { kind, .. } if kind == "boot"),
            "{err}"
        );
        let err = parse_str(r#"{"bench": "flush", "summary": []}"#).unwrap_err();
        assert!(
            matches!(err, ReportError::Shape { kind: "flush", .. }),
            "{err}"
        );
        let err = parse_str(&faults_json(0)).unwrap_err();
        assert!(matches!(err, ReportError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("tsc_khz 0"), "{err}");

        // Read, but nothing in it to draw.
        let mut empty: serde_json::Value = serde_json::from_str(&faults_json(1)).unwrap();
        empty["runs"] = serde_json::json!([]);
        let report = parse_str(&empty.to_string()).unwrap();
        let err = report.svg().unwrap_err();
        assert!(matches!(err, ReportError::NothingToDraw(_)), "{err}");
    }

    #[test]
    fn run_writes_the_figure() {
        let dir = std::env::temp_dir().join(format!("pmemvm-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("flush.json");
        let svg = dir.join("flush.svg");
        std::fs::write(&json, flush_json()).unwrap();
        let out = run(&json, Some(&svg)).unwrap();
        assert!(out.contains("figure written to"), "{out}");
        let drawn = std::fs::read_to_string(&svg).unwrap();
        assert!(drawn.contains("probe kernel"));
        let err = run(&json, Some(&dir.join("no-dir/flush.svg"))).unwrap_err();
        assert!(matches!(err, ReportError::Write { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
