//! llama-family models from **GGUF** files (llama.cpp's format, as Hugging Face and pip
//! packages ship quantized checkpoints), loaded into [`crate::llama::Llama`].
//!
//! # Choices
//!
//! - **Weights are dequantized to f32 at load.** candle has SIMD dot products for few GGUF
//!   block types (none for Q4_1), so scoring every position of a sequence with the quantized
//!   kernels runs ~12× slower on this project's CPUs than with f32 weights (measured on
//!   SmolLM2-135M: ~42 against ~520 tokens/s). A teacher pays 4 bytes per weight in memory for
//!   it (538 MB for 135M parameters) and gets logits that do not depend on how a sequence is
//!   chunked (quantized matmuls do, by KL ~0.01). A student initialised from a teacher gets
//!   f32 weights it can train.
//! - **Tensors are renamed to Hugging Face's names** (`blk.3.attn_q.weight` →
//!   `model.layers.3.self_attn.q_proj.weight`, …), so one model type serves GGUF, safetensors
//!   and fresh students alike, and a student initialised from a GGUF exports as a Hugging Face
//!   checkpoint.
//! - **Q and K are un-permuted.** llama.cpp's converter permutes the rows of `q_proj` and
//!   `k_proj` within each head so that its interleaved rotation (pairs `(2i, 2i+1)`) equals
//!   Hugging Face's half rotation (pairs `(i, i + d/2)`). [`unpermute_rows`] undoes it, so the
//!   model keeps Hugging Face's rotation and its weights are Hugging Face's.
//! - **The config comes from the metadata** (`llama.block_count`, `llama.embedding_length`, …);
//!   the vocabulary size from the embedding's shape; a missing `output.weight` means tied
//!   embeddings (what small llamas such as SmolLM2 do).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::llama::{Llama, LlamaConfig};
use crate::{Error, Result};

/// A decoder layer's tensors other than Q and K: (Hugging Face name, GGUF name), each with
/// `.weight` after it, under `model.layers.{i}.` and `blk.{i}.`.
const LAYER_TENSORS: [(&str, &str); 7] = [
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// A GGUF file's header, metadata and tensor table (the tensors stay on disk until loaded).
pub struct GgufFile {
    path: std::path::PathBuf,
    content: Content,
}

impl GgufFile {
    /// Reads the header, metadata and tensor table of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut BufReader::new(f))
            .map_err(|e| Error::checkpoint(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The metadata (the tokenizer's vocabulary and merges are here too).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::checkpoint(&self.path, msg)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad(format!("no `{key}` in the metadata")))
    }

    fn usize_of(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map_err(|e| self.bad(format!("`{key}`: {e}")))?;
        usize::try_from(n).map_err(|_| self.bad(format!("`{key}` = {n} is too large")))
    }

    fn f64_of(&self, key: &str, default: f64) -> Result<f64> {
        match self.content.metadata.get(key) {
            None => Ok(default),
            // Stored as f32: read back as the shortest decimal that f32 is (1e-5, not
            // 9.99999974e-6), the value a config.json would have held.
            Some(v) => v
                .to_f32()
                .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
                .or_else(|_| v.to_f64())
                .map_err(|e| self.bad(format!("`{key}`: {e}"))),
        }
    }

    /// The llama config the metadata describes.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self
            .get("general.architecture")?
            .to_string()
            .map_err(|e| self.bad(format!("`general.architecture`: {e}")))?;
        if arch != "llama" {
            return Err(self.bad(format!(
                "architecture `{arch}`: only llama-family models are supported"
            )));
        }
        let embed = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.bad("no tensor `token_embd.weight`"))?;
        let vocab_size = match embed.shape.dims() {
            [v, _] => *v,
            d => return Err(self.bad(format!("token_embd.weight has shape {d:?}"))),
        };
        let heads = self.usize_of("llama.attention.head_count")?;
        let kv_heads = match self.content.metadata.get("llama.attention.head_count_kv") {
            Some(_) => self.usize_of("llama.attention.head_count_kv")?,
            None => heads,
        };
        let positions = match self.content.metadata.get("llama.context_length") {
            Some(_) => self.usize_of("llama.context_length")?,
            None => 2048,
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size: self.usize_of("llama.embedding_length")?,
            intermediate_size: self.usize_of("llama.feed_forward_length")?,
            num_hidden_layers: self.usize_of("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            rms_norm_eps: self.f64_of("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: self.f64_of("llama.rope.freq_base", 10_000.0)?,
            max_position_embeddings: positions,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate().map_err(|e| self.bad(e))?;
        Ok(cfg)
    }

    /// Every tensor of the model dequantized to f32 under its Hugging Face name, Q and K
    /// un-permuted; `layers` keeps only those decoder layers, renumbered from 0 in the order
    /// given (None: all of them).
    pub fn hf_tensors(
        &self,
        cfg: &LlamaConfig,
        layers: Option<&[usize]>,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let all: Vec<usize> = (0..cfg.num_hidden_layers).collect();
        let layers = layers.unwrap_or(&all);
        if let Some(l) = layers.iter().find(|&&l| l >= cfg.num_hidden_layers) {
            return Err(self.bad(format!(
                "layer {l} asked for, of {} layers",
                cfg.num_hidden_layers
            )));
        }
        let f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut reader = BufReader::new(f);
        let mut load = |gguf: &str| -> Result<Tensor> {
            let q = self
                .content
                .tensor(&mut reader, gguf, device)
                .map_err(|e| self.bad(format!("tensor `{gguf}`: {e}")))?;
            Ok(q.dequantize(device)?.to_dtype(DType::F32)?)
        };
        let mut out = HashMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            load("token_embd.weight")?,
        );
        out.insert("model.norm.weight".to_string(), load("output_norm.weight")?);
        if !cfg.tie_word_embeddings {
            out.insert("lm_head.weight".to_string(), load("output.weight")?);
        }
        for (new, &old) in layers.iter().enumerate() {
            let hf = |s: &str| format!("model.layers.{new}.{s}.weight");
            let g = |s: &str| format!("blk.{old}.{s}.weight");
            let q = load(&g("attn_q"))?;
            let k = load(&g("attn_k"))?;
            out.insert(
                hf("self_attn.q_proj"),
                unpermute_rows(&q, cfg.num_attention_heads)?,
            );
            out.insert(hf("self_attn.k_proj"), unpermute_rows(&k, cfg.kv_heads())?);
            for (h, gg) in LAYER_TENSORS {
                out.insert(hf(h), load(&g(gg))?);
            }
        }
        Ok(out)
    }

    /// The model, all layers, f32 on `device`.
    pub fn llama(&self, device: &Device) -> Result<Llama> {
        let cfg = self.llama_config()?;
        let tensors = self.hf_tensors(&cfg, None, device)?;
        Llama::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
            .map_err(|e| self.bad(e.to_string()))
    }
}

/// Undoes llama.cpp's per-head row permutation of a `[heads·d, in]` projection: row
/// `h·d + 2i + j` of the file is row `h·d + j·d/2 + i` of Hugging Face's (j ∈ {0, 1}).
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = check_heads(out, heads)?;
    Ok(w.reshape((heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// llama.cpp's permutation of a Hugging Face `[heads·d, in]` projection (the inverse of
/// [`unpermute_rows`]), for writing GGUF files.
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = check_heads(out, heads)?;
    Ok(w.reshape((heads, 2, d / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn check_heads(rows: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Input(format!(
            "{rows} rows do not split into {heads} heads of an even width"
        )));
    }
    Ok(rows / heads)
}

/// Writes `tensors` (Hugging Face names, as [`Llama`] holds them) of `cfg` as a llama GGUF file
/// in `dtype` (F32, F16 or a block type such as Q8_0 where the widths allow), with `metadata`
/// added (a tokenizer's, say): the inverse of [`GgufFile::hf_tensors`].
pub fn write_llama(
    path: &Path,
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: candle_core::quantized::GgmlDType,
    metadata: Vec<(String, Value)>,
) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| Error::Input(format!("no tensor `{name}` to write")))
    };
    let mut named: Vec<(String, Tensor)> = vec![
        (
            "token_embd.weight".into(),
            get("model.embed_tokens.weight")?.clone(),
        ),
        (
            "output_norm.weight".into(),
            get("model.norm.weight")?.clone(),
        ),
    ];
    if !cfg.tie_word_embeddings {
        named.push(("output.weight".into(), get("lm_head.weight")?.clone()));
    }
    for i in 0..cfg.num_hidden_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
        let g = |s: &str| format!("blk.{i}.{s}.weight");
        named.push((
            g("attn_q"),
            permute_rows(get(&hf("self_attn.q_proj"))?, cfg.num_attention_heads)?,
        ));
        named.push((
            g("attn_k"),
            permute_rows(get(&hf("self_attn.k_proj"))?, cfg.kv_heads())?,
        ));
        for (h, gg) in LAYER_TENSORS {
            named.push((g(gg), get(&hf(h))?.clone()));
        }
    }
    let quantized = named
        .iter()
        .map(|(n, t)| {
            // Norm weights are vectors: llama.cpp keeps them in f32 whatever the file's type.
            let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
            Ok((n.clone(), QTensor::quantize(&t.to_dtype(DType::F32)?, d)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let u32v = |n: usize| -> Result<Value> {
        u32::try_from(n)
            .map(Value::U32)
            .map_err(|_| Error::Input(format!("{n} does not fit a GGUF u32")))
    };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u32v(cfg.num_hidden_layers)?),
        ("llama.embedding_length".into(), u32v(cfg.hidden_size)?),
        (
            "llama.feed_forward_length".into(),
            u32v(cfg.intermediate_size)?,
        ),
        (
            "llama.attention.head_count".into(),
            u32v(cfg.num_attention_heads)?,
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(cfg.kv_heads())?,
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.context_length".into(),
            u32v(cfg.max_position_embeddings)?,
        ),
    ];
    md.extend(metadata);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = path.with_extension("gguf.tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)
        .map_err(|e| Error::checkpoint(&tmp, format!("writing GGUF: {e}")))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_diff;
    use candle_core::quantized::GgmlDType;

    fn tiny(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 40,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
        }
    }

    fn fresh(cfg: &LlamaConfig) -> (HashMap<String, Tensor>, Llama) {
        let t = crate::lm::init_tensors(cfg, 9, &Device::Cpu).unwrap();
        let m = Llama::new(
            cfg,
            VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu),
        )
        .unwrap();
        (t, m)
    }

    fn tokens() -> Tensor {
        let v: Vec<u32> = (0..2 * 11).map(|i| ((i * 13 + 5) % 40) as u32).collect();
        Tensor::from_vec(v, (2, 11), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_row_permutation_round_trips_and_moves_rows_as_llama_cpp_does() {
        let w = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 2))
            .unwrap();
        let p = permute_rows(&w, 2).unwrap();
        // Head 0 has rows 0..4 (d = 4): the file interleaves the halves (0, 2, 1, 3).
        let firsts: Vec<f32> = p.get_on_dim(1, 0).unwrap().to_vec1().unwrap();
        assert_eq!(firsts, [0.0, 4.0, 2.0, 6.0, 8.0, 12.0, 10.0, 14.0]);
        let back = unpermute_rows(&p, 2).unwrap();
        assert_eq!(max_diff(&back, &w), 0.0);
        assert!(unpermute_rows(&w, 3).is_err());
    }

    #[test]
    fn a_written_gguf_loads_back_to_the_same_logits_tied_or_not() {
        let dir = tempfile::tempdir().unwrap();
        for tied in [true, false] {
            let cfg = tiny(tied);
            let (tensors, model) = fresh(&cfg);
            let path = dir.path().join(format!("tiny-{tied}.gguf"));
            write_llama(&path, &cfg, &tensors, GgmlDType::F32, vec![]).unwrap();
            let file = GgufFile::open(&path).unwrap();
            assert_eq!(file.llama_config().unwrap(), cfg);
            let loaded = file.llama(&Device::Cpu).unwrap();
            let (a, b) = (
                model.forward(&tokens()).unwrap(),
                loaded.forward(&tokens()).unwrap(),
            );
            assert!(max_diff(&a, &b) < 1e-5, "tied {tied}: {}", max_diff(&a, &b));
        }
    }

    #[test]
    fn a_quantized_gguf_is_dequantized_close_to_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let (tensors, model) = fresh(&cfg);
        let path = dir.path().join("q8.gguf");
        write_llama(&path, &cfg, &tensors, GgmlDType::Q8_0, vec![]).unwrap();
        let loaded = GgufFile::open(&path).unwrap().llama(&Device::Cpu).unwrap();
        let (a, b) = (
            model.forward(&tokens()).unwrap(),
            loaded.forward(&tokens()).unwrap(),
        );
        let (d, scale) = (max_diff(&a, &b), a.abs().unwrap().max_all().unwrap());
        let scale = scale.to_scalar::<f32>().unwrap();
        // 8-bit blocks: close, but not equal (the dequantized weights are what is served).
        assert!(d > 0.0 && d < 0.02 * scale, "{d} of {scale}");
    }

    #[test]
    fn a_layer_subset_initialises_a_shallower_student() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let (tensors, _) = fresh(&cfg);
        let path = dir.path().join("t.gguf");
        write_llama(&path, &cfg, &tensors, GgmlDType::F32, vec![]).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let sub = file.hf_tensors(&cfg, Some(&[0, 2]), &Device::Cpu).unwrap();
        let q = |t: &HashMap<String, Tensor>, i| {
            t[&format!("model.layers.{i}.self_attn.q_proj.weight")].clone()
        };
        assert_eq!(max_diff(&q(&sub, 1), &q(&tensors, 2)), 0.0);
        assert!(!sub.contains_key("model.layers.2.self_attn.q_proj.weight"));
        let student = LlamaConfig {
            num_hidden_layers: 2,
            ..cfg.clone()
        };
        Llama::new(
            &student,
            VarBuilder::from_tensors(sub, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let err = file
            .hf_tensors(&cfg, Some(&[3]), &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("layer 3"), "{err}");
    }

    #[test]
    fn a_truncated_or_foreign_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(true);
        let (tensors, _) = fresh(&cfg);
        let path = dir.path().join("t.gguf");
        write_llama(&path, &cfg, &tensors, GgmlDType::F32, vec![]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = GgufFile::open(&cut)
            .and_then(|f| f.llama(&Device::Cpu))
            .err()
            .unwrap();
        assert!(err.to_string().contains("cut.gguf"), "{err}");
        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a gguf file at all").unwrap();
        let err = GgufFile::open(&junk).err().unwrap();
        assert!(err.to_string().contains("junk.gguf"), "{err}");
    }
}
