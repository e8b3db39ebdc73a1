//! One optimisation step and what it works on: the [`Batch`], the [`Objective`] it minimises,
//! its [`StepOutput`], and the reference step through candle's autograd
//! ([`train_step_autograd`]). [`crate::fast_mlp`] builds its fast path on these, and
//! [`crate::train::train_step`] picks between the two, so neither of those modules needs the
//! other's internals.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::TrainableModel;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// A batch as a step sees it.
pub struct Batch<'a> {
    /// Row indices of the batch in its split (for looking up per-row data such as soft targets).
    pub idx: &'a [usize],
    /// Inputs `[B, ...input_shape]` f32 (after jitter).
    pub x: Tensor,
    /// Hard labels `[B]` u32.
    pub y: Tensor,
}

/// The loss a step minimises.
pub trait Objective {
    /// Short name for logs and reports, e.g. `ce`.
    fn name(&self) -> &str;

    /// The scalar loss (mean over the batch) of `logits`, computed from the training forward pass.
    ///
    /// # Shapes
    /// `logits`: `[B, classes]`, `batch.y`: `[B]` → `[]`.
    fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> Result<Tensor>;
}

/// Cross-entropy on the hard labels (supervised training).
#[derive(Debug, Clone, Copy, Default)]
pub struct CrossEntropy;

impl Objective for CrossEntropy {
    fn name(&self) -> &str {
        "ce"
    }

    fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::loss::cross_entropy(logits, &batch.y)?)
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// The objective's loss before the update.
    pub loss: f32,
    /// Rows whose arg-max logit equals the hard label.
    pub correct: usize,
    /// Rows in the batch.
    pub samples: usize,
    /// Global gradient norm before clipping (when clipping is on).
    pub grad_norm: Option<f32>,
}

/// The rng for update number `step` of a run seeded with `seed`: it draws that update's jitter
/// offsets, then its dropout masks. Stream 0 is left to weight initialisation.
pub fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(step.wrapping_add(1));
    r
}

/// [`crate::train::train_step`] through candle's autograd for every model (any arch, device and precision):
/// the reference the fast path is tested against.
pub fn train_step_autograd(
    model: &TrainableModel,
    opt: &mut Optimizer,
    batch: &Batch<'_>,
    lr: f64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<StepOutput> {
    let (out, grads) = gradients_autograd(model, batch, opt.step_count() + 1, rng, objective)?;
    let stats = opt.step(&grads, lr)?;
    Ok(StepOutput {
        grad_norm: stats.grad_norm,
        ..out
    })
}

/// The forward and backward pass of update number `update` through candle's autograd, without
/// the update: the loss's gradients (keyed by the model's variables) and the step's figures
/// (`grad_norm` is the optimizer's to say, so `None`).
pub fn gradients_autograd(
    model: &TrainableModel,
    batch: &Batch<'_>,
    update: u64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<(StepOutput, GradStore)> {
    let logits = model.model.forward_train(&batch.x, rng)?;
    let loss = objective.loss(batch, &logits)?;
    let value = check_loss(&loss, objective, update)?;
    let grads = loss.backward()?;
    Ok((
        StepOutput {
            loss: value,
            correct: count_correct(&logits.detach(), &batch.y)?,
            samples: batch.x.dim(0)?,
            grad_norm: None,
        },
        grads,
    ))
}

/// The loss's value, or the "diverged" error when it is not finite (before any update).
pub(crate) fn check_loss(loss: &Tensor, objective: &dyn Objective, update: u64) -> Result<f32> {
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if !value.is_finite() {
        return Err(Error::Config(format!(
            "training diverged: {} loss is {value} at update {}; lower the learning rate or set \
             a gradient clip",
            objective.name(),
            update
        )));
    }
    Ok(value)
}

/// Rows of `logits` `[B, classes]` whose arg-max equals `labels` `[B]`.
pub fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?;
    let hits = pred.eq(labels)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(hits.to_scalar::<u32>()? as usize)
}
