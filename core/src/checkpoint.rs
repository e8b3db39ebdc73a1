//! Model checkpoints: ONE safetensors file holding every parameter (f32, names as documented in
//! [`crate::spec`]) and, in its metadata, everything needed to rebuild the model:
//!
//! | metadata key | value |
//! | --- | --- |
//! | `distill.format` | `distill-checkpoint` |
//! | `distill.format_version` | `1` |
//! | `distill.spec` | the [`ModelSpec`] as JSON, e.g. `{"arch":{"kind":"mlp","input":784,"hidden":[800,800],"classes":10},"dropout":0.0,"input_dropout":0.0}` |
//!
//! Other `distill.*` keys may be added by writers (training step, run id); readers ignore the
//! ones they do not know. Files are written atomically (temp file, fsync, rename).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::fsutil::atomic_write;
use crate::model::Model;
use crate::safetensors_io::{decode_floats, write_safetensors};
use crate::spec::{Arch, ModelSpec};
use crate::{Error, Result};

/// `distill.format` value.
pub const FORMAT: &str = "distill-checkpoint";
/// Current `distill.format_version`.
pub const FORMAT_VERSION: u32 = 1;
const KEY_FORMAT: &str = "distill.format";
const KEY_VERSION: &str = "distill.format_version";
const KEY_SPEC: &str = "distill.spec";

/// One parameter in host memory: `(name, shape, f32 values)`.
pub use crate::safetensors_io::NamedParam;

/// A checkpoint in host memory: the spec and each parameter's values in spec order.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// What network the parameters belong to.
    pub spec: ModelSpec,
    /// `(name, shape, values)` in the order of [`Arch::param_shapes`].
    pub params: Vec<NamedParam>,
    /// Extra metadata (keys other than the format, version and spec).
    pub extra: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Collects a checkpoint from named candle tensors (any order, any float dtype/device).
    pub fn from_tensors(spec: ModelSpec, tensors: &[(String, Tensor)]) -> Result<Self> {
        let by_name: HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut params = Vec::new();
        for (name, shape) in spec.arch.param_shapes() {
            let t = by_name
                .get(name.as_str())
                .ok_or_else(|| Error::Input(format!("missing parameter `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Input(format!(
                    "parameter `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            params.push((name, shape, v));
        }
        Ok(Self {
            spec,
            params,
            extra: BTreeMap::new(),
        })
    }

    /// SHA-256 over every parameter's name, shape and little-endian f32 values, in spec order.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (name, shape, v) in &self.params {
            h.update(name.as_bytes());
            h.update([0u8]);
            for d in shape {
                h.update((*d as u64).to_le_bytes());
            }
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Model identity as served: `"{arch}@{first 16 hex digits of the digest}"`.
    pub fn model_id(&self) -> String {
        format!("{}@{}", self.spec.arch, &self.digest()[..16])
    }

    /// The parameters as candle tensors on `device`.
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.params
            .iter()
            .map(|(n, s, v)| Ok((n.clone(), Tensor::from_slice(v, s.as_slice(), device)?)))
            .collect()
    }

    /// Builds the model on `device`.
    pub fn to_model(&self, device: &Device) -> Result<Model> {
        Model::from_tensors(self.spec.clone(), self.tensors(device)?, device)
    }

    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta: HashMap<String, String> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert(KEY_FORMAT.into(), FORMAT.into());
        meta.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
        meta.insert(
            KEY_SPEC.into(),
            serde_json::to_string(&self.spec).map_err(|e| Error::Input(e.to_string()))?,
        );
        write_safetensors(&self.params, meta)
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        atomic_write(path, &self.to_bytes()?)
    }

    /// Reads and checks a checkpoint file: format, version, spec, and every parameter present
    /// with the right shape (the error names the first mismatch).
    pub fn read(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&buf).map_err(|e| match e {
            Error::Input(msg) => Error::checkpoint(path, msg),
            other => other,
        })
    }

    /// Parses checkpoint bytes (see [`Checkpoint::read`]); errors are `Error::Input`.
    pub fn from_bytes(buf: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::Input(m);
        let (_, header) = SafeTensors::read_metadata(buf)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get(KEY_FORMAT).map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "metadata {KEY_FORMAT} is `{other}`, expected `{FORMAT}`"
                )));
            }
            None => {
                return Err(bad(format!(
                    "no `{KEY_FORMAT}` metadata: not a distill checkpoint (weights saved by PyTorch can be \
                     converted with `distill import-torch`)"
                )));
            }
        }
        let version = meta.get(KEY_VERSION).map(String::as_str).unwrap_or("");
        if version != FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format version `{version}` is not supported (this build reads version {FORMAT_VERSION})"
            )));
        }
        let spec_json = meta
            .get(KEY_SPEC)
            .ok_or_else(|| bad(format!("missing `{KEY_SPEC}` metadata")))?;
        let spec: ModelSpec = serde_json::from_str(spec_json)
            .map_err(|e| bad(format!("`{KEY_SPEC}` is not a valid spec: {e}")))?;
        check_spec(&spec).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(buf)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let params = read_params(&st, &spec.arch)?;
        let expected: std::collections::HashSet<String> = spec
            .arch
            .param_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut names = st.names();
        names.sort();
        if let Some(extra) = names.into_iter().find(|n| !expected.contains(*n)) {
            return Err(bad(format!(
                "unexpected tensor `{extra}` for {}",
                spec.arch
            )));
        }
        let extra = meta
            .into_iter()
            .filter(|(k, _)| k != KEY_FORMAT && k != KEY_VERSION && k != KEY_SPEC)
            .collect();
        Ok(Self {
            spec,
            params,
            extra,
        })
    }
}

/// [`ModelSpec::validate`] for a spec from outside (a checkpoint's metadata, a caller of
/// [`import_sequential`]), after checking the sizes that validation and
/// [`Arch::param_shapes`] compute with: a conv net of 64 or more layers overflows their
/// `1 << layers` and huge sizes overflow the flattened width, which panics (debug) or wraps
/// (release) instead of being an error.
fn check_spec(spec: &ModelSpec) -> Result<()> {
    if let Arch::Conv {
        input, channels, ..
    } = &spec.arch
    {
        let too_large = || {
            Error::Spec(format!(
                "{}: {} conv layers on a {input:?} input are too many or too large",
                spec.arch,
                channels.len()
            ))
        };
        let div = u32::try_from(channels.len())
            .ok()
            .and_then(|n| 1usize.checked_shl(n))
            .ok_or_else(too_large)?;
        let cin = channels.last().copied().unwrap_or(input[0]);
        cin.checked_mul(input[1] / div)
            .and_then(|n| n.checked_mul(input[2] / div))
            .ok_or_else(too_large)?;
    }
    spec.validate()
}

/// Reads each parameter of `arch` from `st` by name, checking presence, shape and dtype
/// (F32, F16, BF16 or F64, converted to f32).
fn read_params(st: &SafeTensors, arch: &Arch) -> Result<Vec<NamedParam>> {
    arch.param_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let t = st.tensor(&name).map_err(|_| {
                Error::Input(format!(
                    "missing tensor `{name}` (expected shape {shape:?}) for {arch}"
                ))
            })?;
            if t.shape() != shape.as_slice() {
                return Err(Error::Input(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} for {arch}",
                    t.shape()
                )));
            }
            let v = decode_floats(t.dtype(), t.data()).ok_or_else(|| {
                Error::Input(format!(
                    "tensor `{name}` has dtype {:?}; expected F32, F16, BF16 or F64",
                    t.dtype()
                ))
            })?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::Input(format!(
                    "tensor `{name}` holds a non-finite value at element {i}"
                )));
            }
            Ok((name, shape, v))
        })
        .collect()
}

/// Loads a checkpoint file and builds its model on `device`.
pub fn load(path: &Path, device: &Device) -> Result<Model> {
    Checkpoint::read(path)?.to_model(device)
}

/// Converts a PyTorch `nn.Sequential` state dict saved with `safetensors.torch.save_file`
/// into a distill checkpoint of `spec`.
///
/// The parameterised layers' keys look like `"{index}.weight"`/`"{index}.bias"` (an optional
/// common prefix such as `"net."` is allowed); they are taken in increasing index order and
/// renamed to the spec's names in order (conv layers first, then linear ones, as in
/// [`Arch::param_shapes`]). Every shape must match.
pub fn import_sequential(buf: &[u8], spec: ModelSpec) -> Result<Checkpoint> {
    check_spec(&spec)?;
    let st = SafeTensors::deserialize(buf)
        .map_err(|e| Error::Input(format!("not a safetensors file: {e}")))?;
    // (layer index, is_bias, key)
    let mut keys: Vec<(u64, bool, String)> = Vec::new();
    for name in st.names() {
        let mut parts = name.rsplitn(3, '.');
        let kind = parts.next().unwrap_or("");
        let idx = parts.next().and_then(|i| i.parse::<u64>().ok());
        match (kind, idx) {
            ("weight", Some(i)) => keys.push((i, false, name.to_string())),
            ("bias", Some(i)) => keys.push((i, true, name.to_string())),
            _ => {
                return Err(Error::Input(format!(
                    "key `{name}` is not of the form `[prefix.]INDEX.weight|bias`"
                )));
            }
        }
    }
    keys.sort();
    let wanted = spec.arch.param_shapes();
    if keys.len() != wanted.len() {
        return Err(Error::Input(format!(
            "found {} weight/bias tensors, {} needs {}",
            keys.len(),
            spec.arch,
            wanted.len()
        )));
    }
    let mut params = Vec::new();
    for ((_, _, key), (name, shape)) in keys.iter().zip(wanted) {
        let t = st
            .tensor(key)
            .map_err(|e| Error::Input(format!("`{key}`: {e}")))?;
        if t.shape() != shape.as_slice() {
            return Err(Error::Input(format!(
                "`{key}` (→ `{name}`) has shape {:?}, expected {shape:?}",
                t.shape()
            )));
        }
        let v = decode_floats(t.dtype(), t.data()).ok_or_else(|| {
            Error::Input(format!("`{key}` has unsupported dtype {:?}", t.dtype()))
        })?;
        // As `Checkpoint::read` checks: an import must be a checkpoint its reader accepts.
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Input(format!(
                "`{key}` holds a non-finite value at element {i}"
            )));
        }
        params.push((name, shape, v));
    }
    Ok(Checkpoint {
        spec,
        params,
        extra: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TrainableModel;
    use safetensors::tensor::TensorView;

    fn tiny() -> Checkpoint {
        let spec = ModelSpec::new(Arch::parse("mlp:6-4-3").unwrap());
        let m = TrainableModel::init(spec.clone(), 3, &Device::Cpu).unwrap();
        Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap()
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut ck = tiny();
        ck.extra.insert("distill.step".into(), "12".into());
        ck.save(&p).unwrap();
        let back = Checkpoint::read(&p).unwrap();
        assert_eq!(back, ck);
        assert_eq!(back.digest(), ck.digest());
        let x = Tensor::from_vec(vec![0.5f32; 12], (2, 6), &Device::Cpu).unwrap();
        let a = ck
            .to_model(&Device::Cpu)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = load(&p, &Device::Cpu)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }

    fn write_raw(
        tensors: Vec<(&str, Vec<usize>)>,
        meta: Option<HashMap<String, String>>,
    ) -> Vec<u8> {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 4])
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                (
                    n.to_string(),
                    TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, meta).unwrap()
    }

    #[test]
    fn errors_name_the_first_mismatch() {
        let mut meta = HashMap::new();
        meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
        meta.insert(KEY_VERSION.to_string(), "1".to_string());
        meta.insert(
            KEY_SPEC.to_string(),
            serde_json::to_string(&tiny().spec).unwrap(),
        );
        let missing = write_raw(
            vec![("fc0.weight", vec![4, 6]), ("fc0.bias", vec![4])],
            Some(meta.clone()),
        );
        let e = Checkpoint::from_bytes(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing tensor `fc1.weight` (expected shape [3, 4])"),
            "{e}"
        );
        let wrong = write_raw(
            vec![
                ("fc0.weight", vec![4, 6]),
                ("fc0.bias", vec![5]),
                ("fc1.weight", vec![3, 4]),
                ("fc1.bias", vec![3]),
            ],
            Some(meta.clone()),
        );
        let e = Checkpoint::from_bytes(&wrong).unwrap_err().to_string();
        assert!(
            e.contains("tensor `fc0.bias` has shape [5], expected [4]"),
            "{e}"
        );
        let extra = write_raw(
            vec![
                ("fc0.weight", vec![4, 6]),
                ("fc0.bias", vec![4]),
                ("fc1.weight", vec![3, 4]),
                ("fc1.bias", vec![3]),
                ("zzz", vec![1]),
            ],
            Some(meta.clone()),
        );
        assert!(
            Checkpoint::from_bytes(&extra)
                .unwrap_err()
                .to_string()
                .contains("unexpected tensor `zzz`")
        );
        let no_meta = write_raw(vec![("fc0.weight", vec![4, 6])], None);
        assert!(
            Checkpoint::from_bytes(&no_meta)
                .unwrap_err()
                .to_string()
                .contains("import-torch")
        );
        let mut v2 = meta.clone();
        v2.insert(KEY_VERSION.to_string(), "2".to_string());
        let future = write_raw(vec![("fc0.weight", vec![4, 6])], Some(v2));
        assert!(
            Checkpoint::from_bytes(&future)
                .unwrap_err()
                .to_string()
                .contains("version `2`")
        );
        let full = tiny().to_bytes().unwrap();
        let e = Checkpoint::from_bytes(&full[..full.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        assert!(Checkpoint::from_bytes(b"garbage").is_err());
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
        let e = Checkpoint::read(&p).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
        let e = Checkpoint::read(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn imports_a_sequential_state_dict_in_index_order() {
        // nn.Sequential(Linear(6,4), ReLU, Linear(4,3)) saves keys 0.* and 2.*; index 10 > 2
        // checks the order is numeric, not lexicographic.
        let raw = write_raw(
            vec![
                ("net.0.weight", vec![4, 6]),
                ("net.0.bias", vec![4]),
                ("net.10.weight", vec![3, 4]),
                ("net.10.bias", vec![3]),
            ],
            None,
        );
        let ck = import_sequential(&raw, tiny().spec).unwrap();
        let names: Vec<_> = ck.params.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"]);
        let bad = write_raw(
            vec![
                ("0.weight", vec![4, 7]),
                ("0.bias", vec![4]),
                ("2.weight", vec![3, 4]),
                ("2.bias", vec![3]),
            ],
            None,
        );
        let e = import_sequential(&bad, tiny().spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`0.weight` (→ `fc0.weight`) has shape [4, 7]"),
            "{e}"
        );
    }
}
