//! What each teacher said, per sample: the member records of the soft-target cache.
//!
//! A run with a `[cache]` stores every member's own tempered logits, not the combination it
//! made of them, so that another temperature, another `combine`, other member weights or a
//! subset of the members can be served from the same record without asking any teacher again
//! (`distill sweep` relies on it). The soft targets are computed on the coordinator from the
//! records, batch by batch, exactly as they are from fresh answers: a fresh answer is first
//! encoded as a record and decoded again, so a batch's targets do not depend on whether its
//! rows came from the teachers or from the cache.
//!
//! # Keys
//!
//! A record lives in the same redb file as the combined-target keys, under a [`CacheKey`] whose
//! single member is the teacher (its name and its identity: the weights digest its replicas
//! report, or for OIP models the configured `identity` or `name@version`), with weight 1, the
//! temperature the record was captured at, and an encoding that starts with
//! [`ENCODING_PREFIX`] and names the record format and the class count. Changing the member's
//! weights, the data or the format selects another record; T, `combine` and the member weights
//! of the run do not.
//!
//! # Formats
//!
//! - `dense`: the `classes` tempered logits z/T_c of the row, `f32` little-endian. Serving
//!   another T multiplies them by T_c/T, which is exact up to `f32` rounding (and bit-exact at
//!   T = T_c).
//! - `top-k:K`, for large vocabularies: the K largest logits z/T_c with their class indices,
//!   and the log-sum-exp R of the remaining `classes − K` logits, in `8K + 4` bytes. The K kept
//!   classes are those at the capture temperature (the order of the logits, hence the set, is
//!   the same at every T > 0). At another T the kept logits are rescaled exactly and the
//!   remainder is re-tempered **as a single bucket**: its logit becomes R·T_c/T, spread evenly
//!   over the remaining classes. At T = T_c the kept probabilities are exact and only the
//!   remainder's shape is lost.
//!
//!   The error bound: the reconstructed and the exact distribution give the kept classes the
//!   same relative probabilities, so their total-variation distance is at most
//!   `max(m, m̂)`, where m is the exact remainder mass at T and m̂ the bucket's. For T < T_c the
//!   bucket over-states the remainder (m̂ ≥ m: a sum of powers is at most the power of the sum),
//!   for T > T_c it under-states it; either way the error is no larger than the mass the record
//!   did not keep. Choose K so that the remainder is small at the lowest T you will sweep.
//!
//! Which format a run writes is `[cache] record` (`"dense"`, `"top-k:K"`); by default dense
//! up to [`DENSE_UP_TO`] classes and `top-k:64` beyond.

use std::fmt;
use std::str::FromStr;

use distill_core::kd::Combine;
use serde::{Deserialize, Serialize};

use super::cache::{CacheKey, CacheKeyInfo, MemberIdentity};

/// Every record key's encoding starts with this.
pub const ENCODING_PREFIX: &str = "member-logits:";

/// Class counts up to this get dense records by default; larger ones `top-k:64`.
pub const DENSE_UP_TO: usize = 4096;

/// How a member record stores one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordFormat {
    /// Every tempered logit, `f32`.
    Dense,
    /// The K largest tempered logits with their classes, and the rest's log-sum-exp.
    TopK(usize),
}

impl RecordFormat {
    /// The default for `classes` classes.
    pub fn auto(classes: usize) -> Self {
        if classes <= DENSE_UP_TO {
            RecordFormat::Dense
        } else {
            RecordFormat::TopK(64)
        }
    }

    /// Checks the format against `classes`: K between 1 and `classes`.
    pub fn check(self, classes: usize) -> Result<(), String> {
        match self {
            RecordFormat::Dense => Ok(()),
            RecordFormat::TopK(k) if k >= 1 && k <= classes => Ok(()),
            RecordFormat::TopK(k) => Err(format!(
                "top-k:{k} keeps 0 or more classes than the data's {classes}"
            )),
        }
    }

    /// Bytes of one stored row over `classes` classes.
    pub fn row_bytes(self, classes: usize) -> usize {
        match self {
            RecordFormat::Dense => classes.saturating_mul(4),
            RecordFormat::TopK(k) => k.saturating_mul(8).saturating_add(4),
        }
    }

    /// The encoding string of a record key (names the class count: a record is only read back
    /// for data of the same shape).
    fn encoding(self, classes: usize) -> String {
        format!("{ENCODING_PREFIX}{self}/{classes}")
    }
}

impl fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordFormat::Dense => f.write_str("dense"),
            RecordFormat::TopK(k) => write!(f, "top-k:{k}"),
        }
    }
}

impl FromStr for RecordFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "dense" {
            return Ok(RecordFormat::Dense);
        }
        match s.strip_prefix("top-k:").map(str::parse::<usize>) {
            Some(Ok(k)) if k > 0 => Ok(RecordFormat::TopK(k)),
            _ => Err(format!(
                "`{s}` is not a record format (\"dense\" or \"top-k:K\" with K ≥ 1)"
            )),
        }
    }
}

impl Serialize for RecordFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecordFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One member's record: what its rows depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRecord {
    /// Data source identity (as in [`CacheKey::data`]).
    pub data: String,
    /// Rows of the training split.
    pub train_size: usize,
    /// Member name.
    pub member: String,
    /// Weights digest, or the OIP model's stated identity.
    pub identity: String,
    /// Temperature the logits were asked at.
    pub capture_temperature: f32,
    /// Row format.
    pub format: RecordFormat,
    /// Classes of the data.
    pub classes: usize,
}

impl MemberRecord {
    /// The cache key the record's rows are stored under.
    pub fn key(&self) -> CacheKey {
        CacheKey {
            data: self.data.clone(),
            train_size: self.train_size,
            members: vec![MemberIdentity {
                name: self.member.clone(),
                weights_digest: self.identity.clone(),
                weight: 1.0,
            }],
            temperature: self.capture_temperature,
            combine: Combine::MeanLogit,
            encoding: self.format.encoding(self.classes),
            row_bytes: self.format.row_bytes(self.classes),
        }
    }

    /// The record a stored key holds, or None for a combined-target key.
    pub fn from_key(key: &CacheKey) -> Option<Self> {
        let rest = key.encoding.strip_prefix(ENCODING_PREFIX)?;
        let (format, classes) = rest.rsplit_once('/')?;
        let (format, classes): (RecordFormat, usize) =
            (format.parse().ok()?, classes.parse().ok()?);
        // A key read from a file is outside input: one whose top-k keeps more classes than it
        // has is no record (decoding it would underflow the remainder's class count).
        format.check(classes).ok()?;
        let [m] = key.members.as_slice() else {
            return None;
        };
        let record = MemberRecord {
            data: key.data.clone(),
            train_size: key.train_size,
            member: m.name.clone(),
            identity: m.weights_digest.clone(),
            capture_temperature: key.temperature,
            format,
            classes,
        };
        (record.key() == *key).then_some(record)
    }

    /// Encodes `logits` (`rows × classes` tempered logits at the capture temperature) as
    /// `rows` record rows.
    pub fn encode(&self, logits: &[f32], rows: usize) -> Result<Vec<u8>, String> {
        let c = self.classes;
        if c == 0 || rows.checked_mul(c) != Some(logits.len()) {
            return Err(format!(
                "{} logits are not {rows} rows of {c} classes",
                logits.len()
            ));
        }
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(format!("logit {i} is not finite"));
        }
        let mut out = Vec::with_capacity(rows.saturating_mul(self.format.row_bytes(c)));
        match self.format {
            RecordFormat::Dense => logits
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            RecordFormat::TopK(k) => {
                for row in logits.chunks_exact(c) {
                    let (kept, rest) = top_k(row, k);
                    for &i in &kept {
                        out.extend_from_slice(&(i as u32).to_le_bytes());
                    }
                    for &i in &kept {
                        out.extend_from_slice(&row[i].to_le_bytes());
                    }
                    out.extend_from_slice(&rest.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Decodes `rows` record rows into `rows × classes` tempered logits at temperature `t`
    /// (rescaled from the capture temperature; see the module docs for top-k). A row that
    /// cannot have been written by [`Self::encode`] is an error naming it.
    pub fn decode(&self, bytes: &[u8], rows: usize, t: f32) -> Result<Vec<f32>, String> {
        let c = self.classes;
        let per = self.format.row_bytes(c);
        if rows.checked_mul(per) != Some(bytes.len()) {
            return Err(format!(
                "{} bytes are not {rows} records of {per} bytes",
                bytes.len()
            ));
        }
        if !(t.is_finite() && t > 0.0) {
            return Err(format!("temperature {t} is not finite and > 0"));
        }
        // Bit-exact at the capture temperature: nothing is multiplied.
        let scale = self.capture_temperature / t;
        let rescale = |v: f32| {
            if t == self.capture_temperature {
                v
            } else {
                v * scale
            }
        };
        let f32_at = |b: &[u8], i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[4 * i..4 * i + 4]);
            w
        };
        let mut out = Vec::with_capacity(rows.saturating_mul(c));
        for (r, rec) in bytes.chunks_exact(per.max(1)).enumerate() {
            match self.format {
                RecordFormat::Dense => {
                    for i in 0..c {
                        out.push(rescale(f32::from_le_bytes(f32_at(rec, i))));
                    }
                }
                RecordFormat::TopK(k) => {
                    let rest = f32::from_le_bytes(f32_at(rec, 2 * k));
                    let others = c - k;
                    // The remainder as one bucket of logit R·T_c/T, spread evenly.
                    let spread = if others == 0 {
                        f32::NEG_INFINITY
                    } else {
                        rescale(rest) - (others as f32).ln()
                    };
                    let start = out.len();
                    out.resize(start + c, spread);
                    for j in 0..k {
                        let class = u32::from_le_bytes(f32_at(rec, j)) as usize;
                        let v = f32::from_le_bytes(f32_at(rec, k + j));
                        if class >= c || !v.is_finite() {
                            return Err(format!(
                                "record row {r}: kept entry {j} (class {class}, logit {v}) is out of range or not finite"
                            ));
                        }
                        out[start + class] = rescale(v);
                    }
                    if others > 0 && !spread.is_finite() {
                        return Err(format!(
                            "record row {r}: the remainder's log-sum-exp {rest} is not finite"
                        ));
                    }
                }
            }
        }
        if let Some(i) = out.iter().position(|v| v.is_nan()) {
            return Err(format!("record row {}: a logit is not a number", i / c));
        }
        Ok(out)
    }
}

/// The `k` largest entries of `row` (ties: lower class first), in descending order, and the
/// log-sum-exp of the others (−∞ when there are none).
fn top_k(row: &[f32], k: usize) -> (Vec<usize>, f32) {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let k = k.min(row.len());
    let rest = &order[k..];
    let lse = match rest.iter().map(|&i| row[i]).reduce(f32::max) {
        None => f32::NEG_INFINITY,
        Some(m) => {
            let sum: f64 = rest.iter().map(|&i| f64::from(row[i] - m).exp()).sum();
            m + sum.ln() as f32
        }
    };
    order.truncate(k);
    (order, lse)
}

/// The record keys among `keys` for `data` (with `train_size` training rows).
pub fn records_for<'a>(
    keys: &'a [CacheKeyInfo],
    data: &'a str,
    train_size: usize,
) -> impl Iterator<Item = (MemberRecord, &'a CacheKeyInfo)> + 'a {
    keys.iter().filter_map(move |k| {
        let r = MemberRecord::from_key(&k.key)?;
        (r.data == data && r.train_size == train_size).then_some((r, k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: RecordFormat, classes: usize, t: f32) -> MemberRecord {
        MemberRecord {
            data: "synthetic:0".into(),
            train_size: 10,
            member: "t".into(),
            identity: "ab".repeat(32),
            capture_temperature: t,
            format,
            classes,
        }
    }

    fn softmax(z: &[f32]) -> Vec<f64> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = z.iter().map(|&v| f64::from(v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    }

    /// A deterministic spread of logits (no RNG crate needed for a unit test).
    fn logits(rows: usize, classes: usize) -> Vec<f32> {
        (0..rows * classes)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 12.0)
            .collect()
    }

    #[test]
    fn keys_round_trip_and_tell_records_from_combined_keys() {
        for f in [RecordFormat::Dense, RecordFormat::TopK(3)] {
            let r = record(f, 10, 2.0);
            assert_eq!(MemberRecord::from_key(&r.key()), Some(r.clone()));
            r.key().validate().unwrap();
        }
        let mut combined = record(RecordFormat::Dense, 10, 2.0).key();
        combined.encoding = "f32".into();
        assert_eq!(MemberRecord::from_key(&combined), None);
        assert_eq!("top-k:5".parse(), Ok(RecordFormat::TopK(5)));
        assert!("top-k:0".parse::<RecordFormat>().is_err());
        assert!("sparse".parse::<RecordFormat>().is_err());
        assert!(RecordFormat::TopK(11).check(10).is_err());
        // A stored key that keeps more classes than it has is not taken for a record.
        let mut wide = record(RecordFormat::TopK(3), 10, 2.0).key();
        wide.encoding = format!("{ENCODING_PREFIX}top-k:11/10");
        wide.row_bytes = RecordFormat::TopK(11).row_bytes(10);
        assert_eq!(MemberRecord::from_key(&wide), None);
    }

    #[test]
    fn dense_records_rescale_to_any_temperature() {
        let (rows, c) = (4, 10);
        let z = logits(rows, c);
        let r = record(RecordFormat::Dense, c, 1.0);
        let bytes = r.encode(&z, rows).unwrap();
        assert_eq!(bytes.len(), rows * r.format.row_bytes(c));
        assert_eq!(r.decode(&bytes, rows, 1.0).unwrap(), z, "bit-exact at T_c");
        for t in [0.5f32, 2.0, 4.0, 20.0] {
            let got = r.decode(&bytes, rows, t).unwrap();
            for (g, v) in got.iter().zip(&z) {
                assert!((g - v / t).abs() <= 1e-6 * (1.0 + (v / t).abs()), "T={t}");
            }
        }
    }

    #[test]
    fn top_k_records_stay_within_the_stated_bound() {
        let (rows, c, k) = (6, 10, 3);
        let z = logits(rows, c);
        for tc in [1.0f32, 4.0] {
            let r = record(RecordFormat::TopK(k), c, tc);
            let captured: Vec<f32> = z.iter().map(|v| v / tc).collect();
            let bytes = r.encode(&captured, rows).unwrap();
            for t in [1.0f32, 2.0, 4.0, 20.0] {
                let got = r.decode(&bytes, rows, t).unwrap();
                for (row, (g, e)) in got.chunks(c).zip(z.chunks(c)).enumerate() {
                    let exact: Vec<f32> = e.iter().map(|v| v / t).collect();
                    let (p, q) = (softmax(&exact), softmax(g));
                    let (kept, _) = top_k(&exact, k);
                    let rest = |d: &[f64]| -> f64 {
                        (0..c).filter(|i| !kept.contains(i)).map(|i| d[i]).sum()
                    };
                    let bound = rest(&p).max(rest(&q));
                    let tv: f64 = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
                    assert!(
                        tv <= bound + 1e-6,
                        "T_c={tc} T={t} row {row}: TV {tv} > bound {bound}"
                    );
                    if t == tc {
                        for &i in &kept {
                            assert!((p[i] - q[i]).abs() < 1e-6, "kept class {i} at T_c");
                        }
                    }
                    // The bound is not vacuous: it is the mass the record did not keep.
                    assert!(bound < 1.0);
                }
            }
        }
        // Keeping every class is exact.
        let r = record(RecordFormat::TopK(c), c, 1.0);
        let got = r.decode(&r.encode(&z, rows).unwrap(), rows, 1.0).unwrap();
        assert_eq!(got, z);
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        let r = record(RecordFormat::TopK(2), 10, 1.0);
        assert!(r.decode(&[0u8; 5], 1, 1.0).is_err());
        let mut bytes = r.encode(&logits(1, 10), 1).unwrap();
        bytes[0..4].copy_from_slice(&99u32.to_le_bytes());
        assert!(r.decode(&bytes, 1, 1.0).unwrap_err().contains("class 99"));
        assert!(r.encode(&[f32::NAN; 10], 1).is_err());
        assert!(
            r.decode(&r.encode(&logits(1, 10), 1).unwrap(), 1, 0.0)
                .is_err()
        );
    }
}
