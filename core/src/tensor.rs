//! The step between a plain host tensor (shape, dtype, little-endian bytes — what
//! `distill-proto` puts on the wire) and a candle tensor.

use candle_core::{CpuStorage, DType, Device, Layout, Tensor};

use crate::{Error, Result};

/// The contiguous f32 data of a CPU tensor argument.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

fn le_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// Builds a candle tensor from little-endian bytes. Supported dtypes: F32, F16, BF16, U8, I64.
pub fn from_le_bytes(
    shape: &[usize],
    dtype: DType,
    bytes: &[u8],
    device: &Device,
) -> Result<Tensor> {
    // Checked: the shape may come from outside, and its product may not fit a usize.
    let need = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Input(format!("shape {shape:?} of {dtype:?} is too large")))?;
    if need != bytes.len() {
        return Err(Error::Input(format!(
            "shape {shape:?} of {dtype:?} needs {need} bytes, got {}",
            bytes.len()
        )));
    }
    let t = match dtype {
        DType::F32 => Tensor::from_vec(
            le_chunks::<4>(bytes).map(f32::from_le_bytes).collect(),
            shape,
            device,
        )?,
        DType::F16 => Tensor::from_vec(
            le_chunks::<2>(bytes)
                .map(half::f16::from_le_bytes)
                .collect(),
            shape,
            device,
        )?,
        DType::BF16 => Tensor::from_vec(
            le_chunks::<2>(bytes)
                .map(half::bf16::from_le_bytes)
                .collect(),
            shape,
            device,
        )?,
        DType::U8 => Tensor::from_vec(bytes.to_vec(), shape, device)?,
        DType::I64 => Tensor::from_vec(
            le_chunks::<8>(bytes).map(i64::from_le_bytes).collect(),
            shape,
            device,
        )?,
        other => {
            return Err(Error::Input(format!(
                "dtype {other:?} is not supported on the wire"
            )));
        }
    };
    Ok(t)
}

/// The tensor's elements as little-endian bytes, row-major (copied to the host if needed).
pub fn to_le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    let out = match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::Input(format!(
                "dtype {other:?} is not supported on the wire"
            )));
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_wire_dtype() {
        let dev = Device::Cpu;
        let base = Tensor::from_vec(vec![1.5f32, -2.0, 0.25, 1e3, 0.0, 7.0], (2, 3), &dev).unwrap();
        for dt in [DType::F32, DType::F16, DType::BF16, DType::U8, DType::I64] {
            let t = base.abs().unwrap().to_dtype(dt).unwrap();
            let bytes = to_le_bytes(&t).unwrap();
            assert_eq!(bytes.len(), 6 * dt.size_in_bytes());
            let back = from_le_bytes(&[2, 3], dt, &bytes, &dev).unwrap();
            assert_eq!(back.dtype(), dt);
            let a = t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let b = back.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(a, b, "{dt:?}");
        }
        assert_eq!(to_le_bytes(&base).unwrap()[..4], 1.5f32.to_le_bytes());
        assert!(from_le_bytes(&[2, 3], DType::F32, &[0u8; 23], &dev).is_err());
    }
}
