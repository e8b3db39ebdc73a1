//! Training throughput at batch 128 on random data: samples/s of a full step (training forward
//! with the spec's dropout, cross-entropy, backward, optimizer update) for the MNIST networks,
//! with SGD (momentum 0.9) and AdamW; plus the optimizer update alone, ours (fused, in place)
//! against candle-nn's `AdamW`/`SGD` on the same parameters.
//!
//! `cargo bench -p distill-core --bench train_speed`. Environment: `BENCH_SECS` (seconds per
//! case, default 4), `BENCH_ARCHS` (comma-separated, default the three below). Set
//! `RAYON_NUM_THREADS` to pin the thread count; on a shared machine check it is quiet.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer as _, ParamsAdamW, SGD};
use distill_core::model::TrainableModel;
use distill_core::optim::{OptimConfig, Optimizer};
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{Batch, CrossEntropy, step_rng, train_step};

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
    let budget = Duration::from_secs_f64(secs);
    let dev = Device::Cpu;
    println!(
        "threads {}, batch {BATCH}, {secs} s per case",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<22} {:<7} {:>12} {:>12} {:>14} {:>14}",
        "arch", "optim", "step/s", "samples/s", "update ms", "candle-nn ms"
    );
    for arch in archs.split(',') {
        let arch = Arch::parse(arch.trim())?;
        // The teacher trains with dropout; the others without (as in the baselines).
        let mut spec = ModelSpec::new(arch.clone());
        if arch.to_string() == "mlp:784-1200-1200-10" {
            spec.dropout = 0.5;
            spec.input_dropout = 0.2;
        }
        let n = BATCH * 8;
        let x = Tensor::rand(0f32, 1f32, [vec![n], arch.input_shape()].concat(), &dev)?;
        let y = Tensor::from_vec(
            (0..n as u32)
                .map(|i| (i * 7) % arch.classes() as u32)
                .collect::<Vec<_>>(),
            n,
            &dev,
        )?;
        for (name, cfg) in [
            ("sgd", OptimConfig::sgd(0.01, 0.9)),
            ("adamw", OptimConfig::adamw(1e-4, 0.0)),
        ] {
            let tm = TrainableModel::init(spec.clone(), 0, &dev)?;
            let mut opt = Optimizer::new(cfg.clone(), tm.named_vars()?)?;
            let mut step = |i: u64| -> anyhow::Result<()> {
                let b = (i as usize) % 8;
                let idx: Vec<usize> = (b * BATCH..(b + 1) * BATCH).collect();
                let batch = Batch {
                    idx: &idx,
                    x: x.narrow(0, b * BATCH, BATCH)?,
                    y: y.narrow(0, b * BATCH, BATCH)?,
                };
                let mut rng = step_rng(0, i);
                train_step(&tm, &mut opt, &batch, cfg.lr, &mut rng, &mut CrossEntropy)?;
                Ok(())
            };
            for i in 0..3 {
                step(i)?;
            }
            let t = Instant::now();
            let mut steps = 0u64;
            while t.elapsed() < budget || steps < 5 {
                step(3 + steps)?;
                steps += 1;
            }
            let per_s = steps as f64 / t.elapsed().as_secs_f64();

            // The update alone, on gradients of one real step.
            let vars = tm.named_vars()?;
            let logits = tm.model.forward(&x.narrow(0, 0, BATCH)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y.narrow(0, 0, BATCH)?)?;
            let grads = loss.backward()?;
            let ours = time_per_call(budget / 4, || {
                opt.step(&grads, cfg.lr)?;
                Ok(())
            })?;
            let plain: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            let theirs = if name == "sgd" {
                // candle-nn's SGD has no momentum: a lower bound on its cost.
                let mut o = SGD::new(plain, cfg.lr)?;
                time_per_call(budget / 4, || Ok(o.step(&grads)?))?
            } else {
                let mut o = AdamW::new(
                    plain,
                    ParamsAdamW {
                        lr: cfg.lr,
                        weight_decay: 0.0,
                        ..Default::default()
                    },
                )?;
                time_per_call(budget / 4, || Ok(o.step(&grads)?))?
            };
            println!(
                "{:<22} {:<7} {:>12.1} {:>12.0} {:>14.2} {:>14.2}",
                arch.to_string(),
                name,
                per_s,
                per_s * BATCH as f64,
                ours * 1e3,
                theirs * 1e3
            );
        }
    }
    Ok(())
}

/// Mean seconds per call of `f` over about `budget` (at least 5 calls, after 2 warm-up calls).
fn time_per_call(
    budget: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    f()?;
    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed() < budget || n < 5 {
        f()?;
        n += 1;
    }
    Ok(t.elapsed().as_secs_f64() / n as f64)
}
