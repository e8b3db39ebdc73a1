//! One distillation run: shared state, the soft-target producer that feeds each worker, the
//! handling of acks, and the run report.
//!
//! Data flow per worker stream: credits (the worker's prefetch window) → lease a batch from the
//! [`Ledger`] → ask every member for its tempered logits concurrently (up to `prefetch` batches
//! in flight, so teacher latency hides behind training) → combine them into soft targets →
//! send the batches in lease order. Acks come back on the same stream and return credits.
//! When every batch is trained, one worker evaluates the final student on the test split and
//! sends its weights back; the run writes `report.json` and ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use distill_core::data::Dataset;
use distill_core::settings::StudentSettings;
use distill_proto::pb::{self, CoordinatorMessage, coordinator_message};
use distill_proto::{DType, HostTensor};
use futures::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheKey, SoftTargetCache};
use crate::config::{RunConfig, SoftTargetEncoding, TeacherPolicy};
use crate::error::{Error, Result};
use crate::ledger::{AckOutcome, Lease, Ledger, LedgerConfig, LedgerEvent, Worker};
use crate::membership::Membership;
use crate::registry::RegistryService;
use crate::sync::{Closed, Contribution, Params, SyncRounds};
use crate::teachers::{MemberStats, TeacherPool};

/// Checkpoint metadata key of the stored average: the round the parameters come from.
pub const KEY_SYNC_VERSION: &str = "distill.sync.version";

/// Averaged parameters on their way to one worker.
#[derive(Debug, Clone)]
pub struct SyncReply {
    /// Round number of the parameters.
    pub version: u64,
    /// Chunk groups, one per message (None: the worker keeps its own parameters).
    pub groups: Option<Arc<Vec<Vec<pb::ParamChunk>>>>,
    /// Workers averaged.
    pub contributors: u32,
}

impl SyncReply {
    /// The `SyncDown` messages of this reply.
    pub fn messages(&self) -> Vec<CoordinatorMessage> {
        let wrap = |d: pb::SyncDown| CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Params(d)),
        };
        match &self.groups {
            None => vec![wrap(pb::SyncDown {
                version: self.version,
                chunks: Vec::new(),
                last: true,
                unchanged: true,
                contributors: self.contributors,
            })],
            Some(groups) => groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    wrap(pb::SyncDown {
                        version: self.version,
                        chunks: g.clone(),
                        last: i + 1 == groups.len(),
                        unchanged: false,
                        contributors: self.contributors,
                    })
                })
                .collect(),
        }
    }

    /// Bytes of parameter values it carries.
    pub fn value_bytes(&self) -> u64 {
        self.groups
            .as_ref()
            .map_or(0, |g| distill_proto::params::value_bytes(g))
    }
}

/// The run's soft-target cache and its key.
#[derive(Clone)]
pub(crate) struct RunCache {
    cache: SoftTargetCache,
    key: CacheKey,
    /// No teachers: every batch must come from the cache.
    offline: bool,
}

/// How the run used the soft-target cache.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    /// The cache directory.
    pub dir: PathBuf,
    /// `read-write`, `read-only` or `offline`.
    pub mode: String,
    /// Digest of the run's key in the cache.
    pub key: String,
    /// Rows found in the cache.
    pub hit_rows: u64,
    /// Rows looked up and not found (then asked of the teachers).
    pub missed_rows: u64,
    /// Rows written to the cache.
    pub rows_written: u64,
}

/// Rows and batches one worker trained.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerShare {
    /// Worker id.
    pub worker_id: String,
    /// Training rows acked (all incarnations).
    pub samples: u64,
    /// Batches acked.
    pub batches: u64,
}

/// Synchronisation figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Local updates between rounds (0: no rounds).
    pub every: u64,
    /// Parameter dtype on the wire.
    pub dtype: String,
    /// Rounds closed.
    pub rounds: u64,
    /// Mean seconds a round was open (first contribution to close).
    pub mean_round_seconds: f64,
    /// Mean parameter bytes moved per round, up and down together.
    pub mean_bytes_per_round: f64,
    /// Seconds workers were blocked in rounds, all workers together.
    pub worker_sync_seconds: f64,
}

/// Test errors of one teacher member.
#[derive(Debug, Clone, Serialize)]
pub struct TeacherErrors {
    /// Member name.
    pub member: String,
    /// Test errors (arg-max of its logits vs the label).
    pub test_errors: u64,
}

/// The run's result, written to `report.json` in the run directory.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Data source.
    pub data: String,
    /// Student architecture.
    pub student_arch: String,
    /// Temperature and alpha of the KD loss.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Each member's test errors.
    pub teachers: Vec<TeacherErrors>,
    /// Test errors of the combined ensemble (its combination at T = 1).
    pub ensemble_test_errors: Option<u64>,
    /// Test errors of the same student trained on hard labels alone (filled by `distill demo`).
    pub baseline_student_test_errors: Option<u64>,
    /// Test errors of the distilled student.
    pub student_test_errors: u64,
    /// Rows in the test split.
    pub test_size: u64,
    /// Epochs trained.
    pub epochs: u32,
    /// Training samples per second, from the first batch sent to the last ack.
    pub samples_per_sec: f64,
    /// Batches acked.
    pub batches_trained: u64,
    /// Batches the run needed.
    pub batches_expected: u64,
    /// Seconds workers waited for batches.
    pub student_wait_seconds: f64,
    /// Seconds workers spent training.
    pub student_step_seconds: f64,
    /// Wait as a fraction of the training time line (wait / (wait + step)).
    pub student_wait_fraction: f64,
    /// Batches leased again (expired leases, departed workers).
    pub requeued_batches: u64,
    /// Teacher requests retried on another replica.
    pub retries: u64,
    /// Batches whose soft targets came from only the members that answered (`degrade`).
    pub degraded_batches: u64,
    /// Times the coordinator resumed this run from its stored state.
    pub resumes: u64,
    /// Per-member teacher statistics.
    pub members: Vec<MemberStats>,
    /// Wall-clock seconds of the run.
    pub run_seconds: f64,
    /// The final student's checkpoint in the run directory.
    pub student_checkpoint: PathBuf,
    /// What each worker trained.
    pub workers: Vec<WorkerShare>,
    /// Synchronisation rounds.
    pub sync: SyncReport,
    /// Per epoch, batches whose soft targets came from the teachers.
    pub teacher_batches_per_epoch: Vec<u64>,
    /// Per epoch, batches whose soft targets came from the cache.
    pub cached_batches_per_epoch: Vec<u64>,
    /// The soft-target cache, when the run had one.
    pub cache: Option<CacheReport>,
}

#[derive(Default)]
struct Stats {
    samples: u64,
    wait_secs: f64,
    step_secs: f64,
    first_send: Option<Instant>,
    last_ack: Option<Instant>,
    epoch_loss: f64,
    epoch_batches: u64,
    sync_secs: f64,
    down_bytes: u64,
    /// Batches whose soft targets came from a subset of the members (`degrade` policy).
    degraded_batches: u64,
    /// Per epoch: batches whose soft targets came from the teachers, and from the cache.
    teacher_batches: Vec<u64>,
    cached_batches: Vec<u64>,
    per_worker: BTreeMap<String, WorkerShare>,
}

impl Stats {
    fn counters(&self) -> crate::state::Counters {
        crate::state::Counters {
            samples: self.samples,
            wait_secs: self.wait_secs,
            step_secs: self.step_secs,
            sync_secs: self.sync_secs,
            down_bytes: self.down_bytes,
            per_worker: self
                .per_worker
                .iter()
                .map(|(k, w)| (k.clone(), (w.samples, w.batches)))
                .collect(),
            teacher_batches: self.teacher_batches.clone(),
            cached_batches: self.cached_batches.clone(),
            degraded_batches: self.degraded_batches,
        }
    }

    fn from_counters(c: crate::state::Counters) -> Self {
        Self {
            samples: c.samples,
            wait_secs: c.wait_secs,
            step_secs: c.step_secs,
            sync_secs: c.sync_secs,
            down_bytes: c.down_bytes,
            per_worker: c
                .per_worker
                .into_iter()
                .map(|(k, (samples, batches))| {
                    (
                        k.clone(),
                        WorkerShare {
                            worker_id: k,
                            samples,
                            batches,
                        },
                    )
                })
                .collect(),
            teacher_batches: c.teacher_batches,
            cached_batches: c.cached_batches,
            degraded_batches: c.degraded_batches,
            ..Default::default()
        }
    }
}

/// Shared state of the run.
///
/// Lock order: `workers` → `ledger` → `sync` → `stats` → any other lock. A function that holds
/// more than one of these takes them in that order (`persist_average` holds `ledger`, `sync` and
/// `stats` at once for a consistent commit point); elsewhere a guard is dropped before the next
/// lock is taken. Taking `sync` while holding `stats` once deadlocked `RunStatus` against a
/// closing round.
pub struct Run {
    pub(crate) cfg: RunConfig,
    pub(crate) settings: StudentSettings,
    pub(crate) settings_json: String,
    pub(crate) data: Arc<Dataset>,
    pub(crate) pool: TeacherPool,
    ledger: Mutex<Ledger>,
    changed: Notify,
    workers: Mutex<HashMap<String, u64>>,
    next_worker: AtomicU64,
    stats: Mutex<Stats>,
    queues: Mutex<BTreeMap<String, usize>>,
    /// The worker evaluating the final student, if one has started.
    evaluator: Mutex<Option<Worker>>,
    teacher_eval: Mutex<Option<(Vec<TeacherErrors>, u64)>>,
    report: Mutex<Option<RunReport>>,
    sync: Mutex<SyncRounds>,
    /// Per worker id: its incarnation and where its averaged parameters go.
    outboxes: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<SyncReply>)>>,
    /// Names and shapes of the student's parameters, in model order.
    pub(crate) param_shapes: Vec<(String, Vec<usize>)>,
    /// Highest round written to the run state.
    persisted: Arc<Mutex<u64>>,
    /// The run's store (runs with synchronisation rounds).
    store: Option<Arc<crate::state::RunStore>>,
    /// Times this run was resumed from its store.
    resumes: u64,
    /// When the average was last written.
    persisted_at: Mutex<Option<Instant>>,
    /// The soft-target cache and this run's key in it (set by [`Run::open_cache`]).
    cache: std::sync::OnceLock<RunCache>,
    /// Set once the first batch was leased (after `min_workers` joined).
    started_leasing: std::sync::atomic::AtomicBool,
    /// Cancelled when the run is complete (report written) or the process shuts down.
    pub finished: CancellationToken,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Internal("a lock was poisoned by a panic".into()))
}

impl Run {
    /// Builds the run: loads the data set, prepares the ledger and the teacher clients, and
    /// writes the resolved config into the run directory.
    pub fn new(cfg: RunConfig, data: Dataset) -> Result<Arc<Self>> {
        let settings = cfg.student_settings()?;
        let classes = settings.spec.arch.classes();
        if classes != data.classes || settings.spec.arch.input_size() != data.row_len() {
            return Err(Error::Config(format!(
                "`student.arch`: {} takes {} inputs and {} classes, but {} has rows of {} values and {} classes",
                settings.spec.arch,
                settings.spec.arch.input_size(),
                classes,
                data.source,
                data.row_len(),
                data.classes
            )));
        }
        cfg.soft_targets.topk_format(data.classes)?;
        let settings_json = serde_json::to_string(&settings)
            .map_err(|e| Error::Internal(format!("settings to JSON: {e}")))?;
        let mut ledger = Ledger::new(LedgerConfig {
            samples: data.train.len(),
            batch_size: cfg.batch_size,
            epochs: cfg.epochs,
            seed: cfg.seed,
            lease_timeout: Duration::from_secs_f64(cfg.lease_timeout_secs),
            hold_for_commit: cfg.sync.every > 0,
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        let mut membership = Membership::new(
            cfg.membership.to_config(cfg.seed),
            cfg.members
                .iter()
                .map(|m| (m.name.clone(), m.endpoints.clone())),
        )
        .map_err(|e| Error::Config(format!("`members`: {e}")))?;
        membership.expect_model(data.row_len() as u64, data.classes as u32);
        let registry = RegistryService::new(Arc::new(Mutex::new(membership)));
        let pool = TeacherPool::new(
            &cfg.members,
            registry,
            Duration::from_secs_f64(cfg.teacher_timeout_secs),
            cfg.max_message_bytes(),
        )?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(|e| Error::Io {
            path: cfg.run_dir.clone(),
            source: e,
        })?;
        let resolved =
            toml::to_string(&cfg).map_err(|e| Error::Internal(format!("config to TOML: {e}")))?;
        distill_core::fsutil::atomic_write(&cfg.run_dir.join("config.toml"), resolved.as_bytes())?;
        // Runs with synchronisation rounds keep their state in `state.redb` and resume from it.
        let store = if cfg.sync.every > 0 {
            Some(Arc::new(crate::state::RunStore::open(&cfg.run_dir)?))
        } else {
            None
        };
        let mut latest = None;
        let mut workers_map = HashMap::new();
        let mut stats = Stats::default();
        let mut committed = BTreeMap::new();
        let mut resumes = 0;
        if let Some((saved, average)) = store.as_ref().map(|s| s.load()).transpose()?.flatten() {
            if saved.config != settings_json {
                return Err(Error::Config(format!(
                    "{} holds the state of a run with other student settings ({}); move it away \
                     to start afresh",
                    cfg.run_dir.join(crate::state::STATE_FILE).display(),
                    saved.config
                )));
            }
            let (mut restored, events) =
                Ledger::restore(saved.ledger).map_err(|e| Error::Config(e.to_string()))?;
            if restored.config() != ledger.config() {
                return Err(Error::Config(format!(
                    "{}: the stored run has another data size, batch size, epochs or seed",
                    cfg.run_dir.join(crate::state::STATE_FILE).display()
                )));
            }
            log_events(&events);
            for id in restored.workers_with_acks() {
                let through = saved.committed.get(&id).copied().unwrap_or(0);
                let rb = restored.rollback(&id, through);
                log_events(&rb.events);
            }
            log_events(&restored.settle());
            workers_map = restored.incarnations().into_iter().collect();
            ledger = restored;
            if saved.sync_version > 0
                && let Some(bytes) = average
            {
                let ck = distill_core::checkpoint::Checkpoint::from_bytes(&bytes)?;
                latest = Some((saved.sync_version, Arc::new(ck.params)));
            }
            committed = saved.committed;
            stats = Stats::from_counters(saved.counters);
            resumes = saved.resumes + 1;
            let p = ledger.progress();
            tracing::warn!(
                resumes,
                version = saved.sync_version,
                batches_trained = p.total_acked,
                epoch = p.epoch,
                "resuming the run from its stored state"
            );
        }
        let mut sync =
            SyncRounds::new(Duration::from_secs_f64(cfg.sync.round_timeout_secs), latest)
                .with_outer_lr(cfg.sync.outer_lr);
        sync.restore_committed(committed);
        let param_shapes = settings.spec.arch.param_shapes();
        Ok(Arc::new(Self {
            cfg,
            settings,
            settings_json,
            data: Arc::new(data),
            pool,
            ledger: Mutex::new(ledger),
            store,
            resumes,
            changed: Notify::new(),
            workers: Mutex::new(workers_map),
            next_worker: AtomicU64::new(0),
            stats: Mutex::new(stats),
            queues: Mutex::new(BTreeMap::new()),
            evaluator: Mutex::new(None),
            teacher_eval: Mutex::new(None),
            report: Mutex::new(None),
            sync: Mutex::new(sync),
            outboxes: Mutex::new(HashMap::new()),
            param_shapes,
            persisted: Arc::new(Mutex::new(0)),
            persisted_at: Mutex::new(None),
            started_leasing: std::sync::atomic::AtomicBool::new(false),
            cache: std::sync::OnceLock::new(),
            finished: CancellationToken::new(),
            started: Instant::now(),
        }))
    }

    /// Opens the soft-target cache of the config, if any, under this run's key: the members'
    /// names, weights and weight digests (`digests`, from their replicas' Describe), T, the
    /// combination, the encoding and the data. In an offline run (no teachers) the key comes
    /// from the cache: the one complete key for this data, T, combination and encoding.
    pub fn open_cache(&self, digests: &[Option<String>]) -> Result<()> {
        let Some(cc) = &self.cfg.cache else {
            return Ok(());
        };
        let cache = SoftTargetCache::open_config(cc)?;
        let encoding = self.cfg.soft_targets.to_string();
        let offline = cc.mode == crate::cache::CacheMode::Offline;
        let key = if offline {
            let t = self.cfg.temperature as f32;
            let fits: Vec<_> = cache
                .keys()?
                .into_iter()
                .filter(|k| {
                    k.key.data == self.data.source
                        && k.key.train_size == self.data.train.len()
                        && k.key.temperature == t
                        && k.key.combine == self.cfg.combine
                        && k.key.encoding == encoding
                })
                .collect();
            let complete: Vec<_> = fits.iter().filter(|k| k.is_complete()).collect();
            match complete.as_slice() {
                [one] => one.key.clone(),
                [] => {
                    return Err(Error::Config(format!(
                        "`cache`: {} holds no complete soft targets for data {}, T = {t}, {} and \
                         encoding {encoding} (partial: {})",
                        cache.path().display(),
                        self.data.source,
                        self.cfg.combine,
                        fits.iter()
                            .map(|k| format!("{} ({} rows)", k.description, k.rows))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
                many => {
                    return Err(Error::Config(format!(
                        "`cache`: {} holds several ensembles for this run; keep one: {}",
                        cache.path().display(),
                        many.iter()
                            .map(|k| k.description.clone())
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
            }
        } else {
            let mut members = Vec::new();
            for (m, d) in self.pool.members.iter().zip(digests) {
                let Some(d) = d else {
                    tracing::warn!(member = %m.name, "no replica told its weights digest; the soft-target cache is off for this run");
                    return Ok(());
                };
                members.push(crate::cache::MemberIdentity {
                    name: m.name.clone(),
                    weights_digest: d.clone(),
                    weight: m.weight,
                });
            }
            CacheKey {
                data: self.data.source.clone(),
                train_size: self.data.train.len(),
                members,
                temperature: self.cfg.temperature as f32,
                combine: self.cfg.combine,
                encoding,
                row_bytes: self.cfg.soft_targets.row_bytes(self.data.classes)?,
            }
        };
        key.validate()?;
        tracing::info!(cache = %cache.path().display(), key = %key.description(), offline, "soft-target cache open");
        let _ = self.cache.set(RunCache {
            cache,
            key,
            offline,
        });
        Ok(())
    }

    /// Whether the run has no teachers (offline from a cache).
    pub fn is_offline(&self) -> bool {
        self.cache.get().is_some_and(|c| c.offline)
    }

    /// The report, once the run is complete.
    pub fn report(&self) -> Option<RunReport> {
        self.report.lock().ok().and_then(|r| r.clone())
    }

    /// A worker joins: a new id (or its old one) and the next incarnation.
    pub fn join(&self, requested_id: &str) -> Result<Worker> {
        let id = if requested_id.is_empty() {
            format!(
                "worker-{}",
                self.next_worker.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            requested_id.to_string()
        };
        let mut workers = lock(&self.workers)?;
        let previous = workers.get(&id).copied();
        let incarnation = previous.map_or(1, |i| i + 1);
        let worker = Worker::new(id.clone(), incarnation);
        let events = lock(&self.ledger)?
            .join(&worker)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        workers.insert(id.clone(), incarnation);
        drop(workers);
        log_events(&events);
        if let Some(old) = previous {
            // The old process is gone, and with it whatever it trained after its last round.
            self.lose_uncommitted(&Worker::new(id, old));
        }
        self.changed.notify_waiters();
        Ok(worker)
    }

    /// Checks that `worker` is the current incarnation of a joined worker.
    pub fn check_worker(&self, worker: &Worker) -> Result<()> {
        match lock(&self.workers)?.get(&worker.id) {
            None => Err(Error::NotFound(format!(
                "worker `{}` has not joined this run",
                worker.id
            ))),
            Some(&cur) if cur != worker.incarnation => Err(Error::Stale(format!(
                "worker `{}` incarnation {} was replaced by incarnation {cur}",
                worker.id, worker.incarnation
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        self.ledger
            .lock()
            .map(|l| l.config().batches_per_epoch())
            .unwrap_or(0)
    }

    /// Expires overdue leases and closes a timed-out round; called periodically.
    pub fn tick(&self) {
        let closed = match self.sync.lock() {
            Ok(mut s) => s.tick(Instant::now()),
            Err(_) => return,
        };
        if let Some(c) = closed {
            self.deliver(c);
        }
        let events = match self.ledger.lock() {
            Ok(mut l) => l.tick(Instant::now()),
            Err(_) => return,
        };
        if !events.is_empty() {
            log_events(&events);
            self.changed.notify_waiters();
        }
    }

    /// The worker's stream ended: its leases go back in line at once.
    pub fn worker_gone(&self, worker: &Worker) {
        if let Ok(mut l) = self.ledger.lock() {
            let events = l.worker_left(worker);
            log_events(&events);
        }
        if let Ok(mut q) = self.queues.lock() {
            q.remove(&worker.id);
        }
        let current = self
            .workers
            .lock()
            .ok()
            .and_then(|w| w.get(&worker.id).copied());
        if current == Some(worker.incarnation) {
            self.lose_uncommitted(worker);
        }
        // An evaluator that left before reporting frees the evaluation for the next worker.
        if let Ok(mut e) = self.evaluator.lock()
            && e.as_ref() == Some(worker)
        {
            *e = None;
        }
        self.changed.notify_waiters();
    }

    /// Whether the run has synchronisation rounds.
    pub fn sync_enabled(&self) -> bool {
        self.cfg.sync.every > 0
    }

    /// `worker` is gone (its stream ended, or a new incarnation replaced it): it leaves the
    /// rounds, and the acks it made after its last averaged contribution are rolled back, since
    /// those updates existed only in its own parameters.
    fn lose_uncommitted(&self, worker: &Worker) {
        if !self.sync_enabled() {
            return;
        }
        let (closed, committed) = match self.sync.lock() {
            Ok(mut s) => (s.leave(worker, Instant::now()), s.committed_seq(&worker.id)),
            Err(_) => return,
        };
        if let Some(c) = closed {
            self.deliver(c);
        }
        if let Ok(mut outboxes) = self.outboxes.lock()
            && outboxes
                .get(&worker.id)
                .is_some_and(|(inc, _)| *inc == worker.incarnation)
        {
            outboxes.remove(&worker.id);
        }
        if let Ok(mut l) = self.ledger.lock() {
            let rb = l.rollback(&worker.id, committed);
            if !rb.requeued.is_empty() {
                tracing::warn!(%worker, batches = rb.requeued.len(), "batches trained after the worker's last round are trained again");
            }
            log_events(&rb.events);
        }
        self.changed.notify_waiters();
    }

    /// A worker's batch stream opened: it joins the rounds. Returns where its averaged
    /// parameters will arrive, and the latest average for it to start from.
    pub fn open_sync(
        &self,
        worker: &Worker,
    ) -> Result<(mpsc::UnboundedReceiver<SyncReply>, Option<SyncReply>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let latest = if self.sync_enabled() {
            let mut s = lock(&self.sync)?;
            s.join(worker);
            s.latest()
        } else {
            None
        };
        lock(&self.outboxes)?.insert(worker.id.clone(), (worker.incarnation, tx));
        // With rounds, the coordinator's average is the model: every stream starts from it (the
        // seeded initial parameters before the first round), so a worker that reconnects or
        // restarts drops whatever it trained after its last averaged contribution.
        let latest = latest.or_else(|| {
            self.sync_enabled().then(|| {
                (
                    0,
                    Arc::new(distill_core::model::init_params(
                        &self.settings.spec.arch,
                        self.settings.seed,
                    )),
                )
            })
        });
        let start = match latest {
            Some((version, params)) => Some(SyncReply {
                version,
                groups: Some(Arc::new(self.chunk(&params)?)),
                contributors: 0,
            }),
            None => None,
        };
        Ok((rx, start))
    }

    fn chunk(&self, params: &Params) -> Result<Vec<Vec<pb::ParamChunk>>> {
        distill_proto::params::to_chunk_groups(
            params,
            self.cfg.sync.dtype.wire(),
            self.cfg.sync.chunk_bytes,
        )
        .map_err(|e| Error::Internal(e.to_string()))
    }

    /// A worker's whole contribution to a round arrived.
    pub fn contribute(
        &self,
        worker: &Worker,
        up: ContributionHeader,
        params: Vec<distill_proto::params::Param>,
    ) -> Result<()> {
        if !self.sync_enabled() {
            return Err(Error::InvalidArgument(
                "this run has no synchronisation rounds (sync.every = 0)".into(),
            ));
        }
        self.check_worker(worker)?;
        let last_ack_seq = lock(&self.ledger)?.last_ack_seq(&worker.id).unwrap_or(0);
        let c = Contribution {
            worker: worker.clone(),
            base_version: up.base_version,
            samples: up.samples,
            params: Arc::new(params),
            is_final: up.is_final,
            last_ack_seq,
            wire_bytes: up.wire_bytes,
        };
        tracing::debug!(%worker, samples = up.samples, base = up.base_version, is_final = up.is_final, "contribution");
        let closed = lock(&self.sync)?
            .contribute(c, Instant::now())
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if let Some(c) = closed {
            self.deliver(c);
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Sends a closed round's average to its contributors and persists it.
    fn deliver(&self, closed: Closed) {
        // Encoded only if some contributor needs the average (a lone one keeps its own).
        let groups = if closed.replies.iter().any(|(_, unchanged)| !unchanged) {
            match self.chunk(&closed.params) {
                Ok(g) => Some(Arc::new(g)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode the averaged parameters");
                    return;
                }
            }
        } else {
            None
        };
        let contributors = closed.replies.len() as u32;
        tracing::info!(
            version = closed.version,
            contributors,
            missing = ?closed.missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
            samples = closed.samples,
            seconds = closed.seconds,
            up_bytes = closed.up_bytes,
            reason = ?closed.reason,
            "synchronisation round closed"
        );
        if let Ok(outboxes) = self.outboxes.lock() {
            for (w, unchanged) in &closed.replies {
                let reply = SyncReply {
                    version: closed.version,
                    groups: if *unchanged { None } else { groups.clone() },
                    contributors,
                };
                match outboxes.get(&w.id) {
                    Some((inc, tx)) if *inc == w.incarnation => {
                        let _ = tx.send(reply);
                    }
                    _ => tracing::debug!(worker = %w, "contributor gone; no reply"),
                }
            }
        }
        // The contributors' acks up to their contributions are now in the model.
        let commits: Vec<(String, u64)> = match self.sync.lock() {
            Ok(sy) => closed
                .replies
                .iter()
                .map(|(w, _)| (w.id.clone(), sy.committed_seq(&w.id)))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut events = Vec::new();
        if let Ok(mut l) = self.ledger.lock() {
            for (id, seq) in commits {
                events.extend(l.commit(&id, seq));
            }
        }
        self.on_ledger_events(&events);
        self.persist_average(closed.version, closed.params);
        self.changed.notify_waiters();
    }

    /// Writes the average into the run directory (off the async threads; newest wins).
    fn persist_average(&self, version: u64, params: Params) {
        // At most one write per `state_every_secs`, and always the final average: a restarted
        // coordinator loses at most that much averaging, never a worker's acked batch (those
        // are re-trained from the ledger).
        let final_round = self.sync.lock().map(|s| s.all_final()).unwrap_or(true);
        if let Ok(mut last) = self.persisted_at.lock() {
            let every = Duration::from_secs_f64(self.cfg.sync.state_every_secs);
            if !final_round && last.is_some_and(|t| t.elapsed() < every) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Some(store) = self.store.clone() else {
            return;
        };
        // The commit point: the ledger and the commit sequence numbers as of this round.
        let saved = match (self.ledger.lock(), self.sync.lock(), self.stats.lock()) {
            (Ok(l), Ok(sy), Ok(st)) => crate::state::Saved {
                config: self.settings_json.clone(),
                ledger: l.snapshot(),
                sync_version: version,
                committed: sy.committed(),
                counters: st.counters(),
                resumes: self.resumes,
            },
            _ => return,
        };
        let (spec, persisted) = (self.settings.spec.clone(), self.persisted.clone());
        let write = move || -> Result<()> {
            let mut last = lock(&persisted)?;
            if *last >= version {
                return Ok(());
            }
            let mut ck = distill_core::checkpoint::Checkpoint {
                spec,
                params: params.as_ref().clone(),
                extra: Default::default(),
            };
            ck.extra
                .insert(KEY_SYNC_VERSION.into(), version.to_string());
            store.save(&saved, Some(&ck.to_bytes()?))?;
            *last = version;
            Ok(())
        };
        let task = move || {
            if let Err(e) = write() {
                tracing::warn!(error = %e, "cannot write the run state");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(task);
            }
            Err(_) => task(),
        }
    }

    /// Handles an ack; returns whether it returned a credit.
    pub fn ack(&self, worker: &Worker, ack: &pb::Ack) -> Result<bool> {
        let outcome = lock(&self.ledger)?.ack(worker, ack.lease_id, Instant::now());
        match outcome {
            AckOutcome::Acked { batch, events, .. } => {
                // Every batch is full but an epoch's last, which keeps the remainder.
                let (n, bs) = (self.data.train.len(), self.cfg.batch_size);
                let rows = bs.min(n.saturating_sub(batch.index as usize * bs));
                let mut s = lock(&self.stats)?;
                s.samples += rows as u64;
                s.wait_secs += f64::from(ack.wait_seconds.max(0.0));
                s.step_secs += f64::from(ack.step_seconds.max(0.0));
                s.last_ack = Some(Instant::now());
                s.epoch_loss += f64::from(ack.loss);
                s.epoch_batches += 1;
                s.sync_secs += f64::from(ack.sync_seconds.max(0.0));
                let share = s.per_worker.entry(worker.id.clone()).or_default();
                share.worker_id.clone_from(&worker.id);
                share.samples += rows as u64;
                share.batches += 1;
                tracing::debug!(%worker, %batch, loss = ack.loss, "batch trained");
                drop(s);
                self.on_ledger_events(&events);
                Ok(true)
            }
            AckOutcome::Duplicate { batch } => {
                tracing::debug!(%worker, %batch, "duplicate ack ignored");
                Ok(false)
            }
            other => {
                tracing::warn!(%worker, lease = ack.lease_id, outcome = ?other, "ack rejected");
                Ok(false)
            }
        }
    }

    /// Logs ledger events, writes an epoch's metrics line when one completes, wakes producers.
    fn on_ledger_events(&self, events: &[LedgerEvent]) {
        if let Ok(mut s) = self.stats.lock() {
            for e in events {
                if let LedgerEvent::EpochCompleted { epoch } = e {
                    let mean = s.epoch_loss / s.epoch_batches.max(1) as f64;
                    self.write_epoch_metrics(*epoch, mean, &s);
                    s.epoch_loss = 0.0;
                    s.epoch_batches = 0;
                }
            }
        }
        log_events(events);
        self.changed.notify_waiters();
    }

    fn write_epoch_metrics(&self, epoch: u32, mean_loss: f64, s: &Stats) {
        let elapsed = s.first_send.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let line = serde_json::json!({
            "epoch": epoch,
            "mean_loss": mean_loss,
            "samples": s.samples,
            "seconds": elapsed,
            "samples_per_sec": if elapsed > 0.0 { s.samples as f64 / elapsed } else { 0.0 },
            "student_wait_seconds": s.wait_secs,
            "teacher_batches": s.teacher_batches.get(epoch as usize).copied().unwrap_or(0),
            "cached_batches": s.cached_batches.get(epoch as usize).copied().unwrap_or(0),
        });
        tracing::info!(epoch, mean_loss, samples = s.samples, "epoch complete");
        let path = self.cfg.run_dir.join("metrics.jsonl");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(f, "{line}")
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot append metrics");
        }
    }

    /// Status snapshot for `RunStatus`.
    pub fn status(&self) -> Result<pb::RunStatusResponse> {
        let (progress, counters, done) = {
            let l = lock(&self.ledger)?;
            (l.progress(), l.counters().clone(), l.is_done())
        };
        let sync_rounds = lock(&self.sync)?.version();
        let queues = lock(&self.queues)?
            .iter()
            .map(|(w, &d)| pb::QueueDepth {
                worker_id: w.clone(),
                depth: d as u32,
            })
            .collect();
        let members = self.pool.stats();
        let s = lock(&self.stats)?;
        Ok(pb::RunStatusResponse {
            epoch: progress.epoch,
            epochs: progress.epochs,
            batches_trained: progress.total_acked,
            batches_expected: progress.expected_total,
            samples_per_sec: samples_per_sec(&s),
            student_wait_seconds: s.wait_secs,
            student_step_seconds: s.step_secs,
            members: members
                .into_iter()
                .map(|m| pb::MemberStatus {
                    mean_latency_ms: if m.requests > 0 {
                        1e3 * m.total_latency_secs / m.requests as f64
                    } else {
                        0.0
                    },
                    max_latency_ms: 1e3 * m.max_latency_secs,
                    member: m.member,
                    requests: m.requests,
                    failures: m.failures,
                    hedged_requests: m.hedged_requests,
                    hedge_wins: m.hedge_wins,
                })
                .collect(),
            queues,
            requeued_batches: counters.requeued_batches,
            retries: self.pool.retries(),
            done,
            degraded_batches: s.degraded_batches,
            resumes: self.resumes,
            sync_rounds,
            workers: s
                .per_worker
                .values()
                .map(|w| pb::WorkerSamples {
                    worker_id: w.worker_id.clone(),
                    samples: w.samples,
                    batches: w.batches,
                })
                .collect(),
        })
    }

    fn set_queue_depth(&self, worker: &Worker, depth: usize) {
        if let Ok(mut q) = self.queues.lock() {
            q.insert(worker.id.clone(), depth);
        }
    }

    /// Feeds one worker's stream: the latest averaged parameters first (a worker joining
    /// mid-run starts from them), then training batches as credits allow, with each round's
    /// average as it closes; once every batch is trained, a final round (`SyncNow`), then — for
    /// one worker — the final parameters and the test split; `Done` when the run is complete.
    pub async fn produce(
        self: Arc<Self>,
        worker: Worker,
        credits: Arc<Semaphore>,
        tx: mpsc::Sender<std::result::Result<CoordinatorMessage, tonic::Status>>,
        mut replies: mpsc::UnboundedReceiver<SyncReply>,
        start: Option<SyncReply>,
        stop: CancellationToken,
    ) {
        let mut sent_version = 0;
        if let Some(reply) = start {
            tracing::info!(%worker, version = reply.version, "sending the latest averaged parameters");
            sent_version = reply.version;
            if !self.send_reply(&tx, &reply).await {
                return;
            }
        }
        let prefetch = self.cfg.prefetch;
        let mut pending = FuturesOrdered::new();
        let mut have_credit = false;
        let mut asked_final = false;
        // The epoch whose barrier this worker was asked to help pass (a non-final round).
        let mut asked_commit: Option<u32> = None;
        loop {
            if !have_credit
                && pending.len() < prefetch
                && let Ok(p) = credits.try_acquire()
            {
                p.forget();
                have_credit = true;
            }
            if have_credit && self.may_lease() {
                let lease = match self.ledger.lock() {
                    Ok(mut l) => l.lease(&worker, Instant::now()),
                    Err(_) => return,
                };
                match lease {
                    Ok(Some(lease)) => {
                        have_credit = false;
                        pending.push_back(self.clone().prepare(lease, stop.clone()));
                        self.set_queue_depth(&worker, pending.len());
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(%worker, error = %e, "worker can no longer lease");
                        let _ = tx.send(Err(Error::Stale(e.to_string()).into())).await;
                        return;
                    }
                }
            }
            let (trained, awaiting, epoch) = match self.ledger.lock() {
                Ok(l) => (l.is_done(), l.awaiting_commit(), l.progress().epoch),
                Err(_) => return,
            };
            if awaiting && pending.is_empty() && asked_commit != Some(epoch) {
                // Every batch of the epoch is acked but not all are averaged yet: a round now
                // (every worker takes part, so it closes at once) lets the barrier pass.
                asked_commit = Some(epoch);
                let msg = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::SyncNow(pb::SyncNow {
                        r#final: false,
                    })),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            if trained && pending.is_empty() {
                if !self.sync_enabled() {
                    break;
                }
                let (finished, all_final) = match self.sync.lock() {
                    Ok(s) => (s.is_finished(&worker.id), s.all_final()),
                    Err(_) => return,
                };
                if all_final {
                    break;
                }
                if !finished && !asked_final {
                    asked_final = true;
                    let msg = CoordinatorMessage {
                        kind: Some(coordinator_message::Kind::SyncNow(pb::SyncNow {
                            r#final: true,
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(reply) = replies.recv() => {
                    sent_version = reply.version;
                    if !self.send_reply(&tx, &reply).await {
                        return;
                    }
                }
                Some(batch) = pending.next(), if !pending.is_empty() => {
                    self.set_queue_depth(&worker, pending.len());
                    match batch {
                        Ok(msg) => {
                            if let Ok(mut s) = self.stats.lock() {
                                s.first_send.get_or_insert_with(Instant::now);
                            }
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                        // The lease will expire and the batch go to the next asker.
                        Err(e) => tracing::warn!(%worker, error = %e, "could not prepare a batch"),
                    }
                }
                p = credits.acquire(), if !have_credit && pending.len() < prefetch => {
                    if let Ok(p) = p {
                        p.forget();
                        have_credit = true;
                    }
                }
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        // Trained: one worker evaluates the final student; the others wait for the report, and
        // take over the evaluation if the evaluating worker leaves first.
        loop {
            let claimed = match self.evaluator.lock() {
                Ok(mut e) if e.is_none() && !self.finished.is_cancelled() => {
                    *e = Some(worker.clone());
                    true
                }
                Ok(_) => false,
                Err(_) => return,
            };
            if claimed {
                if !self.evaluate_on(&worker, &tx, sent_version).await {
                    return;
                }
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.finished.cancelled() => break,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let _ = tx
            .send(Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Done(pb::Done {
                    reason: "complete".into(),
                })),
            }))
            .await;
    }

    /// Whether batches may be leased: once `min_workers` streams were open at one time.
    fn may_lease(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.started_leasing.load(Relaxed) {
            return true;
        }
        let open = self.outboxes.lock().map(|o| o.len()).unwrap_or(0);
        if open >= self.cfg.min_workers {
            tracing::info!(workers = open, "enough workers joined; training starts");
            self.started_leasing.store(true, Relaxed);
            true
        } else {
            false
        }
    }

    /// Sends averaged parameters; false when the stream is gone.
    async fn send_reply(
        &self,
        tx: &mpsc::Sender<std::result::Result<CoordinatorMessage, tonic::Status>>,
        reply: &SyncReply,
    ) -> bool {
        if let Ok(mut s) = self.stats.lock() {
            s.down_bytes += reply.value_bytes();
        }
        for msg in reply.messages() {
            if tx.send(Ok(msg)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Sends the final parameters (when the worker does not hold them yet) and the test split
    /// to the evaluating worker; false when the stream is gone (`worker_gone` then frees the
    /// evaluation for another worker).
    async fn evaluate_on(
        &self,
        worker: &Worker,
        tx: &mpsc::Sender<std::result::Result<CoordinatorMessage, tonic::Status>>,
        sent_version: u64,
    ) -> bool {
        let latest = if self.sync_enabled() {
            self.sync.lock().ok().and_then(|s| s.latest())
        } else {
            None
        };
        if let Some((version, params)) = latest
            && version != sent_version
        {
            let reply = match self.chunk(&params) {
                Ok(g) => SyncReply {
                    version,
                    groups: Some(Arc::new(g)),
                    contributors: 0,
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode the final parameters");
                    return false;
                }
            };
            if !self.send_reply(tx, &reply).await {
                return false;
            }
        }
        tracing::info!(%worker, rows = self.data.test.len(), "training complete; sending the test split for evaluation");
        let n = self.data.test.len();
        let step = self.cfg.batch_size.max(256);
        for start in (0..n).step_by(step) {
            let idx: Vec<usize> = (start..(start + step).min(n)).collect();
            let msg = match self.inputs_and_labels(&self.data.test, &idx) {
                Ok((inputs, labels)) => CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Eval(pb::EvalBatch {
                        inputs: Some(inputs.into()),
                        labels: Some(labels.into()),
                    })),
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot build an evaluation batch");
                    return false;
                }
            };
            if tx.send(Ok(msg)).await.is_err() {
                return false;
            }
        }
        true
    }

    fn inputs_and_labels(
        &self,
        split: &distill_core::data::Split,
        idx: &[usize],
    ) -> Result<(HostTensor, HostTensor)> {
        let mut shape = vec![idx.len()];
        shape.extend(&self.data.input_shape);
        let inputs = match split.rows_u8(idx) {
            Some(bytes) => HostTensor::new(shape, DType::U8, bytes),
            None => HostTensor::from_f32(shape, &split.rows_f32(idx)),
        }
        .map_err(|e| Error::Internal(e.to_string()))?;
        let labels: Vec<u8> = split
            .labels(idx)
            .iter()
            .flat_map(|&y| i64::from(y).to_le_bytes())
            .collect();
        let labels = HostTensor::new(vec![idx.len()], DType::I64, labels)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok((inputs, labels))
    }

    /// Every member's tempered logits for `inputs`, waiting for a member that is down (the
    /// `wait` policy) until `stop`.
    async fn member_logits(
        &self,
        inputs: &HostTensor,
        temperature: f32,
        stop: &CancellationToken,
    ) -> Result<Vec<Vec<f32>>> {
        let (logits, _) = self
            .answering_members(inputs, temperature, stop, TeacherPolicy::Wait)
            .await?;
        Ok(logits)
    }

    /// The tempered logits of the members that answer, with their indices. Under `wait` that
    /// is every member (a member that is down is waited for, with backoff, until `stop`); under
    /// `degrade` it is the members that answered, as long as one did.
    async fn answering_members(
        &self,
        inputs: &HostTensor,
        temperature: f32,
        stop: &CancellationToken,
        policy: TeacherPolicy,
    ) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
        let mut backoff = Duration::from_millis(100);
        let changed = self.pool.registry().changed();
        loop {
            // Armed before the requests, so a replica that joins (or comes back) meanwhile
            // ends the wait below at once.
            let membership_changed = changed.notified();
            tokio::pin!(membership_changed);
            membership_changed.as_mut().enable();
            let calls =
                (0..self.pool.members.len()).map(|m| self.pool.infer(m, inputs, temperature));
            let results = futures::future::join_all(calls).await;
            if let Some(Err(e @ Error::TeacherRejected { .. })) = results
                .iter()
                .find(|r| matches!(r, Err(Error::TeacherRejected { .. })))
                .map(|r| r.as_ref().map(|_| ()).map_err(clone_rejection))
            {
                return Err(e);
            }
            let answered: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
            let degrade = policy == TeacherPolicy::Degrade && !answered.is_empty();
            if answered.len() == results.len() || degrade {
                let mut logits = Vec::with_capacity(answered.len());
                for r in results.into_iter().flatten() {
                    logits.push(r);
                }
                return Ok((logits, answered));
            }
            match results.into_iter().find_map(|r| r.err()) {
                None => return Err(Error::Internal("no member answered".into())),
                Some(e) => {
                    tracing::warn!(error = %e, ?backoff, policy = ?policy, "teacher members are down; waiting for them");
                    tokio::select! {
                        _ = stop.cancelled() => return Err(Error::ShuttingDown),
                        _ = tokio::time::sleep(backoff) => {}
                        _ = membership_changed => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Builds one training batch: inputs, labels and the ensemble's soft targets — from the
    /// soft-target cache when it holds every row of the batch, else from the teachers (and then
    /// written to the cache).
    async fn prepare(
        self: Arc<Self>,
        lease: Lease,
        stop: CancellationToken,
    ) -> Result<CoordinatorMessage> {
        let (inputs, labels) = self.inputs_and_labels(&self.data.train, &lease.samples)?;
        let t = self.cfg.temperature as f32;
        let rows = lease.samples.len();
        let classes = self.data.classes;
        let encoding = self.cfg.soft_targets;
        let cache = self.cache.get().cloned();
        let cached = match &cache {
            Some(c) => {
                let (c, samples) = (c.clone(), lease.samples.clone());
                tokio::task::spawn_blocking(move || c.cache.get_batch(&c.key, &samples))
                    .await
                    .map_err(|e| Error::Internal(format!("cache task: {e}")))??
            }
            None => None,
        };
        let mut contributors: Option<Vec<String>> = None;
        let (bytes, from_cache) = match cached {
            Some(bytes) => (bytes, true),
            None => {
                if cache.as_ref().is_some_and(|c| c.offline) {
                    return Err(Error::Internal(format!(
                        "offline run: the cache has no soft targets for {}",
                        lease.batch
                    )));
                }
                let (logits, answered) = self
                    .answering_members(&inputs, t, &stop, self.cfg.teacher_policy)
                    .await?;
                let weights: Vec<f32> = answered
                    .iter()
                    .map(|&i| self.pool.members[i].weight)
                    .collect();
                if answered.len() < self.pool.members.len() {
                    contributors = Some(
                        answered
                            .iter()
                            .map(|&i| self.pool.members[i].name.clone())
                            .collect(),
                    );
                }
                let mode = self.cfg.combine;
                let bytes = tokio::task::spawn_blocking(move || {
                    let probs = combine_host(&logits, rows, classes, &weights, mode)?;
                    encode_targets(&probs, rows, classes, encoding)
                })
                .await
                .map_err(|e| Error::Internal(format!("soft-target task: {e}")))??;
                // Degraded targets are not the ensemble's: they never go into the cache.
                if let Some(c) = cache.filter(|c| !c.cache.is_read_only() && contributors.is_none())
                {
                    let (samples, b) = (lease.samples.clone(), bytes.clone());
                    tokio::task::spawn_blocking(move || c.cache.put_batch(&c.key, &samples, &b))
                        .await
                        .map_err(|e| Error::Internal(format!("cache task: {e}")))??;
                }
                (bytes, false)
            }
        };
        if let Ok(mut s) = self.stats.lock() {
            let e = lease.batch.epoch as usize;
            if s.teacher_batches.len() <= e {
                s.teacher_batches.resize(e + 1, 0);
                s.cached_batches.resize(e + 1, 0);
            }
            if from_cache {
                s.cached_batches[e] += 1;
            } else {
                s.teacher_batches[e] += 1;
            }
            if contributors.is_some() {
                s.degraded_batches += 1;
            }
        }
        if let Some(c) = &contributors {
            tracing::warn!(batch = %lease.batch, members = ?c, "degraded batch: soft targets from the members that answered");
        }
        let (soft_targets, topk_targets) = target_fields(bytes, rows, classes, encoding)?;
        Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Train(pb::TrainBatch {
                lease_id: lease.id,
                epoch: lease.batch.epoch,
                index: lease.batch.index,
                inputs: Some(inputs.into()),
                labels: Some(labels.into()),
                soft_targets,
                temperature: t,
                members: contributors.unwrap_or_else(|| self.member_names()),
                topk_targets,
                encoding: encoding.to_string(),
                cached: from_cache,
            })),
        })
    }

    /// Names of the members whose answers make the soft targets (from the cache key in an
    /// offline run).
    fn member_names(&self) -> Vec<String> {
        match self.cache.get() {
            Some(c) if c.offline => c.key.members.iter().map(|m| m.name.clone()).collect(),
            _ => self.pool.members.iter().map(|m| m.name.clone()).collect(),
        }
    }

    /// Asks every member for the test split at T = 1 and counts each one's errors and the
    /// ensemble's.
    pub async fn evaluate_teachers(self: Arc<Self>, stop: CancellationToken) -> Result<()> {
        let n = self.data.test.len();
        let classes = self.data.classes;
        let members = self.pool.members.len();
        let weights: Vec<f32> = self.pool.members.iter().map(|m| m.weight).collect();
        let mut errors = vec![0u64; members];
        let mut ensemble = 0u64;
        for start in (0..n).step_by(1000) {
            let idx: Vec<usize> = (start..(start + 1000).min(n)).collect();
            let (inputs, _) = self.inputs_and_labels(&self.data.test, &idx)?;
            let labels = self.data.test.labels(&idx);
            let logits = self.member_logits(&inputs, 1.0, &stop).await?;
            for (m, z) in logits.iter().enumerate() {
                errors[m] += count_errors(z, &labels, classes);
            }
            let (w, mode, rows) = (weights.clone(), self.cfg.combine, idx.len());
            let probs =
                tokio::task::spawn_blocking(move || combine_host(&logits, rows, classes, &w, mode))
                    .await
                    .map_err(|e| Error::Internal(format!("ensemble task: {e}")))??;
            ensemble += count_errors(&probs, &labels, classes);
        }
        let per_member = self
            .pool
            .members
            .iter()
            .zip(errors)
            .map(|(m, e)| TeacherErrors {
                member: m.name.clone(),
                test_errors: e,
            })
            .collect::<Vec<_>>();
        tracing::info!(teachers = ?per_member, ensemble, test_size = n, "teacher test errors");
        *lock(&self.teacher_eval)? = Some((per_member, ensemble));
        Ok(())
    }

    /// The evaluating worker reported: keep its checkpoint, write `report.json`, end the run.
    pub fn finish(&self, worker: &Worker, result: &pb::EvalResult) -> Result<RunReport> {
        if lock(&self.evaluator)?.as_ref() != Some(worker) {
            return Err(Error::InvalidArgument(format!(
                "{worker} sent an evaluation result but was not asked to evaluate"
            )));
        }
        let ck = distill_core::checkpoint::Checkpoint::from_bytes(&result.checkpoint_bytes)
            .map_err(|e| Error::InvalidArgument(format!("final checkpoint from {worker}: {e}")))?;
        let student_path = self.cfg.run_dir.join("student.safetensors");
        ck.save(&student_path)?;
        let (progress, counters) = {
            let l = lock(&self.ledger)?;
            (l.progress(), l.counters().clone())
        };
        let (rounds, (round_secs, up_bytes)) = {
            let sy = lock(&self.sync)?;
            (sy.version(), sy.totals())
        };
        let (teachers, ensemble) = match lock(&self.teacher_eval)?.clone() {
            Some((t, e)) => (t, Some(e)),
            None => (Vec::new(), None),
        };
        let s = lock(&self.stats)?;
        let total = s.wait_secs + s.step_secs;
        let per_round = |x: f64| if rounds > 0 { x / rounds as f64 } else { 0.0 };
        let report = RunReport {
            data: self.data.source.clone(),
            student_arch: self.settings.spec.arch.to_string(),
            temperature: self.cfg.temperature,
            alpha: self.cfg.alpha,
            teachers,
            ensemble_test_errors: ensemble,
            baseline_student_test_errors: None,
            student_test_errors: result.errors,
            test_size: result.total,
            epochs: self.cfg.epochs,
            samples_per_sec: samples_per_sec(&s),
            batches_trained: progress.total_acked,
            batches_expected: progress.expected_total,
            student_wait_seconds: s.wait_secs,
            student_step_seconds: s.step_secs,
            student_wait_fraction: if total > 0.0 {
                s.wait_secs / total
            } else {
                0.0
            },
            requeued_batches: counters.requeued_batches,
            retries: self.pool.retries(),
            degraded_batches: s.degraded_batches,
            resumes: self.resumes,
            members: self.pool.stats(),
            run_seconds: self.started.elapsed().as_secs_f64(),
            student_checkpoint: student_path,
            workers: s.per_worker.values().cloned().collect(),
            sync: SyncReport {
                every: self.cfg.sync.every,
                dtype: format!("{:?}", self.cfg.sync.dtype).to_lowercase(),
                rounds,
                mean_round_seconds: per_round(round_secs),
                mean_bytes_per_round: per_round((up_bytes + s.down_bytes) as f64),
                worker_sync_seconds: s.sync_secs,
            },
            teacher_batches_per_epoch: s.teacher_batches.clone(),
            cached_batches_per_epoch: s.cached_batches.clone(),
            cache: self.cache.get().map(|c| {
                let st = c.cache.stats();
                CacheReport {
                    dir: self
                        .cfg
                        .cache
                        .as_ref()
                        .map(|c| c.dir.clone())
                        .unwrap_or_default(),
                    mode: self
                        .cfg
                        .cache
                        .as_ref()
                        .map(|c| c.mode.as_str().to_string())
                        .unwrap_or_default(),
                    key: c.key.digest(),
                    hit_rows: st.hit_rows,
                    missed_rows: st.missed_rows,
                    rows_written: st.rows_written,
                }
            }),
        };
        drop(s);
        write_report(&self.cfg.run_dir, &report)?;
        *lock(&self.report)? = Some(report.clone());
        tracing::info!(
            student_test_errors = report.student_test_errors,
            test_size = report.test_size,
            batches = report.batches_trained,
            "run complete"
        );
        self.finished.cancel();
        Ok(report)
    }
}

/// What a `SyncUp` run says besides the parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContributionHeader {
    /// The averaged version the worker last took.
    pub base_version: u64,
    /// Rows trained since.
    pub samples: u64,
    /// Sent in answer to `SyncNow`.
    pub is_final: bool,
    /// Parameter bytes it carried.
    pub wire_bytes: u64,
}

/// Encodes combined probabilities (`rows × classes`) in `encoding`, row after row
/// ([`distill_core::soft_targets::encode`]).
pub fn encode_targets(
    probs: &[f32],
    rows: usize,
    classes: usize,
    encoding: SoftTargetEncoding,
) -> Result<Vec<u8>> {
    Ok(distill_core::soft_targets::encode(
        probs, rows, classes, encoding,
    )?)
}

/// The batch's soft-target fields for encoded rows: a dense tensor of the encoding's element
/// type, or the top-k message.
pub fn target_fields(
    bytes: Vec<u8>,
    rows: usize,
    classes: usize,
    encoding: SoftTargetEncoding,
) -> Result<(Option<pb::Tensor>, Option<pb::TopKTargets>)> {
    use distill_core::elem::Float;
    match (encoding.dense(), encoding) {
        (Some(f), _) => {
            let dtype = match f {
                Float::F32 => DType::F32,
                Float::F16 => DType::F16,
                Float::Bf16 => DType::BF16,
            };
            let t = HostTensor::new(vec![rows, classes], dtype, bytes)
                .map_err(|e| Error::Internal(e.to_string()))?;
            Ok((Some(t.into()), None))
        }
        (None, SoftTargetEncoding::TopK(k)) => Ok((
            None,
            Some(pb::TopKTargets {
                k: k as u32,
                classes: classes as u32,
                value_dtype: pb::DType::DtypeF16 as i32,
                data: bytes,
            }),
        )),
        (None, other) => Err(Error::Internal(format!(
            "soft-target encoding {other} is neither dense nor top-k"
        ))),
    }
}

fn clone_rejection(e: &Error) -> Error {
    match e {
        Error::TeacherRejected { member, msg } => Error::TeacherRejected {
            member: member.clone(),
            msg: msg.clone(),
        },
        other => Error::Internal(other.to_string()),
    }
}

/// Writes `report.json` into `dir` atomically.
pub fn write_report(dir: &std::path::Path, report: &RunReport) -> Result<()> {
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::Internal(format!("report to JSON: {e}")))?;
    distill_core::fsutil::atomic_write(&dir.join("report.json"), &json)?;
    Ok(())
}

fn samples_per_sec(s: &Stats) -> f64 {
    match (s.first_send, s.last_ack) {
        (Some(a), Some(b)) if b > a => s.samples as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    }
}

fn count_errors(scores: &[f32], labels: &[u32], classes: usize) -> u64 {
    scores
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, y)| {
            let best = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                    if v > b.1 { (i, v) } else { b }
                });
            best.0 != **y as usize
        })
        .count() as u64
}

/// Combines members' tempered logits (each `rows × classes`) into probabilities with
/// [`distill_core::kd::combine`].
fn combine_host(
    logits: &[Vec<f32>],
    rows: usize,
    classes: usize,
    weights: &[f32],
    mode: distill_core::kd::Combine,
) -> Result<Vec<f32>> {
    let tensors = logits
        .iter()
        .map(|z| Tensor::from_slice(z, (rows, classes), &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(distill_core::Error::from)?;
    let p = distill_core::kd::combine(&tensors, weights, mode)?;
    Ok(p.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(distill_core::Error::from)?)
}

fn log_events(events: &[LedgerEvent]) {
    for e in events {
        match e {
            LedgerEvent::LeaseExpired { .. }
            | LedgerEvent::LeaseReleased { .. }
            | LedgerEvent::RollbackIncomplete { .. } => {
                tracing::warn!(event = ?e, "ledger")
            }
            _ => tracing::info!(event = ?e, "ledger"),
        }
    }
}
