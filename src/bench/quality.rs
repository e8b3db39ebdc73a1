//! `distill bench --only workers-quality`: what several workers do to the student, not to the
//! speed. The demo's pipeline (its teachers, student, optimizer and epochs, on the synthetic
//! set) distils the same student with 1, 2 and 4 workers at equal total samples (equal
//! epochs), in each averaging mode and over several seeds, and prints per (mode, workers) the
//! median and range of the distilled student's test errors, with rounds, bytes per round and
//! time. The teachers and the hard-label baseline are trained once per seed.
//!
//! Modes (`[sync]` keys):
//! - `plain`: every 5 updates, `outer_lr = 1` (the average);
//! - `step`: every 5, `outer_lr = N` (the workers' changes summed);
//! - `diloco`: every 5, `outer_lr = 0.7`, `outer_momentum = 0.9` (Nesterov on the
//!   pseudo-gradient, DiLoCo's outer optimizer);
//! - `diloco-50`: the same every 50 updates (DiLoCo's long rounds);
//! - `sync`: synchronous data parallelism (`average = "gradients"`, every update): each
//!   worker's batch is the demo's, so N workers take one step on N batches, as one worker with
//!   N times the batch would (N times fewer updates at equal epochs).
//!
//! Every run is on the fixed schedule, so each figure is one run's, not a sample of timings.

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use distill_core::data::Dataset;

use crate::demo_cmd::{self, DemoArgs};

/// Parses the demo's defaults.
#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    demo: DemoArgs,
}

struct Mode {
    name: &'static str,
    every: u64,
    /// None: the number of workers.
    outer_lr: Option<f64>,
    momentum: f64,
    /// Gradient averaging (then `every` is 1 and there is no outer optimizer).
    gradients: bool,
}

const MODES: [Mode; 5] = [
    Mode {
        name: "plain",
        every: 5,
        outer_lr: Some(1.0),
        momentum: 0.0,
        gradients: false,
    },
    Mode {
        name: "step",
        every: 5,
        outer_lr: None,
        momentum: 0.0,
        gradients: false,
    },
    Mode {
        name: "diloco",
        every: 5,
        outer_lr: Some(0.7),
        momentum: 0.9,
        gradients: false,
    },
    Mode {
        name: "diloco-50",
        every: 50,
        outer_lr: Some(0.7),
        momentum: 0.9,
        gradients: false,
    },
    Mode {
        name: "sync",
        every: 1,
        outer_lr: Some(1.0),
        momentum: 0.0,
        gradients: true,
    },
];

/// Runs the section with `seeds` seeds, the given worker counts and the named modes (empty:
/// all).
pub async fn run(
    seeds: u64,
    workers: &[usize],
    epochs: u32,
    modes: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    if let Some(bad) = modes
        .iter()
        .find(|m| !MODES.iter().any(|mode| mode.name == m.as_str()))
    {
        let names: Vec<_> = MODES.iter().map(|m| m.name).collect();
        anyhow::bail!(
            "--quality-modes: no mode `{bad}` (modes: {})",
            names.join(", ")
        );
    }
    let mut base = Defaults::try_parse_from(["demo"])?.demo;
    base.epochs = epochs;
    println!();
    println!(
        "[workers-quality] the demo's student {} distilled for {} epochs with 1, 2 and 4 workers (fixed schedule), {} seeds",
        base.student, base.epochs, seeds
    );
    let data = Dataset::load(&base.data)?;
    let mut baselines = Vec::new();
    let mut teachers = Vec::new();
    for seed in 0..seeds {
        let mut a = Defaults::try_parse_from(["demo"])?.demo;
        a.epochs = epochs;
        a.seed = seed;
        let dir = out.join(format!("quality-seed{seed}"));
        std::fs::create_dir_all(&dir)?;
        let files = tokio::task::block_in_place(|| demo_cmd::train_teachers(&a, &data, &dir))?;
        let (baseline, optim) =
            tokio::task::block_in_place(|| demo_cmd::train_baseline(&a, &data, &dir))?;
        baselines.push(baseline);
        teachers.push((files, optim));
    }
    println!(
        "baseline student (hard labels): {} test errors (median of {}; {})",
        median(&baselines),
        baselines.len(),
        join(&baselines)
    );
    println!(
        "{:<10} {:>7} {:>7} {:>14} {:>20} {:>7} {:>13} {:>9}",
        "mode", "workers", "every", "outer", "test errors median", "range", "rounds", "KiB/round"
    );
    for mode in MODES
        .iter()
        .filter(|m| modes.is_empty() || modes.iter().any(|n| n == m.name))
    {
        for &n in workers {
            if n == 1
                && mode.momentum == 0.0
                && (mode.gradients || mode.outer_lr.is_none_or(|lr| lr != 1.0))
            {
                // A lone worker's rounds without momentum are plain averages (its gradient rounds
                // are its own steps): as `plain`.
                continue;
            }
            let mut errors = Vec::new();
            let (mut rounds, mut kib, mut secs) = (0u64, 0.0f64, 0.0f64);
            for seed in 0..seeds {
                let mut a = Defaults::try_parse_from(["demo"])?.demo;
                a.epochs = epochs;
                a.seed = seed;
                a.workers = n;
                a.sync_every = mode.every;
                a.outer_lr = Some(mode.outer_lr.unwrap_or(n as f64));
                a.outer_momentum = mode.momentum;
                a.gradients = mode.gradients;
                let dir = out.join(format!("quality-{}-{n}-{seed}", mode.name));
                std::fs::create_dir_all(&dir)?;
                let (files, optim) = &teachers[seed as usize];
                let t0 = Instant::now();
                let r = demo_cmd::distil(&a, &dir, files, optim.clone()).await?;
                secs += t0.elapsed().as_secs_f64();
                errors.push(r.student_test_errors);
                rounds = rounds.max(r.sync.rounds);
                kib = kib.max(r.sync.mean_bytes_per_round / 1024.0);
                tracing::info!(
                    mode = mode.name,
                    workers = n,
                    seed,
                    errors = r.student_test_errors,
                    "quality run"
                );
            }
            let outer = match (mode.outer_lr, mode.momentum) {
                _ if mode.gradients => "gradients".to_string(),
                (_, m) if m > 0.0 => format!("{}/nesterov {m}", mode.outer_lr.unwrap_or(1.0)),
                (None, _) => format!("lr {n}"),
                (Some(lr), _) => format!("lr {lr}"),
            };
            println!(
                "{:<10} {:>7} {:>7} {:>14} {:>20} {:>7} {:>13} {:>9.0}   ({:.0} s per run; {})",
                mode.name,
                n,
                mode.every,
                outer,
                median(&errors),
                errors.iter().max().unwrap_or(&0) - errors.iter().min().unwrap_or(&0),
                rounds,
                kib,
                secs / seeds.max(1) as f64,
                join(&errors)
            );
        }
    }
    Ok(())
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}
