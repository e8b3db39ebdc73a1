//! The float element formats distill's host data travels in (f32, f16, bf16), and the one place
//! in `distill-core` that converts f32 to and from them (little-endian, round to nearest even).
//!
//! Soft targets ([`crate::soft_targets`]) and the top-k values ([`crate::topk`]) convert through
//! [`Float`]; the wire tensors of `distill-proto` (`HostTensor::from_f32_as` and
//! `HostTensor::to_f32_vec`) have their own copy, because DESIGN.md keeps `distill-core` and
//! `distill-proto` independent of each other. Both use `half`'s conversions, so they agree bit
//! for bit (both crates' tests pin the same bytes for 1/3).

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A float element format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Float {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, 2 bytes (11-bit significand).
    F16,
    /// bfloat16, 2 bytes (8-bit significand, f32's exponent range).
    Bf16,
}

impl Float {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::Bf16 => 2,
        }
    }

    /// Appends `v` in this format (rounded to nearest even; out-of-range values become ±inf).
    pub fn write(self, v: f32, out: &mut Vec<u8>) {
        match self {
            Float::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Float::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            Float::Bf16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }

    /// Appends every value of `values` in this format.
    pub fn write_all(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        values.iter().for_each(|&v| self.write(v, out));
    }

    /// One element from exactly [`Float::size`] bytes; `None` for another length.
    pub fn read(self, b: &[u8]) -> Option<f32> {
        Some(match (self, b) {
            (Float::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
            (Float::F16, &[a, b]) => f16::from_le_bytes([a, b]).to_f32(),
            (Float::Bf16, &[a, b]) => bf16::from_le_bytes([a, b]).to_f32(),
            _ => return None,
        })
    }

    /// Every element of `bytes` as f32; an error when the length is not a whole number of
    /// elements.
    pub fn read_all(self, bytes: &[u8]) -> Result<Vec<f32>> {
        if !bytes.len().is_multiple_of(self.size()) {
            return Err(Error::Input(format!(
                "{} bytes are not a whole number of {self:?} elements ({} bytes each)",
                bytes.len(),
                self.size()
            )));
        }
        Ok(bytes
            .chunks_exact(self.size())
            .filter_map(|c| self.read(c))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_like_half() {
        let v = [0.0, 1.0, -2.5, 1.0 / 3.0, 65_504.0, 1e-8, f32::NEG_INFINITY];
        for f in [Float::F32, Float::F16, Float::Bf16] {
            let mut b = Vec::new();
            f.write_all(&v, &mut b);
            assert_eq!(b.len(), v.len() * f.size());
            let back = f.read_all(&b).unwrap();
            let want: Vec<f32> = match f {
                Float::F32 => v.to_vec(),
                Float::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
                Float::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            };
            assert_eq!(back, want, "{f:?}");
        }
        // 1/3 in f16 is 0x3555 (0.33325195), in bf16 0x3eab (0.33398438): round to nearest.
        let mut b = Vec::new();
        Float::F16.write(1.0 / 3.0, &mut b);
        Float::Bf16.write(1.0 / 3.0, &mut b);
        assert_eq!(b, vec![0x55, 0x35, 0xab, 0x3e]);
        assert!(Float::F16.read_all(&[0, 0, 0]).is_err());
        assert_eq!(Float::F32.read(&[0, 0]), None);
    }
}
