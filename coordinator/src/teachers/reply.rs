//! The check every teacher reply passes before its logits go anywhere (the soft-target
//! combination, the cache, a worker): a replica is a third party, and one NaN in a batch's
//! targets would fail every worker that trains on it.

use distill_core::topk::{self, TopKFormat, ValueDtype};
use distill_proto::pb::{InferResponse, TopKTargets};
use distill_proto::{DType, HostTensor};

/// Why a reply's logits were not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadReply {
    /// The reply carries no logits tensor.
    #[error("the reply has no logits")]
    Missing,
    /// The wire tensor is malformed (unknown dtype, length not matching its shape).
    #[error("logits: {0}")]
    Tensor(String),
    /// Logits of another element type than the F32 asked for.
    #[error("logits are {got:?}, expected F32")]
    DType {
        /// What the replica sent.
        got: DType,
    },
    /// Logits of another shape than `[rows, classes]`.
    #[error("logits have shape {got:?}, expected [{rows}, {classes}]")]
    Shape {
        /// What the replica sent.
        got: Vec<usize>,
        /// Rows of the request.
        rows: usize,
        /// Classes of the data.
        classes: usize,
    },
    /// A reply to token sequences without top-k rows.
    #[error("the reply has no top-k rows")]
    MissingTopK,
    /// Top-k rows that are not what was asked or not valid.
    #[error("top-k rows: {0}")]
    TopK(String),
    /// A NaN or infinite value.
    #[error("logits hold {value} at row {row}, class {class}")]
    NonFinite {
        /// Row of the first such value.
        row: usize,
        /// Its class.
        class: usize,
        /// The value.
        value: f32,
    },
}

/// The logits of `reply` as `rows × classes` finite f32 values, row-major, or why not.
pub fn checked_logits(
    reply: InferResponse,
    rows: usize,
    classes: usize,
) -> Result<Vec<f32>, BadReply> {
    let InferResponse {
        request_id: _,
        logits,
        model_id: _,
        topk: _,
    } = reply;
    let t = HostTensor::try_from(logits.ok_or(BadReply::Missing)?)
        .map_err(|e| BadReply::Tensor(e.to_string()))?;
    if t.dtype() != DType::F32 {
        return Err(BadReply::DType { got: t.dtype() });
    }
    if t.shape() != [rows, classes].as_slice() {
        return Err(BadReply::Shape {
            got: t.shape().to_vec(),
            rows,
            classes,
        });
    }
    let v = t.to_f32_vec();
    if let Some((i, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(BadReply::NonFinite {
            row: i / classes.max(1),
            class: i % classes.max(1),
            value,
        });
    }
    Ok(v)
}

/// `reply`'s top-k rows, checked: `rows` rows (one per real position) over `vocab` classes,
/// with the `k` asked for, f16 or bf16 values, and every row valid ([`topk::decode`]: indices in
/// range and distinct, values finite, a rest mass that is one). Returned as they came.
pub fn checked_topk(
    reply: InferResponse,
    rows: usize,
    vocab: usize,
    k: u32,
) -> Result<TopKTargets, BadReply> {
    let t = reply.topk.ok_or(BadReply::MissingTopK)?;
    let bad = |m: String| Err(BadReply::TopK(m));
    if t.classes as usize != vocab || t.k != k {
        return bad(format!(
            "k = {} over {} classes, asked k = {k} over the vocabulary of {vocab}",
            t.k, t.classes
        ));
    }
    let value = match DType::try_from(t.value_dtype) {
        Ok(DType::F16) => ValueDtype::F16,
        Ok(DType::BF16) => ValueDtype::Bf16,
        _ => {
            return bad(format!(
                "value dtype {} (must be F16 or BF16)",
                t.value_dtype
            ));
        }
    };
    let format = match TopKFormat::with_value_dtype(vocab, k as usize, value) {
        Ok(f) => f,
        Err(e) => return bad(e.to_string()),
    };
    if let Err(e) = topk::decode(&t.data, rows, &format) {
        return bad(e.to_string());
    }
    Ok(t)
}

/// Where two replicas' logits for the same rows (`rows × classes`, row-major, finite) differ
/// most once each row is shifted so its largest logit is 0 (softmax ignores a row's shift at
/// any temperature): the row, the class and the difference. None for empty or unequal inputs.
pub fn largest_difference(a: &[f32], b: &[f32], classes: usize) -> Option<(usize, usize, f32)> {
    if a.len() != b.len() || a.is_empty() || classes == 0 {
        return None;
    }
    let top = |row: &[f32]| row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut worst = (0, 0, 0.0f32);
    for (r, (ra, rb)) in a.chunks(classes).zip(b.chunks(classes)).enumerate() {
        let (ta, tb) = (top(ra), top(rb));
        for (c, (&x, &y)) in ra.iter().zip(rb).enumerate() {
            let d = ((x - ta) - (y - tb)).abs();
            if d > worst.2 {
                worst = (r, c, d);
            }
        }
    }
    Some(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(t: HostTensor) -> InferResponse {
        InferResponse {
            request_id: 7,
            logits: Some(t.into()),
            model_id: "m".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_largest_difference_ignores_each_rows_shift() {
        let a = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0];
        // Row 0 shifted by 10: the same distribution. Row 1: class 2 raised by 0.5.
        let b = [11.0, 12.0, 13.0, 0.0, 0.0, 0.5];
        let (row, class, d) = largest_difference(&a, &b, 3).unwrap();
        // Row 1's top moves to class 2: classes 0 and 1 drop by 0.5 relative to it.
        assert_eq!((row, class), (1, 0));
        assert!((d - 0.5).abs() < 1e-6, "{d}");
        assert_eq!(largest_difference(&a, &a, 3), Some((0, 0, 0.0)));
        assert_eq!(largest_difference(&a, &b[..3], 3), None);
        assert_eq!(largest_difference(&[], &[], 3), None);
    }

    #[test]
    fn finite_f32_logits_of_the_asked_shape_pass_unchanged() {
        let v = [0.5, -1.0, 2.0, 3.5, 0.0, -0.25];
        let t = HostTensor::from_f32(vec![2, 3], &v).unwrap();
        assert_eq!(checked_logits(reply(t), 2, 3), Ok(v.to_vec()));
    }

    #[test]
    fn other_shapes_dtypes_and_non_finite_values_are_refused() {
        let six = [0.0f32; 6];
        for (shape, want) in [
            (vec![3, 2], vec![3, 2]),
            (vec![6], vec![6]),
            (vec![1, 2, 3], vec![1, 2, 3]),
            (vec![2, 3, 1], vec![2, 3, 1]),
        ] {
            let t = HostTensor::from_f32(shape, &six).unwrap();
            assert_eq!(
                checked_logits(reply(t), 2, 3),
                Err(BadReply::Shape {
                    got: want,
                    rows: 2,
                    classes: 3
                })
            );
        }
        let t = HostTensor::from_f32(vec![2, 4], &[0.0; 8]).unwrap();
        assert_eq!(
            checked_logits(reply(t), 2, 3).unwrap_err().to_string(),
            "logits have shape [2, 4], expected [2, 3]"
        );
        let half = HostTensor::new(vec![2, 3], DType::F16, vec![0; 12]).unwrap();
        assert_eq!(
            checked_logits(reply(half), 2, 3),
            Err(BadReply::DType { got: DType::F16 })
        );
        for (bad, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let mut v = [1.0f32; 6];
            v[4] = bad;
            let t = HostTensor::from_f32(vec![2, 3], &v).unwrap();
            let err = checked_logits(reply(t), 2, 3).unwrap_err();
            assert!(
                matches!(
                    err,
                    BadReply::NonFinite {
                        row: 1,
                        class: 1,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("logits hold {shown} at row 1, class 1")
            );
        }
        let none = InferResponse {
            request_id: 0,
            logits: None,
            model_id: String::new(),
            ..Default::default()
        };
        assert_eq!(checked_logits(none, 2, 3), Err(BadReply::Missing));
        let short = distill_proto::pb::Tensor {
            shape: vec![2, 3],
            dtype: distill_proto::pb::DType::from(DType::F32) as i32,
            data: vec![0u8; 5].into(),
        };
        let err = checked_logits(
            InferResponse {
                request_id: 0,
                logits: Some(short),
                model_id: String::new(),
                ..Default::default()
            },
            2,
            3,
        )
        .unwrap_err();
        assert!(matches!(err, BadReply::Tensor(_)), "{err:?}");
    }
}
