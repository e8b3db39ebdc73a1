//! Optimizers over candle [`Var`]s: SGD (momentum, Nesterov, L2 weight decay) and AdamW
//! (decoupled weight decay), a learning-rate schedule with optional linear warmup, and gradient
//! clipping by global norm. The optimizer state saves to and loads from a safetensors file, so a
//! run resumes bit for bit.
//!
//! # Update rules (PyTorch's `torch.optim.SGD` / `torch.optim.AdamW`)
//! With gradient `g` (already scaled by the clipping factor), parameter `p`, learning rate `lr`:
//! - SGD: `d = g + wd·p`; with momentum `μ > 0`: `b = μ·b + d` and `d = b` (Nesterov: `d = d + μ·b`);
//!   `p = p − lr·d`. The momentum buffer starts at zero, which equals PyTorch's "first step
//!   copies `d`" because `μ·0 + d = d`.
//! - AdamW: `p = p·(1 − lr·wd)`; `m = β₁·m + (1−β₁)·g`; `v = β₂·v + (1−β₂)·g²`;
//!   `p = p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`, with `t` the 1-based step count.
//!
//! # Speed
//! On the CPU every parameter is updated by ONE fused pass ([`candle_core::InplaceOp2`]) over
//! the parameter, its gradient and its state, written in place: no temporary tensors. The state
//! lives in host `Vec<f32>`s. A gradient that arrives as a strided view (a `Linear` weight's
//! gradient is the transpose of a matmul result) is first gathered tile by tile into a reused
//! scratch buffer. On other devices the same formulas run as candle tensor ops, with the state
//! in device tensors.
//!
//! Subnormal values in the state (momentum of a dead ReLU unit decaying geometrically) are
//! flushed to zero on the CPU path: subnormal arithmetic is ~100× slower on x86 and PyTorch's
//! reference run saw training slow down by 40% from exactly this (see `shared/bench/README.md`);
//! a value below 1.2e-38 has no effect on any parameter.
//!
//! # Saved state
//! One safetensors file: tensors `{param}.momentum` (SGD with momentum) or `{param}.exp_avg` and
//! `{param}.exp_avg_sq` (AdamW), f32, plus metadata `distill.format = distill-optimizer`,
//! `distill.format_version = 1`, `distill.optim.config` (the [`OptimConfig`] as JSON) and
//! `distill.optim.step` (updates done so far).
//!
//! # Layout
//! - `config`: the settings ([`OptimConfig`], [`OptimKind`], [`Schedule`]) and the learning-rate
//!   schedule;
//! - `state`: the [`Optimizer`] over its parameters and their buffers, and [`OptimState`], its
//!   host copy for saving;
//! - `fused`: the update kernels (the fused CPU pass and the tensor-op version for other
//!   devices).
//!
//! The safetensors reading and writing the saved state shares with checkpoints lives in
//! [`crate::safetensors_io`].

mod config;
mod fused;
mod state;

pub use crate::safetensors_io::NamedBuffers;
pub use config::{OptimConfig, OptimKind, Schedule};
pub use state::{OptimState, Optimizer, STATE_FORMAT, UpdateStats};
