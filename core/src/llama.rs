//! A decoder-only transformer of the llama family (RMSNorm, rotary position embeddings,
//! SwiGLU, grouped-query attention, optional tied embeddings), for token-level distillation of
//! language models.
//!
//! - **Configured** by the fields of a Hugging Face `config.json` ([`LlamaConfig`]: unknown
//!   fields are ignored, so the file of a real checkpoint parses as is).
//! - **Named** as Hugging Face names the tensors (`model.embed_tokens.weight`,
//!   `model.layers.{i}.self_attn.q_proj.weight`, …, `lm_head.weight` unless tied), so a
//!   student can start from, and be exported to, that format through [`candle_nn::VarBuilder`].
//! - **Trainable** on the CPU and CUDA: every op has a backward in candle. candle's fused
//!   `rms_norm`, `rope` and `softmax_last_dim` have none, so the norm, the rotation and the
//!   softmax are written from basic tensor ops here (they agree with the fused ones to ~1e-6).
//! - **Two forwards**: [`Llama::forward`] scores every position of a batch of sequences in one
//!   pass under a causal mask (what a teacher serves and a student trains on);
//!   [`Llama::forward_cached`] appends positions to a [`KvCache`] (decoding one token at a time
//!   gives the same logits as the all-positions pass, which the tests check).

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The fields of a Hugging Face llama `config.json` this model reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key and value heads (grouped-query attention; absent: as many as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The RMSNorm's epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence (positions beyond it are refused).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// The output layer is the embedding's transpose (no `lm_head.weight`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_theta() -> f64 {
    10_000.0
}

fn default_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// A small llama for the toy language and tests: `layers` of width `hidden` (4 heads, 2 of
    /// them for keys and values, an MLP twice as wide), tied embeddings, 2048 positions.
    pub fn small(layers: usize, hidden: usize, vocab: usize) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: hidden * 2,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
        }
    }

    /// Reads the fields of a `config.json`; names the file and the problem when it cannot.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a llama config.json: {e}")))?;
        c.validate()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(c)
    }

    /// Every parameter's Hugging Face name and shape, in name order (what [`Llama::new`] reads).
    /// Saturating: an unvalidated config must not panic here; its shapes then fit no tensor.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h, i) = (self.vocab_size, self.hidden_size, self.intermediate_size);
        let d = self.head_dim();
        let (q, kv) = (
            self.num_attention_heads.saturating_mul(d),
            self.kv_heads().saturating_mul(d),
        );
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            out.extend([
                (p("input_layernorm"), vec![h]),
                (p("post_attention_layernorm"), vec![h]),
                (p("self_attn.q_proj"), vec![q, h]),
                (p("self_attn.k_proj"), vec![kv, h]),
                (p("self_attn.v_proj"), vec![kv, h]),
                (p("self_attn.o_proj"), vec![h, q]),
                (p("mlp.gate_proj"), vec![i, h]),
                (p("mlp.up_proj"), vec![i, h]),
                (p("mlp.down_proj"), vec![h, i]),
            ]);
        }
        out.sort();
        out
    }

    /// Key and value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("the head width {} is odd", self.head_dim()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} must be > 0", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!("rope_theta {} must be > 1", self.rope_theta));
        }
        Ok(())
    }
}

/// `x / sqrt(mean(x²) + eps) · weight` over the last dimension.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?)
    }
}

/// The rotary embedding's cosines and sines, `[positions, head_dim / 2]`.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64)) as f32)
            .collect();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, n as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Rotates `x` `[B, H, L, D]` at positions `start..start + L` (Hugging Face's
    /// `rotate_half` layout: the first and second halves of a head form the pairs).
    fn apply(&self, x: &Tensor, start: usize, fused: bool) -> Result<Tensor> {
        let (_, _, l, d) = x.dims4()?;
        let half = d / 2;
        let cos = self.cos.narrow(0, start, l)?;
        let sin = self.sin.narrow(0, start, l)?;
        if fused {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
        }
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// A softmax over the last dimension from basic ops (candle's fused one has no backward).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let w = cfg.hidden_size;
        Ok(Self {
            q: candle_nn::linear_no_bias(w, h * d, vb.pp("q_proj"))?,
            k: candle_nn::linear_no_bias(w, kv * d, vb.pp("k_proj"))?,
            v: candle_nn::linear_no_bias(w, kv * d, vb.pp("v_proj"))?,
            o: candle_nn::linear_no_bias(h * d, w, vb.pp("o_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x` `[B, L, W]` at positions `start..start + L`, with the layer's cached keys and values
    /// of the positions before (appended to).
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rotary: &Rotary,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
        fused: bool,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, l, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotary.apply(&split(self.q.forward(x)?, self.heads)?, start, fused)?;
        let mut k = rotary.apply(&split(self.k.forward(x)?, self.kv_heads)?, start, fused)?;
        let mut v = split(self.v.forward(x)?, self.kv_heads)?;
        if let Some((ck, cv)) = cache {
            if let (Some(pk), Some(pv)) = (ck.as_ref(), cv.as_ref()) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *ck = Some(k.clone());
            *cv = Some(v.clone());
        }
        let total = k.dim(2)?;
        let (k, v) = (self.repeat_kv(&k)?, self.repeat_kv(&v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [B, H, L, total]
        let scores = scores.broadcast_add(&causal_mask(l, start, total, x.device())?)?;
        let probs = if fused {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            softmax_last(&scores)?
        };
        let attn = probs.matmul(&v)?; // [B, H, L, D]
        let out = attn
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        Ok(self.o.forward(&out)?)
    }

    /// Keys or values `[B, KV, L, D]` repeated to one per query head `[B, H, L, D]`.
    fn repeat_kv(&self, t: &Tensor) -> Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(t.clone());
        }
        let (b, kv, l, d) = t.dims4()?;
        Ok(t.unsqueeze(2)?
            .expand((b, kv, rep, l, d))?
            .contiguous()?
            .reshape((b, kv * rep, l, d))?)
    }
}

/// `[L, total]`: 0 where query `start + i` may see key `j` (j ≤ start + i), −∞ elsewhere.
fn causal_mask(l: usize, start: usize, total: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(v, (l, total), device)?)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (w, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: candle_nn::linear_no_bias(w, i, vb.pp("gate_proj"))?,
            up: candle_nn::linear_no_bias(w, i, vb.pp("up_proj"))?,
            down: candle_nn::linear_no_bias(i, w, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        if fused {
            return Ok(self
                .down
                .forward(&(candle_nn::ops::silu(&g)? * self.up.forward(x)?)?)?);
        }
        // SiLU as g · σ(g) from basic ops, so it differentiates on every device.
        let silu = (&g * (g.neg()?.exp()? + 1.0)?.recip()?)?;
        Ok(self.down.forward(&(silu * self.up.forward(x)?)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// Per layer, the keys and values of the positions decoded so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    /// Positions held.
    pub len: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    fused: bool,
}

impl Llama {
    /// The model of `cfg` with its tensors from `vb` under Hugging Face's names (a `VarBuilder`
    /// over a `VarMap` initialises fresh ones; over safetensors it loads a checkpoint).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let m = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(Block {
                    attn_norm: RmsNorm::new(
                        l.pp("input_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    attn: Attention::new(l.pp("self_attn"), cfg)?,
                    mlp_norm: RmsNorm::new(
                        l.pp("post_attention_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::new(l.pp("mlp"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rotary: Rotary::new(cfg, vb.device())?,
            fused: false,
        })
    }

    /// The same model running candle's fused norm, rotation, softmax and SiLU kernels: faster,
    /// for inference only (they have no backward). A teacher serves with them.
    pub fn for_inference(mut self) -> Self {
        self.fused = true;
        self
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device its tensors are on.
    pub fn device(&self) -> &Device {
        self.embed.embeddings().device()
    }

    /// Logits at every position of `tokens` `[B, L]` (u32) → `[B, L, vocab]`, each from the
    /// positions up to it.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.run(tokens, 0, None)
    }

    /// Logits of `tokens` `[B, L]` following the positions in `cache`, which they are appended
    /// to → `[B, L, vocab]`.
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            cache.layers = vec![(None, None); self.blocks.len()];
            cache.len = 0;
        }
        let start = cache.len;
        let out = self.run(tokens, start, Some(&mut cache.layers))?;
        cache.len += tokens.dim(1)?;
        Ok(out)
    }

    fn run(
        &self,
        tokens: &Tensor,
        start: usize,
        mut cache: Option<&mut Vec<(Option<Tensor>, Option<Tensor>)>>,
    ) -> Result<Tensor> {
        let (_, l) = tokens.dims2()?;
        let end = start.saturating_add(l);
        if end > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "positions up to {end} in a model of {} (max_position_embeddings)",
                self.cfg.max_position_embeddings
            )));
        }
        let mut h = self.embed.forward(tokens)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.get_mut(i));
            let f = self.fused;
            let a = b.attn.forward(
                &b.attn_norm.forward(&h, f)?,
                start,
                &self.rotary,
                layer_cache,
                f,
            )?;
            h = (h + a)?;
            let m = b.mlp.forward(&b.mlp_norm.forward(&h, f)?, f)?;
            h = (h + m)?;
        }
        Ok(self.lm_head.forward(&self.norm.forward(&h, self.fused)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{Optimizer, VarMap};

    fn tiny() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 37, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "max_position_embeddings": 64, "tie_word_embeddings": true,
                "torch_dtype": "float32"}"#,
            "tiny config.json",
        )
        .unwrap()
    }

    fn model(cfg: &LlamaConfig) -> (VarMap, Llama) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let m = Llama::new(cfg, vb).unwrap();
        (vm, m)
    }

    fn tokens(b: usize, l: usize) -> Tensor {
        let v: Vec<u32> = (0..b * l).map(|i| ((i * 7 + 3) % 37) as u32).collect();
        Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
    }

    use crate::testutil::max_diff;

    #[test]
    fn the_all_positions_forward_equals_decoding_one_token_at_a_time() {
        let cfg = tiny();
        let (_, m) = model(&cfg);
        let t = tokens(2, 9);
        let all = m.forward(&t).unwrap();
        assert_eq!(all.dims(), &[2, 9, 37]);
        let mut cache = KvCache::default();
        let mut steps = Vec::new();
        for p in 0..9 {
            steps.push(
                m.forward_cached(&t.narrow(1, p, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&steps, 1).unwrap();
        let d = max_diff(&all, &stepped);
        assert!(d < 1e-5, "decoding differs by {d}");
        // A chunk of several positions after a cached prefix agrees too.
        let mut cache = KvCache::default();
        let a = m
            .forward_cached(&t.narrow(1, 0, 4).unwrap(), &mut cache)
            .unwrap();
        let b = m
            .forward_cached(&t.narrow(1, 4, 5).unwrap(), &mut cache)
            .unwrap();
        assert!(max_diff(&all, &Tensor::cat(&[a, b], 1).unwrap()) < 1e-5);
        // A position sees nothing after it: changing the last token leaves the others alone.
        let mut v = t.to_vec2::<u32>().unwrap();
        v[0][8] = (v[0][8] + 1) % 37;
        let changed = m.forward(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        assert!(
            max_diff(
                &all.narrow(1, 0, 8).unwrap(),
                &changed.narrow(1, 0, 8).unwrap()
            ) < 1e-6
        );
        assert!(max_diff(&all, &changed) > 1e-4);
    }

    #[test]
    fn the_basic_op_norm_rotation_and_softmax_match_candles_fused_ones() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        let norm = RmsNorm {
            weight: w.clone(),
            eps: 1e-5,
        };
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&norm.forward(&x, false).unwrap(), &fused) < 1e-5);
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_diff(&softmax_last(&x).unwrap(), &fused) < 1e-6);
        let cfg = LlamaConfig {
            hidden_size: 24,
            num_attention_heads: 3,
            ..tiny()
        };
        let rot = Rotary::new(&cfg, &Device::Cpu).unwrap();
        let (cos, sin) = (
            rot.cos.narrow(0, 2, 5).unwrap(),
            rot.sin.narrow(0, 2, 5).unwrap(),
        );
        let fused = candle_nn::rotary_emb::rope(&x.contiguous().unwrap(), &cos, &sin).unwrap();
        assert!(max_diff(&rot.apply(&x, 2, false).unwrap(), &fused) < 1e-5);
    }

    #[test]
    fn next_token_training_lowers_the_loss_and_names_follow_hugging_face() {
        let cfg = LlamaConfig {
            tie_word_embeddings: false,
            ..tiny()
        };
        let (vm, m) = model(&cfg);
        let names: std::collections::BTreeSet<String> =
            vm.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(names.contains(n), "{n} not in {names:?}");
        }
        assert_eq!(names.len(), 1 + 2 * 9 + 1 + 1);
        let t = tokens(4, 12);
        let (x, y) = (t.narrow(1, 0, 11).unwrap(), t.narrow(1, 1, 11).unwrap());
        let loss = |m: &Llama| {
            let logits = m.forward(&x).unwrap().reshape((44, 37)).unwrap();
            candle_nn::loss::cross_entropy(&logits, &y.flatten_all().unwrap()).unwrap()
        };
        let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2).unwrap();
        let first = loss(&m).to_scalar::<f32>().unwrap();
        for _ in 0..30 {
            opt.backward_step(&loss(&m)).unwrap();
        }
        let last = loss(&m).to_scalar::<f32>().unwrap();
        assert!(last < first * 0.5, "loss {first} → {last}");
    }

    #[test]
    fn the_inference_forward_with_fused_kernels_equals_the_trainable_one() {
        let cfg = tiny();
        let (_vm, m) = model(&cfg);
        let a = m.forward(&tokens(2, 9)).unwrap();
        let b = m.clone().for_inference().forward(&tokens(2, 9)).unwrap();
        assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
    }

    #[test]
    fn a_bad_config_is_refused_with_its_origin() {
        let e = LlamaConfig::from_json(r#"{"vocab_size": 10}"#, "x/config.json").unwrap_err();
        assert!(e.to_string().contains("x/config.json"), "{e}");
        let mut c = tiny();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().contains("multiple"));
        let (_, m) = model(&tiny());
        let e = m.forward(&tokens(1, 65)).unwrap_err();
        assert!(e.to_string().contains("max_position_embeddings"), "{e}");
    }
}
