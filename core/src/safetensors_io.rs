//! Reading and writing the safetensors files distill saves (checkpoints, optimizer and training
//! state): f32 tensors by name plus string metadata. Shared by [`crate::checkpoint`],
//! [`crate::optim`] and [`crate::train`], so none of them reaches into another for file I/O.

use std::collections::HashMap;

use safetensors::{Dtype as StDtype, SafeTensors, tensor::TensorView};

use crate::elem::Float;
use crate::{Error, Result};

/// One named f32 tensor: `(name, shape, values)`.
pub type NamedParam = (String, Vec<usize>, Vec<f32>);

/// Named f32 buffers as `(name, shape, values)`.
pub type NamedBuffers = Vec<NamedParam>;

/// Serialises f32 tensors plus metadata as safetensors bytes.
pub(crate) fn write_safetensors(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            TensorView::new(StDtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Input(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Input(format!("serialising safetensors: {e}")))
}

/// Reads every tensor (f32 only) and the metadata of a safetensors buffer, tensors sorted by name.
pub(crate) fn read_safetensors(buf: &[u8]) -> Result<(NamedBuffers, HashMap<String, String>)> {
    let (_, header) = SafeTensors::read_metadata(buf)
        .map_err(|e| Error::Input(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(buf)
        .map_err(|e| Error::Input(format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    let mut names = st.names();
    names.sort();
    for name in names {
        let t = st
            .tensor(name)
            .map_err(|e| Error::Input(format!("tensor `{name}`: {e}")))?;
        if t.dtype() != StDtype::F32 {
            return Err(Error::Input(format!(
                "tensor `{name}` has dtype {:?}, expected F32",
                t.dtype()
            )));
        }
        let v = decode_floats(t.dtype(), t.data()).unwrap_or_default();
        out.push((name.to_string(), t.shape().to_vec(), v));
    }
    Ok((out, meta))
}

/// Little-endian float tensor data as f32 (F32, F16, BF16 or F64; None for other dtypes or a
/// length that is not a whole number of elements).
pub(crate) fn decode_floats(dtype: StDtype, data: &[u8]) -> Option<Vec<f32>> {
    let float = match dtype {
        StDtype::F32 => Float::F32,
        StDtype::F16 => Float::F16,
        StDtype::BF16 => Float::Bf16,
        StDtype::F64 => {
            if !data.len().is_multiple_of(8) {
                return None;
            }
            return Some(
                data.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        f64::from_le_bytes(a) as f32
                    })
                    .collect(),
            );
        }
        _ => return None,
    };
    float.read_all(data).ok()
}
