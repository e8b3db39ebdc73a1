//! Training: one step function ([`train_step`]) and one loop ([`Trainer::run`]).
//!
//! The step is generic over an [`Objective`] — the loss computed from the training-mode logits
//! of a batch. Supervised training uses [`CrossEntropy`] on the hard labels; distillation plugs
//! in a KD objective (soft targets looked up by the batch's row indices, or a teacher run on the
//! batch's inputs) and reuses the same optimizer, schedule, loop, reporting and resume logic.
//!
//! # Determinism and resuming
//! Everything random is a function of the run's seed and the position in the run:
//! - initial weights: [`crate::model::init_params`] with the seed (ChaCha8 stream 0);
//! - the order of epoch `e`: [`shuffled_indices`]`(n, seed, e)`;
//! - jitter offsets and dropout masks of update `s`: ChaCha8 seeded with the seed, stream
//!   `s + 1` ([`step_rng`]).
//!
//! So the "rng state" of a run is its counters (epoch, batch within the epoch, update number),
//! and a run stopped after any update and resumed from [`Trainer::save_state`] produces
//! bit-identical parameters to one that never stopped.
//!
//! # Training-state file
//! One safetensors file, written atomically: tensors `model.{param}` and `optim.{buffer}` (see
//! [`crate::optim`]), metadata `distill.format = distill-train-state`, `distill.format_version =
//! 1`, `distill.spec` (the [`ModelSpec`]), `distill.train.config` ([`TrainConfig`]),
//! `distill.train.state` ([`TrainState`], including the per-epoch history) and the optimizer's
//! `distill.optim.*` keys. It is separate from the model checkpoint ([`Trainer::checkpoint`]),
//! which holds only what inference needs.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::data::{Dataset, shuffled_indices};
use crate::eval::{EVAL_BATCH, evaluate};
use crate::fsutil::atomic_write;
use crate::model::TrainableModel;
use crate::optim::{OptimConfig, OptimState, Optimizer};
use crate::safetensors_io::{read_safetensors, write_safetensors};
use crate::spec::ModelSpec;
use crate::{Error, Result};

/// `distill.format` of a training-state file.
pub const STATE_FORMAT: &str = "distill-train-state";
const STATE_VERSION: &str = "1";
const KEY_FORMAT: &str = "distill.format";
const KEY_VERSION: &str = "distill.format_version";
const KEY_SPEC: &str = "distill.spec";
const KEY_CONFIG: &str = "distill.train.config";
const KEY_STATE: &str = "distill.train.state";

pub use crate::step::{
    Batch, CrossEntropy, Objective, StepOutput, count_correct, gradients_autograd, step_rng,
    train_step_autograd,
};

/// One optimisation step: training forward pass (dropout masks from `rng`), the objective's
/// loss, backward, clipping and the optimizer update at learning rate `lr`.
///
/// MLPs training in f32 on the CPU take the fast path of [`crate::fast_mlp`] (no autograd graph
/// for the network; same results within rounding, same dropout masks); everything else runs
/// [`train_step_autograd`].
///
/// A non-finite loss is an error and leaves the parameters untouched.
///
/// # Shapes
/// `batch.x`: `[B, ...input_shape]`, `batch.y`: `[B]`.
pub fn train_step(
    model: &TrainableModel,
    opt: &mut Optimizer,
    batch: &Batch<'_>,
    lr: f64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<StepOutput> {
    if let Some(out) = crate::fast_mlp::train_step(model, opt, batch, lr, rng, objective)? {
        return Ok(out);
    }
    train_step_autograd(model, opt, batch, lr, rng, objective)
}

/// The forward and backward pass of update number `update` without the update (the path as in
/// [`train_step`]): the gradients keyed by the model's variables, for an optimizer elsewhere
/// (a gradient-averaging run's workers send them to the coordinator, which steps).
///
/// # Shapes
/// `batch.x`: `[B, ...input_shape]`, `batch.y`: `[B]`.
pub fn step_gradients(
    model: &TrainableModel,
    batch: &Batch<'_>,
    update: u64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<(StepOutput, candle_core::backprop::GradStore)> {
    if let Some(out) = crate::fast_mlp::gradients(model, batch, update, rng, objective)? {
        return Ok(out);
    }
    gradients_autograd(model, batch, update, rng, objective)
}

/// Settings of a training run (resolved values are written next to every model trained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training split.
    pub epochs: usize,
    /// Rows per update (the last batch of an epoch may be smaller).
    pub batch: usize,
    /// Seed of initialisation, shuffling, jitter and dropout.
    pub seed: u64,
    /// Shift training images by up to this many pixels in x and y (0: off). Needs image data.
    pub jitter: usize,
    /// Optimizer, schedule and clipping.
    pub optim: OptimConfig,
    /// Rows per inference batch when scoring the test split.
    pub eval_batch: usize,
    /// Score the test split after every epoch (otherwise only after the last).
    pub eval_every_epoch: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch: 128,
            seed: 0,
            jitter: 0,
            optim: OptimConfig::default(),
            eval_batch: EVAL_BATCH,
            eval_every_epoch: true,
        }
    }
}

impl TrainConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Config("epochs must be >= 1".into()));
        }
        if self.batch == 0 || self.eval_batch == 0 {
            return Err(Error::Config("batch sizes must be >= 1".into()));
        }
        self.optim.validate()
    }
}

/// Where a run is, plus its history: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Epoch in progress (0-based; equals `epochs` when the run is done).
    pub epoch: usize,
    /// Next batch within the epoch.
    pub batch: usize,
    /// Updates done in the whole run.
    pub step: u64,
    /// Sum of batch-mean losses × batch rows, this epoch so far.
    pub loss_sum: f64,
    /// Correct training predictions this epoch so far.
    pub correct: u64,
    /// Training rows seen this epoch so far.
    pub samples: u64,
    /// Seconds spent on batches (gathering + step) this epoch so far.
    pub train_seconds: f64,
    /// Seconds spent in [`train_step`] this epoch so far.
    pub step_seconds: f64,
    /// Finished epochs.
    pub history: Vec<EpochStats>,
}

/// Statistics of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Updates made in the whole run by the end of this epoch.
    pub step: u64,
    /// Mean training loss over the epoch's rows (training mode: dropout on, jittered inputs).
    pub loss: f64,
    /// Fraction of training rows predicted right during the epoch (training mode).
    pub train_accuracy: f64,
    /// Learning rate of the epoch's last update.
    pub lr: f64,
    /// Training rows processed.
    pub samples: u64,
    /// Seconds of training work (batch gathering + steps, no evaluation).
    pub seconds: f64,
    /// `samples / seconds`.
    pub samples_per_s: f64,
    /// Rows per second counting only the steps (forward, backward, update).
    pub step_samples_per_s: f64,
    /// Test-split errors after the epoch, when scored.
    pub test_errors: Option<usize>,
    /// Test-split rows.
    pub test_n: usize,
    /// Seconds spent scoring the test split.
    pub eval_seconds: f64,
}

/// A step's progress, reported after every update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Epoch in progress, 1-based.
    pub epoch: usize,
    /// Epochs in the run.
    pub epochs: usize,
    /// Batches done in this epoch.
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Updates done in the run.
    pub step: u64,
    /// This step's loss.
    pub loss: f32,
    /// Mean loss of the epoch so far.
    pub epoch_loss: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Training rows per second in this epoch so far.
    pub samples_per_s: f64,
}

/// What the loop reports to its caller.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// After every update.
    Step(&'a StepProgress),
    /// After every epoch, with its test score.
    Epoch(&'a EpochStats),
}

/// A model, its optimizer, the run's settings and where the run is.
pub struct Trainer {
    /// The model being trained.
    pub model: TrainableModel,
    /// Its optimizer.
    pub opt: Optimizer,
    /// The run's settings.
    pub cfg: TrainConfig,
    /// Counters and history.
    pub state: TrainState,
    /// When set, the loop saves the training state here after every epoch and when stopped.
    pub state_path: Option<PathBuf>,
}

impl Trainer {
    /// A new run: weights initialised from `cfg.seed`.
    pub fn new(spec: ModelSpec, cfg: TrainConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let model = TrainableModel::init(spec, cfg.seed, device)?;
        Self::from_model(model, cfg)
    }

    /// A new run starting from the given weights (fine-tuning, or a student's initial weights).
    pub fn from_model(model: TrainableModel, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let opt = Optimizer::new(cfg.optim.clone(), model.named_vars()?)?;
        Ok(Self {
            model,
            opt,
            cfg,
            state: TrainState::default(),
            state_path: None,
        })
    }

    /// Whether every epoch is done.
    pub fn finished(&self) -> bool {
        self.state.epoch >= self.cfg.epochs
    }

    /// The model's parameters as a checkpoint, with the run's position in its metadata
    /// (`distill.train.epoch`, `distill.train.step`, `distill.train.seed`).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint::from_tensors(
            self.model.model.spec().clone(),
            &self.model.named_tensors()?,
        )?;
        ck.extra
            .insert("distill.train.epoch".into(), self.state.epoch.to_string());
        ck.extra
            .insert("distill.train.step".into(), self.state.step.to_string());
        ck.extra
            .insert("distill.train.seed".into(), self.cfg.seed.to_string());
        Ok(ck)
    }

    /// Writes the whole training state to `path` atomically (see the module docs).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (name, t) in self.model.named_tensors()? {
            let shape = t.dims().to_vec();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            tensors.push((format!("model.{name}"), shape, v));
        }
        let (bufs, optim_meta) = self.opt.state()?.to_parts()?;
        tensors.extend(
            bufs.into_iter()
                .map(|(n, s, v)| (format!("optim.{n}"), s, v)),
        );
        let mut meta: HashMap<String, String> = optim_meta.into_iter().collect();
        meta.insert(KEY_FORMAT.into(), STATE_FORMAT.into());
        meta.insert(KEY_VERSION.into(), STATE_VERSION.into());
        meta.insert(KEY_SPEC.into(), to_json(self.model.model.spec())?);
        meta.insert(KEY_CONFIG.into(), to_json(&self.cfg)?);
        meta.insert(KEY_STATE.into(), to_json(&self.state)?);
        atomic_write(path, &write_safetensors(&tensors, meta)?)
    }

    /// Restores a run saved by [`Trainer::save_state`] on `device`; errors name the file.
    /// The returned trainer saves its state back to `path` as it goes.
    pub fn resume(path: &Path, device: &Device) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut t = Self::resume_from_bytes(&buf, device).map_err(|e| match e {
            Error::Input(m) | Error::Config(m) | Error::Spec(m) => Error::checkpoint(path, m),
            other => other,
        })?;
        t.state_path = Some(path.to_path_buf());
        Ok(t)
    }

    fn resume_from_bytes(buf: &[u8], device: &Device) -> Result<Self> {
        let (tensors, meta) = read_safetensors(buf)?;
        if meta.get(KEY_FORMAT).map(String::as_str) != Some(STATE_FORMAT) {
            return Err(Error::Input(format!(
                "not a training-state file (metadata {KEY_FORMAT} is {:?}, expected `{STATE_FORMAT}`)",
                meta.get(KEY_FORMAT)
            )));
        }
        if meta.get(KEY_VERSION).map(String::as_str) != Some(STATE_VERSION) {
            return Err(Error::Input(format!(
                "unsupported training-state version {:?}",
                meta.get(KEY_VERSION)
            )));
        }
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| Error::Input(format!("missing `{k}` metadata")))
        };
        let parse_err = |k: &str, e: serde_json::Error| Error::Input(format!("`{k}`: {e}"));
        let spec: ModelSpec =
            serde_json::from_str(get(KEY_SPEC)?).map_err(|e| parse_err(KEY_SPEC, e))?;
        let cfg: TrainConfig =
            serde_json::from_str(get(KEY_CONFIG)?).map_err(|e| parse_err(KEY_CONFIG, e))?;
        let state: TrainState =
            serde_json::from_str(get(KEY_STATE)?).map_err(|e| parse_err(KEY_STATE, e))?;
        let mut params = HashMap::new();
        let mut bufs = Vec::new();
        for (name, shape, v) in tensors {
            if let Some(p) = name.strip_prefix("model.") {
                params.insert(p.to_string(), Tensor::from_vec(v, shape, device)?);
            } else if let Some(b) = name.strip_prefix("optim.") {
                bufs.push((b.to_string(), shape, v));
            } else {
                return Err(Error::Input(format!("unexpected tensor `{name}`")));
            }
        }
        let model = TrainableModel::from_tensors(spec, params, device)?;
        let mut t = Self::from_model(model, cfg)?;
        t.opt.load_state(&OptimState::from_parts(bufs, &meta)?)?;
        t.state = state;
        Ok(t)
    }

    /// Trains on `data.train` until every epoch is done or `on_event` breaks, scoring
    /// `data.test` after epochs (see [`TrainConfig::eval_every_epoch`]). Returns whether the run
    /// finished. After a break the trainer is consistent (and saved, with `state_path`), so
    /// calling `run` again continues where it stopped.
    pub fn run(
        &mut self,
        data: &Dataset,
        objective: &mut dyn Objective,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<bool> {
        self.check_data(data)?;
        let n = data.train.len();
        let bs = self.cfg.batch;
        let batches = n.div_ceil(bs);
        let device = self.model.model.device().clone();
        while self.state.epoch < self.cfg.epochs {
            let order = shuffled_indices(n, self.cfg.seed, self.state.epoch as u64);
            let mut lr = 0.0;
            while self.state.batch < batches {
                let st = &mut self.state;
                let idx = &order[st.batch * bs..((st.batch + 1) * bs).min(n)];
                let t0 = Instant::now();
                let mut rng = step_rng(self.cfg.seed, st.step);
                let jitter = (self.cfg.jitter > 0).then_some((self.cfg.jitter, &mut rng));
                let (x, y) = data.train.batch(&data.input_shape, idx, &device, jitter)?;
                lr = self
                    .cfg
                    .optim
                    .lr_at(st.step, batches as u64, self.cfg.epochs);
                let t1 = Instant::now();
                let out = train_step(
                    &self.model,
                    &mut self.opt,
                    &Batch { idx, x, y },
                    lr,
                    &mut rng,
                    objective,
                )?;
                let t2 = Instant::now();
                st.loss_sum += out.loss as f64 * out.samples as f64;
                st.correct += out.correct as u64;
                st.samples += out.samples as u64;
                st.train_seconds += (t2 - t0).as_secs_f64();
                st.step_seconds += (t2 - t1).as_secs_f64();
                st.batch += 1;
                st.step += 1;
                let p = StepProgress {
                    epoch: st.epoch + 1,
                    epochs: self.cfg.epochs,
                    batch: st.batch,
                    batches,
                    step: st.step,
                    loss: out.loss,
                    epoch_loss: st.loss_sum / st.samples.max(1) as f64,
                    lr,
                    samples_per_s: st.samples as f64 / st.train_seconds.max(1e-9),
                };
                if on_event(Event::Step(&p)).is_break() {
                    self.autosave()?;
                    return Ok(false);
                }
            }
            let stats = self.finish_epoch(data, lr)?;
            self.autosave()?;
            if on_event(Event::Epoch(&stats)).is_break() && !self.finished() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn finish_epoch(&mut self, data: &Dataset, lr: f64) -> Result<EpochStats> {
        let last = self.state.epoch + 1 == self.cfg.epochs;
        let t = Instant::now();
        let test_errors = if (self.cfg.eval_every_epoch || last) && !data.test.is_empty() {
            Some(evaluate(&self.model.model, &data.test, self.cfg.eval_batch)?.errors)
        } else {
            None
        };
        let st = &mut self.state;
        let samples = st.samples.max(1) as f64;
        let stats = EpochStats {
            epoch: st.epoch + 1,
            step: st.step,
            loss: st.loss_sum / samples,
            train_accuracy: st.correct as f64 / samples,
            lr,
            samples: st.samples,
            seconds: st.train_seconds,
            samples_per_s: st.samples as f64 / st.train_seconds.max(1e-9),
            step_samples_per_s: st.samples as f64 / st.step_seconds.max(1e-9),
            test_errors,
            test_n: data.test.len(),
            eval_seconds: t.elapsed().as_secs_f64(),
        };
        let history = std::mem::take(&mut st.history);
        *st = TrainState {
            epoch: st.epoch + 1,
            step: st.step,
            history,
            ..TrainState::default()
        };
        st.history.push(stats.clone());
        Ok(stats)
    }

    fn autosave(&self) -> Result<()> {
        match &self.state_path {
            Some(p) => self.save_state(p),
            None => Ok(()),
        }
    }

    /// Checks that `data` fits the model and the settings, with an error that says what differs.
    pub fn check_data(&self, data: &Dataset) -> Result<()> {
        let arch = &self.model.model.spec().arch;
        let row: usize = data.input_shape.iter().product();
        if row != arch.input_size() || data.train.row_len() != row {
            return Err(Error::Input(format!(
                "data `{}` has rows of {} values (shape {:?}) but model {arch} takes {}",
                data.source,
                data.train.row_len(),
                data.input_shape,
                arch.input_size()
            )));
        }
        if data.classes > arch.classes() {
            return Err(Error::Input(format!(
                "data `{}` has {} classes but model {arch} outputs {}",
                data.source,
                data.classes,
                arch.classes()
            )));
        }
        if data.train.is_empty() {
            return Err(Error::Input(format!(
                "data `{}` has no training rows",
                data.source
            )));
        }
        if self.cfg.jitter > 0 && data.input_shape.len() != 3 {
            return Err(Error::Input(format!(
                "jitter needs image data [C, H, W], but `{}` has rows of shape {:?}",
                data.source, data.input_shape
            )));
        }
        Ok(())
    }
}

/// JSON with the error mapped into ours.
fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Input(format!("encoding JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Features, Split};
    use crate::optim::Schedule;
    use crate::spec::Arch;

    /// The first `n_train`/`n_test` rows of `synthetic:0`, to keep tests to a few seconds.
    fn small_synthetic(n_train: usize, n_test: usize) -> Dataset {
        let full = Dataset::load("synthetic:0").unwrap();
        let take = |s: &Split, n: usize| {
            let idx: Vec<usize> = (0..n.min(s.len())).collect();
            Split {
                x: match s.rows_u8(&idx) {
                    Some(v) => Features::U8(v),
                    None => Features::F32(s.rows_f32(&idx)),
                },
                y: idx.iter().map(|&i| s.y[i]).collect(),
            }
        };
        Dataset {
            source: full.source.clone(),
            input_shape: full.input_shape.clone(),
            classes: full.classes,
            train: take(&full.train, n_train),
            test: take(&full.test, n_test),
            tokens: None,
        }
    }

    fn params(t: &Trainer) -> Vec<Vec<f32>> {
        t.model
            .named_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    fn quiet(_: Event<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn tiny_cfg() -> TrainConfig {
        TrainConfig {
            epochs: 2,
            batch: 32,
            seed: 11,
            jitter: 1,
            optim: OptimConfig {
                schedule: Schedule::Cosine { final_frac: 0.1 },
                warmup_epochs: 0.3,
                clip_grad_norm: Some(5.0),
                weight_decay: 1e-4,
                ..OptimConfig::adamw(2e-3, 1e-4)
            },
            ..TrainConfig::default()
        }
    }

    fn dropout_spec(arch: &str) -> ModelSpec {
        ModelSpec {
            arch: Arch::parse(arch).unwrap(),
            dropout: 0.3,
            input_dropout: 0.1,
        }
    }

    #[test]
    fn training_on_synthetic_lowers_the_loss_and_learns() {
        let data = small_synthetic(4000, 1000);
        let cfg = TrainConfig {
            epochs: 4,
            batch: 64,
            seed: 1,
            optim: OptimConfig::adamw(2e-3, 0.0),
            ..TrainConfig::default()
        };
        let spec = ModelSpec::new(Arch::parse("mlp:784-128-10").unwrap());
        let mut t = Trainer::new(spec, cfg, &Device::Cpu).unwrap();
        let mut steps = 0;
        let done = t
            .run(&data, &mut CrossEntropy, &mut |e| {
                if let Event::Step(p) = e {
                    steps += 1;
                    assert!(p.loss.is_finite() && p.samples_per_s > 0.0);
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        assert!(done && t.finished());
        assert_eq!(steps, 4 * 4000usize.div_ceil(64));
        let h = &t.state.history;
        assert_eq!(h.len(), 4);
        assert!(h[3].loss < 0.7 * h[0].loss, "{h:?}");
        // 10 balanced classes: chance is 900 errors out of 1000. A 128-unit MLP trained on 4,000
        // rows for 4 epochs gets about 80% right (seen: 191 errors).
        let errors = h[3].test_errors.unwrap();
        assert!(errors < 300, "test errors {errors} of 1000: {h:?}");
        assert!(h[3].train_accuracy > 0.6, "{h:?}");
    }

    #[test]
    fn same_seed_same_result_other_seed_other_result() {
        let data = small_synthetic(300, 100);
        let run = |seed: u64| {
            let cfg = TrainConfig { seed, ..tiny_cfg() };
            let mut t = Trainer::new(dropout_spec("mlp:784-32-10"), cfg, &Device::Cpu).unwrap();
            t.run(&data, &mut CrossEntropy, &mut quiet).unwrap();
            (
                params(&t),
                t.state.history.iter().map(|e| e.loss).collect::<Vec<_>>(),
            )
        };
        let (a, la) = run(5);
        let (b, lb) = run(5);
        let (c, _) = run(6);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        assert_ne!(a, c);
    }

    #[test]
    fn resuming_from_a_saved_state_matches_an_uninterrupted_run() {
        let data = small_synthetic(300, 100);
        for arch in ["mlp:784-32-10", "conv:2-4-8-10"] {
            let spec = dropout_spec(arch);
            let mut full = Trainer::new(spec.clone(), tiny_cfg(), &Device::Cpu).unwrap();
            full.run(&data, &mut CrossEntropy, &mut quiet).unwrap();

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("run.state");
            let mut first = Trainer::new(spec, tiny_cfg(), &Device::Cpu).unwrap();
            first.state_path = Some(path.clone());
            // Stop in the middle of the second epoch (10 batches per epoch).
            let stopped = first
                .run(&data, &mut CrossEntropy, &mut |e| match e {
                    Event::Step(p) if p.step == 13 => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                })
                .unwrap();
            assert!(!stopped);
            drop(first);
            let mut resumed = Trainer::resume(&path, &Device::Cpu).unwrap();
            assert_eq!(
                (resumed.state.epoch, resumed.state.batch, resumed.state.step),
                (1, 3, 13)
            );
            assert!(resumed.run(&data, &mut CrossEntropy, &mut quiet).unwrap());
            assert_eq!(params(&resumed), params(&full), "{arch}");
            assert_eq!(
                resumed.opt.state().unwrap(),
                full.opt.state().unwrap(),
                "{arch}"
            );
            let errs = |t: &Trainer| {
                t.state
                    .history
                    .iter()
                    .map(|e| e.test_errors)
                    .collect::<Vec<_>>()
            };
            assert_eq!(errs(&resumed), errs(&full));
        }
    }

    /// A custom objective plugs into the same loop (as the KD loss will).
    #[test]
    fn a_custom_objective_drives_the_same_loop() {
        struct SoftUniform {
            calls: usize,
        }
        impl Objective for SoftUniform {
            fn name(&self) -> &str {
                "soft"
            }
            fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> Result<Tensor> {
                self.calls += 1;
                assert_eq!(batch.idx.len(), logits.dim(0)?);
                // Cross-entropy against a uniform target: −mean(log_softmax).
                let ls = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
                Ok(ls.mean_all()?.neg()?)
            }
        }
        let data = small_synthetic(200, 0);
        let cfg = TrainConfig {
            epochs: 1,
            ..tiny_cfg()
        };
        let mut t = Trainer::new(dropout_spec("mlp:784-16-10"), cfg, &Device::Cpu).unwrap();
        let mut obj = SoftUniform { calls: 0 };
        t.run(&data, &mut obj, &mut quiet).unwrap();
        assert_eq!(obj.calls, 7);
        assert_eq!(t.state.history[0].test_errors, None);
        // The optimum of a uniform target is ln(10) ≈ 2.3026; the loss gets close to it.
        assert!((t.state.history[0].loss - 10f64.ln()).abs() < 0.2);
    }

    #[test]
    fn rejects_data_that_does_not_fit_and_bad_state_files() {
        let data = small_synthetic(50, 10);
        let spec = ModelSpec::new(Arch::parse("mlp:100-8-10").unwrap());
        let mut t = Trainer::new(spec, tiny_cfg(), &Device::Cpu).unwrap();
        let e = t
            .run(&data, &mut CrossEntropy, &mut quiet)
            .unwrap_err()
            .to_string();
        assert!(e.contains("but model mlp:100-8-10 takes 100"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.state");
        std::fs::write(&p, b"not safetensors").unwrap();
        let e = Trainer::resume(&p, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("junk.state"), "{e}");
        let ck = dir.path().join("model.safetensors");
        t.checkpoint().unwrap().save(&ck).unwrap();
        let e = Trainer::resume(&ck, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not a training-state file"), "{e}");
        let bad = TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
