//! `distill gpu-smoke`: checks a CUDA build against the CPU on a machine with an NVIDIA GPU
//! (`scripts/gpu-smoke.sh` runs it; see docs/cuda.md).
//!
//! 1. trains a teacher on the CPU (seeded, a few seconds) and writes it to the work directory;
//! 2. **(a) teacher logits**: that teacher and a seeded conv net, on the CPU and on the device,
//!    over the test split: max |Δ| ≤ `logits_atol + logits_rtol · max |z|`; the same teacher in
//!    bf16 on the device must agree with the f32 CPU arg-max on ≥ 95 % of the rows;
//! 3. **(b) loss curves**: the student is distilled through the real coordinator, a teacher
//!    server and a student worker (all in-process over loopback, as `distill demo`), once on the
//!    CPU and once on the device, for the same number of steps; each epoch's mean loss must
//!    agree: |Δ| ≤ `loss_atol + loss_rtol · cpu`;
//! 4. **(c) throughput**: student training samples/s of those runs (steps only, and end to end
//!    as the coordinator saw it), plus an in-process training loop on random data
//!    (`--bench-arch`, f32 and bf16) on both devices.
//!
//! Prints a table per part, writes `gpu-smoke.json` in the work directory, and exits non-zero
//! if a check failed. In a build without the `cuda` feature, `--device cuda:N` (the default) is
//! an error saying CUDA is unavailable; `--device cpu` runs everything CPU against CPU (a
//! self-test of this command; every check must pass).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_core::device::parse_device;
use distill_core::model::{Model, Precision, TrainableModel};
use distill_core::optim::{OptimConfig, Optimizer};
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{Batch, CrossEntropy, Event, TrainConfig, Trainer, step_rng, train_step};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Flags of `distill gpu-smoke`.
#[derive(clap::Args, Debug)]
pub struct GpuSmokeArgs {
    /// Device under test: `cuda:N`, or `cpu` for a CPU-vs-CPU self-test of this command.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Data source (the embedded synthetic set by default: nothing to carry).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Work directory (checkpoints, run directories, gpu-smoke.json); default a new folder under
    /// runs/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Teacher architecture (trained on the CPU, served from the CPU in (b) unless
    /// --teacher-device says otherwise).
    #[arg(long, default_value = "mlp:784-256-256-10")]
    pub teacher: String,
    /// Epochs of teacher training.
    #[arg(long, default_value_t = 1)]
    pub teacher_epochs: usize,
    /// A second architecture compared in (a) with seeded random weights (a conv net: candle's
    /// conv2d on CUDA against the im2col path on the CPU); `none` skips it.
    #[arg(long, default_value = "conv:8-16-64-10")]
    pub conv: String,
    /// Where the teacher server of (b) computes: `cpu` (the soft targets are then the same in
    /// both runs) or `same` (the device under test).
    #[arg(long, default_value = "cpu")]
    pub teacher_device: String,
    /// Student architecture of (b).
    #[arg(long, default_value = "mlp:784-64-10")]
    pub student: String,
    /// Epochs of (b); steps = epochs × ⌈train rows / batch⌉ (3 × 94 on the synthetic set).
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Rows per batch in (b).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// (a): absolute part of the logits tolerance.
    #[arg(long, default_value_t = 1e-4)]
    pub logits_atol: f32,
    /// (a): part of the tolerance relative to the largest |logit|.
    #[arg(long, default_value_t = 1e-4)]
    pub logits_rtol: f32,
    /// (b): absolute part of the per-epoch loss tolerance.
    #[arg(long, default_value_t = 5e-3)]
    pub loss_atol: f64,
    /// (b): part of the per-epoch loss tolerance relative to the CPU loss.
    #[arg(long, default_value_t = 0.02)]
    pub loss_rtol: f64,
    /// (c): architecture of the in-process training benchmark.
    #[arg(long, default_value = "mlp:784-800-800-10")]
    pub bench_arch: String,
    /// (c): rows per step of the benchmark.
    #[arg(long, default_value_t = 512)]
    pub bench_batch: usize,
    /// (c): seconds per benchmark row (0 skips the benchmark).
    #[arg(long, default_value_t = 3.0)]
    pub bench_seconds: f64,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One check's outcome.
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

/// Runs `distill gpu-smoke`.
pub fn run(a: GpuSmokeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let device = parse_device(&a.device).with_context(|| {
        format!(
            "gpu-smoke: CUDA is unavailable for device `{}` (a CUDA build comes from \
             scripts/check-cuda-build.sh and runs on a machine with an NVIDIA driver; \
             `--device cpu` runs the CPU-vs-CPU self-test)",
            a.device
        )
    })?;
    let teacher_device = match a.teacher_device.as_str() {
        "same" => device.clone(),
        other => parse_device(other).context("--teacher-device")?,
    };
    let cpu = Device::Cpu;
    let label = device_label(&device, &a.device);
    if device.is_cpu() {
        println!("gpu-smoke: device under test is the CPU: a CPU-vs-CPU self-test");
    }
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("gpu-smoke-{stamp}"))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!(
        "gpu-smoke: cpu vs {label}, work directory {}",
        out.display()
    );
    let data = Dataset::load(&a.data).with_context(|| format!("loading data `{}`", a.data))?;
    let mut checks = Vec::new();

    // The teacher, trained on the CPU.
    let t0 = Instant::now();
    let teacher_ck = train_teacher(&a, &data)?;
    let teacher_path = out.join("teacher.safetensors");
    teacher_ck.save(&teacher_path)?;
    println!(
        "teacher {} trained on the CPU in {:.1} s",
        a.teacher,
        t0.elapsed().as_secs_f64()
    );

    // (a) Teacher logits.
    println!();
    println!(
        "(a) logits, cpu vs {label} (tolerance {} + {} · max|z|)",
        a.logits_atol, a.logits_rtol
    );
    let mut models = vec![(a.teacher.clone(), teacher_ck)];
    if a.conv != "none" {
        let spec = ModelSpec::new(Arch::parse(&a.conv)?);
        let tm = TrainableModel::init(spec.clone(), a.seed + 7, &cpu)?;
        models.push((
            format!("{} (random)", a.conv),
            Checkpoint::from_tensors(spec, &tm.named_tensors()?)?,
        ));
    }
    let mut logits_json = Vec::new();
    for (name, ck) in &models {
        let zc = logits(&ck.to_model(&cpu)?, &data)?;
        let zd = logits(&ck.to_model(&device)?, &data)?;
        let (diff, scale) = max_abs_diff(&zc, &zd);
        let tol = a.logits_atol + a.logits_rtol * scale;
        let agree = argmax_agreement(&zc, &zd);
        let ok = diff <= tol;
        println!(
            "    {name:<28} f32   max|Δ| {diff:.3e} (max|z| {scale:.2}, tol {tol:.3e}), arg-max agrees on {:.2}%  {}",
            100.0 * agree,
            verdict(ok)
        );
        checks.push(Check {
            name: format!("logits f32 {name}"),
            ok,
            detail: format!("max|Δ| {diff:.3e} > tol {tol:.3e}"),
        });
        logits_json.push(
            json!({"model": name, "precision": "f32", "max_abs_diff": diff,
            "max_abs_logit": scale, "tolerance": tol, "argmax_agreement": agree, "ok": ok}),
        );
    }
    {
        let (name, ck) = &models[0];
        let zc = logits(&ck.to_model(&cpu)?, &data)?;
        let mut m = ck.to_model(&device)?;
        m.set_precision(Precision::Bf16);
        let zb = logits(&m, &data)?;
        let (diff, scale) = max_abs_diff(&zc, &zb);
        let agree = argmax_agreement(&zc, &zb);
        let ok = agree >= 0.95;
        println!(
            "    {name:<28} bf16  max|Δ| {diff:.3e} (max|z| {scale:.2}), arg-max agrees on {:.2}% (≥ 95%)  {}",
            100.0 * agree,
            verdict(ok)
        );
        checks.push(Check {
            name: format!("logits bf16 {name}"),
            ok,
            detail: format!("arg-max agreement {:.2}% < 95%", 100.0 * agree),
        });
        logits_json.push(
            json!({"model": name, "precision": "bf16", "max_abs_diff": diff,
            "max_abs_logit": scale, "argmax_agreement": agree, "ok": ok}),
        );
    }

    // (b) Loss curves through the coordinator.
    println!();
    let steps_per_epoch = data.train.len().div_ceil(a.batch.max(1));
    println!(
        "(b) distilling {} from the teacher (served on {}) through the coordinator: {} epochs × {} steps",
        a.student,
        device_label(&teacher_device, &a.teacher_device),
        a.epochs,
        steps_per_epoch
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let run_cpu = rt.block_on(distil_once(
        &a,
        &out.join("run-cpu"),
        &teacher_path,
        &teacher_device,
        &cpu,
    ))?;
    let run_dev = rt.block_on(distil_once(
        &a,
        &out.join("run-device"),
        &teacher_path,
        &teacher_device,
        &device,
    ))?;
    println!(
        "    {:>5} {:>12} {:>12} {:>10} {:>10}",
        "epoch",
        "loss cpu",
        format!("loss {label}"),
        "|Δ|",
        "tol"
    );
    let mut curve_ok = run_cpu.losses.len() == run_dev.losses.len() && !run_cpu.losses.is_empty();
    let mut worst = 0f64;
    for (e, (lc, ld)) in run_cpu.losses.iter().zip(&run_dev.losses).enumerate() {
        let d = (lc - ld).abs();
        let tol = a.loss_atol + a.loss_rtol * lc.abs();
        curve_ok &= d <= tol;
        worst = worst.max(d / tol);
        println!(
            "    {:>5} {lc:>12.5} {ld:>12.5} {d:>10.2e} {tol:>10.2e}",
            e + 1
        );
    }
    println!(
        "    loss curves ({} vs {} epochs recorded)  {}",
        run_cpu.losses.len(),
        run_dev.losses.len(),
        verdict(curve_ok)
    );
    checks.push(Check {
        name: "loss curves".into(),
        ok: curve_ok,
        detail: format!(
            "worst |Δ|/tol {worst:.2} (cpu {:?}, device {:?})",
            run_cpu.losses, run_dev.losses
        ),
    });
    for (what, r) in [("cpu", &run_cpu), (label.as_str(), &run_dev)] {
        println!(
            "    {what:<8} test errors {} / {}, steps {}",
            r.test_errors, r.test_size, r.steps
        );
    }

    // (c) Throughput.
    println!();
    println!("(c) student training samples/s");
    println!("    {:<46} {:>14} {:>14}", "", "cpu", label.as_str());
    println!(
        "    {:<46} {:>14.0} {:>14.0}",
        format!("{} via coordinator, steps only", a.student),
        run_cpu.step_samples_per_s,
        run_dev.step_samples_per_s
    );
    println!(
        "    {:<46} {:>14.0} {:>14.0}",
        format!("{} via coordinator, end to end", a.student),
        run_cpu.samples_per_s,
        run_dev.samples_per_s
    );
    let mut bench_json = Vec::new();
    if a.bench_seconds > 0.0 {
        for precision in [Precision::F32, Precision::Bf16] {
            let c = bench(&a, &cpu, precision)?;
            let d = bench(&a, &device, precision)?;
            println!(
                "    {:<46} {c:>14.0} {d:>14.0}",
                format!(
                    "{} batch {} {precision}, in-process",
                    a.bench_arch, a.bench_batch
                )
            );
            bench_json.push(json!({"arch": a.bench_arch, "batch": a.bench_batch,
                "precision": precision.to_string(), "cpu_samples_per_s": c,
                "device_samples_per_s": d}));
        }
    }

    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    let report = json!({
        "device": a.device,
        "device_label": label,
        "data": data.source,
        "teacher": a.teacher,
        "teacher_device": a.teacher_device,
        "student": a.student,
        "epochs": a.epochs,
        "batch": a.batch,
        "steps_per_epoch": steps_per_epoch,
        "logits": logits_json,
        "loss_curves": {
            "cpu": run_cpu.losses, "device": run_dev.losses,
            "atol": a.loss_atol, "rtol": a.loss_rtol, "ok": curve_ok,
        },
        "throughput": {
            "coordinator_steps_only": {"cpu": run_cpu.step_samples_per_s, "device": run_dev.step_samples_per_s},
            "coordinator_end_to_end": {"cpu": run_cpu.samples_per_s, "device": run_dev.samples_per_s},
            "in_process": bench_json,
        },
        "test_errors": {"cpu": run_cpu.test_errors, "device": run_dev.test_errors, "of": run_cpu.test_size},
        "checks_failed": failed.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    let json_path = out.join("gpu-smoke.json");
    distill_core::fsutil::atomic_write(
        &json_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    println!();
    println!(
        "gpu-smoke: {} of {} checks passed in {:.1} s; figures in {}",
        checks.len() - failed.len(),
        checks.len(),
        started.elapsed().as_secs_f64(),
        json_path.display()
    );
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        anyhow::bail!("gpu-smoke failed: {}", why.join("; "));
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}

/// `cpu` for the CPU, else the device flag (`cuda:0`).
fn device_label(device: &Device, flag: &str) -> String {
    if device.is_cpu() {
        "cpu".into()
    } else {
        flag.to_string()
    }
}

/// Trains the teacher on the CPU with the run's seed; returns its checkpoint.
fn train_teacher(a: &GpuSmokeArgs, data: &Dataset) -> anyhow::Result<Checkpoint> {
    let spec = ModelSpec::new(Arch::parse(&a.teacher)?);
    let cfg = TrainConfig {
        epochs: a.teacher_epochs,
        batch: 128,
        seed: a.seed + 100,
        optim: OptimConfig::adamw(1e-3, 0.0),
        eval_every_epoch: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(spec, cfg, &Device::Cpu)?;
    trainer.check_data(data)?;
    trainer.run(data, &mut CrossEntropy, &mut |_: Event<'_>| {
        ControlFlow::Continue(())
    })?;
    Ok(trainer.checkpoint()?)
}

/// The model's logits over the whole test split, as host f32 rows.
fn logits(model: &Model, data: &Dataset) -> anyhow::Result<Vec<Vec<f32>>> {
    let shape = model.spec().arch.input_shape();
    let idx: Vec<usize> = (0..data.test.len()).collect();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(500) {
        let (x, _) = data.test.batch(&shape, chunk, model.device(), None)?;
        let z = model
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        out.extend(z.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// (max |a − b|, max |a|) over every element.
fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut diff = if a.len() == b.len() {
        0f32
    } else {
        f32::INFINITY
    };
    let mut scale = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        if ra.len() != rb.len() {
            diff = f32::INFINITY;
        }
        for (x, y) in ra.iter().zip(rb) {
            // NaN fails the comparison with the tolerance: keep it.
            let d = (x - y).abs();
            diff = if d.is_nan() { f32::NAN } else { diff.max(d) };
            scale = scale.max(x.abs());
        }
    }
    (diff, scale)
}

fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// Fraction of rows whose arg-max is the same.
fn argmax_agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    same as f64 / a.len().max(1) as f64
}

/// What one distillation run gave.
struct DistilRun {
    /// Mean loss of each epoch (the coordinator's metrics.jsonl).
    losses: Vec<f64>,
    samples_per_s: f64,
    step_samples_per_s: f64,
    test_errors: u64,
    test_size: u64,
    steps: u64,
}

/// One distillation run in-process: a teacher server on `teacher_device`, the coordinator and a
/// worker training on `device`, all on 127.0.0.1.
async fn distil_once(
    a: &GpuSmokeArgs,
    dir: &Path,
    teacher: &Path,
    teacher_device: &Device,
    device: &Device,
) -> anyhow::Result<DistilRun> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let shutdown = CancellationToken::new();
    let ck = Checkpoint::read(teacher)?;
    let opts = teacher_server::ServeOptions {
        member: "teacher".into(),
        ..Default::default()
    };
    let service = teacher_server::build_service(&ck, teacher_device, &opts)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let teacher_addr = listener.local_addr()?;
    let server = tokio::spawn(teacher_server::serve(
        service,
        listener,
        opts.max_message_bytes,
        shutdown.clone(),
    ));
    // Built from JSON so that the run config's other keys keep their defaults.
    let cfg: coordinator::RunConfig = serde_json::from_value(json!({
        "data": a.data,
        "run_dir": dir,
        "epochs": a.epochs,
        "batch_size": a.batch,
        "seed": a.seed,
        "temperature": 2.0,
        "alpha": 0.5,
        "student": {"arch": a.student},
        "optim": OptimConfig::adamw(1e-3, 0.0),
        "members": [{"name": "teacher", "endpoints": [format!("http://{teacher_addr}")]}],
    }))
    .context("building the run config")?;
    cfg.validate()?;
    let run = coordinator::prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coord_addr = listener.local_addr()?;
    let coord = tokio::spawn(coordinator::serve(run, listener, shutdown.clone()));
    let worker_cfg = student_worker::WorkerConfig {
        coordinator: format!("http://{coord_addr}"),
        device: device.clone(),
        work_dir: dir.join("worker"),
        connect_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let worker = student_worker::run(worker_cfg, shutdown.clone()).await;
    if worker.is_err() {
        // The coordinator would wait for a worker that is gone.
        shutdown.cancel();
    }
    let report = coord.await.context("coordinator task")?;
    shutdown.cancel();
    server.await.context("teacher task")??;
    let worker = worker?;
    let report = report?.context("the coordinator stopped before the run completed")?;
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .with_context(|| format!("reading {}/metrics.jsonl", dir.display()))?;
    let mut losses = Vec::new();
    for line in metrics.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).context("metrics.jsonl")?;
        let loss = v
            .get("mean_loss")
            .and_then(serde_json::Value::as_f64)
            .context("metrics.jsonl: a line without mean_loss")?;
        losses.push(loss);
    }
    Ok(DistilRun {
        losses,
        samples_per_s: report.samples_per_sec,
        step_samples_per_s: worker.samples as f64 / worker.step_seconds.max(1e-9),
        test_errors: report.student_test_errors,
        test_size: report.test_size,
        steps: worker.steps,
    })
}

/// Training samples/s of `--bench-arch` on random data on `device` in `precision`: AdamW steps
/// for about `--bench-seconds` after two warm-up steps.
fn bench(a: &GpuSmokeArgs, device: &Device, precision: Precision) -> anyhow::Result<f64> {
    let spec = ModelSpec::new(Arch::parse(&a.bench_arch)?);
    let (input, classes) = (spec.arch.input_size(), spec.arch.classes());
    let mut tm = TrainableModel::init(spec, a.seed, device)?;
    tm.model.set_precision(precision);
    let mut opt = Optimizer::new(OptimConfig::adamw(1e-4, 0.0), tm.named_vars()?)?;
    let n = a.bench_batch.max(1);
    let x = Tensor::rand(0f32, 1., (n, input), &Device::Cpu)?.to_device(device)?;
    let y: Vec<u32> = (0..n as u32).map(|i| i % classes as u32).collect();
    let y = Tensor::from_vec(y, n, device)?;
    let idx: Vec<usize> = (0..n).collect();
    let batch = Batch { idx: &idx, x, y };
    let mut step = |s: u64| -> anyhow::Result<()> {
        // train_step reads the loss back to the host: each step is synchronised.
        train_step(
            &tm,
            &mut opt,
            &batch,
            1e-4,
            &mut step_rng(a.seed, s),
            &mut CrossEntropy,
        )?;
        Ok(())
    };
    step(0)?;
    step(1)?;
    let t0 = Instant::now();
    let mut steps = 0u64;
    while steps < 3 || t0.elapsed().as_secs_f64() < a.bench_seconds {
        step(steps + 2)?;
        steps += 1;
    }
    Ok((steps as usize * n) as f64 / t0.elapsed().as_secs_f64())
}
