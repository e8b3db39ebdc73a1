//! The one task that owns a run's [`RunState`]: an actor fed by a bounded command channel.
//!
//! Handlers (see [`crate::api`]) send [`Command`]s; the driver applies each to the state with the
//! current instant, performs the [`Action`]s that come back (hands batches, parameters and
//! requests to each stream's feeder, starts batch preparations, writes commit points, the
//! metrics and the report) and sleeps until the next command or the state's next deadline. No
//! lock guards run state: the driver is its only owner. Work that takes time (asking the
//! teachers, the cache, disk writes) runs in tasks the driver tracks; each reports back with a
//! command, and all are awaited before the driver returns.

pub mod batch;
pub mod context;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::{self, CoordinatorMessage, coordinator_message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::claim::Claim;
use crate::domain::counters::AckTimes;
use crate::domain::report::{CacheReport, RunReport, SyncReport, TeacherErrors};
use crate::domain::rounds::Params;
use crate::domain::run_state::{
    Action, Facts, Finish, ParamsToSend, RunState, StreamError, SyncUpload,
};
use crate::domain::workers::StreamId;
use crate::error::{Error, Result};
use crate::store::run_store::RunStore;
use crate::teachers::MemberStats;
use context::{KEY_SYNC_VERSION, Run, RunContext};

/// Commands waiting for the driver, at most.
pub const COMMAND_QUEUE: usize = 1024;

/// Messages waiting for one stream's feeder, at most: a worker's whole credit window, its
/// parameter replies and a few requests. A stream that falls this far behind is closed.
pub const OUTBOX: usize = context::MAX_CREDITS as usize + 64;

/// What goes down one stream, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// One message.
    Message(Box<CoordinatorMessage>),
    /// Several messages (a parameter set in chunks).
    Messages(Vec<CoordinatorMessage>),
    /// The final parameters the worker lacks (if any), then the test split.
    Evaluate(Vec<CoordinatorMessage>),
    /// `Done`, then the end of the stream.
    Done,
    /// The stream ends with this error.
    Close(Error),
}

/// What a worker's `Join` gets.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Its id and incarnation.
    pub worker: crate::domain::ledger::Worker,
    /// The incarnation's session secret (its Hello, and a later Join of the id, present it).
    pub secret: String,
}

/// A status snapshot for `RunStatus`.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// The run's figures.
    pub facts: Facts,
    /// Per-member teacher statistics.
    pub members: Vec<MemberStats>,
    /// Teacher requests retried on another replica.
    pub retries: u64,
}

/// An input to the driver.
#[derive(Debug)]
pub enum Command {
    /// A worker joins.
    Join {
        requested_id: String,
        /// The session secret the request presents (empty: none).
        presented: String,
        reply: oneshot::Sender<Result<Joined>>,
    },
    /// A batch stream opened (after its `Hello`).
    OpenStream {
        worker: crate::domain::ledger::Worker,
        /// The session secret its Hello presents.
        secret: String,
        credits: u32,
        outbox: mpsc::Sender<Outgoing>,
        reply: oneshot::Sender<Result<StreamId>>,
    },
    /// A stream ended.
    StreamClosed { stream: StreamId },
    /// A stream must end with an error (a malformed message).
    CloseStream { stream: StreamId, error: Error },
    /// More credits.
    Credits { stream: StreamId, n: u32 },
    /// An ack.
    Ack {
        stream: StreamId,
        lease_id: u64,
        times: AckTimes,
    },
    /// A whole contribution to a round.
    Contribute {
        stream: StreamId,
        upload: SyncUpload,
    },
    /// The evaluator's result, with its decoded checkpoint.
    Eval {
        stream: StreamId,
        errors: u64,
        total: u64,
        /// None when the worker left it out: larger than the message-size limit.
        checkpoint: Option<Box<Checkpoint>>,
    },
    /// A status snapshot.
    Status { reply: oneshot::Sender<StatusView> },
    /// A batch preparation ended.
    Prepared {
        lease_id: u64,
        result: Box<std::result::Result<batch::PreparedBatch, batch::PrepareError>>,
    },
    /// A commit point was written (or not).
    Persisted { result: Result<()> },
    /// The student and the report were written (or not).
    Finished { result: Result<Box<RunReport>> },
    /// The teachers' own test errors.
    TeacherErrors {
        errors: Vec<TeacherErrors>,
        ensemble: u64,
        /// A language model's teacher: its top-1 at every validation position.
        top1: Option<Arc<Vec<u32>>>,
    },
}

impl std::fmt::Debug for batch::PreparedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedBatch")
            .field("lease_id", &self.batch.lease_id)
            .field("from_cache", &self.from_cache)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for batch::PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (fatal: {})", self.error, self.fatal)
    }
}

/// The sending side of the driver's command channel.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// A handle and the receiving end of its channel (for a driver, or a test standing in for
    /// one).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Sends a command; an error once the driver has stopped.
    pub async fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).await.map_err(|_| Error::ShuttingDown)
    }

    /// Sends a command that answers on `rx`, and waits for the answer.
    pub async fn ask<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T> {
        self.send(cmd).await?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}

/// How the run ended.
pub enum Outcome {
    /// Complete: the report was written.
    Complete(Box<RunReport>),
    /// Stopped by the shutdown token before it completed.
    Stopped,
    /// Failed with this error (the stored state is resumable).
    Failed(String),
}

/// The driver: the run state and everything that acts on it.
pub struct Driver {
    ctx: Arc<RunContext>,
    state: RunState,
    store: Arc<RunStore>,
    rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<Command>,
    outboxes: HashMap<StreamId, mpsc::Sender<Outgoing>>,
    prepared: HashMap<u64, pb::TrainBatch>,
    tasks: JoinSet<()>,
    /// Scoring of epochs' averages (`evals.jsonl`), awaited before the report is written.
    epoch_evals: JoinSet<()>,
    /// Done when the last `metrics.jsonl` line is written: each append waits for the one
    /// before it, so the lines stay in epoch order off the driver's thread.
    metrics_written: Option<tokio::sync::oneshot::Receiver<()>>,
    stop: CancellationToken,
    /// The latest average in wire chunks, by version (encoded once for every recipient).
    encoded: Option<(u64, Arc<Vec<Vec<pb::ParamChunk>>>)>,
    initial: Option<Arc<Vec<Vec<pb::ParamChunk>>>>,
    teacher_eval: Option<(Vec<TeacherErrors>, u64)>,
    /// A language model's teacher's top-1 at every validation position (for agreement).
    teacher_top1: Option<Arc<Vec<u32>>>,
    checkpoint: Option<Box<Checkpoint>>,
    report: Option<RunReport>,
    failure: Option<String>,
    started: Instant,
}

impl Driver {
    /// A driver for `run` and the handle that feeds it.
    pub fn new(run: Run, shutdown: &CancellationToken) -> (Self, Handle, Arc<RunContext>) {
        let (handle, rx) = Handle::channel(COMMAND_QUEUE);
        let tx = handle.tx.clone();
        let Run {
            ctx, state, store, ..
        } = run;
        let driver = Self {
            ctx: ctx.clone(),
            state,
            store,
            rx,
            tx,
            outboxes: HashMap::new(),
            prepared: HashMap::new(),
            tasks: JoinSet::new(),
            epoch_evals: JoinSet::new(),
            metrics_written: None,
            stop: shutdown.child_token(),
            encoded: None,
            initial: None,
            teacher_eval: None,
            teacher_top1: None,
            checkpoint: None,
            report: None,
            failure: None,
            started: Instant::now(),
        };
        (driver, handle, ctx)
    }

    /// Runs until the run is complete, fails, or `shutdown` is cancelled; then waits for every
    /// task it started.
    pub async fn run(mut self, shutdown: CancellationToken) -> Outcome {
        if !self.ctx.is_offline() {
            let (ctx, stop, tx) = (self.ctx.clone(), self.stop.clone(), self.tx.clone());
            self.tasks.spawn(async move {
                match batch::evaluate_teachers(ctx, stop).await {
                    Ok((errors, ensemble, top1)) => {
                        let top1 = top1.map(Arc::new);
                        let _ = tx
                            .send(Command::TeacherErrors {
                                errors,
                                ensemble,
                                top1,
                            })
                            .await;
                    }
                    Err(e) => tracing::warn!(error = %e, "teacher evaluation did not finish"),
                }
            });
        }
        let outcome = loop {
            let deadline = self.state.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Outcome::Stopped,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break Outcome::Stopped,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.state.tick(Instant::now());
                }
            }
            self.perform();
            if let Some(report) = self.report.take() {
                break Outcome::Complete(Box::new(report));
            }
            if let Some(e) = self.failure.take() {
                break Outcome::Failed(e);
            }
        };
        // Everything the streams were told is queued in their outboxes; dropping them lets
        // each feeder deliver what is queued and end.
        if let Outcome::Failed(e) = &outcome {
            for tx in self.outboxes.values() {
                let _ = tx.try_send(Outgoing::Close(Error::RunFailed(e.clone())));
            }
        }
        self.outboxes.clear();
        self.stop.cancel();
        drop(self.rx);
        while self.tasks.join_next().await.is_some() {}
        while self.epoch_evals.join_next().await.is_some() {}
        outcome
    }

    fn handle(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Join {
                requested_id,
                presented,
                reply,
            } => {
                let claim = Claim::new(presented, distill_transport::secret::fresh_secret());
                let r = self
                    .state
                    .join(&requested_id, &claim, now)
                    .map(|worker| Joined {
                        worker,
                        secret: claim.fresh,
                    })
                    .map_err(run_error);
                let _ = reply.send(r);
            }
            Command::OpenStream {
                worker,
                secret,
                credits,
                outbox,
                reply,
            } => match self.state.open_stream(&worker, &secret, credits, now) {
                Ok(stream) => {
                    self.outboxes.insert(stream, outbox);
                    let _ = reply.send(Ok(stream));
                }
                Err(e) => {
                    let _ = reply.send(Err(run_error(e)));
                }
            },
            Command::StreamClosed { stream } => {
                self.outboxes.remove(&stream);
                self.state.stream_closed(stream, now);
            }
            Command::CloseStream { stream, error } => self.close(stream, error, now),
            Command::Credits { stream, n } => self.state.add_credits(stream, n, now),
            Command::Ack {
                stream,
                lease_id,
                times,
            } => self.state.ack(stream, lease_id, times, now),
            Command::Contribute { stream, upload } => {
                if let Err(e) = self.state.contribute(stream, upload, now) {
                    tracing::warn!(stream, error = %e, "bad synchronisation message");
                    self.close(stream, run_error(e), now);
                }
            }
            Command::Eval {
                stream,
                errors,
                total,
                checkpoint,
            } => {
                let checkpoint = match checkpoint {
                    Some(ck) => ck,
                    // With rounds the coordinator's own average is the student it scores and
                    // writes; without them nothing can stand in for the worker's, and waiting
                    // for one would wedge the run.
                    None => match self.state.latest_average() {
                        Some((_, params)) => Box::new(Checkpoint {
                            spec: self.ctx.settings.spec.clone(),
                            params: params.as_ref().clone(),
                            extra: Default::default(),
                        }),
                        None => {
                            self.failure = Some(format!(
                                "the final student checkpoint is larger than max_message_mb ({} \
                                 MiB) and the run has no average of its own to use instead: \
                                 raise max_message_mb on the coordinator and the worker",
                                self.ctx.cfg.max_message_mb
                            ));
                            return;
                        }
                    },
                };
                // A checkpoint of another network is refused before it ends the run.
                if checkpoint.spec != self.ctx.settings.spec {
                    let e = Error::InvalidArgument(format!(
                        "the final checkpoint is a {} but the run trains a {}",
                        checkpoint.spec.arch, self.ctx.settings.spec.arch
                    ));
                    tracing::error!(stream, error = %e, "bad evaluation result");
                    self.close(stream, e, now);
                    return;
                }
                match self.state.eval_result(stream, errors, total, now) {
                    Ok(()) => self.checkpoint = Some(checkpoint),
                    Err(e) => {
                        tracing::error!(stream, error = %e, "bad evaluation result");
                        self.close(stream, run_error(e), now);
                    }
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(StatusView {
                    facts: self.state.facts(now),
                    members: self.ctx.pool.stats(),
                    retries: self.ctx.pool.retries(),
                });
            }
            Command::Prepared { lease_id, result } => {
                let outcome = match *result {
                    Ok(b) => {
                        let ready = (b.from_cache, b.degraded);
                        self.prepared.insert(lease_id, b.batch);
                        Ok(ready)
                    }
                    Err(e) => Err((e.error.to_string(), e.fatal)),
                };
                self.state.prepared(lease_id, outcome, now);
            }
            Command::Persisted { result } => {
                self.state.persisted(result.map_err(|e| e.to_string()), now)
            }
            Command::Finished { result } => match result {
                Ok(report) => {
                    tracing::info!(
                        student_test_errors = report.student_test_errors,
                        test_size = report.test_size,
                        batches = report.batches_trained,
                        "run complete"
                    );
                    self.state.finished(Ok(()));
                    self.report = Some(*report);
                }
                Err(e) => self.state.finished(Err(e.to_string())),
            },
            Command::TeacherErrors {
                errors,
                ensemble,
                top1,
            } => {
                self.teacher_eval = Some((errors, ensemble));
                self.teacher_top1 = top1;
            }
        }
    }

    /// Ends `stream` with `error` (the worker may join again).
    fn close(&mut self, stream: StreamId, error: Error, now: Instant) {
        if let Some(tx) = self.outboxes.remove(&stream) {
            let _ = tx.try_send(Outgoing::Close(error));
        }
        self.state.stream_closed(stream, now);
    }

    /// Performs the state's actions, and those they lead to, until there are none.
    fn perform(&mut self) {
        loop {
            let actions = self.state.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.perform_one(a);
            }
        }
    }

    fn perform_one(&mut self, action: Action) {
        let now = Instant::now();
        match action {
            Action::Prepare { stream: _, lease } => {
                let (ctx, stop, tx) = (self.ctx.clone(), self.stop.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let lease_id = lease.id;
                    let result = batch::prepare(ctx, lease, stop).await;
                    let _ = tx
                        .send(Command::Prepared {
                            lease_id,
                            result: Box::new(result),
                        })
                        .await;
                });
            }
            Action::SendBatch { stream, lease_id } => match self.prepared.remove(&lease_id) {
                Some(b) => self.deliver(
                    stream,
                    Outgoing::Message(Box::new(CoordinatorMessage {
                        kind: Some(coordinator_message::Kind::Train(b)),
                    })),
                    now,
                ),
                None => tracing::error!(lease_id, "a batch to send was not prepared"),
            },
            Action::Discard { lease_id } => {
                self.prepared.remove(&lease_id);
            }
            Action::SendParams {
                stream,
                version,
                params,
                contributors,
            } => match self.param_messages(version, &params, contributors) {
                Ok((msgs, bytes)) => {
                    self.state.count_down_bytes(bytes);
                    self.deliver(stream, Outgoing::Messages(msgs), now);
                }
                Err(e) => self.state_fail(format!("cannot encode the parameters: {e}")),
            },
            Action::SyncNow { stream, is_final } => self.deliver(
                stream,
                Outgoing::Message(Box::new(CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::SyncNow(pb::SyncNow {
                        r#final: is_final,
                    })),
                })),
                now,
            ),
            Action::Evaluate { stream, params } => {
                let msgs = match params {
                    Some((v, p)) => match self.param_messages(v, &ParamsToSend::Average(p), 0) {
                        Ok((msgs, bytes)) => {
                            self.state.count_down_bytes(bytes);
                            msgs
                        }
                        Err(e) => {
                            self.state_fail(format!("cannot encode the parameters: {e}"));
                            return;
                        }
                    },
                    None => Vec::new(),
                };
                self.deliver(stream, Outgoing::Evaluate(msgs), now);
            }
            Action::Done { stream } => {
                if let Some(tx) = self.outboxes.remove(&stream) {
                    let _ = tx.try_send(Outgoing::Done);
                }
            }
            Action::Close { stream, error } => {
                let error = match error {
                    StreamError::Replaced(m) => Error::Stale(m),
                    StreamError::Deadline(m) => Error::DeadlineExceeded(m),
                    StreamError::Invalid(m) => Error::InvalidArgument(m),
                };
                if let Some(tx) = self.outboxes.remove(&stream) {
                    let _ = tx.try_send(Outgoing::Close(error));
                }
            }
            Action::Persist {
                snapshot,
                average,
                momentum,
                optimizer,
            } => {
                let (store, tx, spec) = (
                    self.store.clone(),
                    self.tx.clone(),
                    self.ctx.settings.spec.clone(),
                );
                self.tasks.spawn(async move {
                    let write = move || -> Result<()> {
                        let encode = |params: Params, version: u64| -> Result<Vec<u8>> {
                            let mut ck = Checkpoint {
                                spec: spec.clone(),
                                params: params.as_ref().clone(),
                                extra: Default::default(),
                            };
                            ck.extra
                                .insert(KEY_SYNC_VERSION.into(), version.to_string());
                            Ok(ck.to_bytes()?)
                        };
                        let version = average.as_ref().map_or(0, |(v, _)| *v);
                        let bytes = average.map(|(v, p)| encode(p, v)).transpose()?;
                        let momentum = momentum.map(|m| encode(m, version)).transpose()?;
                        store.save(
                            &snapshot,
                            bytes.as_deref(),
                            momentum.as_deref(),
                            optimizer.as_deref(),
                        )
                    };
                    let result = tokio::task::spawn_blocking(write)
                        .await
                        .unwrap_or_else(|e| Err(Error::Internal(format!("state task: {e}"))));
                    let _ = tx.send(Command::Persisted { result }).await;
                });
            }
            Action::EpochMetrics(line) => {
                let json = serde_json::json!({
                    "epoch": line.epoch,
                    "mean_loss": line.mean_loss,
                    "samples": line.samples,
                    "seconds": line.seconds,
                    "samples_per_sec": if line.seconds > 0.0 { line.samples as f64 / line.seconds } else { 0.0 },
                    "student_wait_seconds": line.student_wait_seconds,
                    "student_step_seconds": line.student_step_seconds,
                    "rounds": line.rounds,
                    "teacher_batches": line.teacher_batches,
                    "cached_batches": line.cached_batches,
                });
                tracing::info!(
                    epoch = line.epoch,
                    mean_loss = line.mean_loss,
                    "epoch complete"
                );
                // The append syncs the file: never on the driver's thread, where a slow disk
                // would hold every task queued behind it.
                let path = self.ctx.cfg.run_dir.join("metrics.jsonl");
                let before = self.metrics_written.take();
                let (done, written) = tokio::sync::oneshot::channel();
                self.metrics_written = Some(written);
                self.epoch_evals.spawn(async move {
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    let line = json.to_string();
                    let shown = path.display().to_string();
                    match tokio::task::spawn_blocking(move || append_line(&path, &line)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(path = %shown, error = %e, "cannot append metrics")
                        }
                        Err(e) => {
                            tracing::warn!(path = %shown, error = %e, "cannot append metrics")
                        }
                    }
                    let _ = done.send(());
                });
            }
            Action::EvaluateEpoch {
                epoch,
                version,
                params,
            } => {
                let checkpoint = Checkpoint {
                    spec: self.ctx.settings.spec.clone(),
                    params: params.as_ref().clone(),
                    extra: Default::default(),
                };
                let (data, path) = (
                    self.ctx.data.clone(),
                    self.ctx.cfg.run_dir.join("evals.jsonl"),
                );
                // Off the driver's loop: scoring takes a moment and the run goes on meanwhile.
                // A failure costs the plot a point, never the run.
                self.epoch_evals.spawn(async move {
                    let score = move || -> Result<()> {
                        let model = checkpoint.to_model(&candle_core::Device::Cpu)?;
                        let r = distill_core::eval::evaluate(
                            &model,
                            &data.test,
                            distill_core::eval::EVAL_BATCH,
                        )?;
                        let line = serde_json::json!({
                            "epoch": epoch,
                            "version": version,
                            "test_errors": r.errors,
                            "test_rows": data.test.len(),
                        });
                        append_line(&path, &line.to_string())
                            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
                    };
                    match tokio::task::spawn_blocking(score).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(epoch, error = %e, "cannot score the epoch's student")
                        }
                        Err(e) => tracing::warn!(epoch, error = %e, "epoch scoring task failed"),
                    }
                });
            }
            Action::Finish(finish) => {
                let Some(checkpoint) = self.checkpoint.take() else {
                    self.state
                        .finished(Err("the evaluator's checkpoint is missing".into()));
                    return;
                };
                let mut report = self.report_of(&finish, now);
                // With rounds, the student is the coordinator's own final average: the
                // evaluator's copy only carried its claim. Either way the coordinator scores
                // the student it writes, so a worker cannot hand in a student or an error
                // count of its own making.
                let checkpoint = match self.state.latest_average() {
                    Some((_, params)) => Box::new(Checkpoint {
                        spec: self.ctx.settings.spec.clone(),
                        params: params.as_ref().clone(),
                        extra: Default::default(),
                    }),
                    None => checkpoint,
                };
                let (dir, tx, data) = (
                    self.ctx.cfg.run_dir.clone(),
                    self.tx.clone(),
                    self.ctx.data.clone(),
                );
                let teacher_top1 = self.teacher_top1.clone();
                let mut epoch_evals = std::mem::take(&mut self.epoch_evals);
                self.tasks.spawn(async move {
                    // The page plots every epoch's score: let the last ones land first.
                    while epoch_evals.join_next().await.is_some() {}
                    let write = move || -> Result<RunReport> {
                        let model = checkpoint.to_model(&candle_core::Device::Cpu)?;
                        let own = if data.tokens.is_some() {
                            let t = distill_core::eval::evaluate_tokens(
                                &model,
                                &data.test,
                                teacher_top1.as_deref().map(Vec::as_slice),
                            )?;
                            report.student_perplexity = Some(t.perplexity());
                            report.student_agreement =
                                teacher_top1.is_some().then(|| t.agreement());
                            distill_core::eval::EvalReport {
                                n: t.positions as usize,
                                errors: t.errors as usize,
                                ..distill_core::eval::EvalReport::new(0)
                            }
                        } else {
                            distill_core::eval::evaluate(
                                &model,
                                &data.test,
                                distill_core::eval::EVAL_BATCH,
                            )?
                        };
                        if own.errors as u64 != report.student_test_errors {
                            tracing::warn!(
                                claimed = report.student_test_errors,
                                scored = own.errors,
                                "the evaluator's error count differs from the coordinator's \
                                 own scoring of the final student; the report has the latter"
                            );
                        }
                        report.student_test_errors = own.errors as u64;
                        report.test_size = own.n as u64;
                        checkpoint.save(&report.student_checkpoint)?;
                        write_report(&dir, &report)?;
                        Ok(report)
                    };
                    let result = tokio::task::spawn_blocking(write)
                        .await
                        .unwrap_or_else(|e| Err(Error::Internal(format!("report task: {e}"))));
                    let _ = tx
                        .send(Command::Finished {
                            result: result.map(Box::new),
                        })
                        .await;
                });
            }
            Action::Fail(e) => self.failure = Some(e),
        }
    }

    /// Hands `item` to the stream's feeder without waiting; a stream whose feeder is this far
    /// behind is closed (its worker stopped reading).
    fn deliver(&mut self, stream: StreamId, item: Outgoing, now: Instant) {
        let Some(tx) = self.outboxes.get(&stream) else {
            return;
        };
        if let Err(e) = tx.try_send(item) {
            tracing::warn!(stream, error = %e, "the stream's outbox is full or gone; closing it");
            self.outboxes.remove(&stream);
            self.state.stream_closed(stream, now);
        }
    }

    fn state_fail(&mut self, e: String) {
        tracing::error!(error = %e, "the run failed");
        self.failure = Some(e);
    }

    /// The `SyncDown` messages of parameters `params` of round `version`, and the bytes of
    /// parameter values they carry.
    fn param_messages(
        &mut self,
        version: u64,
        params: &ParamsToSend,
        contributors: u32,
    ) -> Result<(Vec<CoordinatorMessage>, u64)> {
        let wrap = |d: pb::SyncDown| CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Params(d)),
        };
        let groups = match params {
            ParamsToSend::Unchanged => {
                return Ok((
                    vec![wrap(pb::SyncDown {
                        version,
                        chunks: Vec::new(),
                        last: true,
                        unchanged: true,
                        contributors,
                    })],
                    0,
                ));
            }
            ParamsToSend::Initial => match &self.initial {
                Some(g) => g.clone(),
                None => {
                    let p = distill_core::model::initial_params(&self.ctx.settings)?;
                    let g = Arc::new(self.chunk(&p)?);
                    self.initial = Some(g.clone());
                    g
                }
            },
            ParamsToSend::Average(p) => match &self.encoded {
                Some((v, g)) if *v == version => g.clone(),
                _ => {
                    let g = Arc::new(self.chunk(p)?);
                    self.encoded = Some((version, g.clone()));
                    g
                }
            },
        };
        let bytes = distill_proto::params::value_bytes(&groups);
        let n = groups.len();
        let msgs = groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                wrap(pb::SyncDown {
                    version,
                    chunks: g.clone(),
                    last: i + 1 == n,
                    unchanged: false,
                    contributors,
                })
            })
            .collect();
        Ok((msgs, bytes))
    }

    fn chunk(&self, params: &[distill_proto::params::Param]) -> Result<Vec<Vec<pb::ParamChunk>>> {
        distill_proto::params::to_chunk_groups(
            params,
            self.ctx.cfg.sync.dtype.wire(),
            self.ctx.cfg.sync.chunk_bytes,
        )
        .map_err(|e| Error::Internal(e.to_string()))
    }

    fn report_of(&self, finish: &Finish, now: Instant) -> RunReport {
        let ctx = &self.ctx;
        let Facts {
            progress,
            ledger,
            counters: s,
            rounds,
            round_totals: (round_secs, up_bytes),
            resumes,
            samples_per_sec,
            ..
        } = &finish.facts;
        let (teachers, ensemble) = match &self.teacher_eval {
            Some((t, e)) => (t.clone(), Some(*e)),
            None => (Vec::new(), None),
        };
        let total = s.wait_secs + s.step_secs;
        let per_round = |x: f64| if *rounds > 0 { x / *rounds as f64 } else { 0.0 };
        RunReport {
            data: ctx.data.source.clone(),
            student_arch: ctx.settings.spec.arch.to_string(),
            temperature: ctx.cfg.temperature,
            alpha: ctx.cfg.alpha,
            teachers,
            ensemble_test_errors: ensemble,
            baseline_student_test_errors: None,
            student_test_errors: finish.errors,
            test_size: finish.total,
            student_perplexity: None,
            student_agreement: None,
            epochs: ctx.cfg.epochs,
            samples_per_sec: *samples_per_sec,
            batches_trained: progress.total_acked,
            batches_expected: progress.expected_total,
            student_wait_seconds: s.wait_secs,
            student_step_seconds: s.step_secs,
            student_wait_fraction: if total > 0.0 {
                s.wait_secs / total
            } else {
                0.0
            },
            requeued_batches: ledger.requeued_batches,
            rolled_back_batches: ledger.rolled_back_batches,
            retries: ctx.pool.retries(),
            degraded_batches: s.degraded_batches,
            resumes: *resumes,
            members: ctx.pool.stats(),
            run_seconds: now.saturating_duration_since(self.started).as_secs_f64(),
            student_checkpoint: ctx.cfg.run_dir.join("student.safetensors"),
            workers: s.per_worker.values().cloned().collect(),
            sync: SyncReport {
                every: ctx.cfg.sync.every,
                dtype: format!("{:?}", ctx.cfg.sync.dtype).to_lowercase(),
                rounds: *rounds,
                mean_round_seconds: per_round(*round_secs),
                mean_bytes_per_round: per_round((up_bytes + s.down_bytes) as f64),
                worker_sync_seconds: s.sync_secs,
                schedule: format!("{:?}", ctx.cfg.sync.schedule).to_lowercase(),
                schedule_changes: s.schedule_changes,
            },
            teacher_batches_per_epoch: s.teacher_batches.clone(),
            cached_batches_per_epoch: s.cached_batches.clone(),
            cache: ctx.cache.as_ref().map(|c| {
                let st = c.cache.stats();
                CacheReport {
                    dir: ctx
                        .cfg
                        .cache
                        .as_ref()
                        .map(|c| c.dir.clone())
                        .unwrap_or_default(),
                    mode: ctx
                        .cfg
                        .cache
                        .as_ref()
                        .map(|c| c.mode.as_str().to_string())
                        .unwrap_or_default(),
                    key: c.digests(),
                    hit_rows: st.hit_rows,
                    missed_rows: st.missed_rows,
                    rows_written: st.rows_written,
                }
            }),
        }
    }
}

/// Maps a refusal of the run state to the coordinator's error.
fn run_error(e: crate::domain::run_state::RunError) -> Error {
    use crate::domain::run_state::RunError;
    use crate::domain::workers::WorkerError;
    match e {
        RunError::Worker(w @ WorkerError::Unknown(_)) => Error::NotFound(w.to_string()),
        RunError::Worker(w @ WorkerError::Replaced { .. }) => Error::Stale(w.to_string()),
        RunError::Worker(w @ (WorkerError::StreamOpen(_) | WorkerError::Left(_))) => {
            Error::Stale(w.to_string())
        }
        RunError::Worker(w @ WorkerError::Held { .. }) => Error::PermissionDenied(w.to_string()),
        RunError::Invalid(m) => Error::InvalidArgument(m),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Appends `line` to `path` and syncs it, so a line that was logged survives a crash.
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_data()
}

/// Writes `report.json` into `dir` atomically, then the page drawn from the run directory
/// (`report.html`). The page is a view of files that are already safe, so failing to draw it
/// is a warning, not a failed run (`distill report DIR` draws it again).
pub fn write_report(dir: &std::path::Path, report: &RunReport) -> Result<()> {
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::Internal(format!("report to JSON: {e}")))?;
    distill_core::fsutil::atomic_write(&dir.join("report.json"), &json)?;
    if let Err(e) = crate::report_html::write_for_run(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write report.html");
    }
    Ok(())
}
