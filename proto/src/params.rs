//! Model parameters on the wire: split into [`pb::ParamChunk`] slices of bounded size for
//! `SyncUp`/`SyncDown` runs, and put back together with every check a receiver needs.
//!
//! A parameter set is a list of `(name, shape, f32 values)` in a fixed order (the model's). It
//! travels as groups of chunks, one group per message, each group carrying at most
//! `chunk_bytes` of values (but at least one element), so a student of any size stays under the
//! gRPC message limit. Slices of one parameter arrive in order and back to back; the assembler
//! rejects anything else (unknown name, wrong shape, gap, overlap, non-finite value, a missing
//! parameter at the end).

use crate::{DType, Error, HostTensor, Result, pb};

/// One parameter in host memory: `(name, shape, f32 values)`.
pub type Param = (String, Vec<usize>, Vec<f32>);

fn bad(msg: String) -> Error {
    Error::Params(msg)
}

fn not_float(dtype: DType) -> Error {
    bad(format!(
        "parameters travel as F32, F16 or BF16, not {dtype:?}"
    ))
}

/// Encodes f32 values as a 1-D tensor of `dtype` (F32, F16 or BF16).
pub fn encode_values(values: &[f32], dtype: DType) -> Result<HostTensor> {
    HostTensor::from_f32_as(vec![values.len()], values, dtype).map_err(|e| match e {
        Error::NotFloat(other) => not_float(other),
        e => e,
    })
}

/// Splits `params` into groups of chunks, each group holding at most `chunk_bytes` of values
/// (at least one element per group). An integer `dtype` is an error even when there are no values
/// to encode.
pub fn to_chunk_groups(
    params: &[Param],
    dtype: DType,
    chunk_bytes: usize,
) -> Result<Vec<Vec<pb::ParamChunk>>> {
    if !dtype.is_float() {
        return Err(not_float(dtype));
    }
    let per_group = (chunk_bytes / dtype.size()).max(1);
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut room = per_group;
    for (name, shape, values) in params {
        let mut offset = 0;
        while offset < values.len() {
            let take = room.min(values.len() - offset);
            group.push(pb::ParamChunk {
                name: name.clone(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                offset: offset as u64,
                values: Some(encode_values(&values[offset..offset + take], dtype)?.into()),
            });
            offset += take;
            room -= take;
            if room == 0 {
                groups.push(std::mem::take(&mut group));
                room = per_group;
            }
        }
    }
    if !group.is_empty() || groups.is_empty() {
        groups.push(group);
    }
    Ok(groups)
}

/// Bytes of parameter values in `groups` (what the wire carries, framing aside).
pub fn value_bytes(groups: &[Vec<pb::ParamChunk>]) -> u64 {
    groups
        .iter()
        .flatten()
        .map(|c| c.values.as_ref().map_or(0, |v| v.data.len() as u64))
        .sum()
}

/// Puts a parameter set back together from chunks, checking each one against the expected
/// names and shapes.
#[derive(Debug)]
pub struct ParamAssembler {
    expected: Vec<(String, Vec<usize>)>,
    /// Each expected parameter's element count; None where the shape's product overflows (an
    /// error on the first chunk of it, and at [`ParamAssembler::finish`]).
    numels: Vec<Option<usize>>,
    values: Vec<Vec<f32>>,
    /// Index of the parameter being filled.
    current: usize,
}

/// The element count of `shape`, None if it overflows.
fn numel_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn too_large(name: &str, shape: &[usize]) -> Error {
    bad(format!(
        "parameter `{name}` of shape {shape:?} is too large (its element count overflows)"
    ))
}

impl ParamAssembler {
    /// An assembler for parameters of these names and shapes, in this order; each parameter's
    /// values are reserved up front.
    pub fn new(expected: Vec<(String, Vec<usize>)>) -> Self {
        let numels: Vec<Option<usize>> = expected.iter().map(|(_, s)| numel_of(s)).collect();
        let values = numels
            .iter()
            .map(|n| Vec::with_capacity(n.unwrap_or(0)))
            .collect();
        Self {
            expected,
            numels,
            values,
            current: 0,
        }
    }

    /// Adds the next chunk.
    pub fn add(&mut self, chunk: pb::ParamChunk) -> Result<()> {
        let pb::ParamChunk {
            name,
            shape,
            offset,
            values,
        } = chunk;
        // Move past parameters that are complete.
        while self.current < self.expected.len()
            && Some(self.values[self.current].len()) == self.numels[self.current]
        {
            self.current += 1;
        }
        let Some((want_name, want_shape)) = self.expected.get(self.current) else {
            return Err(bad(format!(
                "chunk of `{name}` after every parameter was complete"
            )));
        };
        if name != *want_name {
            return Err(bad(format!(
                "expected a chunk of `{want_name}`, got one of `{name}`"
            )));
        }
        let wire_shape: Vec<u64> = want_shape.iter().map(|&d| d as u64).collect();
        if shape != wire_shape {
            return Err(bad(format!(
                "parameter `{name}` has shape {shape:?}, expected {want_shape:?}"
            )));
        }
        let numel = self.numels[self.current].ok_or_else(|| too_large(&name, want_shape))?;
        let have = &mut self.values[self.current];
        if offset != have.len() as u64 {
            return Err(bad(format!(
                "chunk of `{name}` at offset {offset}, expected offset {}",
                have.len()
            )));
        }
        let t = HostTensor::try_from(values.ok_or(Error::Missing("ParamChunk.values"))?)?;
        if !t.dtype().is_float() || t.shape().len() != 1 {
            return Err(bad(format!(
                "chunk of `{name}`: values must be a 1-D float tensor, got {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        if t.numel() == 0 || have.len() + t.numel() > numel {
            return Err(bad(format!(
                "chunk of `{name}` with {} values at offset {offset} does not fit its {numel} values",
                t.numel()
            )));
        }
        if let Some(i) = t.first_non_finite() {
            return Err(bad(format!(
                "chunk of `{name}`: value {} is not finite",
                offset as usize + i
            )));
        }
        have.extend(t.to_f32_vec());
        Ok(())
    }

    /// The whole parameter set; an error names the first incomplete parameter.
    pub fn finish(self) -> Result<Vec<Param>> {
        let mut out = Vec::with_capacity(self.expected.len());
        for (((name, shape), v), numel) in
            self.expected.into_iter().zip(self.values).zip(self.numels)
        {
            let numel = numel.ok_or_else(|| too_large(&name, &shape))?;
            if v.len() != numel {
                return Err(bad(format!(
                    "parameter `{name}` got {} of its {numel} values",
                    v.len()
                )));
            }
            out.push((name, shape, v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<Param> {
        vec![
            (
                "a.weight".into(),
                vec![3, 5],
                (0..15).map(|i| i as f32 * 0.5).collect(),
            ),
            ("a.bias".into(), vec![3], vec![1.0, -2.0, 3.25]),
        ]
    }

    fn expected() -> Vec<(String, Vec<usize>)> {
        params().into_iter().map(|(n, s, _)| (n, s)).collect()
    }

    fn assemble(groups: Vec<Vec<pb::ParamChunk>>) -> Result<Vec<Param>> {
        let mut a = ParamAssembler::new(expected());
        for c in groups.into_iter().flatten() {
            a.add(c)?;
        }
        a.finish()
    }

    #[test]
    fn round_trips_at_every_chunk_size_and_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for chunk_bytes in [1, 2, 7, 8, 30, 1 << 20] {
                let groups = to_chunk_groups(&params(), dtype, chunk_bytes).unwrap();
                let per = (chunk_bytes / dtype.size()).max(1);
                for g in &groups {
                    let n: usize = g
                        .iter()
                        .map(|c| c.values.as_ref().unwrap().shape[0] as usize)
                        .sum();
                    assert!(n <= per, "{n} > {per}");
                }
                assert_eq!(value_bytes(&groups), 18 * dtype.size() as u64);
                // These values are exact in f16 and bf16 too.
                assert_eq!(
                    assemble(groups).unwrap(),
                    params(),
                    "{dtype:?} {chunk_bytes}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_chunks_with_a_message() {
        let groups = to_chunk_groups(&params(), DType::F32, 16).unwrap();
        let flat: Vec<pb::ParamChunk> = groups.into_iter().flatten().collect();
        // Missing the last chunk.
        let e = assemble(vec![flat[..flat.len() - 1].to_vec()]).unwrap_err();
        assert!(
            e.to_string().contains("`a.bias` got 1 of its 3 values"),
            "{e}"
        );
        // Out of order.
        let mut swapped = flat.clone();
        swapped.swap(0, 1);
        let e = assemble(vec![swapped]).unwrap_err();
        assert!(
            e.to_string().contains("at offset 4, expected offset 0"),
            "{e}"
        );
        // Wrong shape, unknown name, non-finite value.
        let mut c = flat.clone();
        c[0].shape = vec![5, 3];
        assert!(
            assemble(vec![c])
                .unwrap_err()
                .to_string()
                .contains("has shape [5, 3]")
        );
        let mut c = flat.clone();
        c[0].name = "x".into();
        assert!(
            assemble(vec![c])
                .unwrap_err()
                .to_string()
                .contains("got one of `x`")
        );
        let mut c = flat.clone();
        c[0].values = Some(
            encode_values(&[0.0, f32::NAN, 0.0, 0.0], DType::F32)
                .unwrap()
                .into(),
        );
        let e = assemble(vec![c]).unwrap_err();
        assert!(e.to_string().contains("value 1 is not finite"), "{e}");
        // Too many values.
        let mut c = flat.clone();
        c.push(c[c.len() - 1].clone());
        assert!(
            assemble(vec![c])
                .unwrap_err()
                .to_string()
                .contains("after every parameter")
        );
    }
}
