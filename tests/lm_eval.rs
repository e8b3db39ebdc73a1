//! `distill lm-eval` as a user runs it: a tiny llama written as a Hugging Face directory (with a
//! word-level tokenizer of the toy grammar), scored on a text file; bad input is a clear error.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use candle_core::Device;
use distill_core::data::grammar;
use distill_core::llama::LlamaConfig;
use distill_core::lm::{init_tensors, save_hf};

#[test]
fn lm_eval_prints_the_perplexity_and_the_tokenizers_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let words = grammar::vocabulary();
    let tok = distill_core::tokenizer::word_level(&words, grammar::UNK).unwrap();
    let cfg = LlamaConfig {
        vocab_size: tok.get_vocab_size(true),
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
    };
    let model = d.join("model");
    save_hf(
        &model,
        &cfg,
        &init_tensors(&cfg, 1, &Device::Cpu).unwrap(),
        Some(&tok),
    )
    .unwrap();
    // One line: a word-level tokenizer joins words with single spaces, so it round-trips.
    let text = d.join("text.txt");
    let corpus = grammar::corpus(3, 40).replace('\n', " ");
    std::fs::write(&text, corpus.trim_end()).unwrap();
    let out = common::distill()
        .args(["lm-eval", "--model"])
        .arg(&model)
        .arg("--text")
        .arg(&text)
        .args(["--tokens", "64", "--len", "16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("round trip exact"), "{stdout}");
    let ppl: f64 = stdout
        .split("perplexity ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a perplexity");
    // Near-uniform random weights over 218 words: the perplexity is about the vocabulary.
    assert!(ppl > 150.0 && ppl < 300.0, "{ppl}");
    assert!(stdout.contains("64 tokens (4 windows of 16)"), "{stdout}");

    let missing = common::distill()
        .args(["lm-eval", "--model"])
        .arg(d.join("nowhere"))
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("nowhere"), "{err}");
}
