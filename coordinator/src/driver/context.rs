//! A prepared run: its config, data, teacher pool, soft-target cache and stored state, ready to
//! be served ([`crate::serve`]). Built by [`crate::prepare`].

use std::sync::Arc;
use std::time::Duration;

use distill_core::data::Dataset;
use distill_core::settings::StudentSettings;

use crate::config::{RunConfig, SyncAverage, SyncSchedule};
use crate::domain::gradient_step::GradientStep;
use crate::domain::ledger::{Ledger, LedgerConfig};
use crate::domain::membership::{Membership, SequenceData};
use crate::domain::rounds::SyncRounds;
use crate::domain::run_state::{RunSettings, RunState};
use crate::error::{Error, Result};
use crate::membership::MembershipHandle;
use crate::security::Security;
use crate::store::RunDirLock;
use crate::store::cache::{CacheKey, CacheKeyInfo, CacheMode, SoftTargetCache};
use crate::store::member_records::{self, MemberRecord, RecordFormat};
use crate::store::run_store::{RunStore, STATE_FILE};
use crate::teachers::TeacherPool;

/// Most credits a worker may hold (its prefetch window is capped at this).
pub const MAX_CREDITS: u32 = 1024;

/// A batch whose preparation fails this many times ends the run.
pub const MAX_BATCH_FAILURES: u32 = 3;

/// Checkpoint metadata key of the stored average: the round the parameters come from.
pub const KEY_SYNC_VERSION: &str = "distill.sync.version";

/// The run's soft-target cache and where in it the run's soft targets come from.
#[derive(Clone)]
pub struct RunCache {
    /// The cache.
    pub cache: SoftTargetCache,
    /// The keys this run reads (and writes).
    pub targets: CachedTargets,
    /// No teachers: every batch must come from the cache.
    pub offline: bool,
}

impl RunCache {
    /// The keys' digests, comma-separated (for the report).
    pub fn digests(&self) -> String {
        match &self.targets {
            CachedTargets::Combined(k) | CachedTargets::Windows(k) => k.digest(),
            CachedTargets::Members(slots) => slots
                .iter()
                .map(|s| s.key.digest())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// Which keys of the cache a run uses.
#[derive(Clone, Debug)]
pub enum CachedTargets {
    /// Combined soft targets under one key: what caches held before member records. Only an
    /// offline run reads them (nothing writes them any more).
    Combined(CacheKey),
    /// One record per member, in the order of the run's members (of the pool, when the run has
    /// teachers).
    Members(Vec<MemberSlot>),
    /// A language model's windows: the one member's top-k rows (f16 values) at every position
    /// of a window, concatenated (`L` rows per sample), at the run's T.
    Windows(CacheKey),
}

/// One member's record in a run.
#[derive(Clone, Debug)]
pub struct MemberSlot {
    /// Member name.
    pub name: String,
    /// Its weight in the combination.
    pub weight: f32,
    /// Its record.
    pub record: MemberRecord,
    /// The record's key (computed once).
    pub key: CacheKey,
}

/// What every task of a run shares, read-only.
pub struct RunContext {
    /// The resolved config.
    pub cfg: RunConfig,
    /// What the workers train with.
    pub settings: StudentSettings,
    /// The same, as the JSON a worker is sent.
    pub settings_json: String,
    /// The data set.
    pub data: Arc<Dataset>,
    /// The teacher ensemble.
    pub pool: Arc<TeacherPool>,
    /// The soft-target cache, when the run has one.
    pub cache: Option<RunCache>,
    /// Names and shapes of the student's parameters, in model order.
    pub param_shapes: Vec<(String, Vec<usize>)>,
    /// Batches per epoch.
    pub batches_per_epoch: u64,
    /// What the server presents and accepts, and how the teachers are dialled.
    pub security: Security,
}

impl RunContext {
    /// Whether the run has no teachers (offline from a cache).
    pub fn is_offline(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.offline)
    }

    /// Names of the members whose answers make the soft targets (from the cache key in an
    /// offline run).
    pub fn member_names(&self) -> Vec<String> {
        match &self.cache {
            Some(RunCache {
                offline: true,
                targets,
                ..
            }) => match targets {
                CachedTargets::Combined(k) | CachedTargets::Windows(k) => {
                    k.members.iter().map(|m| m.name.clone()).collect()
                }
                CachedTargets::Members(slots) => slots.iter().map(|s| s.name.clone()).collect(),
            },
            _ => self.pool.members.iter().map(|m| m.name.clone()).collect(),
        }
    }
}

/// A run ready to serve: its context, its state and its store.
pub struct Run {
    /// What the run's tasks share.
    pub ctx: Arc<RunContext>,
    pub(crate) state: RunState,
    pub(crate) store: Arc<RunStore>,
    pub(crate) _lock: RunDirLock,
}

impl Run {
    /// Builds the run on loaded `data`: locks the run directory, writes the resolved config,
    /// prepares the ledger, the rounds and the teacher clients, and resumes from the stored
    /// state when the run directory has one. The cache is opened by [`Run::open_cache`].
    pub fn new(cfg: RunConfig, data: Dataset, security: Security) -> Result<Self> {
        cfg.validate()?;
        let mut settings = cfg.student_settings()?;
        if let Some(init) = settings.init.as_mut() {
            // The digest every role checks the initial weights it reads against.
            let (_, tensors) = distill_core::lm::read_parts(
                &init.path,
                init.layers.as_deref(),
                &candle_core::Device::Cpu,
            )
            .map_err(|e| Error::Config(format!("`student.init`: {e}")))?;
            init.digest = distill_core::lm::weights_digest(&tensors)?;
            tracing::info!(init = %init.path.display(), layers = ?init.layers, digest = %init.digest, "student initialised from a model file");
        }
        let classes = settings.spec.arch.classes();
        let is_llama = settings.spec.arch.llama().is_some();
        if is_llama != data.tokens.is_some() {
            return Err(Error::Config(format!(
                "`student.arch`: {} {} but {} {}",
                settings.spec.arch,
                if is_llama {
                    "is a language model"
                } else {
                    "is not a language model"
                },
                data.source,
                if is_llama {
                    "is not a token source (text:PATH or grammar[:SEED])"
                } else {
                    "holds token windows"
                }
            )));
        }
        if let (Some(cfg), Some(t)) = (settings.spec.arch.llama(), &data.tokens)
            && t.seq_len > cfg.max_position_embeddings
        {
            return Err(Error::Config(format!(
                "`lm.seq_len` {} is longer than the student's {} positions",
                t.seq_len, cfg.max_position_embeddings
            )));
        }
        if classes != data.classes
            || (!is_llama && settings.spec.arch.input_size() != data.row_len())
        {
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
        let ledger = Ledger::new(LedgerConfig {
            samples: data.train.len(),
            batch_size: cfg.batch_size,
            epochs: cfg.epochs,
            seed: cfg.seed,
            lease_timeout: secs(cfg.lease_timeout_secs, "lease_timeout_secs")?,
            hold_for_commit: cfg.sync.every > 0,
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        for m in &cfg.members {
            for e in m.static_endpoints() {
                security
                    .teachers
                    .check_url(e)
                    .map_err(|err| Error::Config(format!("`members` `{}`: {err}", m.name)))?;
            }
        }
        let mut membership = Membership::new(
            cfg.membership.to_config(cfg.seed),
            cfg.members.iter().map(|m| {
                (
                    m.name.clone(),
                    m.static_endpoints().cloned().collect::<Vec<_>>(),
                )
            }),
        )
        .map_err(|e| Error::Config(format!("`members`: {e}")))?;
        for m in &cfg.members {
            membership
                .trust(&m.name, m.trusted.iter().cloned())
                .map_err(|e| Error::Config(format!("`members` `{}` `trusted`: {e}", m.name)))?;
        }
        match &data.tokens {
            // Sequence members are asked for windows' inputs (L tokens) and checked against
            // the data's tokenizer and vocabulary.
            Some(t) => membership.expect_sequences(SequenceData {
                vocab: u32::try_from(data.classes)
                    .map_err(|_| Error::Config("a vocabulary over 2^32".into()))?,
                tokenizer_digest: t.tokenizer_digest.clone(),
                seq_len: u32::try_from(t.seq_len)
                    .map_err(|_| Error::Config("`lm.seq_len` over 2^32".into()))?,
            }),
            None => membership.expect_model(data.row_len() as u64, data.classes as u32),
        }
        let pool = TeacherPool::new(
            &cfg.members,
            MembershipHandle::new(membership),
            secs(cfg.teacher_timeout_secs, "teacher_timeout_secs")?,
            cfg.max_message_bytes(),
        )?
        .with_security(security.teachers.clone());
        // Sequence members take no registrations on trial, so they need no canary rows.
        let pool = match &data.tokens {
            Some(_) => pool,
            None => pool.with_canary(canary_rows(&data)?),
        };
        // The lock comes first: nothing is written into a run directory another coordinator
        // is using.
        let lock = RunDirLock::acquire(&cfg.run_dir)?;
        let resolved =
            toml::to_string(&cfg).map_err(|e| Error::Internal(format!("config to TOML: {e}")))?;
        distill_core::fsutil::atomic_write(&cfg.run_dir.join("config.toml"), resolved.as_bytes())?;
        let store = Arc::new(RunStore::open(&cfg.run_dir)?);
        let mut momentum = None;
        let mut optimizer = None;
        let restored = match store.load()? {
            Some(stored) => {
                optimizer = stored.optimizer;
                let (saved, average) = (stored.snapshot, stored.average);
                if let Some(bytes) = stored.momentum {
                    let ck =
                        distill_core::checkpoint::Checkpoint::from_bytes(&bytes).map_err(|e| {
                            Error::Store(format!(
                                "{}: the stored outer momentum: {e}",
                                store.path().display()
                            ))
                        })?;
                    momentum = Some(Arc::new(ck.params));
                }
                let average = match (saved.sync_version, average) {
                    (v, Some(bytes)) if v > 0 => {
                        let ck = distill_core::checkpoint::Checkpoint::from_bytes(&bytes).map_err(
                            |e| {
                                Error::Store(format!(
                                    "{}: the stored average: {e}",
                                    store.path().display()
                                ))
                            },
                        )?;
                        Some((v, Arc::new(ck.params)))
                    }
                    _ => None,
                };
                Some((saved, average))
            }
            None => None,
        };
        let rounds = SyncRounds::new(
            secs(cfg.sync.round_timeout_secs, "sync.round_timeout_secs")?,
            None,
        )
        .with_outer_lr(cfg.sync.outer_lr)
        .with_outer_momentum(cfg.sync.outer_momentum);
        let mut rounds = rounds;
        rounds.restore_momentum(momentum);
        if cfg.sync.average == SyncAverage::Gradients {
            let batches_per_epoch = data.train.len().div_ceil(cfg.batch_size.max(1)) as u64;
            let (step, initial) = GradientStep::new(&settings, batches_per_epoch, cfg.min_workers)
                .map_err(Error::Config)?;
            rounds = rounds.with_gradient_step(step, Arc::new(initial));
            if let Some(bytes) = &optimizer {
                rounds.restore_optimizer(bytes).map_err(|e| {
                    Error::Store(format!(
                        "{}: the stored optimizer state: {e}",
                        store.path().display()
                    ))
                })?;
            }
        }
        let run_settings = RunSettings {
            train_rows: data.train.len(),
            batch_size: cfg.batch_size,
            prefetch: cfg.prefetch,
            min_workers: cfg.min_workers,
            rounds: cfg.sync.every > 0,
            fixed_every: (cfg.sync.every > 0 && cfg.sync.schedule == SyncSchedule::Fixed)
                .then_some(cfg.sync.every),
            persist_every: secs(cfg.sync.state_every_secs, "sync.state_every_secs")?,
            eval_timeout: secs(cfg.eval_timeout_secs, "eval_timeout_secs")?,
            eval_every_epoch: cfg.eval_every_epoch,
            max_batch_failures: MAX_BATCH_FAILURES,
            max_credits: MAX_CREDITS,
            join_hold: secs(cfg.hello_timeout_secs, "hello_timeout_secs")?,
            settings_json: settings_json.clone(),
        };
        let state = RunState::new(run_settings, ledger, rounds, restored).map_err(|e| {
            Error::Config(format!(
                "{}: {e}; move it away to start afresh",
                cfg.run_dir.join(STATE_FILE).display()
            ))
        })?;
        if state.resumes() > 0 {
            let p = state.ledger().progress();
            tracing::warn!(
                resumes = state.resumes(),
                batches_trained = p.total_acked,
                epoch = p.epoch,
                "resuming the run from its stored state"
            );
        }
        let param_shapes = settings.spec.arch.param_shapes();
        let batches_per_epoch = state.batches_per_epoch();
        Ok(Self {
            ctx: Arc::new(RunContext {
                cfg,
                settings,
                settings_json,
                data: Arc::new(data),
                pool: Arc::new(pool),
                cache: None,
                param_shapes,
                batches_per_epoch,
                security,
            }),
            state,
            store,
            _lock: lock,
        })
    }

    /// Opens the soft-target cache of the config, if any, and picks the run's records in it
    /// (see [`member_records`]): for each member (named with its weights digest, `digests`,
    /// from its replicas' Describe), the record at the run's T if there is one, else the one
    /// with the most rows at any T, else a new one at the run's T. An offline run (no teachers)
    /// takes complete records: those of the members it names, or of every member the cache
    /// holds; failing that, a complete combined-target key of an older cache for this data, T,
    /// combination and encoding.
    pub fn open_cache(&mut self, digests: &[Option<String>]) -> Result<()> {
        let ctx = &self.ctx;
        let Some(cc) = &ctx.cfg.cache else {
            return Ok(());
        };
        let cache = SoftTargetCache::open_config(cc)?;
        let classes = ctx.data.classes;
        let format = cc.record.unwrap_or_else(|| RecordFormat::auto(classes));
        format
            .check(classes)
            .map_err(|e| Error::Config(format!("`cache.record`: {e}")))?;
        let offline = cc.mode == CacheMode::Offline;
        let keys = cache.keys()?;
        let targets = if let Some(tokens) = &ctx.data.tokens {
            let Some(key) = window_key(ctx, tokens, digests)? else {
                tracing::warn!(
                    "the member told no weights digest; the soft-target cache is off for this run"
                );
                return Ok(());
            };
            CachedTargets::Windows(key)
        } else if offline {
            offline_targets(ctx, &cache, &keys)?
        } else {
            let t = ctx.cfg.temperature as f32;
            let data = &ctx.data;
            let mut slots = Vec::new();
            for (m, d) in ctx.pool.members.iter().zip(digests) {
                let Some(d) = d else {
                    tracing::warn!(member = %m.name, "no replica told its weights digest; the soft-target cache is off for this run");
                    return Ok(());
                };
                let found = member_records::records_for(&keys, &data.source, data.train.len())
                    .filter(|(r, _)| r.member == m.name && &r.identity == d && r.format == format)
                    .max_by(|(a, ka), (b, kb)| {
                        let at_t = |r: &MemberRecord| r.capture_temperature == t;
                        (at_t(a), ka.rows).cmp(&(at_t(b), kb.rows))
                    })
                    .map(|(r, _)| r);
                let record = found.unwrap_or_else(|| MemberRecord {
                    data: data.source.clone(),
                    train_size: data.train.len(),
                    member: m.name.clone(),
                    identity: d.clone(),
                    capture_temperature: t,
                    format,
                    classes,
                });
                slots.push(MemberSlot {
                    name: m.name.clone(),
                    weight: m.weight,
                    key: record.key(),
                    record,
                });
            }
            CachedTargets::Members(slots)
        };
        let description = match &targets {
            CachedTargets::Combined(k) | CachedTargets::Windows(k) => {
                k.validate()?;
                k.description()
            }
            CachedTargets::Members(slots) => {
                for s in slots {
                    s.key.validate()?;
                }
                slots
                    .iter()
                    .map(|s| s.key.description())
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        tracing::info!(cache = %cache.path().display(), keys = %description, offline, "soft-target cache open");
        let ctx = Arc::get_mut(&mut self.ctx)
            .ok_or_else(|| Error::Internal("the run context is shared before serving".into()))?;
        ctx.cache = Some(RunCache {
            cache,
            targets,
            offline,
        });
        Ok(())
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        self.state.batches_per_epoch()
    }
}

/// The cache key of a language model's windows: everything a window's rows depend on — the
/// corpus and how it was cut (source, `[lm]` options, tokenizer), the member's weights, T
/// and the top-k encoding per position. None when the member told no weights digest.
fn window_key(
    ctx: &RunContext,
    tokens: &distill_core::data::tokens::TokenInfo,
    digests: &[Option<String>],
) -> Result<Option<CacheKey>> {
    let (Some(member), Some(Some(digest))) = (ctx.pool.members.first(), digests.first()) else {
        return Ok(None);
    };
    let lm = ctx.cfg.lm_options().unwrap_or_default();
    let per_position = ctx.cfg.soft_targets.row_bytes(ctx.data.classes)?;
    let row_bytes = per_position
        .checked_mul(tokens.seq_len)
        .ok_or_else(|| Error::Config("`lm.seq_len`: a window's rows overflow".into()))?;
    Ok(Some(CacheKey {
        data: format!(
            "{} seq_len={} validation={} sentences={} tokenizer={}",
            ctx.data.source,
            tokens.seq_len,
            lm.validation_fraction,
            lm.sentences,
            tokens.tokenizer_digest
        ),
        train_size: ctx.data.train.len(),
        members: vec![crate::store::cache::MemberIdentity {
            name: member.name.clone(),
            weights_digest: digest.clone(),
            weight: member.weight,
        }],
        temperature: ctx.cfg.temperature as f32,
        combine: ctx.cfg.combine,
        encoding: format!("{}/f16 x{} positions", ctx.cfg.soft_targets, tokens.seq_len),
        row_bytes,
    }))
}

/// Where an offline run's soft targets come from (see [`Run::open_cache`]).
fn offline_targets(
    ctx: &RunContext,
    cache: &SoftTargetCache,
    keys: &[CacheKeyInfo],
) -> Result<CachedTargets> {
    let data = &ctx.data;
    let complete: Vec<(MemberRecord, &CacheKeyInfo)> =
        member_records::records_for(keys, &data.source, data.train.len())
            .filter(|(_, k)| k.is_complete())
            .collect();
    let slot = |name: &str, weight: f32| -> Result<MemberSlot> {
        let of: Vec<_> = complete.iter().filter(|(r, _)| r.member == name).collect();
        match of.as_slice() {
            [(r, _)] => Ok(MemberSlot {
                name: name.to_string(),
                weight,
                key: r.key(),
                record: r.clone(),
            }),
            [] => Err(Error::Config(format!(
                "`cache`: {} holds no complete record of member `{name}` for data {} (fill it \
                 with `distill cache fill`)",
                cache.path().display(),
                data.source
            ))),
            many => Err(Error::Config(format!(
                "`cache`: {} holds several complete records of member `{name}`; keep one: {}",
                cache.path().display(),
                many.iter()
                    .map(|(_, k)| k.description.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    };
    if !ctx.cfg.members.is_empty() {
        let slots = ctx
            .cfg
            .members
            .iter()
            .map(|m| slot(&m.name, m.weight))
            .collect::<Result<Vec<_>>>()?;
        return Ok(CachedTargets::Members(slots));
    }
    // No members named: an older cache's combined targets for exactly this run, else every
    // member the cache holds a complete record of, with weight 1.
    let t = ctx.cfg.temperature as f32;
    let encoding = ctx.cfg.soft_targets.to_string();
    let combined: Vec<_> = keys
        .iter()
        .filter(|k| {
            MemberRecord::from_key(&k.key).is_none()
                && k.key.data == data.source
                && k.key.train_size == data.train.len()
                && k.key.temperature == t
                && k.key.combine == ctx.cfg.combine
                && k.key.encoding == encoding
        })
        .collect();
    let whole: Vec<_> = combined.iter().filter(|k| k.is_complete()).collect();
    match whole.as_slice() {
        [one] => return Ok(CachedTargets::Combined(one.key.clone())),
        [] => {}
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
    let mut names: Vec<&str> = complete.iter().map(|(r, _)| r.member.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Config(format!(
            "`cache`: {} holds no complete soft targets or member records for data {} \
             (partial: {})",
            cache.path().display(),
            data.source,
            keys.iter()
                .filter(|k| k.key.data == data.source)
                .map(|k| format!("{} ({} rows)", k.description, k.rows))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let slots = names
        .into_iter()
        .map(|n| slot(n, 1.0))
        .collect::<Result<Vec<_>>>()?;
    Ok(CachedTargets::Members(slots))
}

/// Rows a registration on trial answers, with a trusted replica answering the same.
pub const CANARY_ROWS: usize = 8;

/// [`CANARY_ROWS`] training rows picked afresh by each coordinator (a replica cannot know in
/// advance which rows it will be checked on), as the wire tensor the teachers are sent.
fn canary_rows(data: &Dataset) -> Result<distill_proto::HostTensor> {
    use std::hash::{BuildHasher, Hasher};
    let n = data.train.len();
    if n == 0 {
        return Err(Error::Config(format!(
            "{}: the training split is empty",
            data.source
        )));
    }
    let state = std::collections::hash_map::RandomState::new();
    let idx: Vec<usize> = (0..CANARY_ROWS.min(n))
        .map(|i| {
            let mut h = state.build_hasher();
            h.write_usize(i);
            (h.finish() % n as u64) as usize
        })
        .collect();
    super::batch::input_rows(data, &data.train, &idx)
}

/// A config duration, refused (naming the key) when it cannot be one.
fn secs(v: f64, key: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|e| Error::Config(format!("`{key}`: {v} seconds is not a duration: {e}")))
}
