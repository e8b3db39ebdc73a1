//! `distill lm-eval`: a language model's perplexity on a text file, scored every position of
//! fixed-length windows in one all-positions pass each, with its tokenizer's round trip and
//! the forward's tokens/s.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use distill_core::lm::LanguageModel;

/// Flags of `distill lm-eval`.
#[derive(clap::Args, Debug)]
pub struct LmEvalArgs {
    /// The model: a llama-family `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens to score (from the start of the text, or its end with `--tail`).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Score the text's last `--tokens` tokens (where a run's validation windows are).
    #[arg(long)]
    pub tail: bool,
    /// Tokens per window (each scored from its own start).
    #[arg(long, default_value_t = 256)]
    pub len: usize,
    /// A `tokenizer.json` to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Runs `distill lm-eval`.
pub fn run(a: LmEvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.len >= 1 && a.tokens >= 1,
        "--len and --tokens must be at least 1"
    );
    let started = Instant::now();
    let lm = LanguageModel::load(&a.model, &Device::Cpu)?;
    let loaded = started.elapsed().as_secs_f64();
    let tokenizer = match &a.tokenizer {
        Some(p) => distill_core::tokenizer::from_file(p)?,
        None => lm
            .tokenizer
            .clone()
            .with_context(|| format!("{} has no tokenizer: give --tokenizer", a.model.display()))?,
    };
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let t0 = Instant::now();
    let ids = distill_core::tokenizer::encode(&tokenizer, &text)?;
    let encode_secs = t0.elapsed().as_secs_f64();
    let round_trip = distill_core::tokenizer::decode(&tokenizer, &ids)? == text;
    println!(
        "{}: loaded in {loaded:.2} s; tokenizer {} ({}); {} tokens in {} ({:.0} tokens/s), \
         round trip {}",
        lm.model_id(),
        &distill_core::tokenizer::digest(&tokenizer)?[..16],
        if a.tokenizer.is_some() {
            "--tokenizer"
        } else {
            "the model's"
        },
        ids.len(),
        a.text.display(),
        ids.len() as f64 / encode_secs.max(1e-9),
        if round_trip { "exact" } else { "NOT exact" }
    );
    // Windows of len + 1 tokens with stride len: every scored token once.
    let windows = (a.tokens.min(ids.len().saturating_sub(1))) / a.len;
    anyhow::ensure!(
        windows >= 1,
        "{} has {} tokens: fewer than one window of {} + 1",
        a.text.display(),
        ids.len(),
        a.len
    );
    // With --tail the windows end at the text's last token.
    let start = if a.tail {
        ids.len() - (windows * a.len + 1)
    } else {
        0
    };
    let (mut nll, mut scored) = (0f64, 0u64);
    let t0 = Instant::now();
    for w in 0..windows {
        let at = start + w * a.len;
        let win = &ids[at..at + a.len + 1];
        let e = distill_core::lm_train::evaluate(&lm.model, win, 1, None)?;
        nll += e.nll;
        scored += e.tokens;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "perplexity {:.2} over {scored} tokens ({windows} windows of {}); forward {:.0} tokens/s",
        (nll / scored.max(1) as f64).exp(),
        a.len,
        scored as f64 / secs.max(1e-9)
    );
    Ok(())
}
