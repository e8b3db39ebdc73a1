//! Language models as teachers and students: a [`Llama`] with its tokenizer and identity,
//! loaded from a GGUF file or a Hugging Face checkpoint directory, and the teacher's answer
//! for a batch of sequences (the top-k encoding of the tempered next-token distribution at
//! every real position).
//!
//! # Formats
//!
//! - **`FILE.gguf`**: llama-family weights (dequantized to f32, see [`crate::gguf`]) and the
//!   byte-level BPE tokenizer built from the vocabulary and merges in its metadata.
//! - **A Hugging Face directory**: `config.json` ([`LlamaConfig`]), `model.safetensors` under
//!   Hugging Face's tensor names, and `tokenizer.json`. [`save_hf`] writes one, so a distilled
//!   student can be served by a teacher server or loaded by Hugging Face tools.
//!
//! # Identity
//!
//! The weights digest is the SHA-256 of every tensor's name, shape and f32 values in name
//! order (the same scheme as [`crate::checkpoint::Checkpoint::digest`]); the model id is
//! `llama:{layers}x{hidden}-v{vocab}@{16 hex digits}`. The tokenizer digest
//! ([`crate::tokenizer::digest`]) is what teachers and students must agree on.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::gguf::GgufFile;
use crate::llama::{Llama, LlamaConfig};
use crate::topk::TopKFormat;
use crate::{Error, Result};

/// A loaded language model.
pub struct LanguageModel {
    /// The network.
    pub model: Llama,
    /// Its tokenizer (None for a directory without `tokenizer.json`).
    pub tokenizer: Option<Tokenizer>,
    /// SHA-256 of the weights, lowercase hex.
    pub digest: String,
    /// The tokenizer's digest ("" without one).
    pub tokenizer_digest: String,
}

impl LanguageModel {
    /// Loads `path`: a `.gguf` file or a Hugging Face checkpoint directory.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (cfg, tensors, tokenizer) = if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg = LlamaConfig::from_json(&text, &cfg_path.display().to_string())?;
            let weights = path.join("model.safetensors");
            let tensors = candle_core::safetensors::load(&weights, device)
                .map_err(|e| Error::checkpoint(&weights, e.to_string()))?;
            let tok_path = path.join("tokenizer.json");
            let tokenizer = if tok_path.exists() {
                Some(crate::tokenizer::from_file(&tok_path)?)
            } else {
                None
            };
            (cfg, tensors, tokenizer)
        } else {
            let file = GgufFile::open(path)?;
            let cfg = file.llama_config()?;
            let tensors = file.hf_tensors(&cfg, None, device)?;
            let tokenizer = crate::tokenizer::from_gguf_metadata(file.metadata())
                .map_err(|e| Error::checkpoint(path, format!("its tokenizer: {e}")))?;
            (cfg, tensors, Some(tokenizer))
        };
        Self::from_tensors(cfg, tensors, tokenizer, device)
            .map_err(|e| Error::checkpoint(path, e.to_string()))
    }

    /// A model of `cfg` over `tensors` (Hugging Face names).
    pub fn from_tensors(
        cfg: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        tokenizer: Option<Tokenizer>,
        device: &Device,
    ) -> Result<Self> {
        let digest = weights_digest(&tensors)?;
        let tokenizer_digest = match &tokenizer {
            Some(t) => crate::tokenizer::digest(t)?,
            None => String::new(),
        };
        // A loaded model answers; it is not trained: the fused kernels serve faster.
        let model = Llama::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?
            .for_inference();
        Ok(Self {
            model,
            tokenizer,
            digest,
            tokenizer_digest,
        })
    }

    /// `llama:{layers}x{hidden}-v{vocab}`.
    pub fn arch(&self) -> String {
        let c = self.model.config();
        format!(
            "llama:{}x{}-v{}",
            c.num_hidden_layers, c.hidden_size, c.vocab_size
        )
    }

    /// `arch@digest16`.
    pub fn model_id(&self) -> String {
        format!(
            "{}@{}",
            self.arch(),
            &self.digest[..16.min(self.digest.len())]
        )
    }

    /// The teacher's answer for `lengths.len()` sequences of `tokens` (`[N, L]` row-major,
    /// right-padded: sequence i is `tokens[i·L .. i·L + lengths[i]]`): one top-k row of
    /// `format` per real position, sequence by sequence, of the logits divided by `t`.
    pub fn score_topk(
        &self,
        tokens: Vec<u32>,
        len: usize,
        lengths: &[usize],
        t: f32,
        format: &TopKFormat,
    ) -> Result<Vec<u8>> {
        let real: usize = lengths.iter().sum();
        let logits = self.logits(tokens, len, lengths)?;
        encode_tempered(&logits, real, t, format)
    }

    /// The logits at every real position of right-padded `tokens` (see [`Self::score_topk`]),
    /// sequence by sequence: `Σ lengths × vocab` values.
    ///
    /// Right padding needs no attention mask: under the causal mask a real position never
    /// sees the padding after it.
    pub fn logits(&self, tokens: Vec<u32>, len: usize, lengths: &[usize]) -> Result<Vec<f32>> {
        let n = lengths.len();
        let vocab = self.model.config().vocab_size;
        if tokens.len() != n.saturating_mul(len) {
            return Err(Error::Input(format!(
                "{} tokens for {n} sequences of {len}",
                tokens.len()
            )));
        }
        if let Some(i) = lengths.iter().position(|&l| l == 0 || l > len) {
            return Err(Error::Input(format!(
                "sequence {i} has length {}; lengths are 1 to {len}",
                lengths[i]
            )));
        }
        if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token {} at sequence {}, position {} is not below the vocabulary size {vocab}",
                tokens[i],
                i / len.max(1),
                i % len.max(1)
            )));
        }
        let x = Tensor::from_vec(tokens, (n, len), self.model.device())?;
        let all = self.model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?; // [N, L, V]
        if lengths.iter().all(|&l| l == len) {
            return Ok(all);
        }
        let real: usize = lengths.iter().sum();
        let mut rows = Vec::with_capacity(real.saturating_mul(vocab));
        for (i, &l) in lengths.iter().enumerate() {
            let start = i * len * vocab;
            rows.extend_from_slice(&all[start..start + l * vocab]);
        }
        Ok(rows)
    }
}

/// The top-k rows of `rows` logit rows divided by `t`; a logit the model made non-finite, or
/// one that overflows at this `t`, is an error rather than a row on the wire.
pub fn encode_tempered(
    logits: &[f32],
    rows: usize,
    t: f32,
    format: &TopKFormat,
) -> Result<Vec<u8>> {
    let vocab = format.classes;
    if logits.len() != rows.saturating_mul(vocab) {
        return Err(Error::Input(format!(
            "{} logits for {rows} rows of {vocab}",
            logits.len()
        )));
    }
    let tempered: Vec<f32> = logits.iter().map(|z| z / t).collect();
    if let Some(i) = tempered.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "the tempered logit of token {} at position row {} is not finite ({} / {t})",
            i % vocab.max(1),
            i / vocab.max(1),
            logits[i]
        )));
    }
    crate::topk::encode(&tempered, rows, format)
}

/// Fresh seeded parameters of `cfg` under Hugging Face's names: norm weights 1, every other
/// weight uniform with standard deviation 0.02 (Hugging Face's llama initialisation, as a
/// uniform so it is the same on every platform), drawn with ChaCha8 in name order.
pub fn init_tensors(
    cfg: &LlamaConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    // The names and shapes are the model's own: build it once over a throwaway map.
    let vm = candle_nn::VarMap::new();
    Llama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let mut shapes: Vec<(String, Vec<usize>)> = vm
        .data()
        .lock()
        .map_err(|_| Error::Input("the parameter map is poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    shapes.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = 0.02f32 * 3f32.sqrt();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            Ok((name, Tensor::from_vec(v, shape, device)?))
        })
        .collect()
}

/// The config of the model at `path` (a `.gguf` file or a Hugging Face directory) with only
/// `layers` of its decoder layers (all when None): what a student initialised from it is.
/// Reads the metadata only.
pub fn read_config(path: &Path, layers: Option<&[usize]>) -> Result<LlamaConfig> {
    let cfg = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        LlamaConfig::from_json(&text, &cfg_path.display().to_string())?
    } else {
        GgufFile::open(path)?.llama_config()?
    };
    check_layers(path, &cfg, layers)?;
    Ok(LlamaConfig {
        num_hidden_layers: layers.map_or(cfg.num_hidden_layers, <[usize]>::len),
        ..cfg
    })
}

fn check_layers(path: &Path, cfg: &LlamaConfig, layers: Option<&[usize]>) -> Result<()> {
    let Some(layers) = layers else {
        return Ok(());
    };
    if layers.is_empty() {
        return Err(Error::checkpoint(path, "an empty layer subset"));
    }
    if let Some(l) = layers.iter().find(|&&l| l >= cfg.num_hidden_layers) {
        return Err(Error::checkpoint(
            path,
            format!("layer {l} asked for, of {} layers", cfg.num_hidden_layers),
        ));
    }
    if let Some((i, l)) = layers
        .iter()
        .enumerate()
        .find(|(i, l)| layers[..*i].contains(l))
    {
        return Err(Error::checkpoint(
            path,
            format!("layer {l} is listed twice (again at position {i})"),
        ));
    }
    Ok(())
}

/// The config and f32 tensors (Hugging Face names) of the model at `path`, keeping `layers`
/// (renumbered from 0 in the order given; all when None): a student initialised from a
/// teacher's layers, Minitron-style, or from a checkpoint.
pub fn read_parts(
    path: &Path,
    layers: Option<&[usize]>,
    device: &Device,
) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let cfg = read_config(path, None)?;
    check_layers(path, &cfg, layers)?;
    let tensors = if path.is_dir() {
        let weights = path.join("model.safetensors");
        let all = candle_core::safetensors::load(&weights, device)
            .map_err(|e| Error::checkpoint(&weights, e.to_string()))?;
        match layers {
            Some(l) => layer_subset(all, l),
            None => all,
        }
    } else {
        GgufFile::open(path)?.hf_tensors(&cfg, layers, device)?
    };
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let sub = LlamaConfig {
        num_hidden_layers: layers.map_or(cfg.num_hidden_layers, <[usize]>::len),
        ..cfg
    };
    Ok((sub, tensors))
}

/// Keeps decoder layers `layers` of Hugging Face-named `tensors`, renumbered from 0 in the
/// order given (`model.layers.{old}.` becomes `model.layers.{new}.`); every other tensor stays.
pub fn layer_subset(tensors: HashMap<String, Tensor>, layers: &[usize]) -> HashMap<String, Tensor> {
    const PREFIX: &str = "model.layers.";
    tensors
        .into_iter()
        .filter_map(|(name, t)| {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                return Some((name, t));
            };
            let (old, tail) = rest.split_once('.')?;
            let old: usize = old.parse().ok()?;
            let new = layers.iter().position(|&l| l == old)?;
            Some((format!("{PREFIX}{new}.{tail}"), t))
        })
        .collect()
}

/// SHA-256 of `tensors` (name, shape, f32 values) in name order, lowercase hex.
pub fn weights_digest(tensors: &HashMap<String, Tensor>) -> Result<String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        let t = &tensors[name];
        h.update(name.as_bytes());
        h.update([0u8]);
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a Hugging Face checkpoint directory: `config.json`, `model.safetensors` and, when
/// given, `tokenizer.json`.
pub fn save_hf(
    dir: &Path,
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let mut json =
        serde_json::to_value(cfg).map_err(|e| Error::Config(format!("the llama config: {e}")))?;
    if let Some(o) = json.as_object_mut() {
        o.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        o.insert("model_type".into(), serde_json::json!("llama"));
        o.insert("torch_dtype".into(), serde_json::json!("float32"));
    }
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::Config(format!("the llama config: {e}")))?;
    crate::fsutil::atomic_write(&cfg_path, text.as_bytes())?;
    let weights = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    if let Some(t) = tokenizer {
        let tok_path = dir.join("tokenizer.json");
        let text = t
            .to_string(true)
            .map_err(|e| Error::Config(format!("the tokenizer: {e}")))?;
        crate::fsutil::atomic_write(&tok_path, text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        }
    }

    fn fresh(cfg: &LlamaConfig) -> HashMap<String, Tensor> {
        let vm = VarMap::new();
        Llama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        vm.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    #[test]
    fn top_k_rows_per_position_decode_to_the_models_tempered_distribution() {
        let cfg = tiny();
        let lm = LanguageModel::from_tensors(cfg.clone(), fresh(&cfg), None, &Device::Cpu).unwrap();
        // Two sequences of up to 6 tokens; the second has 4 real ones and 2 of padding.
        let tokens: Vec<u32> = vec![3, 9, 27, 31, 8, 1, 5, 44, 12, 2, 0, 0];
        let lengths = [6, 4];
        let t = 2.0;
        let k = 8;
        let fmt = TopKFormat::new(50, k).unwrap();
        let bytes = lm.score_topk(tokens.clone(), 6, &lengths, t, &fmt).unwrap();
        assert_eq!(bytes.len(), 10 * fmt.bytes_per_sample());
        let decoded = crate::topk::decode_dense(&bytes, 10, &fmt).unwrap();
        // The reference: each sequence alone, at its real length, dense softmax(z / T).
        let mut row = 0;
        for (i, &l) in lengths.iter().enumerate() {
            let x =
                Tensor::from_vec(tokens[i * 6..i * 6 + l].to_vec(), (1, l), &Device::Cpu).unwrap();
            let z: Vec<f32> = lm
                .model
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for j in 0..l {
                let zr = &z[j * 50..(j + 1) * 50];
                let m = zr.iter().fold(f32::MIN, |a, &b| a.max(b / t));
                let e: Vec<f32> = zr.iter().map(|v| (v / t - m).exp()).collect();
                let s: f32 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|v| v / s).collect();
                let mut order: Vec<usize> = (0..50).collect();
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                let got = &decoded[row * 50..(row + 1) * 50];
                // The kept classes carry their probability (f16 values), the rest its mean.
                for &c in &order[..k] {
                    assert!((got[c] - p[c]).abs() < 2e-3 * p[c].max(1e-3), "{row} {c}");
                }
                let rest: f32 = order[k..].iter().map(|&c| p[c]).sum();
                for &c in &order[k..] {
                    assert!((got[c] - rest / 42.0).abs() < 1e-4, "{row} {c}");
                }
                row += 1;
            }
        }
    }

    #[test]
    fn a_hugging_face_directory_round_trips_weights_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LlamaConfig {
            tie_word_embeddings: false,
            ..tiny()
        };
        let tensors = fresh(&cfg);
        save_hf(dir.path(), &cfg, &tensors, None).unwrap();
        let a = LanguageModel::from_tensors(cfg.clone(), tensors, None, &Device::Cpu).unwrap();
        let b = LanguageModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.model_id(), b.model_id());
        assert!(
            a.model_id().starts_with("llama:2x32-v50@"),
            "{}",
            a.model_id()
        );
        let other =
            LanguageModel::from_tensors(cfg.clone(), fresh(&cfg), None, &Device::Cpu).unwrap();
        assert_ne!(other.digest, a.digest);
        let err = LanguageModel::load(&dir.path().join("missing"), &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
