//! candle models built from a [`ModelSpec`]: seeded initialisation, inference, and training
//! forward passes with seeded dropout.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::conv::conv_stack;
use crate::spec::{Arch, ModelSpec};
use crate::{Error, Result};

enum Layers {
    Mlp(Vec<Linear>),
    Conv {
        /// `(weight [out, in, k, k], bias [out])` of each conv layer.
        convs: Vec<(Tensor, Tensor)>,
        /// Zero padding on each side (`k / 2`: the spatial size is kept).
        padding: usize,
        hidden: Linear,
        out: Linear,
    },
    /// A language model scoring every position of a window (see [`crate::spec`]).
    Llama(Box<crate::llama::Llama>),
}

/// The arithmetic of a model's forward and backward passes.
///
/// The parameters ("master weights"), their gradients, the optimizer and the returned logits are
/// f32 in both modes. With [`Precision::Bf16`] every forward pass casts the input and the
/// weights to bf16 (a differentiable cast, so the gradients come back to the f32 parameters as
/// f32), runs the layers in bf16 and casts the logits back to f32, so the loss is computed in
/// f32. Conv blocks: on CUDA they run on candle's bf16 `conv2d`; on the CPU (where candle 0.11
/// has no bf16 conv2d and the fast conv ops are f32-only) the fast f32 ops run on the
/// bf16-rounded activations and weights and their output is rounded to bf16, i.e. bf16 storage
/// with f32 accumulation, as candle's CPU bf16 matmul (widened to f32) does. bf16 is meant for
/// CUDA; on the CPU it is slower than f32 (the casts) and serves for checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout (the default).
    #[default]
    F32,
    /// bf16 forward and backward, f32 master weights.
    Bf16,
}

impl Precision {
    /// The dtype the layers compute in.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Config(format!(
                "unknown precision `{other}` (expected f32 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A network ready to run: weights on a device plus its spec.
pub struct Model {
    spec: ModelSpec,
    layers: Layers,
    device: Device,
    precision: Precision,
}

impl Model {
    /// Builds the model, taking every parameter from `vb` by its documented name.
    pub fn new(spec: ModelSpec, vb: VarBuilder) -> Result<Self> {
        spec.validate()?;
        if let Arch::Llama(cfg) = &spec.arch {
            let llama = crate::llama::Llama::new(cfg, vb.clone())?;
            return Ok(Self {
                spec,
                layers: Layers::Llama(Box::new(llama)),
                device: vb.device().clone(),
                precision: Precision::F32,
            });
        }
        let shapes = spec.arch.param_shapes();
        let get = |i: usize| vb.get(shapes[i].1.as_slice(), &shapes[i].0);
        let lin = |i: usize| -> candle_core::Result<Linear> {
            Ok(Linear::new(get(i)?, Some(get(i + 1)?)))
        };
        let layers = match &spec.arch {
            Arch::Mlp { hidden, .. } => Layers::Mlp(
                (0..=hidden.len())
                    .map(|l| lin(2 * l))
                    .collect::<candle_core::Result<_>>()?,
            ),
            Arch::Llama(_) => {
                return Err(Error::Spec("a llama is built above".into()));
            }
            Arch::Conv {
                channels, kernel, ..
            } => {
                let convs = (0..channels.len())
                    .map(|l| Ok((get(2 * l)?, get(2 * l + 1)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let n = 2 * channels.len();
                Layers::Conv {
                    convs,
                    padding: kernel / 2,
                    hidden: lin(n)?,
                    out: lin(n + 2)?,
                }
            }
        };
        Ok(Self {
            spec,
            layers,
            device: vb.device().clone(),
            precision: Precision::F32,
        })
    }

    /// Builds the model from named f32 tensors (as loaded from a checkpoint).
    pub fn from_tensors(
        spec: ModelSpec,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(spec, vb)
    }

    /// The spec this model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The arithmetic of the forward (and so backward) passes; f32 unless set.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the arithmetic of later forward passes (the weights stay f32; see [`Precision`]).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The `(weight [out, in], bias [out])` of every layer when the fast MLP training step
    /// ([`crate::fast_mlp`]) applies: an MLP with its weights on the CPU, computing in f32.
    pub(crate) fn fast_mlp_layers(&self) -> Option<Vec<(Tensor, Tensor)>> {
        let Layers::Mlp(linears) = &self.layers else {
            return None;
        };
        if !self.device.is_cpu() || self.precision != Precision::F32 {
            return None;
        }
        linears
            .iter()
            .map(|l| {
                let (w, b) = (l.weight(), l.bias()?);
                (w.dtype() == DType::F32 && b.dtype() == DType::F32).then(|| (w.clone(), b.clone()))
            })
            .collect()
    }

    /// Inference: logits with dropout off.
    ///
    /// # Shapes
    /// `x`: `[N, ...input_shape]` or `[N, input_size]` → `[N, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    /// Training forward pass: dropout on, its masks drawn from `rng` (so a seed fixes them).
    ///
    /// # Shapes
    /// `x`: `[N, ...input_shape]` or `[N, input_size]` → `[N, classes]`.
    pub fn forward_train(&self, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.run(x, Some(rng))
    }

    fn run(&self, x: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        if let Layers::Llama(m) = &self.layers {
            return forward_windows(m, x, self.precision);
        }
        match self.precision {
            Precision::F32 => self.run_f32(x, rng),
            p @ Precision::Bf16 => self.run_cast(x, rng, p.dtype()),
        }
    }

    fn run_f32(&self, x: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (p_in, p_hidden) = (self.spec.input_dropout, self.spec.dropout);
        let mut drop = |t: Tensor, p: f32| -> Result<Tensor> {
            match rng.as_deref_mut() {
                Some(r) if p > 0.0 => dropout(&t, p, r),
                _ => Ok(t),
            }
        };
        match &self.layers {
            Layers::Mlp(linears) => {
                // [N, ...] -> [N, input]
                let mut h = drop(x.reshape((n, self.spec.arch.input_size()))?, p_in)?;
                let last = linears.len() - 1;
                for (i, l) in linears.iter().enumerate() {
                    h = l.forward(&h)?;
                    if i < last {
                        h = drop(h.relu()?, p_hidden)?;
                    }
                }
                Ok(h)
            }
            Layers::Conv {
                convs,
                padding,
                hidden,
                out,
            } => {
                let shape = self.spec.arch.input_shape();
                // [N, ...] -> [N, C, H, W]
                let h = drop(x.reshape((n, shape[0], shape[1], shape[2]))?, p_in)?;
                // [N, C, H, W] -> [N, C', H', W']
                let h = conv_stack(&h, convs, *padding)?;
                // [N, C, H', W'] -> [N, C*H'*W']
                let h = h.flatten_from(1)?;
                let h = drop(hidden.forward(&h)?.relu()?, p_hidden)?;
                Ok(out.forward(&h)?)
            }
            Layers::Llama(m) => forward_windows(m, x, Precision::F32),
        }
    }

    /// [`Self::run_f32`] computed in `dtype`: the input and every weight are cast (the casts
    /// are in the graph, so gradients reach the f32 parameters), the logits cast back to f32.
    /// Dropout masks are drawn exactly as in f32.
    fn run_cast(
        &self,
        x: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
        dtype: DType,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (p_in, p_hidden) = (self.spec.input_dropout, self.spec.dropout);
        let mut drop = |t: Tensor, p: f32| -> Result<Tensor> {
            match rng.as_deref_mut() {
                Some(r) if p > 0.0 => dropout(&t, p, r),
                _ => Ok(t),
            }
        };
        let cast_linear = |l: &Linear| -> Result<Linear> {
            let b = l.bias().map(|b| b.to_dtype(dtype)).transpose()?;
            Ok(Linear::new(l.weight().to_dtype(dtype)?, b))
        };
        let x = x.to_dtype(dtype)?;
        let logits = match &self.layers {
            Layers::Mlp(linears) => {
                // [N, ...] -> [N, input]
                let mut h = drop(x.reshape((n, self.spec.arch.input_size()))?, p_in)?;
                let last = linears.len() - 1;
                for (i, l) in linears.iter().enumerate() {
                    h = cast_linear(l)?.forward(&h)?;
                    if i < last {
                        h = drop(h.relu()?, p_hidden)?;
                    }
                }
                h
            }
            Layers::Conv {
                convs,
                padding,
                hidden,
                out,
            } => {
                let shape = self.spec.arch.input_shape();
                // [N, ...] -> [N, C, H, W]
                let h = drop(x.reshape((n, shape[0], shape[1], shape[2]))?, p_in)?;
                // [N, C, H, W] -> [N, C', H', W']
                let h = if h.device().is_cpu() {
                    // candle 0.11 has no bf16 conv2d on the CPU: the fast f32 ops run on the
                    // values rounded to `dtype` and their result is rounded back (f32
                    // accumulation, as candle's bf16 matmul on the CPU and tensor cores do).
                    let convs = convs
                        .iter()
                        .map(|(w, b)| {
                            let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
                            Ok((round(w)?, round(b)?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    conv_stack(&h.to_dtype(DType::F32)?, &convs, *padding)?.to_dtype(dtype)?
                } else {
                    // candle's conv2d in `dtype` (not f32, so no fast path).
                    let convs = convs
                        .iter()
                        .map(|(w, b)| Ok((w.to_dtype(dtype)?, b.to_dtype(dtype)?)))
                        .collect::<Result<Vec<_>>>()?;
                    conv_stack(&h, &convs, *padding)?
                };
                // [N, C, H', W'] -> [N, C*H'*W']
                let h = h.flatten_from(1)?;
                let h = drop(cast_linear(hidden)?.forward(&h)?.relu()?, p_hidden)?;
                cast_linear(out)?.forward(&h)?
            }
            Layers::Llama(m) => forward_windows(m, &x, Precision::F32)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// A llama's logits over windows `x` `[N, L + 1]` (token ids, any dtype holding them exactly):
/// it reads the first `L` of each → `[N·L, vocab]`, one row per position, in window order.
fn forward_windows(m: &crate::llama::Llama, x: &Tensor, precision: Precision) -> Result<Tensor> {
    if precision != Precision::F32 {
        return Err(Error::Config(
            "a llama trains in f32 (bf16 is not supported for language models yet)".into(),
        ));
    }
    let (n, w) = x.dims2().map_err(|_| {
        Error::Input(format!(
            "a language model takes windows [N, L + 1] of token ids, got {:?}",
            x.dims()
        ))
    })?;
    if w < 2 {
        return Err(Error::Input(format!(
            "windows of {w} tokens: a language model needs at least 2 (an input and its next token)"
        )));
    }
    let tokens = x.narrow(1, 0, w - 1)?.to_dtype(DType::U32)?;
    let v = m.config().vocab_size;
    Ok(m.forward(&tokens)?.reshape((n * (w - 1), v))?)
}

/// Inverted dropout with a mask drawn from `rng`: each element is zeroed with probability `p`
/// and the survivors scaled by 1/(1-p), so inference needs no rescaling.
pub fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Seeded initial parameters, distributed as PyTorch's defaults for `nn.Linear`/`nn.Conv2d`:
/// weights and biases uniform in ±1/√fan_in.
///
/// A llama's are [`crate::lm::init_tensors`]'s: norm weights 1, every other weight uniform with
/// standard deviation 0.02, drawn in name order.
pub fn init_params(arch: &Arch, seed: u64) -> Vec<crate::safetensors_io::NamedParam> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes = arch.param_shapes();
    if let Arch::Llama(_) = arch {
        let bound = 0.02f32 * 3f32.sqrt();
        return shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                };
                (name, shape, v)
            })
            .collect();
    }
    let mut out = Vec::with_capacity(shapes.len());
    let mut fan_in = 1usize;
    for (name, shape) in shapes {
        if name.ends_with(".weight") {
            fan_in = shape[1..].iter().product();
        }
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
        out.push((name, shape, v));
    }
    out
}

/// A student's initial parameters in [`Arch::param_shapes`] order: read from its
/// [`crate::settings::StudentInit`] when it has one (every tensor of the spec's shape), else
/// [`init_params`] of its seed.
pub fn initial_params(
    settings: &crate::settings::StudentSettings,
) -> Result<Vec<crate::safetensors_io::NamedParam>> {
    let Some(init) = &settings.init else {
        return Ok(init_params(&settings.spec.arch, settings.seed));
    };
    let mut tensors = init.read(&Device::Cpu)?;
    settings
        .spec
        .arch
        .param_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let t = tensors.remove(&name).ok_or_else(|| {
                Error::Config(format!(
                    "{}: no `{name}` for the student's {}",
                    init.path.display(),
                    settings.spec.arch
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Config(format!(
                    "{}: `{name}` has shape {:?}, the student's is {shape:?}",
                    init.path.display(),
                    t.dims()
                )));
            }
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((name, shape, v))
        })
        .collect()
}

/// A model whose parameters are candle `Var`s, for training.
pub struct TrainableModel {
    /// The model, reading its weights from `varmap`.
    pub model: Model,
    /// The trainable parameters by name.
    pub varmap: VarMap,
}

impl TrainableModel {
    /// A student's initial model ([`initial_params`]).
    pub fn initial(settings: &crate::settings::StudentSettings, device: &Device) -> Result<Self> {
        settings.spec.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, v) in initial_params(settings)? {
            tensors.insert(name, Tensor::from_vec(v, shape, device)?);
        }
        Self::from_tensors(settings.spec.clone(), tensors, device)
    }

    /// Fresh parameters from [`init_params`].
    pub fn init(spec: ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, v) in init_params(&spec.arch, seed) {
            tensors.insert(name, Tensor::from_vec(v, shape, device)?);
        }
        Self::from_tensors(spec, tensors, device)
    }

    /// Trainable copies of the given parameters (for resuming or fine-tuning).
    pub fn from_tensors(
        spec: ModelSpec,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Input("parameter map lock poisoned".into()))?;
            for (name, shape) in spec.arch.param_shapes() {
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("missing parameter `{name}`")))?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Input(format!(
                        "parameter `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Model::new(spec, vb)?;
        Ok(Self { model, varmap })
    }

    /// The parameters in the documented order, as `(name, var)`.
    pub fn named_vars(&self) -> Result<Vec<(String, Var)>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Input("parameter map lock poisoned".into()))?;
        self.model
            .spec()
            .arch
            .param_shapes()
            .into_iter()
            .map(|(name, _)| {
                let v = data
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("missing parameter `{name}`")))?
                    .clone();
                Ok((name, v))
            })
            .collect()
    }

    /// The parameters as plain tensors, in the documented order.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .named_vars()?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_shapes_and_seeded_init() {
        let dev = Device::Cpu;
        for arch in ["mlp:784-32-16-10", "conv:4-8-16-10"] {
            let spec = ModelSpec::new(Arch::parse(arch).unwrap());
            let a = TrainableModel::init(spec.clone(), 7, &dev).unwrap();
            let b = TrainableModel::init(spec.clone(), 7, &dev).unwrap();
            let c = TrainableModel::init(spec, 8, &dev).unwrap();
            let x = Tensor::rand(0f32, 1f32, (3, 784), &dev).unwrap();
            let ya = a.model.forward(&x).unwrap();
            assert_eq!(ya.dims(), &[3, 10]);
            let yb = b.model.forward(&x).unwrap();
            let yc = c.model.forward(&x).unwrap();
            let diff = |p: &Tensor, q: &Tensor| {
                p.sub(q)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(diff(&ya, &yb), 0.0, "{arch}: same seed, same weights");
            assert!(diff(&ya, &yc) > 1e-4, "{arch}: another seed, other weights");
        }
    }

    #[test]
    fn dropout_is_seeded_and_off_at_inference() {
        let dev = Device::Cpu;
        let mut spec = ModelSpec::new(Arch::parse("mlp:20-64-5").unwrap());
        spec.dropout = 0.5;
        spec.input_dropout = 0.2;
        let m = TrainableModel::init(spec, 1, &dev).unwrap().model;
        let x = Tensor::rand(0f32, 1f32, (4, 20), &dev).unwrap();
        let e1 = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let e2 = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e1, e2);
        let t1 = m
            .forward_train(&x, &mut ChaCha8Rng::seed_from_u64(3))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t2 = m
            .forward_train(&x, &mut ChaCha8Rng::seed_from_u64(3))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t3 = m
            .forward_train(&x, &mut ChaCha8Rng::seed_from_u64(4))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(t1, t2);
        assert_ne!(t1, t3);
        assert_ne!(t1, e1);
    }

    #[test]
    fn dropout_keeps_the_expected_fraction() {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&x, 0.3, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kept = v.iter().filter(|&&a| a > 0.0).count() as f32 / v.len() as f32;
        assert!((kept - 0.7).abs() < 0.02, "{kept}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.7).abs() < 1e-6));
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;
    use crate::optim::{OptimConfig, Optimizer};

    fn model(arch: &str, precision: Precision) -> TrainableModel {
        let mut m =
            TrainableModel::init(ModelSpec::new(Arch::parse(arch).unwrap()), 5, &Device::Cpu)
                .unwrap();
        m.model.set_precision(precision);
        m
    }

    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = a.sub(b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap().max(1e-30)).sqrt()
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("F32".parse::<Precision>().unwrap(), Precision::F32);
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("unknown precision `fp8`"), "{e}");
        assert_eq!(Precision::default(), Precision::F32);
    }

    #[test]
    fn f32_precision_is_the_default_and_bit_identical() {
        let a = model("mlp:784-32-10", Precision::F32);
        let mut b = model("mlp:784-32-10", Precision::Bf16);
        b.model.set_precision(Precision::F32);
        assert_eq!(a.model.precision(), Precision::F32);
        let x = Tensor::rand(0f32, 1., (6, 784), &Device::Cpu).unwrap();
        let ya = a.model.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let yb = b.model.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(ya, yb);
    }

    /// bf16 logits come back as f32, close to the f32 ones; every parameter stays an f32 `Var`
    /// and gets an f32 gradient close to the f32 pass's (MLP and conv: the conv's bf16 path is
    /// candle's conv2d).
    #[test]
    fn bf16_gradients_reach_the_f32_master_weights() {
        for arch in ["mlp:784-64-32-10", "conv:4-8-16-10"] {
            let f = model(arch, Precision::F32);
            let h = model(arch, Precision::Bf16);
            let mut r = ChaCha8Rng::seed_from_u64(2);
            let x: Vec<f32> = (0..8 * 784).map(|_| r.random()).collect();
            let x = Tensor::from_vec(x, (8, 784), &Device::Cpu).unwrap();
            let y = Tensor::from_vec((0..8u32).collect(), 8, &Device::Cpu).unwrap();
            let grads = |m: &TrainableModel| {
                let mut rng = ChaCha8Rng::seed_from_u64(1);
                let logits = m.model.forward_train(&x, &mut rng).unwrap();
                assert_eq!(logits.dtype(), DType::F32, "{arch}");
                let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
                (logits, loss.backward().unwrap())
            };
            let (lf, gf) = grads(&f);
            let (lh, gh) = grads(&h);
            let d = rel_diff(&lh, &lf);
            assert!(d > 0.0 && d < 0.05, "{arch}: bf16 logits off by {d}");
            for ((name, vf), (_, vh)) in f.named_vars().unwrap().iter().zip(h.named_vars().unwrap())
            {
                assert_eq!(vh.dtype(), DType::F32, "{arch} {name}: master weight dtype");
                let g = gh
                    .get(&vh)
                    .unwrap_or_else(|| panic!("{arch} {name}: no gradient"));
                assert_eq!(g.dtype(), DType::F32, "{arch} {name}: gradient dtype");
                let d = rel_diff(g, gf.get(vf).unwrap());
                // Loose: a few ReLUs flip between bf16 and f32 pre-activations.
                assert!(d < 0.25, "{arch} {name}: bf16 gradient off by {d}");
            }
        }
    }

    /// A bf16 model trains: the loss on a learnable problem falls, and the f32 weights move.
    #[test]
    fn bf16_training_lowers_the_loss() {
        let dev = Device::Cpu;
        let m = model("mlp:20-32-4", Precision::Bf16);
        let x = Tensor::randn(0f32, 1., (256, 20), &dev).unwrap();
        // Labels from a fixed random linear map: learnable.
        let proj = Tensor::randn(0f32, 1., (20, 4), &dev).unwrap();
        let y = x.matmul(&proj).unwrap().argmax(1).unwrap();
        let before = m.named_tensors().unwrap()[0].1.copy().unwrap();
        let mut opt =
            Optimizer::new(OptimConfig::adamw(1e-2, 0.0), m.named_vars().unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut losses = Vec::new();
        for _ in 0..60 {
            let logits = m.model.forward_train(&x, &mut rng).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        let after = &m.named_tensors().unwrap()[0].1;
        assert_eq!(after.dtype(), DType::F32);
        assert!(
            rel_diff(after, &before) > 1e-3,
            "the f32 weights did not move"
        );
    }
}
