//! The knowledge-distillation math of Hinton, Vinyals & Dean (2015): tempered softmax, the
//! combination of an ensemble's tempered logits into soft targets, and the student's loss.
//!
//! Everything works on f32 candle tensors and is built from differentiable candle ops, so
//! [`kd_loss`] backpropagates into the student's logits.
//!
//! Decisions written down here:
//! - Teacher servers return **tempered** logits `z/T`, so [`combine`] takes no temperature.
//! - Member weights are renormalised to sum to 1, so a subset of the members (the `degrade`
//!   policy) is combined with the same call.
//! - [`kd_loss`] without hard labels uses alpha = 1 whatever alpha says (online transfer sets have
//!   no labels; DESIGN.md: "Without hard labels alpha = 1").
//! - The soft term is the full KL divergence including the teacher's entropy, so it is ≥ 0 and 0
//!   exactly when the student matches the teacher; teacher probabilities that are exactly 0
//!   contribute 0 (`0 · log 0 = 0`, as in `xlogy`).

use std::fmt;
use std::str::FromStr;

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the members of a teacher ensemble are combined into one distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Combine {
    /// Weighted arithmetic mean of the members' tempered probabilities.
    #[default]
    MeanProb,
    /// Softmax of the weighted mean of the members' tempered logits (a normalised geometric mean
    /// of their distributions).
    MeanLogit,
}

impl Combine {
    /// The name used in configs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Combine::MeanProb => "mean-prob",
            Combine::MeanLogit => "mean-logit",
        }
    }
}

impl fmt::Display for Combine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Combine {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean-prob" => Ok(Combine::MeanProb),
            "mean-logit" => Ok(Combine::MeanLogit),
            other => Err(Error::Input(format!(
                "unknown ensemble combination `{other}` (expected `mean-prob` or `mean-logit`)"
            ))),
        }
    }
}

/// Checks that a temperature is finite and > 0.
pub fn check_temperature(t: f64) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "temperature must be finite and > 0, got {t}"
        )))
    }
}

fn check_rank2(x: &Tensor, what: &str) -> Result<(usize, usize)> {
    match x.dims() {
        &[n, c] if c > 0 => Ok((n, c)),
        dims => Err(Error::Input(format!(
            "{what} must have shape [N, C] with C > 0, got {dims:?}"
        ))),
    }
}

/// Numerically stable log-softmax over the last dimension.
///
/// # Shapes
/// `logits`: `[..., C]` → `[..., C]`.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    // candle_nn's version subtracts the row maximum before exponentiating.
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

/// Tempered softmax q_i = exp(z_i/T) / Σ_j exp(z_j/T) over the last dimension, computed stably
/// (as exp of [`tempered_log_softmax`]). `t` must be finite and > 0.
///
/// # Shapes
/// `logits`: `[..., C]` → `[..., C]`.
pub fn tempered_softmax(logits: &Tensor, t: f64) -> Result<Tensor> {
    Ok(tempered_log_softmax(logits, t)?.exp()?)
}

/// log of the tempered softmax, log q_i = (z_i − max z)/T − log Σ_j exp((z_j − max z)/T).
/// The row maximum is subtracted *before* dividing by T, so large logits keep their f32
/// precision; softmax is shift-invariant, so the (detached) shift changes no gradient.
///
/// # Shapes
/// `logits`: `[..., C]` → `[..., C]`.
pub fn tempered_log_softmax(logits: &Tensor, t: f64) -> Result<Tensor> {
    check_temperature(t)?;
    let max = logits.max_keepdim(D::Minus1)?.detach(); // [..., 1]
    let shifted = logits.broadcast_sub(&max)?; // [..., C], every entry <= 0
    let scaled = if t == 1.0 {
        shifted
    } else {
        shifted.affine(1.0 / t, 0.0)?
    };
    log_softmax(&scaled)
}

/// Combines the tempered logits `z/T` of M ensemble members into one f32 probability
/// distribution per row. `weights` (one per member, finite and > 0) are renormalised to sum to 1,
/// so combining a subset of the members needs only that subset's weights.
///
/// # Shapes
/// `members`: M × `[N, C]` (any float dtype), `weights`: `[M]` → `[N, C]` f32.
pub fn combine(members: &[Tensor], weights: &[f32], mode: Combine) -> Result<Tensor> {
    let first = members
        .first()
        .ok_or_else(|| Error::Input("an ensemble needs at least one member".into()))?;
    if weights.len() != members.len() {
        return Err(Error::Input(format!(
            "{} member weights given for {} members",
            weights.len(),
            members.len()
        )));
    }
    if let Some((i, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w > 0.0))
    {
        return Err(Error::Input(format!(
            "member weight {i} must be finite and > 0, got {w}"
        )));
    }
    check_rank2(first, "member logits")?;
    for (i, m) in members.iter().enumerate().skip(1) {
        if m.dims() != first.dims() {
            return Err(Error::Input(format!(
                "member {i} logits have shape {:?}, member 0 has {:?}",
                m.dims(),
                first.dims()
            )));
        }
    }
    // Sum in f64 so the renormalised weights sum to 1 as closely as f32 allows.
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let mut acc: Option<Tensor> = None;
    for (m, &w) in members.iter().zip(weights) {
        let m = m.to_dtype(DType::F32)?;
        let term = match mode {
            Combine::MeanProb => log_softmax(&m)?.exp()?,
            Combine::MeanLogit => m,
        }
        .affine(f64::from(w) / total, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => a.add(&term)?,
        });
    }
    let acc = acc.ok_or_else(|| Error::Input("an ensemble needs at least one member".into()))?;
    match mode {
        Combine::MeanProb => Ok(acc),
        Combine::MeanLogit => Ok(log_softmax(&acc)?.exp()?),
    }
}

/// [`combine`] on plain host slices, for callers that hold logits as bytes or vectors (the
/// coordinator) and need probabilities back on the host: no candle tensors, one pass per row.
/// Each member holds `rows × classes` tempered logits, row-major; `weights` as for [`combine`].
///
/// Numerics: every softmax subtracts the row maximum before `exp`, and the sums and the weighted
/// means are taken in f64, so the result is at least as accurate as [`combine`]'s f32 ops (the
/// tests hold them within 1e-6 of each other). Errors, never NaN: no members, a member of another
/// length than `rows × classes`, `classes == 0`, a weight that is not finite and > 0, or a logit
/// that is not finite (the message names the member, row and class).
///
/// # Shapes
/// `members`: M × `rows·classes`, `weights`: `[M]` → `rows·classes` f32 probabilities.
pub fn combine_host<M: AsRef<[f32]>>(
    members: &[M],
    rows: usize,
    classes: usize,
    weights: &[f32],
    mode: Combine,
) -> Result<Vec<f32>> {
    if members.is_empty() {
        return Err(Error::Input("an ensemble needs at least one member".into()));
    }
    if weights.len() != members.len() {
        return Err(Error::Input(format!(
            "{} member weights given for {} members",
            weights.len(),
            members.len()
        )));
    }
    if let Some((i, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w > 0.0))
    {
        return Err(Error::Input(format!(
            "member weight {i} must be finite and > 0, got {w}"
        )));
    }
    if classes == 0 {
        return Err(Error::Input(
            "member logits must have at least one class".into(),
        ));
    }
    let want = rows
        .checked_mul(classes)
        .ok_or_else(|| Error::Input(format!("{rows} rows of {classes} classes is too many")))?;
    for (i, m) in members.iter().enumerate() {
        let m = m.as_ref();
        if m.len() != want {
            return Err(Error::Input(format!(
                "member {i} has {} logits, expected {rows} rows × {classes} classes = {want}",
                m.len()
            )));
        }
        if let Some(j) = m.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "member {i} logit at row {}, class {} is {}; logits must be finite",
                j / classes,
                j % classes,
                m[j]
            )));
        }
    }
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let share: Vec<f64> = weights.iter().map(|&w| f64::from(w) / total).collect();
    let mut out = Vec::with_capacity(want);
    let mut acc = vec![0f64; classes]; // the row's weighted mean (of probabilities or logits)
    let mut buf = vec![0f64; classes];
    for r in 0..rows {
        let span = r * classes..(r + 1) * classes;
        acc.fill(0.0);
        for (m, &w) in members.iter().zip(&share) {
            let row = &m.as_ref()[span.clone()];
            match mode {
                Combine::MeanProb => {
                    buf.iter_mut()
                        .zip(row)
                        .for_each(|(b, &z)| *b = f64::from(z));
                    softmax_in_place(&mut buf);
                    acc.iter_mut().zip(&buf).for_each(|(a, p)| *a += w * p);
                }
                Combine::MeanLogit => {
                    acc.iter_mut()
                        .zip(row)
                        .for_each(|(a, &z)| *a += w * f64::from(z));
                }
            }
        }
        if mode == Combine::MeanLogit {
            softmax_in_place(&mut acc);
        }
        out.extend(acc.iter().map(|&p| p as f32));
    }
    Ok(out)
}

/// Softmax of one row of finite values, in place, with the maximum subtracted first so no `exp`
/// overflows (the largest term is exactly 1, so the sum is ≥ 1 and the division is safe).
fn softmax_in_place(row: &mut [f64]) {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for z in row.iter_mut() {
        *z = (*z - max).exp();
        sum += *z;
    }
    row.iter_mut().for_each(|z| *z /= sum);
}

/// The student's loss and its parts, each a scalar f32 tensor.
#[derive(Debug, Clone)]
pub struct KdLoss {
    /// `alpha·T²·soft + (1 − alpha)·hard`: what to backpropagate.
    pub total: Tensor,
    /// Batch mean of KL(p_teacher(T) ‖ p_student(T)), unscaled (no alpha, no T²).
    pub soft: Tensor,
    /// Batch mean of CE(y, p_student(1)); `None` without labels.
    pub hard: Option<Tensor>,
}

impl KdLoss {
    /// The three values on the host, for metrics: `(total, soft, hard)`.
    pub fn values(&self) -> Result<(f32, f32, Option<f32>)> {
        let hard = match &self.hard {
            Some(h) => Some(h.to_scalar::<f32>()?),
            None => None,
        };
        Ok((
            self.total.to_scalar::<f32>()?,
            self.soft.to_scalar::<f32>()?,
            hard,
        ))
    }
}

/// The distillation loss `alpha·T²·KL(p_teacher ‖ softmax(s/T)) + (1 − alpha)·CE(y, softmax(s))`,
/// averaged over the batch. `teacher_probs` are the combined soft targets at temperature `t`
/// (rows are distributions; entries that are exactly 0 contribute 0). Without `labels` the loss
/// is the soft term alone (alpha is taken as 1). `t` must be finite and > 0, `alpha` in [0, 1];
/// labels may be u8, u32 or i64 and must lie in `0..C`.
///
/// The gradient with respect to `s` is
/// `alpha·T·(softmax(s/T) − p_teacher)/N + (1 − alpha)·(softmax(s) − onehot(y))/N`.
///
/// # Shapes
/// `student_logits`: `[N, C]`, `teacher_probs`: `[N, C]`, `labels`: `[N]` → scalars.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_probs: &Tensor,
    labels: Option<&Tensor>,
    t: f64,
    alpha: f64,
) -> Result<KdLoss> {
    check_temperature(t)?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Input(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    let (n, c) = check_rank2(student_logits, "student logits")?;
    if n == 0 {
        return Err(Error::Input("empty batch".into()));
    }
    if teacher_probs.dims() != student_logits.dims() {
        return Err(Error::Input(format!(
            "teacher probabilities have shape {:?}, student logits {:?}",
            teacher_probs.dims(),
            student_logits.dims()
        )));
    }
    let s = student_logits.to_dtype(DType::F32)?;
    let p = teacher_probs.to_dtype(DType::F32)?.detach();
    if s.device().is_cpu() && p.device().is_cpu() && c <= FUSED_MAX_CLASSES {
        let y = labels.map(|y| checked_labels(y, n, c)).transpose()?;
        return kd_loss_fused(&s, &p, y.as_ref(), t, alpha);
    }
    kd_loss_ops(&s, &p, labels, t, alpha)
}

/// [`kd_loss`] from candle tensor ops (any device; the reference of [`kd_loss_fused`]), on
/// checked f32 inputs.
fn kd_loss_ops(
    s: &Tensor,
    p: &Tensor,
    labels: Option<&Tensor>,
    t: f64,
    alpha: f64,
) -> Result<KdLoss> {
    let (n, c) = s.dims2()?;
    // Soft term: Σ_c p·(log p − log q_T). log p is taken of max(p, tiny) so p = 0 gives 0·finite.
    let log_q_t = tempered_log_softmax(s, t)?; // [N, C]
    let log_p = p.maximum(f32::MIN_POSITIVE)?.log()?; // [N, C]
    let soft = p.mul(&log_p.sub(&log_q_t)?)?.sum(1)?.mean(0)?; // [N, C] -> [N] -> []

    let (total, hard) = match labels {
        None => (soft.affine(t * t, 0.0)?, None),
        Some(y) => {
            let hard = hard_term(s, &checked_labels(y, n, c)?)?;
            let total = soft
                .affine(alpha * t * t, 0.0)?
                .add(&hard.affine(1.0 - alpha, 0.0)?)?;
            (total, Some(hard))
        }
    };
    Ok(KdLoss { total, soft, hard })
}

/// Up to this many classes [`kd_loss`] runs fused on the CPU. Above, it runs op by op: the
/// fused op's f64 sums are more accurate, but differ from the f32 op-by-op gradient by ~2e-6 at
/// 32,000 classes, and [`crate::topk::kd_loss_topk`] (op by op) is tested to match `kd_loss`
/// within 1e-6.
const FUSED_MAX_CLASSES: usize = 1024;

/// Batch mean of CE(y, softmax(s)) from candle ops, for `y` checked u32 labels.
///
/// # Shapes
/// `s`: `[N, C]`, `y`: `[N]` → `[]`.
fn hard_term(s: &Tensor, y: &Tensor) -> Result<Tensor> {
    let log_q = tempered_log_softmax(s, 1.0)?; // [N, C]
    // [N] -> [N, 1] -> gather -> [N, 1] -> [N] -> []
    let picked = log_q.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(picked.mean(0)?.neg()?)
}

/// [`kd_loss`] on the CPU: `total` and `soft` come from ONE op over `(s, p)` that
/// computes each row's two log-softmaxes, both terms and, backward, their gradient in one pass
/// (sums in f64), where the op-by-op version runs about 20 tensor ops forward and 30 backward.
/// `hard` (a metric; the total already holds it) stays the op-by-op value, so it is the same
/// number bit for bit as [`crate::topk::kd_loss_topk`]'s.
fn kd_loss_fused(
    s: &Tensor,
    p: &Tensor,
    labels: Option<&Tensor>,
    t: f64,
    alpha: f64,
) -> Result<KdLoss> {
    let op = KdFused {
        t,
        alpha,
        labels: labels.map(|y| y.to_vec1::<u32>()).transpose()?,
    };
    let out = s.contiguous()?.apply_op2(&p.contiguous()?, op)?; // [3]
    let hard = labels.map(|y| hard_term(s, y)).transpose()?;
    Ok(KdLoss {
        total: out.get(0)?,
        soft: out.get(1)?,
        hard,
    })
}

/// The fused KD loss: `(s [N, C], p [N, C])` → `[total, soft, hard]` (see [`kd_loss`]).
#[derive(Clone)]
struct KdFused {
    t: f64,
    alpha: f64,
    /// Hard labels, checked to lie in `0..C`; `None`: the soft term alone (alpha = 1).
    labels: Option<Vec<u32>>,
}

impl KdFused {
    /// Calls `f(row, log q_T (tempered log-softmax), log q (T = 1))` for every row of `s`.
    fn rows(&self, s: &[f32], c: usize, mut f: impl FnMut(usize, &[f64], &[f64])) {
        let (mut lq_t, mut lq) = (vec![0f64; c], vec![0f64; c]);
        for (i, row) in s.chunks_exact(c).enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let (mut sum_t, mut sum) = (0f64, 0f64);
            for &v in row {
                let d = v as f64 - m;
                sum_t += (d / self.t).exp();
                sum += d.exp();
            }
            let (lse_t, lse) = (sum_t.ln(), sum.ln());
            for ((a, b), &v) in lq_t.iter_mut().zip(lq.iter_mut()).zip(row) {
                let d = v as f64 - m;
                *a = d / self.t - lse_t;
                *b = d - lse;
            }
            f(i, &lq_t, &lq);
        }
    }

    /// alpha with labels, 1 without.
    fn alpha(&self) -> f64 {
        if self.labels.is_some() {
            self.alpha
        } else {
            1.0
        }
    }
}

impl CustomOp2 for KdFused {
    fn name(&self) -> &'static str {
        "kd-loss-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, p) = (
            crate::tensor::f32_slice(s1, l1, self.name())?,
            crate::tensor::f32_slice(s2, l2, self.name())?,
        );
        let (n, c) = l1.shape().dims2()?;
        if l2.shape() != l1.shape() || self.labels.as_ref().is_some_and(|y| y.len() != n) {
            candle_core::bail!("kd-loss-fused: shapes do not fit");
        }
        let (mut soft, mut hard) = (0f64, 0f64);
        self.rows(s, c, |i, lq_t, lq| {
            for (&pc, &l) in p[i * c..][..c].iter().zip(lq_t) {
                let pc = pc as f64;
                // 0·log 0 = 0, as log max(p, tiny) does in the op-by-op version.
                soft += pc * ((pc.max(f32::MIN_POSITIVE as f64)).ln() - l);
            }
            if let Some(y) = &self.labels {
                hard -= lq[y[i] as usize];
            }
        });
        let (soft, hard) = (soft / n as f64, hard / n as f64);
        let alpha = self.alpha();
        let total = alpha * self.t * self.t * soft + (1.0 - alpha) * hard;
        let out = vec![total as f32, soft as f32, hard as f32];
        Ok((CpuStorage::F32(out), Shape::from(3)))
    }

    fn bwd(
        &self,
        s: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let [g_total, g_soft, g_hard] = g[..] else {
            candle_core::bail!("kd-loss-fused backward: gradient of {} values", g.len())
        };
        let op = KdFusedGrad {
            loss: self.clone(),
            weights: [g_total as f64, g_soft as f64, g_hard as f64],
        };
        let ds = s.contiguous()?.apply_op2_no_bwd(&p.contiguous()?, &op)?;
        Ok((Some(ds), None))
    }
}

/// The gradient of `w·[total, soft, hard]` with respect to `s`, for upstream weights `w`:
/// `((w₀·alpha·T + w₁/T)·(q_T − p) + (w₀·(1 − alpha) + w₂)·(q − onehot(y))) / N`.
struct KdFusedGrad {
    loss: KdFused,
    weights: [f64; 3],
}

impl CustomOp2 for KdFusedGrad {
    fn name(&self) -> &'static str {
        "kd-loss-fused-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, p) = (
            crate::tensor::f32_slice(s1, l1, self.name())?,
            crate::tensor::f32_slice(s2, l2, self.name())?,
        );
        let (n, c) = l1.shape().dims2()?;
        let lo = &self.loss;
        let [w0, w1, w2] = self.weights;
        let alpha = lo.alpha();
        let nf = n as f64;
        let k_soft = (w0 * alpha * lo.t + w1 / lo.t) / nf;
        let k_hard = (w0 * (1.0 - alpha) + w2) / nf;
        let mut out = vec![0f32; n * c];
        lo.rows(s, c, |i, lq_t, lq| {
            let (o, pr) = (&mut out[i * c..][..c], &p[i * c..][..c]);
            for (j, (o, &pc)) in o.iter_mut().zip(pr).enumerate() {
                let mut g = k_soft * (lq_t[j].exp() - pc as f64);
                if let Some(y) = &lo.labels {
                    let onehot = if y[i] as usize == j { 1.0 } else { 0.0 };
                    g += k_hard * (lq[j].exp() - onehot);
                }
                *o = g as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

/// Hard labels as a u32 tensor on their device, after checking shape and range.
pub(crate) fn checked_labels(y: &Tensor, n: usize, c: usize) -> Result<Tensor> {
    if y.dims() != [n] {
        return Err(Error::Input(format!(
            "labels have shape {:?}, expected [{n}]",
            y.dims()
        )));
    }
    let values: Vec<i64> = match y.dtype() {
        DType::U8 => y.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => y.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => y.to_vec1::<i64>()?,
        other => {
            return Err(Error::Input(format!(
                "labels must be u8, u32 or i64, got {other:?}"
            )));
        }
    };
    if let Some(bad) = values.iter().find(|&&v| v < 0 || v as u64 >= c as u64) {
        return Err(Error::Input(format!(
            "label {bad} out of range for {c} classes"
        )));
    }
    Ok(y.to_dtype(DType::U32)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn host_combine_agrees_with_the_tensor_combine() {
        // Deterministic logits with a wide range (up to ±40 nats, so exp would overflow f32
        // without the max shift at T = 1/4 scale), three members, unequal weights.
        let (rows, classes) = (7, 13);
        let member = |m: usize| -> Vec<f32> {
            (0..rows * classes)
                .map(|i| (((i * 7 + m * 31) % 23) as f32 - 11.0) * (1.0 + m as f32) * 1.2)
                .collect()
        };
        let members: Vec<Vec<f32>> = (0..3).map(member).collect();
        for weights in [vec![1.0, 1.0, 1.0], vec![0.5, 2.0, 0.25]] {
            for mode in [Combine::MeanProb, Combine::MeanLogit] {
                let host = combine_host(&members, rows, classes, &weights, mode).unwrap();
                let tensors: Vec<Tensor> = members
                    .iter()
                    .map(|z| Tensor::from_slice(z, (rows, classes), &Device::Cpu).unwrap())
                    .collect();
                let dense = combine(&tensors, &weights, mode)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(host.len(), dense.len());
                let worst = host
                    .iter()
                    .zip(&dense)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Tolerance: f32 rounding of candle's op-by-op path on probabilities ≤ 1.
                assert!(worst <= 1e-6, "{mode} {weights:?}: max |Δ| {worst}");
                for row in host.chunks_exact(classes) {
                    let sum: f32 = row.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-5, "{sum}");
                }
            }
        }
        // A subset with the members as slices.
        let subset: Vec<&[f32]> = vec![&members[0], &members[2]];
        let p = combine_host(&subset, rows, classes, &[1.0, 3.0], Combine::MeanProb).unwrap();
        assert_eq!(p.len(), rows * classes);
    }

    #[test]
    fn host_combine_pins_a_small_case() {
        // By hand: softmax([0, ln 3]) = [1/4, 3/4]; softmax([ln 3, 0]) = [3/4, 1/4].
        let a = [0.0, 3f32.ln()];
        let b = [3f32.ln(), 0.0];
        let p = combine_host(&[&a[..], &b[..]], 1, 2, &[1.0, 3.0], Combine::MeanProb).unwrap();
        // 1/4·[1/4, 3/4] + 3/4·[3/4, 1/4] = [10/16, 6/16].
        assert!(
            (p[0] - 0.625).abs() < 1e-7 && (p[1] - 0.375).abs() < 1e-7,
            "{p:?}"
        );
        let p = combine_host(&[&a[..], &b[..]], 1, 2, &[1.0, 1.0], Combine::MeanLogit).unwrap();
        assert_eq!(p, vec![0.5, 0.5]);
        // Huge logits stay finite: softmax([1e30, 0]) = [1, 0].
        let big = [1e30f32, 0.0];
        let p = combine_host(&[&big[..]], 1, 2, &[1.0], Combine::MeanLogit).unwrap();
        assert_eq!(p, vec![1.0, 0.0]);
    }

    #[test]
    fn host_combine_refuses_bad_input_instead_of_nan() {
        let ok = vec![0.0f32; 6];
        let err = |members: &[Vec<f32>], w: &[f32]| {
            combine_host(members, 2, 3, w, Combine::MeanProb)
                .unwrap_err()
                .to_string()
        };
        let mut nan = ok.clone();
        nan[4] = f32::NAN;
        let e = err(&[ok.clone(), nan], &[1.0, 1.0]);
        assert!(e.contains("member 1 logit at row 1, class 1 is NaN"), "{e}");
        let mut inf = ok.clone();
        inf[0] = f32::INFINITY;
        assert!(err(&[inf], &[1.0]).contains("member 0 logit at row 0, class 0 is inf"));
        let e = err(&[ok.clone(), vec![0.0; 5]], &[1.0, 1.0]);
        assert!(
            e.contains("member 1 has 5 logits, expected 2 rows × 3 classes = 6"),
            "{e}"
        );
        assert!(
            err(std::slice::from_ref(&ok), &[1.0, 1.0])
                .contains("2 member weights given for 1 members")
        );
        assert!(
            err(std::slice::from_ref(&ok), &[f32::NAN]).contains("member weight 0 must be finite")
        );
        assert!(err(&[], &[]).contains("at least one member"));
    }

    // Independent references in plain f64 loops (no candle ops).

    fn softmax64(z: &[f64], t: f64) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| ((v - m) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// `alpha·T²·mean KL(p ‖ softmax(s/T)) + (1−alpha)·mean CE`, written from the formula.
    fn loss64(s: &[Vec<f64>], p: &[Vec<f64>], y: Option<&[usize]>, t: f64, alpha: f64) -> f64 {
        let n = s.len() as f64;
        let mut soft = 0.0;
        let mut hard = 0.0;
        for (i, (si, pi)) in s.iter().zip(p).enumerate() {
            let qt = softmax64(si, t);
            for (pc, qc) in pi.iter().zip(&qt) {
                if *pc > 0.0 {
                    soft += pc * (pc.ln() - qc.ln());
                }
            }
            if let Some(y) = y {
                hard -= softmax64(si, 1.0)[y[i]].ln();
            }
        }
        let alpha = if y.is_some() { alpha } else { 1.0 };
        alpha * t * t * soft / n + (1.0 - alpha) * hard / n
    }

    /// The analytic gradient from the module docs.
    fn grad64(s: &[Vec<f64>], p: &[Vec<f64>], y: &[usize], t: f64, alpha: f64) -> Vec<Vec<f64>> {
        let n = s.len() as f64;
        s.iter()
            .zip(p)
            .enumerate()
            .map(|(i, (si, pi))| {
                let qt = softmax64(si, t);
                let q1 = softmax64(si, 1.0);
                (0..si.len())
                    .map(|c| {
                        let onehot = if c == y[i] { 1.0 } else { 0.0 };
                        alpha * t * (qt[c] - pi[c]) / n + (1.0 - alpha) * (q1[c] - onehot) / n
                    })
                    .collect()
            })
            .collect()
    }

    fn tensor2(v: &[Vec<f64>]) -> Tensor {
        let c = v[0].len();
        let flat: Vec<f32> = v.iter().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(flat, (v.len(), c), &Device::Cpu).unwrap()
    }

    fn to64(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect()
    }

    fn assert_close(a: &[Vec<f64>], b: &[Vec<f64>], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (ra, rb) in a.iter().zip(b) {
            assert_eq!(ra.len(), rb.len());
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
            }
        }
    }

    fn student() -> Vec<Vec<f64>> {
        vec![
            vec![1.5, -0.3, 0.2, 2.0],
            vec![-1.0, 0.5, 0.0, 0.25],
            vec![3.0, 1.0, -2.0, 0.5],
        ]
    }

    fn teacher() -> Vec<Vec<f64>> {
        // Rows sum to 1; the last row has an exact zero (xlogy case).
        vec![
            vec![0.1, 0.2, 0.3, 0.4],
            vec![0.25, 0.25, 0.4, 0.1],
            vec![0.7, 0.2, 0.0, 0.1],
        ]
    }

    #[test]
    fn tempered_softmax_matches_reference_and_is_stable() {
        let z = vec![vec![1.0, 2.0, 3.0], vec![1000.0, 1001.0, 999.0]];
        for t in [1.0, 2.5, 20.0] {
            let q = to64(&tempered_softmax(&tensor2(&z), t).unwrap());
            let want: Vec<Vec<f64>> = z.iter().map(|r| softmax64(r, t)).collect();
            assert_close(&q, &want, 1e-6);
        }
        assert!(tempered_softmax(&tensor2(&z), 0.0).is_err());
        assert!(tempered_softmax(&tensor2(&z), f64::NAN).is_err());
        assert!(tempered_softmax(&tensor2(&z), -1.0).is_err());
    }

    #[test]
    fn combine_mean_prob_and_mean_logit_match_hand_computation() {
        let a = vec![vec![1.0, 0.0, -1.0], vec![0.5, 0.5, 2.0]];
        let b = vec![vec![-1.0, 2.0, 0.0], vec![0.0, 1.0, 0.0]];
        let (wa, wb) = (1.0f32, 3.0f32);
        let (na, nb) = (0.25, 0.75); // renormalised weights
        let members = [tensor2(&a), tensor2(&b)];

        let got = to64(&combine(&members, &[wa, wb], Combine::MeanProb).unwrap());
        let want: Vec<Vec<f64>> = (0..2)
            .map(|i| {
                let (pa, pb) = (softmax64(&a[i], 1.0), softmax64(&b[i], 1.0));
                (0..3).map(|c| na * pa[c] + nb * pb[c]).collect()
            })
            .collect();
        assert_close(&got, &want, 1e-6);

        let got = to64(&combine(&members, &[wa, wb], Combine::MeanLogit).unwrap());
        let want: Vec<Vec<f64>> = (0..2)
            .map(|i| {
                let z: Vec<f64> = (0..3).map(|c| na * a[i][c] + nb * b[i][c]).collect();
                softmax64(&z, 1.0)
            })
            .collect();
        assert_close(&got, &want, 1e-6);

        // Mean-logit is a normalised weighted geometric mean of the member distributions.
        for (i, row) in got.iter().enumerate() {
            let (pa, pb) = (softmax64(&a[i], 1.0), softmax64(&b[i], 1.0));
            let g: Vec<f64> = (0..3).map(|c| pa[c].powf(na) * pb[c].powf(nb)).collect();
            let gs: f64 = g.iter().sum();
            for c in 0..3 {
                assert!((row[c] - g[c] / gs).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn combine_renormalises_weights_for_subsets() {
        let a = vec![vec![1.0, 0.0, -1.0]];
        let b = vec![vec![-1.0, 2.0, 0.0]];
        for mode in [Combine::MeanProb, Combine::MeanLogit] {
            // One surviving member with any weight is that member's distribution.
            let one = to64(&combine(&[tensor2(&a)], &[0.3], mode).unwrap());
            assert_close(&one, &[softmax64(&a[0], 1.0)], 1e-6);
            // Scaling every weight changes nothing.
            let m = [tensor2(&a), tensor2(&b)];
            let x = to64(&combine(&m, &[1.0, 2.0], mode).unwrap());
            let y = to64(&combine(&m, &[10.0, 20.0], mode).unwrap());
            assert_close(&x, &y, 1e-6);
            let sum: f64 = x[0].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn combine_rejects_bad_input() {
        let a = tensor2(&[vec![1.0, 0.0]]);
        let b = tensor2(&[vec![1.0, 0.0, 2.0]]);
        let m = Combine::MeanProb;
        let msg = |r: Result<Tensor>| match r {
            Err(Error::Input(msg)) => msg,
            other => panic!("expected an input error, got {other:?}"),
        };
        assert!(msg(combine(&[], &[], m)).contains("at least one member"));
        assert!(msg(combine(&[a.clone(), b], &[1.0, 1.0], m)).contains("shape"));
        assert!(msg(combine(std::slice::from_ref(&a), &[1.0, 1.0], m)).contains("weights"));
        for w in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(msg(combine(std::slice::from_ref(&a), &[w], m)).contains("weight 0"));
        }
        let flat = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(msg(combine(&[flat], &[1.0], m)).contains("[N, C]"));
    }

    #[test]
    fn combine_names_round_trip() {
        assert_eq!(Combine::default(), Combine::MeanProb);
        for c in [Combine::MeanProb, Combine::MeanLogit] {
            assert_eq!(c.to_string().parse::<Combine>().unwrap(), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(serde_json::from_str::<Combine>(&json).unwrap(), c);
        }
        assert_eq!(Combine::MeanLogit.to_string(), "mean-logit");
        assert!("geometric".parse::<Combine>().is_err());
    }

    #[test]
    fn kd_loss_value_and_gradient_match_reference() {
        let (s, p, y) = (student(), teacher(), [3usize, 2, 0]);
        let labels = Tensor::new(&[3u32, 2, 0], &Device::Cpu).unwrap();
        for (t, alpha) in [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.0, 0.0)] {
            let sv = Var::from_tensor(&tensor2(&s)).unwrap();
            let out = kd_loss(sv.as_tensor(), &tensor2(&p), Some(&labels), t, alpha).unwrap();
            let (total, _, hard) = out.values().unwrap();
            let want = loss64(&s, &p, Some(&y), t, alpha);
            assert!(
                (f64::from(total) - want).abs() < 1e-4 * want.abs().max(1.0),
                "T={t} alpha={alpha}: {total} vs {want}"
            );
            assert!(hard.is_some());

            let grads = out.total.backward().unwrap();
            let g = to64(grads.get(sv.as_tensor()).unwrap());
            assert_close(&g, &grad64(&s, &p, &y, t, alpha), 1e-5);

            // Central finite difference on one element, in f64 on the reference loss.
            let h = 1e-5;
            let (mut plus, mut minus) = (s.clone(), s.clone());
            plus[1][2] += h;
            minus[1][2] -= h;
            let fd = (loss64(&plus, &p, Some(&y), t, alpha)
                - loss64(&minus, &p, Some(&y), t, alpha))
                / (2.0 * h);
            assert!((g[1][2] - fd).abs() < 1e-5, "T={t}: {} vs fd {fd}", g[1][2]);
        }
    }

    #[test]
    fn kd_loss_finite_difference_through_candle() {
        // A finite difference of candle's own forward pass agrees with its backward pass.
        let (s, p) = (student(), teacher());
        let labels = Tensor::new(&[1u32, 0, 3], &Device::Cpu).unwrap();
        let (t, alpha) = (3.0, 0.7);
        let f = |s: &[Vec<f64>]| -> f64 {
            let l = kd_loss(&tensor2(s), &tensor2(&p), Some(&labels), t, alpha).unwrap();
            f64::from(l.total.to_scalar::<f32>().unwrap())
        };
        let sv = Var::from_tensor(&tensor2(&s)).unwrap();
        let out = kd_loss(sv.as_tensor(), &tensor2(&p), Some(&labels), t, alpha).unwrap();
        let g = to64(out.total.backward().unwrap().get(sv.as_tensor()).unwrap());
        let h = 1e-2; // f32 forward: a large step keeps rounding noise small
        let (mut plus, mut minus) = (s.clone(), s.clone());
        plus[0][0] += h;
        minus[0][0] -= h;
        let fd = (f(&plus) - f(&minus)) / (2.0 * h);
        assert!((g[0][0] - fd).abs() < 1e-3, "{} vs fd {fd}", g[0][0]);
    }

    #[test]
    fn kd_loss_without_labels_is_the_soft_term() {
        let (s, p) = (student(), teacher());
        let t = 5.0;
        let sv = Var::from_tensor(&tensor2(&s)).unwrap();
        // alpha is ignored (taken as 1) without labels.
        let out = kd_loss(sv.as_tensor(), &tensor2(&p), None, t, 0.3).unwrap();
        let (total, soft, hard) = out.values().unwrap();
        assert!(hard.is_none());
        let want = loss64(&s, &p, None, t, 1.0);
        assert!((f64::from(total) - want).abs() < 1e-4 * want.max(1.0));
        assert!((f64::from(soft) * t * t - want).abs() < 1e-4 * want.max(1.0));
        let g = to64(out.total.backward().unwrap().get(sv.as_tensor()).unwrap());
        let unused = [0usize; 3];
        assert_close(&g, &grad64(&s, &p, &unused, t, 1.0), 1e-5);
    }

    #[test]
    fn kd_soft_term_is_zero_when_student_matches_teacher() {
        let t = 2.0;
        let s = student();
        let p: Vec<Vec<f64>> = s.iter().map(|r| softmax64(r, t)).collect();
        let out = kd_loss(&tensor2(&s), &tensor2(&p), None, t, 1.0).unwrap();
        let (_, soft, _) = out.values().unwrap();
        assert!(soft.abs() < 1e-6, "{soft}");
        // Any other teacher gives a positive divergence.
        let out = kd_loss(&tensor2(&s), &tensor2(&teacher()), None, t, 1.0).unwrap();
        assert!(out.values().unwrap().1 > 1e-3);
    }

    /// The fused CPU op against the op-by-op version: values of total, soft and hard, and the
    /// gradient of each, with and without labels, at several T and alpha, with a zero target.
    #[test]
    fn fused_kd_loss_matches_the_op_by_op_version() {
        let dev = Device::Cpu;
        let (n, c) = (7, 5);
        let s: Vec<f32> = (0..n * c)
            .map(|i| 6.0 * ((i * 37 % 11) as f32 / 11.0 - 0.5))
            .collect();
        let s = Tensor::from_vec(s, (n, c), &dev).unwrap();
        let z: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.7).sin() * 4.0).collect();
        let p = tempered_softmax(&Tensor::from_vec(z, (n, c), &dev).unwrap(), 2.0).unwrap();
        // One row with an exact zero (renormalised).
        let mut pv = p.to_vec2::<f32>().unwrap();
        pv[0][1] = 0.0;
        let sum: f32 = pv[0].iter().sum();
        pv[0].iter_mut().for_each(|v| *v /= sum);
        let p = Tensor::new(pv, &dev).unwrap();
        let y = Tensor::new(&[0u32, 4, 2, 1, 3, 3, 0], &dev).unwrap();
        for (labels, t, alpha) in [
            (true, 20.0, 0.9),
            (true, 1.0, 0.5),
            (false, 4.0, 0.3),
            (true, 2.0, 0.0),
            (true, 3.0, 1.0),
        ] {
            let case = format!("labels {labels} T {t} alpha {alpha}");
            let sv = Var::from_tensor(&s).unwrap();
            let y = labels.then_some(&y);
            let fused = kd_loss(sv.as_tensor(), &p, y, t, alpha).unwrap();
            let ops = kd_loss_ops(sv.as_tensor(), &p, y, t, alpha).unwrap();
            let (a, b) = (fused.values().unwrap(), ops.values().unwrap());
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-5 * y.abs().max(1.0);
            assert!(close(a.0, b.0) && close(a.1, b.1), "{case}: {a:?} vs {b:?}");
            assert_eq!(a.2.is_some(), b.2.is_some(), "{case}");
            if let (Some(x), Some(y)) = (a.2, b.2) {
                assert!(close(x, y), "{case}: hard {x} vs {y}");
            }
            let pairs = [
                (Some(fused.total), Some(ops.total)),
                (Some(fused.soft), Some(ops.soft)),
                (fused.hard, ops.hard),
            ];
            for (k, pair) in pairs.into_iter().enumerate() {
                let (Some(f), Some(o)) = pair else { continue };
                let gf = to64(f.backward().unwrap().get(sv.as_tensor()).unwrap());
                let go = to64(o.backward().unwrap().get(sv.as_tensor()).unwrap());
                for (rf, ro) in gf.iter().zip(&go) {
                    for (x, y) in rf.iter().zip(ro) {
                        assert!(
                            (x - y).abs() < 1e-5,
                            "{case}: gradient of output {k}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kd_loss_rejects_bad_input() {
        let s = tensor2(&student());
        let p = tensor2(&teacher());
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        let err = |r: Result<KdLoss>| match r {
            Err(Error::Input(msg)) => msg,
            other => panic!("expected an input error, got {other:?}"),
        };
        assert!(err(kd_loss(&s, &p, Some(&y), 0.0, 0.5)).contains("temperature"));
        assert!(err(kd_loss(&s, &p, Some(&y), 1.0, 1.5)).contains("alpha"));
        assert!(err(kd_loss(&s, &p, Some(&y), 1.0, f64::NAN)).contains("alpha"));
        let p2 = tensor2(&[vec![0.5, 0.5]]);
        assert!(err(kd_loss(&s, &p2, Some(&y), 1.0, 0.5)).contains("shape"));
        let y_bad = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
        assert!(err(kd_loss(&s, &p, Some(&y_bad), 1.0, 0.5)).contains("out of range"));
        let y_neg = Tensor::new(&[0i64, -1, 2], &Device::Cpu).unwrap();
        assert!(err(kd_loss(&s, &p, Some(&y_neg), 1.0, 0.5)).contains("out of range"));
        let y_short = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(err(kd_loss(&s, &p, Some(&y_short), 1.0, 0.5)).contains("labels"));
        let y_f = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap();
        assert!(err(kd_loss(&s, &p, Some(&y_f), 1.0, 0.5)).contains("u8, u32 or i64"));
        // u8 labels (as in IDX files) are accepted.
        let y8 = Tensor::new(&[0u8, 1, 2], &Device::Cpu).unwrap();
        assert!(kd_loss(&s, &p, Some(&y8), 1.0, 0.5).is_ok());
    }
}
