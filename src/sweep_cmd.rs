//! `distill sweep --config RUN.toml`: a grid of students (T × alpha, and optionally learning
//! rate, architecture and combination) trained from one filled cache, with no teacher asked.
//!
//! Every configuration is an offline run ([`coordinator::cache::CacheMode::Offline`]) of the
//! base config with its grid values, in its own run directory `OUT/<label>`, served by an
//! in-process coordinator with one in-process student worker; `--parallel N` runs N
//! configurations at once, each slot taking the next configuration when its own is done (the
//! configurations are leased to the slots like batches to workers). The soft targets of every
//! configuration are computed from the members' records in the cache (see
//! `coordinator::store::member_records`), so the teachers may be switched off: fill the cache
//! first with `distill cache fill --config RUN.toml`.
//!
//! A baseline, the same student trained on the hard labels alone (alpha = 0), is run too unless
//! `--no-baseline`. A sweep resumes like a run: a configuration whose run directory holds its
//! `report.json` is done and read back; one that was interrupted resumes from its stored state.
//!
//! Written into OUT: `sweep.json` (every configuration and its test errors), `table.md`,
//! `sweep.html` (a bar per configuration, the table), and `best/` (the best configuration's
//! `config.toml` and `student.safetensors`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use coordinator::RunConfig;
use coordinator::RunReport;
use coordinator::cache::CacheMode;
use distill_core::kd::Combine;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Flags of `distill sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// The base run config: data, student, members (names and weights: endpoints are not
    /// used) and a `[cache]` whose member records are complete.
    #[arg(long)]
    pub config: PathBuf,
    /// Temperatures of the grid.
    #[arg(long, value_delimiter = ',', default_value = "2,4,20")]
    pub temperatures: Vec<f64>,
    /// Soft-target weights of the grid.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9")]
    pub alphas: Vec<f64>,
    /// Learning rates of the grid (default: the config's).
    #[arg(long, value_delimiter = ',')]
    pub lrs: Vec<f64>,
    /// Student architectures of the grid (default: the config's).
    #[arg(long, value_delimiter = ',')]
    pub archs: Vec<String>,
    /// Combinations of the members' targets (`mean-prob`, `mean-logit`; default: the config's).
    #[arg(long, value_delimiter = ',')]
    pub combines: Vec<String>,
    /// Epochs of every configuration (default: the config's).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Configurations trained at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// The sweep's directory (default: the config's `run_dir` with `-sweep` appended).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the hard-labels-only baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

/// One configuration of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Its directory name under OUT.
    pub label: String,
    /// Temperature.
    pub temperature: f64,
    /// Soft-target weight (0 for the baseline).
    pub alpha: f64,
    /// Learning rate.
    pub lr: f64,
    /// Student architecture.
    pub arch: String,
    /// Combination.
    pub combine: String,
    /// The baseline (hard labels only).
    pub baseline: bool,
}

/// A configuration's result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The configuration.
    #[serde(flatten)]
    pub point: Point,
    /// Student test errors.
    pub test_errors: u64,
    /// Test rows.
    pub test_size: u64,
    /// Seconds this sweep spent on it (0 when read back from an earlier invocation).
    pub seconds: f64,
    /// Batches whose soft targets came from the teachers (0: the cache served everything).
    pub teacher_batches: u64,
}

/// The grid of `a` over `base`, the baseline first.
pub fn grid(a: &SweepArgs, base: &RunConfig) -> anyhow::Result<Vec<Point>> {
    let or = |v: &Vec<f64>, d: f64| if v.is_empty() { vec![d] } else { v.clone() };
    let lrs = or(&a.lrs, base.optim.lr);
    let archs = if a.archs.is_empty() {
        vec![base.student.arch.clone()]
    } else {
        a.archs.clone()
    };
    let combines = if a.combines.is_empty() {
        vec![base.combine.to_string()]
    } else {
        for c in &a.combines {
            c.parse::<Combine>()
                .map_err(|e| anyhow::anyhow!("--combines: {e}"))?;
        }
        a.combines.clone()
    };
    for &t in &a.temperatures {
        anyhow::ensure!(t.is_finite() && t > 0.0, "--temperatures: {t} is not > 0");
    }
    for &al in &a.alphas {
        anyhow::ensure!(
            (0.0..=1.0).contains(&al),
            "--alphas: {al} is not between 0 and 1"
        );
    }
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let mut points = Vec::new();
    for arch in &archs {
        for &lr in &lrs {
            let mut suffix = String::new();
            if lrs.len() > 1 {
                let _ = write!(suffix, "-lr{lr}");
            }
            if archs.len() > 1 {
                let _ = write!(suffix, "-{}", safe(arch));
            }
            if !a.no_baseline {
                points.push(Point {
                    label: format!("baseline{suffix}"),
                    temperature: 1.0,
                    alpha: 0.0,
                    lr,
                    arch: arch.clone(),
                    combine: base.combine.to_string(),
                    baseline: true,
                });
            }
            for combine in &combines {
                let csuffix = if combines.len() > 1 {
                    format!("-{combine}")
                } else {
                    String::new()
                };
                for &t in &a.temperatures {
                    for &alpha in &a.alphas {
                        points.push(Point {
                            label: format!("t{t}-a{alpha}{suffix}{csuffix}"),
                            temperature: t,
                            alpha,
                            lr,
                            arch: arch.clone(),
                            combine: combine.clone(),
                            baseline: false,
                        });
                    }
                }
            }
        }
    }
    Ok(points)
}

/// The run config of `p`: the base with its values, offline from the base's cache, in
/// `out/<label>`.
pub fn config_of(base: &RunConfig, p: &Point, out: &Path, epochs: Option<u32>) -> RunConfig {
    let mut cfg = base.clone();
    cfg.run_dir = out.join(&p.label);
    cfg.temperature = p.temperature;
    cfg.alpha = p.alpha;
    cfg.optim.lr = p.lr;
    cfg.student.arch = p.arch.clone();
    cfg.combine = p.combine.parse().unwrap_or(base.combine);
    if let Some(e) = epochs {
        cfg.epochs = e;
    }
    if let Some(c) = cfg.cache.as_mut() {
        c.mode = CacheMode::Offline;
    }
    // The members name the records and weigh them; nobody is dialled.
    for m in &mut cfg.members {
        m.endpoints.clear();
        m.trusted.clear();
    }
    cfg
}

/// Runs `distill sweep`.
pub fn run(a: SweepArgs) -> anyhow::Result<()> {
    let base = RunConfig::from_file(&a.config)?;
    anyhow::ensure!(
        base.cache.is_some(),
        "{}: a sweep trains from the cache: add a `[cache]` and fill it with `distill cache fill`",
        a.config.display()
    );
    let out = a.out.clone().unwrap_or_else(|| {
        let mut name = base.run_dir.as_os_str().to_os_string();
        name.push("-sweep");
        PathBuf::from(name)
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let points = grid(&a, &base)?;
    println!(
        "sweep of {} configurations in {} ({} at a time)",
        points.len(),
        out.display(),
        a.parallel.max(1)
    );
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    // The signal handlers are tasks of the runtime.
    let shutdown = {
        let _in = rt.enter();
        distill_shutdown::on_signal()
    };
    let outcomes = rt.block_on(sweep(&base, &points, &out, &a, shutdown))?;
    write_results(&out, &outcomes)?;
    let best = best_of(&outcomes);
    if let Some(b) = best {
        keep_best(&out, b)?;
    }
    println!(
        "sweep done in {:.0} s; table in {}, page in {}",
        started.elapsed().as_secs_f64(),
        out.join("table.md").display(),
        out.join("sweep.html").display()
    );
    if let Some(b) = best {
        println!(
            "best: T = {}, alpha = {}: {} test errors; kept in {}",
            b.point.temperature,
            b.point.alpha,
            b.test_errors,
            out.join("best").display()
        );
    }
    Ok(())
}

/// Trains every configuration (those already done are read back), `a.parallel` at a time.
async fn sweep(
    base: &RunConfig,
    points: &[Point],
    out: &Path,
    a: &SweepArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<Outcome>> {
    let queue = Arc::new(Mutex::new(
        points.iter().cloned().enumerate().collect::<VecDeque<_>>(),
    ));
    let results = Arc::new(Mutex::new(vec![None; points.len()]));
    let total = points.len();
    let mut slots = tokio::task::JoinSet::new();
    for _ in 0..a.parallel.max(1) {
        let (queue, results, shutdown) = (queue.clone(), results.clone(), shutdown.clone());
        let (base, out, epochs) = (base.clone(), out.to_path_buf(), a.epochs);
        slots.spawn(async move {
            loop {
                if shutdown.is_cancelled() {
                    anyhow::bail!("stopped; run the sweep again to resume");
                }
                let Some((i, p)) = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("queue lock"))?
                    .pop_front()
                else {
                    return Ok(());
                };
                let cfg = config_of(&base, &p, &out, epochs);
                let outcome = train_one(cfg, &p, shutdown.child_token())
                    .await
                    .with_context(|| format!("configuration {}", p.label))?;
                let mut r = results
                    .lock()
                    .map_err(|_| anyhow::anyhow!("results lock"))?;
                r[i] = Some(outcome.clone());
                let done = r.iter().filter(|o| o.is_some()).count();
                println!(
                    "[{done}/{total}] {:<14} {:>5} test errors ({:.2}%){}",
                    p.label,
                    outcome.test_errors,
                    100.0 * outcome.test_errors as f64 / outcome.test_size.max(1) as f64,
                    if outcome.seconds > 0.0 {
                        format!(" in {:.0} s", outcome.seconds)
                    } else {
                        " (done earlier)".into()
                    }
                );
            }
        });
    }
    while let Some(r) = slots.join_next().await {
        if let Err(e) = r.context("sweep slot")? {
            shutdown.cancel();
            while slots.join_next().await.is_some() {}
            return Err(e);
        }
    }
    let results = results
        .lock()
        .map_err(|_| anyhow::anyhow!("results lock"))?;
    results
        .iter()
        .cloned()
        .collect::<Option<Vec<_>>>()
        .context("a configuration did not finish")
}

/// One configuration: read back when its run directory holds a report, else trained.
async fn train_one(
    cfg: RunConfig,
    p: &Point,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    let report_file = cfg.run_dir.join("report.json");
    let outcome = |r: &RunReport, seconds: f64| Outcome {
        point: p.clone(),
        test_errors: r.student_test_errors,
        test_size: r.test_size,
        seconds,
        teacher_batches: r.teacher_batches_per_epoch.iter().sum(),
    };
    if let Ok(bytes) = std::fs::read(&report_file) {
        let r: RunReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a run report", report_file.display()))?;
        return Ok(outcome(&r, 0.0));
    }
    let started = Instant::now();
    let work = cfg.run_dir.join("work");
    let done = crate::local::serve_with_workers(cfg, 1, work, None, shutdown).await?;
    Ok(outcome(&done.report, started.elapsed().as_secs_f64()))
}

/// The distilled configuration with the fewest test errors (the first of equals).
pub fn best_of(outcomes: &[Outcome]) -> Option<&Outcome> {
    outcomes
        .iter()
        .filter(|o| !o.point.baseline)
        .min_by_key(|o| o.test_errors)
}

fn pct(o: &Outcome) -> String {
    format!(
        "{:.2}",
        100.0 * o.test_errors as f64 / o.test_size.max(1) as f64
    )
}

/// `sweep.json`, `table.md` and `sweep.html`.
fn write_results(out: &Path, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        distill_core::fsutil::atomic_write(&p, bytes)
            .with_context(|| format!("writing {}", p.display()))
    };
    write("sweep.json", &serde_json::to_vec_pretty(outcomes)?)?;
    write("table.md", table_md(outcomes).as_bytes())?;
    let headers = [
        "configuration",
        "T",
        "alpha",
        "lr",
        "student",
        "combine",
        "test errors",
        "error %",
        "seconds",
        "teacher batches",
    ];
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let p = &o.point;
            vec![
                p.label.clone(),
                if p.baseline {
                    "–".into()
                } else {
                    p.temperature.to_string()
                },
                p.alpha.to_string(),
                p.lr.to_string(),
                p.arch.clone(),
                p.combine.clone(),
                o.test_errors.to_string(),
                pct(o),
                format!("{:.0}", o.seconds),
                o.teacher_batches.to_string(),
            ]
        })
        .collect();
    let bars: Vec<(String, f64)> = outcomes
        .iter()
        .map(|o| (o.point.label.clone(), o.test_errors as f64))
        .collect();
    let page = coordinator::report_html::sweep_page(
        "distill sweep",
        "test errors",
        &bars,
        &headers,
        &rows,
    );
    write("sweep.html", page.as_bytes())
}

/// The table: a T × alpha grid of test errors per (lr, student, combine), then the baseline.
pub fn table_md(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let mut groups: Vec<(f64, String, String)> = Vec::new();
    for o in outcomes.iter().filter(|o| !o.point.baseline) {
        let g = (o.point.lr, o.point.arch.clone(), o.point.combine.clone());
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for (lr, arch, combine) in &groups {
        let of: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| {
                !o.point.baseline
                    && o.point.lr == *lr
                    && &o.point.arch == arch
                    && &o.point.combine == combine
            })
            .collect();
        let mut ts: Vec<f64> = Vec::new();
        let mut alphas: Vec<f64> = Vec::new();
        for o in &of {
            if !ts.contains(&o.point.temperature) {
                ts.push(o.point.temperature);
            }
            if !alphas.contains(&o.point.alpha) {
                alphas.push(o.point.alpha);
            }
        }
        let _ = writeln!(s, "Student `{arch}`, lr {lr}, {combine}: test errors\n");
        let _ = write!(s, "| T \\ alpha |");
        for al in &alphas {
            let _ = write!(s, " {al} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in &alphas {
            s.push_str("---|");
        }
        s.push('\n');
        for t in &ts {
            let _ = write!(s, "| {t} |");
            for al in &alphas {
                match of
                    .iter()
                    .find(|o| o.point.temperature == *t && o.point.alpha == *al)
                {
                    Some(o) => {
                        let _ = write!(s, " {} |", o.test_errors);
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    for o in outcomes.iter().filter(|o| o.point.baseline) {
        let _ = writeln!(
            s,
            "Baseline (`{}`, lr {}, hard labels only): {} test errors ({}%)\n",
            o.point.arch,
            o.point.lr,
            o.test_errors,
            pct(o)
        );
    }
    let teacher: u64 = outcomes.iter().map(|o| o.teacher_batches).sum();
    let _ = writeln!(
        s,
        "Batches that asked a teacher during the sweep: {teacher}"
    );
    s
}

/// Copies the best configuration's config and student into `out/best`.
fn keep_best(out: &Path, best: &Outcome) -> anyhow::Result<()> {
    let from = out.join(&best.point.label);
    let to = out.join("best");
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for name in ["config.toml", "student.safetensors"] {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {} into {}", src.display(), to.display()))?;
        }
    }
    let json = serde_json::to_vec_pretty(best)?;
    distill_core::fsutil::atomic_write(&to.join("outcome.json"), &json)?;
    Ok(())
}
