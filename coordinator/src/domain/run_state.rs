//! The run's state and every decision about it, in one pure state machine.
//!
//! [`RunState`] owns the batch [`Ledger`], the synchronisation [`SyncRounds`], the one
//! [`WorkerTable`], the [`Counters`], the evaluator election, the epoch barrier's requests and
//! the persistence schedule. It does no I/O, takes no locks and never reads a clock: every call
//! takes `now`, and what must be done comes back as [`Action`]s (drained with
//! [`RunState::take_actions`]) for the driver to perform; [`RunState::next_deadline`] says when
//! [`RunState::tick`] is due next (raft-rs's `Ready`, TorchElastic's decide-then-do).
//!
//! Semantics, decided here (the ledger and the rounds decide their own, see their docs):
//! - **Leasing.** Nothing is leased until `min_workers` streams were open at once. Then each
//!   stream is leased batches while it has credits and fewer than `prefetch` batches are being
//!   prepared for it, one stream after another in turn, so that streams share an epoch's end
//!   fairly. Prepared batches go to their stream in lease order.
//! - **Credits.** A credit is taken by a lease and comes back when the worker acks a batch it
//!   was sent (whatever the ledger makes of the ack: a late or stale ack still frees the
//!   worker's slot), or at once when the batch cannot be prepared. A worker never holds more
//!   than `max_credits` (available, being prepared and in flight together).
//! - **Batches that cannot be prepared** (a teacher refused, the cache failed, an offline cache
//!   misses) go back in line, counted by reason; one that fails `max_batch_failures` times, or
//!   fails in a way that cannot change (`fatal`), ends the run with an error naming the batch
//!   and the cause.
//! - **Averaging weight.** A contribution weighs the training rows the ledger accepted from that
//!   worker since its previous contribution, never what the worker claims.
//! - **Rounds' averages** are checked finite before they are sent or persisted; a non-finite
//!   average ends the run (the outer step diverged).
//! - **Epoch barrier.** With rounds, once every batch of the epoch is acked but not all acks are
//!   averaged, each stream with nothing being prepared is asked once for a non-final round.
//! - **End of training.** Every batch trained (and, with rounds, each live stream asked once for
//!   its final contribution and all of them averaged): one stream is elected evaluator and sent
//!   the final parameters it lacks and the test split. It has `eval_timeout` to answer; then its
//!   stream is closed and another is elected. The evaluator's result ends the run: the driver
//!   writes the student and the report, and on success every stream is told `Done`.
//! - **Persistence.** A commit point ([`Snapshot`]) is written at most every `persist_every`,
//!   one at a time (a newer one waits for the write in progress, and only the newest is
//!   written): with rounds when a round closes (always for the final round), without rounds
//!   after acks. A failed write ends the run with an error; the store keeps the previous commit
//!   point, so the run resumes from there.
//! - **Restore.** From a snapshot, every outstanding lease goes back in line and, with rounds,
//!   every ack above its worker's committed sequence number is rolled back (those updates were
//!   in a worker's own parameters only).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::claim::Claim;
use super::counters::{AckTimes, Counters};
use super::ledger::{
    AckOutcome, BatchId, Lease, Ledger, LedgerCounters, LedgerEvent, LedgerState, Progress,
    ReleaseReason, Worker,
};
use super::rounds::{Closed, Contribution, Params, SyncRounds};
use super::schedule::RoundPlan;
use super::workers::{Preparing, StreamId, WorkerError, WorkerTable};

/// What the run state needs to know of the run's config.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Rows in the training split.
    pub train_rows: usize,
    /// Rows per batch (an epoch's last batch keeps the remainder).
    pub batch_size: usize,
    /// Most batches prepared ahead for one stream.
    pub prefetch: usize,
    /// Streams open at once before the first lease.
    pub min_workers: usize,
    /// Whether the run has synchronisation rounds.
    pub rounds: bool,
    /// With rounds on the fixed schedule ([`super::schedule`]): the updates each member makes
    /// per round. None: the free schedule (whoever has room takes the next batch).
    pub fixed_every: Option<u64>,
    /// Shortest time between two commit points.
    pub persist_every: Duration,
    /// How long the evaluator may take before another is elected.
    pub eval_timeout: Duration,
    /// Whether each epoch's closing average is scored on the test split (with rounds).
    pub eval_every_epoch: bool,
    /// Failed preparations of one batch that end the run.
    pub max_batch_failures: u32,
    /// Most credits a worker may hold.
    pub max_credits: u32,
    /// How long a joined incarnation holds its id before it opens its stream (the Hello
    /// deadline): meanwhile a Join of the id needs its session secret.
    pub join_hold: Duration,
    /// The student settings the run trains with, as JSON (a resume with others is refused).
    pub settings_json: String,
}

/// One commit point of the run: what `state.redb` holds besides the average's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The student settings, as JSON.
    pub config: String,
    /// The ledger, with the commit points (per worker id, the highest ack sequence number
    /// inside the stored average).
    pub ledger: LedgerState,
    /// Per worker id, its current incarnation.
    pub workers: BTreeMap<String, u64>,
    /// Version of the stored average (0: none).
    pub sync_version: u64,
    /// The run's counters.
    pub counters: Counters,
    /// Times the run was resumed from its store.
    pub resumes: u64,
}

/// A worker's whole contribution to a round, as it came off the wire.
#[derive(Debug, Clone)]
pub struct SyncUpload {
    /// The averaged version the worker last took.
    pub base_version: u64,
    /// Its parameters (or, with `gradients`, its batch's gradients), in model order.
    pub params: Params,
    /// In answer to a final `SyncNow`.
    pub is_final: bool,
    /// `params` are gradients (a gradient-averaging run).
    pub gradients: bool,
    /// Bytes of values it carried on the wire.
    pub wire_bytes: u64,
}

/// Parameters to send to a stream.
#[derive(Debug, Clone)]
pub enum ParamsToSend {
    /// The run's seeded initial parameters (no round closed yet).
    Initial,
    /// An average.
    Average(Params),
    /// Keep your own parameters (a lone contributor's round).
    Unchanged,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Prepare the batch of `lease` for `stream` and report with [`RunState::prepared`].
    Prepare { stream: StreamId, lease: Lease },
    /// Send the prepared batch of `lease_id` to `stream`.
    SendBatch { stream: StreamId, lease_id: u64 },
    /// The prepared batch of `lease_id` will not be sent (its stream is gone).
    Discard { lease_id: u64 },
    /// Send parameters of round `version` to `stream`.
    SendParams {
        stream: StreamId,
        version: u64,
        params: ParamsToSend,
        contributors: u32,
    },
    /// Ask `stream` for a round now (`is_final`: its last contribution).
    SyncNow { stream: StreamId, is_final: bool },
    /// Send `stream` the final parameters (when given) and the test split to evaluate.
    Evaluate {
        stream: StreamId,
        params: Option<(u64, Params)>,
    },
    /// Tell `stream` the run is complete and end it.
    Done { stream: StreamId },
    /// End `stream` with an error.
    Close {
        stream: StreamId,
        error: StreamError,
    },
    /// Write a commit point (with the average, when the run has one, and the outer
    /// optimizer's momentum, when it has one) and report with [`RunState::persisted`].
    Persist {
        snapshot: Box<Snapshot>,
        average: Option<(u64, Params)>,
        momentum: Option<Params>,
        /// A gradient-averaging run's optimizer state ([`super::gradient_step`]).
        optimizer: Option<Vec<u8>>,
    },
    /// Append an epoch's line to `metrics.jsonl`.
    EpochMetrics(EpochLine),
    /// Score the average that ends `epoch` on the test split and append the result to
    /// `evals.jsonl` (only with rounds and `eval_every_epoch`: without rounds the coordinator
    /// holds no parameters before the end).
    EvaluateEpoch {
        epoch: u32,
        version: u64,
        params: Params,
    },
    /// Write the student and the report, then report with [`RunState::finished`].
    Finish(Box<Finish>),
    /// The run cannot go on: end it with this error.
    Fail(String),
}

/// Why a stream is ended by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A newer incarnation of the worker joined.
    Replaced(String),
    /// The worker took too long (the evaluation).
    Deadline(String),
    /// The worker's credit window overflowed or a message was malformed.
    Invalid(String),
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochLine {
    /// The epoch completed.
    pub epoch: u32,
    /// Mean acked loss over it.
    pub mean_loss: f64,
    /// Rows acked in the run so far.
    pub samples: u64,
    /// Seconds since the first batch was sent.
    pub seconds: f64,
    /// Seconds workers waited for batches, so far.
    pub student_wait_seconds: f64,
    /// Seconds workers spent training, so far.
    pub student_step_seconds: f64,
    /// Synchronisation rounds closed, so far.
    pub rounds: u64,
    /// Batches of the epoch from the teachers.
    pub teacher_batches: u64,
    /// Batches of the epoch from the cache.
    pub cached_batches: u64,
}

/// What the report of a finished run is made of.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The evaluator.
    pub worker: Worker,
    /// Its test errors.
    pub errors: u64,
    /// Rows it evaluated.
    pub total: u64,
    /// The facts of the run.
    pub facts: Facts,
}

/// The run's figures at one instant (status and report).
#[derive(Debug, Clone)]
pub struct Facts {
    /// Where the run stands.
    pub progress: Progress,
    /// Ledger counters (requeues, stale acks, …).
    pub ledger: LedgerCounters,
    /// Whether every batch is trained.
    pub done: bool,
    /// The run's counters.
    pub counters: Counters,
    /// Rounds closed.
    pub rounds: u64,
    /// Seconds rounds were open, and parameter bytes uploaded, over all rounds.
    pub round_totals: (f64, u64),
    /// Times the run was resumed.
    pub resumes: u64,
    /// Training rows per second from the first batch sent to the last ack.
    pub samples_per_sec: f64,
    /// Per open stream: its worker id and batches being prepared.
    pub queues: Vec<(String, usize)>,
    /// With rounds, per live worker id: batches it trained that no average (closed or
    /// pending) holds, i.e. what a rollback would undo if it died now.
    pub unaveraged: BTreeMap<String, u64>,
}

/// A refusal of something a worker asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The worker is not (or no longer) the current incarnation of a joined id.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The request does not fit the run.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Training,
    /// Every batch trained; `evaluator` is the elected stream and its deadline.
    Evaluating {
        evaluator: Option<(StreamId, Instant)>,
    },
    /// The evaluator answered; the driver is writing the report.
    Finishing,
    Complete,
    Failed,
}

/// The run's state machine. See the module docs.
#[derive(Debug)]
pub struct RunState {
    settings: RunSettings,
    ledger: Ledger,
    rounds: SyncRounds,
    workers: WorkerTable,
    counters: Counters,
    resumes: u64,
    phase: Phase,
    leasing: bool,
    failures: BTreeMap<BatchId, u32>,
    /// Set when a commit point is due: the earliest instant it may be written.
    persist_due: Option<Instant>,
    persist_in_flight: bool,
    last_persist: Option<Instant>,
    /// The newest average not yet in a written commit point.
    unpersisted_average: bool,
    first_send: Option<Instant>,
    last_ack: Option<Instant>,
    /// The fixed schedule's current round (None between rounds and on the free schedule).
    plan: Option<RoundPlan>,
    /// The members of the last round planned (the schedule changes when they do).
    last_members: Option<BTreeSet<Worker>>,
    actions: Vec<Action>,
}

impl RunState {
    /// A fresh run, or the run `restored` from its last commit point (with the average's
    /// version and parameters when it had one).
    pub fn new(
        settings: RunSettings,
        mut ledger: Ledger,
        rounds: SyncRounds,
        restored: Option<(Snapshot, Option<(u64, Params)>)>,
    ) -> Result<Self, String> {
        let mut rounds = rounds;
        let mut workers = WorkerTable::default();
        let mut counters = Counters::default();
        let mut resumes = 0;
        if let Some((saved, average)) = restored {
            if saved.config != settings.settings_json {
                return Err(format!(
                    "it holds the state of a run with other student settings ({})",
                    saved.config
                ));
            }
            let (mut restored, _) = Ledger::restore(saved.ledger).map_err(|e| e.to_string())?;
            if restored.config() != ledger.config() {
                return Err(
                    "the stored run has another data size, batch size, epochs or seed".into(),
                );
            }
            if settings.rounds {
                for id in restored.workers_with_acks() {
                    let through = restored.committed_seq(&id);
                    restored.rollback(&id, through);
                }
            }
            restored.settle();
            workers = WorkerTable::restored(saved.workers);
            ledger = restored;
            rounds.restore(average);
            counters = saved.counters;
            resumes = saved.resumes.saturating_add(1);
        }
        Ok(Self {
            settings,
            ledger,
            rounds,
            workers,
            counters,
            resumes,
            phase: Phase::Training,
            leasing: false,
            failures: BTreeMap::new(),
            persist_due: None,
            persist_in_flight: false,
            last_persist: None,
            unpersisted_average: false,
            first_send: None,
            last_ack: None,
            plan: None,
            last_members: None,
            actions: Vec::new(),
        })
    }

    /// The actions decided since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Times the run was resumed.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// Whether the run is complete (the report written).
    pub fn is_complete(&self) -> bool {
        self.phase == Phase::Complete
    }

    /// Whether the run ended with an error.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        self.ledger.config().batches_per_epoch()
    }

    /// The ledger (read only).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The open stream of `worker`'s current incarnation.
    pub fn stream_of(&self, worker: &Worker) -> Option<StreamId> {
        self.workers.stream_of(worker)
    }

    /// A worker joins: the next incarnation of its id (a new id when `requested_id` is empty).
    /// The incarnation it replaces loses its stream and, with rounds, whatever it trained after
    /// its last averaged contribution.
    /// Refused when the id's current incarnation is held and `claim.presented` is not its
    /// session secret ([`crate::domain::workers`]); the new incarnation holds `claim.fresh`.
    pub fn join(
        &mut self,
        requested_id: &str,
        claim: &Claim,
        now: Instant,
    ) -> Result<Worker, RunError> {
        let (worker, previous) =
            self.workers
                .next_join(requested_id, &claim.presented, now, self.settings.join_hold)?;
        self.workers.commit_join(&worker, claim, now);
        if let Some((old, stream)) = previous {
            let events = self.ledger.revoke(&old.id, ReleaseReason::NewIncarnation);
            self.on_ledger_events(&events, now);
            if let Some(stream) = stream {
                self.actions.push(Action::Close {
                    stream,
                    error: StreamError::Replaced(format!(
                        "worker {old} was replaced by incarnation {}",
                        worker.incarnation
                    )),
                });
                self.drop_stream(stream, now);
            }
            self.lose_uncommitted(&old, now);
        }
        tracing::info!(%worker, "worker joined");
        self.pump(now);
        Ok(worker)
    }

    /// Checks that `worker` is the current incarnation of a joined id.
    pub fn check_worker(&self, worker: &Worker) -> Result<(), RunError> {
        Ok(self.workers.check(worker)?)
    }

    /// A batch stream opened for `worker`, presenting its session secret `secret`, with
    /// `credits`: it starts from the run's parameters (with rounds) and is leased batches.
    pub fn open_stream(
        &mut self,
        worker: &Worker,
        secret: &str,
        credits: u32,
        now: Instant,
    ) -> Result<StreamId, RunError> {
        if credits == 0 || credits > self.settings.max_credits {
            return Err(RunError::Invalid(format!(
                "Hello.credits must be 1 to {}, got {credits}",
                self.settings.max_credits
            )));
        }
        if matches!(self.phase, Phase::Failed) {
            return Err(RunError::Invalid("the run has failed".into()));
        }
        let stream = self.workers.open_stream(worker, secret, credits)?;
        tracing::info!(%worker, stream, credits, "batch stream open");
        if self.settings.rounds {
            // With rounds the coordinator's average is the model: every stream starts from it
            // (the seeded initial parameters before the first round), so a worker that
            // reconnects drops whatever it trained after its last averaged contribution.
            let (version, params) = match self.rounds.latest() {
                Some((v, p)) => (v, ParamsToSend::Average(p)),
                None => (0, ParamsToSend::Initial),
            };
            self.send_params(stream, version, params, 0);
        }
        if self.phase == Phase::Complete {
            self.actions.push(Action::Done { stream });
        }
        self.pump(now);
        Ok(stream)
    }

    /// A stream ended (the worker went away or the coordinator closed it).
    pub fn stream_closed(&mut self, stream: StreamId, now: Instant) {
        if self.workers.stream(stream).is_none() {
            return;
        }
        self.drop_stream(stream, now);
        self.pump(now);
    }

    /// The worker adds `n` credits (capped so that it never holds more than `max_credits`).
    pub fn add_credits(&mut self, stream: StreamId, n: u32, now: Instant) {
        let max = u64::from(self.settings.max_credits);
        if let Some(s) = self.workers.stream_mut(stream) {
            let room = max.saturating_sub(s.credits_held());
            s.credits = s
                .credits
                .saturating_add(u32::try_from(room.min(u64::from(n))).unwrap_or(0));
        }
        self.pump(now);
    }

    /// An ack of `lease_id` on `stream`.
    pub fn ack(&mut self, stream: StreamId, lease_id: u64, times: AckTimes, now: Instant) {
        let Some(s) = self.workers.stream_mut(stream) else {
            return;
        };
        if s.in_flight.remove(&lease_id) {
            s.credits = s.credits.saturating_add(1);
        }
        let worker = s.worker.clone();
        match self.ledger.ack(&worker, lease_id, now) {
            AckOutcome::Acked { batch, events, .. } => {
                let rows = self.batch_rows(batch);
                self.counters.ack(&worker.id, rows, times);
                self.workers.add_rows(&worker.id, rows);
                self.last_ack = Some(now);
                self.failures.remove(&batch);
                tracing::debug!(%worker, %batch, loss = times.loss, "batch trained");
                self.on_ledger_events(&events, now);
                if !self.settings.rounds {
                    self.want_persist(now);
                }
            }
            AckOutcome::Duplicate { batch } => {
                tracing::debug!(%worker, %batch, "duplicate ack ignored");
            }
            other => tracing::warn!(%worker, lease_id, outcome = ?other, "ack rejected"),
        }
        self.pump(now);
    }

    /// A worker's whole contribution to a round arrived; its weight is what the ledger accepted
    /// from it since its previous contribution.
    pub fn contribute(
        &mut self,
        stream: StreamId,
        upload: SyncUpload,
        now: Instant,
    ) -> Result<(), RunError> {
        let SyncUpload {
            base_version,
            params,
            is_final,
            gradients,
            wire_bytes,
        } = upload;
        if !self.settings.rounds {
            return Err(RunError::Invalid(
                "this run has no synchronisation rounds (sync.every = 0)".into(),
            ));
        }
        let Some(s) = self.workers.stream(stream) else {
            return Err(RunError::Invalid("the stream is closed".into()));
        };
        let worker = s.worker.clone();
        self.workers.check(&worker)?;
        let c = Contribution {
            worker: worker.clone(),
            base_version,
            samples: self.workers.rows(&worker.id),
            params,
            is_final,
            last_ack_seq: self.ledger.last_ack_seq(&worker.id).unwrap_or(0),
            wire_bytes,
            gradients,
        };
        tracing::debug!(%worker, samples = c.samples, base = base_version, is_final, "contribution");
        let closed = self
            .rounds
            .contribute(c, &self.round_members(), now)
            .map_err(|e| RunError::Invalid(e.to_string()))?;
        self.workers.take_rows(&worker.id);
        if let Some(c) = closed {
            self.on_round_closed(c, now);
        }
        self.pump(now);
        Ok(())
    }

    /// The batch of `lease_id` was prepared (`Ok`: from the cache, degraded) or could not be
    /// (`Err`: the cause, and whether it can never succeed).
    pub fn prepared(
        &mut self,
        lease_id: u64,
        outcome: Result<(bool, bool), (String, bool)>,
        now: Instant,
    ) {
        let Some(stream) = self.workers.preparing_stream(lease_id) else {
            if outcome.is_ok() {
                self.actions.push(Action::Discard { lease_id });
            }
            return;
        };
        match outcome {
            Ok(ready) => {
                if let Some(p) = self
                    .workers
                    .stream_mut(stream)
                    .and_then(|s| s.preparing.iter_mut().find(|p| p.lease_id == lease_id))
                {
                    p.ready = Some(ready);
                }
            }
            Err((cause, fatal)) => {
                let Some(s) = self.workers.stream_mut(stream) else {
                    return;
                };
                let Some(pos) = s.preparing.iter().position(|p| p.lease_id == lease_id) else {
                    return;
                };
                let batch = s.preparing[pos].batch;
                s.preparing.remove(pos);
                s.credits = s.credits.saturating_add(1);
                let worker = s.worker.clone();
                if let Some(plan) = &mut self.plan {
                    // The batch goes back in line for the next round.
                    plan.lost_one(&worker);
                }
                if let Some(e) = self.ledger.release(lease_id, ReleaseReason::NotPrepared) {
                    log_events(&[e]);
                }
                let n = self.failures.entry(batch).or_insert(0);
                *n += 1;
                let n = *n;
                *self
                    .counters
                    .failed_preparations
                    .entry(reason_kind(&cause))
                    .or_insert(0) += 1;
                tracing::warn!(%worker, %batch, failures = n, error = %cause, "could not prepare a batch; it goes back in line");
                if fatal || n >= self.settings.max_batch_failures {
                    self.fail(format!(
                        "{batch} could not be prepared ({n} attempts): {cause}"
                    ));
                    return;
                }
            }
        }
        self.flush(stream, now);
        self.pump(now);
    }

    /// The latest average of the synchronisation rounds and its version (None without rounds
    /// or before the first).
    pub fn latest_average(&self) -> Option<(u64, Params)> {
        if self.settings.rounds {
            self.rounds.latest()
        } else {
            None
        }
    }

    /// The evaluator's result arrived on `stream`.
    pub fn eval_result(
        &mut self,
        stream: StreamId,
        errors: u64,
        total: u64,
        now: Instant,
    ) -> Result<(), RunError> {
        let worker = self.workers.stream(stream).map(|s| s.worker.clone());
        match (&self.phase, worker) {
            (
                Phase::Evaluating {
                    evaluator: Some((e, _)),
                },
                Some(worker),
            ) if *e == stream => {
                self.phase = Phase::Finishing;
                let facts = self.facts(now);
                self.actions.push(Action::Finish(Box::new(Finish {
                    worker,
                    errors,
                    total,
                    facts,
                })));
                Ok(())
            }
            (_, worker) => Err(RunError::Invalid(format!(
                "{} sent an evaluation result but was not asked to evaluate",
                worker.map_or_else(|| format!("stream {stream}"), |w| w.to_string())
            ))),
        }
    }

    /// The report was written (`Ok`) or could not be (`Err`, which ends the run with it).
    pub fn finished(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.phase = Phase::Complete;
                for stream in self.workers.stream_ids() {
                    self.actions.push(Action::Done { stream });
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// A commit point was written (`Ok`) or could not be (`Err`, which ends the run).
    pub fn persisted(&mut self, result: Result<(), String>, now: Instant) {
        self.persist_in_flight = false;
        match result {
            Ok(()) => {
                if self.persist_due.is_some_and(|d| d <= now) {
                    self.persist(now);
                }
            }
            Err(e) => self.fail(format!("cannot write the run state: {e}")),
        }
    }

    /// Expires leases, closes a timed-out round, re-elects an evaluator that took too long and
    /// writes a commit point that is due.
    pub fn tick(&mut self, now: Instant) {
        let events = self.ledger.tick(now);
        self.on_ledger_events(&events, now);
        if let Some(c) = self.rounds.tick(&self.round_members(), now) {
            self.on_round_closed(c, now);
        }
        if let Phase::Evaluating {
            evaluator: Some((stream, deadline)),
        } = self.phase
            && now >= deadline
        {
            tracing::warn!(
                stream,
                "the evaluator did not answer in time; electing another"
            );
            self.actions.push(Action::Close {
                stream,
                error: StreamError::Deadline(format!(
                    "the evaluation took longer than {:?}",
                    self.settings.eval_timeout
                )),
            });
            self.drop_stream(stream, now);
        }
        if self.persist_due.is_some_and(|d| d <= now) && !self.persist_in_flight {
            self.persist(now);
        }
        self.pump(now);
    }

    /// When [`Self::tick`] is due next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let eval = match self.phase {
            Phase::Evaluating {
                evaluator: Some((_, d)),
            } => Some(d),
            _ => None,
        };
        let persist = self.persist_due.filter(|_| !self.persist_in_flight);
        [
            self.ledger.next_deadline(),
            self.rounds.next_deadline(),
            eval,
            persist,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The run's figures now.
    pub fn facts(&self, _now: Instant) -> Facts {
        Facts {
            progress: self.ledger.progress(),
            ledger: self.ledger.counters().clone(),
            done: self.ledger.is_done(),
            counters: self.counters.clone(),
            rounds: self.rounds.version(),
            round_totals: self.rounds.totals(),
            resumes: self.resumes,
            samples_per_sec: match (self.first_send, self.last_ack) {
                (Some(a), Some(b)) if b > a => self.counters.samples as f64 / (b - a).as_secs_f64(),
                _ => 0.0,
            },
            queues: self.workers.queue_depths(),
            unaveraged: if self.settings.rounds {
                self.workers
                    .live()
                    .iter()
                    .map(|w| {
                        let through = self.averaged_through(w);
                        (w.id.clone(), self.ledger.acks_after(&w.id, through))
                    })
                    .collect()
            } else {
                BTreeMap::new()
            },
        }
    }

    /// The commit point as of now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.settings.settings_json.clone(),
            ledger: self.ledger.snapshot(),
            workers: self.workers.incarnations(),
            sync_version: self.rounds.latest().map_or(0, |(v, _)| v),
            counters: self.counters.clone(),
            resumes: self.resumes,
        }
    }

    /// Bytes of parameters sent down, counted by the driver that encoded them.
    pub fn count_down_bytes(&mut self, bytes: u64) {
        self.counters.down_bytes = self.counters.down_bytes.saturating_add(bytes);
    }

    /// Who takes part in the open round: the plan's members still live on the fixed schedule,
    /// every live worker otherwise.
    fn round_members(&self) -> BTreeSet<Worker> {
        let live = self.workers.live();
        match &self.plan {
            Some(plan) => live.into_iter().filter(|w| plan.contains(w)).collect(),
            None => live,
        }
    }

    /// On the fixed schedule with no round planned, plans the next one for the workers with an
    /// open stream: a member that missed an average (it joined mid-round) is sent the latest
    /// first, then the round's batches are leased in turn ([`RoundPlan`]).
    fn plan_round(&mut self, now: Instant) {
        let Some(every) = self.settings.fixed_every else {
            return;
        };
        if self.plan.is_some() || self.ledger.is_done() {
            return;
        }
        let members = self.workers.live();
        if members.is_empty() {
            return;
        }
        let ledger = &mut self.ledger;
        let plan = match RoundPlan::plan(&members, every, |w| ledger.lease(w, now)) {
            Ok(Some(plan)) => plan,
            Ok(None) => return,
            Err(e) => {
                self.fail(format!("cannot lease a batch: {e}"));
                return;
            }
        };
        if let Some((version, params)) = self.rounds.latest() {
            for w in &members {
                if let Some(stream) = self.workers.stream_of(w)
                    && self
                        .workers
                        .stream(stream)
                        .is_some_and(|s| s.sent_version != version)
                {
                    self.send_params(stream, version, ParamsToSend::Average(params.clone()), 0);
                }
            }
        }
        let round = self.rounds.version() + 1;
        if let Some(was) = self.last_members.as_ref().filter(|was| **was != members) {
            let ids = |s: &BTreeSet<Worker>| s.iter().map(|w| w.id.clone()).collect::<Vec<_>>();
            tracing::info!(
                round,
                members = ?ids(&members),
                was = ?ids(was),
                "the round schedule changed: a worker joined or left"
            );
            self.counters.schedule_changes += 1;
        }
        tracing::debug!(round, quotas = ?plan.quotas(), "round planned");
        self.last_members = Some(members);
        self.plan = Some(plan);
    }

    fn batch_rows(&self, batch: BatchId) -> u64 {
        let (n, bs) = (self.settings.train_rows, self.settings.batch_size);
        let start = (batch.index as usize).saturating_mul(bs);
        bs.min(n.saturating_sub(start)) as u64
    }

    fn fail(&mut self, error: String) {
        if matches!(self.phase, Phase::Failed | Phase::Complete) {
            return;
        }
        tracing::error!(%error, "the run failed");
        self.phase = Phase::Failed;
        self.actions.push(Action::Fail(error));
    }

    /// Removes a stream: its leases go back in line, it leaves the rounds, and (with rounds)
    /// what its worker trained after its last averaged contribution is rolled back.
    fn drop_stream(&mut self, stream: StreamId, now: Instant) {
        let Some((s, current)) = self.workers.close_stream(stream) else {
            return;
        };
        for p in &s.preparing {
            self.actions.push(Action::Discard {
                lease_id: p.lease_id,
            });
        }
        if let Phase::Evaluating {
            evaluator: Some((e, _)),
        } = self.phase
            && e == stream
        {
            self.phase = Phase::Evaluating { evaluator: None };
        }
        if matches!(self.phase, Phase::Complete | Phase::Finishing) {
            return;
        }
        tracing::info!(worker = %s.worker, stream, "batch stream closed");
        if current {
            let events = self.ledger.revoke(&s.worker.id, ReleaseReason::WorkerLeft);
            self.on_ledger_events(&events, now);
            self.lose_uncommitted(&s.worker, now);
        }
    }

    /// `worker` is gone: it leaves the rounds, and the acks it made after its last averaged
    /// contribution are rolled back, since those updates existed only in its own parameters.
    fn lose_uncommitted(&mut self, worker: &Worker, now: Instant) {
        if !self.settings.rounds {
            return;
        }
        let committed = self.averaged_through(worker);
        if let Some(plan) = &mut self.plan {
            // Its planned leases are the ledger's again (revoked with its stream).
            plan.remove(worker);
            if plan.is_empty() {
                self.plan = None;
            }
        }
        if let Some(c) = self.rounds.leave(worker, &self.round_members(), now) {
            self.on_round_closed(c, now);
        }
        let rb = self.ledger.rollback(&worker.id, committed);
        if !rb.requeued.is_empty() {
            tracing::warn!(%worker, batches = rb.requeued.len(), "batches trained after the worker's last round are trained again");
        }
        self.on_ledger_events(&rb.events, now);
    }

    /// The last ack of `worker` that an average holds or will hold: its commit point, or its
    /// contribution in the open round (which is averaged even if the worker is gone).
    fn averaged_through(&self, worker: &Worker) -> u64 {
        self.ledger
            .committed_seq(&worker.id)
            .max(self.rounds.pending_seq(worker).unwrap_or(0))
    }

    fn on_ledger_events(&mut self, events: &[LedgerEvent], now: Instant) {
        log_events(events);
        for e in events {
            if let LedgerEvent::EpochCompleted { epoch } = e {
                let mean_loss = self.counters.take_epoch_loss();
                let c = &self.counters;
                let line = EpochLine {
                    epoch: *epoch,
                    mean_loss,
                    samples: c.samples,
                    seconds: self
                        .first_send
                        .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
                    student_wait_seconds: c.wait_secs,
                    student_step_seconds: c.step_secs,
                    rounds: self.rounds.version(),
                    teacher_batches: c.teacher_batches.get(*epoch as usize).copied().unwrap_or(0),
                    cached_batches: c.cached_batches.get(*epoch as usize).copied().unwrap_or(0),
                };
                tracing::debug!(epoch, mean_loss, samples = c.samples, "epoch complete");
                self.actions.push(Action::EpochMetrics(line));
                // With rounds the barrier passed in this very commit, so the latest average is
                // the student at the end of the epoch.
                if self.settings.eval_every_epoch
                    && let Some((version, params)) = self.latest_average()
                {
                    self.actions.push(Action::EvaluateEpoch {
                        epoch: *epoch,
                        version,
                        params,
                    });
                }
                self.want_persist(now);
            }
        }
    }

    fn on_round_closed(&mut self, closed: Closed, now: Instant) {
        if let Some(e) = &closed.error {
            self.fail(format!("round {} could not be closed: {e}", closed.version));
            return;
        }
        if let Some((name, _, _)) = closed
            .params
            .iter()
            .find(|(_, _, v)| v.iter().any(|x| !x.is_finite()))
        {
            self.fail(format!(
                "the average of round {} is not finite (`{name}`): {}",
                closed.version,
                if self.rounds.averages_gradients() {
                    "training diverged; lower the learning rate or set a gradient clip"
                } else {
                    "the outer step diverged; lower `[sync] outer_lr`"
                }
            ));
            return;
        }
        let contributors = u32::try_from(closed.replies.len()).unwrap_or(u32::MAX);
        tracing::debug!(
            version = closed.version,
            contributors,
            missing = closed.missing.len(),
            samples = closed.samples,
            seconds = closed.seconds,
            reason = ?closed.reason,
            "synchronisation round closed"
        );
        let mut events = Vec::new();
        if self.plan.take().is_some() {
            // On the fixed schedule a member that did not report in time is taken for dead:
            // carrying its late rows into another round would make the student depend on timing.
            for w in &closed.missing {
                if let Some(stream) = self.workers.stream_of(w) {
                    tracing::warn!(worker = %w, version = closed.version, "a member of the round did not report in time; its stream is closed");
                    self.actions.push(Action::Close {
                        stream,
                        error: StreamError::Deadline(format!(
                            "worker {w} did not contribute to round {} in time",
                            closed.version
                        )),
                    });
                    self.drop_stream(stream, now);
                }
            }
        }
        for (w, unchanged) in &closed.replies {
            if let Some(stream) = self.workers.stream_of(w) {
                let params = if *unchanged {
                    ParamsToSend::Unchanged
                } else {
                    ParamsToSend::Average(closed.params.clone())
                };
                self.send_params(stream, closed.version, params, contributors);
            }
        }
        // The contributors' acks up to their contributions are now in the model.
        for (id, seq) in &closed.commits {
            events.extend(self.ledger.commit(id, *seq));
        }
        self.on_ledger_events(&events, now);
        self.unpersisted_average = true;
        if self.rounds.all_final(&self.workers.live()) {
            // The final average is always written, at once.
            self.persist_due = Some(now);
            if !self.persist_in_flight {
                self.persist(now);
            }
        } else {
            self.want_persist(now);
        }
    }

    fn send_params(
        &mut self,
        stream: StreamId,
        version: u64,
        params: ParamsToSend,
        contributors: u32,
    ) {
        if let Some(s) = self.workers.stream_mut(stream) {
            s.sent_version = version;
        }
        self.actions.push(Action::SendParams {
            stream,
            version,
            params,
            contributors,
        });
    }

    /// A commit point is wanted: due once `persist_every` passed since the last one.
    fn want_persist(&mut self, now: Instant) {
        if self.persist_due.is_some() {
            return;
        }
        let due = self
            .last_persist
            .and_then(|t| t.checked_add(self.settings.persist_every))
            .map_or(now, |d| d.max(now));
        self.persist_due = Some(due);
        if due <= now && !self.persist_in_flight {
            self.persist(now);
        }
    }

    fn persist(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Failed) {
            return;
        }
        let (average, momentum, optimizer) = if self.settings.rounds && self.unpersisted_average {
            let optimizer = match self.rounds.optimizer_state().transpose() {
                Ok(o) => o,
                Err(e) => {
                    self.fail(format!("cannot write the run state: {e}"));
                    return;
                }
            };
            self.unpersisted_average = false;
            (self.rounds.latest(), self.rounds.momentum(), optimizer)
        } else {
            (None, None, None)
        };
        self.persist_due = None;
        self.persist_in_flight = true;
        self.last_persist = Some(now);
        self.actions.push(Action::Persist {
            snapshot: Box::new(self.snapshot()),
            average,
            momentum,
            optimizer,
        });
    }

    /// Sends the stream's prepared batches that are next in lease order.
    fn flush(&mut self, stream: StreamId, now: Instant) {
        let Some(s) = self.workers.stream_mut(stream) else {
            return;
        };
        let mut sent = Vec::new();
        while let Some(Preparing { ready: Some(_), .. }) = s.preparing.front() {
            let Some(p) = s.preparing.pop_front() else {
                break;
            };
            s.in_flight.insert(p.lease_id);
            sent.push(p);
        }
        for p in sent {
            if let Some((from_cache, degraded)) = p.ready {
                self.counters
                    .batch_sent(p.batch.epoch, from_cache, degraded);
            }
            self.first_send.get_or_insert(now);
            self.actions.push(Action::SendBatch {
                stream,
                lease_id: p.lease_id,
            });
        }
    }

    /// Decides what every stream is sent next: leases while credits allow, the barrier's and
    /// the final rounds, and the evaluation once everything is trained.
    fn pump(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Training | Phase::Evaluating { .. }) {
            return;
        }
        if !self.leasing && self.workers.open_streams() >= self.settings.min_workers {
            tracing::info!(
                workers = self.workers.open_streams(),
                "enough workers joined; training starts"
            );
            self.leasing = true;
        }
        let streams = self.workers.stream_ids();
        if self.leasing && self.phase == Phase::Training {
            self.plan_round(now);
            if matches!(self.phase, Phase::Failed) {
                return;
            }
            // One lease per stream per pass, so that streams share the epoch's end.
            let mut open: BTreeSet<StreamId> = streams.iter().copied().collect();
            while !open.is_empty() {
                for &stream in &streams {
                    if open.contains(&stream) && !self.lease_one(stream, now) {
                        open.remove(&stream);
                    }
                }
            }
        }
        let epoch = self.ledger.progress().epoch;
        // On the fixed schedule the plan asks for the rounds that end an epoch.
        let awaiting = self.settings.rounds
            && self.settings.fixed_every.is_none()
            && self.ledger.awaiting_commit();
        let trained = self.ledger.is_done();
        // Only asked once everything is trained: the live set is not built for every batch.
        let rounds_final =
            trained && self.settings.rounds && self.rounds.all_final(&self.workers.live());
        for &stream in &streams {
            let Some(s) = self.workers.stream_mut(stream) else {
                continue;
            };
            if !s.preparing.is_empty() {
                continue;
            }
            let idle = s.in_flight.is_empty();
            if let Some(plan) = &mut self.plan
                && plan.ask_if_due(&s.worker, idle)
            {
                self.actions.push(Action::SyncNow {
                    stream,
                    is_final: false,
                });
                continue;
            }
            if awaiting && s.asked_commit != Some(epoch) {
                // Every batch of the epoch is acked but not all are averaged yet: a round now
                // (every worker takes part, so it closes at once) lets the barrier pass.
                s.asked_commit = Some(epoch);
                self.actions.push(Action::SyncNow {
                    stream,
                    is_final: false,
                });
            }
            if trained
                && self.settings.rounds
                && !s.asked_final
                && !self.rounds.is_finished(&s.worker)
                && !rounds_final
            {
                s.asked_final = true;
                self.actions.push(Action::SyncNow {
                    stream,
                    is_final: true,
                });
            }
        }
        let all_final = !self.settings.rounds || rounds_final;
        if trained && all_final && self.phase == Phase::Training {
            tracing::info!("every batch is trained");
            self.phase = Phase::Evaluating { evaluator: None };
        }
        if self.phase == (Phase::Evaluating { evaluator: None })
            && let Some(&stream) = streams.iter().find(|&&s| self.workers.stream(s).is_some())
        {
            let Some(deadline) = now.checked_add(self.settings.eval_timeout) else {
                self.fail("eval_timeout_secs is too large".into());
                return;
            };
            self.phase = Phase::Evaluating {
                evaluator: Some((stream, deadline)),
            };
            let sent = self.workers.stream(stream).map_or(0, |s| s.sent_version);
            let params = if self.settings.rounds {
                self.rounds.latest().filter(|(v, _)| *v != sent)
            } else {
                None
            };
            if let (Some((v, _)), Some(s)) = (&params, self.workers.stream_mut(stream)) {
                s.sent_version = *v;
            }
            tracing::info!(
                stream,
                "training complete; sending the test split for evaluation"
            );
            self.actions.push(Action::Evaluate { stream, params });
        }
    }

    /// Leases one batch to `stream` if it may take one; whether it did.
    fn lease_one(&mut self, stream: StreamId, now: Instant) -> bool {
        let prefetch = self.settings.prefetch;
        let Some(s) = self.workers.stream(stream) else {
            return false;
        };
        if s.credits == 0 || s.preparing.len() >= prefetch {
            return false;
        }
        let worker = s.worker.clone();
        let next = match &mut self.plan {
            Some(plan) => Ok(plan.next_lease(&worker).map(|mut l| {
                // Its clock starts now, not when the round was planned.
                if let Some(d) = self.ledger.renew(l.id, now) {
                    l.deadline = d;
                }
                l
            })),
            None if self.settings.fixed_every.is_some() => Ok(None),
            None => self.ledger.lease(&worker, now),
        };
        match next {
            Ok(Some(lease)) => {
                if let Some(s) = self.workers.stream_mut(stream) {
                    s.credits -= 1;
                    s.preparing.push_back(Preparing {
                        lease_id: lease.id,
                        batch: lease.batch,
                        ready: None,
                    });
                }
                self.actions.push(Action::Prepare { stream, lease });
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(%worker, error = %e, "worker can no longer lease");
                self.actions.push(Action::Close {
                    stream,
                    error: StreamError::Replaced(e.to_string()),
                });
                self.drop_stream(stream, now);
                false
            }
        }
    }
}

/// The kind of a preparation failure, for the counters: the text before the first colon.
fn reason_kind(cause: &str) -> String {
    cause
        .split(':')
        .next()
        .unwrap_or(cause)
        .chars()
        .take(80)
        .collect()
}

fn log_events(events: &[LedgerEvent]) {
    for e in events {
        match e {
            LedgerEvent::LeaseExpired { .. }
            | LedgerEvent::LeaseReleased { .. }
            | LedgerEvent::RollbackIncomplete { .. } => {
                tracing::warn!(event = ?e, "ledger")
            }
            _ => tracing::debug!(event = ?e, "ledger"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Whole runs driven through the state machine with chosen instants: no sockets, no sleeps.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use super::*;
    use crate::domain::ledger::LedgerConfig;

    const SEC: Duration = Duration::from_secs(1);

    fn settings(rounds: bool) -> RunSettings {
        RunSettings {
            train_rows: 100,
            batch_size: 10,
            prefetch: 2,
            min_workers: 1,
            rounds,
            fixed_every: None,
            persist_every: Duration::from_secs(10),
            eval_timeout: Duration::from_secs(60),
            eval_every_epoch: true,
            max_batch_failures: 3,
            max_credits: 8,
            join_hold: Duration::from_secs(30),
            settings_json: "{}".into(),
        }
    }

    fn ledger(s: &RunSettings, epochs: u32) -> Ledger {
        Ledger::new(LedgerConfig {
            samples: s.train_rows,
            batch_size: s.batch_size,
            epochs,
            seed: 7,
            lease_timeout: Duration::from_secs(30),
            hold_for_commit: s.rounds,
        })
        .unwrap()
    }

    fn rounds() -> SyncRounds {
        SyncRounds::new(Duration::from_secs(5), None)
    }

    fn new_state(s: RunSettings, epochs: u32) -> RunState {
        let l = ledger(&s, epochs);
        RunState::new(s, l, rounds(), None).unwrap()
    }

    fn up(base_version: u64, params: Params, is_final: bool) -> SyncUpload {
        SyncUpload {
            base_version,
            params,
            is_final,
            gradients: false,
            wire_bytes: 8,
        }
    }

    fn params(x: f32) -> Params {
        Arc::new(vec![("w".to_string(), vec![2], vec![x, x])])
    }

    /// Answers every `Prepare` with success (not from the cache) and every `Persist` with a
    /// written commit point until nothing is left, acking every batch sent when `ack` holds;
    /// returns the other actions (`Persist` included) and the leases acked.
    fn serve(st: &mut RunState, now: Instant, ack: bool) -> (Vec<Action>, Vec<u64>) {
        let mut other = Vec::new();
        let mut acked = Vec::new();
        loop {
            let actions = st.take_actions();
            if actions.is_empty() {
                return (other, acked);
            }
            for a in actions {
                match a {
                    Action::Prepare { lease, .. } => st.prepared(lease.id, Ok((false, false)), now),
                    Action::SendBatch { stream, lease_id } if ack => {
                        acked.push(lease_id);
                        st.ack(stream, lease_id, AckTimes::default(), now);
                    }
                    a @ Action::Persist { .. } => {
                        other.push(a);
                        st.persisted(Ok(()), now);
                    }
                    a => other.push(a),
                }
            }
        }
    }

    /// The session secret the tests give every incarnation of `id`.
    fn secret(id: &str) -> String {
        format!("secret-of-{id}")
    }

    /// A join of `id` presenting and taking [`secret`]`(id)`.
    fn claim(id: &str) -> Claim {
        Claim::new(secret(id), secret(id))
    }

    fn open(st: &mut RunState, id: &str, credits: u32, now: Instant) -> (Worker, StreamId) {
        let w = st.join(id, &claim(id), now).unwrap();
        let s = st.open_stream(&w, &secret(id), credits, now).unwrap();
        (w, s)
    }

    #[test]
    fn a_whole_run_without_rounds_leases_trains_evaluates_and_finishes() {
        let t0 = Instant::now();
        let mut st = new_state(settings(false), 2);
        let (_, s) = open(&mut st, "w", 4, t0);
        let (other, acked) = serve(&mut st, t0, true);
        assert_eq!(acked.len(), 20, "2 epochs of 10 batches");
        let lines: Vec<_> = other
            .iter()
            .filter_map(|a| match a {
                Action::EpochMetrics(l) => Some(l.epoch),
                _ => None,
            })
            .collect();
        assert_eq!(lines, vec![0, 1]);
        assert!(
            other
                .iter()
                .any(|a| matches!(a, Action::Evaluate { stream, params: None } if *stream == s)),
            "{other:?}"
        );
        // Without rounds the run keeps a commit point too.
        assert!(other.iter().any(|a| matches!(a, Action::Persist { .. })));
        st.eval_result(s, 12, 50, t0).unwrap();
        let finish = st
            .take_actions()
            .into_iter()
            .find_map(|a| match a {
                Action::Finish(f) => Some(f),
                _ => None,
            })
            .expect("Finish");
        assert_eq!((finish.errors, finish.total), (12, 50));
        assert_eq!(finish.facts.progress.total_acked, 20);
        assert_eq!(finish.facts.counters.samples, 200);
        assert_eq!(finish.facts.counters.teacher_batches, vec![10, 10]);
        st.finished(Ok(()));
        assert!(matches!(st.take_actions().as_slice(), [Action::Done { stream }] if *stream == s));
        assert!(st.is_complete());
    }

    #[test]
    fn nothing_is_leased_until_min_workers_streams_are_open() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                min_workers: 2,
                ..settings(false)
            },
            1,
        );
        open(&mut st, "a", 4, t0);
        assert!(
            !st.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Prepare { .. }))
        );
        open(&mut st, "b", 4, t0);
        let prepares = st
            .take_actions()
            .iter()
            .filter(|a| matches!(a, Action::Prepare { .. }))
            .count();
        // Each stream is leased its prefetch (2), one after the other.
        assert_eq!(prepares, 4);
    }

    #[test]
    fn batches_are_sent_in_lease_order_and_never_beyond_the_credits() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                prefetch: 8,
                ..settings(false)
            },
            1,
        );
        let (_, s) = open(&mut st, "w", 3, t0);
        let leases: Vec<u64> = st
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Prepare { lease, .. } => Some(lease.id),
                _ => None,
            })
            .collect();
        assert_eq!(leases.len(), 3, "one lease per credit");
        // The third is ready first: nothing is sent until the first is.
        st.prepared(leases[2], Ok((true, false)), t0);
        assert!(st.take_actions().is_empty());
        st.prepared(leases[0], Ok((false, false)), t0);
        let sent: Vec<u64> = st
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::SendBatch { lease_id, .. } => Some(lease_id),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![leases[0]]);
        st.prepared(leases[1], Ok((false, false)), t0);
        let sent: Vec<u64> = st
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::SendBatch { lease_id, .. } => Some(lease_id),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![leases[1], leases[2]]);
        // More credits than the cap allows are cut to the cap (8 held in all).
        st.add_credits(s, 1000, t0);
        let more = st
            .take_actions()
            .iter()
            .filter(|a| matches!(a, Action::Prepare { .. }))
            .count();
        assert_eq!(more, 5);
        assert_eq!(st.workers.stream(s).unwrap().credits_held(), 8);
    }

    /// A failing preparation gives its credit back and its batch goes back in line; a batch that
    /// keeps failing ends the run naming the batch and the cause (it used to leak the credit,
    /// and after `prefetch` failures the stream stalled for ever).
    #[test]
    fn failed_preparations_return_their_credit_and_a_batch_that_keeps_failing_ends_the_run() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                prefetch: 1,
                ..settings(false)
            },
            1,
        );
        let (_, s) = open(&mut st, "w", 1, t0);
        let mut failed = 0;
        let mut error = None;
        for _ in 0..10 {
            for a in st.take_actions() {
                match a {
                    Action::Prepare { lease, .. } => {
                        assert_eq!(
                            lease.batch.index, 0,
                            "the failed batch is leased again first"
                        );
                        failed += 1;
                        st.prepared(lease.id, Err(("teacher refused: bad".into(), false)), t0);
                    }
                    Action::Fail(e) => error = Some(e),
                    _ => {}
                }
            }
        }
        assert_eq!(failed, 3);
        let error = error.expect("the run failed");
        assert!(
            error.contains("epoch 0 batch 0") && error.contains("teacher refused"),
            "{error}"
        );
        assert!(st.is_failed());
        assert_eq!(st.counters.failed_preparations["teacher refused"], 3);
        assert_eq!(
            st.workers.stream(s).unwrap().credits,
            1,
            "the credit came back"
        );
    }

    #[test]
    fn a_fatal_preparation_failure_ends_the_run_at_once() {
        let t0 = Instant::now();
        let mut st = new_state(settings(false), 1);
        open(&mut st, "w", 1, t0);
        let lease = st
            .take_actions()
            .into_iter()
            .find_map(|a| match a {
                Action::Prepare { lease, .. } => Some(lease),
                _ => None,
            })
            .unwrap();
        st.prepared(
            lease.id,
            Err(("offline run: no soft targets".into(), true)),
            t0,
        );
        assert!(
            st.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Fail(_)))
        );
    }

    #[test]
    fn an_ack_of_an_expired_lease_still_returns_the_credit_of_the_sent_batch() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                prefetch: 1,
                ..settings(false)
            },
            1,
        );
        let (_, s) = open(&mut st, "w", 1, t0);
        serve(&mut st, t0, false);
        let sent = *st
            .workers
            .stream(s)
            .unwrap()
            .in_flight
            .iter()
            .next()
            .unwrap();
        assert_eq!(st.workers.stream(s).unwrap().credits, 0);
        // The lease expires: its batch goes back in line, the worker still holds the message.
        let late = t0 + 31 * SEC;
        st.tick(late);
        assert!(
            !st.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Prepare { .. }))
        );
        st.ack(s, sent, AckTimes::default(), late);
        let actions = st.take_actions();
        assert!(st.workers.stream(s).unwrap().in_flight.is_empty());
        assert!(
            actions.iter().any(|a| matches!(a, Action::Prepare { .. })),
            "the credit came back and the next batch is leased: {actions:?}"
        );
        // An ack of a lease that was never sent on this stream returns nothing.
        let before = st.workers.stream(s).unwrap().credits_held();
        st.ack(s, 9999, AckTimes::default(), late);
        assert_eq!(st.workers.stream(s).unwrap().credits_held(), before);
    }

    #[test]
    fn contributions_weigh_the_rows_the_ledger_accepted_not_what_the_worker_claims() {
        let t0 = Instant::now();
        let mut st = new_state(settings(true), 1);
        let (_, a) = open(&mut st, "a", 1, t0);
        let (_, b) = open(&mut st, "b", 1, t0);
        let mut sent = BTreeMap::new();
        for act in st.take_actions() {
            if let Action::Prepare { stream, lease } = act {
                sent.insert(stream, lease.id);
                st.prepared(lease.id, Ok((false, false)), t0);
            }
        }
        st.take_actions();
        // `a` trains one batch (10 rows), `b` none.
        st.ack(a, sent[&a], AckTimes::default(), t0);
        st.take_actions();
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        st.contribute(b, up(0, params(5.0), false), t0).unwrap();
        let got: Vec<_> = st
            .take_actions()
            .into_iter()
            .filter_map(|act| match act {
                Action::SendParams {
                    version: 1,
                    params: ParamsToSend::Average(p),
                    ..
                } => Some(p[0].2.clone()),
                _ => None,
            })
            .collect();
        // Weighted 10 : 0 the average is a's parameters.
        assert_eq!(got, vec![vec![1.0, 1.0], vec![1.0, 1.0]]);
    }

    #[test]
    fn a_non_finite_average_is_never_sent_or_persisted_and_ends_the_run() {
        let t0 = Instant::now();
        let s = settings(true);
        let l = ledger(&s, 1);
        let mut st = RunState::new(s, l, rounds().with_outer_lr(64.0), None).unwrap();
        let (_, a) = open(&mut st, "a", 1, t0);
        let (_, b) = open(&mut st, "b", 1, t0);
        serve(&mut st, t0, false);
        // Round 1 averages to 0; round 2's outer step is 0 + 64 × (f32::MAX − 0): infinite.
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        st.contribute(b, up(0, params(-1.0), false), t0).unwrap();
        st.take_actions();
        st.contribute(a, up(1, params(f32::MAX), false), t0)
            .unwrap();
        st.contribute(b, up(1, params(f32::MAX), false), t0)
            .unwrap();
        let actions = st.take_actions();
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                Action::Persist { .. } | Action::SendParams { version: 2, .. }
            )),
            "{actions:?}"
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Fail(e) if e.contains("not finite")))
        );
    }

    #[test]
    fn with_rounds_every_stream_starts_from_the_average_and_the_barrier_asks_for_a_round() {
        let t0 = Instant::now();
        let mut st = new_state(settings(true), 2);
        let (w, s) = open(&mut st, "w", 4, t0);
        let (other, acked) = serve(&mut st, t0, true);
        assert!(matches!(
            other.first(),
            Some(Action::SendParams {
                version: 0,
                params: ParamsToSend::Initial,
                ..
            })
        ));
        // Every batch of epoch 0 is acked, none averaged: the barrier holds and asks.
        assert_eq!(acked.len(), 10);
        assert!(other.iter().any(|a| matches!(
            a,
            Action::SyncNow {
                is_final: false,
                ..
            }
        )));
        assert_eq!(st.ledger.progress().epoch, 0);
        st.contribute(s, up(0, params(1.0), false), t0).unwrap();
        let (other, acked) = serve(&mut st, t0, true);
        assert_eq!(
            acked.len(),
            10,
            "epoch 1 leased once the round committed epoch 0"
        );
        assert!(other.iter().any(|a| matches!(
            a,
            Action::SendParams {
                version: 1,
                params: ParamsToSend::Unchanged,
                ..
            }
        )));
        // Epoch 1 acked: its barrier asks again; once it passes, the final round.
        assert!(other.iter().any(|a| matches!(
            a,
            Action::SyncNow {
                is_final: false,
                ..
            }
        )));
        assert!(
            !other
                .iter()
                .any(|a| matches!(a, Action::SyncNow { is_final: true, .. }))
        );
        st.contribute(s, up(1, params(2.0), false), t0).unwrap();
        let (other, _) = serve(&mut st, t0, true);
        assert!(
            other
                .iter()
                .any(|a| matches!(a, Action::SyncNow { is_final: true, .. })),
            "{other:?}"
        );
        st.contribute(s, up(2, params(2.0), true), t0).unwrap();
        let (other, _) = serve(&mut st, t0, true);
        assert!(
            other.iter().any(|a| matches!(
                a,
                Action::Persist {
                    average: Some((3, _)),
                    ..
                }
            )),
            "{other:?}"
        );
        // A lone worker keeps its own parameters, so the evaluator is not sent them again.
        assert!(
            other
                .iter()
                .any(|a| matches!(a, Action::Evaluate { params: None, .. })),
            "{other:?}"
        );
        let _ = w;
    }

    /// Per stream, the (batch index, lease id) pairs sent, in order.
    type SentBatches = BTreeMap<StreamId, Vec<(u32, u64)>>;

    /// Serves like [`serve`] but acks nothing; returns per stream the batch indices sent, in
    /// order, with their lease ids, and the other actions.
    fn sent(st: &mut RunState, now: Instant) -> (SentBatches, Vec<Action>) {
        let mut batches: BTreeMap<u64, u32> = BTreeMap::new();
        let mut out = SentBatches::new();
        let mut other = Vec::new();
        loop {
            let actions = st.take_actions();
            if actions.is_empty() {
                return (out, other);
            }
            for a in actions {
                match a {
                    Action::Prepare { lease, .. } => {
                        batches.insert(lease.id, lease.batch.index);
                        st.prepared(lease.id, Ok((false, false)), now);
                    }
                    Action::SendBatch { stream, lease_id } => {
                        out.entry(stream)
                            .or_default()
                            .push((batches[&lease_id], lease_id));
                    }
                    a @ Action::Persist { .. } => {
                        other.push(a);
                        st.persisted(Ok(()), now);
                    }
                    a => other.push(a),
                }
            }
        }
    }

    fn asked(other: &[Action], stream: StreamId) -> bool {
        other
            .iter()
            .any(|a| matches!(a, Action::SyncNow { stream: s, is_final: false } if *s == stream))
    }

    #[test]
    fn the_fixed_schedule_deals_each_round_in_turn_whatever_the_timing() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                fixed_every: Some(2),
                min_workers: 2,
                prefetch: 4,
                ..settings(true)
            },
            1,
        );
        let (_, a) = open(&mut st, "a", 8, t0);
        let (sent0, _) = sent(&mut st, t0);
        assert!(sent0.is_empty(), "nothing before min_workers streams");
        let (_, b) = open(&mut st, "b", 8, t0);
        let (round1, _) = sent(&mut st, t0);
        let idx = |v: &[(u32, u64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(idx(&round1[&a]), [0, 2]);
        assert_eq!(idx(&round1[&b]), [1, 3]);
        // b is fast: it acks both and would take more, but the round's batches are dealt.
        for &(_, l) in &round1[&b] {
            st.ack(b, l, AckTimes::default(), t0);
        }
        let (more, other) = sent(&mut st, t0);
        assert!(more.is_empty(), "{more:?}");
        assert!(!asked(&other, b), "a full quota contributes on its own");
        st.contribute(b, up(0, params(3.0), false), t0).unwrap();
        // A worker joining mid-round waits for the next one.
        let (_, c) = open(&mut st, "c", 8, t0);
        let (more, _) = sent(&mut st, t0);
        assert!(more.is_empty(), "{more:?}");
        for &(_, l) in &round1[&a] {
            st.ack(a, l, AckTimes::default(), t0);
        }
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        // Round 1 closed with a and b; round 2 has three members, c first sent the average.
        let (round2, other) = sent(&mut st, t0);
        assert!(other.iter().any(|x| matches!(
            x,
            Action::SendParams { stream, version: 1, params: ParamsToSend::Average(_), .. } if *stream == c
        )), "{other:?}");
        assert_eq!(idx(&round2[&a]), [4, 7]);
        assert_eq!(idx(&round2[&b]), [5, 8]);
        assert_eq!(idx(&round2[&c]), [6, 9]);
        for (s, v) in &round2 {
            for &(_, l) in v {
                st.ack(*s, l, AckTimes::default(), t0);
            }
            st.contribute(*s, up(1, params(2.0), false), t0).unwrap();
        }
        // The epoch is done (10 batches); only the final round is left.
        let (_, other) = sent(&mut st, t0);
        assert!(st.ledger.is_done(), "{other:?}");
        for s in [a, b, c] {
            assert!(other.iter().any(|x| matches!(
                x,
                Action::SyncNow { stream, is_final: true } if *stream == s
            )));
        }
    }

    #[test]
    fn a_short_round_at_an_epochs_end_asks_each_member_once_its_batches_are_acked() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                fixed_every: Some(4),
                min_workers: 2,
                prefetch: 4,
                ..settings(true)
            },
            2,
        );
        let (_, a) = open(&mut st, "a", 8, t0);
        let (_, b) = open(&mut st, "b", 8, t0);
        let mut dealt = Vec::new();
        // Rounds of 8 batches: 8, then the epoch's last 2 (one each).
        for round in 0..2 {
            let (r, other) = sent(&mut st, t0);
            assert!(!asked(&other, a) && !asked(&other, b));
            let n = if round == 0 { 4 } else { 1 };
            assert_eq!((r[&a].len(), r[&b].len()), (n, n), "round {round}");
            for (s, v) in &r {
                dealt.extend(v.iter().map(|x| x.0));
                for &(_, l) in v {
                    st.ack(*s, l, AckTimes::default(), t0);
                }
            }
            let (_, other) = sent(&mut st, t0);
            if round == 0 {
                assert!(!asked(&other, a) && !asked(&other, b));
            } else {
                assert!(asked(&other, a) && asked(&other, b), "{other:?}");
            }
            for s in [a, b] {
                st.contribute(s, up(round, params(1.0), false), t0).unwrap();
            }
        }
        dealt.sort_unstable();
        assert_eq!(dealt, (0..10).collect::<Vec<_>>());
        assert_eq!(st.ledger.progress().epoch, 1);
    }

    #[test]
    fn a_member_that_dies_mid_round_hands_its_batches_to_the_next_round() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                fixed_every: Some(2),
                min_workers: 2,
                prefetch: 1,
                ..settings(true)
            },
            1,
        );
        let (_, a) = open(&mut st, "a", 1, t0);
        let (_, b) = open(&mut st, "b", 1, t0);
        let (r, _) = sent(&mut st, t0);
        assert_eq!((r[&a][0].0, r[&b][0].0), (0, 1));
        st.ack(a, r[&a][0].1, AckTimes::default(), t0);
        let (r2, _) = sent(&mut st, t0);
        assert_eq!(r2[&a][0].0, 2);
        st.ack(a, r2[&a][0].1, AckTimes::default(), t0);
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        // b dies before training: the round closes with a alone; b's batches 1 and 3 lead
        // the next round, which a has to itself.
        st.stream_closed(b, t0);
        let (r3, _) = sent(&mut st, t0);
        assert_eq!(r3[&a][0].0, 1, "{r3:?}");
        st.ack(a, r3[&a][0].1, AckTimes::default(), t0);
        let (r4, _) = sent(&mut st, t0);
        assert_eq!(r4[&a][0].0, 3);
        // The second round was planned without b: one change of the schedule.
        assert_eq!(st.counters.schedule_changes, 1);
    }

    #[test]
    fn a_worker_dying_mid_round_keeps_its_contribution_and_loses_what_came_after() {
        let t0 = Instant::now();
        let mut st = new_state(
            RunSettings {
                prefetch: 1,
                ..settings(true)
            },
            1,
        );
        let (_, a) = open(&mut st, "a", 1, t0);
        let (_, b) = open(&mut st, "b", 1, t0);
        // a and b each train one batch; a contributes; b dies before it does.
        serve(&mut st, t0, true);
        let trained = st.ledger.progress().total_acked;
        assert!(trained >= 2);
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        st.take_actions();
        let b_rows = st.workers.rows("b");
        assert!(b_rows > 0);
        // What is at risk: none of a's acks (its contribution is pending), all of b's.
        let at_risk = st.facts(t0).unaveraged;
        assert_eq!(
            at_risk,
            BTreeMap::from([("a".to_string(), 0), ("b".to_string(), b_rows / 10)])
        );
        st.stream_closed(b, t0);
        assert_eq!(st.ledger.counters().rolled_back_batches, at_risk["b"]);
        assert_eq!(
            st.facts(t0).unaveraged,
            BTreeMap::from([("a".to_string(), 0)])
        );
        let actions = st.take_actions();
        // b's leaving closes the round with a's contribution alone.
        assert!(
            actions.iter().any(
                |x| matches!(x, Action::SendParams { version: 1, stream, .. } if *stream == a)
            )
        );
        // b's uncommitted acks were rolled back: fewer batches count as trained.
        assert_eq!(
            st.ledger.progress().total_acked,
            trained - b_rows / 10,
            "b's batches are trained again"
        );
    }

    #[test]
    fn an_evaluator_that_leaves_or_times_out_is_replaced() {
        let t0 = Instant::now();
        let mut st = new_state(settings(false), 1);
        let (_, a) = open(&mut st, "a", 4, t0);
        let (_, b) = open(&mut st, "b", 4, t0);
        let (other, _) = serve(&mut st, t0, true);
        let first = other
            .iter()
            .find_map(|x| match x {
                Action::Evaluate { stream, .. } => Some(*stream),
                _ => None,
            })
            .unwrap();
        let second = if first == a { b } else { a };
        // Only the evaluator's result counts.
        assert!(st.eval_result(second, 1, 1, t0).is_err());
        // The evaluator times out: its stream is closed and the other is elected.
        let late = t0 + 61 * SEC;
        st.tick(t0 + 59 * SEC);
        assert!(
            !st.take_actions()
                .iter()
                .any(|x| matches!(x, Action::Close { .. }))
        );
        assert!(st.next_deadline().is_some_and(|d| d <= t0 + 60 * SEC));
        st.tick(late);
        let actions = st.take_actions();
        assert!(actions.iter().any(|x| matches!(x, Action::Close { stream, error: StreamError::Deadline(_) } if *stream == first)));
        assert!(
            actions
                .iter()
                .any(|x| matches!(x, Action::Evaluate { stream, .. } if *stream == second))
        );
        // And when that one leaves, a worker that joins again evaluates.
        st.stream_closed(second, late);
        let (_, c) = open(&mut st, "c", 1, late);
        assert!(
            st.take_actions()
                .iter()
                .any(|x| matches!(x, Action::Evaluate { stream, .. } if *stream == c))
        );
        st.eval_result(c, 3, 50, late).unwrap();
    }

    #[test]
    fn commit_points_are_throttled_one_at_a_time_and_a_failed_write_ends_the_run() {
        let t0 = Instant::now();
        let mut st = new_state(settings(false), 1);
        let (_, s) = open(&mut st, "w", 1, t0);
        let mut persists = 0;
        let step = |st: &mut RunState, now: Instant| {
            let mut n = 0;
            loop {
                let actions = st.take_actions();
                if actions.is_empty() {
                    return n;
                }
                for a in actions {
                    match a {
                        Action::Prepare { lease, .. } => {
                            st.prepared(lease.id, Ok((false, false)), now)
                        }
                        Action::SendBatch { lease_id, .. } => {
                            st.ack(s, lease_id, AckTimes::default(), now)
                        }
                        Action::Persist { .. } => n += 1,
                        _ => {}
                    }
                }
            }
        };
        // The first ack writes a commit point; the next nine and the epoch's end wait for it
        // and for 10 s.
        persists += step(&mut st, t0);
        assert_eq!(persists, 1);
        st.persisted(Ok(()), t0 + SEC);
        assert_eq!(st.next_deadline(), Some(t0 + 10 * SEC));
        st.tick(t0 + 10 * SEC);
        persists += step(&mut st, t0 + 10 * SEC);
        assert_eq!(persists, 2);
        st.persisted(Err("disk full".into()), t0 + 11 * SEC);
        assert!(
            st.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Fail(e) if e.contains("disk full")))
        );
        assert!(st.is_failed());
    }

    #[test]
    fn restore_requeues_outstanding_leases_and_rolls_back_uncommitted_acks() {
        let t0 = Instant::now();
        let s = settings(true);
        let mut st = new_state(s.clone(), 1);
        let (_, a) = open(&mut st, "a", 2, t0);
        let sent = |st: &mut RunState| -> Vec<u64> {
            let (_, _) = serve(st, t0, false);
            st.workers
                .stream(a)
                .unwrap()
                .in_flight
                .iter()
                .copied()
                .collect()
        };
        // Two batches acked and averaged in round 1; two more acked after it.
        for l in sent(&mut st) {
            st.ack(a, l, AckTimes::default(), t0);
        }
        let next = sent(&mut st);
        st.contribute(a, up(0, params(1.0), false), t0).unwrap();
        for l in next {
            st.ack(a, l, AckTimes::default(), t0);
        }
        serve(&mut st, t0, false);
        let snapshot = st.snapshot();
        let acked = st.ledger.progress().total_acked;
        assert!(acked > 2);
        let restored = RunState::new(
            s.clone(),
            ledger(&s, 1),
            rounds(),
            Some((snapshot, Some((1, params(1.0))))),
        )
        .unwrap();
        assert_eq!(restored.resumes(), 1);
        // Only the acks inside round 1's average survive.
        let committed = restored.ledger.progress().total_acked;
        assert_eq!((committed, acked), (2, 4));
        assert_eq!(restored.ledger.progress().outstanding, 0);
        assert_eq!(restored.rounds.latest().map(|(v, _)| v), Some(1));
        // The old process stays fenced off: its incarnation's stream died with the old
        // coordinator, so it must join again.
        let mut restored = restored;
        assert!(matches!(
            restored.open_stream(&Worker::new("a", 1), &secret("a"), 1, t0),
            Err(RunError::Worker(WorkerError::Left(_)))
        ));
        // A worker that joins the restored run starts from the stored average.
        let (w, _) = open(&mut restored, "a", 1, t0);
        assert_eq!(w.incarnation, 2, "the id's incarnations survive");
        assert!(restored.take_actions().iter().any(|x| matches!(
            x,
            Action::SendParams {
                version: 1,
                params: ParamsToSend::Average(_),
                ..
            }
        )));
        // Another student's state is refused.
        let other = RunSettings {
            settings_json: "{\"other\":1}".into(),
            ..s.clone()
        };
        assert!(
            RunState::new(other, ledger(&s, 1), rounds(), Some((st.snapshot(), None))).is_err()
        );
    }

    #[test]
    fn joining_again_replaces_the_old_incarnation_and_closes_its_stream() {
        let t0 = Instant::now();
        let mut st = new_state(settings(false), 1);
        let (w1, s1) = open(&mut st, "w", 2, t0);
        st.take_actions();
        // Another process cannot take the id; the one holding its secret can.
        assert!(matches!(
            st.join("w", &Claim::new("", "other"), t0),
            Err(RunError::Worker(WorkerError::Held { .. }))
        ));
        assert!(
            st.take_actions().is_empty(),
            "a refused join changes nothing"
        );
        assert!(st.check_worker(&w1).is_ok());
        let w2 = st.join("w", &claim("w"), t0).unwrap();
        assert_eq!(w2.incarnation, w1.incarnation + 1);
        assert!(st.take_actions().iter().any(|a| matches!(a, Action::Close { stream, error: StreamError::Replaced(_) } if *stream == s1)));
        assert!(st.check_worker(&w1).is_err());
        assert!(st.open_stream(&w1, &secret("w"), 1, t0).is_err());
        assert!(
            st.open_stream(&w2, "other", 1, t0).is_err(),
            "a stream needs the incarnation's secret"
        );
        let s2 = st.open_stream(&w2, &secret("w"), 1, t0).unwrap();
        assert!(
            st.open_stream(&w2, &secret("w"), 1, t0).is_err(),
            "one stream per incarnation"
        );
        assert_ne!(s1, s2);
        let x = st.join("x", &claim("x"), t0).unwrap();
        assert!(
            st.open_stream(&x, &secret("x"), 0, t0).is_err(),
            "credits 0"
        );
    }
}
