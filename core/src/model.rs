//! candle models built from a [`ModelSpec`]: seeded initialisation, inference, and training
//! forward passes with seeded dropout.

use std::collections::HashMap;

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, Var,
};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
        };
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// The conv blocks: for each `(weight [C', C, k, k], bias [C'])`, `conv2d(x, w, stride 1,
/// padding) + b → ReLU → max-pool 2×2`, as PyTorch's `Conv2d` (cross-correlation), `ReLU` and
/// `MaxPool2d(2)`.
///
/// On the CPU with f32 the activations stay channels-last (NHWC) between the blocks; each conv
/// is an im2col plus one matmul, and pooling, bias and ReLU are one fused pass (max-pooling
/// commutes with a per-channel bias and with ReLU). Elsewhere it runs on candle's `conv2d`.
///
/// # Shapes
/// `x`: `[N, C, H, W]` → `[N, C_last, H / 2^L, W / 2^L]` (NCHW, contiguous).
fn conv_stack(x: &Tensor, convs: &[(Tensor, Tensor)], padding: usize) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && convs
            .iter()
            .all(|(w, b)| w.dtype() == DType::F32 && b.dtype() == DType::F32);
    if fast {
        // [N, C, H, W] -> [N, H, W, C]
        let mut h = x.permute((0, 2, 3, 1))?.contiguous()?;
        for (w, b) in convs {
            h = conv_relu_pool_nhwc(&h, w, b, padding)?;
        }
        // [N, H', W', C'] -> [N, C', H', W']
        Ok(h.permute((0, 3, 1, 2))?.contiguous()?)
    } else {
        let mut h = x.clone();
        for (w, b) in convs {
            h = conv_relu_pool_candle(&h, w, b, padding)?;
        }
        Ok(h)
    }
}

/// One conv block on channels-last f32 CPU tensors.
///
/// # Shapes
/// `x`: `[N, H, W, C]` (H, W even), `w`: `[C', C, k, k]`, `b`: `[C']` → `[N, H/2, W/2, C']`.
fn conv_relu_pool_nhwc(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Result<Tensor> {
    let (c_out, c_in, k, _) = w.dims4()?;
    // [C', C, k, k] -> [C', k·k·C], the order of an im2col row.
    let w = w.permute((0, 2, 3, 1))?.reshape((c_out, k * k * c_in))?;
    // [N, H, W, C] -> [N, H', W', C']
    let y = x.contiguous()?.apply_op2(&w, ConvNhwc::new(k, padding))?;
    Ok(y.apply_op2(&b.contiguous()?, PoolBiasRelu)?)
}

/// [`conv_stack`]'s block from candle's `conv2d` and tensor ops (any device and dtype; on the
/// CPU its backward is slow). NCHW in and out.
///
/// Not `Tensor::max_pool2d`: candle 0.11's backward of it scales the gradient by 1/4 (it
/// multiplies by the window's fraction of maxima instead of dividing by their count). Here the
/// gradient of each window goes to its maximum, split evenly between tied maxima.
fn conv_relu_pool_candle(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Result<Tensor> {
    let y = x.conv2d(w, padding, 1, 1, 1)?;
    let (n, c, h, wd) = y.dims4()?;
    // [N, C, H, W] -> [N, C, H/2, W/2, 4]: the 2×2 windows.
    let win = y
        .reshape((n, c, h / 2, 2, wd / 2, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, h / 2, wd / 2, 4))?;
    // max = Σ x·mask with the mask (1/ties on the maxima, else 0) held constant.
    let plain = win.detach();
    let mask = plain
        .broadcast_eq(&plain.max_keepdim(4)?)?
        .to_dtype(y.dtype())?;
    let mask = mask.broadcast_div(&mask.sum_keepdim(4)?)?;
    let p = win.mul(&mask)?.sum(4)?;
    Ok(p.broadcast_add(&b.reshape((1, c, 1, 1))?)?.relu()?)
}

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

/// Runs `f(i, chunk)` over the `chunk`-sized pieces of `out`, on candle's number of threads
/// when there is enough work.
fn par_chunks(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let pieces = out.len() / chunk.max(1);
    let threads = candle_core::utils::get_num_threads()
        .min(pieces)
        .min(out.len() / (1 << 15))
        .max(1);
    if threads == 1 {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let per = pieces.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per * chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, c) in part.chunks_mut(chunk).enumerate() {
                    f(t * per + i, c);
                }
            });
        }
    });
}

/// For output column `o` and kernel offset `kk`, the input column read is `o + kk - pad`;
/// returns the kernel offsets `kk` in `0..k` whose input lies in `0..len`.
fn valid_taps(o: usize, pad: usize, len: usize, k: usize) -> std::ops::Range<usize> {
    let lo = pad.saturating_sub(o);
    let hi = (len + pad).saturating_sub(o).min(k);
    lo..hi.max(lo)
}

/// A stride-1 zero-padded convolution without bias on channels-last input, as im2col and
/// matmuls: `(x [N, H, W, C], w [C', k·k·C])` → `[N, H', W', C']`, with `w` the PyTorch weight
/// permuted to `[C', k, k, C]`.
///
/// Both passes work through the batch a few samples at a time, so the im2col matrix (25× the
/// input for a 5×5 kernel) never exists whole: it is rebuilt in the backward pass instead of
/// kept, and its gradient goes straight into the input's. The input's gradient is computed only
/// when the input needs one.
#[derive(Clone, Copy)]
struct ConvNhwc {
    im2col: Im2ColNhwc,
    /// Samples per chunk; 0: as many as make about 2M floats (8 MB) of im2col matrix.
    chunk: usize,
}

impl ConvNhwc {
    fn new(k: usize, padding: usize) -> Self {
        Self {
            im2col: Im2ColNhwc { k, padding },
            chunk: 0,
        }
    }

    /// Samples per chunk, for `rows_per_sample` im2col rows of length `row`.
    fn chunk_samples(&self, rows_per_sample: usize, row: usize) -> usize {
        match self.chunk {
            0 => ((1 << 21) / (rows_per_sample * row).max(1)).max(1),
            n => n,
        }
    }
}

/// `a [m, k] x b^T` for `b [n, k]`, both row-major slices, as a row-major `[m, n]` vector.
fn matmul_bt(a: Vec<f32>, m: usize, b: &Tensor) -> candle_core::Result<Vec<f32>> {
    let k = b.dim(1)?;
    let a = Tensor::from_vec(a, (m, k), &Device::Cpu)?;
    a.matmul(&b.t()?)?.flatten_all()?.to_vec1()
}

impl CustomOp2 for ConvNhwc {
    fn name(&self) -> &'static str {
        "conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (n, h, w, c) = l1.shape().dims4()?;
        let (c_out, row) = l2.shape().dims2()?;
        let k = self.im2col.k;
        if row != k * k * c {
            candle_core::bail!(
                "conv2d-nhwc: weight {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let wt = Tensor::from_slice(f32_slice(s2, l2, self.name())?, (c_out, row), &Device::Cpu)?;
        let (oh, ow) = self.im2col.out_hw(h, w);
        let per = self.chunk_samples(oh * ow, row);
        let mut out = Vec::with_capacity(n * oh * ow * c_out);
        for (i, xs) in x.chunks(per * h * w * c).enumerate() {
            let m = (per * (i + 1)).min(n) - per * i;
            let cols = self.im2col.cols(xs, (m, h, w, c));
            out.extend(matmul_bt(cols, m * oh * ow, &wt)?);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = ConvNhwcBwd {
            conv: *self,
            need_dx: x.track_op(),
        };
        let both = x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &op)?;
        let nw = w.elem_count();
        let gw = both.narrow(0, 0, nw)?.reshape(w.shape())?;
        let gx = match op.need_dx {
            true => Some(both.narrow(0, nw, x.elem_count())?.reshape(x.shape())?),
            false => None,
        };
        Ok((gx, Some(gw)))
    }
}

/// Backward of [`ConvNhwc`]: `(x, w, grad [N, H', W', C'])` → the gradient of w, then (if
/// `need_dx`) that of x, flattened into one vector.
struct ConvNhwcBwd {
    conv: ConvNhwc,
    need_dx: bool,
}

impl CustomOp3 for ConvNhwcBwd {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let (n, h, w, c) = l1.shape().dims4()?;
        let (c_out, row) = l2.shape().dims2()?;
        let (oh, ow) = self.conv.im2col.out_hw(h, w);
        if l3.shape().dims() != [n, oh, ow, c_out] {
            candle_core::bail!("conv2d-nhwc backward: gradient shape {:?}", l3.shape());
        }
        let wt = Tensor::from_slice(f32_slice(s2, l2, self.name())?, (c_out, row), &Device::Cpu)?;
        let per = self.conv.chunk_samples(oh * ow, row);
        let mut gw = Tensor::zeros((c_out, row), DType::F32, &Device::Cpu)?;
        let mut out = vec![0f32; c_out * row + if self.need_dx { x.len() } else { 0 }];
        let gx = &mut out[c_out * row..];
        for (i, (xs, gs)) in x
            .chunks(per * h * w * c)
            .zip(g.chunks(per * oh * ow * c_out))
            .enumerate()
        {
            let m = (per * (i + 1)).min(n) - per * i;
            let rows = m * oh * ow;
            let cols = Tensor::from_vec(
                self.conv.im2col.cols(xs, (m, h, w, c)),
                (rows, row),
                &Device::Cpu,
            )?;
            let gs = Tensor::from_slice(gs, (rows, c_out), &Device::Cpu)?;
            // [C', rows] x [rows, k·k·C]
            gw = (gw + gs.t()?.matmul(&cols)?)?;
            if self.need_dx {
                drop(cols);
                // [rows, C'] x [C', k·k·C], then back onto the input.
                let dcols = gs.matmul(&wt)?.flatten_all()?.to_vec1::<f32>()?;
                let dst = &mut gx[per * i * h * w * c..][..m * h * w * c];
                self.conv.im2col.add_cols_back(&dcols, (m, h, w, c), dst);
            }
        }
        out[..c_out * row].copy_from_slice(&gw.flatten_all()?.to_vec1::<f32>()?);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// im2col for a stride-1 convolution with zero padding on channels-last input:
/// `[N, H, W, C]` → `[N·H'·W', k·k·C]`, row `(n, y, x)`, column `(ky, kx, c)`, holding
/// `x[n, y + ky − pad, x + kx − pad, c]` (0 outside).
#[derive(Clone, Copy)]
struct Im2ColNhwc {
    k: usize,
    padding: usize,
}

impl Im2ColNhwc {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            h + 2 * self.padding + 1 - self.k,
            w + 2 * self.padding + 1 - self.k,
        )
    }

    /// The im2col matrix of `x` (`[N, H, W, C]` row-major), row-major.
    fn cols(&self, x: &[f32], (n, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
        let (k, pad) = (self.k, self.padding);
        let (oh, ow) = self.out_hw(h, w);
        let row = k * k * c;
        let mut out = vec![0f32; n * oh * ow * row];
        // One sample per chunk.
        par_chunks(&mut out, oh * ow * row, |ni, dst| {
            let src = &x[ni * h * w * c..][..h * w * c];
            for oy in 0..oh {
                for ky in valid_taps(oy, pad, h, k) {
                    let iy = oy + ky - pad;
                    for ox in 0..ow {
                        let kx = valid_taps(ox, pad, w, k);
                        let ix = ox + kx.start - pad;
                        let d = &mut dst[(oy * ow + ox) * row + (ky * k + kx.start) * c..];
                        let len = kx.len() * c;
                        d[..len].copy_from_slice(&src[(iy * w + ix) * c..][..len]);
                    }
                }
            }
        });
        out
    }

    /// The adjoint of [`Self::cols`]: adds the rows of `g` (`[N·H'·W', k·k·C]`) back onto the
    /// input positions they were copied from, in `dx` (`[N, H, W, C]`).
    fn add_cols_back(&self, g: &[f32], (_, h, w, c): (usize, usize, usize, usize), dx: &mut [f32]) {
        let (k, pad) = (self.k, self.padding);
        let (oh, ow) = self.out_hw(h, w);
        let row = k * k * c;
        par_chunks(dx, h * w * c, |ni, dst| {
            let src = &g[ni * oh * ow * row..][..oh * ow * row];
            for oy in 0..oh {
                for ky in valid_taps(oy, pad, h, k) {
                    let iy = oy + ky - pad;
                    for ox in 0..ow {
                        let kx = valid_taps(ox, pad, w, k);
                        let ix = ox + kx.start - pad;
                        let len = kx.len() * c;
                        let s = &src[(oy * ow + ox) * row + (ky * k + kx.start) * c..][..len];
                        let d = &mut dst[(iy * w + ix) * c..][..len];
                        for (d, s) in d.iter_mut().zip(s) {
                            *d += s;
                        }
                    }
                }
            }
        });
    }
}

/// `relu(maxpool2x2(y) + b)` on channels-last input: `(y [N, H, W, C], b [C])` →
/// `[N, H/2, W/2, C]`. The gradient goes to the first maximum of each window (row-major) where
/// the output is positive, as in PyTorch.
struct PoolBiasRelu;

impl PoolBiasRelu {
    /// Calls `f(output index, input index of the window's first maximum)` for every output.
    fn for_each_max(
        y: &[f32],
        (h, w, c): (usize, usize, usize),
        ni: usize,
        mut f: impl FnMut(usize, usize),
    ) {
        let (ph, pw) = (h / 2, w / 2);
        for py in 0..ph {
            for px in 0..pw {
                let i0 = ((ni * h + 2 * py) * w + 2 * px) * c;
                let o0 = ((ni * ph + py) * pw + px) * c;
                for ci in 0..c {
                    let i = i0 + ci;
                    let mut best = i;
                    for j in [i + c, i + w * c, i + w * c + c] {
                        if y[j] > y[best] {
                            best = j;
                        }
                    }
                    f(o0 + ci, best);
                }
            }
        }
    }
}

impl CustomOp2 for PoolBiasRelu {
    fn name(&self) -> &'static str {
        "pool-bias-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let (n, h, w, c) = l1.shape().dims4()?;
        if b.len() != c || h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!(
                "pool-bias-relu: bad shapes {:?} {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let (ph, pw) = (h / 2, w / 2);
        let mut out = vec![0f32; n * ph * pw * c];
        par_chunks(&mut out, ph * pw * c, |ni, dst| {
            for py in 0..ph {
                for px in 0..pw {
                    let i0 = ((ni * h + 2 * py) * w + 2 * px) * c;
                    let d = &mut dst[(py * pw + px) * c..][..c];
                    let (r0, r1) = (&y[i0..][..2 * c], &y[i0 + w * c..][..2 * c]);
                    for (ci, d) in d.iter_mut().enumerate() {
                        let m = r0[ci].max(r0[c + ci]).max(r1[ci]).max(r1[c + ci]);
                        *d = (m + b[ci]).max(0.0);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, ph, pw, c))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h, w, c) = y.dims4()?;
        // Gradients of y and b, flattened into one buffer.
        let both = y.contiguous()?.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad.contiguous()?,
            &PoolBiasReluBwd,
        )?;
        let gy = both.narrow(0, 0, n * h * w * c)?.reshape((n, h, w, c))?;
        let gb = both.narrow(0, n * h * w * c, c)?;
        Ok((Some(gy), Some(gb)))
    }
}

/// Backward of [`PoolBiasRelu`]: `(y [N, H, W, C], out [N, H/2, W/2, C], grad like out)` →
/// the gradients of y (`N·H·W·C` values) and b (`C` values), concatenated.
struct PoolBiasReluBwd;

impl CustomOp3 for PoolBiasReluBwd {
    fn name(&self) -> &'static str {
        "pool-bias-relu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let res = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let (n, h, w, c) = l1.shape().dims4()?;
        if l2.shape().dims() != [n, h / 2, w / 2, c] || l3.shape() != l2.shape() {
            candle_core::bail!("pool-bias-relu backward: unexpected shapes");
        }
        let mut out = vec![0f32; n * h * w * c + c];
        let (gy, gb) = out.split_at_mut(n * h * w * c);
        // Each sample's gradient lies in its own chunk of gy.
        let base = h * w * c;
        par_chunks(gy, base, |ni, dst| {
            PoolBiasRelu::for_each_max(y, (h, w, c), ni, |o, i| {
                if res[o] > 0.0 {
                    dst[i - ni * base] = g[o];
                }
            });
        });
        for (r, g) in res.chunks(c).zip(g.chunks(c)) {
            for ((gb, &r), &g) in gb.iter_mut().zip(r).zip(g) {
                if r > 0.0 {
                    *gb += g;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n * h * w * c + c)))
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
pub fn init_params(arch: &Arch, seed: u64) -> Vec<crate::checkpoint::NamedParam> {
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

#[cfg(test)]
mod conv_tests {
    use super::*;

    type Stack = fn(&Tensor, &[(Tensor, Tensor)], usize) -> Result<Tensor>;

    fn max_diff(p: &Tensor, q: &Tensor) -> f32 {
        assert_eq!(p.dims(), q.dims());
        p.sub(q)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The conv alone (no pooling or ReLU) through [`ConvNhwc`] with `chunk` samples per
    /// chunk, NCHW in and out.
    fn im2col_conv(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, chunk: usize) -> Tensor {
        let (c_out, c_in, k, _) = w.dims4().unwrap();
        let w = w
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((c_out, k * k * c_in))
            .unwrap();
        x.permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .apply_op2(
                &w,
                ConvNhwc {
                    chunk,
                    ..ConvNhwc::new(k, padding)
                },
            )
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
            .unwrap()
    }

    /// The blocks through candle's conv2d (the path for other devices).
    fn candle_stack(x: &Tensor, convs: &[(Tensor, Tensor)], padding: usize) -> Result<Tensor> {
        let mut h = x.clone();
        for (w, b) in convs {
            h = conv_relu_pool_candle(&h, w, b, padding)?;
        }
        Ok(h)
    }

    /// The blocks as they were: candle's `conv2d`, `relu` and `max_pool2d` (whose gradient is
    /// 1/4 of the true one).
    fn old_stack(x: &Tensor, convs: &[(Tensor, Tensor)], padding: usize) -> Result<Tensor> {
        let mut h = x.clone();
        for (w, b) in convs {
            h = h
                .conv2d(w, padding, 1, 1, 1)?
                .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?
                .relu()?
                .max_pool2d(2)?;
        }
        Ok(h)
    }

    fn randn(shape: &[usize], std: f32) -> Var {
        Var::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    /// `f(vars)` and the gradients of `sum(f(vars) * r)` w.r.t. every var.
    fn value_and_grads(y: Tensor, r: &Tensor, vars: &[&Var]) -> (Tensor, Vec<Tensor>) {
        let g = y.mul(r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = vars.iter().map(|v| g.get(v).unwrap().clone()).collect();
        (y, grads)
    }

    #[test]
    fn im2col_conv_matches_candle_conv2d() {
        // (n, c_in, c_out, h, w, k, padding)
        for (n, c, o, h, w, k, pad) in [
            (3, 1, 4, 12, 10, 5, 2),
            (2, 3, 5, 8, 8, 5, 2),
            (2, 4, 3, 7, 9, 3, 1),
            (2, 2, 3, 6, 7, 3, 0),
            (1, 2, 2, 3, 4, 5, 2),
        ] {
            let (x, wt, b) = (
                randn(&[n, c, h, w], 1.),
                randn(&[o, c, k, k], 0.3),
                randn(&[o], 0.3),
            );
            let want = x
                .conv2d(&wt, pad, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            let r = Tensor::randn(0f32, 1., want.shape(), &Device::Cpu).unwrap();
            let vars = [&x, &wt, &b];
            let (y0, g0) = value_and_grads(want, &r, &vars);
            // Whole batch, one sample, and two samples per chunk (the last one short).
            for chunk in [0, 1, 2] {
                let y = im2col_conv(&x, &wt, &b, pad, chunk);
                let (y1, g1) = value_and_grads(y, &r, &vars);
                let case = format!("n{n} c{c} o{o} {h}x{w} k{k} pad{pad} chunk{chunk}");
                let d = max_diff(&y0, &y1);
                assert!(d < 1e-4, "{case}: forward differs by {d}");
                for (name, a, b) in [
                    ("x", &g0[0], &g1[0]),
                    ("weight", &g0[1], &g1[1]),
                    ("bias", &g0[2], &g1[2]),
                ] {
                    let d = max_diff(a, b);
                    assert!(d < 1e-4, "{case}: grad {name} differs by {d}");
                }
            }
        }
    }

    #[test]
    fn conv_stack_matches_candle() {
        // (n, channels, h, w, k)
        for (n, chans, h, w, k) in [
            (16, vec![1, 4, 6], 28, 28, 5),
            (2, vec![3, 5], 14, 10, 5),
            (2, vec![2, 4, 3], 8, 12, 3),
        ] {
            let x = randn(&[n, chans[0], h, w], 1.);
            let params: Vec<(Var, Var)> = chans
                .windows(2)
                .map(|p| (randn(&[p[1], p[0], k, k], 0.3), randn(&[p[1]], 0.3)))
                .collect();
            let convs: Vec<(Tensor, Tensor)> = params
                .iter()
                .map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone()))
                .collect();
            let mut vars = vec![&x];
            for (w, b) in &params {
                vars.extend([w, b]);
            }
            let fast = conv_stack(&x, &convs, k / 2).unwrap();
            let div = 1 << (chans.len() - 1);
            assert_eq!(fast.dims(), &[n, chans[chans.len() - 1], h / div, w / div]);
            let old = old_stack(&x, &convs, k / 2).unwrap();
            let r = Tensor::randn(0f32, 1., fast.shape(), &Device::Cpu).unwrap();
            let (y1, g1) = value_and_grads(fast, &r, &vars);
            let (y0, g0) = value_and_grads(candle_stack(&x, &convs, k / 2).unwrap(), &r, &vars);
            let case = format!("n{n} {chans:?} {h}x{w} k{k}");
            assert!(max_diff(&y0, &y1) < 1e-4, "{case}: forward");
            assert!(
                max_diff(&old, &y1) < 1e-4,
                "{case}: forward against max_pool2d"
            );
            for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                let d = max_diff(a, b);
                assert!(d < 1e-3, "{case}: grad of var {i} differs by {d}");
            }
        }
    }

    #[test]
    fn pool_routes_the_gradient_to_the_first_maximum() {
        // One window [[1, 3], [3, 2]] per channel, NHWC [1, 2, 2, 2]; channel 1 negated.
        let y = Var::from_vec(
            vec![1f32, -1., 3., -3., 3., -3., 2., -2.],
            (1, 2, 2, 2),
            &Device::Cpu,
        )
        .unwrap();
        let b = Var::from_vec(vec![0.5f32, 0.5], 2, &Device::Cpu).unwrap();
        let out = y.apply_op2(&b, PoolBiasRelu).unwrap();
        // Channel 0: relu(3 + 0.5); channel 1: relu(-1 + 0.5) = 0.
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.5, 0.]
        );
        let g = out.sum_all().unwrap().backward().unwrap();
        let gy = g.get(&y).unwrap().flatten_all().unwrap();
        assert_eq!(
            gy.to_vec1::<f32>().unwrap(),
            [0., 0., 1., 0., 0., 0., 0., 0.]
        );
        let gb = g.get(&b).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gb, [1., 0.]);
    }

    #[test]
    fn candle_max_pool2d_gradient_is_a_quarter() {
        // Why the candle path does not use `max_pool2d`: one window, unique maximum.
        let x = Var::from_vec(vec![1f32, 3., 2., 0.], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let g = x
            .max_pool2d(2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g.get(&x).unwrap().flatten_all().unwrap();
        assert_eq!(gx.to_vec1::<f32>().unwrap(), [0., 0.25, 0., 0.]);
    }

    /// Throughput of the conv nets at batch 128: the old path (candle's conv2d and
    /// max_pool2d), the candle fallback and the CPU path.
    /// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
    /// cargo test -p distill-core --release model::conv_tests::bench_conv -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_conv() {
        use std::time::{Duration, Instant};
        let dev = Device::Cpu;
        let batch = 128;
        let secs: f64 = std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0);
        let archs = std::env::var("BENCH_ARCHS")
            .unwrap_or_else(|_| "conv:8-16-64-10,conv:32-64-256-10".into());
        let paths = std::env::var("BENCH_PATHS").unwrap_or_else(|_| "old,new".into());
        println!("threads {}", candle_core::utils::get_num_threads());
        for arch in archs.split(',') {
            let spec = ModelSpec::new(Arch::parse(arch).unwrap());
            let x = Tensor::rand(0f32, 1., (batch, 1, 28, 28), &dev).unwrap();
            let y =
                Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect(), batch, &dev).unwrap();
            for (name, stack) in [
                ("old", old_stack as Stack),
                ("candle", candle_stack as Stack),
                ("new", conv_stack as Stack),
            ] {
                if !paths.split(',').any(|p| p == name) {
                    continue;
                }
                let tm = TrainableModel::init(spec.clone(), 0, &dev).unwrap();
                let vars: Vec<Var> = tm
                    .named_vars()
                    .unwrap()
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect();
                let n_conv = vars.len() / 2 - 2;
                let forward = || -> Tensor {
                    let convs: Vec<(Tensor, Tensor)> = (0..n_conv)
                        .map(|l| {
                            (
                                vars[2 * l].as_tensor().clone(),
                                vars[2 * l + 1].as_tensor().clone(),
                            )
                        })
                        .collect();
                    let h = stack(&x, &convs, 2).unwrap().flatten_from(1).unwrap();
                    let lin = |h: &Tensor, i: usize| {
                        h.matmul(&vars[i].t().unwrap())
                            .unwrap()
                            .broadcast_add(&vars[i + 1])
                            .unwrap()
                    };
                    let h = lin(&h, 2 * n_conv).relu().unwrap();
                    lin(&h, 2 * n_conv + 2)
                };
                let time = |f: &mut dyn FnMut()| -> f64 {
                    f();
                    let (t0, mut it) = (Instant::now(), 0);
                    while it < 2 || t0.elapsed() < Duration::from_secs_f64(secs) {
                        f();
                        it += 1;
                    }
                    (it * batch) as f64 / t0.elapsed().as_secs_f64()
                };
                let infer = time(&mut || {
                    forward().to_vec2::<f32>().unwrap();
                });
                let train = time(&mut || {
                    let loss = candle_nn::loss::cross_entropy(&forward(), &y).unwrap();
                    let g = loss.backward().unwrap();
                    for v in &vars {
                        let d = g.get(v).unwrap();
                        v.set(&(v.as_tensor() - (d * 1e-3).unwrap()).unwrap())
                            .unwrap();
                    }
                });
                println!(
                    "{arch:<18} {name:<7} train {train:>7.0} samples/s   inference {infer:>7.0} samples/s"
                );
            }
        }
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
