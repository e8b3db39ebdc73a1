//! Checked decoding of the coordinator's batches into plain host arrays, before anything touches
//! the model (DESIGN.md: every input is validated first).
//!
//! Decisions written down here:
//! - Inputs may arrive as `[B, ...input_shape]` or any `[B, ...]` with the same row length (e.g.
//!   flattened rows); they are reshaped to `[B, ...input_shape]`. U8 inputs become `v / 255`
//!   (exactly the value `distill_core::data::Split::batch` produces), F32 inputs must be finite.
//! - Labels are I64 `[B]` in `0..classes`.
//! - Soft targets are F32, F16 or BF16 `[B, classes]`: finite, `>= 0`, and every row sums to 1
//!   within [`ROW_SUM_TOLERANCE`] (they are probabilities; f16 rounding stays far inside it).
//! - A training batch's `temperature` must equal the run's T (to f32 precision): soft targets
//!   at another T would silently train the wrong objective.

use distill_core::soft_targets::Encoding;
use distill_proto::pb;
use distill_proto::{DType, HostTensor};

use crate::{Error, Result};

/// Largest accepted `|Σ_c p_c − 1|` of a soft-target row (the decoder is `distill-core`'s).
pub use distill_core::soft_targets::ROW_SUM_TOLERANCE;

/// What every batch of a run must look like (from `JoinResponse` and the student settings).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpec {
    /// Shape of one input row, without the batch dimension.
    pub input_shape: Vec<usize>,
    /// Number of classes (columns of the soft targets; labels are below it).
    pub classes: usize,
    /// The run's temperature T.
    pub temperature: f64,
    /// For a language model, the positions `L` of a window: each input row is `L + 1` token
    /// ids (I64), labels are `[B, L]` (the next tokens) and the soft targets have `B·L` rows.
    pub positions: Option<usize>,
}

impl BatchSpec {
    /// Label (and soft-target) rows of a batch of `rows` input rows.
    fn target_rows(&self, rows: usize) -> std::result::Result<usize, String> {
        match self.positions {
            None => Ok(rows),
            Some(l) => rows
                .checked_mul(l)
                .ok_or_else(|| format!("{rows} windows of {l} positions overflow")),
        }
    }
}

/// A decoded training batch in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainData {
    /// Lease id to ack with.
    pub lease_id: u64,
    /// Epoch of the batch (0-based).
    pub epoch: u32,
    /// Index of the batch within its epoch.
    pub index: u32,
    /// Inputs, row-major, `rows × prod(input_shape)` values.
    pub x: Vec<f32>,
    /// `[rows, ...input_shape]`.
    pub x_shape: Vec<usize>,
    /// Hard labels, `rows` values (a language model's: `rows × L` next tokens).
    pub y: Vec<u32>,
    /// The soft targets (one row per label).
    pub soft: Targets,
    /// Rows in the batch (B).
    pub rows: usize,
}

/// A batch's soft targets, as they came: dense probabilities or the top-k encoding.
pub use distill_core::soft_targets::Targets;

/// A decoded evaluation batch in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalData {
    /// Inputs, row-major.
    pub x: Vec<f32>,
    /// `[rows, ...input_shape]`.
    pub x_shape: Vec<usize>,
    /// Labels, `rows` values (a language model's: `rows × L` next tokens).
    pub y: Vec<u32>,
    /// Rows in the batch.
    pub rows: usize,
}

/// Decodes and checks a training batch; the error says which field is wrong and how.
///
/// # Shapes
/// `inputs`: `[B, ...]` (row length `prod(input_shape)`), `labels`: `[B]`, `soft_targets`:
/// `[B, classes]`.
pub fn decode_train(b: pb::TrainBatch, spec: &BatchSpec) -> Result<TrainData> {
    let pb::TrainBatch {
        lease_id,
        epoch,
        index,
        inputs,
        labels,
        soft_targets,
        temperature,
        members: _, // informational: which members were combined
        topk_targets,
        encoding: _, // informational: the fields say what they hold
        cached: _,   // informational: whether the coordinator's cache answered
    } = b;
    let ctx = |m: String| {
        Error::BadBatch(format!(
            "epoch {epoch} batch {index} (lease {lease_id}): {m}"
        ))
    };
    let t = f64::from(temperature);
    if !(t.is_finite() && t > 0.0) {
        return Err(ctx(format!(
            "temperature must be finite and > 0, got {temperature}"
        )));
    }
    if (t - spec.temperature).abs() > 1e-6 * spec.temperature {
        return Err(ctx(format!(
            "soft targets are at temperature {temperature}, the run's T is {}",
            spec.temperature
        )));
    }
    let (x, x_shape, rows) = decode_inputs(inputs, spec).map_err(ctx)?;
    let y = decode_labels(labels, rows, spec).map_err(ctx)?;
    let n = y.len();
    let soft = match (soft_targets, topk_targets) {
        (Some(t), None) => {
            Targets::Dense(decode_soft_targets(Some(t), n, spec.classes).map_err(ctx)?)
        }
        (None, Some(t)) => Targets::TopK(decode_topk(t, n, spec.classes).map_err(ctx)?),
        (Some(_), Some(_)) => {
            return Err(ctx(
                "both `soft_targets` and `topk_targets` are set; a batch carries one".into(),
            ));
        }
        (None, None) => return Err(ctx("missing tensor `soft_targets`".into())),
    };
    Ok(TrainData {
        lease_id,
        epoch,
        index,
        x,
        x_shape,
        y,
        soft,
        rows,
    })
}

/// Decodes and checks an evaluation batch.
///
/// # Shapes
/// `inputs`: `[B, ...]`, `labels`: `[B]`.
pub fn decode_eval(b: pb::EvalBatch, spec: &BatchSpec) -> Result<EvalData> {
    let pb::EvalBatch { inputs, labels } = b;
    let ctx = |m: String| Error::BadBatch(format!("evaluation batch: {m}"));
    let (x, x_shape, rows) = decode_inputs(inputs, spec).map_err(ctx)?;
    let y = decode_labels(labels, rows, spec).map_err(ctx)?;
    Ok(EvalData {
        x,
        x_shape,
        y,
        rows,
    })
}

fn host(t: Option<pb::Tensor>, name: &str) -> std::result::Result<HostTensor, String> {
    let t = t.ok_or_else(|| format!("missing tensor `{name}`"))?;
    HostTensor::try_from(t).map_err(|e| format!("`{name}`: {e}"))
}

/// `(values, [B, ...input_shape], B)`.
fn decode_inputs(
    t: Option<pb::Tensor>,
    spec: &BatchSpec,
) -> std::result::Result<(Vec<f32>, Vec<usize>, usize), String> {
    let t = host(t, "inputs")?;
    let want: usize = spec.input_shape.iter().product();
    let (rows, row_len) = match t.shape().split_first() {
        Some((&b, rest)) => (b, rest.iter().product::<usize>()),
        None => return Err("`inputs` is a scalar; expected [B, ...]".into()),
    };
    if rows == 0 {
        return Err("`inputs` has no rows".into());
    }
    if row_len != want {
        return Err(format!(
            "`inputs` has shape {:?}: rows of {row_len} values, but the run's input shape {:?} \
             has {want}",
            t.shape(),
            spec.input_shape
        ));
    }
    let x = match t.dtype() {
        DType::I64 if spec.positions.is_some() => {
            // Token ids travel as f32 to the model (exact: a vocabulary is far below 2^24).
            let ids = i64_values(t.data(), spec.classes).map_err(|(i, v)| {
                format!(
                    "`inputs` element {i} is token {v}, not below the vocabulary of {}",
                    spec.classes
                )
            })?;
            ids.into_iter().map(|v| v as f32).collect()
        }
        _ if spec.positions.is_some() => {
            return Err(format!(
                "`inputs` of a language model must be I64 token ids, got {:?}",
                t.dtype()
            ));
        }
        // The one pixel scaling of distill, so teacher and student see the same inputs.
        DType::U8 => distill_core::data::pixels_to_f32(t.data()),
        DType::F32 => {
            if let Some(i) = t.first_non_finite() {
                return Err(format!("`inputs` element {i} is not finite"));
            }
            t.to_f32_vec()
        }
        other => return Err(format!("`inputs` must be U8 or F32, got {other:?}")),
    };
    let mut shape = Vec::with_capacity(spec.input_shape.len() + 1);
    shape.push(rows); // [B] + input_shape = [B, ...input_shape]
    shape.extend_from_slice(&spec.input_shape);
    Ok((x, shape, rows))
}

fn decode_labels(
    t: Option<pb::Tensor>,
    rows: usize,
    spec: &BatchSpec,
) -> std::result::Result<Vec<u32>, String> {
    let t = host(t, "labels")?;
    if t.dtype() != DType::I64 {
        return Err(format!("`labels` must be I64, got {:?}", t.dtype()));
    }
    let classes = spec.classes;
    match spec.positions {
        None if t.shape() != [rows] => {
            return Err(format!(
                "`labels` has shape {:?}, expected [{rows}] (one per input row)",
                t.shape()
            ));
        }
        Some(l) if t.shape() != [rows, l] => {
            return Err(format!(
                "`labels` has shape {:?}, expected [{rows}, {l}] (the next token at each \
                 position)",
                t.shape()
            ));
        }
        _ => {}
    }
    spec.target_rows(rows)?;
    i64_values(t.data(), classes)
        .map_err(|(i, v)| format!("label {v} at row {i} is out of range for {classes} classes"))
}

/// Little-endian i64 values, each in `0..classes`; else the first bad one and its index.
fn i64_values(data: &[u8], classes: usize) -> std::result::Result<Vec<u32>, (usize, i64)> {
    data.chunks_exact(8)
        .enumerate()
        .map(|(i, c)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let v = i64::from_le_bytes(a);
            u32::try_from(v)
                .ok()
                .filter(|&v| (v as usize) < classes)
                .ok_or((i, v))
        })
        .collect()
}

fn decode_topk(
    t: pb::TopKTargets,
    rows: usize,
    classes: usize,
) -> std::result::Result<distill_core::topk::SparseTargets, String> {
    use distill_core::topk::{TopKFormat, ValueDtype};
    let pb::TopKTargets {
        k,
        classes: c,
        value_dtype,
        data,
    } = t;
    if c as usize != classes {
        return Err(format!(
            "`topk_targets` are over {c} classes, the run has {classes}"
        ));
    }
    let value = match DType::try_from(value_dtype) {
        Ok(DType::F16) => ValueDtype::F16,
        Ok(DType::BF16) => ValueDtype::Bf16,
        _ => {
            return Err(format!(
                "`topk_targets.value_dtype` must be F16 or BF16, got {value_dtype}"
            ));
        }
    };
    let format = TopKFormat::with_value_dtype(classes, k as usize, value)
        .map_err(|e| format!("`topk_targets`: {e}"))?;
    distill_core::topk::decode(&data, rows, &format).map_err(|e| format!("`topk_targets`: {e}"))
}

fn decode_soft_targets(
    t: Option<pb::Tensor>,
    rows: usize,
    classes: usize,
) -> std::result::Result<Vec<f32>, String> {
    let t = host(t, "soft_targets")?;
    let encoding = match t.dtype() {
        DType::F32 => Encoding::F32,
        DType::F16 => Encoding::F16,
        DType::BF16 => Encoding::Bf16,
        other => {
            return Err(format!(
                "`soft_targets` must be F32, F16 or BF16, got {other:?}"
            ));
        }
    };
    if t.shape() != [rows, classes] {
        return Err(format!(
            "`soft_targets` has shape {:?}, expected [{rows}, {classes}]",
            t.shape()
        ));
    }
    match distill_core::soft_targets::decode(t.data(), rows, classes, encoding) {
        Ok(Targets::Dense(p)) => Ok(p),
        Ok(Targets::TopK(_)) => Err("`soft_targets` decoded as top-k; expected dense".into()),
        Err(e) => Err(format!("`soft_targets` {e}")),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn spec() -> BatchSpec {
        BatchSpec {
            positions: None,
            input_shape: vec![1, 2, 2],
            classes: 3,
            temperature: 4.0,
        }
    }

    fn tensor(shape: &[u64], dtype: pb::DType, data: Vec<u8>) -> Option<pb::Tensor> {
        Some(pb::Tensor {
            shape: shape.to_vec(),
            dtype: dtype as i32,
            data: Bytes::from(data),
        })
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Two rows of 2×2 u8 pixels, labels [2, 0], soft targets that sum to 1.
    fn good() -> pb::TrainBatch {
        pb::TrainBatch {
            lease_id: 7,
            epoch: 1,
            index: 3,
            inputs: tensor(
                &[2, 1, 2, 2],
                pb::DType::DtypeU8,
                vec![0, 51, 102, 255, 1, 2, 3, 4],
            ),
            labels: tensor(&[2], pb::DType::DtypeI64, i64s(&[2, 0])),
            soft_targets: tensor(
                &[2, 3],
                pb::DType::DtypeF32,
                f32s(&[0.1, 0.2, 0.7, 0.5, 0.25, 0.25]),
            ),
            temperature: 4.0,
            members: vec!["a".into()],
            topk_targets: None,
            encoding: "f32".into(),
            cached: false,
        }
    }

    fn err(b: pb::TrainBatch) -> String {
        match decode_train(b, &spec()) {
            Ok(_) => String::from("decoded without error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn decodes_a_good_batch() {
        let d = decode_train(good(), &spec()).unwrap();
        assert_eq!((d.lease_id, d.epoch, d.index, d.rows), (7, 1, 3, 2));
        assert_eq!(d.x_shape, vec![2, 1, 2, 2]);
        assert_eq!(d.x[..4], [0.0, 0.2, 0.4, 1.0]);
        assert_eq!(d.x[4], 1.0 / 255.0);
        assert_eq!(d.y, vec![2, 0]);
        assert_eq!(d.soft, Targets::Dense(vec![0.1, 0.2, 0.7, 0.5, 0.25, 0.25]));

        // Flattened f32 rows and f16 soft targets are fine too.
        let mut b = good();
        b.inputs = tensor(&[2, 4], pb::DType::DtypeF32, f32s(&[0.5; 8]));
        let h: Vec<u8> = [0.5f32, 0.25, 0.25, 1.0, 0.0, 0.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        b.soft_targets = tensor(&[2, 3], pb::DType::DtypeF16, h);
        let d = decode_train(b, &spec()).unwrap();
        assert_eq!(d.x_shape, vec![2, 1, 2, 2]);
        assert_eq!(d.soft, Targets::Dense(vec![0.5, 0.25, 0.25, 1.0, 0.0, 0.0]));
    }

    #[test]
    fn rejects_malformed_batches_with_clear_messages() {
        let mut b = good();
        b.inputs = tensor(&[2, 1, 2, 2], pb::DType::DtypeU8, vec![0; 7]);
        let e = err(b);
        assert!(
            e.contains("epoch 1 batch 3 (lease 7)")
                && e.contains("`inputs`")
                && e.contains("needs 8 bytes, got 7"),
            "{e}"
        );

        let mut b = good();
        b.inputs = tensor(&[2, 3], pb::DType::DtypeU8, vec![0; 6]);
        let e = err(b);
        assert!(
            e.contains("rows of 3 values, but the run's input shape [1, 2, 2] has 4"),
            "{e}"
        );

        let mut b = good();
        b.inputs = tensor(&[0, 4], pb::DType::DtypeU8, vec![]);
        assert!(err(b).contains("no rows"));

        let mut b = good();
        b.inputs = tensor(&[2, 4], pb::DType::DtypeI64, i64s(&[0; 8]));
        assert!(err(b).contains("`inputs` must be U8 or F32, got I64"));

        let mut b = good();
        let mut x = [0.5f32; 8];
        x[5] = f32::INFINITY;
        b.inputs = tensor(&[2, 4], pb::DType::DtypeF32, f32s(&x));
        assert!(err(b).contains("`inputs` element 5 is not finite"));

        let mut b = good();
        b.labels = tensor(&[2], pb::DType::DtypeI64, i64s(&[1, 3]));
        assert!(err(b).contains("label 3 at row 1 is out of range for 3 classes"));
        let mut b = good();
        b.labels = tensor(&[2], pb::DType::DtypeI64, i64s(&[-1, 0]));
        assert!(err(b).contains("label -1 at row 0 is out of range"));
        let mut b = good();
        b.labels = tensor(&[3], pb::DType::DtypeI64, i64s(&[0, 0, 0]));
        assert!(err(b).contains("`labels` has shape [3], expected [2]"));
        let mut b = good();
        b.labels = None;
        assert!(err(b).contains("missing tensor `labels`"));

        let mut b = good();
        b.soft_targets = tensor(
            &[2, 3],
            pb::DType::DtypeF32,
            f32s(&[0.1, f32::NAN, 0.7, 0.5, 0.25, 0.25]),
        );
        let e = err(b);
        assert!(
            e.contains("`soft_targets` element 1 (row 0, class 1) is not finite"),
            "{e}"
        );
        let mut b = good();
        b.soft_targets = tensor(&[3, 2], pb::DType::DtypeF32, f32s(&[0.5; 6]));
        assert!(err(b).contains("`soft_targets` has shape [3, 2], expected [2, 3]"));
        let mut b = good();
        b.soft_targets = tensor(
            &[2, 3],
            pb::DType::DtypeF32,
            f32s(&[0.1, 0.2, 0.7, 0.5, 0.5, 0.5]),
        );
        assert!(err(b).contains("row 1 sums to 1.5"));
        let mut b = good();
        b.soft_targets = tensor(
            &[2, 3],
            pb::DType::DtypeF32,
            f32s(&[1.2, -0.2, 0.0, 0.5, 0.25, 0.25]),
        );
        assert!(err(b).contains("row 0 class 1 is -0.2"));

        let mut b = good();
        b.temperature = 2.0;
        assert!(err(b).contains("temperature 2, the run's T is 4"));
        let mut b = good();
        b.temperature = f32::NAN;
        assert!(err(b).contains("temperature must be finite"));
    }

    #[test]
    fn eval_batches_are_checked_too() {
        let b = pb::EvalBatch {
            inputs: tensor(&[1, 4], pb::DType::DtypeU8, vec![255; 4]),
            labels: tensor(&[1], pb::DType::DtypeI64, i64s(&[1])),
        };
        let d = decode_eval(b, &spec()).unwrap();
        assert_eq!(
            (d.rows, d.y.clone(), d.x_shape.clone()),
            (1, vec![1], vec![1, 1, 2, 2])
        );
        assert_eq!(d.x, vec![1.0; 4]);
        let b = pb::EvalBatch {
            inputs: tensor(&[1, 4], pb::DType::DtypeU8, vec![255; 4]),
            labels: tensor(&[1], pb::DType::DtypeF32, f32s(&[1.0])),
        };
        let e = decode_eval(b, &spec()).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("evaluation batch: `labels` must be I64, got F32"),
            "{e}"
        );
    }
}
