//! The run report page: `report.html`, one self-contained file drawn from what a run directory
//! holds, to look at a run instead of reading its JSON.
//!
//! It needs nothing to be viewed: no script, no style sheet, font or image from elsewhere. The
//! plots are inline SVG drawn with `plotters` (its SVG backend writes `<text>` elements, so the
//! browser lays out the labels and no font is bundled).
//!
//! What it reads, all optional except that a run directory must hold one of the first two:
//! - `report.json`: the table (teachers, ensemble, baseline, distilled student), the run's
//!   figures, per-member latency and failures, rows per worker;
//! - `metrics.jsonl`: per epoch, the loss, and the cumulative samples, seconds, wait, step time
//!   and rounds from which samples/s, the wait fraction and rounds per epoch are drawn;
//! - `evals.jsonl`: the coordinator's score of each epoch's closing average (runs with rounds
//!   and `eval_every_epoch`);
//! - `baseline.jsonl`: the hard-label baseline's per-epoch loss and test errors (`distill demo`);
//! - `config.toml`: the resolved config, shown as it is.
//!
//! A line that does not parse is an error naming the file and the line: a report that silently
//! skipped data would draw a curve that is not the run's. With several runs
//! ([`write_comparison`]) the curves are overlaid, one colour per run, and each run gets its own
//! section below.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;

use crate::domain::report::RunReport;
use crate::error::{Error, Result};

/// The page's file name in a run directory.
pub const REPORT_HTML: &str = "report.html";

/// One line of `metrics.jsonl` (as the driver writes it; fields added later default to 0).
#[derive(Debug, Clone, Deserialize)]
pub struct EpochRecord {
    /// The epoch completed (0-based).
    pub epoch: u32,
    /// Mean acked loss over it.
    pub mean_loss: f64,
    /// Rows acked so far.
    pub samples: u64,
    /// Seconds since the first batch was sent.
    pub seconds: f64,
    /// Seconds workers waited for batches, so far.
    pub student_wait_seconds: f64,
    /// Seconds workers spent training, so far.
    #[serde(default)]
    pub student_step_seconds: f64,
    /// Rounds closed, so far.
    #[serde(default)]
    pub rounds: u64,
}

/// One line of `evals.jsonl`: an epoch's closing average scored on the test split.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalRecord {
    /// The epoch (0-based).
    pub epoch: u32,
    /// Test errors.
    pub test_errors: u64,
}

/// One line of `baseline.jsonl`: the hard-label baseline after an epoch.
#[derive(Debug, Clone, Deserialize)]
pub struct BaselineRecord {
    /// The epoch (1-based, as the local trainer counts).
    pub epoch: u32,
    /// Mean training loss.
    pub mean_loss: f64,
    /// Test errors after the epoch.
    pub test_errors: Option<u64>,
}

/// What one run directory holds for the page.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The directory.
    pub dir: PathBuf,
    /// Its name on the page (the directory's last component).
    pub name: String,
    /// `report.json`, once the run completed.
    pub report: Option<RunReport>,
    /// `metrics.jsonl`, one record per epoch (the last line of an epoch counts, after a resume).
    pub epochs: Vec<EpochRecord>,
    /// `evals.jsonl`, likewise.
    pub evals: Vec<EvalRecord>,
    /// `baseline.jsonl`.
    pub baseline: Vec<BaselineRecord>,
    /// `config.toml`.
    pub config: Option<String>,
}

impl RunFiles {
    /// Reads what `dir` holds; an error when it holds neither `report.json` nor
    /// `metrics.jsonl`, or when a file does not parse (naming the file and line).
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Report(format!(
                "{}: not a directory (expected a run directory)",
                dir.display()
            )));
        }
        let report = match read_optional(&dir.join("report.json"))? {
            Some(text) => Some(serde_json::from_str::<RunReport>(&text).map_err(|e| {
                Error::Report(format!("{}: {e}", dir.join("report.json").display()))
            })?),
            None => None,
        };
        let mut epochs: Vec<EpochRecord> = read_lines(&dir.join("metrics.jsonl"))?;
        if report.is_none() && epochs.is_empty() {
            return Err(Error::Report(format!(
                "{}: not a run directory (it holds neither report.json nor metrics.jsonl)",
                dir.display()
            )));
        }
        keep_last_per_epoch(&mut epochs, |r| r.epoch);
        let mut evals: Vec<EvalRecord> = read_lines(&dir.join("evals.jsonl"))?;
        keep_last_per_epoch(&mut evals, |r| r.epoch);
        let mut baseline: Vec<BaselineRecord> = read_lines(&dir.join("baseline.jsonl"))?;
        keep_last_per_epoch(&mut baseline, |r| r.epoch);
        let config = read_optional(&dir.join("config.toml"))?;
        let name = dir
            .canonicalize()
            .ok()
            .as_deref()
            .unwrap_or(dir)
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            report,
            epochs,
            evals,
            baseline,
            config,
        })
    }
}

/// Draws `dir`'s own page into `dir/report.html`; its path.
pub fn write_for_run(dir: &Path) -> Result<PathBuf> {
    let run = RunFiles::read(dir)?;
    let path = dir.join(REPORT_HTML);
    write_page(&path, &render(std::slice::from_ref(&run)))?;
    Ok(path)
}

/// Draws one page comparing `runs` (their curves overlaid) into `out`.
pub fn write_comparison(runs: &[RunFiles], out: &Path) -> Result<()> {
    write_page(out, &render(runs))
}

fn write_page(path: &Path, html: &str) -> Result<()> {
    distill_core::fsutil::atomic_write(path, html.as_bytes())?;
    Ok(())
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// The JSON lines of `path` (none when it does not exist). A torn last line (a crash while it
/// was appended) is skipped with a warning; any other bad line is an error.
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let Some(text) = read_optional(path)? else {
        return Ok(Vec::new());
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(v) => out.push(v),
            Err(e) if i + 1 == lines.len() && !text.ends_with('\n') => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a torn last line");
            }
            Err(e) => {
                return Err(Error::Report(format!(
                    "{} line {}: {e}",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(out)
}

/// Sorts by epoch and keeps the last record of each (a resumed run writes an epoch again).
fn keep_last_per_epoch<T>(v: &mut Vec<T>, epoch: impl Fn(&T) -> u32) {
    let mut by_epoch = std::collections::BTreeMap::new();
    for r in v.drain(..) {
        by_epoch.insert(epoch(&r), r);
    }
    v.extend(by_epoch.into_values());
}

/// Text safe inside HTML and SVG text and attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A label for plotters, which writes it into the SVG as it is: markup characters dropped.
fn label(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '&' | '<' | '>' | '"' | '\''))
        .collect()
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}\
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;\
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.9em;color:#555}\
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}.note{color:#777}";

/// A sweep's page (`distill sweep`): a bar per configuration of its `measure` (the baseline
/// among them), then the table (`headers`, `rows`: one per configuration, cells as text).
pub fn sweep_page(
    title: &str,
    measure: &str,
    bars: &[(String, f64)],
    headers: &[&str],
    rows: &[Vec<String>],
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(title),
        esc(title)
    );
    let categories: Vec<String> = bars.iter().map(|(c, _)| c.clone()).collect();
    let values: Vec<f64> = bars.iter().map(|(_, v)| *v).collect();
    h.push_str(&bar_plot(
        measure,
        measure,
        &categories,
        &[(measure, values)],
    ));
    h.push_str("<table><tr>");
    for c in headers {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>\n");
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td>{}</td>", esc(c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

/// The whole page.
pub fn render(runs: &[RunFiles]) -> String {
    let mut h = String::new();
    let title = match runs {
        [one] => format!("distill run {}", one.name),
        _ => format!("distill: {} runs compared", runs.len()),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    h.push_str("<p>Runs: ");
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            h,
            "{}<span style=\"color:{}\">&#9632;</span> {} <span class=\"note\">({})</span>",
            if i > 0 { ", " } else { "" },
            css_colour(i),
            esc(&r.name),
            esc(&r.dir.display().to_string())
        );
    }
    h.push_str("</p>\n<h2>Curves</h2>\n");
    for fig in curves(runs) {
        h.push_str(&fig);
    }
    for (i, r) in runs.iter().enumerate() {
        run_section(&mut h, i, r);
    }
    h.push_str("</body></html>\n");
    h
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn css_colour(i: usize) -> String {
    let RGBColor(r, g, b) = colour(i);
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// One line of a plot: its label, run index (the colour), dashed or not, and points.
struct Series {
    label: String,
    run: usize,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// The per-epoch curves drawn over time, from the differences of `metrics.jsonl`'s cumulative
/// figures.
#[derive(Debug, Default, PartialEq)]
struct Rates {
    /// (seconds, wait / (wait + step)) of epochs in which the student stepped.
    wait: Vec<(f64, f64)>,
    /// (seconds, samples/s) of epochs that took time.
    speed: Vec<(f64, f64)>,
    /// (epoch from 1, rounds in it).
    rounds: Vec<(f64, f64)>,
}

fn per_epoch_rates(epochs: &[EpochRecord]) -> Rates {
    let mut out = Rates::default();
    let mut prev: Option<&EpochRecord> = None;
    for e in epochs {
        let (dt, ds, dw, dstep, dr) = match prev {
            Some(p) => (
                e.seconds - p.seconds,
                e.samples.saturating_sub(p.samples) as f64,
                e.student_wait_seconds - p.student_wait_seconds,
                e.student_step_seconds - p.student_step_seconds,
                e.rounds.saturating_sub(p.rounds) as f64,
            ),
            None => (
                e.seconds,
                e.samples as f64,
                e.student_wait_seconds,
                e.student_step_seconds,
                e.rounds as f64,
            ),
        };
        if dw + dstep > 0.0 && dstep > 0.0 {
            out.wait.push((e.seconds, dw / (dw + dstep)));
        }
        if dt > 0.0 {
            out.speed.push((e.seconds, ds / dt));
        }
        out.rounds.push((f64::from(e.epoch) + 1.0, dr));
        prev = Some(e);
    }
    out
}

/// The overlaid curves, one `<figure>` each.
fn curves(runs: &[RunFiles]) -> Vec<String> {
    let many = runs.len() > 1;
    let name = |r: &RunFiles, what: &str| {
        if many {
            format!("{} {what}", r.name)
        } else {
            what.to_string()
        }
    };
    let mut loss = Vec::new();
    let mut errors = Vec::new();
    let mut wait = Vec::new();
    let mut speed = Vec::new();
    let mut rounds = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        loss.push(Series {
            label: name(r, "distilled"),
            run: i,
            dashed: false,
            points: r
                .epochs
                .iter()
                .map(|e| (f64::from(e.epoch) + 1.0, e.mean_loss))
                .collect(),
        });
        errors.push(Series {
            label: name(r, "distilled"),
            run: i,
            dashed: false,
            points: r
                .evals
                .iter()
                .map(|e| (f64::from(e.epoch) + 1.0, e.test_errors as f64))
                .collect(),
        });
        if !r.baseline.is_empty() {
            loss.push(Series {
                label: name(r, "baseline (hard labels)"),
                run: i,
                dashed: true,
                points: r
                    .baseline
                    .iter()
                    .map(|b| (f64::from(b.epoch), b.mean_loss))
                    .collect(),
            });
            errors.push(Series {
                label: name(r, "baseline (hard labels)"),
                run: i,
                dashed: true,
                points: r
                    .baseline
                    .iter()
                    .filter_map(|b| Some((f64::from(b.epoch), b.test_errors? as f64)))
                    .collect(),
            });
        }
        let Rates {
            wait: w,
            speed: s,
            rounds: k,
        } = per_epoch_rates(&r.epochs);
        let series = |points| Series {
            label: r.name.clone(),
            run: i,
            dashed: false,
            points,
        };
        wait.push(series(w));
        speed.push(series(s));
        rounds.push(series(k));
    }
    let mut figs = vec![
        line_plot(
            "Training loss per epoch",
            "epoch",
            "mean loss",
            &loss,
            "no epoch has completed yet",
        ),
        line_plot(
            "Test errors per epoch",
            "epoch",
            "test errors",
            &errors,
            "no per-epoch scores: the coordinator scores an epoch's student only with [sync] \
             rounds (whose averages it holds) and eval_every_epoch",
        ),
        line_plot(
            "Student wait fraction over time",
            "seconds since the first batch",
            "wait / (wait + step)",
            &wait,
            "no timing per epoch in metrics.jsonl",
        ),
        line_plot(
            "Training samples per second over time",
            "seconds since the first batch",
            "samples/s (per epoch)",
            &speed,
            "no timing per epoch in metrics.jsonl",
        ),
    ];
    if rounds.iter().any(|s| s.points.iter().any(|p| p.1 > 0.0)) {
        figs.push(line_plot(
            "Synchronisation rounds per epoch",
            "epoch",
            "rounds",
            &rounds,
            "",
        ));
    }
    figs
}

const W: u32 = 520;
const H: u32 = 320;

fn figure(caption: &str, svg: &str) -> String {
    format!(
        "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
        esc(caption)
    )
}

fn empty_figure(caption: &str, why: &str) -> String {
    format!(
        "<figure><figcaption>{}</figcaption><p class=\"note\">{}</p></figure>\n",
        esc(caption),
        esc(why)
    )
}

/// Axis bounds holding every value, padded so a flat series is still drawable.
fn bounds(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if from_zero { lo } else { lo - pad }, hi + pad)
}

fn line_plot(caption: &str, x_desc: &str, y_desc: &str, series: &[Series], why: &str) -> String {
    let points = || series.iter().flat_map(|s| s.points.iter());
    if points().next().is_none() {
        return empty_figure(caption, why);
    }
    let (x0, x1) = bounds(points().map(|p| p.0), false);
    let (y0, y1) = bounds(points().map(|p| p.1), true);
    let mut svg = String::new();
    let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc(label(x_desc))
            .y_desc(label(y_desc))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for s in series.iter().filter(|s| !s.points.is_empty()) {
            let c = colour(s.run);
            let style = c.stroke_width(2);
            let drawn = if s.dashed {
                chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 6, 4, style))?
            } else {
                chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?
            };
            drawn.label(label(&s.label)).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
            });
            chart.draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, colour(s.run).filled())),
            )?;
        }
        draw_legend(&mut chart)?;
        root.present()?;
        Ok(())
    })()
    .map_err(|e| e.to_string());
    finish(caption, &svg, drawn)
}

/// Bars per category, one group of `values.len()` bars (each a named measure) per category.
fn bar_plot(
    caption: &str,
    y_desc: &str,
    categories: &[String],
    measures: &[(&str, Vec<f64>)],
) -> String {
    if categories.is_empty() {
        return empty_figure(caption, "nothing to show");
    }
    let n = categories.len();
    let m = measures.len().max(1);
    let (_, y1) = bounds(measures.iter().flat_map(|(_, v)| v.iter().copied()), true);
    let mut svg = String::new();
    let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let cats: Vec<String> = categories.iter().map(|c| label(c)).collect();
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y1)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
                    cats[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(label(y_desc))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let width = 0.8 / m as f64;
        for (j, (name, values)) in measures.iter().enumerate() {
            let c = colour(j);
            chart
                .draw_series(values.iter().enumerate().map(|(i, &v)| {
                    let left = i as f64 - 0.4 + j as f64 * width;
                    Rectangle::new([(left, 0.0), (left + width * 0.9, v)], c.filled())
                }))?
                .label(label(name))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        }
        if m > 1 {
            draw_legend(&mut chart)?;
        }
        root.present()?;
        Ok(())
    })()
    .map_err(|e| e.to_string());
    finish(caption, &svg, drawn)
}

type Axis = plotters::coord::types::RangedCoordf64;
type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<Axis, Axis>>;
type DrawResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// The series' legend box, the same on every plot.
fn draw_legend(chart: &mut Chart<'_>) -> DrawResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
}

/// The figure of a drawing that worked, or the reason it did not.
fn finish(caption: &str, svg: &str, drawn: std::result::Result<(), String>) -> String {
    match drawn {
        Ok(()) => figure(caption, svg),
        Err(e) => empty_figure(caption, &format!("cannot draw: {e}")),
    }
}

fn run_section(h: &mut String, i: usize, r: &RunFiles) {
    let _ = writeln!(
        h,
        "<h2><span style=\"color:{}\">&#9632;</span> {}</h2>",
        css_colour(i),
        esc(&r.name)
    );
    let Some(rep) = &r.report else {
        h.push_str("<p class=\"note\">No report.json: the run has not completed.</p>\n");
        config_block(h, r);
        return;
    };
    let pct = |e: u64| 100.0 * e as f64 / rep.test_size.max(1) as f64;
    h.push_str("<table><tr><th>model</th><th>test errors</th><th>error %</th></tr>\n");
    let mut row = |what: String, e: u64| {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{e}</td><td>{:.2}%</td></tr>",
            esc(&what),
            pct(e)
        );
    };
    for t in &rep.teachers {
        row(format!("teacher {}", t.member), t.test_errors);
    }
    if let Some(e) = rep.ensemble_test_errors {
        row("ensemble (combined at T = 1)".into(), e);
    }
    if let Some(e) = rep.baseline_student_test_errors {
        row(format!("student {} on hard labels", rep.student_arch), e);
    }
    row(
        format!("student {} distilled", rep.student_arch),
        rep.student_test_errors,
    );
    h.push_str("</table>\n");
    let figures: Vec<(&str, String)> = vec![
        ("data", rep.data.clone()),
        ("test rows", rep.test_size.to_string()),
        ("temperature T", rep.temperature.to_string()),
        ("alpha", rep.alpha.to_string()),
        ("epochs", rep.epochs.to_string()),
        (
            "batches trained / expected",
            format!("{} / {}", rep.batches_trained, rep.batches_expected),
        ),
        ("run seconds", format!("{:.1}", rep.run_seconds)),
        ("training samples/s", format!("{:.0}", rep.samples_per_sec)),
        (
            "student wait fraction",
            format!("{:.1}%", 100.0 * rep.student_wait_fraction),
        ),
        ("requeued batches", rep.requeued_batches.to_string()),
        ("rolled-back batches", rep.rolled_back_batches.to_string()),
        ("teacher retries", rep.retries.to_string()),
        ("degraded batches", rep.degraded_batches.to_string()),
        ("resumes", rep.resumes.to_string()),
        ("synchronisation rounds", rep.sync.rounds.to_string()),
        (
            "soft-target cache hits / misses",
            rep.cache.as_ref().map_or("no cache".into(), |c| {
                format!("{} / {} rows", c.hit_rows, c.missed_rows)
            }),
        ),
    ];
    h.push_str("<table>\n");
    for (k, v) in figures {
        let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>\n");
    let members: Vec<String> = rep.members.iter().map(|m| m.member.clone()).collect();
    let mean_ms: Vec<f64> = rep
        .members
        .iter()
        .map(|m| 1e3 * m.total_latency_secs / (m.requests.max(1) as f64))
        .collect();
    let max_ms: Vec<f64> = rep
        .members
        .iter()
        .map(|m| 1e3 * m.max_latency_secs)
        .collect();
    h.push_str(&bar_plot(
        "Teacher latency per member",
        "milliseconds",
        &members,
        &[("mean", mean_ms), ("max", max_ms)],
    ));
    h.push_str(&bar_plot(
        "Teacher failures and hedges per member",
        "count",
        &members,
        &[
            (
                "failures",
                rep.members.iter().map(|m| m.failures as f64).collect(),
            ),
            (
                "hedged",
                rep.members
                    .iter()
                    .map(|m| m.hedged_requests as f64)
                    .collect(),
            ),
        ],
    ));
    let workers: Vec<String> = rep.workers.iter().map(|w| w.worker_id.clone()).collect();
    h.push_str(&bar_plot(
        "Training rows per worker",
        "rows",
        &workers,
        &[(
            "rows",
            rep.workers.iter().map(|w| w.samples as f64).collect(),
        )],
    ));
    config_block(h, r);
}

fn config_block(h: &mut String, r: &RunFiles) {
    if let Some(c) = &r.config {
        let _ = write!(h, "<h3>Resolved config</h3>\n<pre>{}</pre>\n", esc(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write fixture");
    }

    fn metrics(n: u32) -> String {
        (0..n)
            .map(|e| {
                let t = f64::from(e + 1);
                format!(
                    "{{\"epoch\":{e},\"mean_loss\":{},\"samples\":{},\"seconds\":{t},\
                     \"student_wait_seconds\":{},\"student_step_seconds\":{},\"rounds\":{}}}\n",
                    1.0 / t,
                    1000 * (e + 1),
                    0.1 * t,
                    0.9 * t,
                    3 * (e + 1)
                )
            })
            .collect()
    }

    #[test]
    fn a_run_directory_in_progress_draws_its_curves() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "metrics.jsonl", &metrics(4));
        write(
            dir.path(),
            "evals.jsonl",
            "{\"epoch\":0,\"test_errors\":50}\n{\"epoch\":1,\"test_errors\":40}\n",
        );
        write(dir.path(), "config.toml", "data = \"<synthetic>\"\n");
        let path = write_for_run(dir.path()).expect("page");
        let html = std::fs::read_to_string(path).expect("read page");
        // Loss, errors, wait, samples/s and rounds: five plots, a marker per point (4 epochs,
        // 2 scored).
        assert_eq!(html.matches("<svg").count(), 5, "{html}");
        assert_eq!(html.matches("<circle").count(), 4 + 2 + 4 + 4 + 4);
        assert!(html.contains("the run has not completed"));
        // The config is shown escaped, not as markup.
        assert!(html.contains("data = &quot;&lt;synthetic&gt;&quot;"));
        assert!(!html.contains("<synthetic>"));
    }

    #[test]
    fn per_epoch_figures_come_from_the_differences_of_the_cumulative_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Cumulative figures whose per-epoch differences differ from their running ratios.
        let lines = [
            (1000, 1.0, 0.5, 0.5, 2),
            (3000, 2.0, 0.5, 1.5, 2),
            (6000, 4.0, 1.5, 2.5, 5),
        ]
        .iter()
        .enumerate()
        .map(|(e, (n, t, w, st, k))| {
            format!(
                "{{\"epoch\":{e},\"mean_loss\":1.0,\"samples\":{n},\"seconds\":{t},\
                     \"student_wait_seconds\":{w},\"student_step_seconds\":{st},\"rounds\":{k}}}\n"
            )
        })
        .collect::<String>();
        write(dir.path(), "metrics.jsonl", &lines);
        let run = RunFiles::read(dir.path()).expect("read");
        let r = per_epoch_rates(&run.epochs);
        let near = |got: &[(f64, f64)], want: &[(f64, f64)]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9)
        };
        // Epoch 2: 2000 rows in 1 s, no wait; epoch 3: 3000 rows in 2 s, waiting 1 s of 2 s.
        assert!(
            near(&r.speed, &[(1.0, 1000.0), (2.0, 2000.0), (4.0, 1500.0)]),
            "{r:?}"
        );
        assert!(
            near(&r.wait, &[(1.0, 0.5), (2.0, 0.0), (4.0, 0.5)]),
            "{r:?}"
        );
        assert!(
            near(&r.rounds, &[(1.0, 2.0), (2.0, 0.0), (3.0, 3.0)]),
            "{r:?}"
        );
        let html = render(&[run]);
        assert!(html.contains("Synchronisation rounds per epoch"));
        assert!(html.contains("Student wait fraction over time"));
    }

    #[test]
    fn a_resumed_run_keeps_the_last_line_of_each_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = metrics(2);
        let again = m.lines().nth(1).expect("second").replace("0.5", "0.25");
        write(dir.path(), "metrics.jsonl", &format!("{m}{again}\n"));
        let run = RunFiles::read(dir.path()).expect("read");
        assert_eq!(run.epochs.len(), 2);
        assert_eq!(run.epochs[1].mean_loss, 0.25);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RunFiles::read(dir.path()).expect_err("empty dir");
        assert!(e.to_string().contains("not a run directory"), "{e}");
        let e = RunFiles::read(&dir.path().join("missing")).expect_err("missing dir");
        assert!(e.to_string().contains("not a directory"), "{e}");
        write(
            dir.path(),
            "metrics.jsonl",
            &format!("{}{{\"epoch\":\"x\"}}\n", metrics(1)),
        );
        let e = RunFiles::read(dir.path()).expect_err("bad line");
        assert!(e.to_string().contains("metrics.jsonl line 2"), "{e}");
        // A torn last line (no newline: the append was cut short) is skipped.
        write(
            dir.path(),
            "metrics.jsonl",
            &format!("{}{{\"epoch\":1,\"mean", metrics(1)),
        );
        assert_eq!(RunFiles::read(dir.path()).expect("torn").epochs.len(), 1);
        write(dir.path(), "report.json", "{\"data\": 1}");
        let e = RunFiles::read(dir.path()).expect_err("bad report");
        assert!(e.to_string().contains("report.json"), "{e}");
    }

    #[test]
    fn several_runs_overlay_their_curves_one_colour_each() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        write(a.path(), "metrics.jsonl", &metrics(3));
        write(b.path(), "metrics.jsonl", &metrics(5));
        let runs = [
            RunFiles::read(a.path()).expect("a"),
            RunFiles::read(b.path()).expect("b"),
        ];
        let out = a.path().join("compare.html");
        write_comparison(&runs, &out).expect("write");
        let html = std::fs::read_to_string(out).expect("read");
        let loss = html
            .split("<figure>")
            .find(|f| f.contains("Training loss per epoch"))
            .expect("loss figure");
        assert!(loss.contains(&css_colour(0).to_uppercase()[1..]));
        assert!(loss.contains(&css_colour(1).to_uppercase()[1..]));
        assert_eq!(loss.matches("<circle").count(), 3 + 5);
        assert!(html.contains("2 runs compared"));
    }

    #[test]
    fn markup_in_names_never_reaches_the_page_unescaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(label("a<b>&\"c'"), "abc");
        let svg = bar_plot("x", "y", &["<script>".to_string()], &[("m<", vec![1.0])]);
        assert!(!svg.contains("<script>"));
    }
}
