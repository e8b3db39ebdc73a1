//! The training thread: the only place candle runs. The async side hands it batches over a
//! bounded channel and gets acks back over another; panics are caught at this boundary and come
//! back as [`Error::Panic`].
//!
//! The thread owns the [`Student`]. For each `Train` command it measures how long it sat idle
//! waiting for the batch (`wait_seconds`), decodes and checks the batch, runs one update
//! (`step_seconds`), writes a checkpoint when one is due, and sends the ack. `Eval` commands
//! accumulate test errors; `Finish` writes the final checkpoint and ends the thread with the
//! [`Outcome`]. When the command channel closes or `stop` is cancelled, the thread drops the
//! batches still queued (their leases expire and they are trained again), writes a checkpoint
//! and ends with an outcome that is not `completed`.
//!
//! Checkpoints are due every `checkpoint_every` updates (when > 0) and at every multiple of
//! `batches_per_epoch` (the end of an epoch for a single worker).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::settings::StudentSettings;
use distill_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::decode::{BatchSpec, decode_eval, decode_train};
use crate::student::{STUDENT_FILE, Student, Uploaded, upload};
use crate::{Error, Result};
use distill_proto::params::Param;

/// What the async side asks of the training thread.
#[derive(Debug)]
pub enum Command {
    /// Train one step on this batch and ack it.
    Train(Box<pb::TrainBatch>),
    /// Train one step on this batch, already decoded and on the device, and ack it. The number
    /// is the batch stream it came on ([`Setup::stream`]); batches of an older stream are
    /// dropped untrained (their leases died with that stream).
    Uploaded(Box<Uploaded>, u64),
    /// A batch that failed to decode: keep the state, end with this error.
    Invalid(Error),
    /// Count this test batch's errors.
    Eval(Box<pb::EvalBatch>),
    /// Write the final checkpoint and end.
    Finish,
    /// Averaged parameters from a synchronisation round: continue from them.
    Params(Box<ParamsDown>),
    /// Contribute the parameters now; `true`: one last time (every batch is trained).
    SyncNow(bool),
}

/// Averaged parameters, assembled from a run of `SyncDown` messages.
#[derive(Debug)]
pub struct ParamsDown {
    /// Round number.
    pub version: u64,
    /// The parameters in model order (None: keep the worker's own, they are the average).
    pub params: Option<Vec<Param>>,
    /// Workers averaged.
    pub contributors: u32,
    /// The batch stream they came on.
    pub stream: u64,
}

/// The worker's parameters for a round.
#[derive(Debug)]
pub struct SyncOut {
    /// The averaged version it last took.
    pub base_version: u64,
    /// Rows trained since.
    pub samples: u64,
    /// Its parameters in model order (with `gradients`: its batch's gradients).
    pub params: Vec<Param>,
    /// In answer to `SyncNow`.
    pub is_final: bool,
    /// `params` are gradients.
    pub gradients: bool,
}

/// What the training thread sends out, in order, each with the number of the batch stream it
/// belongs to: after the worker joined again, what was meant for an older stream (a batch's
/// ack, a contribution made before the new stream's parameters arrived) must not go out on
/// the new one.
#[derive(Debug)]
pub enum Up {
    /// A trained batch.
    Ack(pb::Ack, u64),
    /// Parameters for a round (the thread then waits for [`Command::Params`]).
    Sync(Box<SyncOut>, u64),
}

/// How this worker takes part in synchronisation rounds (from `JoinResponse.sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSettings {
    /// Contribute after every this many local updates (0: only when asked by `SyncNow`).
    pub every: u64,
    /// Element type of parameters on the wire.
    pub dtype: distill_proto::DType,
    /// Largest payload of parameter values per message.
    pub chunk_bytes: usize,
    /// Synchronous data parallelism: after each batch send its gradients, take no step, and
    /// continue from the parameters that come back.
    pub gradients: bool,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            every: 0,
            dtype: distill_proto::DType::F32,
            chunk_bytes: 4 << 20,
            gradients: false,
        }
    }
}

/// Everything the training thread needs to build its student.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The run's settings (validated).
    pub settings: StudentSettings,
    /// Batches per epoch of the run (for the learning-rate schedule).
    pub batches_per_epoch: u64,
    /// What every batch must look like.
    pub batch_spec: BatchSpec,
    /// Where the model lives.
    pub device: Device,
    /// Where checkpoints go.
    pub work_dir: PathBuf,
    /// The worker id, recorded in checkpoints.
    pub worker_id: String,
    /// A worker checkpoint from `work_dir` to resume from (None: fresh start).
    pub resume: Option<Checkpoint>,
    /// Synchronisation rounds.
    pub sync: SyncSettings,
    /// The current batch stream's number (the worker bumps it when it joins the run again).
    pub stream: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// How the training thread ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether it ended on `Finish` (otherwise it was stopped).
    pub completed: bool,
    /// The student's update count at the end.
    pub steps: u64,
    /// Training batches trained by this thread.
    pub batches: u64,
    /// Training rows trained by this thread.
    pub samples: u64,
    /// Misclassified evaluation rows.
    pub test_errors: u64,
    /// Evaluation rows.
    pub test_total: u64,
    /// Seconds spent idle waiting for training batches.
    pub wait_seconds: f64,
    /// Seconds spent in training steps.
    pub step_seconds: f64,
    /// Seconds blocked in synchronisation rounds.
    pub sync_seconds: f64,
    /// Averaged parameter sets taken.
    pub rounds: u64,
    /// The student checkpoint file.
    pub checkpoint: PathBuf,
    /// Its bytes.
    pub checkpoint_bytes: Bytes,
}

/// The async side's handles on a running training thread.
pub struct TrainingThread {
    /// Commands in; bounded.
    pub commands: mpsc::Sender<Command>,
    /// Acks (one per trained batch) and parameters for rounds, in order; bounded. Closes when
    /// the thread ends.
    pub acks: mpsc::Receiver<Up>,
    /// The thread's result, sent when it ends.
    pub done: oneshot::Receiver<Result<Outcome>>,
}

/// Starts the training thread. `capacity` bounds both channels (use at least the credit
/// window, so batches the coordinator may send never wait on the channel).
pub fn spawn(setup: Setup, capacity: usize, stop: CancellationToken) -> Result<TrainingThread> {
    let (cmd_tx, cmd_rx) = mpsc::channel(capacity.max(1));
    let (ack_tx, ack_rx) = mpsc::channel(capacity.max(1));
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("student-train".into())
        .spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(|| run(setup, cmd_rx, ack_tx, &stop)))
                .unwrap_or_else(|p| Err(Error::Panic(panic_message(p.as_ref()))));
            if let Err(e) = &result {
                tracing::error!(error = %e, "training thread failed");
            }
            let _ = done_tx.send(result);
        })
        .map_err(|e| Error::io("student-train thread", e))?;
    Ok(TrainingThread {
        commands: cmd_tx,
        acks: ack_rx,
        done: done_rx,
    })
}

/// Writes periodic checkpoints on a thread of its own, in order, so the training thread only
/// serialises them. At most one write waits while another runs (backpressure); the first error
/// is reported by the next `submit` or by `finish`. The final and stop checkpoints are written
/// by the training thread itself after `finish`, so they are always the last word.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<crate::student::CheckpointFiles>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Writer {
    fn start(dir: PathBuf) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<crate::student::CheckpointFiles>(1);
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for files in rx {
                    files.write(&dir)?;
                }
                Ok(())
            })
            .map_err(|e| Error::io("checkpoint-writer thread", e))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn submit(&mut self, files: crate::student::CheckpointFiles) -> Result<()> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(files).is_ok());
        if sent { Ok(()) } else { self.finish() }
    }

    /// Waits for every submitted checkpoint to be written; the writer's first error, if any.
    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Panic("checkpoint writer panicked".into()))),
            None => Ok(()),
        }
    }
}

/// Sends the student's parameters for a round and starts waiting for the average.
fn contribute(
    student: &Student,
    sy: &mut SyncState,
    is_final: bool,
    out: &mpsc::Sender<Up>,
    on_stream: u64,
) -> Result<()> {
    let params = student.params()?;
    send_up(sy, params, false, is_final, out, on_stream);
    Ok(())
}

/// Sends `params` (or gradients) for a round and starts waiting for the round's parameters.
fn send_up(
    sy: &mut SyncState,
    params: Vec<Param>,
    gradients: bool,
    is_final: bool,
    out: &mpsc::Sender<Up>,
    on_stream: u64,
) {
    let c = SyncOut {
        base_version: sy.base_version,
        samples: sy.samples,
        params,
        is_final,
        gradients,
    };
    sy.waiting_since = Some(Instant::now());
    if out.blocking_send(Up::Sync(Box::new(c), on_stream)).is_err() {
        // The async side is gone; the loop ends on the closed command channel.
        tracing::debug!("parameters not sent: the stream is gone");
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[derive(Default)]
struct Totals {
    batches: u64,
    samples: u64,
    test_errors: u64,
    test_total: u64,
    wait_seconds: f64,
    step_seconds: f64,
    sync_seconds: f64,
    rounds: u64,
    loss_sum: f64,
    loss_n: u64,
}

/// Where the thread stands in the synchronisation rounds.
#[derive(Debug, Default)]
struct SyncState {
    /// The averaged version last taken.
    base_version: u64,
    /// Updates and rows since then.
    steps: u64,
    samples: u64,
    /// Since when the thread waits for averaged parameters (None: not waiting).
    waiting_since: Option<Instant>,
    /// Seconds blocked since the last ack (reported on the next one).
    unreported: f64,
    /// Commands that arrived while waiting, in order.
    backlog: std::collections::VecDeque<Command>,
    /// Batches trained by this thread (a gradient-averaging worker's update count: it seeds
    /// the step's dropout masks, and the acks report it).
    updates: u64,
}

fn run(
    setup: Setup,
    mut commands: mpsc::Receiver<Command>,
    acks: mpsc::Sender<Up>,
    stop: &CancellationToken,
) -> Result<Outcome> {
    let Setup {
        settings,
        batches_per_epoch,
        batch_spec,
        device,
        work_dir,
        worker_id,
        resume,
        sync,
        stream,
    } = setup;
    let checkpoint_every = settings.checkpoint_every;
    let mut student = match &resume {
        Some(ck) => Student::resume(settings, batches_per_epoch, ck, &work_dir, &device)?,
        None => Student::new(settings, batches_per_epoch, &device)?,
    };
    tracing::info!(
        step = student.step(),
        resumed = resume.is_some(),
        "student ready"
    );
    drop(resume);
    let mut t = Totals::default();
    let outcome = |completed: bool, student: &Student, t: &Totals, bytes: Bytes| Outcome {
        completed,
        steps: student.step(),
        batches: t.batches,
        samples: t.samples,
        test_errors: t.test_errors,
        test_total: t.test_total,
        wait_seconds: t.wait_seconds,
        step_seconds: t.step_seconds,
        sync_seconds: t.sync_seconds,
        rounds: t.rounds,
        checkpoint: work_dir.join(STUDENT_FILE),
        checkpoint_bytes: bytes,
    };
    let mut sy = SyncState::default();
    // The batch stream this thread is on: that of the latest batch or parameters it took.
    let mut on_stream: u64 = 0;
    let mut writer = Writer::start(work_dir.clone())?;
    loop {
        let idle = Instant::now();
        let (cmd, queued) = match sy.backlog.pop_front() {
            Some(c) if sy.waiting_since.is_none() => (c, true),
            other => {
                if let Some(c) = other {
                    sy.backlog.push_front(c);
                }
                match commands.blocking_recv() {
                    Some(c) => (c, false),
                    None => break,
                }
            }
        };
        if stop.is_cancelled() {
            break;
        }
        if sy.waiting_since.is_some() && !matches!(cmd, Command::Params(_)) {
            // Nothing trains until the round's average arrives.
            sy.backlog.push_back(cmd);
            continue;
        }
        match cmd {
            Command::Params(p) => {
                let ParamsDown {
                    version,
                    params,
                    contributors,
                    stream: from,
                } = *p;
                on_stream = on_stream.max(from);
                if let Some(params) = &params {
                    student.set_params(params)?;
                }
                if let Some(since) = sy.waiting_since.take() {
                    let waited = since.elapsed().as_secs_f64();
                    t.sync_seconds += waited;
                    sy.unreported += waited;
                }
                tracing::debug!(
                    version,
                    contributors,
                    kept_own = params.is_none(),
                    "averaged parameters taken"
                );
                t.rounds += 1;
                sy.base_version = version;
                (sy.steps, sy.samples) = (0, 0);
            }
            Command::SyncNow(is_final) => {
                contribute(&student, &mut sy, is_final, &acks, on_stream)?;
            }
            Command::Invalid(e) => {
                // The state is consistent (nothing trained on the batch): keep it.
                if let Err(ce) = writer
                    .finish()
                    .and_then(|()| student.save(&work_dir, &worker_id))
                {
                    tracing::error!(error = %ce, "writing the checkpoint after a bad batch");
                }
                return Err(e);
            }
            cmd @ (Command::Train(_) | Command::Uploaded(..)) => {
                let wait = if queued {
                    0.0
                } else {
                    idle.elapsed().as_secs_f64()
                };
                let d = match cmd {
                    Command::Uploaded(_, n)
                        if n < stream.load(std::sync::atomic::Ordering::Acquire) =>
                    {
                        tracing::debug!("batch of an earlier stream dropped");
                        continue;
                    }
                    Command::Uploaded(u, n) => {
                        on_stream = on_stream.max(n);
                        *u
                    }
                    Command::Train(b) => {
                        match decode_train(*b, &batch_spec).and_then(|d| upload(d, &device)) {
                            Ok(d) => d,
                            Err(e) => {
                                if let Err(ce) = writer
                                    .finish()
                                    .and_then(|()| student.save(&work_dir, &worker_id))
                                {
                                    tracing::error!(error = %ce, "writing the checkpoint after a bad batch");
                                }
                                return Err(e);
                            }
                        }
                    }
                    _ => continue,
                };
                let (rows, epoch, lease_id) = (d.rows, d.epoch, d.lease_id);
                // The coordinator's span of the same batch carries the same `lease` (and
                // `epoch`), so one query follows a batch across both logs.
                let span =
                    tracing::info_span!("batch", epoch, lease = lease_id, worker = %worker_id);
                let _in_batch = span.enter();
                let started = Instant::now();
                let (out, grads) = if sync.gradients {
                    // The update is the coordinator's: the batch's gradients go up instead.
                    let (out, grads) = student.gradients_uploaded(d, sy.updates)?;
                    (out, Some(grads))
                } else {
                    (student.train_uploaded(d)?, None)
                };
                let step_seconds = started.elapsed().as_secs_f64();
                sy.updates += 1;
                let step = if sync.gradients {
                    sy.updates
                } else {
                    student.step()
                };
                t.batches += 1;
                t.samples += rows as u64;
                t.wait_seconds += wait;
                t.step_seconds += step_seconds;
                t.loss_sum += f64::from(out.loss);
                t.loss_n += 1;
                let epoch_end = batches_per_epoch > 0 && step % batches_per_epoch == 0;
                // A gradient-averaging worker's model is the coordinator's (it holds the
                // optimizer and writes the commit points): there is nothing of its own to keep.
                if !sync.gradients
                    && ((checkpoint_every > 0 && step % checkpoint_every == 0) || epoch_end)
                {
                    writer.submit(student.serialize(&worker_id)?)?;
                }
                if epoch_end {
                    tracing::info!(
                        step,
                        epoch,
                        mean_loss = t.loss_sum / t.loss_n.max(1) as f64,
                        samples_per_s =
                            t.samples as f64 / (t.step_seconds + t.wait_seconds).max(1e-9),
                        wait_seconds = t.wait_seconds,
                        "epoch's worth of updates done (checkpoint written)"
                    );
                    (t.loss_sum, t.loss_n) = (0.0, 0);
                }
                crate::telemetry::trained(&worker_id, out.loss, rows, step_seconds, wait);
                tracing::debug!(step, lease = lease_id, loss = out.loss, "trained");
                let ack = pb::Ack {
                    lease_id,
                    loss: out.loss,
                    step,
                    wait_seconds: wait as f32,
                    step_seconds: step_seconds as f32,
                    sync_seconds: std::mem::take(&mut sy.unreported) as f32,
                };
                if acks.blocking_send(Up::Ack(ack, on_stream)).is_err() {
                    break;
                }
                sy.steps += 1;
                sy.samples += rows as u64;
                if let Some(grads) = grads {
                    send_up(&mut sy, grads, true, false, &acks, on_stream);
                } else if sync.every > 0 && sy.steps >= sync.every {
                    contribute(&student, &mut sy, false, &acks, on_stream)?;
                }
            }
            Command::Eval(b) => {
                let d = decode_eval(*b, &batch_spec)?;
                t.test_errors += student.evaluate(&d)?;
                t.test_total += d.y.len() as u64;
            }
            Command::Finish => {
                writer.finish()?;
                let bytes = student.save(&work_dir, &worker_id)?;
                tracing::info!(
                    step = student.step(),
                    test_errors = t.test_errors,
                    test_total = t.test_total,
                    "final checkpoint written"
                );
                return Ok(outcome(true, &student, &t, bytes));
            }
        }
    }
    if let Err(e) = writer.finish() {
        tracing::warn!(error = %e, "an earlier checkpoint could not be written");
    }
    let bytes = student.save(&work_dir, &worker_id)?;
    tracing::info!(
        step = student.step(),
        "training stopped; checkpoint written"
    );
    Ok(outcome(false, &student, &t, bytes))
}
