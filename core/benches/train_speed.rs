//! Training throughput at batch 128 on random data: samples/s of a full step (training forward
//! with the spec's dropout, loss, backward, optimizer update) for the MNIST networks, with SGD
//! (momentum 0.9) and AdamW, through `train_step` (the fast MLP path on the CPU) and through
//! candle's autograd (`train_step_autograd`, the path before issue 7), plus the student's
//! distillation step (KD loss against soft targets, T = 20, alpha = 0.9). The last column is the
//! optimizer update alone (our fused in-place pass), on gradients of one real step.
//!
//! `cargo bench -p distill-core --bench train_speed`. Environment: `BENCH_SECS` (seconds per
//! case, default 4), `BENCH_ARCHS` (comma-separated, default the three below), `BENCH_PATHS`
//! (`fast,autograd` by default), `BENCH_OBJ` (`ce,kd` by default; kd runs for MLPs only). Set
//! `RAYON_NUM_THREADS` to pin the thread count; on a shared machine check it is quiet. Lines
//! starting with `RESULT` carry the figures as JSON.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benches fail loudly by design

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use distill_core::model::TrainableModel;
use distill_core::optim::{OptimConfig, Optimizer};
use distill_core::spec::{Arch, ModelSpec};
use distill_core::speed::{Budget, StepObjective, StepPath, measure};

const BATCH: usize = 128;

// As in the `distill` binary: glibc malloc's page faults otherwise dominate candle on the CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let archs = std::env::var("BENCH_ARCHS").unwrap_or_else(|_| {
        "mlp:784-800-800-10,mlp:784-1200-1200-10,conv:32-64-256-10".to_string()
    });
    let paths = std::env::var("BENCH_PATHS").unwrap_or_else(|_| "fast,autograd".into());
    let objs = std::env::var("BENCH_OBJ").unwrap_or_else(|_| "ce,kd".into());
    let budget = Duration::from_secs_f64(secs);
    println!(
        "threads {}, batch {BATCH}, {secs} s per case",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<22} {:<6} {:<4} {:>14} {:>14} {:>8} {:>10}",
        "arch", "optim", "loss", "fast samples/s", "autograd s/s", "speedup", "update ms"
    );
    for arch in archs.split(',') {
        let arch = Arch::parse(arch.trim())?;
        // The teacher trains with dropout; the others without (as in the baselines).
        let mut spec = ModelSpec::new(arch.clone());
        if arch.to_string() == "mlp:784-1200-1200-10" {
            spec.dropout = 0.5;
            spec.input_dropout = 0.2;
        }
        let is_mlp = matches!(arch, Arch::Mlp { .. });
        for (name, cfg) in [
            ("sgd", OptimConfig::sgd(0.01, 0.9)),
            ("adamw", OptimConfig::adamw(1e-4, 0.0)),
        ] {
            for obj in objs.split(',') {
                let objective = match obj.trim() {
                    "ce" => StepObjective::CrossEntropy,
                    "kd" if is_mlp => StepObjective::Kd {
                        temperature: 20.0,
                        alpha: 0.9,
                    },
                    _ => continue,
                };
                let run = |path: &str, p: StepPath| -> anyhow::Result<Option<f64>> {
                    if !paths.split(',').any(|x| x.trim() == path) {
                        return Ok(None);
                    }
                    Ok(Some(measure(
                        &spec,
                        &cfg,
                        BATCH,
                        Budget::Seconds(secs),
                        objective,
                        p,
                    )?))
                };
                let fast = run("fast", StepPath::Default)?;
                let slow = run("autograd", StepPath::Autograd)?;
                let update = update_ms(&spec, &cfg, budget / 4)?;
                let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                let speedup = match (fast, slow) {
                    (Some(f), Some(s)) => format!("{:.2}x", f / s),
                    _ => "-".into(),
                };
                println!(
                    "{:<22} {:<6} {:<4} {:>14} {:>14} {:>8} {:>10.2}",
                    arch.to_string(),
                    name,
                    obj.trim(),
                    fmt(fast),
                    fmt(slow),
                    speedup,
                    update
                );
                println!(
                    "RESULT {}",
                    serde_json::json!({
                        "arch": arch.to_string(), "optim": name, "loss": obj.trim(),
                        "threads": candle_core::utils::get_num_threads(), "batch": BATCH,
                        "fast_samples_per_s": fast, "autograd_samples_per_s": slow,
                        "update_ms": update,
                    })
                );
            }
        }
    }
    Ok(())
}

/// Milliseconds per optimizer update (the fused in-place pass), on the gradients of one step.
fn update_ms(spec: &ModelSpec, cfg: &OptimConfig, budget: Duration) -> anyhow::Result<f64> {
    let dev = Device::Cpu;
    let arch = &spec.arch;
    let tm = TrainableModel::init(spec.clone(), 0, &dev)?;
    let mut opt = Optimizer::new(cfg.clone(), tm.named_vars()?)?;
    let x = Tensor::rand(0f32, 1f32, [vec![BATCH], arch.input_shape()].concat(), &dev)?;
    let y = Tensor::from_vec(
        (0..BATCH as u32)
            .map(|i| (i * 7) % arch.classes() as u32)
            .collect::<Vec<_>>(),
        BATCH,
        &dev,
    )?;
    let logits = tm.model.forward(&x)?;
    let grads = candle_nn::loss::cross_entropy(&logits, &y)?.backward()?;
    for _ in 0..2 {
        opt.step(&grads, cfg.lr)?;
    }
    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed() < budget || n < 5 {
        opt.step(&grads, cfg.lr)?;
        n += 1;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / f64::from(n))
}
