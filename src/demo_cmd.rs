//! `distill demo`: the whole system in one process over loopback, on the embedded synthetic
//! data set by default (no files, flags or servers needed).
//!
//! 1. trains two different teachers (the ensemble members) on hard labels;
//! 2. serves each from its own teacher server on 127.0.0.1:0;
//! 3. runs the coordinator and `--workers` student workers (one by default), which distil the
//!    student from the ensemble's soft targets streamed over gRPC, averaging their parameters
//!    every `--sync-every` updates;
//! 4. trains the same student architecture on hard labels alone (the baseline);
//! 5. prints a table and writes the run directory (`report.json`, config, checkpoints, metrics).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::local::LocalMember;
use anyhow::Context;
use candle_core::Device;
use coordinator::config::{RunConfig, SoftTargetEncoding, StudentConfig};
use distill_core::data::Dataset;
use distill_core::kd::Combine;
use distill_core::optim::OptimConfig;
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{CrossEntropy, Event, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Flags of `distill demo` (every one has a default).
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Data source: `synthetic[:SEED]` (default), `mnist:DIR` or `safetensors:FILE`.
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Run directory (default: a new folder under runs/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Teacher architectures, one per ensemble member.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mlp:784-512-512-10,mlp:784-256-256-10"
    )]
    pub teachers: Vec<String>,
    /// Dropout of the teachers' hidden layers.
    #[arg(long, default_value_t = 0.3)]
    pub teacher_dropout: f32,
    /// Teachers' training images are shifted by up to this many pixels (as in Hinton et al.).
    #[arg(long, default_value_t = 2)]
    pub teacher_jitter: usize,
    /// Epochs of teacher training.
    #[arg(long, default_value_t = 8)]
    pub teacher_epochs: usize,
    /// Student architecture (the baseline uses the same).
    #[arg(long, default_value = "mlp:784-64-10")]
    pub student: String,
    /// Epochs of student training (baseline and distilled alike).
    #[arg(long, default_value_t = 20)]
    pub epochs: u32,
    /// Distillation temperature T (a small student learns best from mildly softened targets).
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    /// Weight of the soft-target term.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Learning rate of the students (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Rows per batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Student workers training the one student together (data parallel, averaging their
    /// parameters every `--sync-every` updates).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Local updates between synchronisation rounds (with AdamW and local optimizer state,
    /// averaging often keeps the workers' models close: 5 beats 25 here).
    #[arg(long, default_value_t = 5)]
    pub sync_every: u64,
    /// Step on each round's averaged change (`[sync] outer_lr`). Default: the number of workers
    /// when rounds are short (`--sync-every` ≤ 10), so the workers' changes add up as if made
    /// one after another (2 workers here: 165 test errors instead of 221 with plain
    /// averaging); 1 (plain averaging) otherwise, since long rounds diverge when summed.
    #[arg(long)]
    pub outer_lr: Option<f64>,
    /// Nesterov momentum of the outer optimizer (`[sync] outer_momentum`; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub outer_momentum: f64,
    /// Synchronous data parallelism (`[sync] average = "gradients"`, every update): the
    /// workers' gradients are averaged and the coordinator takes each step, as one worker with
    /// `--workers` times the batch would.
    #[arg(long, conflicts_with_all = ["sync_every", "outer_lr", "outer_momentum"])]
    pub gradients: bool,
    /// Token-level distillation of a small language model instead (a toy language, a teacher
    /// llama served over gRPC, top-k rows per position; see docs/lm.md). Takes `--seed`.
    #[arg(long, conflicts_with_all = ["workers", "gradients", "data", "teachers", "student"])]
    pub lm: bool,
}

impl DemoArgs {
    /// `--outer-lr`, or its default.
    fn outer_lr(&self) -> f64 {
        if self.gradients {
            return 1.0;
        }
        self.outer_lr
            .unwrap_or(if self.workers > 1 && self.sync_every <= 10 {
                self.workers as f64
            } else {
                1.0
            })
    }
}

/// Runs `distill demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let kind = if a.lm { "demo-lm" } else { "demo" };
            PathBuf::from("runs").join(format!("{kind}-{stamp}"))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!("run directory: {}", out.display());
    if a.lm {
        return crate::demo_lm::run(a.seed, &out);
    }
    let data = Dataset::load(&a.data)?;
    tracing::info!(data = %data.source, train = data.train.len(), test = data.test.len(), "data loaded");

    let teacher_files = train_teachers(&a, &data, &out)?;
    let (baseline_errors, student_optim) = train_baseline(&a, &data, &out)?;

    // 3. Serve the teachers, coordinate, distil.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = rt.block_on(distil(&a, &out, &teacher_files, student_optim))?;
    report.baseline_student_test_errors = Some(baseline_errors);
    coordinator::driver::write_report(&out, &report)?;

    // 4. The table.
    let pct = |e: u64| 100.0 * e as f64 / report.test_size.max(1) as f64;
    println!();
    println!(
        "distill demo on {} ({} test rows), T = {}, alpha = {}",
        report.data, report.test_size, report.temperature, report.alpha
    );
    println!("{:<34} {:>12} {:>9}", "model", "test errors", "error %");
    for t in &report.teachers {
        println!(
            "{:<34} {:>12} {:>8.2}%",
            format!("teacher {}", t.member),
            t.test_errors,
            pct(t.test_errors)
        );
    }
    if let Some(e) = report.ensemble_test_errors {
        println!(
            "{:<34} {:>12} {:>8.2}%",
            "teacher ensemble (mean-prob)",
            e,
            pct(e)
        );
    }
    println!(
        "{:<34} {:>12} {:>8.2}%",
        format!("baseline student {}", a.student),
        baseline_errors,
        pct(baseline_errors)
    );
    println!(
        "{:<34} {:>12} {:>8.2}%",
        format!("distilled student {}", a.student),
        report.student_test_errors,
        pct(report.student_test_errors)
    );
    println!();
    println!(
        "distillation: {} / {} batches, {:.0} samples/s, student waited {:.1}% of its time",
        report.batches_trained,
        report.batches_expected,
        report.samples_per_sec,
        100.0 * report.student_wait_fraction
    );
    if report.workers.len() > 1 || report.sync.rounds > 0 {
        let shares: Vec<String> = report
            .workers
            .iter()
            .map(|w| format!("{} {} rows", w.worker_id, w.samples))
            .collect();
        let how = if a.gradients {
            "gradients averaged after every update".to_string()
        } else {
            format!(
                "every {} updates, outer step {}",
                report.sync.every,
                a.outer_lr()
            )
        };
        println!(
            "workers: {}; {} synchronisation rounds ({how}), {:.0} KiB and {:.1} ms per round",
            shares.join(", "),
            report.sync.rounds,
            report.sync.mean_bytes_per_round / 1024.0,
            1e3 * report.sync.mean_round_seconds
        );
    }
    println!(
        "report: {} (open it in a browser; the figures are in report.json)",
        out.join(coordinator::report_html::REPORT_HTML).display()
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Trains the teachers of `a` on hard labels into `out`; their checkpoint files.
pub(crate) fn train_teachers(
    a: &DemoArgs,
    data: &Dataset,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut teacher_files = Vec::new();
    for (i, arch) in a.teachers.iter().enumerate() {
        let spec = ModelSpec {
            arch: Arch::parse(arch)?,
            dropout: a.teacher_dropout,
            input_dropout: 0.0,
        };
        let cfg = TrainConfig {
            epochs: a.teacher_epochs,
            batch: a.batch,
            seed: a.seed + 100 + i as u64,
            jitter: a.teacher_jitter,
            optim: OptimConfig::adamw(1e-3, 1e-4),
            eval_every_epoch: false,
            ..Default::default()
        };
        let path = out.join(format!("teacher-{}.safetensors", member_name(i)));
        let t0 = Instant::now();
        let errors = train_supervised(
            spec,
            cfg,
            data,
            &path,
            &format!("training teacher {}", member_name(i)),
            None,
        )?;
        println!(
            "trained teacher {} ({arch}): {errors} test errors in {:.1} s",
            member_name(i),
            t0.elapsed().as_secs_f64()
        );
        teacher_files.push(path);
    }

    Ok(teacher_files)
}

/// Trains the baseline student of `a` on hard labels alone into `out`; its test errors and the
/// students' optimizer.
pub(crate) fn train_baseline(
    a: &DemoArgs,
    data: &Dataset,
    out: &Path,
) -> anyhow::Result<(u64, OptimConfig)> {
    let student_spec = ModelSpec::new(Arch::parse(&a.student)?);
    let student_optim = OptimConfig::adamw(a.lr, 0.0);
    let t0 = Instant::now();
    let baseline_cfg = TrainConfig {
        epochs: a.epochs as usize,
        batch: a.batch,
        seed: a.seed,
        optim: student_optim.clone(),
        // Scored every epoch for the report's curve beside the distilled student's.
        eval_every_epoch: true,
        ..Default::default()
    };
    let baseline_errors = train_supervised(
        student_spec,
        baseline_cfg,
        data,
        &out.join("baseline-student.safetensors"),
        "training the baseline student",
        Some(&out.join("baseline.jsonl")),
    )?;
    let baseline_secs = t0.elapsed().as_secs_f64();
    println!(
        "trained baseline student ({}): {baseline_errors} test errors in {baseline_secs:.1} s",
        a.student
    );

    Ok((baseline_errors, student_optim))
}

/// A progress bar on stderr when it is a terminal (hidden otherwise, so piped output stays the
/// table alone).
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{prefix:<34} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

fn member_name(i: usize) -> String {
    ["a", "b", "c", "d", "e", "f", "g", "h"]
        .get(i)
        .map_or_else(|| format!("m{i}"), |s| s.to_string())
}

/// Trains a model on hard labels, saves it, returns its test errors.
fn train_supervised(
    spec: ModelSpec,
    cfg: TrainConfig,
    data: &Dataset,
    path: &Path,
    what: &str,
    curve: Option<&Path>,
) -> anyhow::Result<u64> {
    let bar = progress(cfg.epochs as u64, what);
    bar.set_message("epochs");
    let mut trainer = Trainer::new(spec, cfg, &Device::Cpu)?;
    let mut lines = String::new();
    trainer.run(data, &mut CrossEntropy, &mut |e| {
        if let Event::Epoch(s) = e {
            tracing::debug!(epoch = s.epoch, loss = s.loss, "epoch");
            bar.inc(1);
            bar.set_message(format!("epochs · loss {:.4}", s.loss));
            let line = serde_json::json!({
                "epoch": s.epoch,
                "mean_loss": s.loss,
                "test_errors": s.test_errors,
            });
            lines.push_str(&format!("{line}\n"));
        }
        ControlFlow::Continue(())
    })?;
    if let Some(path) = curve {
        distill_core::fsutil::atomic_write(path, lines.as_bytes())?;
    }
    bar.finish_and_clear();
    let ck = trainer.checkpoint()?;
    ck.save(path)?;
    let model = ck.to_model(&Device::Cpu)?;
    let report = distill_core::eval::evaluate(&model, &data.test, 1024)?;
    Ok(report.errors as u64)
}

pub(crate) async fn distil(
    a: &DemoArgs,
    out: &Path,
    teacher_files: &[PathBuf],
    optim: OptimConfig,
) -> anyhow::Result<coordinator::RunReport> {
    let members = teacher_files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            Ok(LocalMember {
                name: member_name(i),
                checkpoint: distill_core::checkpoint::Checkpoint::read(path)?,
                replicas: 1,
                opts: Default::default(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = RunConfig {
        data: a.data.clone(),
        transfer: None,
        eval: None,
        lm: None,
        run_dir: out.to_path_buf(),
        epochs: a.epochs,
        batch_size: a.batch,
        seed: a.seed,
        temperature: a.temperature,
        alpha: a.alpha,
        combine: Combine::MeanProb,
        soft_targets: SoftTargetEncoding::F32,
        checkpoint_every: 0,
        lease_timeout_secs: 60.0,
        prefetch: 8,
        teacher_timeout_secs: 30.0,
        teacher_policy: Default::default(),
        max_message_mb: 64,
        min_workers: a.workers.max(1),
        eval_timeout_secs: 600.0,
        eval_every_epoch: true,
        hello_timeout_secs: 10.0,
        stall_timeout_secs: 120.0,
        cache: None,
        sync: coordinator::config::SyncConfig {
            every: if a.gradients { 1 } else { a.sync_every },
            outer_lr: a.outer_lr(),
            outer_momentum: a.outer_momentum,
            average: if a.gradients {
                coordinator::config::SyncAverage::Gradients
            } else {
                coordinator::config::SyncAverage::Parameters
            },
            ..Default::default()
        },
        student: StudentConfig {
            arch: a.student.clone(),
            dropout: 0.0,
            input_dropout: 0.0,
            precision: Default::default(),
            init: None,
            init_layers: None,
        },
        optim,
        members: Vec::new(),
        membership: Default::default(),
    };
    let bar = progress(1, "distilling the student");
    bar.set_message("batches");
    let outcome =
        crate::local::run_with_progress(cfg, &members, a.workers, out.to_path_buf(), Some(bar))
            .await?;
    for w in &outcome.workers {
        tracing::debug!(
            worker = %w.worker_id,
            steps = w.steps,
            samples = w.samples,
            rounds = w.rounds,
            sync_seconds = w.sync_seconds,
            "worker finished"
        );
    }
    Ok(outcome.report)
}
