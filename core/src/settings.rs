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
