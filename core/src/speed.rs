//! Measuring the training step's throughput: [`measure_steps`] times full steps of
//! [`train_step`] (forward, loss, backward, update) on random data, as `distill bench` and the
//! `train_speed` bench report it, to be set beside PyTorch's figure for the same network
//! (`shared/bench/torch_kd.py`).
//!
//! The thread count is candle's (`RAYON_NUM_THREADS`, else the number of cores); set it before
//! the first candle call. The binaries use mimalloc as their allocator; a caller measuring from
//! another binary should too (glibc malloc's page faults cost candle up to 2×).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kd::{kd_loss, tempered_softmax};
use crate::model::TrainableModel;
use crate::optim::{OptimConfig, Optimizer};
use crate::spec::ModelSpec;
use crate::train::{Batch, CrossEntropy, Objective, step_rng, train_step, train_step_autograd};
use crate::{Error, Result};

/// The loss of the measured step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepObjective {
    /// Cross-entropy on hard labels (supervised training, teachers and baselines).
    CrossEntropy,
    /// The distillation loss [`kd_loss`] against soft targets held in memory (tempered softmax
    /// of random teacher logits at `temperature`), with hard labels, as a student worker trains.
    Kd {
        /// The temperature T.
        temperature: f64,
        /// The weight of the soft term.
        alpha: f64,
    },
}

/// Distinct batches cycled through by [`measure_steps`].
const BATCHES: usize = 8;
/// Steps run before the clock starts.
const WARMUP: usize = 3;

/// Which step function is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepPath {
    /// [`train_step`]: the fast MLP path where it applies (CPU, f32), else autograd.
    #[default]
    Default,
    /// [`train_step_autograd`]: candle's autograd for every model (the reference the fast path
    /// is checked against).
    Autograd,
}

/// How long [`measure`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Exactly this many timed steps.
    Steps(usize),
    /// Steps until this many seconds have passed (at least 5 steps).
    Seconds(f64),
}

/// Samples per second of `steps` training steps (after 3 untimed warm-up steps) of `spec`
/// (its dropout included) with `optim`, at `batch` rows per step, on the CPU, with `objective`,
/// through [`train_step`] (what training runs). Inputs are uniform in [0, 1), labels
/// `(7·i) mod classes`, everything seeded, so two calls do the same arithmetic.
///
/// ```no_run
/// use distill_core::optim::OptimConfig;
/// use distill_core::spec::{Arch, ModelSpec};
/// use distill_core::speed::{StepObjective, measure_steps};
/// let spec = ModelSpec::new(Arch::parse("mlp:784-800-800-10")?);
/// let kd = StepObjective::Kd { temperature: 20.0, alpha: 0.9 };
/// let per_s = measure_steps(&spec, &OptimConfig::sgd(0.01, 0.9), 128, 200, kd)?;
/// println!("student KD step: {per_s:.0} samples/s");
/// # Ok::<(), distill_core::Error>(())
/// ```
pub fn measure_steps(
    spec: &ModelSpec,
    optim: &OptimConfig,
    batch: usize,
    steps: usize,
    objective: StepObjective,
) -> Result<f64> {
    measure(
        spec,
        optim,
        batch,
        Budget::Steps(steps),
        objective,
        StepPath::Default,
    )
}

/// [`measure_steps`] with the step function and the time budget chosen.
pub fn measure(
    spec: &ModelSpec,
    optim: &OptimConfig,
    batch: usize,
    budget: Budget,
    objective: StepObjective,
    path: StepPath,
) -> Result<f64> {
    match budget {
        Budget::Steps(0) => return Err(Error::Config("steps must be >= 1".into())),
        Budget::Seconds(s) if !(s.is_finite() && s > 0.0) => {
            return Err(Error::Config(format!("cannot measure for {s} s")));
        }
        _ => {}
    }
    if batch == 0 {
        return Err(Error::Config("batch must be >= 1".into()));
    }
    let dev = Device::Cpu;
    let arch = &spec.arch;
    let classes = arch.classes();
    let n = batch * BATCHES;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let x: Vec<f32> = (0..n * arch.input_size()).map(|_| rng.random()).collect();
    let x = Tensor::from_vec(x, [vec![n], arch.input_shape()].concat(), &dev)?;
    let y: Vec<u32> = (0..n as u32).map(|i| (i * 7) % classes as u32).collect();
    let y = Tensor::from_vec(y, n, &dev)?;
    let mut objective = StepLoss {
        kd: match objective {
            StepObjective::CrossEntropy => None,
            StepObjective::Kd { temperature, alpha } => {
                // Random teacher logits of a plausible spread, made soft targets once.
                let z: Vec<f32> = (0..n * classes)
                    .map(|_| rng.random_range(-8.0f32..8.0))
                    .collect();
                let z = Tensor::from_vec(z, (n, classes), &dev)?;
                Some((tempered_softmax(&z, temperature)?, temperature, alpha))
            }
        },
        rows: 0..0,
    };
    let tm = TrainableModel::init(spec.clone(), 0, &dev)?;
    let mut opt = Optimizer::new(optim.clone(), tm.named_vars()?)?;
    let idx: Vec<usize> = (0..n).collect();
    let mut step = |i: usize| -> Result<()> {
        let b = i % BATCHES;
        let rows = b * batch..(b + 1) * batch;
        objective.rows = rows.clone();
        let batch = Batch {
            idx: &idx[rows.clone()],
            x: x.narrow(0, rows.start, batch)?,
            y: y.narrow(0, rows.start, batch)?,
        };
        let mut rng = step_rng(0, i as u64);
        match path {
            StepPath::Default => {
                train_step(&tm, &mut opt, &batch, optim.lr, &mut rng, &mut objective)?
            }
            StepPath::Autograd => {
                train_step_autograd(&tm, &mut opt, &batch, optim.lr, &mut rng, &mut objective)?
            }
        };
        Ok(())
    };
    for i in 0..WARMUP {
        step(i)?;
    }
    let t = Instant::now();
    let mut steps = 0;
    loop {
        let done = match budget {
            Budget::Steps(n) => steps >= n,
            Budget::Seconds(s) => steps >= 5 && t.elapsed().as_secs_f64() >= s,
        };
        if done {
            break;
        }
        step(WARMUP + steps)?;
        steps += 1;
    }
    Ok((steps * batch) as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// The measured loss: cross-entropy, or [`kd_loss`] against the soft targets of the batch's
/// rows (as the student worker's objective computes it).
struct StepLoss {
    /// `(soft targets [n, classes], T, alpha)`.
    kd: Option<(Tensor, f64, f64)>,
    /// The rows of the next batch.
    rows: std::ops::Range<usize>,
}

impl Objective for StepLoss {
    fn name(&self) -> &str {
        if self.kd.is_some() { "kd" } else { "ce" }
    }

    fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> Result<Tensor> {
        match &self.kd {
            None => CrossEntropy.loss(batch, logits),
            Some((targets, t, alpha)) => {
                let p = targets.narrow(0, self.rows.start, self.rows.len())?;
                Ok(kd_loss(logits, &p, Some(&batch.y), *t, *alpha)?.total)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Arch;

    #[test]
    fn measures_both_objectives() {
        let spec = ModelSpec::new(Arch::parse("mlp:784-16-10").unwrap());
        for obj in [
            StepObjective::CrossEntropy,
            StepObjective::Kd {
                temperature: 20.0,
                alpha: 0.9,
            },
        ] {
            let s = measure_steps(&spec, &OptimConfig::adamw(1e-3, 0.0), 16, 4, obj).unwrap();
            assert!(s.is_finite() && s > 0.0, "{obj:?}: {s}");
        }
        assert!(
            measure_steps(
                &spec,
                &OptimConfig::sgd(0.1, 0.9),
                0,
                4,
                StepObjective::CrossEntropy
            )
            .is_err()
        );
    }
}
