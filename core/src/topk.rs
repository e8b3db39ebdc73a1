//! Compact soft targets: the **top-k encoding** of a tempered distribution and the KD loss written
//! for it.
//!
//! A dense soft target costs `4·C` bytes per sample in f32 (`2·C` in f16/bf16); for C = 32,000
//! classes that is 128,000 bytes. The top-k encoding keeps, per row, the k most probable classes
//! (index and tempered logit) plus the log-mass of everything else, so the student still sees a
//! normalised distribution: 132 bytes per sample at C = 32,000, k = 32.
//!
//! # The decoded distribution
//!
//! A row of C tempered logits `x` (teacher logits divided by T, or log-probabilities: softmax is
//! shift-invariant, so any per-row offset is the same row) defines `p = softmax(x)`. With `K` the k
//! classes of largest `x` and `R = Σ_{c∉K} p_c` the mass of the rest, the encoding decodes to
//!
//! - `p̂_j = (1 − R) · exp(d_j) / Σ_{i∈K} exp(d_i)` for `j ∈ K`, where `d_j = x_j − max x`;
//! - `p̂_c = R / (C − k)` for every other class: **the rest's mass is spread uniformly** over the
//!   C − k classes that were not kept. Only the rest's total mass is sent, and the uniform
//!   distribution is the maximum-entropy (least committal) spread of a known mass; it keeps the
//!   target normalised and keeps every class's target probability > 0 wherever the teacher's was,
//!   so the KL divergence stays finite and well defined. The top-k classes keep their exact
//!   relative odds and their exact total mass `1 − R`.
//!
//! With k = C there is no rest (R = 0) and `p̂ = p` up to the precision of the values.
//!
//! # Wire format (one row = one sample, little-endian, no padding, no per-batch header)
//!
//! | bytes | field | meaning |
//! | --- | --- | --- |
//! | 4 | `rest`: f32 | `ln R`, the natural log of the rest's probability mass; `< 0`, or `−inf` when the rest has no mass (always `−inf` when k = C) |
//! | `k·w` | `index[k]`: u16 if C ≤ 65,536, else u32 (`w` = 2 or 4) | the kept classes, distinct, each `< C` |
//! | `k·2` | `value[k]`: f16 (default) or bf16 | `d_j = x_{index[j]} − max x` (≤ 0; the first is 0) |
//!
//! so [`TopKFormat::bytes_per_sample`] is `4 + k·(w + 2)`: **132 bytes** for C = 32,000, k = 32
//! (u16 indices, f16 values), against 128,000 for dense f32 and 64,000 for dense f16.
//!
//! The encoder writes the kept classes in decreasing order of `x`, ties broken by the smaller
//! class index, so one input has exactly one encoding (byte-identical; usable in cache keys). The
//! decoder needs no particular order: it checks the length, the indices (`< C`, distinct), the
//! values (finite) and `rest` (not NaN, `< 0` or `−inf`, `−inf` when k = C), and renormalises the
//! values itself. The metadata ([`TopKFormat`]: C, k, index width, value dtype) travels out of
//! band, next to the bytes (for example on each batch); the index width is not free: it must be
//! the one C calls for, so a format has one byte layout.
//!
//! # Decisions
//!
//! - **Values are f16, relative to the row's largest logit.** Relative to the maximum, every value
//!   is ≤ 0 and the ones that carry mass are small in magnitude, which is where f16 is precise:
//!   its 11-bit significand rounds `d` to within `2⁻¹¹·|d|` (bf16: `2⁻⁸·|d|`, 8× coarser). bf16's
//!   wider exponent buys nothing here: values below f16's most negative finite (−65,504) are
//!   clamped to it, and `exp(−65,504)` is 0 in every float format. bf16 is offered
//!   ([`ValueDtype::Bf16`]) for comparisons. The resulting error in a kept log-probability is at
//!   most `ε·(|d_j| + Σ_i π_i·|d_i|)` (ε = 2⁻¹¹ for f16, π the kept classes' renormalised
//!   probabilities; the second term is the renormalisation's). So it is about 2⁻¹¹ ≈ 5·10⁻⁴
//!   times the distance in nats from the top class, and grows only where the probability
//!   shrinks exponentially (tested: `round_trip_k_equals_c_matches_within_value_precision`).
//! - **The rest's log-mass is f32**, so `R` and `1 − R` are exact to f32 precision whatever the
//!   values' dtype (two more bytes than f16 buy an exact normalisation).
//! - **Inputs may be `−inf`** (a class of probability 0, e.g. the log of a mean-prob ensemble
//!   that underflowed) but not NaN or `+inf`, and every row needs one finite value.
//!   [`encode_probs`] takes probabilities directly.
//! - **The loss never materialises the dense target.** With `log q = log softmax(s/T)` (the
//!   student's full tempered log-softmax, which it computes anyway) and `u = R/(C − k)`,
//!   `Σ_c p̂_c·log q_c = Σ_{j∈K} (p̂_j − u)·log q_j + u·Σ_c log q_c`: a gather of k columns and one
//!   row sum. The teacher's negative entropy `Σ_c p̂_c·log p̂_c` is a per-row constant computed on
//!   the host at decode. [`kd_loss_topk`] has [`kd::kd_loss`]'s signature and conventions with the
//!   dense `teacher_probs` replaced by [`SparseTargets`], and equals `kd_loss` on the decoded dense
//!   target within f32 rounding: the tests assert |Δloss| ≤ 1e-5·max(1, |loss|) and
//!   |Δgrad| ≤ 1e-6 elementwise (C = 10 … 32,000, k = 1 … C, T = 1 … 20, with and without
//!   labels); measured: |Δloss| ≤ 1.1e-6 relative (1.7e-5 on a loss of 18.2 at C = 32,000,
//!   k = 32), |Δgrad| ≤ 3.6e-7.
//! - That is the error of the *implementation*. The error of the *approximation* (the top-k
//!   target against the exact teacher distribution) depends on how much mass the teacher puts
//!   outside its top k and how far that mass is from uniform; [`loss_gap`] measures it for given
//!   logits (and reports the rest's mean mass) so that benchmarks can state it.
//! - Dense soft targets (f32, f16, bf16) are [`crate::soft_targets`]'s; this module adds no dense
//!   encoder, and [`dense_bytes_per_sample`] gives their size for comparisons.

use candle_core::{D, DType, Tensor, Var};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::elem::Float;
use crate::kd::{self, KdLoss, check_temperature, checked_labels, tempered_log_softmax};
use crate::{Error, Result};

/// The largest number of classes an encoding can address (u32 indices).
pub const MAX_CLASSES: u64 = 1 << 32;

/// Bytes of the per-row `rest` field (an f32).
const REST_BYTES: usize = 4;

/// The width of the class indices on the wire: u16 when C ≤ 65,536, u32 otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IndexWidth {
    /// Little-endian u16 (C ≤ 65,536).
    U16,
    /// Little-endian u32 (C ≤ 2³²).
    U32,
}

impl IndexWidth {
    /// The width that C classes call for.
    pub fn for_classes(classes: usize) -> Result<Self> {
        match classes as u64 {
            0 => Err(Error::Input(
                "top-k soft targets need at least one class".into(),
            )),
            c if c <= 1 << 16 => Ok(IndexWidth::U16),
            c if c <= MAX_CLASSES => Ok(IndexWidth::U32),
            c => Err(Error::Input(format!(
                "top-k soft targets address at most {MAX_CLASSES} classes, got {c}"
            ))),
        }
    }

    /// Bytes per index.
    pub fn bytes(self) -> usize {
        match self {
            IndexWidth::U16 => 2,
            IndexWidth::U32 => 4,
        }
    }

    fn write(self, index: u32, out: &mut Vec<u8>) {
        match self {
            // The format's validation guarantees C ≤ 65,536, so every index fits in a u16.
            IndexWidth::U16 => out.extend_from_slice(&(index as u16).to_le_bytes()),
            IndexWidth::U32 => out.extend_from_slice(&index.to_le_bytes()),
        }
    }

    /// Reads one index from a chunk of exactly [`IndexWidth::bytes`] bytes.
    fn read(self, b: &[u8]) -> u32 {
        match self {
            IndexWidth::U16 => u32::from(u16::from_le_bytes([b[0], b[1]])),
            IndexWidth::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// The dtype of the kept values on the wire (2 bytes each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueDtype {
    /// IEEE half precision: relative rounding error ≤ 2⁻¹¹. The default.
    #[default]
    F16,
    /// bfloat16: relative rounding error ≤ 2⁻⁸.
    Bf16,
}

impl ValueDtype {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        2
    }

    /// The unit roundoff: a value `d` is stored within `epsilon()·|d|` (normal range).
    pub fn epsilon(self) -> f64 {
        match self {
            ValueDtype::F16 => 2f64.powi(-11),
            ValueDtype::Bf16 => 2f64.powi(-8),
        }
    }

    /// The element format of the values.
    fn float(self) -> Float {
        match self {
            ValueDtype::F16 => Float::F16,
            ValueDtype::Bf16 => Float::Bf16,
        }
    }

    /// Appends the value as stored, after clamping to the most negative finite value of the
    /// dtype (so a very unlikely class stays finite: its probability is 0 either way).
    fn write(self, d: f32, out: &mut Vec<u8>) {
        let min = match self {
            ValueDtype::F16 => f16::MIN.to_f32(),
            ValueDtype::Bf16 => bf16::MIN.to_f32(),
        };
        self.float().write(d.max(min), out);
    }

    /// Reads one value from a chunk of exactly 2 bytes.
    fn read(self, b: &[u8]) -> f32 {
        // Callers pass `chunks_exact(2)`, so the length always matches.
        self.float().read(b).unwrap_or(f32::NAN)
    }
}

/// The metadata of a top-k encoding, which travels next to the bytes: C, k, the index width and
/// the value dtype. Build it with [`TopKFormat::new`]; a deserialised one is checked by
/// [`TopKFormat::validate`] (every function here calls it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopKFormat {
    /// C, the number of classes.
    pub classes: usize,
    /// k, the number of classes kept per row (1..=C).
    pub k: usize,
    /// The indices' width; must be [`IndexWidth::for_classes`]`(classes)`.
    pub index: IndexWidth,
    /// The values' dtype.
    pub value: ValueDtype,
}

impl TopKFormat {
    /// The format keeping `k` of `classes` classes with f16 values.
    pub fn new(classes: usize, k: usize) -> Result<Self> {
        Self::with_value_dtype(classes, k, ValueDtype::F16)
    }

    /// The format keeping `k` of `classes` classes with values in `value`.
    pub fn with_value_dtype(classes: usize, k: usize, value: ValueDtype) -> Result<Self> {
        let format = TopKFormat {
            classes,
            k,
            index: IndexWidth::for_classes(classes)?,
            value,
        };
        format.validate()?;
        Ok(format)
    }

    /// Checks that C is addressable, 1 ≤ k ≤ C, the index width is the one C calls for and a
    /// row's size fits in a `usize`.
    pub fn validate(&self) -> Result<()> {
        let want = IndexWidth::for_classes(self.classes)?;
        if self.k == 0 || self.k > self.classes {
            return Err(Error::Input(format!(
                "top-k soft targets: k must be in 1..={}, got {}",
                self.classes, self.k
            )));
        }
        if self.index != want {
            return Err(Error::Input(format!(
                "top-k soft targets: {} classes take {want:?} indices, the format says {:?}",
                self.classes, self.index
            )));
        }
        self.k
            .checked_mul(self.index.bytes() + self.value.bytes())
            .and_then(|b| b.checked_add(REST_BYTES))
            .map(|_| ())
            .ok_or_else(|| Error::Input(format!("top-k soft targets: k = {} is too large", self.k)))
    }

    /// Bytes per sample (row): `4 + k·(index bytes + value bytes)`. Meaningful for a valid format;
    /// saturates (rather than overflowing) for a k that [`TopKFormat::validate`] refuses.
    pub fn bytes_per_sample(&self) -> usize {
        self.k
            .saturating_mul(self.index.bytes() + self.value.bytes())
            .saturating_add(REST_BYTES)
    }

    /// Bytes for `rows` rows, checked against overflow.
    fn bytes_for(&self, rows: usize) -> Result<usize> {
        rows.checked_mul(self.bytes_per_sample())
            .ok_or_else(|| Error::Input(format!("top-k soft targets: {rows} rows is too many")))
    }
}

/// Bytes per sample of the default top-k format (u16/u32 indices by C, f16 values).
pub fn bytes_per_sample(classes: usize, k: usize) -> Result<usize> {
    Ok(TopKFormat::new(classes, k)?.bytes_per_sample())
}

/// Bytes per sample of a dense soft target with `value_bytes` per class (4 for f32, 2 for f16 or
/// bf16), for comparisons with [`bytes_per_sample`].
pub fn dense_bytes_per_sample(classes: usize, value_bytes: usize) -> usize {
    classes * value_bytes
}

/// Encodes `rows` rows of `format.classes` tempered logits (or log-probabilities; `−inf` allowed,
/// NaN and `+inf` not, at least one finite value per row) into the top-k wire format described in
/// the module docs.
///
/// # Shapes
/// `logits`: `rows × C` row-major → `rows × format.bytes_per_sample()` bytes.
pub fn encode(logits: &[f32], rows: usize, format: &TopKFormat) -> Result<Vec<u8>> {
    format.validate()?;
    let c = format.classes;
    let want = rows
        .checked_mul(c)
        .ok_or_else(|| Error::Input(format!("top-k encode: {rows} rows is too many")))?;
    if logits.len() != want {
        return Err(Error::Input(format!(
            "top-k encode: {} logits for {rows} rows of {c} classes (expected {want})",
            logits.len()
        )));
    }
    let mut out = Vec::with_capacity(format.bytes_for(rows)?);
    let mut order: Vec<u32> = Vec::with_capacity(c);
    let mut sorted: Vec<u32> = Vec::with_capacity(format.k);
    for (r, row) in logits.chunks_exact(c).enumerate() {
        encode_row(row, r, format, &mut order, &mut sorted, &mut out)?;
    }
    Ok(out)
}

/// [`encode`] for probabilities (finite, ≥ 0, at least one > 0 per row; rows need not sum to 1,
/// they are normalised): encodes their natural log, with 0 as `−inf`.
///
/// # Shapes
/// `probs`: `rows × C` row-major → `rows × format.bytes_per_sample()` bytes.
pub fn encode_probs(probs: &[f32], rows: usize, format: &TopKFormat) -> Result<Vec<u8>> {
    format.validate()?;
    if let Some((i, p)) = probs
        .iter()
        .enumerate()
        .find(|(_, p)| !(p.is_finite() && **p >= 0.0))
    {
        return Err(Error::Input(format!(
            "top-k encode: probability {p} at row {}, class {} (must be finite and ≥ 0)",
            i / format.classes,
            i % format.classes
        )));
    }
    let logs: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    encode(&logs, rows, format)
}

fn encode_row(
    row: &[f32],
    r: usize,
    format: &TopKFormat,
    order: &mut Vec<u32>,
    sorted: &mut Vec<u32>,
    out: &mut Vec<u8>,
) -> Result<()> {
    if let Some((i, v)) = row
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
    {
        return Err(Error::Input(format!(
            "top-k encode: logit {v} at row {r}, class {i} (must be finite or −inf)"
        )));
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(Error::Input(format!(
            "top-k encode: every logit of row {r} is −inf"
        )));
    }
    let k = format.k;
    order.clear();
    // C ≤ 2³² (validated), so every class index fits in a u32.
    order.extend((0..row.len()).map(|i| i as u32));
    // Decreasing logit, ties by increasing class: a total order, so the encoding is canonical.
    let by_rank = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_rank);
    }
    let top = &mut order[..k];
    top.sort_unstable_by(by_rank);

    // Both masses are summed in class order (not in the selection's arbitrary order), so the
    // bytes depend on the input alone.
    let m = f64::from(max);
    let (mut s_top, mut s_rest) = (0.0f64, 0.0f64); // s_top ≥ 1: it holds the maximum
    sorted.clear();
    sorted.extend_from_slice(top);
    sorted.sort_unstable();
    let mut kept = sorted.iter().peekable();
    for (i, &v) in row.iter().enumerate() {
        let e = (f64::from(v) - m).exp();
        if kept.next_if(|&&j| j as usize == i).is_some() {
            s_top += e;
        } else {
            s_rest += e;
        }
    }
    let rest_log_mass = if s_rest > 0.0 {
        (s_rest.ln() - (s_top + s_rest).ln()) as f32
    } else {
        f32::NEG_INFINITY
    };
    out.extend_from_slice(&rest_log_mass.to_le_bytes());
    for &i in top.iter() {
        format.index.write(i, out);
    }
    for &i in top.iter() {
        let d = (f64::from(row[i as usize]) - m) as f32;
        format.value.write(d, out);
    }
    Ok(())
}

/// Decoded top-k soft targets: per row the kept classes, their probabilities, and the rest's
/// mass, spread uniformly. What [`kd_loss_topk`] takes; [`SparseTargets::to_dense`] gives the
/// dense distribution for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTargets {
    rows: usize,
    classes: usize,
    k: usize,
    indices: Vec<u32>,
    probs: Vec<f32>,
    rest_mass: Vec<f32>,
    rest_per_class: Vec<f32>,
    neg_entropy: Vec<f32>,
}

impl SparseTargets {
    /// Number of rows (samples).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// C, the number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// k, the number of kept classes per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The kept classes, `rows × k` row-major, in wire order.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The kept classes' probabilities `p̂_j`, `rows × k`, aligned with [`SparseTargets::indices`].
    pub fn probs(&self) -> &[f32] {
        &self.probs
    }

    /// The rest's total mass R per row.
    pub fn rest_mass(&self) -> &[f32] {
        &self.rest_mass
    }

    /// The probability of each class that was not kept, `R / (C − k)` per row (0 when k = C).
    pub fn rest_per_class(&self) -> &[f32] {
        &self.rest_per_class
    }

    /// `Σ_c p̂_c·ln p̂_c` per row (the negative entropy of the decoded target, `0·ln 0 = 0`).
    pub fn neg_entropy(&self) -> &[f32] {
        &self.neg_entropy
    }

    /// The dense decoded distribution, `rows × C` row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let (c, k) = (self.classes, self.k);
        let mut out = Vec::with_capacity(self.rows * c);
        for r in 0..self.rows {
            let start = out.len();
            out.resize(start + c, self.rest_per_class[r]);
            let dense = &mut out[start..];
            for (&i, &p) in self.indices[r * k..(r + 1) * k]
                .iter()
                .zip(&self.probs[r * k..(r + 1) * k])
            {
                dense[i as usize] = p;
            }
        }
        out
    }
}

/// Decodes and validates `rows` rows of the top-k wire format: length, indices (`< C`,
/// distinct), values (finite) and `rest` (not NaN or `+inf`, `< 0` or `−inf`, `−inf` when
/// k = C). Errors name the row and the entry; no input panics.
pub fn decode(bytes: &[u8], rows: usize, format: &TopKFormat) -> Result<SparseTargets> {
    format.validate()?;
    let (c, k) = (format.classes, format.k);
    let bpr = format.bytes_per_sample();
    let want = format.bytes_for(rows)?;
    if bytes.len() != want {
        return Err(Error::Input(format!(
            "top-k soft targets: {} bytes for {rows} rows of {bpr} bytes (expected {want})",
            bytes.len()
        )));
    }
    let w = format.index.bytes();
    let mut t = SparseTargets {
        rows,
        classes: c,
        k,
        indices: Vec::with_capacity(rows * k),
        probs: Vec::with_capacity(rows * k),
        rest_mass: Vec::with_capacity(rows),
        rest_per_class: Vec::with_capacity(rows),
        neg_entropy: Vec::with_capacity(rows),
    };
    // Per-row scratch, sized by k only when there is a row: with rows ≥ 1 the length check above
    // bounds k by the input, but with none k is whatever the format says (up to 2³²).
    let scratch = if rows == 0 { 0 } else { k };
    let mut sorted: Vec<u32> = Vec::with_capacity(scratch);
    let mut d: Vec<f64> = Vec::with_capacity(scratch);
    let others = (c - k) as f64;
    for (r, row) in bytes.chunks_exact(bpr).enumerate() {
        let (rest_b, tail) = row.split_at(REST_BYTES);
        let (idx_b, val_b) = tail.split_at(k * w);
        let rest = f32::from_le_bytes([rest_b[0], rest_b[1], rest_b[2], rest_b[3]]);
        if rest.is_nan() || rest >= 0.0 {
            return Err(Error::Input(format!(
                "top-k soft targets, row {r}: rest log-mass {rest} (must be < 0 or −inf)"
            )));
        }
        if k == c && rest != f32::NEG_INFINITY {
            return Err(Error::Input(format!(
                "top-k soft targets, row {r}: rest log-mass {rest} with k = C = {c} (must be −inf)"
            )));
        }
        let row_indices = t.indices.len();
        for (j, b) in idx_b.chunks_exact(w).enumerate() {
            let i = format.index.read(b);
            if i as u64 >= c as u64 {
                return Err(Error::Input(format!(
                    "top-k soft targets, row {r}, entry {j}: class {i} out of range for {c} classes"
                )));
            }
            t.indices.push(i);
        }
        sorted.clear();
        sorted.extend_from_slice(&t.indices[row_indices..]);
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|p| p[0] == p[1]) {
            return Err(Error::Input(format!(
                "top-k soft targets, row {r}: class {} appears twice",
                pair[0]
            )));
        }
        d.clear();
        for (j, b) in val_b.chunks_exact(format.value.bytes()).enumerate() {
            let v = format.value.read(b);
            if !v.is_finite() {
                return Err(Error::Input(format!(
                    "top-k soft targets, row {r}, entry {j}: value {v} (must be finite)"
                )));
            }
            d.push(f64::from(v));
        }

        // ln p̂_j = ln(1 − R) + (d_j − max d) − ln Σ_i exp(d_i − max d), all in f64. The values
        // are shifted by their maximum before anything is added to them: an encoder writes
        // d ≤ 0 with a maximum of 0, but a corrupted row may hold d of 10^17 or more (bf16 goes
        // to 3·10^38), which would swallow ln(1 − R) in rounding and leave a row summing to ~2.
        let dmax = d.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        d.iter_mut().for_each(|v| *v -= dmax); // finite: |d| ≤ 3.4·10^38
        let lse = d.iter().map(|v| v.exp()).sum::<f64>().ln(); // in [0, ln k]
        let rest = f64::from(rest);
        let top_log_mass = (-rest.exp_m1()).ln(); // finite: rest < 0
        let mut neg_entropy = 0.0f64;
        for v in &d {
            let lp = top_log_mass + (v - lse);
            let p = lp.exp();
            neg_entropy += p * lp; // lp finite, so p = 0 gives 0
            t.probs.push(p as f32);
        }
        let mass = rest.exp();
        let (per_class, rest_term) = if k < c && mass > 0.0 {
            (mass / others, mass * (rest - others.ln()))
        } else {
            (0.0, 0.0)
        };
        t.rest_mass.push(mass as f32);
        t.rest_per_class.push(per_class as f32);
        t.neg_entropy.push((neg_entropy + rest_term) as f32);
    }
    Ok(t)
}

/// [`decode`] straight to the dense distribution, `rows × C` f32 probabilities row-major.
pub fn decode_dense(bytes: &[u8], rows: usize, format: &TopKFormat) -> Result<Vec<f32>> {
    Ok(decode(bytes, rows, format)?.to_dense())
}

/// [`kd::kd_loss`] for top-k soft targets, without materialising the dense target:
/// `alpha·T²·KL(p̂ ‖ softmax(s/T)) + (1 − alpha)·CE(y, softmax(s))`, averaged over the batch, with
/// `p̂` the decoded top-k distribution (module docs). The soft term is
/// `Σ_c p̂_c·ln p̂_c − Σ_{j∈K} (p̂_j − u)·ln q_j − u·Σ_c ln q_c` with `q = softmax(s/T)` and
/// `u = R/(C − k)`. Conventions as in `kd_loss`: without `labels` the loss is the soft term alone
/// (alpha taken as 1); `t` finite and > 0, `alpha` in [0, 1]; labels u8, u32 or i64 in `0..C`.
/// Equals `kd_loss(s, decoded dense target, …)` within f32 rounding, gradient included.
///
/// # Shapes
/// `student_logits`: `[N, C]`, `targets`: N rows of C classes, `labels`: `[N]` → scalars.
pub fn kd_loss_topk(
    student_logits: &Tensor,
    targets: &SparseTargets,
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
    let (n, c) = match student_logits.dims() {
        &[n, c] if c > 0 => (n, c),
        dims => {
            return Err(Error::Input(format!(
                "student logits must have shape [N, C] with C > 0, got {dims:?}"
            )));
        }
    };
    if n == 0 {
        return Err(Error::Input("empty batch".into()));
    }
    if (targets.rows, targets.classes) != (n, c) {
        return Err(Error::Input(format!(
            "top-k soft targets have {} rows of {} classes, student logits {:?}",
            targets.rows,
            targets.classes,
            student_logits.dims()
        )));
    }
    let dev = student_logits.device();
    let k = targets.k;
    let s = student_logits.to_dtype(DType::F32)?;

    let log_q_t = tempered_log_softmax(&s, t)?; // [N, C]
    let idx = Tensor::from_slice(&targets.indices, (n, k), dev)?; // [N, k] u32
    let weights: Vec<f32> = targets
        .probs
        .chunks_exact(k)
        .zip(&targets.rest_per_class)
        .flat_map(|(p, &u)| p.iter().map(move |&p| p - u))
        .collect();
    let weights = Tensor::from_vec(weights, (n, k), dev)?; // [N, k]
    // [N, C] -> gather -> [N, k] -> [N]
    let mut cross = log_q_t.gather(&idx, 1)?.mul(&weights)?.sum(1)?;
    if targets.rest_per_class.iter().any(|&u| u > 0.0) {
        let u = Tensor::from_slice(&targets.rest_per_class, n, dev)?; // [N]
        cross = cross.add(&log_q_t.sum(1)?.mul(&u)?)?; // [N, C] -> [N]
    }
    let neg_entropy = Tensor::from_slice(&targets.neg_entropy, n, dev)?; // [N]
    let soft = neg_entropy.sub(&cross)?.mean(0)?; // [N] -> []

    let (total, hard) = match labels {
        None => (soft.affine(t * t, 0.0)?, None),
        Some(y) => {
            let y = checked_labels(y, n, c)?;
            let log_q = tempered_log_softmax(&s, 1.0)?; // [N, C]
            // [N] -> [N, 1] -> gather -> [N, 1] -> [N] -> []
            let hard = log_q
                .gather(&y.unsqueeze(1)?, 1)?
                .squeeze(1)?
                .mean(0)?
                .neg()?;
            let total = soft
                .affine(alpha * t * t, 0.0)?
                .add(&hard.affine(1.0 - alpha, 0.0)?)?;
            (total, Some(hard))
        }
    };
    Ok(KdLoss { total, soft, hard })
}

/// How far the top-k target moves the KD loss from the dense one: see [`loss_gap`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossGap {
    /// Batch mean of KL(p ‖ softmax(s/T)) with the exact dense teacher distribution p.
    pub dense: f64,
    /// The same with the decoded top-k target p̂ ([`kd_loss_topk`]).
    pub topk: f64,
    /// `|topk − dense|`.
    pub abs_diff: f64,
    /// `abs_diff / |dense|` (0 when both are 0).
    pub rel_diff: f64,
    /// Largest elementwise difference between the two soft terms' gradients in the student's
    /// logits.
    pub max_grad_diff: f64,
    /// Mean over the rows of the rest's mass R (the teacher mass outside the top k).
    pub mean_rest_mass: f64,
    /// Bytes per sample of the top-k encoding.
    pub topk_bytes_per_sample: usize,
    /// Bytes per sample of the dense f32 target.
    pub dense_bytes_per_sample: usize,
}

/// Measures the effect of the top-k encoding on the KD loss (for benchmarks): the soft term
/// (unscaled KL, as [`KdLoss::soft`]) of `student_logits` against the exact softmax of the
/// teacher's tempered logits, and against `decode(encode(teacher_logits))`, with their gradients.
///
/// # Shapes
/// `teacher_logits`: `rows × C` row-major (tempered, as [`encode`] takes them),
/// `student_logits`: `[rows, C]`.
pub fn loss_gap(
    teacher_logits: &[f32],
    rows: usize,
    student_logits: &Tensor,
    t: f64,
    format: &TopKFormat,
) -> Result<LossGap> {
    let bytes = encode(teacher_logits, rows, format)?; // validates the format and the logits
    let targets = decode(&bytes, rows, format)?;
    let c = format.classes;
    // The exact dense distribution, in f64 per row. encode checked: no NaN/+inf, a finite max.
    let mut dense = Vec::with_capacity(teacher_logits.len());
    for row in teacher_logits.chunks_exact(c) {
        let m = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        dense.extend(e.into_iter().map(|v| (v / sum) as f32));
    }
    let student = Var::from_tensor(&student_logits.to_dtype(DType::F32)?.detach())?;
    let dense = Tensor::from_vec(dense, (rows, c), student.device())?;

    let d = kd::kd_loss(student.as_tensor(), &dense, None, t, 1.0)?;
    let g_dense = d.soft.backward()?;
    let s = kd_loss_topk(student.as_tensor(), &targets, None, t, 1.0)?;
    let g_topk = s.soft.backward()?;
    let grad = |g: &candle_core::backprop::GradStore| {
        g.get(student.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Input("the KD loss has no gradient in the student".into()))
    };
    let max_grad_diff = grad(&g_dense)?
        .sub(&grad(&g_topk)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?;

    let dense = f64::from(d.soft.to_scalar::<f32>()?);
    let topk = f64::from(s.soft.to_scalar::<f32>()?);
    let abs_diff = (topk - dense).abs();
    Ok(LossGap {
        dense,
        topk,
        abs_diff,
        rel_diff: if abs_diff == 0.0 {
            0.0
        } else {
            abs_diff / dense.abs()
        },
        max_grad_diff: f64::from(max_grad_diff),
        mean_rest_mass: if rows == 0 {
            0.0
        } else {
            targets.rest_mass.iter().map(|&r| f64::from(r)).sum::<f64>() / rows as f64
        },
        topk_bytes_per_sample: format.bytes_per_sample(),
        dense_bytes_per_sample: dense_bytes_per_sample(c, 4),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn softmax64(z: &[f32]) -> Vec<f64> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = z
            .iter()
            .map(|&v| (f64::from(v) - f64::from(m)).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// Teacher-like tempered logits: uniform noise with a few boosted classes per row.
    fn logits(rows: usize, c: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v = Vec::with_capacity(rows * c);
        for _ in 0..rows {
            let start = v.len();
            v.extend((0..c).map(|_| rng.random_range(-spread..spread)));
            for _ in 0..3 {
                let i = rng.random_range(0..c);
                v[start + i] += rng.random_range(0.0..2.0 * spread);
            }
        }
        v
    }

    fn tensor(v: &[f32], rows: usize, c: usize) -> Tensor {
        Tensor::from_slice(v, (rows, c), &Device::Cpu).unwrap()
    }

    fn input_err<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Input(msg)) => msg,
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn golden_bytes_of_one_row() {
        let f = TopKFormat::new(5, 2).unwrap();
        assert_eq!(f.index, IndexWidth::U16);
        assert_eq!(f.bytes_per_sample(), 4 + 2 * 4);
        let x = [1.0f32, 3.0, 2.0, -1.0, 0.0];
        let bytes = encode(&x, 1, &f).unwrap();
        let e = |v: f64| (v - 3.0).exp();
        let rest = ((e(1.0) + e(-1.0) + e(0.0)).ln()
            - (e(1.0) + e(-1.0) + e(0.0) + e(3.0) + e(2.0)).ln()) as f32;
        let mut want = rest.to_le_bytes().to_vec();
        want.extend([1, 0, 2, 0]); // classes 1 and 2, u16
        want.extend([0x00, 0x00, 0x00, 0xBC]); // f16 0.0 and −1.0
        assert_eq!(bytes, want);
        // Ties are broken by the smaller class index.
        let tied = encode(&[5.0, 7.0, 7.0, 7.0, 1.0], 1, &f).unwrap();
        assert_eq!(&tied[4..8], &[1, 0, 2, 0]);
    }

    #[test]
    fn round_trip_k_equals_c_matches_within_value_precision() {
        let (rows, c) = (6, 50);
        let x = logits(rows, c, 6.0, 1);
        for value in [ValueDtype::F16, ValueDtype::Bf16] {
            let f = TopKFormat::with_value_dtype(c, c, value).unwrap();
            let bytes = encode(&x, rows, &f).unwrap();
            assert_eq!(bytes.len(), rows * f.bytes_per_sample());
            let t = decode(&bytes, rows, &f).unwrap();
            assert!(t.rest_mass().iter().all(|&r| r == 0.0));
            let dense = t.to_dense();
            for (row, got) in x.chunks(c).zip(dense.chunks(c)) {
                let p = softmax64(row);
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d: Vec<f64> = row.iter().map(|&v| f64::from(v - m).abs()).collect();
                let mean_d: f64 = p.iter().zip(&d).map(|(p, d)| p * d).sum();
                let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
                assert!((sum - 1.0).abs() < 1e-5, "{value:?}: sum {sum}");
                for cl in 0..c {
                    // The documented bound on a kept log-probability, plus f32 rounding.
                    let bound = value.epsilon() * (d[cl] + mean_d) + 1e-6;
                    let err = (f64::from(got[cl]).ln() - p[cl].ln()).abs();
                    assert!(err <= bound, "{value:?} class {cl}: {err} > {bound}");
                }
            }
        }
    }

    #[test]
    fn round_trip_k_below_c_keeps_top_probabilities_and_normalises() {
        let (rows, c, k) = (5, 1000, 10);
        let x = logits(rows, c, 4.0, 2);
        let f = TopKFormat::new(c, k).unwrap();
        let t = decode(&encode(&x, rows, &f).unwrap(), rows, &f).unwrap();
        let dense = t.to_dense();
        for r in 0..rows {
            let row = &x[r * c..(r + 1) * c];
            let p = softmax64(row);
            let mut order: Vec<usize> = (0..c).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let kept: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            assert_eq!(&t.indices()[r * k..(r + 1) * k], kept.as_slice());
            let rest: f64 = order[k..].iter().map(|&i| p[i]).sum();
            assert!((f64::from(t.rest_mass()[r]) - rest).abs() < 1e-6 * rest.max(1e-3));
            let got = &dense[r * c..(r + 1) * c];
            for &i in &order[..k] {
                let rel = (f64::from(got[i]) / p[i] - 1.0).abs();
                assert!(rel < 5e-3, "row {r} class {i}: {} vs {}", got[i], p[i]);
            }
            let u = rest / (c - k) as f64;
            for &i in &order[k..] {
                assert!((f64::from(got[i]) - u).abs() <= 1e-6 * u);
            }
            let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {r}: sum {sum}");
        }
    }

    #[test]
    fn encode_handles_zero_probabilities_and_extreme_values() {
        let f = TopKFormat::new(4, 2).unwrap();
        // Probabilities with exact zeros (a mean-prob ensemble that underflowed), unnormalised.
        let t = decode(
            &encode_probs(&[0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 2, &f).unwrap(),
            2,
            &f,
        )
        .unwrap();
        assert_eq!(t.rest_mass()[0], 0.0);
        assert_eq!(t.to_dense()[..4], [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(t.indices()[..2], [1, 0]);
        assert!((t.rest_mass()[1] - 0.5).abs() < 1e-7);
        assert!(t.to_dense()[4..].iter().all(|p| (p - 0.25).abs() < 1e-7));
        // A gap beyond f16's range is clamped to its most negative value: probability 0.
        let t = decode(&encode(&[0.0, -1e6, -2e6, -3e6], 1, &f).unwrap(), 1, &f).unwrap();
        assert_eq!(t.to_dense(), vec![1.0, 0.0, 0.0, 0.0]);
        assert!(t.neg_entropy()[0].abs() < 1e-7);
        // Large logits keep their precision: only differences are stored.
        let t = decode(&encode(&[1e4, 1e4 - 1.0, 0.0, 0.0], 1, &f).unwrap(), 1, &f).unwrap();
        let p = softmax64(&[0.0, -1.0]);
        assert!((f64::from(t.probs()[0]) - p[0]).abs() < 1e-6);
    }

    #[test]
    fn encode_rejects_bad_input() {
        let f = TopKFormat::new(3, 2).unwrap();
        assert!(input_err(encode(&[0.0; 5], 2, &f)).contains("expected 6"));
        assert!(input_err(encode(&[0.0, f32::NAN, 1.0], 1, &f)).contains("row 0, class 1"));
        assert!(
            input_err(encode(&[0.0, 1.0, 1.0, 0.0, f32::INFINITY, 1.0], 2, &f))
                .contains("row 1, class 1")
        );
        assert!(input_err(encode(&[f32::NEG_INFINITY; 3], 1, &f)).contains("every logit"));
        assert!(input_err(encode_probs(&[0.5, -0.1, 0.6], 1, &f)).contains("class 1"));
        assert!(input_err(encode_probs(&[0.0; 3], 1, &f)).contains("every logit"));
        assert!(encode(&[], 0, &f).unwrap().is_empty());
    }

    #[test]
    fn format_rejects_bad_metadata() {
        assert!(input_err(TopKFormat::new(0, 1)).contains("at least one class"));
        assert!(input_err(TopKFormat::new(10, 0)).contains("1..=10"));
        assert!(input_err(TopKFormat::new(10, 11)).contains("1..=10"));
        assert_eq!(TopKFormat::new(65_536, 1).unwrap().index, IndexWidth::U16);
        assert_eq!(TopKFormat::new(65_537, 1).unwrap().index, IndexWidth::U32);
        let mut f = TopKFormat::new(100, 4).unwrap();
        f.index = IndexWidth::U32;
        assert!(input_err(decode(&[], 0, &f)).contains("U16"));
        // The metadata round-trips through serde, as it travels with the bytes.
        let f = TopKFormat::with_value_dtype(70_000, 8, ValueDtype::Bf16).unwrap();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"classes":70000,"k":8,"index":"u32","value":"bf16"}"#
        );
        assert_eq!(serde_json::from_str::<TopKFormat>(&json).unwrap(), f);
        assert_eq!(f.bytes_per_sample(), 4 + 8 * 6);
    }

    #[test]
    fn decode_rejects_bad_bytes() {
        let f = TopKFormat::new(10, 3).unwrap();
        let good = encode(&logits(2, 10, 3.0, 3), 2, &f).unwrap();
        assert!(decode(&good, 2, &f).is_ok());
        let bpr = f.bytes_per_sample(); // 16: rest 0..4, indices 4..10, values 10..16
        let with = |at: usize, b: &[u8]| {
            let mut v = good.clone();
            v[bpr + at..bpr + at + b.len()].copy_from_slice(b);
            decode(&v, 2, &f)
        };
        assert!(input_err(decode(&good[1..], 2, &f)).contains("31 bytes for 2 rows of 16"));
        assert!(input_err(decode(&good, 3, &f)).contains("expected 48"));
        assert!(input_err(with(6, &10u16.to_le_bytes())).contains("row 1, entry 1: class 10"));
        let first = [good[bpr + 4], good[bpr + 5]];
        assert!(input_err(with(8, &first)).contains("appears twice"));
        for bad in [f16::NAN, f16::INFINITY, f16::NEG_INFINITY] {
            assert!(input_err(with(12, &bad.to_le_bytes())).contains("row 1, entry 1: value"));
        }
        for bad in [f32::NAN, f32::INFINITY, 0.0, 0.5] {
            assert!(input_err(with(0, &bad.to_le_bytes())).contains("row 1: rest log-mass"));
        }
        // −inf (no rest mass) is valid for k < C, and required for k = C.
        assert!(with(0, &f32::NEG_INFINITY.to_le_bytes()).is_ok());
        let all = TopKFormat::new(2, 2).unwrap();
        let mut row = (-0.5f32).to_le_bytes().to_vec();
        row.extend([0, 0, 1, 0, 0, 0, 0, 0]);
        assert!(input_err(decode(&row, 1, &all)).contains("k = C = 2"));
        row[..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
        assert_eq!(decode_dense(&row, 1, &all).unwrap(), vec![0.5, 0.5]);
    }

    #[test]
    fn decode_never_panics_on_random_bytes() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for (c, k) in [(3, 1), (10, 4), (70_000, 3)] {
            let f = TopKFormat::new(c, k).unwrap();
            for _ in 0..2000 {
                let len = rng.random_range(0..3 * f.bytes_per_sample());
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let rows = rng.random_range(0..4);
                if let Ok(t) = decode(&bytes, rows, &f) {
                    let dense = t.to_dense();
                    assert!(dense.iter().all(|p| p.is_finite() && *p >= 0.0));
                    assert!(t.neg_entropy().iter().all(|e| e.is_finite()));
                }
            }
        }
    }

    /// kd_loss_topk against kd_loss on the decoded dense target: value and gradient.
    fn compare(x: &[f32], rows: usize, c: usize, k: usize, t: f64, alpha: f64, seed: u64) {
        let f = TopKFormat::new(c, k).unwrap();
        let targets = decode(&encode(x, rows, &f).unwrap(), rows, &f).unwrap();
        let dense = tensor(&targets.to_dense(), rows, c);
        let s = Var::from_tensor(&tensor(&logits(rows, c, 3.0, seed), rows, c)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let y: Vec<u32> = (0..rows).map(|_| rng.random_range(0..c as u32)).collect();
        let y = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
        for labels in [None, Some(&y)] {
            let a = kd::kd_loss(s.as_tensor(), &dense, labels, t, alpha).unwrap();
            let b = kd_loss_topk(s.as_tensor(), &targets, labels, t, alpha).unwrap();
            let (va, vb) = (a.values().unwrap(), b.values().unwrap());
            let tol = |v: f32| 1e-5 * f64::from(v.abs()).max(1.0);
            assert!(
                f64::from((va.0 - vb.0).abs()) <= tol(va.0),
                "C={c} k={k} T={t}: total {} vs {}",
                va.0,
                vb.0
            );
            assert!(
                f64::from((va.1 - vb.1).abs()) <= tol(va.1),
                "soft {va:?} vs {vb:?}"
            );
            assert_eq!(va.2, vb.2);
            let ga = a.total.backward().unwrap();
            let gb = b.total.backward().unwrap();
            let diff = ga
                .get(s.as_tensor())
                .unwrap()
                .sub(gb.get(s.as_tensor()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-6,
                "C={c} k={k} T={t}: gradient differs by {diff}"
            );
            println!(
                "C={c} k={k} T={t} alpha={alpha} labels={}: |Δtotal| {:e} (total {}), max |Δgrad| {diff:e}",
                labels.is_some(),
                (va.0 - vb.0).abs(),
                va.0
            );
        }
    }

    #[test]
    fn sparse_loss_matches_dense_loss_and_gradient() {
        for (c, k) in [(10, 1), (10, 3), (10, 10), (257, 16)] {
            let x = logits(7, c, 5.0, c as u64);
            for (t, alpha) in [(1.0, 0.5), (2.0, 1.0), (4.0, 0.9), (20.0, 0.0)] {
                compare(&x, 7, c, k, t, alpha, 11 + k as u64);
            }
        }
    }

    #[test]
    fn sparse_loss_matches_dense_at_32000_classes_k32() {
        let (rows, c, k) = (8, 32_000, 32);
        let x = logits(rows, c, 8.0, 5);
        compare(&x, rows, c, k, 2.0, 0.5, 6);
        compare(&x, rows, c, k, 1.0, 1.0, 7);
    }

    #[test]
    fn sparse_loss_equals_reference_formula() {
        // A hand-checkable case: C = 4, k = 1, keep p̂ = (0.7, 0.1, 0.1, 0.1).
        let f = TopKFormat::new(4, 1).unwrap();
        let x = [0.7f32.ln(), 0.2f32.ln(), 0.05f32.ln(), 0.05f32.ln()];
        let targets = decode(&encode(&x, 1, &f).unwrap(), 1, &f).unwrap();
        let s = [0.5f32, -0.2, 1.0, 0.0];
        let t = 2.0;
        let q = softmax64(&s.map(|v| v / t as f32));
        let p = [0.7, 0.1, 0.1, 0.1];
        let want: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        let got = kd_loss_topk(&tensor(&s, 1, 4), &targets, None, t, 0.3).unwrap();
        let (total, soft, hard) = got.values().unwrap();
        assert!(hard.is_none());
        assert!((f64::from(soft) - want).abs() < 1e-5, "{soft} vs {want}");
        assert!((f64::from(total) - t * t * want).abs() < 1e-4);
    }

    #[test]
    fn kd_loss_topk_rejects_bad_input() {
        let f = TopKFormat::new(4, 2).unwrap();
        let x = logits(3, 4, 2.0, 8);
        let targets = decode(&encode(&x, 3, &f).unwrap(), 3, &f).unwrap();
        let s = tensor(&logits(3, 4, 2.0, 9), 3, 4);
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        assert!(input_err(kd_loss_topk(&s, &targets, Some(&y), 0.0, 0.5)).contains("temperature"));
        assert!(input_err(kd_loss_topk(&s, &targets, Some(&y), 1.0, 1.5)).contains("alpha"));
        let s2 = tensor(&logits(2, 4, 2.0, 9), 2, 4);
        assert!(input_err(kd_loss_topk(&s2, &targets, None, 1.0, 0.5)).contains("3 rows of 4"));
        let flat = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(input_err(kd_loss_topk(&flat, &targets, None, 1.0, 0.5)).contains("[N, C]"));
        let y_bad = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
        assert!(
            input_err(kd_loss_topk(&s, &targets, Some(&y_bad), 1.0, 0.5)).contains("out of range")
        );
        let y_f = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap();
        assert!(input_err(kd_loss_topk(&s, &targets, Some(&y_f), 1.0, 0.5)).contains("u8, u32"));
        let y8 = Tensor::new(&[0u8, 1, 2], &Device::Cpu).unwrap();
        assert!(kd_loss_topk(&s, &targets, Some(&y8), 1.0, 0.5).is_ok());
    }

    #[test]
    fn bytes_per_sample_32000_classes_k32_is_at_most_200() {
        let b = bytes_per_sample(32_000, 32).unwrap();
        let bf = TopKFormat::with_value_dtype(32_000, 32, ValueDtype::Bf16).unwrap();
        println!(
            "top-k soft targets, C = 32000, k = 32: {b} bytes/sample (f16 values; bf16: {}); \
             dense f32 {}, dense f16 {}",
            bf.bytes_per_sample(),
            dense_bytes_per_sample(32_000, 4),
            dense_bytes_per_sample(32_000, 2)
        );
        assert_eq!(b, 132);
        assert!(b <= 200);
        assert_eq!(bytes_per_sample(100_000, 32).unwrap(), 4 + 32 * 6);
        assert_eq!(bytes_per_sample(10, 10).unwrap(), 44);
    }

    #[test]
    fn loss_gap_is_tiny_for_k_equals_c_and_measured_for_k_below_c() {
        let (rows, c) = (4, 100);
        let x = logits(rows, c, 6.0, 10);
        let s = tensor(&logits(rows, c, 3.0, 12), rows, c);
        let full = loss_gap(&x, rows, &s, 2.0, &TopKFormat::new(c, c).unwrap()).unwrap();
        assert!(full.rel_diff < 1e-3, "{full:?}");
        assert!(full.max_grad_diff < 1e-4, "{full:?}");
        let gap = loss_gap(&x, rows, &s, 2.0, &TopKFormat::new(c, 8).unwrap()).unwrap();
        assert!(gap.dense > 0.0 && gap.topk > 0.0, "{gap:?}");
        assert_eq!(
            (gap.topk_bytes_per_sample, gap.dense_bytes_per_sample),
            (36, 400)
        );
        println!("loss gap, C = {c}: k = C {full:?}; k = 8 {gap:?}");

        let (rows, c) = (4, 32_000);
        let x = logits(rows, c, 8.0, 13);
        let s = tensor(&logits(rows, c, 3.0, 14), rows, c);
        let gap = loss_gap(&x, rows, &s, 2.0, &TopKFormat::new(c, 32).unwrap()).unwrap();
        println!("loss gap, C = 32000, k = 32, noisy teacher: {gap:?}");
        assert!(gap.dense.is_finite() && gap.topk.is_finite());
        assert!(gap.mean_rest_mass > 0.0 && gap.mean_rest_mass < 1.0);

        // A Zipf teacher, p ∝ rank^−2 over a random permutation of the classes.
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let mut zipf = Vec::with_capacity(rows * c);
        for _ in 0..rows {
            let mut ranks: Vec<f32> = (1..=c).map(|r| -2.0 * (r as f32).ln()).collect();
            for i in (1..c).rev() {
                ranks.swap(i, rng.random_range(0..=i));
            }
            zipf.extend(ranks);
        }
        let gap = loss_gap(&zipf, rows, &s, 1.0, &TopKFormat::new(c, 32).unwrap()).unwrap();
        println!("loss gap, C = 32000, k = 32, Zipf(2) teacher: {gap:?}");
        assert!(gap.mean_rest_mass < 0.025, "{gap:?}");
        assert!(gap.rel_diff < 0.05, "{gap:?}");
    }
}
