//! `lm-teacher`: a sequence teacher's tokens/s through the teacher server (gRPC on loopback,
//! top-k rows per position) against the same model's in-process all-positions forward and
//! top-k encoding, at the same sequence length, in one run.
//!
//! The model is `--lm-model` (a GGUF file or a Hugging Face directory) or, by default, random
//! weights of SmolLM2-135M's shape (30 layers of width 576, 9 query / 3 key-value heads, a
//! vocabulary of 49,152): only the speed matters here, and it does not depend on the values.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use distill_core::llama::LlamaConfig;
use distill_core::lm::{LanguageModel, init_tensors};
use distill_core::topk::TopKFormat;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, InferRequest};
use distill_proto::{DType, HostTensor};
use teacher_server::{ServeOptions, build_sequence_service, serve};

/// SmolLM2-135M's config.json fields.
fn smollm2_shape() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49_152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: Some(3),
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<LanguageModel> {
    Ok(match path {
        Some(p) => LanguageModel::load(p, &Device::Cpu)?,
        None => {
            let cfg = smollm2_shape();
            let t = init_tensors(&cfg, 1, &Device::Cpu)?;
            LanguageModel::from_tensors(cfg, t, None, &Device::Cpu)?
        }
    })
}

fn tokens(n: usize, len: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n * len)
        .map(|i| ((i * 7919 + seed * 104_729) % vocab) as u32)
        .collect()
}

/// Runs the section: sequences of `len` tokens, `per_request` per request, top-`k`.
pub async fn run(model: Option<&Path>, len: usize, secs: f64) -> anyhow::Result<()> {
    let k = 32;
    let lm = load(model)?;
    let vocab = lm.model.config().vocab_size;
    println!();
    println!(
        "[lm-teacher] {} ({}): tokens/s scored at every position, sequences of {len}, top-{k} rows",
        lm.model_id(),
        model.map_or("random weights of SmolLM2-135M's shape".into(), |p| p
            .display()
            .to_string()),
    );
    println!(
        "{:>12} {:>14} {:>14} {:>10} {:>14}",
        "seqs/request", "in-process/s", "server/s", "ratio", "bytes/token"
    );
    let format = TopKFormat::new(vocab, k)?;
    let per = [1usize, 2];
    // In-process first, with the model the server is then given (one copy in memory).
    let mut local = Vec::new();
    for &n in &per {
        let lengths = vec![len; n];
        // One warm-up pass, then as many as fit in `secs`.
        lm.score_topk(tokens(n, len, vocab, 0), len, &lengths, 1.0, &format)?;
        let (started, mut done) = (Instant::now(), 0usize);
        while started.elapsed().as_secs_f64() < secs || done == 0 {
            lm.score_topk(tokens(n, len, vocab, done + 1), len, &lengths, 1.0, &format)?;
            done += n * len;
        }
        local.push(done as f64 / started.elapsed().as_secs_f64());
    }
    let opts = ServeOptions {
        max_tokens: 2 * len,
        max_delay: Duration::from_millis(1),
        ..Default::default()
    };
    let service = build_sequence_service(lm, &opts)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve(service, listener, 64 << 20, shutdown.clone()));
    let mut client = TeacherClient::connect(format!("http://{addr}"))
        .await
        .context("connecting to the bench's teacher server")?
        .max_decoding_message_size(64 << 20);
    let request = |n: usize, seed: usize| {
        let bytes: Vec<u8> = tokens(n, len, vocab, seed)
            .iter()
            .flat_map(|&t| i64::from(t).to_le_bytes())
            .collect();
        HostTensor::new(vec![n, len], DType::I64, bytes).map(|t| InferRequest {
            inputs: Some(t.into()),
            temperature: 1.0,
            top_k: k as u32,
            ..Default::default()
        })
    };
    for (i, &n) in per.iter().enumerate() {
        client.infer(request(n, 0)?).await?;
        let (started, mut done, mut bytes) = (Instant::now(), 0usize, 0usize);
        while started.elapsed().as_secs_f64() < secs || done == 0 {
            let r = client.infer(request(n, done + 1)?).await?.into_inner();
            bytes += r.topk.map_or(0, |t: pb::TopKTargets| t.data.len());
            done += n * len;
        }
        let served = done as f64 / started.elapsed().as_secs_f64();
        println!(
            "{n:>12} {:>14.0} {served:>14.0} {:>10.3} {:>14.0}",
            local[i],
            served / local[i],
            bytes as f64 / done as f64
        );
    }
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}

/// `lm-student`: a student's training tokens/s — forward, next-token cross-entropy, backward
/// and an AdamW update — at SmolLM2-135M's width with `layers` of its layers (the shape
/// `scripts/lm-distill.sh` distils), `batch` sequences of `len` tokens per update: the figure
/// `scripts/lm-vs-torch.sh` puts beside PyTorch's for the same shape.
pub fn student(layers: usize, batch: usize, len: usize, secs: f64) -> anyhow::Result<()> {
    use distill_core::lm_train::{LmStudent, TokenObjective};
    let cfg = LlamaConfig {
        num_hidden_layers: layers,
        ..smollm2_shape()
    };
    let vocab = cfg.vocab_size;
    let init = init_tensors(&cfg, 3, &Device::Cpu)?;
    let optim = distill_core::optim::OptimConfig::adamw(1e-4, 0.0);
    let mut s = LmStudent::new(&cfg, init, optim, &Device::Cpu)?;
    let hard = TokenObjective {
        temperature: 1.0,
        alpha: 0.0,
        divergence: distill_core::token_kd::Divergence::ForwardKl,
    };
    let params: usize = cfg
        .param_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!();
    println!(
        "[lm-student] llama {layers}x{} (vocabulary {vocab}, {:.1}M parameters): batches of \
         {batch} x {len} tokens, cross-entropy + AdamW",
        cfg.hidden_size,
        params as f64 / 1e6
    );
    // Windows of len + 1: each update trains `batch × len` positions.
    let windows = |seed: usize| tokens(batch, len + 1, vocab, seed);
    s.step(&windows(0), batch, None, &hard, 1e-4)?;
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs || times.len() < 3 {
        let t = Instant::now();
        s.step(&windows(times.len() + 1), batch, None, &hard, 1e-4)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let rate = (batch * len) as f64 / median;
    println!(
        "{} updates, median {median:.3} s: {rate:.0} training tokens/s",
        times.len()
    );
    println!(
        "RESULT {}",
        serde_json::json!({
            "section": "lm-student",
            "layers": layers,
            "batch": batch,
            "len": len,
            "median_step_secs": median,
            "tokens_per_sec": rate,
            "threads": rayon_threads(),
        })
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
