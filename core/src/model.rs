//! candle models built from a [`ModelSpec`]: seeded initialisation, inference, and training
//! forward passes with seeded dropout.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::spec::{Arch, ModelSpec};
use crate::{Error, Result};

enum Layers {
    Mlp(Vec<Linear>),
    Conv {
        convs: Vec<Conv2d>,
        hidden: Linear,
        out: Linear,
    },
}

/// A network ready to run: weights on a device plus its spec.
pub struct Model {
    spec: ModelSpec,
    layers: Layers,
    device: Device,
}

impl Model {
    /// Builds the model, taking every parameter from `vb` by its documented name.
    pub fn new(spec: ModelSpec, vb: VarBuilder) -> Result<Self> {
        spec.validate()?;
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
            Arch::Conv {
                channels, kernel, ..
            } => {
                let cfg = Conv2dConfig {
                    padding: kernel / 2,
                    ..Default::default()
                };
                let convs = (0..channels.len())
                    .map(|l| Ok(Conv2d::new(get(2 * l)?, Some(get(2 * l + 1)?), cfg)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let n = 2 * channels.len();
                Layers::Conv {
                    convs,
                    hidden: lin(n)?,
                    out: lin(n + 2)?,
                }
            }
        };
        Ok(Self {
            spec,
            layers,
            device: vb.device().clone(),
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

    fn run(&self, x: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
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
            Layers::Conv { convs, hidden, out } => {
                let shape = self.spec.arch.input_shape();
                // [N, ...] -> [N, C, H, W]
                let mut h = drop(x.reshape((n, shape[0], shape[1], shape[2]))?, p_in)?;
                for c in convs {
                    h = c.forward(&h)?.relu()?.max_pool2d(2)?;
                }
                // [N, C, H', W'] -> [N, C*H'*W']
                let h = h.flatten_from(1)?;
                let h = drop(hidden.forward(&h)?.relu()?, p_hidden)?;
                Ok(out.forward(&h)?)
            }
        }
    }
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
pub fn init_params(arch: &Arch, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes = arch.param_shapes();
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

/// A model whose parameters are candle `Var`s, for training.
pub struct TrainableModel {
    /// The model, reading its weights from `varmap`.
    pub model: Model,
    /// The trainable parameters by name.
    pub varmap: VarMap,
}

impl TrainableModel {
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
