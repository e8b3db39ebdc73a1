//! The Open Inference Protocol's tensors joined to [`HostTensor`]: data type names, shapes
//! (signed on this wire), and contents raw or typed. Both sides use it: the teacher server's
//! `inference.GRPCInferenceService` and the coordinator's OIP members.

use bytes::Bytes;

use crate::pb_oip::model_infer_request::InferInputTensor;
use crate::pb_oip::{InferTensorContents, ModelInferResponse};
use crate::{DType, Error, HostTensor, Result, checked_numel};

/// The OIP data type name of `d` (`FP32`, `FP16`, `BF16`, `UINT8`, `INT64`).
pub fn datatype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::U8 => "UINT8",
        DType::I64 => "INT64",
    }
}

/// The element type an OIP data type name stands for, if [`HostTensor`] has it.
pub fn parse_datatype(name: &str) -> Option<DType> {
    Some(match name {
        "FP32" => DType::F32,
        "FP16" => DType::F16,
        "BF16" => DType::BF16,
        "UINT8" => DType::U8,
        "INT64" => DType::I64,
        _ => return None,
    })
}

fn oip_error(msg: String) -> Error {
    Error::Oip(msg)
}

/// A wire shape as sizes: every dimension must be ≥ 0 and their product within
/// [`crate::MAX_ELEMENTS`].
pub fn shape_of(dims: &[i64]) -> Result<Vec<usize>> {
    let mut wire = Vec::with_capacity(dims.len());
    for &d in dims {
        let d = u64::try_from(d)
            .map_err(|_| oip_error(format!("shape {dims:?} has a negative dimension")))?;
        wire.push(d);
    }
    checked_numel(&wire)?;
    wire.into_iter()
        .map(|d| usize::try_from(d).map_err(|_| oip_error(format!("shape {dims:?} is too large"))))
        .collect()
}

/// The wire shape of `shape`.
pub fn wire_shape(shape: &[usize]) -> Vec<i64> {
    shape
        .iter()
        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
        .collect()
}

/// An input tensor of a `ModelInferRequest` as a host tensor: its contents are `raw` (the
/// request's `raw_input_contents` entry for it) or, without one, its typed `contents`
/// (`fp32_contents` for FP32, `uint_contents` for UINT8, `int64_contents` for INT64; FP16
/// and BF16 exist only raw).
pub fn decode_input(t: &InferInputTensor, raw: Option<&Bytes>) -> Result<HostTensor> {
    let dtype = parse_datatype(&t.datatype).ok_or_else(|| {
        oip_error(format!(
            "input `{}` has datatype `{}`; expected FP32, FP16, BF16, UINT8 or INT64",
            t.name, t.datatype
        ))
    })?;
    let shape = shape_of(&t.shape)?;
    if let Some(raw) = raw {
        if t.contents.is_some() {
            return Err(oip_error(format!(
                "input `{}` has both raw and typed contents",
                t.name
            )));
        }
        return HostTensor::new(shape, dtype, raw.clone());
    }
    let c = t
        .contents
        .as_ref()
        .ok_or_else(|| oip_error(format!("input `{}` has no contents, raw or typed", t.name)))?;
    let numel: usize = shape.iter().product();
    let count = |n: usize| {
        if n == numel {
            Ok(())
        } else {
            Err(oip_error(format!(
                "input `{}` of shape {:?} holds {n} values, expected {numel}",
                t.name, t.shape
            )))
        }
    };
    match dtype {
        DType::F32 => {
            count(c.fp32_contents.len())?;
            HostTensor::from_f32(shape, &c.fp32_contents)
        }
        DType::U8 => {
            count(c.uint_contents.len())?;
            let bytes = c
                .uint_contents
                .iter()
                .map(|&v| {
                    u8::try_from(v).map_err(|_| {
                        oip_error(format!("input `{}`: {v} is not a UINT8 value", t.name))
                    })
                })
                .collect::<Result<Vec<u8>>>()?;
            HostTensor::new(shape, DType::U8, bytes)
        }
        DType::I64 => {
            count(c.int64_contents.len())?;
            let bytes: Vec<u8> = c
                .int64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            HostTensor::new(shape, DType::I64, bytes)
        }
        DType::F16 | DType::BF16 => Err(oip_error(format!(
            "input `{}` is {}: 16-bit floats travel only as raw_input_contents",
            t.name, t.datatype
        ))),
    }
}

/// An input tensor named `name` with `t`'s shape and type, and its raw contents (for
/// `raw_input_contents`).
pub fn encode_input(name: &str, t: &HostTensor) -> (InferInputTensor, Bytes) {
    (
        InferInputTensor {
            name: name.to_string(),
            datatype: datatype_name(t.dtype()).to_string(),
            shape: wire_shape(t.shape()),
            parameters: Default::default(),
            contents: None,
        },
        t.data().clone(),
    )
}

/// One output tensor of a `ModelInferResponse`, found by name, as f32 values with its
/// shape: FP32, FP64 (rounded to f32: scikit-learn's probabilities are FP64), FP16 or BF16,
/// raw or typed. The values are not checked for finiteness here.
pub fn decode_output_f32(resp: &ModelInferResponse, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (i, t) = resp
        .outputs
        .iter()
        .enumerate()
        .find(|(_, o)| o.name == name)
        .ok_or_else(|| {
            oip_error(format!(
                "the reply has no output `{name}` (it has {:?})",
                resp.outputs
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
            ))
        })?;
    let shape = shape_of(&t.shape)?;
    let numel: usize = shape.iter().product();
    let raw = if resp.raw_output_contents.is_empty() {
        None
    } else {
        Some(resp.raw_output_contents.get(i).ok_or_else(|| {
            oip_error(format!(
                "output `{name}` is #{i} but the reply has {} raw contents",
                resp.raw_output_contents.len()
            ))
        })?)
    };
    let values = match raw {
        Some(raw) => raw_floats(&t.datatype, raw, name)?,
        None => typed_floats(&t.datatype, t.contents.as_ref(), name)?,
    };
    if values.len() != numel {
        return Err(oip_error(format!(
            "output `{name}` of shape {:?} holds {} values, expected {numel}",
            t.shape,
            values.len()
        )));
    }
    Ok((shape, values))
}

fn not_float(name: &str, datatype: &str) -> Error {
    oip_error(format!(
        "output `{name}` has datatype `{datatype}`; expected FP32, FP64, FP16 or BF16"
    ))
}

fn raw_floats(datatype: &str, raw: &Bytes, name: &str) -> Result<Vec<f32>> {
    let size = match datatype {
        "FP32" => 4,
        "FP64" => 8,
        "FP16" | "BF16" => 2,
        _ => return Err(not_float(name, datatype)),
    };
    if !raw.len().is_multiple_of(size) {
        return Err(oip_error(format!(
            "output `{name}`: {} raw bytes are not a whole number of {datatype} values",
            raw.len()
        )));
    }
    let c = raw.chunks_exact(size);
    Ok(match datatype {
        "FP32" => c
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "FP64" => c
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        "FP16" => c
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => c
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    })
}

fn typed_floats(datatype: &str, c: Option<&InferTensorContents>, name: &str) -> Result<Vec<f32>> {
    let c = c.ok_or_else(|| oip_error(format!("output `{name}` has no contents, raw or typed")))?;
    match datatype {
        "FP32" => Ok(c.fp32_contents.clone()),
        "FP64" => Ok(c.fp64_contents.iter().map(|&v| v as f32).collect()),
        "FP16" | "BF16" => Err(oip_error(format!(
            "output `{name}` is {datatype}: 16-bit floats travel only as raw contents"
        ))),
        _ => Err(not_float(name, datatype)),
    }
}
