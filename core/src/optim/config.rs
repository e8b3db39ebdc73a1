//! Optimizer settings and the learning-rate schedule.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.
    #[default]
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov & Hutter).
    #[serde(rename = "adamw")]
    AdamW,
}

impl std::str::FromStr for OptimKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" => Ok(Self::Sgd),
            "adamw" | "adam" => Ok(Self::AdamW),
            other => Err(Error::Config(format!(
                "unknown optimizer `{other}` (expected sgd or adamw)"
            ))),
        }
    }
}

impl std::fmt::Display for OptimKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sgd => "sgd",
            Self::AdamW => "adamw",
        })
    }
}

/// How the learning rate changes over the run, in units of epochs (fractions allowed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// The base learning rate throughout.
    #[default]
    Const,
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: f64,
        /// Factor applied at each decay, in (0, 1].
        gamma: f64,
    },
    /// Half a cosine from the base rate at the start to `final_frac` × base at the last step.
    Cosine {
        /// Final learning rate as a fraction of the base rate, in [0, 1].
        #[serde(default)]
        final_frac: f64,
    },
}

impl Schedule {
    /// Parses `const`, `step` (every 10 epochs × 0.5), `step:EVERY:GAMMA`, `cosine` (to 0) or
    /// `cosine:FINAL_FRAC`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |m: &str| Error::Config(format!("schedule `{s}`: {m}"));
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or("").to_ascii_lowercase();
        let nums = parts
            .map(|p| {
                p.parse::<f64>()
                    .map_err(|_| bad(&format!("`{p}` is not a number")))
            })
            .collect::<Result<Vec<_>>>()?;
        let sched = match (kind.as_str(), nums.as_slice()) {
            ("const" | "constant", []) => Schedule::Const,
            ("step", []) => Schedule::Step {
                every_epochs: 10.0,
                gamma: 0.5,
            },
            ("step", [every, gamma]) => Schedule::Step {
                every_epochs: *every,
                gamma: *gamma,
            },
            ("cosine", []) => Schedule::Cosine { final_frac: 0.0 },
            ("cosine", [f]) => Schedule::Cosine { final_frac: *f },
            _ => {
                return Err(bad(
                    "expected const, step, step:EVERY_EPOCHS:GAMMA, cosine or cosine:FINAL_FRAC",
                ));
            }
        };
        sched.validate()?;
        Ok(sched)
    }

    fn validate(&self) -> Result<()> {
        match *self {
            Schedule::Const => Ok(()),
            Schedule::Step {
                every_epochs,
                gamma,
            } => {
                if !(every_epochs.is_finite() && every_epochs > 0.0) {
                    return Err(Error::Config(format!(
                        "step schedule: every_epochs must be > 0, got {every_epochs}"
                    )));
                }
                if !(gamma > 0.0 && gamma <= 1.0) {
                    return Err(Error::Config(format!(
                        "step schedule: gamma must be in (0, 1], got {gamma}"
                    )));
                }
                Ok(())
            }
            Schedule::Cosine { final_frac } => {
                if !(0.0..=1.0).contains(&final_frac) {
                    return Err(Error::Config(format!(
                        "cosine schedule: final_frac must be in [0, 1], got {final_frac}"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// Optimizer, schedule and clipping settings (a section of a run config; every field has a
/// default, so `{}` is plain SGD at lr 0.05 with momentum 0.9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Update rule.
    pub kind: OptimKind,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum μ in [0, 1) (0: plain SGD). Ignored by AdamW.
    pub momentum: f64,
    /// Nesterov momentum (SGD only; needs momentum > 0).
    pub nesterov: bool,
    /// Weight decay: L2 added to the gradient for SGD, decoupled (p·(1 − lr·wd)) for AdamW.
    pub weight_decay: f64,
    /// AdamW β₁, β₂ in [0, 1).
    pub betas: [f64; 2],
    /// AdamW ε > 0.
    pub eps: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Linear warmup from ~0 to the scheduled rate over this many epochs (0: none).
    pub warmup_epochs: f64,
    /// Scale gradients so their global L2 norm is at most this (None: no clipping).
    pub clip_grad_norm: Option<f64>,
    /// Max-norm constraint (Srivastava et al. 2014, the regulariser of Hinton et al.'s MNIST
    /// teacher): after each update, every hidden unit's incoming weight vector (a row of each
    /// `.weight` but the output layer's) longer than this is scaled back to this L2 norm.
    /// None: off.
    pub max_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Sgd,
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            schedule: Schedule::Const,
            warmup_epochs: 0.0,
            clip_grad_norm: None,
            max_norm: None,
        }
    }
}

impl OptimConfig {
    /// SGD with the given learning rate and momentum, everything else default.
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        Self {
            lr,
            momentum,
            ..Self::default()
        }
    }

    /// AdamW with the given learning rate and weight decay, everything else default.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        Self {
            kind: OptimKind::AdamW,
            lr,
            weight_decay,
            ..Self::default()
        }
    }

    /// The usual base learning rate of each kind (0.05 for SGD with momentum, 1e-3 for AdamW).
    pub fn default_lr(kind: OptimKind) -> f64 {
        match kind {
            OptimKind::Sgd => 0.05,
            OptimKind::AdamW => 1e-3,
        }
    }

    /// Checks every setting; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.nesterov && (self.kind != OptimKind::Sgd || self.momentum == 0.0) {
            return bad("nesterov needs sgd with momentum > 0".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad(format!("betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be > 0, got {}", self.eps));
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            return bad(format!(
                "warmup_epochs must be >= 0, got {}",
                self.warmup_epochs
            ));
        }
        if let Some(c) = self.clip_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("clip_grad_norm must be > 0, got {c}"));
        }
        if let Some(c) = self.max_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("max_norm must be > 0, got {c}"));
        }
        self.schedule.validate()
    }

    /// The learning rate of the update numbered `step` (0-based) in a run of `epochs` epochs of
    /// `steps_per_epoch` updates each: the schedule at the epoch progress `step /
    /// steps_per_epoch`, times the warmup factor `min(1, (step + 1) / warmup_steps)`.
    pub fn lr_at(&self, step: u64, steps_per_epoch: u64, epochs: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        let progress = step as f64 / spe;
        let base = match self.schedule {
            Schedule::Const => self.lr,
            Schedule::Step {
                every_epochs,
                gamma,
            } => self.lr * gamma.powf((progress / every_epochs).floor()),
            Schedule::Cosine { final_frac } => {
                // t runs 0 → 1 over the run, reaching 1 at the last step.
                let last = (epochs as f64 * spe - 1.0).max(1.0);
                let t = (step as f64 / last).min(1.0);
                let c = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                self.lr * (final_frac + (1.0 - final_frac) * c)
            }
        };
        let warmup_steps = self.warmup_epochs * spe;
        if warmup_steps > 0.0 {
            base * ((step as f64 + 1.0) / warmup_steps).min(1.0)
        } else {
            base
        }
    }
}
