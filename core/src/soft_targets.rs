//! Soft targets as they travel and are cached: the [`Encoding`] a run chooses (dense f32, f16,
//! bf16, or top-k), [`encode`] of combined probabilities to bytes, and the checked [`decode`] a
//! student runs before training on them. [`from_logits`] is the coordinator's whole path in one
//! call: members' tempered logits → [`crate::kd::combine_host`] → bytes.
//!
//! Who owns what:
//! - the byte layout of every encoding is decided here (dense rows are `classes` little-endian
//!   elements; top-k rows are [`crate::topk`]'s format with f16 values), so the coordinator's
//!   encoder, its cache and the student's decoder cannot disagree;
//! - element conversions go through [`crate::elem::Float`], the one f32 ↔ f16/bf16 conversion in
//!   `distill-core`;
//! - the wire message around the bytes (a dense `Tensor` or a `TopKTargets`) is the role crates'
//!   business: this crate does not know `distill-proto` (DESIGN.md), so [`Encoding::dense`] tells
//!   them which dense element type to put on the message.
//!
//! A decoded dense row is checked to be a probability distribution: every value finite and ≥ 0,
//! the row summing to 1 within [`ROW_SUM_TOLERANCE`] (f16 rounding of a normalised row stays far
//! inside it).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::elem::Float;
use crate::kd::{Combine, combine_host};
use crate::topk::{SparseTargets, TopKFormat};
use crate::{Error, Result};

/// Largest accepted `|Σ_c p_c − 1|` of a decoded dense soft-target row.
pub const ROW_SUM_TOLERANCE: f32 = 1e-2;

/// How soft targets travel (and are cached). Written in configs as `f32`, `f16`, `bf16` or
/// `topk:K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Encoding {
    /// Dense, 4 bytes per probability.
    #[default]
    F32,
    /// Dense, 2 bytes per probability (11-bit significand).
    F16,
    /// Dense, 2 bytes per probability (8-bit significand).
    Bf16,
    /// The k most probable classes and the rest's log-mass ([`crate::topk`], f16 values):
    /// 4 + k·(2 + 2) bytes per row for up to 65,536 classes.
    TopK(usize),
}

impl Encoding {
    /// Bytes of one row of `classes` soft targets.
    pub fn row_bytes(self, classes: usize) -> Result<usize> {
        match (self.dense(), self.topk_format(classes)?) {
            (Some(f), _) => classes
                .checked_mul(f.size())
                .ok_or_else(|| self.error(format!("{classes} classes is too many"))),
            (None, Some(f)) => Ok(f.bytes_per_sample()),
            (None, None) => Err(self.error("neither dense nor top-k".into())),
        }
    }

    /// The top-k format for `classes` classes (None for dense encodings); an error when k does
    /// not fit the classes.
    pub fn topk_format(self, classes: usize) -> Result<Option<TopKFormat>> {
        match self {
            Encoding::TopK(k) => TopKFormat::new(classes, k)
                .map(Some)
                .map_err(|e| self.error(e.to_string())),
            Encoding::F32 | Encoding::F16 | Encoding::Bf16 => Ok(None),
        }
    }

    /// The element type of a dense encoding (None for top-k).
    pub fn dense(self) -> Option<Float> {
        match self {
            Encoding::F32 => Some(Float::F32),
            Encoding::F16 => Some(Float::F16),
            Encoding::Bf16 => Some(Float::Bf16),
            Encoding::TopK(_) => None,
        }
    }

    fn error(self, msg: String) -> Error {
        // `soft_targets` is the setting's name in every config that chooses an encoding.
        Error::Config(format!("soft_targets = \"{self}\": {msg}"))
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encoding::F32 => f.write_str("f32"),
            Encoding::F16 => f.write_str("f16"),
            Encoding::Bf16 => f.write_str("bf16"),
            Encoding::TopK(k) => write!(f, "topk:{k}"),
        }
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Encoding::F32),
            "f16" => Ok(Encoding::F16),
            "bf16" => Ok(Encoding::Bf16),
            other => match other.strip_prefix("topk:").map(str::parse::<usize>) {
                Some(Ok(k)) if k >= 1 => Ok(Encoding::TopK(k)),
                _ => Err(format!(
                    "unknown soft-target encoding `{other}` (expected f32, f16, bf16 or topk:K with K >= 1)"
                )),
            },
        }
    }
}

impl TryFrom<String> for Encoding {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Encoding> for String {
    fn from(e: Encoding) -> Self {
        e.to_string()
    }
}

impl From<Float> for Encoding {
    fn from(f: Float) -> Self {
        match f {
            Float::F32 => Encoding::F32,
            Float::F16 => Encoding::F16,
            Float::Bf16 => Encoding::Bf16,
        }
    }
}

/// Decoded soft targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Row-major `rows × classes` probabilities.
    Dense(Vec<f32>),
    /// The top-k encoding ([`crate::topk`]): the k most probable classes per row and the rest's
    /// mass, spread uniformly.
    TopK(SparseTargets),
}

fn numel(rows: usize, classes: usize) -> Result<usize> {
    rows.checked_mul(classes)
        .ok_or_else(|| Error::Input(format!("{rows} rows of {classes} classes is too many")))
}

/// Encodes combined probabilities (`rows × classes`, row-major) in `encoding`, row after row.
///
/// # Shapes
/// `probs`: `rows·classes` → `rows · encoding.row_bytes(classes)` bytes.
pub fn encode(probs: &[f32], rows: usize, classes: usize, encoding: Encoding) -> Result<Vec<u8>> {
    let want = numel(rows, classes)?;
    if probs.len() != want {
        return Err(Error::Input(format!(
            "{} probabilities for {rows} rows of {classes} classes (expected {want})",
            probs.len()
        )));
    }
    match (encoding.dense(), encoding.topk_format(classes)?) {
        (Some(f), _) => {
            let mut out = Vec::new();
            f.write_all(probs, &mut out);
            Ok(out)
        }
        (None, Some(format)) => crate::topk::encode_probs(probs, rows, &format),
        (None, None) => Err(encoding.error("neither dense nor top-k".into())),
    }
}

/// Combines members' tempered logits ([`combine_host`]) and encodes the probabilities: the
/// soft-target bytes of one batch.
///
/// # Shapes
/// `members`: M × `rows·classes`, `weights`: `[M]` → `rows · encoding.row_bytes(classes)` bytes.
pub fn from_logits<M: AsRef<[f32]>>(
    members: &[M],
    rows: usize,
    classes: usize,
    weights: &[f32],
    mode: Combine,
    encoding: Encoding,
) -> Result<Vec<u8>> {
    let probs = combine_host(members, rows, classes, weights, mode)?;
    encode(&probs, rows, classes, encoding)
}

/// Decodes and checks `rows` rows of soft targets over `classes` classes. Dense rows must be
/// probability distributions (finite, ≥ 0, summing to 1 within [`ROW_SUM_TOLERANCE`]); top-k
/// rows are checked by [`crate::topk::decode`]. Errors name the row and class.
pub fn decode(bytes: &[u8], rows: usize, classes: usize, encoding: Encoding) -> Result<Targets> {
    let Some(f) = encoding.dense() else {
        let format = encoding
            .topk_format(classes)?
            .ok_or_else(|| encoding.error("neither dense nor top-k".into()))?;
        return Ok(Targets::TopK(crate::topk::decode(bytes, rows, &format)?));
    };
    let want = numel(rows, classes)?;
    if classes == 0 || want.checked_mul(f.size()) != Some(bytes.len()) {
        return Err(Error::Input(format!(
            "{} bytes for {rows} rows of {classes} {f:?} soft targets (expected {} bytes)",
            bytes.len(),
            want.saturating_mul(f.size())
        )));
    }
    let p = f.read_all(bytes)?;
    if let Some(i) = p.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "element {i} (row {}, class {}) is not finite",
            i / classes,
            i % classes
        )));
    }
    for (r, row) in p.chunks_exact(classes).enumerate() {
        if let Some((c, v)) = row.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(Error::Input(format!(
                "row {r} class {c} is {v}; probabilities are >= 0"
            )));
        }
        let sum: f32 = row.iter().sum();
        if (sum - 1.0).abs() > ROW_SUM_TOLERANCE {
            return Err(Error::Input(format!(
                "row {r} sums to {sum}; a probability row sums to 1"
            )));
        }
    }
    Ok(Targets::Dense(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for (s, e) in [
            ("f32", Encoding::F32),
            ("f16", Encoding::F16),
            ("bf16", Encoding::Bf16),
            ("topk:7", Encoding::TopK(7)),
        ] {
            assert_eq!(s.parse::<Encoding>().unwrap(), e);
            assert_eq!(e.to_string(), s);
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Encoding>(&json).unwrap(), e);
        }
        for bad in ["f64", "topk:0", "topk:", "topk:x", ""] {
            let e = bad.parse::<Encoding>().unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert_eq!(Encoding::default(), Encoding::F32);
    }

    #[test]
    fn row_bytes_of_every_encoding() {
        assert_eq!(Encoding::F32.row_bytes(10).unwrap(), 40);
        assert_eq!(Encoding::F16.row_bytes(10).unwrap(), 20);
        assert_eq!(Encoding::Bf16.row_bytes(10).unwrap(), 20);
        assert_eq!(Encoding::TopK(3).row_bytes(10).unwrap(), 4 + 3 * 4);
        let e = Encoding::TopK(11).row_bytes(10).unwrap_err().to_string();
        assert!(e.contains("soft_targets = \"topk:11\""), "{e}");
        assert!(Encoding::F32.row_bytes(usize::MAX).is_err());
    }

    #[test]
    fn dense_encodings_round_trip_through_decode() {
        let p = [0.25f32, 0.5, 0.25, 0.1, 0.2, 0.7];
        for e in [Encoding::F32, Encoding::F16, Encoding::Bf16] {
            let b = encode(&p, 2, 3, e).unwrap();
            assert_eq!(b.len(), 2 * e.row_bytes(3).unwrap());
            let Targets::Dense(back) = decode(&b, 2, 3, e).unwrap() else {
                panic!("{e}: not dense");
            };
            let tol = match e {
                Encoding::F32 => 0.0,
                Encoding::F16 => 2f32.powi(-11),
                _ => 2f32.powi(-8),
            };
            for (a, b) in p.iter().zip(&back) {
                assert!((a - b).abs() <= tol * a, "{e}: {a} vs {b}");
            }
        }
        // f16 bytes of 0.25 are 0x3400, little-endian.
        assert_eq!(
            &encode(&p, 2, 3, Encoding::F16).unwrap()[..2],
            &[0x00, 0x34]
        );
    }

    #[test]
    fn top_k_round_trips_through_decode() {
        let p = [0.7f32, 0.2, 0.1, 0.0];
        let b = encode(&p, 1, 4, Encoding::TopK(2)).unwrap();
        let Targets::TopK(t) = decode(&b, 1, 4, Encoding::TopK(2)).unwrap() else {
            panic!("not top-k");
        };
        assert_eq!(t.indices(), &[0, 1]);
        let dense = t.to_dense();
        assert!(
            (dense[2] - 0.05).abs() < 1e-6 && (dense[3] - 0.05).abs() < 1e-6,
            "{dense:?}"
        );
    }

    #[test]
    fn decode_refuses_what_is_not_a_distribution() {
        let enc = |v: &[f32]| encode(v, 1, 3, Encoding::F32).unwrap();
        let err = |b: &[u8]| decode(b, 1, 3, Encoding::F32).unwrap_err().to_string();
        assert!(
            err(&enc(&[0.5, f32::NAN, 0.5])).contains("element 1 (row 0, class 1) is not finite")
        );
        assert!(err(&enc(&[0.5, -0.25, 0.75])).contains("row 0 class 1 is -0.25"));
        assert!(err(&enc(&[0.5, 0.5, 0.5])).contains("row 0 sums to 1.5"));
        assert!(err(&enc(&[0.5, 0.5, 0.0])[..11]).contains("11 bytes for 1 rows of 3 F32"));
        assert!(decode(&[], 0, 0, Encoding::F32).is_err());
        let e = encode(&[0.5; 4], 1, 3, Encoding::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 probabilities for 1 rows of 3 classes"), "{e}");
    }

    #[test]
    fn from_logits_is_combine_then_encode() {
        let a = [0.0f32, 3f32.ln()];
        let b = [3f32.ln(), 0.0];
        let bytes = from_logits(
            &[&a[..], &b[..]],
            1,
            2,
            &[1.0, 3.0],
            Combine::MeanProb,
            Encoding::F32,
        )
        .unwrap();
        let got = Float::F32.read_all(&bytes).unwrap();
        assert!(
            (got[0] - 0.625).abs() < 1e-7 && (got[1] - 0.375).abs() < 1e-7,
            "{got:?}"
        );
        let nan = [f32::NAN, 0.0];
        assert!(from_logits(&[&nan[..]], 1, 2, &[1.0], Combine::MeanProb, Encoding::F16).is_err());
    }
}
