//! The update kernels: ONE fused in-place pass per parameter on the CPU, the same formulas as
//! candle tensor ops elsewhere.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};

use super::state::Buf;
use crate::{Error, Result};

/// Per-update constants, f32 so the CPU kernel does no conversions.
#[derive(Debug, Clone, Copy)]
pub(super) enum Hyper {
    Sgd {
        lr: f32,
        mu: f32,
        wd: f32,
        nesterov: bool,
        scale: f32,
    },
    AdamW {
        decay: f32,
        b1: f32,
        b2: f32,
        step_size: f32,
        inv_bc2_sqrt: f32,
        eps: f32,
        scale: f32,
    },
}

pub(super) struct FusedCtx<'a> {
    /// The parameter's state buffers, in [`super::state`]'s order for its kind.
    pub(super) bufs: Vec<&'a mut Vec<f32>>,
    /// Reused room for gathering a strided gradient.
    pub(super) scratch: &'a mut Vec<f32>,
}

/// The fused in-place CPU update of one parameter (dst) from its gradient (src).
pub(super) struct Fused<'a> {
    /// This update's constants.
    pub(super) h: Hyper,
    /// The buffers it writes (a `RefCell`: candle hands the op to `cpu_fwd` by `&self`).
    pub(super) ctx: RefCell<FusedCtx<'a>>,
}

#[inline(always)]
pub(super) fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

impl candle_core::InplaceOp2 for Fused<'_> {
    fn name(&self) -> &'static str {
        "distill-fused-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused update: parameters and gradients must be f32");
        };
        let Some((p0, p1)) = l1.contiguous_offsets() else {
            candle_core::bail!("fused update: parameter is not contiguous");
        };
        let p = &mut p[p0..p1];
        let mut ctx = self
            .ctx
            .try_borrow_mut()
            .map_err(|_| candle_core::Error::Msg("fused update re-entered".into()))?;
        let FusedCtx { bufs, scratch } = &mut *ctx;
        let g: &[f32] = match l2.contiguous_offsets() {
            Some((a, b)) => &g[a..b],
            None => {
                gather(g, l2, scratch)?;
                scratch.as_slice()
            }
        };
        if g.len() != p.len() || bufs.iter().any(|b| b.len() != p.len()) {
            candle_core::bail!("fused update: size mismatch");
        }
        match (self.h, bufs.as_mut_slice()) {
            (Hyper::Sgd { lr, wd, scale, .. }, []) => {
                for (p, &g) in p.iter_mut().zip(g) {
                    let d = g * scale + wd * *p;
                    *p -= lr * d;
                }
            }
            (
                Hyper::Sgd {
                    lr,
                    mu,
                    wd,
                    nesterov,
                    scale,
                },
                [m],
            ) => {
                for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                    let d = g * scale + wd * *p;
                    let b = flush(mu * *m + d);
                    *m = b;
                    let d = if nesterov { d + mu * b } else { b };
                    *p -= lr * d;
                }
            }
            (
                Hyper::AdamW {
                    decay,
                    b1,
                    b2,
                    step_size,
                    inv_bc2_sqrt,
                    eps,
                    scale,
                },
                [m, v],
            ) => {
                let (c1, c2) = (1.0 - b1, 1.0 - b2);
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g * scale;
                    let mm = flush(b1 * *m + c1 * g);
                    let vv = flush(b2 * *v + c2 * (g * g));
                    *m = mm;
                    *v = vv;
                    let denom = vv.sqrt() * inv_bc2_sqrt + eps;
                    *p = *p * decay - step_size * (mm / denom);
                }
            }
            _ => candle_core::bail!("fused update: state does not match the optimizer kind"),
        }
        Ok(())
    }
}

/// Copies a strided f32 view into `out` in row-major order. Two-dimensional views (a
/// transposed weight gradient) are copied in 32×32 tiles so both sides stay in cache.
pub(super) fn gather(src: &[f32], l: &Layout, out: &mut Vec<f32>) -> candle_core::Result<()> {
    let n = l.shape().elem_count();
    out.clear();
    out.resize(n, 0.0);
    let off = l.start_offset();
    match (l.dims(), l.stride()) {
        (&[rows, cols], &[s0, s1]) => {
            const T: usize = 32;
            for r0 in (0..rows).step_by(T) {
                for c0 in (0..cols).step_by(T) {
                    for r in r0..(r0 + T).min(rows) {
                        for c in c0..(c0 + T).min(cols) {
                            out[r * cols + c] = src[off + r * s0 + c * s1];
                        }
                    }
                }
            }
        }
        (dims, strides) => {
            // General case: walk a multi-index.
            let mut idx = vec![0usize; dims.len()];
            for o in out.iter_mut() {
                let pos: usize = off + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
                *o = src[pos];
                for d in (0..dims.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < dims[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
    }
    Ok(())
}

/// Σ g² of a gradient, read in place on the CPU (a strided view without overlap covers a
/// dense block of storage, and the sum does not depend on the visiting order beyond rounding).
pub(super) fn sum_sq(g: &Tensor) -> Result<f64> {
    {
        let (storage, layout) = g.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(v)) = &*storage
            && let Some((a, b)) = dense_block(layout)
        {
            let s = &v[a..b];
            let mut lanes = [0f32; 8];
            let chunks = s.chunks_exact(8);
            let rest: f64 = chunks.remainder().iter().map(|&x| (x * x) as f64).sum();
            for c in chunks {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l += x * x;
                }
            }
            return Ok(lanes.iter().map(|&x| x as f64).sum::<f64>() + rest);
        }
    }
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// The storage range `[a, b)` holding exactly the view's elements, if it is a dense block.
pub(super) fn dense_block(l: &Layout) -> Option<(usize, usize)> {
    if let Some(r) = l.contiguous_offsets() {
        return Some(r);
    }
    let n = l.shape().elem_count();
    if n == 0 || l.has_internal_overlap() {
        return None;
    }
    let span: usize = l
        .dims()
        .iter()
        .zip(l.stride())
        .map(|(d, s)| (d - 1) * s)
        .sum::<usize>()
        + 1;
    (span == n).then(|| (l.start_offset(), l.start_offset() + n))
}

/// The same update as [`Fused`] with candle tensor ops (any device).
pub(super) fn update_dev(h: &Hyper, var: &Var, g: &Tensor, bufs: &mut [Buf]) -> Result<()> {
    let p = var.as_tensor();
    match (*h, bufs) {
        (
            Hyper::Sgd {
                lr,
                mu,
                wd,
                nesterov,
                scale,
            },
            bufs,
        ) => {
            let mut d = g.affine(scale as f64, 0.0)?;
            if wd != 0.0 {
                d = (d + p.affine(wd as f64, 0.0)?)?;
            }
            if let [Buf::Dev(m)] = bufs {
                let b = (m.affine(mu as f64, 0.0)? + &d)?;
                d = if nesterov {
                    (d + b.affine(mu as f64, 0.0)?)?
                } else {
                    b.clone()
                };
                *m = b;
            }
            var.set(&(p - d.affine(lr as f64, 0.0)?)?)?;
        }
        (
            Hyper::AdamW {
                decay,
                b1,
                b2,
                step_size,
                inv_bc2_sqrt,
                eps,
                scale,
            },
            [Buf::Dev(m), Buf::Dev(v)],
        ) => {
            let g = g.affine(scale as f64, 0.0)?;
            let mm = (m.affine(b1 as f64, 0.0)? + g.affine((1.0 - b1) as f64, 0.0)?)?;
            let vv = (v.affine(b2 as f64, 0.0)? + g.sqr()?.affine((1.0 - b2) as f64, 0.0)?)?;
            let denom = vv.sqrt()?.affine(inv_bc2_sqrt as f64, eps as f64)?;
            let upd = (mm.div(&denom)?).affine(step_size as f64, 0.0)?;
            var.set(&(p.affine(decay as f64, 0.0)? - upd)?)?;
            *m = mm;
            *v = vv;
        }
        _ => {
            return Err(Error::Input(
                "optimizer state does not match its kind".into(),
            ));
        }
    }
    Ok(())
}
