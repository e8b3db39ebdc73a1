//! What a student worker trains with: the settings a coordinator hands out on `Join`
//! (serialised as JSON in `JoinResponse.settings_json`).

use serde::{Deserialize, Serialize};

use crate::optim::OptimConfig;
use crate::spec::ModelSpec;
use crate::{Error, Result};

/// The student and its distillation hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSettings {
    /// The student network (with its dropout).
    pub spec: ModelSpec,
    /// Optimizer, learning-rate schedule and clipping.
    pub optim: OptimConfig,
    /// Distillation temperature T (> 0).
    pub temperature: f64,
    /// Weight of the soft-target term, in [0, 1]; 1 − alpha weighs the hard-label term.
    pub alpha: f64,
    /// Passes over the training split.
    pub epochs: u32,
    /// Rows per batch.
    pub batch_size: usize,
    /// Seed of the student's initial weights and dropout masks.
    pub seed: u64,
    /// Write a worker checkpoint every this many updates (0: only at epoch ends and the end).
    pub checkpoint_every: u64,
    /// Arithmetic of the student's forward and backward passes (f32, or bf16 with f32 master
    /// weights; see [`crate::model::Precision`]).
    #[serde(default)]
    pub precision: crate::model::Precision,
    /// Where a language-model student's initial weights come from, instead of the seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<StudentInit>,
}

/// A student initialised from a model file rather than from the seed: a teacher's layers
/// (Minitron-style) or a checkpoint. Each role that needs the initial weights (every worker,
/// and the coordinator in a gradient-averaging run) reads `path` itself, so it must be
/// readable there, and checks what it read against `digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentInit {
    /// A `.gguf` file or a Hugging Face checkpoint directory.
    pub path: std::path::PathBuf,
    /// The decoder layers kept, renumbered from 0 in this order (all when None).
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// The weights digest ([`crate::lm::weights_digest`]) of the initial tensors, as the
    /// coordinator read them ("" until it has).
    #[serde(default)]
    pub digest: String,
}

impl StudentInit {
    /// The initial tensors, checked against [`Self::digest`] when it is set.
    pub fn read(
        &self,
        device: &candle_core::Device,
    ) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
        let (_, tensors) = crate::lm::read_parts(&self.path, self.layers.as_deref(), device)?;
        if !self.digest.is_empty() {
            let got = crate::lm::weights_digest(&tensors)?;
            if got != self.digest {
                return Err(Error::Config(format!(
                    "{}: the student's initial weights have digest {got}, but the run's are {}: \
                     the file differs from the coordinator's",
                    self.path.display(),
                    self.digest
                )));
            }
        }
        Ok(tensors)
    }
}

impl StudentSettings {
    /// Checks every value and names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        self.optim.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        if !self.temperature.is_finite() || self.temperature <= 0.0 {
            return bad(format!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad(format!("alpha must be in [0, 1], got {}", self.alpha));
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        Ok(())
    }
}
