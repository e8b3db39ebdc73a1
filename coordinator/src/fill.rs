//! `distill cache fill`: the one teacher pass of a run's config, and nothing else.
//!
//! It prepares the run as a coordinator would (the same teacher clients, security, retries,
//! hedging, caps and policy), then asks the teachers for every training sample whose member
//! records the cache lacks, a batch at a time with `prefetch` batches in flight, and writes
//! the records (see [`crate::store::member_records`]). No worker is involved and no student is
//! trained. A fill stopped half-way keeps every batch it wrote and is resumed by running it
//! again; a run or `distill sweep` whose records are complete asks no teacher.
//!
//! The fill's bookkeeping (its resolved config and `fill.json`, the [`FillReport`]) goes to
//! `fill/` inside the cache directory; the run directory of the config is not touched.

use std::time::Instant;

use futures::StreamExt as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::RunConfig;
use crate::driver::batch::{ensure_records, input_rows};
use crate::driver::context::CachedTargets;
use crate::error::{Error, Result};
use crate::security::Security;
use crate::store::cache::CacheMode;

/// What a fill did.
#[derive(Debug, Clone, Serialize)]
pub struct FillReport {
    /// The cache's database file.
    pub cache: std::path::PathBuf,
    /// Training rows.
    pub rows: usize,
    /// Batches of the pass.
    pub batches: u64,
    /// Batches that asked at least one teacher.
    pub asked_batches: u64,
    /// Batches every record already held.
    pub cached_batches: u64,
    /// Wall-clock seconds of the pass.
    pub seconds: f64,
    /// Each member's record: its description and rows held at the end.
    pub records: Vec<RecordState>,
}

/// One member's record after a fill.
#[derive(Debug, Clone, Serialize)]
pub struct RecordState {
    /// Member name.
    pub member: String,
    /// The record's key, for people.
    pub key: String,
    /// Rows the record holds.
    pub rows: u64,
    /// Whether it holds every training row.
    pub complete: bool,
}

/// Fills the cache of `cfg` (which must have a read-write `[cache]`), calling `progress` with
/// (batches done, batches) after each batch. Stops early, with what it wrote kept, when
/// `shutdown` is cancelled.
pub async fn fill(
    mut cfg: RunConfig,
    security: Security,
    shutdown: CancellationToken,
    progress: impl Fn(u64, u64),
) -> Result<FillReport> {
    let cc = cfg
        .cache
        .clone()
        .ok_or_else(|| Error::Config("`cache`: a fill needs a `[cache]` section to fill".into()))?;
    if cc.mode != CacheMode::ReadWrite {
        return Err(Error::Config(format!(
            "`cache.mode`: a fill writes the cache; it is \"{}\", make it \"read-write\"",
            cc.mode.as_str()
        )));
    }
    cfg.run_dir = cc.dir.join("fill");
    let run = crate::prepare_with(cfg, security).await?;
    let ctx = run.ctx.clone();
    let (cache, slots) = match &ctx.cache {
        Some(c) => match &c.targets {
            CachedTargets::Members(slots) => (c.clone(), slots.clone()),
            CachedTargets::Combined(_) | CachedTargets::Windows(_) => {
                return Err(Error::Config(
                    "`distill cache fill` fills member records of example data, not a \
                     language model's windows (a run fills those as it goes)"
                        .into(),
                ));
            }
        },
        None => {
            return Err(Error::Config(
                "`cache`: the cache is off for this run: a member told no weights digest (see \
                 the log); an OIP member needs `model_version` or `identity`"
                    .into(),
            ));
        }
    };
    let n = ctx.data.train.len();
    let step = ctx.cfg.batch_size.max(1);
    let batches = n.div_ceil(step) as u64;
    let started = Instant::now();
    let (mut asked, mut cached, mut done) = (0u64, 0u64, 0u64);
    let stop = shutdown.child_token();
    let jobs = futures::stream::iter((0..n).step_by(step).map(|start| {
        let samples: Vec<usize> = (start..(start + step).min(n)).collect();
        let (ctx, cache, slots, stop) = (ctx.clone(), cache.clone(), slots.clone(), stop.clone());
        async move {
            let inputs = input_rows(&ctx.data, &ctx.data.train, &samples)?;
            ensure_records(&ctx, &cache, &slots, &inputs, &samples, &stop)
                .await?
                .ok_or_else(|| Error::Internal("a read-write cache is not offline".into()))
        }
    }))
    .buffer_unordered(ctx.cfg.prefetch.clamp(1, 64));
    tokio::pin!(jobs);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = jobs.next() => next,
        };
        let Some(r) = next else { break };
        let r = r?;
        if r.from_cache {
            cached += 1;
        } else {
            asked += 1;
        }
        done += 1;
        progress(done, batches);
    }
    let seconds = started.elapsed().as_secs_f64();
    let c = cache.cache.clone();
    let keys = tokio::task::spawn_blocking(move || c.keys())
        .await
        .map_err(|e| Error::Internal(format!("cache task: {e}")))??;
    let records = slots
        .iter()
        .map(|s| {
            let digest = s.key.digest();
            let rows = keys
                .iter()
                .find(|k| k.digest == digest)
                .map_or(0, |k| k.rows);
            RecordState {
                member: s.name.clone(),
                key: s.key.description(),
                rows,
                complete: rows == n as u64,
            }
        })
        .collect();
    let report = FillReport {
        cache: cache.cache.path().to_path_buf(),
        rows: n,
        batches,
        asked_batches: asked,
        cached_batches: cached,
        seconds,
        records,
    };
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| Error::Internal(format!("fill report to JSON: {e}")))?;
    distill_core::fsutil::atomic_write(&ctx.cfg.run_dir.join("fill.json"), &json)?;
    tracing::info!(
        batches,
        asked,
        cached,
        seconds,
        "cache fill {}",
        if done == batches { "done" } else { "stopped" }
    );
    drop(run);
    Ok(report)
}

/// Whether every record of `report` is complete.
pub fn is_complete(report: &FillReport) -> bool {
    report.records.iter().all(|r| r.complete)
}
