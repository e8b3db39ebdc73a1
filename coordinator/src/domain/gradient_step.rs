//! The optimizer of a gradient-averaging run (`[sync] average = "gradients"`).
//!
//! In synchronous data parallelism every worker computes one batch's gradients and takes no
//! step of its own; the round's rows-weighted average of those gradients is the gradient of the
//! mean loss over all the round's rows, and one step of the student's optimizer on it gives
//! what one worker would get from one batch of all those rows. That step is taken here, once,
//! by the run's own copy of the student's optimizer ([`distill_core::optim::Optimizer`], the
//! very code a worker steps with, on the CPU), so the round's result is parameters again:
//! joining workers, commit points, per-epoch scoring and the final student work as in a
//! parameter-averaging run, and a joiner needs no optimizer state (the moments live here, and
//! are written with every commit point).
//!
//! The learning-rate schedule counts an epoch as `ceil(batches_per_epoch / min_workers)`
//! updates: the updates one worker with `min_workers` times the batch makes per epoch.
//!
//! This is deterministic CPU arithmetic with no I/O and no clock, so the rounds stay a pure
//! state machine; the cost is one optimizer step per round on the coordinator.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use distill_core::optim::{OptimConfig, OptimState, Optimizer};
use distill_core::settings::StudentSettings;
use distill_proto::params::Param;

/// The run's student optimizer, stepping on averaged gradients.
pub struct GradientStep {
    vars: Vec<(String, Var)>,
    opt: Optimizer,
    cfg: OptimConfig,
    steps_per_epoch: u64,
    epochs: usize,
}

impl std::fmt::Debug for GradientStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradientStep")
            .field("params", &self.vars.len())
            .field("steps", &self.opt.step_count())
            .field("steps_per_epoch", &self.steps_per_epoch)
            .finish()
    }
}

impl GradientStep {
    /// The optimizer of `settings`, with fresh state, and the run's seeded initial parameters
    /// (the same a worker initialises itself with), in model order.
    pub fn new(
        settings: &StudentSettings,
        batches_per_epoch: u64,
        min_workers: usize,
    ) -> Result<(Self, Vec<Param>), String> {
        let init = distill_core::model::initial_params(settings).map_err(|e| e.to_string())?;
        let vars = init
            .iter()
            .map(|(name, shape, v)| {
                Var::from_slice(v, shape.as_slice(), &Device::Cpu).map(|var| (name.clone(), var))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| format!("the run's initial parameters: {e}"))?;
        let opt = Optimizer::new(settings.optim.clone(), vars.clone())
            .map_err(|e| format!("the run's optimizer: {e}"))?;
        let workers = (min_workers.max(1)) as u64;
        Ok((
            Self {
                vars,
                opt,
                cfg: settings.optim.clone(),
                steps_per_epoch: batches_per_epoch.div_ceil(workers).max(1),
                epochs: settings.epochs as usize,
            },
            init,
        ))
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.opt.step_count()
    }

    /// One update from `prev` on the gradients `grad` (both in model order, shapes checked
    /// when the contributions were accepted); the new parameters.
    pub fn step(&mut self, prev: &[Param], grad: &[Param]) -> Result<Vec<Param>, String> {
        if prev.len() != self.vars.len() || grad.len() != self.vars.len() {
            return Err(format!(
                "{} parameters and {} gradients for a model of {}",
                prev.len(),
                grad.len(),
                self.vars.len()
            ));
        }
        let mut store = GradStore::default();
        for ((name, var), ((_, shape, p), (gname, gshape, g))) in
            self.vars.iter().zip(prev.iter().zip(grad))
        {
            if gname != name || gshape != shape || var.dims() != shape.as_slice() {
                return Err(format!(
                    "gradient `{gname}` {gshape:?} where `{name}` {:?} was expected",
                    var.dims()
                ));
            }
            let e = |e: candle_core::Error| format!("`{name}`: {e}");
            var.set(&Tensor::from_slice(p, shape.as_slice(), &Device::Cpu).map_err(e)?)
                .map_err(e)?;
            store.insert(
                var.as_tensor(),
                Tensor::from_slice(g, shape.as_slice(), &Device::Cpu).map_err(e)?,
            );
        }
        let lr = self
            .cfg
            .lr_at(self.opt.step_count(), self.steps_per_epoch, self.epochs);
        self.opt
            .step(&store, lr)
            .map_err(|e| format!("the optimizer step: {e}"))?;
        self.vars
            .iter()
            .map(|(name, var)| {
                let shape = var.dims().to_vec();
                let v = var
                    .as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| format!("`{name}`: {e}"))?;
                Ok((name.clone(), shape, v))
            })
            .collect()
    }

    /// The optimizer's state (step count and moments) as bytes, for a commit point.
    pub fn state_bytes(&self) -> Result<Vec<u8>, String> {
        self.opt
            .state()
            .and_then(|s| s.to_bytes())
            .map_err(|e| format!("the optimizer state: {e}"))
    }

    /// Restores a commit point's optimizer state.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let state = OptimState::from_bytes(bytes).map_err(|e| e.to_string())?;
        self.opt.load_state(&state).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill_core::optim::OptimConfig;

    fn settings() -> StudentSettings {
        StudentSettings {
            spec: distill_core::spec::ModelSpec {
                arch: distill_core::spec::Arch::parse("mlp:4-3-2").unwrap(),
                dropout: 0.0,
                input_dropout: 0.0,
            },
            optim: OptimConfig::adamw(1e-2, 0.0),
            temperature: 2.0,
            alpha: 0.5,
            epochs: 2,
            batch_size: 4,
            seed: 3,
            checkpoint_every: 0,
            precision: Default::default(),
            init: None,
        }
    }

    #[test]
    fn steps_like_the_students_own_optimizer_and_its_state_round_trips() {
        let s = settings();
        let (mut gs, init) = GradientStep::new(&s, 10, 2).unwrap();
        // The same optimizer on the same values, stepped directly.
        let vars: Vec<(String, Var)> = init
            .iter()
            .map(|(n, sh, v)| {
                (
                    n.clone(),
                    Var::from_slice(v, sh.as_slice(), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let mut reference = Optimizer::new(s.optim.clone(), vars.clone()).unwrap();
        let grad: Vec<Param> = init
            .iter()
            .map(|(n, sh, v)| {
                (
                    n.clone(),
                    sh.clone(),
                    v.iter().map(|x| x * 0.5 - 0.1).collect(),
                )
            })
            .collect();
        let mut prev = init.clone();
        for _ in 0..3 {
            prev = gs.step(&prev, &grad).unwrap();
            let mut store = GradStore::default();
            for ((_, var), (_, sh, g)) in vars.iter().zip(&grad) {
                store.insert(
                    var.as_tensor(),
                    Tensor::from_slice(g, sh.as_slice(), &Device::Cpu).unwrap(),
                );
            }
            reference.step(&store, 1e-2).unwrap();
        }
        for ((_, var), (_, _, p)) in vars.iter().zip(&prev) {
            let r = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(&r, p);
        }
        assert_ne!(prev, init);
        // A restored state continues exactly where the first left off.
        let bytes = gs.state_bytes().unwrap();
        let (mut again, _) = GradientStep::new(&s, 10, 2).unwrap();
        again.restore(&bytes).unwrap();
        assert_eq!(again.steps(), 3);
        assert_eq!(
            again.step(&prev, &grad).unwrap(),
            gs.step(&prev, &grad).unwrap()
        );
        // A gradient of the wrong shape is refused.
        let mut bad = grad.clone();
        bad[0].1 = vec![1, 1];
        assert!(gs.step(&prev, &bad).unwrap_err().contains("was expected"));
    }
}
