//! The distillation objective plugged into `distill_core::train::train_step`: the KD loss of
//! the current batch's logits against that batch's soft targets and hard labels.

use candle_core::Tensor;
use distill_core::kd::kd_loss;
use distill_core::token_kd::{Divergence, token_kd_loss};
use distill_core::topk::{SparseTargets, kd_loss_topk};
use distill_core::train::{Batch, Objective};

/// One batch's soft targets.
#[derive(Debug, Clone)]
enum Targets {
    Dense(Tensor),
    TopK(SparseTargets),
}

/// `alpha·T²·KL(p_teacher(T) ‖ p_student(T)) + (1 − alpha)·CE(y, p_student(1))` for one batch.
///
/// The soft targets travel with the batch, not with the rows, so the caller hands each batch's
/// targets over with [`KdObjective::set_targets`] right before the step; [`Objective::loss`]
/// takes them, so a step can never reuse another batch's targets.
#[derive(Debug, Clone)]
pub struct KdObjective {
    temperature: f64,
    alpha: f64,
    targets: Option<Targets>,
    per_token: bool,
}

impl KdObjective {
    /// An objective at temperature `temperature` weighing the soft term by `alpha`.
    pub fn new(temperature: f64, alpha: f64) -> Self {
        Self {
            temperature,
            alpha,
            targets: None,
            per_token: false,
        }
    }

    /// The objective of a language model, one row per position: top-k targets take the
    /// per-token loss with a tail bucket ([`token_kd_loss`], forward KL), which asks nothing
    /// of the student about how the teacher's unsent mass is shared among the vocabulary.
    pub fn per_token(temperature: f64, alpha: f64) -> Self {
        Self {
            per_token: true,
            ..Self::new(temperature, alpha)
        }
    }

    /// Sets the soft targets `[B, classes]` of the next [`Objective::loss`] call.
    pub fn set_targets(&mut self, soft_targets: Tensor) {
        self.targets = Some(Targets::Dense(soft_targets));
    }

    /// Sets top-k soft targets (`distill_core::topk`) for the next [`Objective::loss`] call;
    /// the loss is then [`kd_loss_topk`], which never builds the dense target.
    pub fn set_sparse_targets(&mut self, soft_targets: SparseTargets) {
        self.targets = Some(Targets::TopK(soft_targets));
    }
}

impl Objective for KdObjective {
    fn name(&self) -> &str {
        "kd"
    }

    /// # Shapes
    /// `logits`: `[B, classes]`, `batch.y`: `[B]`, the targets: `[B, classes]` → `[]`.
    fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> distill_core::Result<Tensor> {
        let targets = self.targets.take().ok_or_else(|| {
            distill_core::Error::Input(
                "KD objective called without the batch's soft targets".into(),
            )
        })?;
        let (t, a, y) = (self.temperature, self.alpha, Some(&batch.y));
        Ok(match targets {
            Targets::Dense(p) => kd_loss(logits, &p, y, t, a)?.total,
            Targets::TopK(p) if self.per_token => {
                let mask = vec![1f32; p.rows()];
                token_kd_loss(logits, &p, &batch.y, &mask, t, a, Divergence::ForwardKl)?.loss
            }
            Targets::TopK(p) => kd_loss_topk(logits, &p, y, t, a)?.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn gives_the_same_loss_as_kd_loss_and_consumes_its_targets() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, -1.0, 0.5], [0.1, 0.2, 3.0]], &dev).unwrap();
        let soft = Tensor::new(&[[0.6f32, 0.1, 0.3], [0.2, 0.2, 0.6]], &dev).unwrap();
        let y = Tensor::new(&[0u32, 2], &dev).unwrap();
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let batch = Batch {
            idx: &[],
            x,
            y: y.clone(),
        };
        let mut obj = KdObjective::new(3.0, 0.7);
        obj.set_targets(soft.clone());
        let got = obj
            .loss(&batch, &logits)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = kd_loss(&logits, &soft, Some(&y), 3.0, 0.7)
            .unwrap()
            .total
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(got.to_bits(), want.to_bits());
        // Against a different temperature the value differs, so the comparison means something.
        let other = kd_loss(&logits, &soft, Some(&y), 1.0, 0.7)
            .unwrap()
            .total
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - other).abs() > 1e-3, "{got} vs {other}");

        let e = obj.loss(&batch, &logits).unwrap_err().to_string();
        assert!(e.contains("without the batch's soft targets"), "{e}");
    }
}
