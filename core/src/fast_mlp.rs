//! A fast training step for MLPs on the CPU in f32: forward, backward and update
//! without candle's autograd graph.
//!
//! [`crate::train::train_step`] calls [`train_step`] first; it returns `None` (and the step runs
//! through candle's autograd) unless the model is an MLP whose weights live on the CPU, the
//! precision is f32 and the input is f32. Conv nets, bf16 and CUDA keep the autograd path.
//!
//! What the step does differently from the autograd one (same arithmetic otherwise):
//! - Forward: one matmul per layer (candle's CPU gemm, so its kernels and threads), then ONE
//!   in-place pass for bias, ReLU and dropout. Dropout masks are drawn from the step's rng in
//!   the same order and with the same values as [`crate::model::dropout`], so a seed gives the
//!   same masks on both paths.
//! - Loss: the objective (any [`Objective`]) runs on a copy of the logits made a leaf, and
//!   candle's autograd differentiates only that small graph (`[B, classes]`), which gives the
//!   gradient of the loss with respect to the logits.
//! - Backward: per layer, `dW = gᵀ·h` computed straight into the weight's `[out, in]` layout
//!   (no transposed gradient for the optimizer to gather), `db` = column sums of `g`, and
//!   `dh = g·W` masked in place by the ReLU and dropout of the layer below. The input's gradient
//!   is never computed. candle's autograd would instead also compute it, allocate a zero tensor
//!   and add into it for every gradient, and run ReLU's and the bias broadcast's backward as
//!   separate tensor ops.
//! - Update: the same [`Optimizer::step`], fed a [`GradStore`] keyed by the parameters.
//!
//! At a ReLU input of exactly 0 the gradient is 0 here (PyTorch's convention); candle's ReLU
//! backward passes it. Nothing else differs: the tests check the gradients and a few updates
//! against the autograd path within 1e-4.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Shape, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::model::TrainableModel;
use crate::optim::Optimizer;
use crate::step::{Batch, Objective, StepOutput, check_loss, count_correct};
use crate::{Error, Result};

/// One training step on the fast path, or `None` when it does not apply (see the module docs).
pub(crate) fn train_step(
    model: &TrainableModel,
    opt: &mut Optimizer,
    batch: &Batch<'_>,
    lr: f64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<Option<StepOutput>> {
    let Some((out, store)) = gradients(model, batch, opt.step_count() + 1, rng, objective)? else {
        return Ok(None);
    };
    let stats = opt.step(&store, lr)?;
    Ok(Some(StepOutput {
        grad_norm: stats.grad_norm,
        ..out
    }))
}

/// The fast path's forward and backward pass of update number `update`, without the update
/// (`None` when the path does not apply): the gradients keyed by the model's variables.
pub(crate) fn gradients(
    model: &TrainableModel,
    batch: &Batch<'_>,
    update: u64,
    rng: &mut ChaCha8Rng,
    objective: &mut dyn Objective,
) -> Result<Option<(StepOutput, GradStore)>> {
    let Some(layers) = model.model.fast_mlp_layers() else {
        return Ok(None);
    };
    if !batch.x.device().is_cpu() || batch.x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let spec = model.model.spec();
    let (logits, tape) = forward(
        &layers,
        &batch.x,
        spec.arch.input_size(),
        (spec.input_dropout, spec.dropout),
        Some(rng),
    )?;
    // The loss on a leaf copy of the logits: its gradient is all the backward pass needs.
    let leaf = Var::from_tensor(&logits)?;
    let loss = objective.loss(batch, leaf.as_tensor())?;
    let value = check_loss(&loss, objective, update)?;
    let dlogits = match loss.backward()?.get(leaf.as_tensor()) {
        Some(g) => g.detach(),
        None => logits.zeros_like()?,
    };
    let grads = backward(&layers, &tape, dlogits)?;
    let mut store = GradStore::default();
    for ((w, b), (dw, db)) in layers.iter().zip(grads) {
        store.insert(w, dw);
        store.insert(b, db);
    }
    Ok(Some((
        StepOutput {
            loss: value,
            correct: count_correct(&logits, &batch.y)?,
            samples: batch.x.dim(0)?,
            grad_norm: None,
        },
        store,
    )))
}

/// What the forward pass keeps for the backward pass.
pub(crate) struct Tape {
    /// The input of every layer, `[N, in_l]` contiguous: the (dropped-out) input for layer 0,
    /// then each hidden layer's output after ReLU and dropout.
    inputs: Vec<Tensor>,
    /// The dropout mask applied to each hidden layer's output (0 or 1/(1−p)); `None` without.
    masks: Vec<Option<Vec<f32>>>,
}

/// A mask of `len` values as [`crate::model::dropout`] draws it: 0 with probability `p`, else
/// 1/(1−p), one `f32` draw per value in order.
fn dropout_mask(len: usize, p: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let scale = 1.0 / (1.0 - p);
    (0..len)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect()
}

/// The training (with `rng`: dropout on) or inference forward pass of the MLP `layers`
/// (`(weight [out, in], bias [out])` each), with the tape for [`backward`].
///
/// # Shapes
/// `x`: `[N, ...]` with `input` values per row → logits `[N, classes]`.
pub(crate) fn forward(
    layers: &[(Tensor, Tensor)],
    x: &Tensor,
    input: usize,
    (p_in, p_hidden): (f32, f32),
    mut rng: Option<&mut ChaCha8Rng>,
) -> Result<(Tensor, Tape)> {
    let n = x.dim(0)?;
    // [N, ...] -> [N, input]
    let mut h = x.reshape((n, input))?.detach().contiguous()?;
    if let Some(r) = rng.as_deref_mut().filter(|_| p_in > 0.0) {
        let mask = dropout_mask(n * input, p_in, r);
        let v: Vec<f32> = h
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .zip(mask)
            .map(|(a, m)| a * m)
            .collect();
        h = Tensor::from_vec(v, (n, input), x.device())?;
    }
    let mut tape = Tape {
        inputs: Vec::with_capacity(layers.len()),
        masks: Vec::with_capacity(layers.len()),
    };
    let last = layers.len().saturating_sub(1);
    for (l, (w, b)) in layers.iter().enumerate() {
        // [N, in] x [in, out] (the weight read transposed in place)
        let z = h.matmul(&w.detach().t()?)?;
        let hidden = l < last;
        let mask = match rng.as_deref_mut() {
            Some(r) if hidden && p_hidden > 0.0 => Some(dropout_mask(z.elem_count(), p_hidden, r)),
            _ => None,
        };
        z.inplace_op2(
            &b.detach(),
            &BiasAct {
                relu: hidden,
                mask: mask.as_deref(),
            },
        )?;
        tape.inputs.push(h);
        if hidden {
            tape.masks.push(mask);
        }
        h = z;
    }
    Ok((h, tape))
}

/// The gradients `(dW [out, in], db [out])` of every layer, from the gradient of the loss with
/// respect to the logits (`[N, classes]`).
pub(crate) fn backward(
    layers: &[(Tensor, Tensor)],
    tape: &Tape,
    dlogits: Tensor,
) -> Result<Vec<(Tensor, Tensor)>> {
    if tape.inputs.len() != layers.len() {
        return Err(Error::Input("fast MLP backward: tape does not fit".into()));
    }
    let mut out = Vec::with_capacity(layers.len());
    let mut g = dlogits.contiguous()?;
    for l in (0..layers.len()).rev() {
        let h_in = &tape.inputs[l];
        // [out, N] x [N, in]: straight into the weight's layout.
        let dw = g.t()?.matmul(h_in)?;
        let db = g.apply_op1_no_bwd(&ColSum)?;
        let next = if l > 0 {
            // [N, out] x [out, in], then through the ReLU and dropout that made h_in.
            let dh = g.matmul(&layers[l].0.detach())?;
            dh.inplace_op2(
                h_in,
                &ReluDropBack {
                    mask: tape.masks[l - 1].as_deref(),
                },
            )?;
            Some(dh)
        } else {
            None
        };
        out.push((dw, db));
        if let Some(dh) = next {
            g = dh;
        }
    }
    out.reverse();
    Ok(out)
}

/// The contiguous f32 data of a CPU tensor argument.
fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous f32 data of a CPU tensor written in place.
fn f32_data_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{op}: output must be contiguous"),
    }
}

/// `max(v, 0)`, keeping NaN (so a diverged step is seen), as PyTorch's ReLU does.
#[inline(always)]
fn relu(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// In place on `z [N, out]` with `b [out]`: `z + b`, then (hidden layers) ReLU and the dropout
/// mask, in one pass.
struct BiasAct<'a> {
    relu: bool,
    mask: Option<&'a [f32]>,
}

impl InplaceOp2 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "fast-mlp-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let z = f32_data_mut(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let o = b.len();
        if o == 0 || z.len() % o != 0 || self.mask.is_some_and(|m| m.len() != z.len()) {
            candle_core::bail!("fast-mlp-bias-act: shapes do not fit");
        }
        match (self.relu, self.mask) {
            (false, _) => z.chunks_exact_mut(o).for_each(|row| {
                row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
            }),
            (true, None) => z.chunks_exact_mut(o).for_each(|row| {
                row.iter_mut().zip(b).for_each(|(v, &b)| *v = relu(*v + b));
            }),
            (true, Some(mask)) => {
                z.chunks_exact_mut(o)
                    .zip(mask.chunks_exact(o))
                    .for_each(|(row, m)| {
                        for ((v, &b), &m) in row.iter_mut().zip(b).zip(m) {
                            *v = relu(*v + b) * m;
                        }
                    })
            }
        }
        Ok(())
    }
}

/// In place on `dh [N, in]` with `h [N, in]`, the output it is the gradient of: keeps the
/// gradient where `h > 0` (ReLU passed and dropout kept the value), scaled by the dropout mask.
struct ReluDropBack<'a> {
    mask: Option<&'a [f32]>,
}

impl InplaceOp2 for ReluDropBack<'_> {
    fn name(&self) -> &'static str {
        "fast-mlp-relu-back"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32_data_mut(s1, l1, self.name())?;
        let h = f32_data(s2, l2, self.name())?;
        if h.len() != g.len() || self.mask.is_some_and(|m| m.len() != g.len()) {
            candle_core::bail!("fast-mlp-relu-back: shapes do not fit");
        }
        match self.mask {
            None => g.iter_mut().zip(h).for_each(|(g, &h)| {
                if h <= 0.0 {
                    *g = 0.0;
                }
            }),
            Some(mask) => {
                for ((g, &h), &m) in g.iter_mut().zip(h).zip(mask) {
                    *g = if h > 0.0 { *g * m } else { 0.0 };
                }
            }
        }
        Ok(())
    }
}

/// Column sums of a contiguous `[N, C]` f32 matrix → `[C]` (rows added in order).
struct ColSum;

impl candle_core::CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "fast-mlp-col-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let (_, c) = l.shape().dims2()?;
        let mut out = vec![0f32; c];
        for row in g.chunks_exact(c.max(1)) {
            out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module};
    use rand::SeedableRng;

    use super::*;
    use crate::kd::{kd_loss, tempered_softmax};
    use crate::model::Precision;
    use crate::optim::OptimConfig;
    use crate::spec::{Arch, ModelSpec};
    use crate::step::{CrossEntropy, step_rng, train_step_autograd};

    use crate::testutil::max_diff;

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// KD against fixed soft targets, as the student worker computes it.
    struct Kd(Tensor);

    impl Objective for Kd {
        fn name(&self) -> &str {
            "kd"
        }
        fn loss(&mut self, batch: &Batch<'_>, logits: &Tensor) -> Result<Tensor> {
            Ok(kd_loss(logits, &self.0, Some(&batch.y), 20.0, 0.9)?.total)
        }
    }

    fn spec(arch: &str, dropout: bool) -> ModelSpec {
        let mut s = ModelSpec::new(Arch::parse(arch).unwrap());
        if dropout {
            s.dropout = 0.5;
            s.input_dropout = 0.2;
        }
        s
    }

    fn batch_data(arch: &Arch, n: usize, seed: u64) -> (Tensor, Tensor, Vec<usize>) {
        let x = rand_tensor(&[n, arch.input_size()], seed).abs().unwrap();
        let y: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7 + seed as u32) % arch.classes() as u32)
            .collect();
        (
            x,
            Tensor::from_vec(y, n, &Device::Cpu).unwrap(),
            (0..n).collect(),
        )
    }

    #[test]
    fn bias_act_matches_candle_ops() {
        let z = rand_tensor(&[5, 7], 1);
        let b = rand_tensor(&[7], 2);
        let want = z.broadcast_add(&b).unwrap();
        for relu in [false, true] {
            let got = z.copy().unwrap();
            got.inplace_op2(&b, &BiasAct { relu, mask: None }).unwrap();
            let want = if relu {
                want.relu().unwrap()
            } else {
                want.clone()
            };
            assert_eq!(max_diff(&got, &want), 0.0, "relu {relu}");
        }
        let mask = dropout_mask(35, 0.5, &mut ChaCha8Rng::seed_from_u64(3));
        assert!(mask.iter().all(|&m| m == 0.0 || m == 2.0));
        let got = z.copy().unwrap();
        let m = Tensor::from_slice(&mask, (5, 7), &Device::Cpu).unwrap();
        got.inplace_op2(
            &b,
            &BiasAct {
                relu: true,
                mask: Some(&mask),
            },
        )
        .unwrap();
        assert_eq!(max_diff(&got, &want.relu().unwrap().mul(&m).unwrap()), 0.0);
    }

    #[test]
    fn relu_back_and_col_sum_match_candle_ops() {
        let h = rand_tensor(&[6, 4], 4).relu().unwrap();
        let g = rand_tensor(&[6, 4], 5);
        let mask = dropout_mask(24, 0.3, &mut ChaCha8Rng::seed_from_u64(6));
        let m = Tensor::from_slice(&mask, (6, 4), &Device::Cpu).unwrap();
        let pass = h.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
        for with_mask in [false, true] {
            let got = g.copy().unwrap();
            let op = ReluDropBack {
                mask: with_mask.then_some(mask.as_slice()),
            };
            got.inplace_op2(&h, &op).unwrap();
            let mut want = g.mul(&pass).unwrap();
            if with_mask {
                want = want.mul(&m).unwrap();
            }
            assert_eq!(max_diff(&got, &want), 0.0, "mask {with_mask}");
        }
        let s = g.apply_op1_no_bwd(&ColSum).unwrap();
        assert!(max_diff(&s, &g.sum(0).unwrap()) < 1e-6);
    }

    /// The fast forward and backward against candle's autograd through the same model, with
    /// and without dropout (same masks from the same rng), for cross-entropy and KD.
    #[test]
    fn gradients_match_autograd() {
        for (arch, dropout) in [
            ("mlp:20-32-16-5", false),
            ("mlp:20-32-16-5", true),
            ("mlp:784-64-10", true),
            ("mlp:12-3", false),
        ] {
            let spec = spec(arch, dropout);
            let tm = TrainableModel::init(spec.clone(), 3, &Device::Cpu).unwrap();
            let (x, y, idx) = batch_data(&spec.arch, 9, 1);
            let layers = tm.model.fast_mlp_layers().unwrap();
            let soft = tempered_softmax(
                &rand_tensor(&[9, spec.arch.classes()], 8)
                    .affine(8.0, 0.0)
                    .unwrap(),
                20.0,
            )
            .unwrap();
            for kd in [false, true] {
                let mut obj: Box<dyn Objective> = if kd {
                    Box::new(Kd(soft.clone()))
                } else {
                    Box::new(CrossEntropy)
                };
                let batch = Batch {
                    idx: &idx,
                    x: x.clone(),
                    y: y.clone(),
                };
                let case = format!("{arch} dropout {dropout} kd {kd}");
                // Reference: candle's graph.
                let ref_logits = tm.model.forward_train(&x, &mut step_rng(0, 5)).unwrap();
                let ref_grads = obj.loss(&batch, &ref_logits).unwrap().backward().unwrap();
                // Fast path.
                let (logits, tape) = forward(
                    &layers,
                    &x,
                    spec.arch.input_size(),
                    (spec.input_dropout, spec.dropout),
                    Some(&mut step_rng(0, 5)),
                )
                .unwrap();
                assert!(max_diff(&logits, &ref_logits) < 1e-5, "{case}: logits");
                let leaf = Var::from_tensor(&logits).unwrap();
                let g = obj
                    .loss(&batch, leaf.as_tensor())
                    .unwrap()
                    .backward()
                    .unwrap();
                let dl = g.get(leaf.as_tensor()).unwrap().clone();
                let grads = backward(&layers, &tape, dl).unwrap();
                for (l, ((w, b), (dw, db))) in layers.iter().zip(&grads).enumerate() {
                    assert_eq!(dw.dims(), w.dims());
                    assert!(dw.is_contiguous(), "{case}: dW{l} contiguous");
                    let d = max_diff(dw, ref_grads.get(w).unwrap());
                    assert!(d < 1e-4, "{case}: dW{l} differs by {d}");
                    let d = max_diff(db, ref_grads.get(b).unwrap());
                    assert!(d < 1e-4, "{case}: db{l} differs by {d}");
                }
            }
        }
    }

    /// Inference through the fast forward (no rng: dropout off) equals `Model::forward`.
    #[test]
    fn inference_forward_matches_the_model() {
        let spec = spec("mlp:30-20-20-4", true);
        let tm = TrainableModel::init(spec.clone(), 1, &Device::Cpu).unwrap();
        let (x, _, _) = batch_data(&spec.arch, 7, 2);
        let layers = tm.model.fast_mlp_layers().unwrap();
        let (fast, _) = forward(&layers, &x, 30, (0.2, 0.5), None).unwrap();
        assert!(max_diff(&fast, &tm.model.forward(&x).unwrap()) < 1e-6);
        // A Linear by hand, as a sanity check of the layer order.
        let lin = candle_nn::Linear::new(layers[0].0.clone(), Some(layers[0].1.clone()));
        assert_eq!(lin.forward(&x).unwrap().dims(), &[7, 20]);
    }

    fn params(tm: &TrainableModel) -> Vec<Tensor> {
        tm.named_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.copy().unwrap())
            .collect()
    }

    /// Whole steps (loss, update, clipping) on the fast path against the autograd path: the
    /// parameters stay within 1e-4 over several updates, for SGD with momentum and AdamW, CE and
    /// KD, with dropout; and the fast path is deterministic given the seed.
    #[test]
    fn steps_match_autograd_and_are_deterministic() {
        let mut clipped = OptimConfig::sgd(0.05, 0.9);
        clipped.clip_grad_norm = Some(0.5);
        for (arch, dropout) in [("mlp:20-32-16-5", true), ("mlp:784-40-10", false)] {
            for cfg in [
                OptimConfig::sgd(0.05, 0.9),
                OptimConfig::adamw(1e-3, 0.01),
                clipped.clone(),
            ] {
                for kd in [false, true] {
                    let spec = spec(arch, dropout);
                    let run = |fast: bool| {
                        let tm = TrainableModel::init(spec.clone(), 11, &Device::Cpu).unwrap();
                        let mut opt =
                            Optimizer::new(cfg.clone(), tm.named_vars().unwrap()).unwrap();
                        let mut losses = Vec::new();
                        for s in 0..4u64 {
                            let (x, y, idx) = batch_data(&spec.arch, 16, s);
                            let soft = tempered_softmax(
                                &rand_tensor(&[16, spec.arch.classes()], s + 50)
                                    .affine(8.0, 0.0)
                                    .unwrap(),
                                20.0,
                            )
                            .unwrap();
                            let mut obj: Box<dyn Objective> = if kd {
                                Box::new(Kd(soft))
                            } else {
                                Box::new(CrossEntropy)
                            };
                            let batch = Batch { idx: &idx, x, y };
                            let mut rng = step_rng(11, s);
                            let out = if fast {
                                train_step(&tm, &mut opt, &batch, cfg.lr, &mut rng, obj.as_mut())
                                    .unwrap()
                                    .expect("fast path applies")
                            } else {
                                train_step_autograd(
                                    &tm,
                                    &mut opt,
                                    &batch,
                                    cfg.lr,
                                    &mut rng,
                                    obj.as_mut(),
                                )
                                .unwrap()
                            };
                            losses.push((out.loss, out.correct, out.grad_norm));
                        }
                        (params(&tm), losses)
                    };
                    let case = format!("{arch} {:?} kd {kd}", cfg.kind);
                    let (p_fast, l_fast) = run(true);
                    let (p_ref, l_ref) = run(false);
                    for (a, b) in p_fast.iter().zip(&p_ref) {
                        let d = max_diff(a, b);
                        assert!(d < 1e-4, "{case}: parameters differ by {d}");
                    }
                    for ((la, ca, ga), (lb, cb, gb)) in l_fast.iter().zip(&l_ref) {
                        assert!((la - lb).abs() < 1e-4, "{case}: loss {la} vs {lb}");
                        assert_eq!(ca, cb, "{case}: correct");
                        assert_eq!(ga.is_some(), gb.is_some());
                        if let (Some(a), Some(b)) = (ga, gb) {
                            assert!((a - b).abs() < 1e-4 * b.max(1.0), "{case}: grad norm");
                        }
                    }
                    let (p_again, _) = run(true);
                    for (a, b) in p_fast.iter().zip(&p_again) {
                        assert_eq!(max_diff(a, b), 0.0, "{case}: not deterministic");
                    }
                }
            }
        }
    }

    /// Conv nets and bf16 keep candle's autograd path.
    #[test]
    fn applies_only_to_f32_mlps() {
        let dev = Device::Cpu;
        let conv = TrainableModel::init(spec("conv:4-8-16-10", false), 0, &dev).unwrap();
        assert!(conv.model.fast_mlp_layers().is_none());
        let mut mlp = TrainableModel::init(spec("mlp:20-8-4", false), 0, &dev).unwrap();
        assert!(mlp.model.fast_mlp_layers().is_some());
        mlp.model.set_precision(Precision::Bf16);
        assert!(mlp.model.fast_mlp_layers().is_none());
        let (x, y, idx) = batch_data(&mlp.model.spec().arch, 4, 0);
        let mut opt =
            Optimizer::new(OptimConfig::sgd(0.1, 0.0), mlp.named_vars().unwrap()).unwrap();
        let batch = Batch { idx: &idx, x, y };
        let out = train_step(
            &mlp,
            &mut opt,
            &batch,
            0.1,
            &mut step_rng(0, 0),
            &mut CrossEntropy,
        )
        .unwrap();
        assert!(out.is_none());
    }

    /// A non-finite loss is an error on the fast path too, and leaves the parameters alone.
    #[test]
    fn diverged_loss_is_an_error() {
        let tm = TrainableModel::init(spec("mlp:20-8-4", false), 0, &Device::Cpu).unwrap();
        let before = params(&tm);
        let (x, y, idx) = batch_data(&tm.model.spec().arch, 4, 0);
        let x = x.affine(f64::NAN, 0.0).unwrap();
        let mut opt = Optimizer::new(OptimConfig::sgd(0.1, 0.9), tm.named_vars().unwrap()).unwrap();
        let batch = Batch { idx: &idx, x, y };
        let e = train_step(
            &tm,
            &mut opt,
            &batch,
            0.1,
            &mut step_rng(0, 0),
            &mut CrossEntropy,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("training diverged"), "{e}");
        for (a, b) in params(&tm).iter().zip(&before) {
            assert_eq!(max_diff(a, b), 0.0);
        }
    }
}
