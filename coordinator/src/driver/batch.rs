//! Building what goes down a stream: a training batch with its soft targets (from the cache or
//! the teachers), the evaluation batches of the test split, and the teachers' own test errors.

use std::sync::Arc;

use distill_core::data::Split;
use distill_proto::pb::{self, CoordinatorMessage, coordinator_message};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;

use super::context::{CachedTargets, MemberSlot, RunCache, RunContext};
use crate::config::{SoftTargetEncoding, TeacherPolicy};
use crate::domain::ledger::Lease;
use crate::domain::report::TeacherErrors;
use crate::error::{Error, Result};
use crate::store::member_records::MemberRecord;

/// A prepared training batch.
pub struct PreparedBatch {
    /// The message.
    pub batch: pb::TrainBatch,
    /// Whether its soft targets came from the cache.
    pub from_cache: bool,
    /// Whether only some members answered (`degrade`).
    pub degraded: bool,
}

/// Why a batch could not be prepared, and whether trying again can help.
pub struct PrepareError {
    /// The cause.
    pub error: Error,
    /// Trying again cannot help (an offline cache that lacks the batch).
    pub fatal: bool,
}

impl From<Error> for PrepareError {
    fn from(error: Error) -> Self {
        Self {
            error,
            fatal: false,
        }
    }
}

/// Rows `idx` of `split` (of `data`) as the wire tensor a teacher is sent (u8 pixels stay u8).
pub fn input_rows(
    data: &distill_core::data::Dataset,
    split: &Split,
    idx: &[usize],
) -> Result<HostTensor> {
    let mut shape = vec![idx.len()];
    shape.extend(&data.input_shape);
    match split.rows_u8(idx) {
        Some(bytes) => HostTensor::new(shape, DType::U8, bytes),
        None => HostTensor::from_f32(shape, &split.rows_f32(idx)),
    }
    .map_err(|e| Error::Internal(e.to_string()))
}

/// Token windows `idx` of `split` (`L + 1` ids each) as the worker's wire tensors: the windows
/// `[B, L + 1]` and their next tokens `[B, L]`, both I64; with the windows themselves.
fn token_rows(split: &Split, idx: &[usize]) -> Result<(HostTensor, HostTensor, Vec<u32>)> {
    let w = split.row_len();
    let windows = split
        .rows_tokens(idx)
        .ok_or_else(|| Error::Internal("the split's rows are not token windows".into()))?;
    let i64s = |v: &mut dyn Iterator<Item = u32>| -> Vec<u8> {
        v.flat_map(|t| i64::from(t).to_le_bytes()).collect()
    };
    let inputs = HostTensor::new(
        vec![idx.len(), w],
        DType::I64,
        i64s(&mut windows.iter().copied()),
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let next = windows
        .chunks_exact(w.max(1))
        .flat_map(|r| r.iter().skip(1).copied());
    let labels = HostTensor::new(
        vec![idx.len(), w.saturating_sub(1)],
        DType::I64,
        i64s(&mut next.into_iter()),
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((inputs, labels, windows))
}

/// What a sequence teacher is asked for windows `windows` (`L + 1` ids each, flat): their
/// first `L` tokens, at `temperature`, the top `k`.
fn token_request(
    windows: &[u32],
    seq_len: usize,
    temperature: f32,
    k: usize,
) -> Result<crate::teachers::TokenRequest> {
    let w = seq_len + 1;
    let n = windows.len() / w;
    let ids: Vec<u32> = windows
        .chunks_exact(w)
        .flat_map(|r| r[..seq_len].iter().copied())
        .collect();
    let k = u32::try_from(k).map_err(|_| Error::Config("top-k k beyond u32".into()))?;
    crate::teachers::TokenRequest::new(&ids, n, seq_len, Vec::new(), temperature, k)
}

/// Inputs and labels of rows `idx` of `split`, as wire tensors (u8 pixels stay u8; token
/// windows as [`token_rows`]).
pub fn inputs_and_labels(
    ctx: &RunContext,
    split: &Split,
    idx: &[usize],
) -> Result<(HostTensor, HostTensor)> {
    if ctx.data.tokens.is_some() {
        let (inputs, labels, _) = token_rows(split, idx)?;
        return Ok((inputs, labels));
    }
    let inputs = input_rows(&ctx.data, split, idx)?;
    let labels: Vec<u8> = split
        .labels(idx)
        .iter()
        .flat_map(|&y| i64::from(y).to_le_bytes())
        .collect();
    let labels = HostTensor::new(vec![idx.len()], DType::I64, labels)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((inputs, labels))
}

/// Builds one training batch: inputs, labels and the ensemble's soft targets — from the
/// soft-target cache when it holds every row of the batch, else from the teachers (and then
/// written to the cache, unless degraded).
///
/// Its span, `batch`, carries the batch's `epoch`, `index` and `lease`; the worker that trains
/// it logs under a `batch` span with the same `lease`.
#[tracing::instrument(name = "batch", skip_all, fields(epoch = lease.batch.epoch, index = lease.batch.index, lease = lease.id))]
pub async fn prepare(
    ctx: Arc<RunContext>,
    lease: Lease,
    stop: CancellationToken,
) -> std::result::Result<PreparedBatch, PrepareError> {
    if let Some(t) = &ctx.data.tokens {
        return Ok(prepare_windows(&ctx, &lease, t.seq_len).await?);
    }
    let (inputs, labels) = inputs_and_labels(&ctx, &ctx.data.train, &lease.samples)?;
    let t = ctx.cfg.temperature as f32;
    let rows = lease.samples.len();
    let encoding = ctx.cfg.soft_targets;
    let targets = match &ctx.cache {
        None => from_teachers(&ctx, &inputs, rows, &stop).await?,
        Some(c) => match &c.targets {
            CachedTargets::Combined(key) => {
                let (cache, key, samples) = (c.cache.clone(), key.clone(), lease.samples.clone());
                let hit = blocking("cache", move || Ok(cache.get_batch(&key, &samples)?)).await?;
                let Some(bytes) = hit else {
                    return Err(offline_miss(&lease));
                };
                Targets {
                    bytes,
                    from_cache: true,
                    contributors: None,
                }
            }
            CachedTargets::Members(slots) => {
                from_records(&ctx, c, slots, &inputs, &lease, &stop).await?
            }
            CachedTargets::Windows(_) => {
                return Err(Error::Internal("a window cache in a run of examples".into()).into());
            }
        },
    };
    let Targets {
        bytes,
        from_cache,
        contributors,
    } = targets;
    if let Some(c) = &contributors {
        tracing::warn!(batch = %lease.batch, members = ?c, "degraded batch: soft targets from the members that answered");
    }
    let (soft_targets, topk_targets) = target_fields(bytes, rows, ctx.data.classes, encoding)?;
    let degraded = contributors.is_some();
    tracing::debug!(rows, from_cache, degraded, "batch prepared");
    Ok(PreparedBatch {
        batch: pb::TrainBatch {
            lease_id: lease.id,
            epoch: lease.batch.epoch,
            index: lease.batch.index,
            inputs: Some(inputs.into()),
            labels: Some(labels.into()),
            soft_targets,
            temperature: t,
            members: contributors.unwrap_or_else(|| ctx.member_names()),
            topk_targets,
            encoding: encoding.to_string(),
            cached: from_cache,
        },
        from_cache,
        degraded,
    })
}

/// A language model's batch: its windows, their next tokens, and the member's top-k rows at
/// every position (`B·L` rows, sequence by sequence), asked of the one member.
async fn prepare_windows(ctx: &RunContext, lease: &Lease, seq_len: usize) -> Result<PreparedBatch> {
    let SoftTargetEncoding::TopK(k) = ctx.cfg.soft_targets else {
        return Err(Error::Config(
            "a language-model run needs top-k soft targets".into(),
        ));
    };
    let (inputs, labels, windows) = token_rows(&ctx.data.train, &lease.samples)?;
    let t = ctx.cfg.temperature as f32;
    let cache = match &ctx.cache {
        Some(RunCache {
            cache,
            targets: CachedTargets::Windows(key),
            ..
        }) => Some((cache.clone(), key.clone())),
        _ => None,
    };
    let hit = match &cache {
        Some((cache, key)) => {
            let (cache, key, samples) = (cache.clone(), key.clone(), lease.samples.clone());
            blocking("cache", move || Ok(cache.get_batch(&key, &samples)?)).await?
        }
        None => None,
    };
    let from_cache = hit.is_some();
    let topk = match hit {
        Some(data) => pb::TopKTargets {
            k: u32::try_from(k).map_err(|_| Error::Config("top-k k beyond u32".into()))?,
            classes: u32::try_from(ctx.data.classes)
                .map_err(|_| Error::Internal("more than 2^32 classes".into()))?,
            value_dtype: pb::DType::DtypeF16 as i32,
            data,
        },
        None => {
            let req = token_request(&windows, seq_len, t, k)?;
            let topk = ctx.pool.infer_tokens(0, &req).await?;
            // The key says f16: rows of another value type are sent but not kept.
            if let Some((cache, key)) = cache
                && !cache.is_read_only()
                && topk.value_dtype == pb::DType::DtypeF16 as i32
            {
                let (samples, bytes) = (lease.samples.clone(), topk.data.clone());
                blocking(
                    "cache",
                    move || Ok(cache.put_batch(&key, &samples, &bytes)?),
                )
                .await?;
            }
            topk
        }
    };
    tracing::debug!(rows = lease.samples.len(), from_cache, "batch prepared");
    Ok(PreparedBatch {
        batch: pb::TrainBatch {
            lease_id: lease.id,
            epoch: lease.batch.epoch,
            index: lease.batch.index,
            inputs: Some(inputs.into()),
            labels: Some(labels.into()),
            soft_targets: None,
            temperature: t,
            members: ctx.member_names(),
            topk_targets: Some(topk),
            encoding: ctx.cfg.soft_targets.to_string(),
            cached: from_cache,
        },
        from_cache,
        degraded: false,
    })
}

/// A batch's encoded soft targets and where they came from.
struct Targets {
    bytes: Vec<u8>,
    /// Every member's rows came from the cache.
    from_cache: bool,
    /// The members that answered, when not all did (`degrade`).
    contributors: Option<Vec<String>>,
}

/// Runs `f` off the async threads.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("{what} task: {e}")))?
}

fn offline_miss(lease: &Lease) -> PrepareError {
    PrepareError {
        error: Error::Config(format!(
            "offline run: the cache has no soft targets for {}",
            lease.batch
        )),
        fatal: true,
    }
}

/// Names of the members that answered, when some did not.
fn contributors_of(ctx: &RunContext, answered: &[usize]) -> Option<Vec<String>> {
    (answered.len() < ctx.pool.members.len()).then(|| {
        answered
            .iter()
            .map(|&i| ctx.pool.members[i].name.clone())
            .collect()
    })
}

/// A run without a cache: the teachers asked at the run's T, their logits combined straight
/// into the wire bytes.
async fn from_teachers(
    ctx: &Arc<RunContext>,
    inputs: &HostTensor,
    rows: usize,
    stop: &CancellationToken,
) -> Result<Targets> {
    let t = ctx.cfg.temperature as f32;
    let answer = ctx
        .pool
        .ensemble_logits(inputs, t, ctx.cfg.teacher_policy, stop)
        .await?;
    let weights: Vec<f32> = answer
        .answered
        .iter()
        .map(|&i| ctx.pool.members[i].weight)
        .collect();
    let contributors = contributors_of(ctx, &answer.answered);
    let (classes, mode, encoding) = (ctx.data.classes, ctx.cfg.combine, ctx.cfg.soft_targets);
    let logits = answer.logits;
    let bytes = blocking("soft-target", move || {
        Ok(distill_core::soft_targets::from_logits(
            &logits, rows, classes, &weights, mode, encoding,
        )?)
    })
    .await?;
    Ok(Targets {
        bytes,
        from_cache: false,
        contributors,
    })
}

/// A run with member records: each member's rows from its record, the members whose record
/// lacks a row of the batch asked (at their record's capture temperature) and their answers
/// recorded; then every record decoded at the run's T and combined. A member that did not
/// answer (`degrade`) leaves the others' records written.
async fn from_records(
    ctx: &Arc<RunContext>,
    c: &RunCache,
    slots: &[MemberSlot],
    inputs: &HostTensor,
    lease: &Lease,
    stop: &CancellationToken,
) -> std::result::Result<Targets, PrepareError> {
    let rows = lease.samples.len();
    let Recorded {
        records,
        from_cache,
        contributors,
    } = match ensure_records(ctx, c, slots, inputs, &lease.samples, stop).await? {
        Some(r) => r,
        None => return Err(offline_miss(lease)),
    };
    let t = ctx.cfg.temperature as f32;
    let (classes, mode, encoding) = (ctx.data.classes, ctx.cfg.combine, ctx.cfg.soft_targets);
    let present: Vec<(MemberRecord, f32, Vec<u8>)> = slots
        .iter()
        .zip(records)
        .filter_map(|(s, r)| Some((s.record.clone(), s.weight, r?)))
        .collect();
    let bytes =
        blocking("soft-target", move || {
            let mut logits = Vec::with_capacity(present.len());
            let mut weights = Vec::with_capacity(present.len());
            for (record, weight, bytes) in &present {
                logits.push(record.decode(bytes, rows, t).map_err(|e| {
                    Error::Internal(format!("member `{}` record: {e}", record.member))
                })?);
                weights.push(*weight);
            }
            Ok(distill_core::soft_targets::from_logits(
                &logits, rows, classes, &weights, mode, encoding,
            )?)
        })
        .await?;
    Ok(Targets {
        bytes,
        from_cache,
        contributors,
    })
}

/// The record rows of one batch, every member's (None where a member did not answer).
pub struct Recorded {
    /// Each slot's record rows of the batch, in slot order.
    pub records: Vec<Option<Vec<u8>>>,
    /// Every row came from the cache: no teacher was asked.
    pub from_cache: bool,
    /// The members that answered, when not all did (`degrade`).
    pub contributors: Option<Vec<String>>,
}

/// Every member's record rows of `samples`: read from the cache, and for the members whose
/// record lacks any of them, asked of the teachers (each at its record's capture temperature)
/// and written (unless the cache is read-only). None in an offline run that misses a row.
pub async fn ensure_records(
    ctx: &Arc<RunContext>,
    c: &RunCache,
    slots: &[MemberSlot],
    inputs: &HostTensor,
    samples: &[usize],
    stop: &CancellationToken,
) -> Result<Option<Recorded>> {
    let rows = samples.len();
    let (cache, keys, samples) = (
        c.cache.clone(),
        slots.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        samples.to_vec(),
    );
    let lookup = samples.clone();
    let mut records: Vec<Option<Vec<u8>>> = blocking("cache", move || {
        keys.iter()
            .map(|k| Ok(cache.get_batch(k, &lookup)?))
            .collect()
    })
    .await?;
    let from_cache = records.iter().all(Option::is_some);
    let mut contributors = None;
    if !from_cache {
        if c.offline {
            return Ok(None);
        }
        let known = records
            .iter()
            .zip(slots)
            .map(|(r, s)| match r {
                Some(bytes) => s
                    .record
                    .decode(bytes, rows, s.record.capture_temperature)
                    .map(Some)
                    .map_err(|e| Error::Internal(format!("member `{}` record: {e}", s.name))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let asked: Vec<usize> = (0..slots.len()).filter(|&i| records[i].is_none()).collect();
        let temps: Vec<f32> = slots.iter().map(|s| s.record.capture_temperature).collect();
        let answer = ctx
            .pool
            .complete_logits(inputs, &temps, known, ctx.cfg.teacher_policy, stop)
            .await?;
        contributors = contributors_of(ctx, &answer.answered);
        let mut fresh = Vec::new();
        for (&i, logits) in answer.answered.iter().zip(&answer.logits) {
            if asked.contains(&i) {
                let bytes = slots[i]
                    .record
                    .encode(logits, rows)
                    .map_err(|e| Error::Internal(format!("member `{}`: {e}", slots[i].name)))?;
                fresh.push((slots[i].key.clone(), bytes.clone()));
                records[i] = Some(bytes);
            }
        }
        if !c.cache.is_read_only() && !fresh.is_empty() {
            let (cache, samples) = (c.cache.clone(), samples.clone());
            blocking("cache", move || {
                for (key, bytes) in &fresh {
                    cache.put_batch(key, &samples, bytes)?;
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(Some(Recorded {
        records,
        from_cache,
        contributors,
    }))
}

/// The evaluation batches of the test split, in order.
pub fn eval_messages(ctx: &RunContext) -> impl Iterator<Item = Result<CoordinatorMessage>> + '_ {
    let n = ctx.data.test.len();
    let step = match &ctx.data.tokens {
        // A window's logits are L × vocabulary floats: as many windows as keep a batch's
        // near 2^24 (64 MiB), so that a worker scoring a large vocabulary stays in memory.
        Some(t) => ((1usize << 24) / t.seq_len.saturating_mul(ctx.data.classes).max(1))
            .clamp(1, ctx.cfg.batch_size.max(1)),
        None => ctx.cfg.batch_size.max(256),
    };
    (0..n).step_by(step).map(move |start| {
        let idx: Vec<usize> = (start..(start + step).min(n)).collect();
        let (inputs, labels) = inputs_and_labels(ctx, &ctx.data.test, &idx)?;
        Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Eval(pb::EvalBatch {
                inputs: Some(inputs.into()),
                labels: Some(labels.into()),
            })),
        })
    })
}

/// Asks every member for the test split at T = 1 and counts each one's errors and the
/// ensemble's.
pub async fn evaluate_teachers(
    ctx: Arc<RunContext>,
    stop: CancellationToken,
) -> Result<(Vec<TeacherErrors>, u64, Option<Vec<u32>>)> {
    if let Some(t) = &ctx.data.tokens {
        let (errors, top1) = evaluate_token_teacher(&ctx, t.seq_len).await?;
        let ensemble = errors.iter().map(|e| e.test_errors).sum();
        return Ok((errors, ensemble, Some(top1)));
    }
    let n = ctx.data.test.len();
    let classes = ctx.data.classes;
    let members = ctx.pool.members.len();
    let weights: Vec<f32> = ctx.pool.members.iter().map(|m| m.weight).collect();
    let mut errors = vec![0u64; members];
    let mut ensemble = 0u64;
    for start in (0..n).step_by(1000) {
        let idx: Vec<usize> = (start..(start + 1000).min(n)).collect();
        let (inputs, _) = inputs_and_labels(&ctx, &ctx.data.test, &idx)?;
        let labels = ctx.data.test.labels(&idx);
        let answer = ctx
            .pool
            .ensemble_logits(&inputs, 1.0, TeacherPolicy::Wait, &stop)
            .await?;
        for (m, z) in answer.logits.iter().enumerate() {
            errors[m] += count_errors(z, &labels, classes);
        }
        let (w, mode, rows) = (weights.clone(), ctx.cfg.combine, idx.len());
        let logits = answer.logits;
        let probs = tokio::task::spawn_blocking(move || {
            distill_core::kd::combine_host(&logits, rows, classes, &w, mode).map_err(Error::from)
        })
        .await
        .map_err(|e| Error::Internal(format!("ensemble task: {e}")))??;
        ensemble += count_errors(&probs, &labels, classes);
    }
    let per_member = ctx
        .pool
        .members
        .iter()
        .zip(errors)
        .map(|(m, e)| TeacherErrors {
            member: m.name.clone(),
            test_errors: e,
            perplexity_from_topk: None,
        })
        .collect::<Vec<_>>();
    tracing::info!(teachers = ?per_member, ensemble, test_size = n, "teacher test errors");
    Ok((per_member, ensemble, None))
}

/// A language model's teacher (the one member) on the validation windows at T = 1: positions
/// whose most probable next token (the largest of its top-k) is not the window's, and that
/// top-1 at every position.
async fn evaluate_token_teacher(
    ctx: &RunContext,
    seq_len: usize,
) -> Result<(Vec<TeacherErrors>, Vec<u32>)> {
    let SoftTargetEncoding::TopK(k) = ctx.cfg.soft_targets else {
        return Err(Error::Config(
            "a language-model run needs top-k soft targets".into(),
        ));
    };
    let n = ctx.data.test.len();
    let mut errors = 0u64;
    let mut nll = 0f64;
    let mut top1 = Vec::with_capacity(n.saturating_mul(seq_len));
    // Windows per request: a batch's worth, as training asks.
    let step = ctx.cfg.batch_size.max(1);
    for start in (0..n).step_by(step) {
        let idx: Vec<usize> = (start..(start + step).min(n)).collect();
        let (_, _, windows) = token_rows(&ctx.data.test, &idx)?;
        let req = token_request(&windows, seq_len, 1.0, k)?;
        let reply = ctx.pool.infer_tokens(0, &req).await?;
        let format = distill_core::topk::TopKFormat::with_value_dtype(
            ctx.data.classes,
            reply.k as usize,
            if reply.value_dtype == pb::DType::DtypeBf16 as i32 {
                distill_core::topk::ValueDtype::Bf16
            } else {
                distill_core::topk::ValueDtype::F16
            },
        )?;
        let rows = distill_core::topk::decode(&reply.data, idx.len() * seq_len, &format)?;
        let kk = rows.k();
        let next = windows
            .chunks_exact(seq_len + 1)
            .flat_map(|r| r[1..].iter().copied());
        for (r, y) in next.enumerate() {
            let (ids, ps) = (
                &rows.indices()[r * kk..(r + 1) * kk],
                &rows.probs()[r * kk..(r + 1) * kk],
            );
            let best = ids
                .iter()
                .zip(ps)
                .fold((u32::MAX, f32::NEG_INFINITY), |b, (&i, &p)| {
                    if p > b.1 { (i, p) } else { b }
                });
            errors += u64::from(best.0 != y);
            top1.push(best.0);
            let p = match ids.iter().position(|&i| i == y) {
                Some(j) => ps[j],
                None => rows.rest_per_class()[r],
            };
            // A probability of 0 (k = C, or a tail of no mass) counts as the smallest f32.
            nll -= f64::from(p.max(f32::MIN_POSITIVE)).ln();
        }
    }
    let member = ctx
        .pool
        .members
        .first()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    tracing::info!(%member, errors, positions = n * seq_len, "teacher top-1 errors");
    Ok((
        vec![TeacherErrors {
            member,
            test_errors: errors,
            perplexity_from_topk: Some((nll / top1.len().max(1) as f64).exp()),
        }],
        top1,
    ))
}

/// Encodes combined probabilities (`rows × classes`) in `encoding`, row after row.
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
                k: u32::try_from(k).map_err(|_| Error::Internal("top-k k beyond u32".into()))?,
                classes: u32::try_from(classes)
                    .map_err(|_| Error::Internal("more than 2^32 classes".into()))?,
                value_dtype: pb::DType::DtypeF16 as i32,
                data: bytes,
            }),
        )),
        (None, other) => Err(Error::Internal(format!(
            "soft-target encoding {other} is neither dense nor top-k"
        ))),
    }
}

/// Arg-max errors of `scores` (`labels.len() × classes`) against `labels`.
fn count_errors(scores: &[f32], labels: &[u32], classes: usize) -> u64 {
    scores
        .chunks_exact(classes.max(1))
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
