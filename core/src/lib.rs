//! `distill-core`: what every distill role shares — model specs and candle models, data sets,
//! the knowledge-distillation math, checkpoints, and the step between a plain host tensor
//! (shape, dtype, little-endian bytes) and a candle tensor. No gRPC, no async.

pub mod checkpoint;
mod conv;
pub mod data;
pub mod device;
pub mod elem;
pub mod error;
pub mod eval;
pub mod fast_mlp;
pub mod fsutil;
pub mod gguf;
pub mod kd;
pub mod llama;
pub mod lm;
pub mod lm_train;
pub mod logging;
pub mod model;
pub mod optim;
pub mod safetensors_io;
pub mod settings;
pub mod soft_targets;
pub mod spec;
pub mod speed;
pub mod step;
pub mod tensor;
#[cfg(test)]
mod testutil;
pub mod token_kd;
pub mod tokenizer;
pub mod topk;
pub mod train;

pub use error::{Error, Result};
