//! Scoring a model on a split: errors out of N, accuracy, per-class errors and the confusion
//! matrix (rows = true class, columns = predicted class), computed with batched inference.

use candle_core::{D, Device};
use serde::{Deserialize, Serialize};

use crate::data::Split;
use crate::model::Model;
use crate::{Error, Result};

/// Default rows per inference batch.
pub const EVAL_BATCH: usize = 1000;

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Rows scored.
    pub n: usize,
    /// Rows whose arg-max prediction is not their label.
    pub errors: usize,
    /// `(n − errors) / n` (0 for an empty split).
    pub accuracy: f64,
    /// Number of classes (the model's output width).
    pub classes: usize,
    /// Rows of each true class.
    pub per_class_total: Vec<usize>,
    /// Misclassified rows of each true class.
    pub per_class_errors: Vec<usize>,
    /// `confusion[true][predicted]` row counts; each row sums to `per_class_total`.
    pub confusion: Vec<Vec<usize>>,
}

impl EvalReport {
    /// An empty report for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            n: 0,
            errors: 0,
            accuracy: 0.0,
            classes,
            per_class_total: vec![0; classes],
            per_class_errors: vec![0; classes],
            confusion: vec![vec![0; classes]; classes],
        }
    }

    /// Counts one prediction.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.n += 1;
        self.per_class_total[truth] += 1;
        self.confusion[truth][predicted] += 1;
        if truth != predicted {
            self.errors += 1;
            self.per_class_errors[truth] += 1;
        }
        self.accuracy = (self.n - self.errors) as f64 / self.n as f64;
    }

    /// The confusion matrix and per-class errors as a fixed-width text table.
    pub fn table(&self) -> String {
        let w = self
            .confusion
            .iter()
            .flatten()
            .chain(&self.per_class_total)
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max(self.classes.saturating_sub(1).to_string().len())
            .max(3);
        let mut s = format!("{:>6} |", "true");
        for c in 0..self.classes {
            s += &format!(" {c:>w$}");
        }
        s += &format!(" | {:>w$} {:>w$} {:>7}\n", "n", "err", "err %");
        s += &format!("{}\n", "-".repeat(s.trim_end().chars().count()));
        for (t, row) in self.confusion.iter().enumerate() {
            s += &format!("{t:>6} |");
            for c in row {
                s += &format!(" {c:>w$}");
            }
            let (n, e) = (self.per_class_total[t], self.per_class_errors[t]);
            let pct = if n == 0 {
                0.0
            } else {
                100.0 * e as f64 / n as f64
            };
            s += &format!(" | {n:>w$} {e:>w$} {pct:>6.2}%\n");
        }
        s
    }
}

/// Predicted class (arg-max of the logits) of every row of `split`, in order.
///
/// `split`'s rows must have `model`'s input size; batches of `batch` rows are formed with the
/// model's own input shape.
pub fn predict(model: &Model, split: &Split, batch: usize) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(split.len());
    forward_batches(model, split, batch, |z| {
        // [B, classes] -> [B]
        out.extend(
            z.argmax(D::Minus1)?
                .to_device(&Device::Cpu)?
                .to_vec1::<u32>()?,
        );
        Ok(())
    })?;
    Ok(out)
}

/// The logits (T = 1) of every row of `split`, row-major `[rows, classes]`, as [`predict`]
/// computes them.
pub fn logits(model: &Model, split: &Split, batch: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(split.len() * model.spec().arch.classes());
    forward_batches(model, split, batch, |z| {
        out.extend(z.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    })?;
    Ok(out)
}

/// Runs `model` over `split` in batches of `batch` rows, handing each batch's logits to `f`.
fn forward_batches(
    model: &Model,
    split: &Split,
    batch: usize,
    mut f: impl FnMut(candle_core::Tensor) -> Result<()>,
) -> Result<()> {
    let arch = &model.spec().arch;
    if !split.is_empty() && split.row_len() != arch.input_size() {
        return Err(Error::Input(format!(
            "model {arch} takes rows of {} values but the data has rows of {}",
            arch.input_size(),
            split.row_len()
        )));
    }
    let shape = arch.input_shape();
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, _) = split.batch(&shape, chunk, model.device(), None)?;
        f(model.forward(&x)?)?;
    }
    Ok(())
}

/// A language model's figures over token windows ([`evaluate_tokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenEval {
    /// Positions scored (windows × L).
    pub positions: u64,
    /// Positions whose most probable next token is not the window's.
    pub errors: u64,
    /// Sum of the next-token negative log-likelihoods (nats).
    pub nll: f64,
    /// Positions whose top-1 is the reference's (a teacher's), when one was given.
    pub agree: u64,
}

impl TokenEval {
    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.positions.max(1) as f64).exp()
    }

    /// The share of positions whose top-1 is the reference's.
    pub fn agreement(&self) -> f64 {
        self.agree as f64 / self.positions.max(1) as f64
    }
}

/// Most logits one forward pass of [`evaluate_tokens`] computes (64 MiB of f32): the windows
/// of a pass are as many as fit, at least one.
const MAX_EVAL_LOGITS: usize = 1 << 24;

/// Scores a language model on the token windows of `split` ([`Features::Tokens`]): top-1
/// errors and the NLL of every position's next token, and with `reference` (one top-1 token
/// per position, in window order: a teacher's) the positions whose top-1 agrees with it.
pub fn evaluate_tokens(
    model: &Model,
    split: &Split,
    reference: Option<&[u32]>,
) -> Result<TokenEval> {
    let crate::data::Features::Tokens(_) = &split.x else {
        return Err(Error::Input(
            "a language model is scored on token windows".into(),
        ));
    };
    let w = split.row_len();
    if w < 2 {
        return Err(Error::Input(format!(
            "windows of {w} tokens: need at least 2"
        )));
    }
    let v = model.spec().arch.classes();
    if let Some(r) = reference
        && r.len() != split.len().saturating_mul(w - 1)
    {
        return Err(Error::Input(format!(
            "{} reference tokens for {} positions",
            r.len(),
            split.len().saturating_mul(w - 1)
        )));
    }
    let per_pass = (MAX_EVAL_LOGITS / (w - 1).saturating_mul(v).max(1)).max(1);
    let idx: Vec<usize> = (0..split.len()).collect();
    let mut out = TokenEval::default();
    for chunk in idx.chunks(per_pass) {
        let rows = split
            .rows_tokens(chunk)
            .ok_or_else(|| Error::Input("the split's rows are not tokens".into()))?;
        if let Some(t) = rows.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Input(format!(
                "token id {t} is not below the model's vocabulary of {v}"
            )));
        }
        let x = candle_core::Tensor::from_vec(rows.clone(), (chunk.len(), w), model.device())?;
        let logits = model.forward(&x)?; // [B·L, V]
        let next: Vec<u32> = rows
            .chunks_exact(w)
            .flat_map(|r| r[1..].iter().copied())
            .collect();
        let n = next.len();
        let next_t = candle_core::Tensor::from_vec(next.clone(), n, model.device())?;
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = lsm
            .gather(&next_t.unsqueeze(1)?, 1)?
            .sum_all()?
            .neg()?
            .to_scalar::<f32>()?;
        let top: Vec<u32> = logits
            .argmax(D::Minus1)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        if let Some(r) = reference {
            // `positions` positions come before this pass's, which fit in the reference.
            let at = out.positions as usize;
            let r = &r[at..at + n];
            out.agree += top.iter().zip(r).filter(|(a, b)| a == b).count() as u64;
        }
        out.positions += n as u64;
        out.errors += top.iter().zip(&next).filter(|(a, b)| a != b).count() as u64;
        out.nll += f64::from(nll);
    }
    Ok(out)
}

/// Scores `model` on every row of `split` (see [`predict`]). A language model on token
/// windows is scored per position ([`evaluate_tokens`]): `n` counts positions and the per-class
/// figures and the confusion matrix (vocabulary × vocabulary) are left empty.
pub fn evaluate(model: &Model, split: &Split, batch: usize) -> Result<EvalReport> {
    if let crate::data::Features::Tokens(_) = &split.x {
        let t = evaluate_tokens(model, split, None)?;
        let (n, errors) = (t.positions as usize, t.errors as usize);
        return Ok(EvalReport {
            n,
            errors,
            accuracy: if n == 0 {
                0.0
            } else {
                (n - errors) as f64 / n as f64
            },
            classes: model.spec().arch.classes(),
            per_class_total: Vec::new(),
            per_class_errors: Vec::new(),
            confusion: Vec::new(),
        });
    }
    let classes = model.spec().arch.classes();
    if let Some((i, y)) = split
        .y
        .iter()
        .enumerate()
        .find(|&(_, &y)| y as usize >= classes)
    {
        return Err(Error::Input(format!(
            "row {i} has label {y} but the model has {classes} classes"
        )));
    }
    let pred = predict(model, split, batch)?;
    let mut r = EvalReport::new(classes);
    for (&t, &p) in split.y.iter().zip(&pred) {
        r.add(t as usize, p as usize);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Tensor;

    use super::*;
    use crate::data::Features;
    use crate::spec::{Arch, ModelSpec};

    /// `mlp:3-3` with identity weights and zero bias: the prediction is the arg-max input.
    fn argmax_model() -> Model {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let eye: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        t.insert(
            "fc0.weight".to_string(),
            Tensor::from_vec(eye, (3, 3), &dev).unwrap(),
        );
        t.insert(
            "fc0.bias".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
        );
        Model::from_tensors(ModelSpec::new(Arch::parse("mlp:3-3").unwrap()), t, &dev).unwrap()
    }

    #[test]
    fn agrees_with_a_hand_computed_confusion_matrix() {
        // Each row is one-hot at its *predicted* class (u8 255 → 1.0); labels chosen by hand:
        //   row: 0 1 2 3 4 5 6
        //   true 0 0 1 1 1 2 2
        //   pred 0 1 1 2 1 2 0
        // confusion (true × pred): [[1,1,0],[0,2,1],[1,0,1]]; errors 3 of 7:
        // class 0: 1 of 2, class 1: 1 of 3, class 2: 1 of 2.
        let preds = [0usize, 1, 1, 2, 1, 2, 0];
        let mut x = vec![0u8; 7 * 3];
        for (r, &p) in preds.iter().enumerate() {
            x[r * 3 + p] = 255;
        }
        let split = Split {
            x: Features::U8(x),
            y: vec![0, 0, 1, 1, 1, 2, 2],
        };
        // Batch of 3 checks the batching covers a ragged last batch.
        let r = evaluate(&argmax_model(), &split, 3).unwrap();
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 1], vec![1, 0, 1]]
        );
        assert_eq!((r.n, r.errors), (7, 3));
        assert_eq!(r.per_class_errors, vec![1, 1, 1]);
        assert_eq!(r.per_class_total, vec![2, 3, 2]);
        assert!((r.accuracy - 4.0 / 7.0).abs() < 1e-12);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<EvalReport>(&json).unwrap(), r);
        let table = r.table();
        assert!(
            table.contains("     1 |   0   2   1 |   3   1  33.33%"),
            "{table}"
        );
    }

    #[test]
    fn rejects_wrong_row_size_and_labels() {
        let m = argmax_model();
        let wide = Split {
            x: Features::F32(vec![0.0; 8]),
            y: vec![0, 1],
        };
        let e = evaluate(&m, &wide, 10).unwrap_err().to_string();
        assert!(
            e.contains("rows of 3 values but the data has rows of 4"),
            "{e}"
        );
        let bad_label = Split {
            x: Features::F32(vec![0.0; 3]),
            y: vec![5],
        };
        let e = evaluate(&m, &bad_label, 10).unwrap_err().to_string();
        assert!(e.contains("label 5"), "{e}");
        let empty = Split {
            x: Features::F32(vec![]),
            y: vec![],
        };
        let r = evaluate(&m, &empty, 10).unwrap();
        assert_eq!((r.n, r.errors, r.accuracy), (0, 0, 0.0));
    }
}
