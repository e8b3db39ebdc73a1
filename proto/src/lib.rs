//! The `distill.v1` wire protocol: generated tonic/prost code for every distill service, and a
//! checked conversion between the wire [`pb::Tensor`] and a plain [`HostTensor`].
//!
//! This crate knows nothing of candle: role crates join it to `distill-core` through the host
//! tensor's `(shape, dtype, bytes)`.

use bytes::Bytes;

pub mod oip;
pub mod params;

/// Generated protobuf messages and gRPC stubs for package `distill.v1`.
pub mod pb {
    tonic::include_proto!("distill.v1");
}

/// Generated messages and stubs of the Open Inference Protocol (package `inference`: KServe v2,
/// Triton's core API); [`oip`] joins its tensors to [`HostTensor`].
pub mod pb_oip {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of every `distill.v1` file and of `inference`, for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("distill_descriptor");

/// Errors converting wire messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The tensor's dtype is unset or unknown.
    #[error("tensor dtype {0} is not supported (expected F32, F16, BF16, U8 or I64)")]
    BadDType(i32),
    /// The byte length does not match shape × dtype size.
    #[error("tensor of shape {shape:?} and dtype {dtype:?} needs {expected} bytes, got {got}")]
    BadLength {
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        got: u64,
    },
    /// The element count overflows or exceeds the limit.
    #[error("tensor of shape {shape:?} is too large (more than {limit} elements)")]
    TooLarge { shape: Vec<u64>, limit: u64 },
    /// A required tensor field was missing.
    #[error("missing tensor `{0}`")]
    Missing(&'static str),
    /// A float tensor was asked for in an integer dtype.
    #[error("{0:?} is not a float dtype (expected F32, F16 or BF16)")]
    NotFloat(DType),
    /// A parameter chunk does not fit the parameter set being assembled.
    #[error("parameters: {0}")]
    Params(String),
    /// An Open Inference Protocol tensor that does not fit what it claims or what is asked.
    #[error("{0}")]
    Oip(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Element type of a host tensor (the wire `DType` without its `UNSPECIFIED` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U8,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    /// Whether the elements are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl TryFrom<i32> for DType {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        match pb::DType::try_from(v) {
            Ok(pb::DType::DtypeF32) => Ok(DType::F32),
            Ok(pb::DType::DtypeF16) => Ok(DType::F16),
            Ok(pb::DType::DtypeBf16) => Ok(DType::BF16),
            Ok(pb::DType::DtypeU8) => Ok(DType::U8),
            Ok(pb::DType::DtypeI64) => Ok(DType::I64),
            Ok(pb::DType::DtypeUnspecified) | Err(_) => Err(Error::BadDType(v)),
        }
    }
}

impl From<DType> for pb::DType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => pb::DType::DtypeF32,
            DType::F16 => pb::DType::DtypeF16,
            DType::BF16 => pb::DType::DtypeBf16,
            DType::U8 => pb::DType::DtypeU8,
            DType::I64 => pb::DType::DtypeI64,
        }
    }
}

/// A dense row-major little-endian tensor held in host memory; `data.len()` always equals
/// `numel() * dtype.size()` (checked on construction).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Bytes,
}

/// Largest element count accepted from the wire (2^40), far above any message-size limit; it
/// only guards the shape arithmetic against overflow.
pub const MAX_ELEMENTS: u64 = 1 << 40;

impl HostTensor {
    /// Builds a tensor, checking that the byte length matches the shape and dtype.
    pub fn new(shape: Vec<usize>, dtype: DType, data: impl Into<Bytes>) -> Result<Self> {
        let data = data.into();
        let wire_shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let numel = checked_numel(&wire_shape)?;
        let expected = numel * dtype.size() as u64;
        if expected != data.len() as u64 {
            return Err(Error::BadLength {
                shape: wire_shape,
                dtype,
                expected,
                got: data.len() as u64,
            });
        }
        Ok(Self { shape, dtype, data })
    }

    /// An f32 tensor from values (little-endian encoded).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        Self::from_f32_as(shape, values, DType::F32)
    }

    /// A float tensor of `dtype` (F32, F16 or BF16) from f32 values, rounded to nearest even.
    /// With [`HostTensor::to_f32_vec`] this is the one f32 ↔ f16/bf16 conversion on the wire
    /// side (`distill-core` has its own, `distill_core::elem`, as the crates do not depend on each
    /// other; both are `half`'s, so they agree bit for bit).
    pub fn from_f32_as(shape: Vec<usize>, values: &[f32], dtype: DType) -> Result<Self> {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            DType::U8 | DType::I64 => return Err(Error::NotFloat(dtype)),
        }
        Self::new(shape, dtype, bytes)
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Raw little-endian bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Splits into parts.
    pub fn into_parts(self) -> (Vec<usize>, DType, Bytes) {
        (self.shape, self.dtype, self.data)
    }

    /// The elements as f32 (converting F16/BF16/U8/I64).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::U8 => d.iter().map(|&b| b as f32).collect(),
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a) as f32
                })
                .collect(),
        }
    }

    /// Index of the first non-finite float element, if any (None for integer dtypes).
    pub fn first_non_finite(&self) -> Option<usize> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            DType::F16 => d
                .chunks_exact(2)
                .position(|c| !half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
            DType::BF16 => d
                .chunks_exact(2)
                .position(|c| !half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
            DType::U8 | DType::I64 => None,
        }
    }
}

/// The element count of `shape`, checked against overflow and [`MAX_ELEMENTS`] at every
/// dimension: a zero dimension makes the count 0, but every other dimension must still be at most
/// [`MAX_ELEMENTS`] and so must the product of the nonzero ones, so callers may multiply any
/// subset of the dimensions (a row length `shape[1..]`, say) without overflow.
pub(crate) fn checked_numel(shape: &[u64]) -> Result<u64> {
    let too_large = || Error::TooLarge {
        shape: shape.to_vec(),
        limit: MAX_ELEMENTS,
    };
    let mut nonzero: u64 = 1;
    for &d in shape.iter().filter(|&&d| d != 0) {
        nonzero = nonzero
            .checked_mul(d)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(too_large)?;
    }
    if shape.contains(&0) {
        Ok(0)
    } else {
        Ok(nonzero)
    }
}

impl TryFrom<pb::Tensor> for HostTensor {
    type Error = Error;
    fn try_from(t: pb::Tensor) -> Result<Self> {
        let pb::Tensor { shape, dtype, data } = t;
        let dtype = DType::try_from(dtype)?;
        let numel = checked_numel(&shape)?;
        let expected = numel * dtype.size() as u64;
        if expected != data.len() as u64 {
            return Err(Error::BadLength {
                shape,
                dtype,
                expected,
                got: data.len() as u64,
            });
        }
        Ok(Self {
            shape: shape.iter().map(|&d| d as usize).collect(),
            dtype,
            data,
        })
    }
}

impl From<HostTensor> for pb::Tensor {
    fn from(t: HostTensor) -> Self {
        let HostTensor { shape, dtype, data } = t;
        pb::Tensor {
            shape: shape.iter().map(|&d| d as u64).collect(),
            dtype: pb::DType::from(dtype) as i32,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_preserves_everything() {
        let t = HostTensor::from_f32(vec![2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-8, 7.0]).unwrap();
        let wire: pb::Tensor = t.clone().into();
        assert_eq!(wire.shape, vec![2, 3]);
        assert_eq!(wire.dtype, pb::DType::DtypeF32 as i32);
        let back = HostTensor::try_from(wire).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_f32_vec(), vec![1.0, -2.0, 3.5, 0.0, 1e-8, 7.0]);
    }

    #[test]
    fn rejects_wrong_length_unset_dtype_and_overflow() {
        let bad_len = pb::Tensor {
            shape: vec![2, 2],
            dtype: pb::DType::DtypeF32 as i32,
            data: Bytes::from(vec![0u8; 15]),
        };
        let err = HostTensor::try_from(bad_len).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BadLength {
                    expected: 16,
                    got: 15,
                    ..
                }
            ),
            "{err}"
        );

        let unset = pb::Tensor {
            shape: vec![1],
            dtype: 0,
            data: Bytes::from(vec![0u8; 4]),
        };
        assert_eq!(HostTensor::try_from(unset).unwrap_err(), Error::BadDType(0));
        let unknown = pb::Tensor {
            shape: vec![1],
            dtype: 99,
            data: Bytes::new(),
        };
        assert_eq!(
            HostTensor::try_from(unknown).unwrap_err(),
            Error::BadDType(99)
        );

        let huge = pb::Tensor {
            shape: vec![u64::MAX, 2],
            dtype: pb::DType::DtypeU8 as i32,
            data: Bytes::new(),
        };
        assert!(matches!(
            HostTensor::try_from(huge).unwrap_err(),
            Error::TooLarge { .. }
        ));
    }

    #[test]
    fn a_zero_dimension_does_not_hide_huge_ones() {
        // 0 rows of 2^63 × 4 values: no bytes, but a receiver computing the row length
        // (`shape[1..].product()`) overflows. Every dimension counts against the limit.
        for shape in [
            vec![0, 1 << 63, 4],
            vec![0, u64::MAX],
            vec![1 << 30, 0, 1 << 30, 1 << 30],
        ] {
            let t = pb::Tensor {
                shape: shape.clone(),
                dtype: pb::DType::DtypeU8 as i32,
                data: Bytes::new(),
            };
            let e = HostTensor::try_from(t).unwrap_err();
            assert!(matches!(e, Error::TooLarge { .. }), "{shape:?}: {e}");
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            assert!(HostTensor::new(shape, DType::U8, Vec::new()).is_err());
        }
        // Zero dimensions with small ones are fine and hold no elements.
        let t = HostTensor::new(vec![0, 3, 4], DType::F32, Vec::new()).unwrap();
        assert_eq!(t.numel(), 0);
        assert_eq!(
            HostTensor::new(vec![1 << 20, 1 << 20], DType::U8, Vec::new()).unwrap_err(),
            Error::BadLength {
                shape: vec![1 << 20, 1 << 20],
                dtype: DType::U8,
                expected: 1 << 40,
                got: 0
            }
        );
    }

    #[test]
    fn float_encoding_rounds_like_half_and_refuses_integers() {
        let t = HostTensor::from_f32_as(vec![2], &[1.0 / 3.0, -2.0], DType::F16).unwrap();
        assert_eq!(t.data().as_ref(), &[0x55, 0x35, 0x00, 0xc0]);
        let t = HostTensor::from_f32_as(vec![1], &[1.0 / 3.0], DType::BF16).unwrap();
        assert_eq!(t.data().as_ref(), &[0xab, 0x3e]);
        assert_eq!(
            HostTensor::from_f32_as(vec![1], &[1.0], DType::U8).unwrap_err(),
            Error::NotFloat(DType::U8)
        );
    }

    #[test]
    fn finds_non_finite_in_every_float_dtype() {
        let f = HostTensor::from_f32(vec![3], &[1.0, f32::NAN, 2.0]).unwrap();
        assert_eq!(f.first_non_finite(), Some(1));
        let h: Vec<u8> = [half::f16::ONE, half::f16::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let h = HostTensor::new(vec![2], DType::F16, h).unwrap();
        assert_eq!(h.first_non_finite(), Some(1));
        let b: Vec<u8> = [half::bf16::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            HostTensor::new(vec![1], DType::BF16, b)
                .unwrap()
                .first_non_finite(),
            Some(0)
        );
        let u = HostTensor::new(vec![2], DType::U8, vec![255u8, 0]).unwrap();
        assert_eq!(u.first_non_finite(), None);
        assert_eq!(u.to_f32_vec(), vec![255.0, 0.0]);
    }
}
