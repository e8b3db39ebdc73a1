//! The conv blocks of the `cnn` architectures (conv → bias → ReLU → 2×2 max-pool) and their
//! CPU kernels: channels-last im2col convolution and a fused pool/bias/ReLU pass, each with its
//! backward, as candle custom ops. [`crate::model`] calls [`conv_stack`]; nothing else here is
//! used outside this module.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::Result;
use crate::tensor::f32_slice;

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
pub(crate) fn conv_stack(x: &Tensor, convs: &[(Tensor, Tensor)], padding: usize) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::model::TrainableModel;
    use crate::spec::{Arch, ModelSpec};

    type Stack = fn(&Tensor, &[(Tensor, Tensor)], usize) -> Result<Tensor>;

    use crate::testutil::max_diff;

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

    /// The blocks from candle's own `conv2d`, `relu` and `max_pool2d` (whose gradient is 1/4 of
    /// the true one), to measure against.
    fn candle_ops_stack(x: &Tensor, convs: &[(Tensor, Tensor)], padding: usize) -> Result<Tensor> {
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
            let old = candle_ops_stack(&x, &convs, k / 2).unwrap();
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

    /// Throughput of the conv nets at batch 128: candle's own ops (conv2d and
    /// max_pool2d), the candle fallback and the CPU path.
    /// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
    /// cargo test -p distill-core --release conv::tests::bench_conv -- --ignored --nocapture`.
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
                ("old", candle_ops_stack as Stack),
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
