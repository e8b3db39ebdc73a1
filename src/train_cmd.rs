//! `distill train`: supervised training on hard labels (teachers and baseline students).
//!
//! Writes the model checkpoint `--out FILE` (one safetensors file, spec in its metadata,
//! written atomically) and `FILE.json`: the resolved settings, the seed, per-epoch loss,
//! accuracy and throughput, and the final test score. With `--state S` the full training state
//! is saved to `S` after every epoch and a later run with the same `--state` continues exactly
//! where it stopped (the saved settings win over the flags).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use distill_core::data::Dataset;
use distill_core::device::parse_device;
use distill_core::eval::{EvalReport, evaluate};
use distill_core::model::Precision;
use distill_core::optim::{OptimConfig, OptimKind, Schedule};
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{CrossEntropy, EpochStats, Event, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Flags of `distill train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Data source: `mnist:DIR`, `safetensors:FILE` or `synthetic[:SEED]`.
    #[arg(long, env = "DISTILL_DATA")]
    pub data: String,
    /// Architecture, e.g. `mlp:784-1200-1200-10` or `conv:32-64-256-10`.
    #[arg(long, env = "DISTILL_ARCH")]
    pub arch: String,
    /// Dropout probability on every hidden layer while training.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Dropout probability on the input while training.
    #[arg(long, default_value_t = 0.0)]
    pub input_dropout: f32,
    /// Shift each training image by up to K pixels in x and y (0: off).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub jitter: usize,
    /// Optimizer, schedule and clipping (boxed: keeps the subcommand enum small).
    #[command(flatten)]
    pub optim: Box<OptimArgs>,
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Rows per update.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Seed of initialisation, shuffling, jitter and dropout.
    #[arg(long, default_value_t = 0, env = "DISTILL_SEED")]
    pub seed: u64,
    /// Score the test set only after the last epoch (default: after every epoch).
    #[arg(long)]
    pub eval_final_only: bool,
    /// Device: `cpu`, `auto` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", env = "DISTILL_DEVICE")]
    pub device: String,
    /// Arithmetic of the forward/backward passes: `f32`, or `bf16` (mixed precision: bf16
    /// compute, f32 master weights, optimizer and loss; meant for CUDA). Not saved in `--state`:
    /// a resumed run uses this flag. Test scores are computed in the same precision.
    #[arg(long, default_value = "f32", env = "DISTILL_PRECISION")]
    pub precision: Precision,
    /// CPU threads for the math (sets RAYON_NUM_THREADS; default: one per core).
    #[arg(long, env = "DISTILL_THREADS")]
    pub threads: Option<usize>,
    /// Save the full training state here after every epoch; if the file exists, resume from it.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Where to write the trained checkpoint (and FILE.json beside it).
    #[arg(long, env = "DISTILL_OUT")]
    pub out: PathBuf,
}

/// Optimizer flags of `distill train`.
#[derive(clap::Args, Debug)]
pub struct OptimArgs {
    /// Optimizer: `sgd` (with momentum) or `adamw`.
    #[arg(long, default_value = "sgd", env = "DISTILL_OPTIMIZER")]
    pub optimizer: String,
    /// Base learning rate [default: 0.05 for sgd, 0.001 for adamw].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Use Nesterov momentum (SGD).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW betas.
    #[arg(long, value_delimiter = ',', value_name = "B1,B2", default_values_t = [0.9, 0.999])]
    pub betas: Vec<f64>,
    /// Learning-rate schedule: `const`, `step` (×0.5 every 10 epochs), `step:EVERY:GAMMA`,
    /// `cosine` (to 0 at the end) or `cosine:FINAL_FRACTION`.
    #[arg(long, default_value = "const")]
    pub schedule: String,
    /// Linear learning-rate warmup over this many epochs (fractions allowed).
    #[arg(long, default_value_t = 0.0, value_name = "EPOCHS")]
    pub warmup: f64,
    /// Clip gradients to this global L2 norm.
    #[arg(long, value_name = "NORM")]
    pub clip: Option<f64>,
    /// Max-norm constraint: after each update, scale every hidden unit's incoming weight
    /// vector longer than this back to this L2 norm (Srivastava et al. 2014).
    #[arg(long, value_name = "NORM")]
    pub max_norm: Option<f64>,
}

/// What `FILE.json` holds.
#[derive(Serialize)]
struct RunReport<'a> {
    distill_version: &'static str,
    checkpoint: &'a Path,
    digest: String,
    data: &'a str,
    arch: String,
    spec: &'a ModelSpec,
    num_params: usize,
    device: &'a str,
    precision: Precision,
    threads: usize,
    seed: u64,
    config: &'a TrainConfig,
    epochs: &'a [EpochStats],
    train_seconds: f64,
    wall_seconds: f64,
    samples_per_s: f64,
    test_errors: usize,
    test_n: usize,
    test_accuracy: f64,
    test: &'a EvalReport,
}

/// Runs `distill train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        reexec_with_threads(n)?;
    }
    let started = Instant::now();
    let device = parse_device(&args.device)?;
    // Settings first, so a bad flag fails before the data is read.
    let mut trainer = match &args.state {
        Some(p) if p.exists() => {
            let t = Trainer::resume(p, &device)?;
            tracing::info!(
                state = %p.display(),
                epoch = t.state.epoch,
                step = t.state.step,
                "resuming: the saved settings are used, not the flags"
            );
            t
        }
        _ => {
            let spec = ModelSpec {
                arch: Arch::parse(&args.arch)?,
                dropout: args.dropout,
                input_dropout: args.input_dropout,
            };
            let mut t = Trainer::new(spec, train_config(&args)?, &device)?;
            t.state_path = args.state.clone();
            t
        }
    };
    trainer.model.model.set_precision(args.precision);
    let data =
        Dataset::load(&args.data).with_context(|| format!("loading data `{}`", args.data))?;
    let spec = trainer.model.model.spec().clone();
    tracing::info!(
        arch = %spec.arch,
        precision = %args.precision,
        params = spec.arch.num_params(),
        dropout = %spec.dropout,
        input_dropout = %spec.input_dropout,
        config = %serde_json::to_string(&trainer.cfg)?,
        "training"
    );
    trainer
        .check_data(&data)
        .with_context(|| format!("training {} on `{}`", spec.arch, args.data))?;

    let mut reporter = Reporter::new(std::io::stderr().is_terminal());
    trainer.run(&data, &mut CrossEntropy, &mut |e| {
        reporter.event(e);
        ControlFlow::Continue(())
    })?;
    reporter.finish();

    let test = evaluate(&trainer.model.model, &data.test, trainer.cfg.eval_batch)?;
    let ck = trainer.checkpoint()?;
    ck.save(&args.out)?;
    let history = &trainer.state.history;
    let train_seconds: f64 = history.iter().map(|e| e.seconds).sum();
    let samples: u64 = history.iter().map(|e| e.samples).sum();
    let report = RunReport {
        distill_version: env!("CARGO_PKG_VERSION"),
        checkpoint: &args.out,
        digest: ck.digest(),
        data: &data.source,
        arch: spec.arch.to_string(),
        spec: &spec,
        num_params: spec.arch.num_params(),
        device: &args.device,
        precision: args.precision,
        threads: threads_in_use(),
        seed: trainer.cfg.seed,
        config: &trainer.cfg,
        epochs: history,
        train_seconds,
        wall_seconds: started.elapsed().as_secs_f64(),
        samples_per_s: samples as f64 / train_seconds.max(1e-9),
        test_errors: test.errors,
        test_n: test.n,
        test_accuracy: test.accuracy,
        test: &test,
    };
    let json_path = PathBuf::from(format!("{}.json", args.out.display()));
    distill_core::fsutil::atomic_write(
        &json_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    tracing::info!(
        checkpoint = %args.out.display(),
        report = %json_path.display(),
        "test errors {} / {} ({:.2}%), {:.0} samples/s, {:.0}s training",
        test.errors,
        test.n,
        100.0 * (1.0 - test.accuracy),
        report.samples_per_s,
        train_seconds
    );
    Ok(())
}

fn train_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let a = &args.optim;
    let kind: OptimKind = a.optimizer.parse()?;
    let [b1, b2] = a.betas[..] else {
        anyhow::bail!("--betas takes two numbers, B1,B2");
    };
    let optim = OptimConfig {
        kind,
        lr: a.lr.unwrap_or(OptimConfig::default_lr(kind)),
        momentum: if kind == OptimKind::Sgd {
            a.momentum
        } else {
            0.0
        },
        nesterov: a.nesterov,
        weight_decay: a.weight_decay,
        betas: [b1, b2],
        eps: 1e-8,
        schedule: Schedule::parse(&a.schedule)?,
        warmup_epochs: a.warmup,
        clip_grad_norm: a.clip,
        max_norm: a.max_norm,
    };
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch: args.batch,
        seed: args.seed,
        jitter: args.jitter,
        optim,
        eval_every_epoch: !args.eval_final_only,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// candle reads its thread count from the environment once, and setting the environment of a
/// running process is `unsafe`, so `--threads` re-runs this binary with `RAYON_NUM_THREADS`
/// (and `CANDLE_NUM_THREADS`) set, unless they already say `n`.
fn reexec_with_threads(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!("--threads must be >= 1");
    }
    let want = n.to_string();
    let set = |k: &str| std::env::var(k).ok().as_deref() == Some(want.as_str());
    if set("RAYON_NUM_THREADS") && set("CANDLE_NUM_THREADS") {
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this binary to apply --threads")?;
    let status = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("RAYON_NUM_THREADS", &want)
        .env("CANDLE_NUM_THREADS", &want)
        .status()
        .with_context(|| format!("re-running {} with {n} threads", exe.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

fn threads_in_use() -> usize {
    candle_core::utils::get_num_threads()
}

/// Progress on a terminal (a bar per epoch), plain log lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    tty: bool,
    last_log: Instant,
}

impl Reporter {
    fn new(tty: bool) -> Self {
        Self {
            bar: None,
            tty,
            last_log: Instant::now(),
        }
    }

    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Step(p) => {
                if self.tty {
                    let bar = self.bar.get_or_insert_with(|| {
                        let b = ProgressBar::new(p.batches as u64);
                        b.set_style(
                            ProgressStyle::with_template(
                                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        b.set_prefix(format!("{}/{}", p.epoch, p.epochs));
                        b
                    });
                    bar.set_position(p.batch as u64);
                    if p.batch % 10 == 0 || p.batch == p.batches {
                        bar.set_message(format!(
                            "loss {:.4} · {:.0} samples/s · lr {:.2e}",
                            p.epoch_loss, p.samples_per_s, p.lr
                        ));
                    }
                } else if self.last_log.elapsed().as_secs() >= 30 {
                    self.last_log = Instant::now();
                    tracing::info!(
                        "epoch {}/{} batch {}/{}: loss {:.4}, {:.0} samples/s, lr {:.3e}",
                        p.epoch,
                        p.epochs,
                        p.batch,
                        p.batches,
                        p.epoch_loss,
                        p.samples_per_s,
                        p.lr
                    );
                }
            }
            Event::Epoch(s) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                self.last_log = Instant::now();
                let test = match s.test_errors {
                    Some(e) => format!(", test errors {e}/{}", s.test_n),
                    None => String::new(),
                };
                tracing::info!(
                    "epoch {}: loss {:.4}, train acc {:.2}%, {:.0} samples/s ({:.1}s), lr {:.3e}{test}",
                    s.epoch,
                    s.loss,
                    100.0 * s.train_accuracy,
                    s.samples_per_s,
                    s.seconds,
                    s.lr
                );
            }
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
