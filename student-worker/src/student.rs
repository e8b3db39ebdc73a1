//! The student being trained: its model, optimizer and KD objective, one step per batch, test
//! evaluation, and the worker checkpoint. Everything here is candle and blocking; it runs on the
//! training thread ([`crate::trainer`]), never on the async runtime.
//!
//! # Worker checkpoint (in the work dir)
//! - `student.safetensors`: a distill checkpoint (`distill_core::checkpoint`) of the student's
//!   weights, with extra metadata `distill.step` (updates done), `distill.student.settings` (the
//!   [`StudentSettings`] JSON, so a checkpoint of another run is refused) and
//!   `distill.worker_id`. It is servable and evaluable like any other checkpoint.
//! - `optimizer.safetensors`: the optimizer state (`distill_core::optim`), whose
//!   `distill.optim.step` equals the student's `distill.step`.
//!
//! Both are written atomically, optimizer first. Before the new optimizer state is written the
//! current one is renamed to `optimizer.prev.safetensors`, so a crash between the two writes
//! leaves a student at step k and a `prev` optimizer at step k: resume picks whichever optimizer
//! file matches the student's step, and refuses (naming both steps) when neither does.
//!
//! # Determinism
//! Update `s` (0-based) uses learning rate `optim.lr_at(s, batches_per_epoch, epochs)` and the
//! dropout rng `step_rng(seed, s)`, exactly as `distill_core::train::Trainer` does, so a worker
//! resumed from a checkpoint at step k and fed the same batches ends bit-identical to one that
//! never stopped.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use distill_core::checkpoint::Checkpoint;
use distill_core::fsutil::atomic_write;
use distill_core::model::TrainableModel;
use distill_core::optim::{OptimState, Optimizer};
use distill_core::settings::StudentSettings;
use distill_core::train::{Batch, StepOutput, count_correct, step_gradients, step_rng, train_step};

use crate::decode::{EvalData, Targets, TrainData};
use crate::objective::KdObjective;
use crate::{Error, Result};

/// File name of the student's weights in the work dir.
pub const STUDENT_FILE: &str = "student.safetensors";
/// File name of the optimizer state in the work dir.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The optimizer state of the previous checkpoint while a new one is being written.
pub const OPTIMIZER_PREV_FILE: &str = "optimizer.prev.safetensors";
/// Checkpoint metadata key: updates done.
pub const KEY_STEP: &str = "distill.step";
/// Checkpoint metadata key: the run's student settings as JSON.
pub const KEY_SETTINGS: &str = "distill.student.settings";
/// Checkpoint metadata key: the worker that wrote it.
pub const KEY_WORKER: &str = "distill.worker_id";

/// A student model with its optimizer and objective.
pub struct Student {
    /// The model being trained.
    pub model: TrainableModel,
    /// Its optimizer; `opt.step_count()` is the worker's update count.
    pub opt: Optimizer,
    settings: StudentSettings,
    batches_per_epoch: u64,
    objective: KdObjective,
    device: Device,
}

impl Student {
    /// A fresh student: weights from `settings.seed`, zeroed optimizer state, step 0.
    pub fn new(settings: StudentSettings, batches_per_epoch: u64, device: &Device) -> Result<Self> {
        settings.validate()?;
        let model = TrainableModel::initial(&settings, device)?;
        Self::from_model(model, settings, batches_per_epoch, device)
    }

    fn from_model(
        model: TrainableModel,
        settings: StudentSettings,
        batches_per_epoch: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut model = model;
        model.model.set_precision(settings.precision);
        let opt = Optimizer::new(settings.optim.clone(), model.named_vars()?)?;
        let objective = if settings.spec.arch.llama().is_some() {
            KdObjective::per_token(settings.temperature, settings.alpha)
        } else {
            KdObjective::new(settings.temperature, settings.alpha)
        };
        Ok(Self {
            model,
            opt,
            settings,
            batches_per_epoch,
            objective,
            device: device.clone(),
        })
    }

    /// Resumes from the worker checkpoint `ck` (read from `dir` with [`read_checkpoint`]):
    /// weights, optimizer state and step. Refuses a checkpoint of other settings or a torn one.
    pub fn resume(
        settings: StudentSettings,
        batches_per_epoch: u64,
        ck: &Checkpoint,
        dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        settings.validate()?;
        let bad = |msg: String| Error::Resume {
            dir: dir.to_path_buf(),
            msg,
        };
        let step = checkpoint_step(ck).map_err(bad)?;
        let saved: StudentSettings = ck
            .extra
            .get(KEY_SETTINGS)
            .ok_or_else(|| bad(format!("{STUDENT_FILE} has no `{KEY_SETTINGS}` metadata")))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("`{KEY_SETTINGS}`: {e}")))
            })?;
        if saved != settings || ck.spec != settings.spec {
            return Err(bad(format!(
                "{STUDENT_FILE} belongs to a run with other settings ({}); move it away to \
                 start fresh",
                ck.extra
                    .get(KEY_SETTINGS)
                    .map(String::as_str)
                    .unwrap_or("?")
            )));
        }
        let model = TrainableModel::from_tensors(ck.spec.clone(), ck.tensors(device)?, device)?;
        let mut s = Self::from_model(model, settings, batches_per_epoch, device)?;
        let state = matching_optimizer_state(dir, step)?;
        if state.config != s.settings.optim {
            return Err(bad(format!(
                "the optimizer state was made with other optimizer settings ({:?})",
                state.config
            )));
        }
        s.opt.load_state(&state)?;
        Ok(s)
    }

    /// Updates done so far.
    pub fn step(&self) -> u64 {
        self.opt.step_count()
    }

    /// The settings being trained with.
    pub fn settings(&self) -> &StudentSettings {
        &self.settings
    }

    /// Learning rate of the next update.
    pub fn next_lr(&self) -> f64 {
        self.settings.optim.lr_at(
            self.step(),
            self.batches_per_epoch,
            self.settings.epochs as usize,
        )
    }

    /// One KD update on a decoded batch.
    ///
    /// # Shapes
    /// `d.x`: `[B, ...input_shape]`, `d.y`: `[B]`, `d.soft`: `[B, classes]`.
    pub fn train(&mut self, d: &TrainData) -> Result<StepOutput> {
        let u = upload(d.clone(), &self.device)?;
        self.train_uploaded(u)
    }

    /// One KD update on a batch already on the device (see [`upload`]).
    pub fn train_uploaded(&mut self, u: Uploaded) -> Result<StepOutput> {
        let Uploaded { x, y, soft, .. } = u;
        match soft {
            UploadedTargets::Dense(p) => self.objective.set_targets(p),
            UploadedTargets::TopK(t) => self.objective.set_sparse_targets(t),
        }
        let step = self.step();
        let lr = self.next_lr();
        // The batch has no row indices in a split: the coordinator owns the data.
        let batch = Batch { idx: &[], x, y };
        let out = train_step(
            &self.model,
            &mut self.opt,
            &batch,
            lr,
            &mut step_rng(self.settings.seed, step),
            &mut self.objective,
        )?;
        Ok(out)
    }

    /// The forward and backward pass of a batch without an update (a gradient-averaging run:
    /// the coordinator steps): the step's figures and the gradients in model order, as host
    /// values. `update` numbers the batch among those this worker trained (its dropout masks).
    pub fn gradients_uploaded(
        &mut self,
        u: Uploaded,
        update: u64,
    ) -> Result<(StepOutput, Vec<distill_proto::params::Param>)> {
        let Uploaded { x, y, soft, .. } = u;
        match soft {
            UploadedTargets::Dense(p) => self.objective.set_targets(p),
            UploadedTargets::TopK(t) => self.objective.set_sparse_targets(t),
        }
        let batch = Batch { idx: &[], x, y };
        let (out, grads) = step_gradients(
            &self.model,
            &batch,
            update + 1,
            &mut step_rng(self.settings.seed, update),
            &mut self.objective,
        )?;
        let params = self
            .model
            .named_vars()?
            .into_iter()
            .map(|(name, var)| {
                let shape = var.dims().to_vec();
                let v = match grads.get(var.as_tensor()) {
                    Some(g) => g
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    // A parameter the loss does not reach has a zero gradient.
                    None => vec![0.0; shape.iter().product()],
                };
                Ok((name, shape, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((out, params))
    }

    /// The parameters in model order, as host values (for a synchronisation round).
    pub fn params(&self) -> Result<Vec<distill_proto::params::Param>> {
        self.model
            .named_tensors()?
            .into_iter()
            .map(|(name, t)| {
                let shape = t.dims().to_vec();
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((name, shape, v))
            })
            .collect()
    }

    /// Replaces the parameters (averaged ones from a round); the optimizer state is kept.
    /// Names and shapes must be the model's, in its order.
    pub fn set_params(&mut self, params: &[distill_proto::params::Param]) -> Result<()> {
        let vars = self.model.named_vars()?;
        if vars.len() != params.len() {
            return Err(Error::BadBatch(format!(
                "{} averaged parameters for a model of {}",
                params.len(),
                vars.len()
            )));
        }
        for ((name, var), (pname, shape, v)) in vars.iter().zip(params) {
            if name != pname || var.dims() != shape.as_slice() {
                return Err(Error::BadBatch(format!(
                    "averaged parameter `{pname}` {shape:?} where `{name}` {:?} was expected",
                    var.dims()
                )));
            }
            var.set(&Tensor::from_slice(v, shape.as_slice(), &self.device)?)?;
        }
        Ok(())
    }

    /// Misclassified rows of an evaluation batch (inference mode: no dropout); a language
    /// model's: positions whose top-1 is not the next token, out of `d.y.len()`.
    ///
    /// # Shapes
    /// `d.x`: `[B, ...input_shape]`, `d.y`: `[B]` (or `[B·L]`).
    pub fn evaluate(&self, d: &EvalData) -> Result<u64> {
        let x = Tensor::from_slice(&d.x, d.x_shape.as_slice(), &self.device)?;
        let y = Tensor::from_slice(&d.y, d.y.len(), &self.device)?;
        let logits = self.model.model.forward(&x)?; // [B, classes] (or [B·L, vocab])
        let correct = count_correct(&logits, &y)?;
        Ok((d.y.len() - correct) as u64)
    }

    /// The weights as a distill checkpoint with the worker metadata (see the module docs).
    pub fn checkpoint(&self, worker_id: &str) -> Result<Checkpoint> {
        let mut ck = Checkpoint::from_tensors(
            self.model.model.spec().clone(),
            &self.model.named_tensors()?,
        )?;
        ck.extra.insert(KEY_STEP.into(), self.step().to_string());
        ck.extra.insert(
            KEY_SETTINGS.into(),
            serde_json::to_string(&self.settings)
                .map_err(|e| Error::Settings(format!("encoding settings: {e}")))?,
        );
        ck.extra.insert(KEY_WORKER.into(), worker_id.to_string());
        Ok(ck)
    }

    /// Writes the worker checkpoint into `dir` (see the module docs for the order) and returns
    /// the bytes of `student.safetensors`.
    pub fn save(&self, dir: &Path, worker_id: &str) -> Result<Bytes> {
        let files = self.serialize(worker_id)?;
        files.write(dir)?;
        Ok(files.student)
    }

    /// The worker checkpoint's files in memory (cheap next to writing them: the training
    /// thread serialises, a writer thread may write).
    pub fn serialize(&self, worker_id: &str) -> Result<CheckpointFiles> {
        Ok(CheckpointFiles {
            student: Bytes::from(self.checkpoint(worker_id)?.to_bytes()?),
            optimizer: self.opt.state()?.to_bytes()?,
        })
    }
}

/// A serialised worker checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// `student.safetensors`.
    pub student: Bytes,
    /// `optimizer.safetensors`.
    pub optimizer: Vec<u8>,
}

impl CheckpointFiles {
    /// Writes the files into `dir` in the documented order (optimizer state first, the
    /// student last, each atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_optimizer(dir, &self.optimizer)?;
        atomic_write(&dir.join(STUDENT_FILE), &self.student)?;
        Ok(())
    }
}

/// A training batch on the model's device, ready for [`Student::train_uploaded`].
#[derive(Debug)]
pub struct Uploaded {
    /// Lease id to ack with.
    pub lease_id: u64,
    /// Epoch of the batch.
    pub epoch: u32,
    /// Rows in the batch.
    pub rows: usize,
    /// Inputs `[B, ...input_shape]`.
    pub x: Tensor,
    /// Labels `[B]`.
    pub y: Tensor,
    /// The soft targets.
    pub soft: UploadedTargets,
}

/// Soft targets of an [`Uploaded`] batch.
#[derive(Debug)]
pub enum UploadedTargets {
    /// Probabilities `[B, classes]` on the device.
    Dense(Tensor),
    /// Top-k targets (host side; the sparse loss gathers on the device).
    TopK(distill_core::topk::SparseTargets),
}

/// Copies a decoded batch to `device`. The worker does this off the training thread, so the
/// conversion and the host→device copy of batch n+1 overlap the update of batch n (on CUDA the
/// copy goes through candle's one stream; it overlaps the host work, not the kernels).
pub fn upload(d: TrainData, device: &Device) -> Result<Uploaded> {
    let x = Tensor::from_vec(d.x, d.x_shape.as_slice(), device)?;
    // One label (and soft-target row) per input row, or per position of a window.
    let n = d.y.len();
    let y = Tensor::from_vec(d.y, n, device)?;
    let soft = match d.soft {
        Targets::Dense(p) => {
            let classes = p.len() / n.max(1);
            UploadedTargets::Dense(Tensor::from_vec(p, (n, classes), device)?)
        }
        Targets::TopK(t) => UploadedTargets::TopK(t),
    };
    Ok(Uploaded {
        lease_id: d.lease_id,
        epoch: d.epoch,
        rows: d.rows,
        x,
        y,
        soft,
    })
}

/// Keeps the current optimizer file as `prev`, then writes the new one.
fn write_optimizer(dir: &Path, bytes: &[u8]) -> Result<()> {
    let cur = dir.join(OPTIMIZER_FILE);
    if cur.exists() {
        let prev = dir.join(OPTIMIZER_PREV_FILE);
        std::fs::rename(&cur, &prev).map_err(|e| Error::io(&cur, e))?;
    }
    atomic_write(&cur, bytes)?;
    Ok(())
}

/// The student checkpoint in `dir`, or None when there is none.
pub fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>> {
    let p = dir.join(STUDENT_FILE);
    if !p.exists() {
        return Ok(None);
    }
    Ok(Some(Checkpoint::read(&p)?))
}

/// The `distill.step` of a worker checkpoint.
pub fn checkpoint_step(ck: &Checkpoint) -> std::result::Result<u64, String> {
    ck.extra
        .get(KEY_STEP)
        .ok_or_else(|| format!("{STUDENT_FILE} has no `{KEY_STEP}` metadata"))?
        .parse::<u64>()
        .map_err(|e| format!("{STUDENT_FILE}: bad `{KEY_STEP}`: {e}"))
}

/// The optimizer state at `step`: `optimizer.safetensors`, else the `prev` one left by a crash
/// in the middle of a save (which is then put back in place).
fn matching_optimizer_state(dir: &Path, step: u64) -> Result<OptimState> {
    let read = |name: &str| -> Result<Option<OptimState>> {
        let p: PathBuf = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let buf = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        OptimState::from_bytes(&buf)
            .map(Some)
            .map_err(|e| Error::Resume {
                dir: dir.to_path_buf(),
                msg: format!("{name}: {e}"),
            })
    };
    let cur = read(OPTIMIZER_FILE)?;
    if let Some(s) = cur.as_ref().filter(|s| s.step == step) {
        return Ok(s.clone());
    }
    let prev = read(OPTIMIZER_PREV_FILE)?;
    if let Some(s) = prev.as_ref().filter(|s| s.step == step) {
        tracing::warn!(
            step,
            "a checkpoint write was interrupted; resuming from the previous optimizer state"
        );
        // Restore the invariant "optimizer.safetensors matches student.safetensors".
        atomic_write(&dir.join(OPTIMIZER_FILE), &s.to_bytes()?)?;
        return Ok(s.clone());
    }
    let show = |s: &Option<OptimState>| match s {
        Some(s) => format!("step {}", s.step),
        None => "missing".to_string(),
    };
    Err(Error::Resume {
        dir: dir.to_path_buf(),
        msg: format!(
            "the student is at step {step} but {OPTIMIZER_FILE} is {} and {OPTIMIZER_PREV_FILE} \
             is {}: no optimizer state matches",
            show(&cur),
            show(&prev)
        ),
    })
}

#[cfg(test)]
mod tests {
    use distill_core::data::Dataset;
    use distill_core::optim::{OptimConfig, Schedule};
    use distill_core::spec::{Arch, ModelSpec};

    use super::*;

    pub(crate) fn settings() -> StudentSettings {
        StudentSettings {
            spec: ModelSpec {
                arch: Arch::parse("mlp:784-24-10").unwrap(),
                dropout: 0.2,
                input_dropout: 0.1,
            },
            optim: OptimConfig {
                schedule: Schedule::Cosine { final_frac: 0.1 },
                warmup_epochs: 0.5,
                clip_grad_norm: Some(5.0),
                ..OptimConfig::adamw(3e-3, 1e-4)
            },
            temperature: 3.0,
            alpha: 0.8,
            epochs: 2,
            batch_size: 16,
            seed: 9,
            checkpoint_every: 0,
            precision: Default::default(),
            init: None,
        }
    }

    /// Batch `i` of 16 synthetic rows with soft targets = 0.8 on the label, 0.2/9 elsewhere.
    fn batches(n: usize) -> Vec<TrainData> {
        let data = Dataset::load("synthetic:0").unwrap();
        (0..n)
            .map(|i| {
                let idx: Vec<usize> = (i * 16..(i + 1) * 16).collect();
                let y = data.train.labels(&idx);
                let soft = y
                    .iter()
                    .flat_map(|&l| (0..10).map(move |c| if c == l { 0.8 } else { 0.2 / 9.0 }))
                    .collect();
                TrainData {
                    lease_id: i as u64,
                    epoch: 0,
                    index: i as u32,
                    x: data.train.rows_f32(&idx),
                    x_shape: vec![16, 1, 28, 28],
                    y,
                    soft: Targets::Dense(soft),
                    rows: 16,
                }
            })
            .collect()
    }

    fn params(s: &Student) -> Vec<Vec<u32>> {
        s.model
            .named_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, t)| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn resuming_from_a_checkpoint_is_bit_identical_to_not_stopping() {
        let dev = Device::Cpu;
        let data = batches(10);
        let mut straight = Student::new(settings(), 5, &dev).unwrap();
        for d in &data {
            straight.train(d).unwrap();
        }

        let dir = tempfile::tempdir().unwrap();
        let mut first = Student::new(settings(), 5, &dev).unwrap();
        for d in &data[..4] {
            first.train(d).unwrap();
        }
        first.save(dir.path(), "w").unwrap();
        // Training on after the save must not leak into the checkpoint.
        first.train(&data[4]).unwrap();
        drop(first);

        let ck = read_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(checkpoint_step(&ck), Ok(4));
        assert_eq!(ck.extra.get(KEY_WORKER).map(String::as_str), Some("w"));
        let mut resumed = Student::resume(settings(), 5, &ck, dir.path(), &dev).unwrap();
        assert_eq!(resumed.step(), 4);
        for d in &data[4..] {
            resumed.train(d).unwrap();
        }
        assert_eq!(resumed.step(), 10);
        assert_eq!(params(&resumed), params(&straight));
        assert_eq!(resumed.opt.state().unwrap(), straight.opt.state().unwrap());

        // Without the optimizer state (fresh AdamW moments at step 4) the result differs, so the
        // equality above really depends on the restored state.
        let mut no_opt = Student::new(settings(), 5, &dev).unwrap();
        let model =
            TrainableModel::from_tensors(ck.spec.clone(), ck.tensors(&dev).unwrap(), &dev).unwrap();
        no_opt.opt = Optimizer::new(settings().optim, model.named_vars().unwrap()).unwrap();
        no_opt.model = model;
        for d in &data[4..] {
            no_opt.train(d).unwrap();
        }
        assert_ne!(params(&no_opt), params(&straight));
    }

    #[test]
    fn a_save_interrupted_between_the_two_files_resumes_from_the_previous_optimizer() {
        let dev = Device::Cpu;
        let data = batches(6);
        let dir = tempfile::tempdir().unwrap();
        let mut s = Student::new(settings(), 3, &dev).unwrap();
        for d in &data[..3] {
            s.train(d).unwrap();
        }
        s.save(dir.path(), "w").unwrap();
        let at3 = s.opt.state().unwrap();
        for d in &data[3..] {
            s.train(d).unwrap();
        }
        // The first half of a save at step 6: optimizer written, student not.
        write_optimizer(dir.path(), &s.opt.state().unwrap().to_bytes().unwrap()).unwrap();

        let ck = read_checkpoint(dir.path()).unwrap().unwrap();
        let r = Student::resume(settings(), 3, &ck, dir.path(), &dev).unwrap();
        assert_eq!(r.step(), 3);
        assert_eq!(r.opt.state().unwrap(), at3);
        // ...and the matching state is back in optimizer.safetensors.
        let buf = std::fs::read(dir.path().join(OPTIMIZER_FILE)).unwrap();
        assert_eq!(OptimState::from_bytes(&buf).unwrap().step, 3);

        // With neither optimizer file at the student's step, resume refuses and says why.
        std::fs::remove_file(dir.path().join(OPTIMIZER_PREV_FILE)).unwrap();
        write_optimizer(dir.path(), &s.opt.state().unwrap().to_bytes().unwrap()).unwrap();
        std::fs::remove_file(dir.path().join(OPTIMIZER_PREV_FILE)).unwrap();
        let e = Student::resume(settings(), 3, &ck, dir.path(), &dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("the student is at step 3 but optimizer.safetensors is step 6 and optimizer.prev.safetensors is missing"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_checkpoint_of_other_settings() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let s = Student::new(settings(), 3, &dev).unwrap();
        s.save(dir.path(), "w").unwrap();
        let ck = read_checkpoint(dir.path()).unwrap().unwrap();
        let other = StudentSettings {
            seed: 10,
            ..settings()
        };
        let e = Student::resume(other, 3, &ck, dir.path(), &dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("belongs to a run with other settings"), "{e}");
    }

    #[test]
    fn training_lowers_the_kd_loss_and_evaluation_counts_errors() {
        let dev = Device::Cpu;
        let data = batches(40);
        let mut s = Student::new(
            StudentSettings {
                spec: ModelSpec::new(Arch::parse("mlp:784-32-10").unwrap()),
                optim: OptimConfig::adamw(3e-3, 0.0),
                epochs: 1,
                ..settings()
            },
            40,
            &dev,
        )
        .unwrap();
        let losses: Vec<f32> = data.iter().map(|d| s.train(d).unwrap().loss).collect();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (early, late) = (mean(&losses[..5]), mean(&losses[35..]));
        assert!(late < 0.8 * early, "loss {early} -> {late}: {losses:?}");

        // All-correct and all-wrong labels bound the count.
        let d = &data[0];
        let eval = EvalData {
            x: d.x.clone(),
            x_shape: d.x_shape.clone(),
            y: d.y.clone(),
            rows: d.rows,
        };
        let errors = s.evaluate(&eval).unwrap();
        let x = Tensor::from_slice(&d.x, d.x_shape.as_slice(), &dev).unwrap();
        let pred: Vec<u32> = s
            .model
            .model
            .forward(&x)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let wrong = pred.iter().zip(&d.y).filter(|(p, y)| p != y).count() as u64;
        assert_eq!(errors, wrong);
        let all_right = EvalData {
            y: pred.clone(),
            ..eval.clone()
        };
        assert_eq!(s.evaluate(&all_right).unwrap(), 0);
        let all_wrong = EvalData {
            y: pred.iter().map(|p| (p + 1) % 10).collect(),
            ..eval
        };
        assert_eq!(s.evaluate(&all_wrong).unwrap(), 16);
    }
}
