//! The per-token distillation loss of a language model, on the teacher's top-k
//! ([`crate::topk`]) with a **tail bucket**.
//!
//! One row per (sequence, position). The teacher's row keeps the k most probable next tokens
//! `K` with their probabilities `p_j` and the rest's total mass `R`; the student's tempered
//! distribution `q = softmax(s/T)` is folded onto the same k + 1 outcomes: `q_j` for `j ∈ K`
//! and `q_rest = Σ_{c∉K} q_c` (computed as a log-sum-exp over the classes not kept, so it is
//! exact even when tiny). The divergence is taken between those two distributions over k + 1
//! outcomes. Unlike spreading `R` uniformly over the C − k other tokens (what
//! [`crate::topk::kd_loss_topk`] does for classifiers), the bucket asks nothing of the student
//! about how it shares the tail among the tokens the teacher did not send, which the teacher
//! said nothing about either; with a vocabulary of 49,152 and k = 32 that is nearly all of it.
//!
//! - [`Divergence::ForwardKl`]: `Σ p·ln(p/q)` over the k + 1 outcomes (`0·ln 0 = 0`).
//! - [`Divergence::Jsd`]`(β)`: GKD's generalised Jensen–Shannon divergence (Agarwal et al.
//!   2024), `β·KL(p‖m) + (1 − β)·KL(q‖m)` with `m = β·p + (1 − β)·q`, β in (0, 1).
//!
//! The loss is `alpha·T²·D + (1 − alpha)·CE`, with CE the cross-entropy of the untempered
//! student on the true next token; both are averaged over the rows whose mask is 1 (padding
//! has mask 0 and contributes nothing, gradient included).

use candle_core::{D, DType, Tensor};

use crate::topk::SparseTargets;
use crate::{Error, Result};

/// Which divergence compares the teacher's and the student's next-token distributions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p ‖ q)`, the classic KD term.
    ForwardKl,
    /// GKD's generalised Jensen–Shannon divergence with this β in (0, 1).
    Jsd(f64),
}

/// The loss and its two terms (means over the unmasked rows).
#[derive(Debug, Clone)]
pub struct TokenLoss {
    /// `alpha·T²·divergence + (1 − alpha)·ce`, the scalar to differentiate.
    pub loss: Tensor,
    /// The divergence's mean (before `T²`).
    pub divergence: f32,
    /// The next-token cross-entropy's mean.
    pub ce: f32,
}

/// The per-token loss (module docs).
///
/// # Shapes
/// `student_logits`: `[N, C]` (f32), `targets`: N rows of C classes, `next_tokens`: `[N]` u32,
/// `mask`: N values, 1 for a real position, 0 for padding.
pub fn token_kd_loss(
    student_logits: &Tensor,
    targets: &SparseTargets,
    next_tokens: &Tensor,
    mask: &[f32],
    t: f64,
    alpha: f64,
    divergence: Divergence,
) -> Result<TokenLoss> {
    crate::kd::check_temperature(t)?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Input(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    if let Divergence::Jsd(beta) = divergence
        && !(beta > 0.0 && beta < 1.0)
    {
        return Err(Error::Input(format!(
            "the JSD's beta must be in (0, 1), got {beta}"
        )));
    }
    let (n, c) = student_logits.dims2()?;
    let k = targets.k();
    if targets.rows() != n || targets.classes() != c || mask.len() != n {
        return Err(Error::Input(format!(
            "{n} rows of {c} logits, {} target rows of {} classes and {} mask values",
            targets.rows(),
            targets.classes(),
            mask.len()
        )));
    }
    if next_tokens.dims() != [n] {
        return Err(Error::Input(format!(
            "next tokens of shape {:?} for {n} rows",
            next_tokens.dims()
        )));
    }
    if mask.iter().any(|m| !(*m == 0.0 || *m == 1.0)) {
        return Err(Error::Input("mask values must be 0 or 1".into()));
    }
    let valid: f32 = mask.iter().sum();
    if valid == 0.0 {
        return Err(Error::Input("every position is padding".into()));
    }
    let dev = student_logits.device();
    let s = student_logits.to_dtype(DType::F32)?;
    let idx = Tensor::from_slice(targets.indices(), (n, k), dev)?;
    // The student's tempered log-probabilities on the k kept tokens and on the tail bucket.
    let ls = log_softmax(&(&s / t)?)?;
    let mut lq = ls.gather(&idx, 1)?; // [N, k]
    let mut p: Vec<f32> = targets.probs().to_vec();
    let mut width = k;
    if k < c {
        let mut tail = vec![0f32; n * c];
        for (r, row) in targets.indices().chunks(k).enumerate() {
            for &j in row {
                tail[r * c + j as usize] = f32::NEG_INFINITY;
            }
        }
        let tail = Tensor::from_vec(tail, (n, c), dev)?;
        let lq_rest = logsumexp(&(ls + tail)?)?; // [N, 1]
        lq = Tensor::cat(&[&lq, &lq_rest], 1)?;
        p = p
            .chunks(k)
            .zip(targets.rest_mass())
            .flat_map(|(row, &rest)| row.iter().copied().chain(std::iter::once(rest)))
            .collect();
        width += 1;
    }
    let p_t = Tensor::from_vec(p.clone(), (n, width), dev)?;
    let per_row = match divergence {
        Divergence::ForwardKl => {
            // Σ p·ln p on the host (0·ln 0 = 0), minus Σ p·ln q.
            let neg_h: Vec<f32> = p
                .chunks(width)
                .map(|row| row.iter().map(|&x| xlnx(x)).sum())
                .collect();
            let neg_h = Tensor::from_vec(neg_h, n, dev)?;
            (neg_h - (&p_t * &lq)?.sum(1)?)?
        }
        Divergence::Jsd(beta) => {
            let q = lq.exp()?;
            let m = ((&p_t * beta)? + (&q * (1.0 - beta))?)?;
            let lm = m.log()?;
            // KL(p‖m): rows where p = 0 contribute 0 (their ln p is −inf, masked out).
            let lp: Vec<f32> = p
                .iter()
                .map(|&x| if x > 0.0 { x.ln() } else { 0.0 })
                .collect();
            let lp = Tensor::from_vec(lp, (n, width), dev)?;
            let kl_pm = (&p_t * (lp - &lm)?)?.sum(1)?;
            let kl_qm = (&q * (lq - lm)?)?.sum(1)?;
            ((kl_pm * beta)? + (kl_qm * (1.0 - beta))?)?
        }
    };
    let ce_rows = log_softmax(&s)?
        .gather(&next_tokens.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let mask_t = Tensor::from_slice(mask, n, dev)?;
    let mean =
        |x: Tensor| -> Result<Tensor> { Ok(((x * &mask_t)?.sum_all()? / f64::from(valid))?) };
    let div = mean(per_row)?;
    let ce = mean(ce_rows)?;
    let loss = ((&div * (alpha * t * t))? + (&ce * (1.0 - alpha))?)?;
    Ok(TokenLoss {
        loss,
        divergence: div.to_scalar::<f32>()?,
        ce: ce.to_scalar::<f32>()?,
    })
}

fn xlnx(x: f32) -> f32 {
    if x > 0.0 { x * x.ln() } else { 0.0 }
}

/// `ln Σ exp(x)` over the last dimension, keeping it: `[N, C]` → `[N, 1]`; a row of only −inf
/// gives −inf.
fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    // A row of −inf has max −inf: shift it by 0 instead, so it stays −inf rather than NaN.
    let m = m.maximum(f32::MIN)?;
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?)
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(&logsumexp(x)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topk::{TopKFormat, decode, encode};
    use candle_core::{Device, Var};

    const C: usize = 11;
    const N: usize = 4;

    fn teacher_logits() -> Vec<f32> {
        (0..N * C)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.4)
            .collect()
    }

    fn student_logits() -> Vec<f32> {
        (0..N * C)
            .map(|i| ((i * 13 % 19) as f32 - 9.0) * 0.3)
            .collect()
    }

    fn targets(k: usize, t: f32) -> SparseTargets {
        let tempered: Vec<f32> = teacher_logits().iter().map(|x| x / t).collect();
        let f = TopKFormat::new(C, k).unwrap();
        decode(&encode(&tempered, N, &f).unwrap(), N, &f).unwrap()
    }

    /// The loss computed independently, in f64, from the decoded targets.
    fn reference(
        s: &[f32],
        tg: &SparseTargets,
        next: &[u32],
        mask: &[f32],
        t: f64,
        alpha: f64,
        div: Divergence,
    ) -> f64 {
        let k = tg.k();
        let (mut dsum, mut csum, mut valid) = (0.0, 0.0, 0.0);
        for r in 0..N {
            if mask[r] == 0.0 {
                continue;
            }
            valid += 1.0;
            let row = &s[r * C..(r + 1) * C];
            let soft = |scale: f64| -> Vec<f64> {
                let z: Vec<f64> = row.iter().map(|&x| f64::from(x) / scale).collect();
                let m = z.iter().cloned().fold(f64::MIN, f64::max);
                let sum: f64 = z.iter().map(|x| (x - m).exp()).sum();
                z.iter().map(|x| (x - m).exp() / sum).collect()
            };
            let q = soft(t);
            let idx = &tg.indices()[r * k..(r + 1) * k];
            let mut pb: Vec<f64> = tg.probs()[r * k..(r + 1) * k]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let mut qb: Vec<f64> = idx.iter().map(|&j| q[j as usize]).collect();
            if k < C {
                pb.push(f64::from(tg.rest_mass()[r]));
                qb.push(
                    (0..C)
                        .filter(|c| !idx.contains(&(*c as u32)))
                        .map(|c| q[c])
                        .sum(),
                );
            }
            let kl = |a: &[f64], b: &[f64]| -> f64 {
                a.iter()
                    .zip(b)
                    .map(|(&x, &y)| if x > 0.0 { x * (x / y).ln() } else { 0.0 })
                    .sum()
            };
            dsum += match div {
                Divergence::ForwardKl => kl(&pb, &qb),
                Divergence::Jsd(beta) => {
                    let m: Vec<f64> = pb
                        .iter()
                        .zip(&qb)
                        .map(|(x, y)| beta * x + (1.0 - beta) * y)
                        .collect();
                    beta * kl(&pb, &m) + (1.0 - beta) * kl(&qb, &m)
                }
            };
            csum -= soft(1.0)[next[r] as usize].ln();
        }
        alpha * t * t * dsum / valid + (1.0 - alpha) * csum / valid
    }

    #[test]
    fn values_and_gradients_match_an_independent_computation() {
        let next: Vec<u32> = vec![3, 0, 10, 7];
        let mask = [1.0, 1.0, 0.0, 1.0];
        let dev = Device::Cpu;
        for (k, div) in [
            (3, Divergence::ForwardKl),
            (C, Divergence::ForwardKl),
            (4, Divergence::Jsd(0.5)),
            (4, Divergence::Jsd(0.1)),
        ] {
            let (t, alpha) = (2.0, 0.7);
            let tg = targets(k, t as f32);
            let s = student_logits();
            let var = Var::from_vec(s.clone(), (N, C), &dev).unwrap();
            let y = Tensor::from_slice(&next, N, &dev).unwrap();
            let out = token_kd_loss(var.as_tensor(), &tg, &y, &mask, t, alpha, div).unwrap();
            let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
            let want = reference(&s, &tg, &next, &mask, t, alpha, div);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{k} {div:?}: {got} vs {want}"
            );
            // The gradient against central differences of the reference.
            let grads = out.loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            for i in [0, 5, 12, 23, 30, 43] {
                let h = 1e-3f32;
                let (mut a, mut b) = (s.clone(), s.clone());
                a[i] += h;
                b[i] -= h;
                let fd = (reference(&a, &tg, &next, &mask, t, alpha, div)
                    - reference(&b, &tg, &next, &mask, t, alpha, div))
                    / (2.0 * f64::from(h));
                assert!(
                    (f64::from(g[i]) - fd).abs() < 2e-3 * fd.abs().max(0.05),
                    "{k} {div:?}: d/ds[{i}] {} vs {fd}",
                    g[i]
                );
                if i / C == 2 {
                    assert_eq!(g[i], 0.0, "a padded row has a gradient");
                }
            }
        }
    }

    #[test]
    fn a_student_equal_to_the_teacher_has_no_divergence_and_bad_input_is_refused() {
        let dev = Device::Cpu;
        let t = 3.0;
        let tg = targets(C, t as f32);
        let s = Tensor::from_vec(teacher_logits(), (N, C), &dev).unwrap();
        let y = Tensor::from_slice(&[0u32, 1, 2, 3], N, &dev).unwrap();
        let out = token_kd_loss(&s, &tg, &y, &[1.0; N], t, 1.0, Divergence::ForwardKl).unwrap();
        assert!(out.divergence.abs() < 1e-3, "{}", out.divergence);
        let tg = targets(4, t as f32);
        let out = token_kd_loss(&s, &tg, &y, &[1.0; N], t, 1.0, Divergence::ForwardKl).unwrap();
        // The tail bucket holds exactly the mass the teacher left out: still a perfect match.
        assert!(out.divergence.abs() < 1e-3, "{}", out.divergence);
        for (mask, what) in [([0.0; N], "padding"), ([0.5; N], "0 or 1")] {
            let e = token_kd_loss(&s, &tg, &y, &mask, t, 0.5, Divergence::ForwardKl).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let e = token_kd_loss(&s, &tg, &y, &[1.0; N], t, 0.5, Divergence::Jsd(1.0)).unwrap_err();
        assert!(e.to_string().contains("beta"), "{e}");
        let short = Tensor::from_slice(&[0u32, 1], 2, &dev).unwrap();
        assert!(token_kd_loss(&s, &tg, &short, &[1.0; N], t, 0.5, Divergence::ForwardKl).is_err());
    }
}
