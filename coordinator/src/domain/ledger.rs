//! The batch ledger: which batch of which epoch is leased to whom, and which are trained.
//!
//! A pure state machine (STYLE.md §7): every call that depends on time takes an explicit
//! `now: Instant`, nothing sleeps or does I/O, and state changes worth logging come back as
//! [`LedgerEvent`]s. A thin async driver calls [`Ledger::tick`] (at [`Ledger::next_deadline`])
//! and persists [`Ledger::snapshot`].
//!
//! Semantics, decided here:
//! - **Batches.** Each epoch's `samples` indices are shuffled by a ChaCha8 generator seeded with
//!   the run seed on stream `epoch`, then cut into batches of `batch_size`; the last batch keeps
//!   the remainder. A batch is identified by `(epoch, index)` ([`BatchId`]).
//! - **Leases.** [`Ledger::lease`] hands out batches of the current epoch: requeued batches
//!   first (oldest requeue first), then fresh ones in index order. Each lease has a fencing id
//!   that only grows and is never issued twice, also across a crash and restore (a restore
//!   starts above any id the crashed coordinator can have issued after its commit point), and a
//!   deadline `now + lease_timeout`. A lease is expired by [`Ledger::tick`] once
//!   `now >= deadline`.
//! - **Epoch barrier.** Epoch `e + 1` is not leased until every batch of epoch `e` is acked;
//!   meanwhile `lease` returns `None` (and the driver retries after the next ack or expiry).
//! - **Workers** are `(id, incarnation)` as in TorchElastic, but the ledger keeps no table of
//!   them: who is current is the worker table's to decide
//!   ([`super::workers::WorkerTable`]). The ledger records which incarnation holds each lease
//!   and acked each batch. [`Ledger::revoke`] takes every outstanding lease of an id back (its
//!   incarnation left or was replaced): the batches go back in line at once, and an ack of a
//!   revoked lease is refused ([`AckOutcome::Revoked`]), since that process (and the weights it
//!   trained) is gone. An ack must come from the incarnation that holds the lease.
//! - **Acks.** An ack of an outstanding lease marks the batch trained. A repeated ack is
//!   [`AckOutcome::Duplicate`] and changes nothing. An ack of an expired lease is accepted late
//!   when nobody else holds or has trained the batch (the live worker did train it, so taking the
//!   ack keeps the batch trained once); once the batch was leased again or acked by someone else
//!   the ack is [`AckOutcome::Stale`] — the caller should log it loudly, as the batch will be in
//!   the model's history twice.
//! - **Rollback.** A worker restarted from a checkpoint calls [`Ledger::rollback`] with the last
//!   ack sequence number its checkpoint covers (a worker checkpoints only after every trained
//!   batch's ack was answered, and stores the highest `seq` from [`AckOutcome::Acked`]); its later
//!   acks in the current epoch are undone and their batches requeued. Acks in an epoch already
//!   past the barrier cannot be undone: the outcome says so (`lost_in_finished_epochs`), so the
//!   run can report that exactly-once was not met.
//! - **Persistence.** [`LedgerState`] is serde. `Instant`s are not, so deadlines are not stored:
//!   on [`Ledger::restore`] every lease that was outstanding is requeued (front of the line) and
//!   counted; acks, commit points, counters and the fencing counter survive.
//! - **Commit points.** With averaging rounds, an ack is *committed* once the worker's
//!   parameters that contain it were averaged ([`Ledger::commit`]); the ledger is the one place
//!   that keeps them. With `hold_for_commit` the epoch barrier also waits for every ack of the
//!   epoch to be committed, and a gone worker's uncommitted acks are what
//!   [`Ledger::rollback`] undoes.
//! - **Counters.** `requeued_batches` counts every batch put back in line: expiries, releases,
//!   restores and rollbacks.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Lease ids and ack sequence numbers one coordinator lifetime may issue: a restore moves both
/// counters to the next multiple of this ([`Ledger::restore`]).
const RESTORE_ID_RANGE: u64 = 1 << 40;

/// What the ledger needs to know about a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// Samples in the training split (N).
    pub samples: usize,
    /// Samples per batch; the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Epochs in the run.
    pub epochs: u32,
    /// Run seed; epoch `e`'s order comes from ChaCha8 seeded with it on stream `e`.
    pub seed: u64,
    /// How long a worker may hold a batch before it is leased again.
    pub lease_timeout: Duration,
    /// Hold the epoch barrier until every ack of the epoch is committed ([`Ledger::commit`]):
    /// with parameter averaging an ack is only in the model once its worker's parameters were
    /// averaged, and an ack that is not may still have to be rolled back.
    #[serde(default)]
    pub hold_for_commit: bool,
}

impl LedgerConfig {
    /// Batches per epoch, `ceil(samples / batch_size)` (0 for a zero batch size).
    pub fn batches_per_epoch(&self) -> u64 {
        if self.batch_size == 0 {
            0
        } else {
            self.samples.div_ceil(self.batch_size) as u64
        }
    }

    /// Batches in the whole run.
    pub fn expected_total(&self) -> u64 {
        self.batches_per_epoch() * u64::from(self.epochs)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |msg: String| Err(LedgerError::Config(msg));
        if self.samples == 0 {
            return bad("samples must be > 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be > 0".into());
        }
        if self.batches_per_epoch() > u64::from(u32::MAX) {
            return bad(format!(
                "{} batches per epoch is more than {}",
                self.batches_per_epoch(),
                u32::MAX
            ));
        }
        if self.lease_timeout.is_zero() {
            return bad("lease_timeout must be > 0".into());
        }
        Ok(())
    }
}

/// A batch: its epoch and its index within the epoch's shuffled order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId {
    /// The epoch, from 0.
    pub epoch: u32,
    /// The batch within the epoch, from 0.
    pub index: u32,
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} batch {}", self.epoch, self.index)
    }
}

/// One incarnation of a worker: a restarted worker keeps its id and joins with a higher
/// incarnation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Worker {
    /// Stable worker id (survives restarts).
    pub id: String,
    /// Incarnation number, higher for each restart.
    pub incarnation: u64,
}

impl Worker {
    /// A worker id at an incarnation.
    pub fn new(id: impl Into<String>, incarnation: u64) -> Self {
        Self {
            id: id.into(),
            incarnation,
        }
    }
}

impl fmt::Display for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.id, self.incarnation)
    }
}

/// A batch handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Fencing token: unique, and larger than every earlier lease's.
    pub id: u64,
    /// Which batch.
    pub batch: BatchId,
    /// The sample indices of the batch, in training order.
    pub samples: Vec<usize>,
    /// Who holds it.
    pub worker: Worker,
    /// When it expires unless acked.
    pub deadline: Instant,
}

/// Why a lease was given back before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseReason {
    /// The worker left or was declared dead.
    WorkerLeft,
    /// The worker re-joined with a higher incarnation.
    NewIncarnation,
    /// The ledger was restored from persisted state, which keeps no deadlines.
    Restore,
    /// The coordinator could not prepare the batch (a teacher refused it, the cache failed); it
    /// goes back in line for the next lease.
    NotPrepared,
}

/// A state change worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerEvent {
    /// A lease passed its deadline; its batch is requeued.
    LeaseExpired {
        lease_id: u64,
        batch: BatchId,
        worker: Worker,
    },
    /// A lease was released early; its batch is requeued.
    LeaseReleased {
        lease_id: u64,
        batch: BatchId,
        worker: Worker,
        reason: ReleaseReason,
    },
    /// A trained batch was un-acked by a rollback and requeued.
    RolledBack { worker_id: String, batch: BatchId },
    /// A rollback reached into an epoch already past the barrier: some batches are in the
    /// model's history fewer times than the ledger says.
    RollbackIncomplete { worker_id: String, through_seq: u64 },
    /// Every batch of an epoch is acked.
    EpochCompleted { epoch: u32 },
    /// Every batch of every epoch is acked.
    RunCompleted,
}

/// Why an ack was rejected as stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReason {
    /// The lease expired or was released and the batch is now leased to another holder.
    ReLeased { to: Worker },
    /// The lease expired or was released and the batch was trained under another lease.
    AckedByOther,
}

/// The answer to an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// The batch is now trained; `seq` orders every accepted ack. `late` when the lease had
    /// already expired but nobody else had taken the batch.
    Acked {
        batch: BatchId,
        seq: u64,
        late: bool,
        events: Vec<LedgerEvent>,
    },
    /// This lease was already acked; nothing changed.
    Duplicate { batch: BatchId },
    /// The lease expired or was released and the batch went to someone else; rejected.
    Stale { batch: BatchId, reason: StaleReason },
    /// The lease was revoked: its holder left or was replaced ([`Ledger::revoke`]).
    Revoked {
        batch: BatchId,
        reason: ReleaseReason,
    },
    /// The lease belongs to another worker, or to another incarnation of this one.
    NotHolder { lease_id: u64, holder: Worker },
    /// No such lease (never issued, or from an epoch before the previous one).
    UnknownLease { lease_id: u64 },
}

impl AckOutcome {
    /// Whether the batch counts as trained by this worker (new or duplicate ack).
    pub fn is_accepted(&self) -> bool {
        matches!(
            self,
            AckOutcome::Acked { .. } | AckOutcome::Duplicate { .. }
        )
    }
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackOutcome {
    /// Batches of the current epoch un-acked and requeued, in ack order.
    pub requeued: Vec<BatchId>,
    /// Whether the worker had acks after `through_seq` in an epoch already completed; those
    /// cannot be undone.
    pub lost_in_finished_epochs: bool,
    /// Events for the log.
    pub events: Vec<LedgerEvent>,
}

/// Errors of ledger calls that a caller can get wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The configuration is invalid.
    #[error("invalid ledger config: {0}")]
    Config(String),
    /// Persisted state does not describe a consistent ledger.
    #[error("corrupt ledger state: {0}")]
    Corrupt(String),
    /// `now + lease_timeout` does not fit in an `Instant`.
    #[error("lease deadline overflows the clock")]
    Clock,
}

/// Counts for `RunStatus` and the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCounters {
    /// Leases handed out.
    pub leases: u64,
    /// Batches put back in line (expiry, release, restore, rollback).
    pub requeued_batches: u64,
    /// Leases that passed their deadline.
    pub expired_leases: u64,
    /// Leases released early (worker left, new incarnation, restore).
    pub released_leases: u64,
    /// Acks taken after their lease had expired.
    pub late_acks: u64,
    /// Repeated acks.
    pub duplicate_acks: u64,
    /// Acks rejected as stale (re-leased batch, revoked lease or another incarnation).
    pub stale_acks: u64,
    /// Batches un-acked by rollbacks.
    pub rolled_back_batches: u64,
    /// Rollbacks that could not undo acks in completed epochs.
    pub incomplete_rollbacks: u64,
    /// Times the ledger was restored from persisted state.
    pub restores: u64,
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// The epoch being leased (`epochs` once done).
    pub epoch: u32,
    /// Epochs in the run.
    pub epochs: u32,
    /// Batches per epoch.
    pub batches_per_epoch: u64,
    /// Batches of the current epoch acked.
    pub acked_in_epoch: u64,
    /// Batches acked in the run (net of rollbacks).
    pub total_acked: u64,
    /// `epochs × batches_per_epoch`.
    pub expected_total: u64,
    /// Leases outstanding.
    pub outstanding: usize,
    /// Requeued batches waiting for a worker.
    pub requeued_waiting: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum LeaseState {
    Outstanding,
    Acked,
    Expired,
    Released,
    /// Taken back from a holder that left or was replaced; its acks are refused.
    Revoked(ReleaseReason),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    batch: BatchId,
    worker: Worker,
    state: LeaseState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AckRecord {
    lease_id: u64,
    worker: Worker,
    seq: u64,
}

/// The persistable part of a [`Ledger`] (everything but deadlines and the derived order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    config: LedgerConfig,
    epoch: u32,
    /// Next fresh batch index of the current epoch.
    next_fresh: u32,
    /// Batches of the current epoch waiting to be leased again, oldest first.
    requeue: VecDeque<u32>,
    /// Per batch of the current epoch, the ack that trained it.
    acked: Vec<Option<AckRecord>>,
    acked_in_epoch: u64,
    total_acked: u64,
    /// Leases of the current and the previous epoch, by id.
    leases: BTreeMap<u64, LeaseRecord>,
    next_lease_id: u64,
    next_ack_seq: u64,
    /// Per worker id, the highest ack seq in completed epochs.
    finished_last_seq: BTreeMap<String, u64>,
    /// Per worker id, the highest committed ack seq ([`Ledger::commit`]).
    #[serde(default)]
    committed: BTreeMap<String, u64>,
    counters: LedgerCounters,
}

/// The batch ledger. See the module docs for its semantics.
#[derive(Debug, Clone)]
pub struct Ledger {
    state: LedgerState,
    /// Deadlines of the outstanding leases, by lease id.
    deadlines: BTreeMap<u64, Instant>,
    /// The current epoch's sample order (empty once done).
    order: Vec<usize>,
}

impl Ledger {
    /// A fresh run at epoch 0.
    pub fn new(config: LedgerConfig) -> Result<Self, LedgerError> {
        config.validate()?;
        let batches = config.batches_per_epoch() as usize;
        let done = config.epochs == 0;
        let order = if done {
            Vec::new()
        } else {
            permutation(config.samples, config.seed, 0)
        };
        let state = LedgerState {
            epoch: 0,
            next_fresh: 0,
            requeue: VecDeque::new(),
            acked: if done {
                Vec::new()
            } else {
                vec![None; batches]
            },
            acked_in_epoch: 0,
            total_acked: 0,
            leases: BTreeMap::new(),
            next_lease_id: 1,
            next_ack_seq: 1,
            finished_last_seq: BTreeMap::new(),
            committed: BTreeMap::new(),
            counters: LedgerCounters::default(),
            config,
        };
        Ok(Self {
            state,
            deadlines: BTreeMap::new(),
            order,
        })
    }

    /// Rebuilds a ledger from persisted state. Leases that were outstanding are requeued (their
    /// deadlines were not persisted); the events say which.
    pub fn restore(state: LedgerState) -> Result<(Self, Vec<LedgerEvent>), LedgerError> {
        state.config.validate()?;
        check_state(&state)?;
        let order = if state.epoch < state.config.epochs {
            permutation(state.config.samples, state.config.seed, state.epoch)
        } else {
            Vec::new()
        };
        let mut ledger = Self {
            state,
            deadlines: BTreeMap::new(),
            order,
        };
        let outstanding: Vec<u64> = ledger
            .state
            .leases
            .iter()
            .filter(|(_, r)| r.state == LeaseState::Outstanding)
            .map(|(&id, _)| id)
            .collect();
        let mut events = Vec::new();
        for id in outstanding {
            events.extend(ledger.put_back(id, ReleaseReason::Restore));
        }
        ledger.state.counters.restores += 1;
        // The stored counters are those of the commit point: the crashed coordinator may have
        // handed out later ids before it died. Each restore starts a fresh range of ids above
        // anything it could have issued (2^40 per coordinator lifetime), so no lease id or ack
        // sequence number is ever issued twice.
        let floor = ledger
            .state
            .counters
            .restores
            .saturating_mul(RESTORE_ID_RANGE);
        ledger.state.next_lease_id = ledger.state.next_lease_id.max(floor);
        ledger.state.next_ack_seq = ledger.state.next_ack_seq.max(floor);
        Ok((ledger, events))
    }

    /// The worker ids with acks in the current epoch.
    pub fn workers_with_acks(&self) -> std::collections::BTreeSet<String> {
        self.state
            .acked
            .iter()
            .flatten()
            .map(|a| a.worker.id.clone())
            .collect()
    }

    /// The state to persist.
    pub fn snapshot(&self) -> LedgerState {
        self.state.clone()
    }

    /// The run configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.state.config
    }

    /// Takes every outstanding lease of `worker_id` back at once (`reason`: it left, or a new
    /// incarnation replaced it) and puts the batches back in line; acks of those leases are
    /// refused from now on.
    pub fn revoke(&mut self, worker_id: &str, reason: ReleaseReason) -> Vec<LedgerEvent> {
        // Expired and released leases too: a late ack from a gone process must not be taken.
        let ids: Vec<u64> = self
            .state
            .leases
            .iter()
            .filter(|(_, r)| {
                r.worker.id == worker_id
                    && matches!(
                        r.state,
                        LeaseState::Outstanding | LeaseState::Expired | LeaseState::Released
                    )
            })
            .map(|(&id, _)| id)
            .collect();
        let mut events = Vec::new();
        for id in ids {
            events.extend(self.put_back(id, reason));
            if let Some(r) = self.state.leases.get_mut(&id) {
                r.state = LeaseState::Revoked(reason);
            }
        }
        events
    }

    /// Leases the next batch to `worker`: a requeued one if any, else the next fresh one of the
    /// current epoch. `None` when the run is done or the epoch barrier holds (every batch of the
    /// epoch is leased or acked, and not all are acked).
    pub fn lease(&mut self, worker: &Worker, now: Instant) -> Result<Option<Lease>, LedgerError> {
        if self.is_done() {
            return Ok(None);
        }
        let deadline = now
            .checked_add(self.state.config.lease_timeout)
            .ok_or(LedgerError::Clock)?;
        let index = if let Some(i) = self.state.requeue.pop_front() {
            i
        } else if u64::from(self.state.next_fresh) < self.batches() {
            self.state.next_fresh += 1;
            self.state.next_fresh - 1
        } else {
            return Ok(None);
        };
        let id = self.state.next_lease_id;
        self.state.next_lease_id += 1;
        let batch = BatchId {
            epoch: self.state.epoch,
            index,
        };
        self.state.leases.insert(
            id,
            LeaseRecord {
                batch,
                worker: worker.clone(),
                state: LeaseState::Outstanding,
            },
        );
        self.deadlines.insert(id, deadline);
        self.state.counters.leases += 1;
        Ok(Some(Lease {
            id,
            batch,
            samples: self.samples_of(index),
            worker: worker.clone(),
            deadline,
        }))
    }

    /// Moves the deadline of an outstanding lease to `now + lease_timeout` (a lease planned
    /// ahead of a round starts its clock when its batch is prepared); the new deadline, or
    /// `None` when the lease is not outstanding.
    pub fn renew(&mut self, lease_id: u64, now: Instant) -> Option<Instant> {
        let deadline = now.checked_add(self.state.config.lease_timeout)?;
        let d = self.deadlines.get_mut(&lease_id)?;
        *d = deadline;
        Some(deadline)
    }

    /// Marks the batch of lease `lease_id` trained by `worker`, which must be the incarnation
    /// holding the lease. Never panics; every case is an [`AckOutcome`]. `now` is taken for
    /// symmetry with the other calls (late acks are decided by lease state, which
    /// [`Ledger::tick`] moves).
    pub fn ack(&mut self, worker: &Worker, lease_id: u64, _now: Instant) -> AckOutcome {
        let record = match self.state.leases.get(&lease_id) {
            Some(r) => r.clone(),
            None => return AckOutcome::UnknownLease { lease_id },
        };
        if record.worker != *worker {
            if record.worker.id == worker.id {
                self.state.counters.stale_acks += 1;
            }
            return AckOutcome::NotHolder {
                lease_id,
                holder: record.worker,
            };
        }
        let batch = record.batch;
        match record.state {
            LeaseState::Revoked(reason) => {
                self.state.counters.stale_acks += 1;
                AckOutcome::Revoked { batch, reason }
            }
            LeaseState::Outstanding => {
                self.deadlines.remove(&lease_id);
                self.accept(lease_id, worker, false)
            }
            LeaseState::Acked => {
                self.state.counters.duplicate_acks += 1;
                AckOutcome::Duplicate { batch }
            }
            LeaseState::Expired | LeaseState::Released => {
                let stale = |reason| AckOutcome::Stale { batch, reason };
                let outcome = if batch.epoch != self.state.epoch
                    || self.acked_record(batch.index).is_some()
                {
                    Some(stale(StaleReason::AckedByOther))
                } else {
                    self.holder_of(batch.index)
                        .map(|to| stale(StaleReason::ReLeased { to }))
                };
                match outcome {
                    Some(o) => {
                        self.state.counters.stale_acks += 1;
                        o
                    }
                    None => {
                        // Nobody took the batch since: the worker trained it, take the ack.
                        self.state.requeue.retain(|&i| i != batch.index);
                        self.state.counters.late_acks += 1;
                        self.accept(lease_id, worker, true)
                    }
                }
            }
        }
    }

    /// Expires every lease whose deadline is at or before `now` (in lease order) and requeues its
    /// batch.
    pub fn tick(&mut self, now: Instant) -> Vec<LedgerEvent> {
        let due: Vec<u64> = self
            .deadlines
            .iter()
            .filter(|&(_, &d)| d <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut events = Vec::new();
        for id in due {
            self.deadlines.remove(&id);
            if let Some(r) = self.state.leases.get_mut(&id) {
                r.state = LeaseState::Expired;
                let (batch, worker) = (r.batch, r.worker.clone());
                self.state.requeue.push_back(batch.index);
                self.state.counters.expired_leases += 1;
                self.state.counters.requeued_batches += 1;
                events.push(LedgerEvent::LeaseExpired {
                    lease_id: id,
                    batch,
                    worker,
                });
            }
        }
        events
    }

    /// Undoes `worker_id`'s acks with a sequence number above `through_seq` (the last ack its
    /// checkpoint covers; 0 for none) in the current epoch and requeues those batches.
    /// Call it after the restarted worker joined with its new incarnation, so the old
    /// incarnation's leases are already released and its acks fenced off.
    pub fn rollback(&mut self, worker_id: &str, through_seq: u64) -> RollbackOutcome {
        let mut undo: Vec<(u64, u32, u64)> = self
            .state
            .acked
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a {
                Some(a) if a.worker.id == worker_id && a.seq > through_seq => {
                    Some((a.seq, i as u32, a.lease_id))
                }
                _ => None,
            })
            .collect();
        undo.sort_unstable();
        let mut events = Vec::new();
        let mut requeued = Vec::new();
        for (_, index, lease_id) in undo {
            if let Some(slot) = self.state.acked.get_mut(index as usize) {
                *slot = None;
            }
            if let Some(r) = self.state.leases.get_mut(&lease_id) {
                r.state = LeaseState::Released;
            }
            self.state.requeue.push_back(index);
            self.state.acked_in_epoch -= 1;
            self.state.total_acked -= 1;
            self.state.counters.rolled_back_batches += 1;
            self.state.counters.requeued_batches += 1;
            let batch = BatchId {
                epoch: self.state.epoch,
                index,
            };
            requeued.push(batch);
            events.push(LedgerEvent::RolledBack {
                worker_id: worker_id.to_string(),
                batch,
            });
        }
        let lost = self
            .state
            .finished_last_seq
            .get(worker_id)
            .is_some_and(|&s| s > through_seq);
        if lost {
            self.state.counters.incomplete_rollbacks += 1;
            events.push(LedgerEvent::RollbackIncomplete {
                worker_id: worker_id.to_string(),
                through_seq,
            });
        }
        RollbackOutcome {
            requeued,
            lost_in_finished_epochs: lost,
            events,
        }
    }

    /// Where the run stands.
    pub fn progress(&self) -> Progress {
        let c = &self.state.config;
        Progress {
            epoch: self.state.epoch,
            epochs: c.epochs,
            batches_per_epoch: c.batches_per_epoch(),
            acked_in_epoch: self.state.acked_in_epoch,
            total_acked: self.state.total_acked,
            expected_total: c.expected_total(),
            outstanding: self.deadlines.len(),
            requeued_waiting: self.state.requeue.len(),
        }
    }

    /// Whether every batch of every epoch is acked.
    pub fn is_done(&self) -> bool {
        self.state.epoch >= self.state.config.epochs
    }

    /// The counters.
    pub fn counters(&self) -> &LedgerCounters {
        &self.state.counters
    }

    /// Outstanding leases per worker id (ids with none are left out).
    pub fn outstanding_by_worker(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for id in self.deadlines.keys() {
            if let Some(r) = self.state.leases.get(id) {
                *out.entry(r.worker.id.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Outstanding leases of one worker id.
    pub fn outstanding_for(&self, worker_id: &str) -> usize {
        self.outstanding_by_worker()
            .get(worker_id)
            .copied()
            .unwrap_or(0)
    }

    /// The earliest outstanding deadline: when the driver should call [`Ledger::tick`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }

    /// The highest ack sequence number of `worker_id` so far (what a checkpoint should record).
    pub fn last_ack_seq(&self, worker_id: &str) -> Option<u64> {
        let current = self
            .state
            .acked
            .iter()
            .flatten()
            .filter(|a| a.worker.id == worker_id)
            .map(|a| a.seq)
            .max();
        current.max(self.state.finished_last_seq.get(worker_id).copied())
    }

    /// The sample indices of a batch of the current epoch (`None` for other epochs).
    pub fn batch_samples(&self, batch: BatchId) -> Option<Vec<usize>> {
        (batch.epoch == self.state.epoch && u64::from(batch.index) < self.batches())
            .then(|| self.samples_of(batch.index))
    }

    fn batches(&self) -> u64 {
        self.state.config.batches_per_epoch()
    }

    fn samples_of(&self, index: u32) -> Vec<usize> {
        let bs = self.state.config.batch_size;
        let start = (index as usize).saturating_mul(bs).min(self.order.len());
        let end = start.saturating_add(bs).min(self.order.len());
        self.order[start..end].to_vec()
    }

    fn acked_record(&self, index: u32) -> Option<&AckRecord> {
        self.state
            .acked
            .get(index as usize)
            .and_then(Option::as_ref)
    }

    fn holder_of(&self, index: u32) -> Option<Worker> {
        self.deadlines.keys().find_map(|id| {
            self.state
                .leases
                .get(id)
                .filter(|r| r.batch.epoch == self.state.epoch && r.batch.index == index)
                .map(|r| r.worker.clone())
        })
    }

    /// Records an accepted ack of an outstanding (or unclaimed expired) lease.
    fn accept(&mut self, lease_id: u64, worker: &Worker, late: bool) -> AckOutcome {
        let Some(record) = self.state.leases.get_mut(&lease_id) else {
            return AckOutcome::UnknownLease { lease_id };
        };
        record.state = LeaseState::Acked;
        let batch = record.batch;
        let seq = self.state.next_ack_seq;
        self.state.next_ack_seq += 1;
        if let Some(slot) = self.state.acked.get_mut(batch.index as usize) {
            *slot = Some(AckRecord {
                lease_id,
                worker: worker.clone(),
                seq,
            });
        }
        self.state.acked_in_epoch += 1;
        self.state.total_acked += 1;
        let events = self.try_advance();
        AckOutcome::Acked {
            batch,
            seq,
            late,
            events,
        }
    }

    /// Passes the epoch barrier if every batch of the current epoch is acked (and, with
    /// `hold_for_commit`, every one of those acks committed).
    fn try_advance(&mut self) -> Vec<LedgerEvent> {
        if self.is_done() || self.state.acked_in_epoch != self.batches() || self.awaiting_commit() {
            return Vec::new();
        }
        self.advance_epoch()
    }

    /// Whether every batch of the current epoch is acked but some ack is not committed yet
    /// (only with `hold_for_commit`): the barrier waits for a synchronisation round.
    pub fn awaiting_commit(&self) -> bool {
        self.state.config.hold_for_commit
            && !self.is_done()
            && self.state.acked_in_epoch == self.batches()
            && self
                .state
                .acked
                .iter()
                .flatten()
                .any(|a| a.seq > self.committed_seq(&a.worker.id))
    }

    /// Puts an outstanding lease back in line at once (its batch could not be prepared); `None`
    /// when the lease is not outstanding.
    pub fn release(&mut self, lease_id: u64, reason: ReleaseReason) -> Option<LedgerEvent> {
        self.put_back(lease_id, reason)
    }

    /// Passes the epoch barrier if nothing holds it any more (after a restore).
    pub fn settle(&mut self) -> Vec<LedgerEvent> {
        self.try_advance()
    }

    /// The highest ack sequence number of `worker_id` that is committed (0: none).
    pub fn committed_seq(&self, worker_id: &str) -> u64 {
        self.state.committed.get(worker_id).copied().unwrap_or(0)
    }

    /// Acks of `worker_id` in the current epoch with a sequence number above `through`.
    pub fn acks_after(&self, worker_id: &str, through: u64) -> u64 {
        self.state
            .acked
            .iter()
            .flatten()
            .filter(|a| a.worker.id == worker_id && a.seq > through)
            .count() as u64
    }

    /// Whether `worker_id` holds acks of the current epoch that are not committed.
    pub fn has_uncommitted(&self, worker_id: &str) -> bool {
        self.acks_after(worker_id, self.committed_seq(worker_id)) > 0
    }

    /// Every ack of `worker_id` up to `through_seq` is in the model (its parameters were
    /// averaged); passes the epoch barrier when that was all it waited for.
    pub fn commit(&mut self, worker_id: &str, through_seq: u64) -> Vec<LedgerEvent> {
        let e = self
            .state
            .committed
            .entry(worker_id.to_string())
            .or_insert(0);
        *e = (*e).max(through_seq);
        self.try_advance()
    }

    /// Passes the epoch barrier: every batch of the current epoch is acked.
    fn advance_epoch(&mut self) -> Vec<LedgerEvent> {
        let mut events = vec![LedgerEvent::EpochCompleted {
            epoch: self.state.epoch,
        }];
        for a in self.state.acked.iter().flatten() {
            let e = self
                .state
                .finished_last_seq
                .entry(a.worker.id.clone())
                .or_insert(0);
            *e = (*e).max(a.seq);
        }
        self.state.epoch += 1;
        let epoch = self.state.epoch;
        // Keep the previous epoch's leases so late acks of them are still told apart.
        self.state
            .leases
            .retain(|_, r| r.batch.epoch.saturating_add(1) >= epoch);
        self.state.next_fresh = 0;
        self.state.requeue.clear();
        self.state.acked_in_epoch = 0;
        if self.is_done() {
            self.state.acked = Vec::new();
            self.order = Vec::new();
            events.push(LedgerEvent::RunCompleted);
        } else {
            self.state.acked = vec![None; self.batches() as usize];
            let c = &self.state.config;
            self.order = permutation(c.samples, c.seed, epoch);
        }
        events
    }

    /// Releases one outstanding lease and requeues its batch.
    fn put_back(&mut self, lease_id: u64, reason: ReleaseReason) -> Option<LedgerEvent> {
        self.deadlines.remove(&lease_id);
        let r = self.state.leases.get_mut(&lease_id)?;
        if r.state != LeaseState::Outstanding {
            return None;
        }
        r.state = LeaseState::Released;
        let (batch, worker) = (r.batch, r.worker.clone());
        self.state.requeue.push_back(batch.index);
        self.state.counters.released_leases += 1;
        self.state.counters.requeued_batches += 1;
        Some(LedgerEvent::LeaseReleased {
            lease_id,
            batch,
            worker,
            reason,
        })
    }
}

/// Checks that persisted state is consistent: each batch of the current epoch is in exactly one
/// place (acked, requeued, outstanding, or not yet leased) and the counts agree.
fn check_state(s: &LedgerState) -> Result<(), LedgerError> {
    let bad = |msg: String| Err(LedgerError::Corrupt(msg));
    let c = &s.config;
    if s.epoch > c.epochs {
        return bad(format!("epoch {} of {}", s.epoch, c.epochs));
    }
    if s.leases.keys().any(|&id| id >= s.next_lease_id) {
        return bad("a lease id is not below the next lease id".into());
    }
    if s.leases.values().any(|r| r.batch.epoch > s.epoch) {
        return bad("a lease is for a future epoch".into());
    }
    let batches = c.batches_per_epoch();
    let expected_total = u64::from(s.epoch) * batches + s.acked_in_epoch;
    if s.total_acked != expected_total {
        return bad(format!(
            "{} batches acked in total, {expected_total} expected from the epoch",
            s.total_acked
        ));
    }
    if s.epoch == c.epochs {
        let outstanding = s
            .leases
            .values()
            .any(|r| r.state == LeaseState::Outstanding);
        if !s.acked.is_empty() || !s.requeue.is_empty() || s.acked_in_epoch != 0 || outstanding {
            return bad("a finished run has open batches".into());
        }
        return Ok(());
    }
    if s.acked.len() as u64 != batches {
        return bad(format!("{} ack slots for {batches} batches", s.acked.len()));
    }
    if u64::from(s.next_fresh) > batches {
        return bad(format!("next fresh batch {} of {batches}", s.next_fresh));
    }
    let acked = s.acked.iter().flatten().count() as u64;
    if acked != s.acked_in_epoch {
        return bad(format!(
            "{acked} acked batches recorded, {} counted",
            s.acked_in_epoch
        ));
    }
    if acked == batches {
        return bad("an epoch with every batch acked was not completed".into());
    }
    let mut places = vec![0u32; batches as usize];
    for (i, a) in s.acked.iter().enumerate() {
        if let Some(a) = a {
            if a.seq >= s.next_ack_seq {
                return bad("an ack seq is not below the next ack seq".into());
            }
            places[i] += 1;
        }
    }
    for p in places.iter_mut().skip(s.next_fresh as usize) {
        *p += 1;
    }
    let mut in_line: Vec<u32> = s.requeue.iter().copied().collect();
    for r in s.leases.values() {
        if r.state == LeaseState::Outstanding {
            if r.batch.epoch != s.epoch {
                return bad("an outstanding lease is for a past epoch".into());
            }
            in_line.push(r.batch.index);
        }
    }
    for i in in_line {
        match places.get_mut(i as usize) {
            Some(p) => *p += 1,
            None => return bad(format!("batch {i} out of range")),
        }
    }
    if let Some(i) = places.iter().position(|&p| p != 1) {
        return bad(format!("batch {i} is in {} places", places[i]));
    }
    Ok(())
}

/// Epoch `epoch`'s order of `0..n`: the one epoch shuffle of [`distill_core::data`], so a run
/// visits batches in the order local training does for the same seed.
fn permutation(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    distill_core::data::shuffled_indices(n, seed, u64::from(epoch))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn cfg(samples: usize, batch_size: usize, epochs: u32) -> LedgerConfig {
        LedgerConfig {
            samples,
            batch_size,
            epochs,
            seed: 42,
            lease_timeout: TIMEOUT,
            hold_for_commit: false,
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn lease(l: &mut Ledger, w: &Worker, now: Instant) -> Lease {
        l.lease(w, now).unwrap().expect("a batch to lease")
    }

    fn acked(o: &AckOutcome) -> BatchId {
        match o {
            AckOutcome::Acked { batch, .. } => *batch,
            other => panic!("expected Acked, got {other:?}"),
        }
    }

    #[test]
    fn full_run_lease_and_ack_until_done() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 3, 2)).unwrap();
        let w = Worker::new("w", 1);
        assert_eq!(l.progress().expected_total, 8);
        let mut seen = Vec::new();
        let mut events = Vec::new();
        let mut last_id = 0;
        while let Some(ls) = l.lease(&w, t0).unwrap() {
            assert!(ls.id > last_id, "lease ids grow");
            last_id = ls.id;
            match l.ack(&w, ls.id, t0) {
                AckOutcome::Acked {
                    batch,
                    late,
                    events: ev,
                    ..
                } => {
                    assert!(!late);
                    seen.push(batch);
                    events.extend(ev);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(l.is_done());
        let p = l.progress();
        assert_eq!((p.total_acked, p.expected_total, p.epoch), (8, 8, 2));
        let want: Vec<BatchId> = (0..2)
            .flat_map(|epoch| (0..4).map(move |index| BatchId { epoch, index }))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(
            events,
            vec![
                LedgerEvent::EpochCompleted { epoch: 0 },
                LedgerEvent::EpochCompleted { epoch: 1 },
                LedgerEvent::RunCompleted
            ]
        );
        assert_eq!(l.lease(&w, t0).unwrap(), None);
    }

    #[test]
    fn every_sample_in_exactly_one_batch_and_last_batch_is_partial() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 3, 3)).unwrap();
        let w = Worker::new("w", 1);
        let mut orders = Vec::new();
        for _epoch in 0..3 {
            let mut order = Vec::new();
            let mut sizes = Vec::new();
            for _ in 0..4 {
                let ls = lease(&mut l, &w, t0);
                assert_eq!(l.batch_samples(ls.batch), Some(ls.samples.clone()));
                sizes.push(ls.samples.len());
                order.extend(ls.samples);
                l.ack(&w, ls.id, t0);
            }
            assert_eq!(sizes, [3, 3, 3, 1]);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..10).collect::<Vec<_>>());
            orders.push(order);
        }
        assert!(l.is_done());
        assert_ne!(orders[0], orders[1], "each epoch has its own order");
        assert_ne!(orders[1], orders[2]);
        assert_ne!(orders[0], (0..10).collect::<Vec<_>>(), "shuffled");
        // Same seed, same orders; another seed, others.
        assert_eq!(permutation(10, 42, 1), orders[1]);
        assert_ne!(permutation(1000, 43, 0), permutation(1000, 42, 0));
    }

    #[test]
    fn expiry_happens_at_the_deadline_not_before() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let w = Worker::new("w", 1);
        let ls = lease(&mut l, &w, t0);
        assert_eq!(ls.deadline, t0 + TIMEOUT);
        assert_eq!(l.next_deadline(), Some(ls.deadline));
        assert!(l.tick(ls.deadline - Duration::from_nanos(1)).is_empty());
        assert_eq!(l.outstanding_for("w"), 1);
        assert_eq!(
            l.tick(ls.deadline),
            vec![LedgerEvent::LeaseExpired {
                lease_id: ls.id,
                batch: ls.batch,
                worker: w.clone()
            }]
        );
        assert_eq!(l.outstanding_for("w"), 0);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.counters().requeued_batches, 1);
        assert_eq!(l.counters().expired_leases, 1);
        assert!(l.tick(ls.deadline + TIMEOUT).is_empty(), "expires once");
    }

    #[test]
    fn requeued_batches_go_first_oldest_requeue_first() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 2, 1)).unwrap();
        let a = Worker::new("a", 1);
        let b = Worker::new("b", 1);
        let la = lease(&mut l, &a, t0); // batch 0, deadline t0 + 10 s
        let lb = lease(&mut l, &b, at(t0, 1000)); // batch 1
        assert_eq!((la.batch.index, lb.batch.index), (0, 1));
        // b leaves first, then a's lease expires: requeue order is b's batch, then a's.
        assert_eq!(l.revoke("b", ReleaseReason::WorkerLeft).len(), 1);
        assert_eq!(l.tick(at(t0, 10_000)).len(), 1);
        let c = Worker::new("c", 1);
        let now = at(t0, 11_000);
        let order: Vec<u32> = (0..3).map(|_| lease(&mut l, &c, now).batch.index).collect();
        assert_eq!(order, [1, 0, 2], "requeued first, then fresh");
        assert_eq!(l.counters().requeued_batches, 2);
    }

    #[test]
    fn duplicate_ack_is_idempotent() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let w = Worker::new("w", 1);
        let ls = lease(&mut l, &w, t0);
        let first = l.ack(&w, ls.id, t0);
        assert_eq!(acked(&first), ls.batch);
        let again = l.ack(&w, ls.id, at(t0, 5));
        assert_eq!(again, AckOutcome::Duplicate { batch: ls.batch });
        assert!(again.is_accepted());
        assert_eq!(l.progress().total_acked, 1);
        assert_eq!(l.counters().duplicate_acks, 1);
    }

    #[test]
    fn stale_ack_after_re_lease_is_rejected() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let a = Worker::new("a", 1);
        let b = Worker::new("b", 1);
        let la = lease(&mut l, &a, t0);
        l.tick(la.deadline);
        let lb = lease(&mut l, &b, la.deadline);
        assert_eq!(lb.batch, la.batch, "the expired batch is leased again");
        assert_eq!(
            l.ack(&a, la.id, at(t0, 10_001)),
            AckOutcome::Stale {
                batch: la.batch,
                reason: StaleReason::ReLeased { to: b.clone() }
            }
        );
        assert_eq!(acked(&l.ack(&b, lb.id, at(t0, 10_002))), la.batch);
        let late = l.ack(&a, la.id, at(t0, 10_003));
        assert_eq!(
            late,
            AckOutcome::Stale {
                batch: la.batch,
                reason: StaleReason::AckedByOther
            }
        );
        assert!(!late.is_accepted());
        // The other holder's lease is not a's to ack.
        assert_eq!(
            l.ack(&a, lb.id, t0),
            AckOutcome::NotHolder {
                lease_id: lb.id,
                holder: b.clone()
            }
        );
        assert_eq!(l.progress().total_acked, 1);
        assert_eq!(l.counters().stale_acks, 2);
        assert_eq!(
            l.ack(&a, 999, t0),
            AckOutcome::UnknownLease { lease_id: 999 }
        );
    }

    #[test]
    fn late_ack_is_taken_while_nobody_else_has_the_batch() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let w = Worker::new("w", 1);
        let first = lease(&mut l, &w, t0);
        l.tick(first.deadline);
        assert_eq!(l.progress().requeued_waiting, 1);
        match l.ack(&w, first.id, first.deadline) {
            AckOutcome::Acked { batch, late, .. } => {
                assert_eq!(batch, first.batch);
                assert!(late);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.progress().requeued_waiting, 0);
        assert_eq!(l.counters().late_acks, 1);
        // The batch is not handed out again: the next lease is the other batch, then the run
        // is done.
        let next = lease(&mut l, &w, first.deadline);
        assert_ne!(next.batch, first.batch);
        acked(&l.ack(&w, next.id, first.deadline));
        assert!(l.is_done());
        assert_eq!(l.progress().total_acked, 2);
    }

    #[test]
    fn a_replaced_incarnation_is_fenced_off() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let old = Worker::new("w", 1);
        let ls = lease(&mut l, &old, t0);
        let new = Worker::new("w", 2);
        let events = l.revoke("w", ReleaseReason::NewIncarnation);
        assert_eq!(
            events,
            vec![LedgerEvent::LeaseReleased {
                lease_id: ls.id,
                batch: ls.batch,
                worker: old.clone(),
                reason: ReleaseReason::NewIncarnation
            }]
        );
        // The old incarnation's ack of its revoked lease is refused, although nobody else took
        // the batch yet (a late ack of an expired lease would be taken).
        assert_eq!(
            l.ack(&old, ls.id, t0),
            AckOutcome::Revoked {
                batch: ls.batch,
                reason: ReleaseReason::NewIncarnation
            }
        );
        // The new incarnation cannot ack the old incarnation's lease either.
        assert_eq!(
            l.ack(&new, ls.id, t0),
            AckOutcome::NotHolder {
                lease_id: ls.id,
                holder: old.clone()
            }
        );
        let again = lease(&mut l, &new, t0);
        assert_eq!(again.batch, ls.batch);
        assert!(again.id > ls.id);
        // Nor can the old one ack the new one's lease.
        assert!(matches!(
            l.ack(&old, again.id, t0),
            AckOutcome::NotHolder { .. }
        ));
        acked(&l.ack(&new, again.id, t0));
        assert_eq!(l.counters().stale_acks, 3);
    }

    #[test]
    fn a_departure_requeues_its_leases_at_once() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 2, 1)).unwrap();
        let a = Worker::new("a", 1);
        let b = Worker::new("b", 1);
        let l1 = lease(&mut l, &a, t0);
        let l2 = lease(&mut l, &a, t0);
        let lb = lease(&mut l, &b, t0);
        assert_eq!(
            l.outstanding_by_worker(),
            BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)])
        );
        let events = l.revoke("a", ReleaseReason::WorkerLeft);
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| matches!(
            e,
            LedgerEvent::LeaseReleased {
                reason: ReleaseReason::WorkerLeft,
                ..
            }
        )));
        assert_eq!(l.outstanding_for("a"), 0);
        assert_eq!(l.counters().requeued_batches, 2);
        assert_eq!(
            l.ack(&a, l1.id, t0),
            AckOutcome::Revoked {
                batch: l1.batch,
                reason: ReleaseReason::WorkerLeft
            }
        );
        assert!(
            l.revoke("a", ReleaseReason::WorkerLeft).is_empty(),
            "revoking twice does nothing"
        );
        let got: Vec<BatchId> = (0..2).map(|_| lease(&mut l, &b, t0).batch).collect();
        assert_eq!(got, [l1.batch, l2.batch]);
        assert_ne!(lb.batch, l1.batch);
    }

    #[test]
    fn unknown_leases_and_bad_configs_are_errors() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 5, 1)).unwrap();
        let w = Worker::new("w", 1);
        assert_eq!(l.ack(&w, 1, t0), AckOutcome::UnknownLease { lease_id: 1 });
        for bad in [cfg(0, 5, 1), cfg(10, 0, 1)] {
            assert!(matches!(Ledger::new(bad), Err(LedgerError::Config(_))));
        }
        let mut zero_timeout = cfg(10, 5, 1);
        zero_timeout.lease_timeout = Duration::ZERO;
        assert!(matches!(
            Ledger::new(zero_timeout),
            Err(LedgerError::Config(_))
        ));
        let mut none = Ledger::new(cfg(10, 5, 0)).unwrap();
        assert!(none.is_done());
        let w = Worker::new("w", 1);
        assert_eq!(none.lease(&w, t0), Ok(None));
    }

    #[test]
    fn epoch_barrier_holds_until_every_batch_is_acked() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(4, 2, 2)).unwrap();
        let a = Worker::new("a", 1);
        let b = Worker::new("b", 1);
        let la = lease(&mut l, &a, t0);
        let lb = lease(&mut l, &b, t0);
        acked(&l.ack(&a, la.id, t0));
        assert_eq!(l.lease(&a, t0), Ok(None), "epoch 1 waits for epoch 0");
        assert_eq!(l.progress().epoch, 0);
        // b's lease expires: the barrier batch comes back to a, still in epoch 0.
        l.tick(lb.deadline);
        let again = lease(&mut l, &a, lb.deadline);
        assert_eq!(again.batch, lb.batch);
        match l.ack(&a, again.id, lb.deadline) {
            AckOutcome::Acked { events, .. } => {
                assert_eq!(events, vec![LedgerEvent::EpochCompleted { epoch: 0 }]);
            }
            other => panic!("{other:?}"),
        }
        let next = lease(&mut l, &a, lb.deadline);
        assert_eq!(next.batch, BatchId { epoch: 1, index: 0 });
        // b's expired epoch-0 lease is stale now: its batch was trained by a.
        assert_eq!(
            l.ack(&b, lb.id, lb.deadline),
            AckOutcome::Stale {
                batch: lb.batch,
                reason: StaleReason::AckedByOther
            }
        );
        // A repeated ack of an epoch-0 lease is still recognised as a duplicate.
        assert_eq!(
            l.ack(&a, la.id, lb.deadline),
            AckOutcome::Duplicate { batch: la.batch }
        );
    }

    #[test]
    fn restore_requeues_outstanding_leases_and_keeps_acks() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 2, 2)).unwrap();
        let a = Worker::new("a", 1);
        let l1 = lease(&mut l, &a, t0);
        let l2 = lease(&mut l, &a, t0);
        let l3 = lease(&mut l, &a, t0);
        acked(&l.ack(&a, l2.id, t0));
        l.tick(l1.deadline); // l1, l3 expire ...
        let l4 = lease(&mut l, &a, l1.deadline); // ... l1's batch is leased again
        assert_eq!(l4.batch, l1.batch);
        let before = l.progress();

        let json = serde_json::to_string(&l.snapshot()).unwrap();
        let state: LedgerState = serde_json::from_str(&json).unwrap();
        let (mut r, events) = Ledger::restore(state).unwrap();
        assert_eq!(
            events,
            vec![LedgerEvent::LeaseReleased {
                lease_id: l4.id,
                batch: l4.batch,
                worker: a.clone(),
                reason: ReleaseReason::Restore
            }]
        );
        let p = r.progress();
        assert_eq!((p.total_acked, p.acked_in_epoch), (1, 1));
        assert_eq!(p.outstanding, 0);
        assert_eq!(p.requeued_waiting, before.requeued_waiting + 1);
        assert_eq!(r.counters().restores, 1);
        assert_eq!(r.counters().requeued_batches, 3);

        // Lease holders survive: a's repeated ack is still a duplicate.
        assert_eq!(
            r.ack(&a, l2.id, t0),
            AckOutcome::Duplicate { batch: l2.batch }
        );
        // Requeued first: l3's batch (expired earlier), then l4's (released by the restore).
        let n1 = lease(&mut r, &a, t0);
        let n2 = lease(&mut r, &a, t0);
        assert_eq!((n1.batch, n2.batch), (l3.batch, l4.batch));
        assert!(n1.id > l4.id, "fencing ids stay monotonic across a restore");
        // The pre-crash lease of that batch is stale now.
        assert!(matches!(
            r.ack(&a, l4.id, t0),
            AckOutcome::Stale {
                reason: StaleReason::ReLeased { .. },
                ..
            }
        ));
        acked(&r.ack(&a, n1.id, t0));
        acked(&r.ack(&a, n2.id, t0));
        while let Some(ls) = r.lease(&a, t0).unwrap() {
            acked(&r.ack(&a, ls.id, t0));
        }
        assert!(r.is_done());
        assert_eq!(r.progress().total_acked, 10);

        // A finished run round-trips too.
        let json = serde_json::to_string(&r.snapshot()).unwrap();
        let (done, events) = Ledger::restore(serde_json::from_str(&json).unwrap()).unwrap();
        assert!(done.is_done() && events.is_empty());
    }

    #[test]
    fn no_lease_id_or_ack_seq_is_issued_twice_across_a_crash_after_the_commit_point() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(100, 5, 1)).unwrap();
        let w = Worker::new("w", 1);
        let a = lease(&mut l, &w, t0);
        acked(&l.ack(&w, a.id, t0));
        let commit_point = l.snapshot();
        // After the commit point, the doomed coordinator hands out more ids and seqs.
        let mut seen_ids = vec![a.id];
        let mut seen_seqs = Vec::new();
        for _ in 0..5 {
            let ls = lease(&mut l, &w, t0);
            seen_ids.push(ls.id);
            if let AckOutcome::Acked { seq, .. } = l.ack(&w, ls.id, t0) {
                seen_seqs.push(seq);
            }
        }
        // It crashes; the next one restores the commit point, twice over.
        let (mut r, _) = Ledger::restore(commit_point).unwrap();
        let w2 = Worker::new("w", 2);
        for round in 0..2 {
            let ls = lease(&mut r, &w2, t0);
            assert!(
                !seen_ids.contains(&ls.id),
                "lease id {} issued twice",
                ls.id
            );
            let AckOutcome::Acked { seq, .. } = r.ack(&w2, ls.id, t0) else {
                panic!("ack refused");
            };
            assert!(!seen_seqs.contains(&seq), "ack seq {seq} issued twice");
            assert!(ls.id > *seen_ids.iter().max().unwrap());
            seen_ids.push(ls.id);
            seen_seqs.push(seq);
            if round == 0 {
                let (again, _) = Ledger::restore(r.snapshot()).unwrap();
                r = again;
            }
        }
    }

    #[test]
    fn restore_rejects_inconsistent_state() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(10, 2, 2)).unwrap();
        let a = Worker::new("a", 1);
        let ls = lease(&mut l, &a, t0);
        acked(&l.ack(&a, ls.id, t0));
        let good = l.snapshot();
        assert!(Ledger::restore(good.clone()).is_ok());

        let mut s = good.clone();
        s.epoch = 3;
        assert!(matches!(Ledger::restore(s), Err(LedgerError::Corrupt(_))));
        let mut s = good.clone();
        s.next_fresh = 0; // batch 0 would be both acked and fresh
        assert!(matches!(Ledger::restore(s), Err(LedgerError::Corrupt(_))));
        let mut s = good.clone();
        s.requeue.push_back(7);
        assert!(matches!(Ledger::restore(s), Err(LedgerError::Corrupt(_))));
        let mut s = good.clone();
        s.total_acked = 5;
        assert!(matches!(Ledger::restore(s), Err(LedgerError::Corrupt(_))));
        let mut s = good;
        s.config.batch_size = 0;
        assert!(matches!(Ledger::restore(s), Err(LedgerError::Config(_))));
    }

    #[test]
    fn rollback_requeues_acks_after_the_checkpoint() {
        let t0 = Instant::now();
        let mut l = Ledger::new(cfg(12, 2, 2)).unwrap();
        let w1 = Worker::new("w", 1);
        let other = Worker::new("o", 1);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let ls = lease(&mut l, &w1, t0);
            match l.ack(&w1, ls.id, t0) {
                AckOutcome::Acked { seq, .. } => seqs.push((seq, ls.batch)),
                other => panic!("{other:?}"),
            }
        }
        let lo = lease(&mut l, &other, t0);
        acked(&l.ack(&other, lo.id, t0));
        let checkpoint = seqs[0].0;
        assert_eq!(l.last_ack_seq("w"), Some(seqs[2].0));

        // The worker restarts from the checkpoint taken after its first ack.
        let w2 = Worker::new("w", 2);
        l.revoke("w", ReleaseReason::NewIncarnation);
        let rb = l.rollback("w", checkpoint);
        assert_eq!(rb.requeued, [seqs[1].1, seqs[2].1]);
        assert!(!rb.lost_in_finished_epochs);
        assert_eq!(rb.events.len(), 2);
        assert_eq!(l.progress().total_acked, 2);
        assert_eq!(l.counters().rolled_back_batches, 2);
        let again: Vec<BatchId> = (0..2).map(|_| lease(&mut l, &w2, t0).batch).collect();
        assert_eq!(again, rb.requeued);

        // Rolling back past an epoch barrier cannot be undone, and says so.
        let mut l = Ledger::new(cfg(4, 2, 2)).unwrap();
        let w = Worker::new("w", 1);
        for _ in 0..3 {
            let ls = lease(&mut l, &w, t0);
            acked(&l.ack(&w, ls.id, t0));
        }
        let rb = l.rollback("w", 0);
        assert!(rb.lost_in_finished_epochs);
        assert_eq!(rb.requeued, [BatchId { epoch: 1, index: 0 }]);
        assert!(rb.events.contains(&LedgerEvent::RollbackIncomplete {
            worker_id: "w".into(),
            through_seq: 0
        }));
        assert_eq!(l.counters().incomplete_rollbacks, 1);
    }

    /// Random leases, acks, expiries, departures, restarts, rollbacks and coordinator restores,
    /// driven by a seeded generator: the run always finishes with every batch of every epoch
    /// acked exactly once (net of rollbacks), and the persisted state stays consistent.
    #[test]
    fn chaos_run_trains_every_batch_exactly_once() {
        let mut seen = LedgerCounters::default();
        for seed in 0..20u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut now = t0;
            let mut l = Ledger::new(LedgerConfig {
                seed,
                ..cfg(23, 4, 3)
            })
            .unwrap();
            let mut workers: Vec<Worker> =
                (0..3).map(|i| Worker::new(format!("w{i}"), 1)).collect();
            let mut held: Vec<(Worker, Lease)> = Vec::new();
            // Batches each worker id has acked since its last rollback point.
            let mut trained: BTreeMap<BatchId, u32> = BTreeMap::new();
            let mut steps = 0;
            while !l.is_done() {
                steps += 1;
                assert!(steps < 10_000, "seed {seed}: no progress");
                now += Duration::from_millis(rng.next_u64() % 3000);
                let w = workers[(rng.next_u64() % 3) as usize].clone();
                match rng.next_u64() % 20 {
                    0..=7 => {
                        if let Some(ls) = l.lease(&w, now).unwrap() {
                            held.push((w, ls));
                        }
                    }
                    8..=15 if !held.is_empty() => {
                        let i = (rng.next_u64() % held.len() as u64) as usize;
                        let (hw, ls) = held.swap_remove(i);
                        if let AckOutcome::Acked { batch, .. } = l.ack(&hw, ls.id, now) {
                            *trained.entry(batch).or_insert(0) += 1;
                        }
                    }
                    16 => {
                        l.tick(now);
                    }
                    17 => {
                        // The worker restarts with a new incarnation.
                        let i = workers.iter().position(|x| x.id == w.id).unwrap();
                        let reason = if rng.next_u64() % 2 == 0 {
                            ReleaseReason::WorkerLeft
                        } else {
                            ReleaseReason::NewIncarnation
                        };
                        l.revoke(&w.id, reason);
                        let next = Worker::new(w.id.clone(), w.incarnation + 1);
                        workers[i] = next;
                    }
                    18 => {
                        let json = serde_json::to_string(&l.snapshot()).unwrap();
                        l = Ledger::restore(serde_json::from_str(&json).unwrap())
                            .unwrap()
                            .0;
                        check_state(&l.snapshot()).unwrap();
                    }
                    _ => {
                        // A rollback of the worker's acks in this epoch since a random point.
                        let through = l.last_ack_seq(&w.id).unwrap_or(0).saturating_sub(2);
                        let before: BTreeSet<BatchId> = l
                            .state
                            .acked
                            .iter()
                            .enumerate()
                            .filter(|(_, a)| {
                                a.as_ref()
                                    .is_some_and(|a| a.worker.id == w.id && a.seq > through)
                            })
                            .map(|(i, _)| BatchId {
                                epoch: l.state.epoch,
                                index: i as u32,
                            })
                            .collect();
                        let rb = l.rollback(&w.id, through);
                        assert_eq!(rb.requeued.iter().copied().collect::<BTreeSet<_>>(), before);
                        for b in rb.requeued {
                            *trained.entry(b).or_insert(0) -= 1;
                        }
                    }
                }
                check_state(&l.snapshot()).unwrap();
            }
            let p = l.progress();
            assert_eq!(p.total_acked, p.expected_total, "seed {seed}");
            assert_eq!(trained.len() as u64, p.expected_total, "seed {seed}");
            assert!(
                trained.values().all(|&n| n == 1),
                "seed {seed}: every batch trained once: {trained:?}"
            );
            let c = l.counters();
            seen.expired_leases += c.expired_leases;
            seen.released_leases += c.released_leases;
            seen.late_acks += c.late_acks;
            seen.stale_acks += c.stale_acks;
            seen.duplicate_acks += c.duplicate_acks;
            seen.rolled_back_batches += c.rolled_back_batches;
            seen.restores += c.restores;
        }
        // Every path was really taken somewhere across the seeds.
        assert!(
            seen.expired_leases > 0 && seen.released_leases > 0,
            "{seen:?}"
        );
        assert!(seen.late_acks > 0 && seen.stale_acks > 0, "{seen:?}");
        assert!(
            seen.rolled_back_batches > 0 && seen.restores > 0,
            "{seen:?}"
        );
    }

    #[test]
    fn with_hold_for_commit_the_barrier_waits_for_commits_and_rollback_stays_possible() {
        let t0 = Instant::now();
        let mut l = Ledger::new(LedgerConfig {
            hold_for_commit: true,
            ..cfg(8, 4, 2)
        })
        .unwrap();
        let w = Worker::new("w", 1);
        let mut seqs = Vec::new();
        for _ in 0..2 {
            let ls = lease(&mut l, &w, t0);
            match l.ack(&w, ls.id, t0) {
                AckOutcome::Acked { seq, events, .. } => {
                    assert!(events.is_empty(), "{events:?}");
                    seqs.push(seq);
                }
                other => panic!("{other:?}"),
            }
        }
        // Every batch of epoch 0 is acked, none averaged: the barrier holds.
        assert!(l.awaiting_commit());
        assert!(l.has_uncommitted("w"));
        assert_eq!(l.lease(&w, t0).unwrap(), None);
        assert_eq!(l.progress().epoch, 0);
        // Committing the first ack is not enough; a rollback of the second is still possible.
        assert!(l.commit("w", seqs[0]).is_empty());
        let rb = l.rollback("w", seqs[0]);
        assert_eq!(rb.requeued.len(), 1);
        assert!(!rb.lost_in_finished_epochs);
        assert!(!l.awaiting_commit());
        // Trained again and committed: the barrier passes.
        let ls = lease(&mut l, &w, t0);
        let seq = match l.ack(&w, ls.id, t0) {
            AckOutcome::Acked { seq, .. } => seq,
            other => panic!("{other:?}"),
        };
        assert!(l.awaiting_commit());
        assert_eq!(
            l.commit("w", seq),
            vec![LedgerEvent::EpochCompleted { epoch: 0 }]
        );
        assert_eq!(l.progress().epoch, 1);
        assert!(!l.has_uncommitted("w"));
    }
}
