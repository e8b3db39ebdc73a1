//! Building what goes down a stream: a training batch with its soft targets (from the cache or
//! the teachers), the evaluation batches of the test split, and the teachers' own test errors.

use std::sync::Arc;

use distill_core::data::Split;
use distill_proto::pb::{self, CoordinatorMessage, coordinator_message};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;

use super::context::RunContext;
use crate::config::{SoftTargetEncoding, TeacherPolicy};
use crate::domain::ledger::Lease;
use crate::domain::report::TeacherErrors;
use crate::error::{Error, Result};

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

/// Inputs and labels of rows `idx` of `split`, as wire tensors (u8 pixels stay u8).
pub fn inputs_and_labels(
    ctx: &RunContext,
    split: &Split,
    idx: &[usize],
) -> Result<(HostTensor, HostTensor)> {
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
    let (inputs, labels) = inputs_and_labels(&ctx, &ctx.data.train, &lease.samples)?;
    let t = ctx.cfg.temperature as f32;
    let rows = lease.samples.len();
    let classes = ctx.data.classes;
    let encoding = ctx.cfg.soft_targets;
    let cached = match &ctx.cache {
        Some(c) => {
            let (c, samples) = (c.clone(), lease.samples.clone());
            tokio::task::spawn_blocking(move || c.cache.get_batch(&c.key, &samples))
                .await
                .map_err(|e| Error::Internal(format!("cache task: {e}")))?
                .map_err(Error::from)?
        }
        None => None,
    };
    let mut contributors: Option<Vec<String>> = None;
    let (bytes, from_cache) = match cached {
        Some(bytes) => (bytes, true),
        None => {
            if ctx.is_offline() {
                return Err(PrepareError {
                    error: Error::Config(format!(
                        "offline run: the cache has no soft targets for {}",
                        lease.batch
                    )),
                    fatal: true,
                });
            }
            let answer = ctx
                .pool
                .ensemble_logits(&inputs, t, ctx.cfg.teacher_policy, &stop)
                .await?;
            let weights: Vec<f32> = answer
                .answered
                .iter()
                .map(|&i| ctx.pool.members[i].weight)
                .collect();
            if answer.answered.len() < ctx.pool.members.len() {
                contributors = Some(
                    answer
                        .answered
                        .iter()
                        .map(|&i| ctx.pool.members[i].name.clone())
                        .collect(),
                );
            }
            let mode = ctx.cfg.combine;
            let logits = answer.logits;
            // From the teachers' logits straight to the wire bytes, without candle tensors.
            let bytes = tokio::task::spawn_blocking(move || {
                distill_core::soft_targets::from_logits(
                    &logits, rows, classes, &weights, mode, encoding,
                )
                .map_err(Error::from)
            })
            .await
            .map_err(|e| Error::Internal(format!("soft-target task: {e}")))??;
            // Degraded targets are not the ensemble's: they never go into the cache.
            if let Some(c) = ctx
                .cache
                .clone()
                .filter(|c| !c.cache.is_read_only() && contributors.is_none())
            {
                let (samples, b) = (lease.samples.clone(), bytes.clone());
                tokio::task::spawn_blocking(move || c.cache.put_batch(&c.key, &samples, &b))
                    .await
                    .map_err(|e| Error::Internal(format!("cache task: {e}")))?
                    .map_err(Error::from)?;
            }
            (bytes, false)
        }
    };
    if let Some(c) = &contributors {
        tracing::warn!(batch = %lease.batch, members = ?c, "degraded batch: soft targets from the members that answered");
    }
    let (soft_targets, topk_targets) = target_fields(bytes, rows, classes, encoding)?;
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

/// The evaluation batches of the test split, in order.
pub fn eval_messages(ctx: &RunContext) -> impl Iterator<Item = Result<CoordinatorMessage>> + '_ {
    let n = ctx.data.test.len();
    let step = ctx.cfg.batch_size.max(256);
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
) -> Result<(Vec<TeacherErrors>, u64)> {
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
        })
        .collect::<Vec<_>>();
    tracing::info!(teachers = ?per_member, ensemble, test_size = n, "teacher test errors");
    Ok((per_member, ensemble))
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
