//! `distill demo --lm`: token-level distillation of a small language model, end to end on this
//! machine through the same parts as any run, with nothing to download.
//!
//! 1. A seeded toy language ([`distill_core::data::grammar`]: 218 words, number agreement
//!    across phrases) tokenized word by word and packed into windows of [`SEQ_LEN`] + 1.
//! 2. A teacher llama (2 layers of 64) trained on [`TEACHER_SENTENCES`] sentences of it with
//!    next-token cross-entropy, then served by a real teacher server on 127.0.0.1 (its
//!    tokenizer with it).
//! 3. Two runs of the coordinator with an in-process student worker, on `grammar:SEED`'s first
//!    [`RUN_SENTENCES`] sentences (other sentences than the teacher's, so its validation text
//!    is new to the teacher too): the coordinator checks the server at start (vocabulary,
//!    tokenizer digest, sequence length), asks it for the top-[`TOP_K`] rows of every position
//!    of every batch, keeps them in the soft-target cache (so the epochs after the first ask
//!    the teacher nothing) and the worker trains a student llama (1 layer of 32) on them
//!    (alpha [`ALPHA`]); the baseline run trains the same student from the same
//!    initialisation on the same windows with the next tokens alone (alpha 0).
//!
//! It prints the three validation perplexities, the students' top-1 agreement with the
//! teacher, bytes per token on the wire and the teacher's and students' tokens/s, and saves
//! the three models as Hugging Face directories with `lm-report.json`.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use coordinator::config::{LmConfig, RunConfig};
use distill_core::checkpoint::Checkpoint;
use distill_core::data::DataSource;
use distill_core::data::tokens::{TokenOptions, grammar_tokenizer, load_grammar};
use distill_core::llama::{Llama, LlamaConfig};
use distill_core::lm::{LanguageModel, init_tensors, save_hf};
use distill_core::lm_train::{LmEval, LmStudent, TokenObjective, evaluate, top1};
use distill_core::optim::OptimConfig;
use distill_core::token_kd::Divergence;
use teacher_server::{ServeOptions, build_sequence_service, serve};
use tokio_util::sync::CancellationToken;

/// Tokens per training sequence.
const SEQ_LEN: usize = 32;
/// Sentences the teacher is trained on (of another seed than the run's).
const TEACHER_SENTENCES: usize = 8000;
/// Sentences of the run's data: distillation pays most where the student's own data are few,
/// as in the paper's 3%-of-the-data experiment.
const RUN_SENTENCES: usize = 1400;
/// Windows per update.
const BATCH: usize = 16;
/// Teacher epochs.
const TEACHER_EPOCHS: u64 = 4;
/// Student epochs (those after the first from the cache).
const STUDENT_EPOCHS: u32 = 5;
/// Classes kept per position. The language spreads its mass over dozens of equally likely
/// nouns: at k = 16 much of it falls into the tail bucket, about whose split a student learns
/// nothing (core/src/lm_train.rs measures this).
const TOP_K: usize = 64;
/// Weight of the soft term.
const ALPHA: f64 = 0.9;
/// Learning rate (AdamW) of teacher and students.
const LR: f64 = 3e-3;

/// The run config of one student: `grammar:SEED`, the one member `t` at `url`, the cache in
/// `cache` when given.
fn run_config(
    seed: u64,
    dir: &Path,
    url: &str,
    alpha: f64,
    vocab: usize,
    cache: Option<&Path>,
) -> anyhow::Result<RunConfig> {
    let mut cfg = RunConfig::from_toml(&format!(
        r#"
data = "grammar:{seed}"
run_dir = "{dir}"
epochs = {STUDENT_EPOCHS}
batch_size = {BATCH}
seed = {seed}
temperature = 1.0
alpha = {alpha}
soft_targets = "topk:{TOP_K}"
prefetch = 8
[lm]
seq_len = {SEQ_LEN}
sentences = {RUN_SENTENCES}
[student]
arch = "llama:1-32-{vocab}"
[optim]
kind = "adamw"
lr = {LR}
[[members]]
name = "t"
endpoints = ["{url}"]
"#,
        dir = dir.display()
    ))?;
    if let Some(c) = cache {
        cfg.cache = Some(coordinator::cache::CacheConfig {
            dir: c.to_path_buf(),
            mode: Default::default(),
            record: None,
        });
    }
    Ok(cfg)
}

/// Runs the LM demo with `seed`, writing the three models (Hugging Face directories with the
/// tokenizer: `teacher/`, `baseline-student/`, `student/`), the two runs' directories and
/// `lm-report.json` into `out`.
pub fn run(seed: u64, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let dev = Device::Cpu;
    // The runs' directories are the demo's own: a second demo into the same `out` starts them
    // afresh instead of meeting the first one's state (which a run refuses to resume with
    // other settings).
    for d in ["run-distilled", "run-baseline", "cache"] {
        let p = out.join(d);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("clearing {}", p.display()))?;
        }
    }
    let tok = grammar_tokenizer()?;
    let lm = LmConfig {
        seq_len: SEQ_LEN,
        sentences: RUN_SENTENCES,
        ..LmConfig::default()
    };
    // The windows the coordinator will load: their validation tail scores every model here.
    let data = DataSource::Grammar { seed }.load_with(&lm.token_options())?;
    let vocab = data.classes;
    let valid_w = data
        .test
        .rows_tokens(&(0..data.test.len()).collect::<Vec<_>>())
        .context("the validation rows are token windows")?;
    let n_valid = data.test.len();
    let teacher_data = load_grammar(
        seed.wrapping_add(1000),
        &TokenOptions {
            seq_len: SEQ_LEN,
            sentences: TEACHER_SENTENCES,
            validation_fraction: 0.0,
            tokenizer: None,
        },
    )?;
    println!(
        "distill demo --lm: a toy language of {vocab} words; the teacher learns from {} windows \
         of {SEQ_LEN} tokens, the students from {} (other sentences), {n_valid} validation \
         windows",
        teacher_data.train.len(),
        data.train.len(),
    );

    // 1. The teacher.
    let adam = OptimConfig::adamw(LR, 0.0);
    let hard = TokenObjective {
        temperature: 1.0,
        alpha: 0.0,
        divergence: Divergence::ForwardKl,
    };
    let tcfg = LlamaConfig::small(2, 64, vocab);
    let mut teacher = LmStudent::new(&tcfg, init_tensors(&tcfg, seed + 1, &dev)?, adam, &dev)?;
    let n = teacher_data.train.len();
    for epoch in 0..TEACHER_EPOCHS {
        let t0 = Instant::now();
        let (mut loss, mut batches) = (0.0, 0usize);
        let order = distill_core::data::shuffled_indices(n, seed, epoch);
        for idx in order.chunks(BATCH).filter(|c| c.len() == BATCH) {
            let w = teacher_data
                .train
                .rows_tokens(idx)
                .context("the teacher's rows are token windows")?;
            loss += teacher.step(&w, BATCH, None, &hard, LR)?.ce;
            batches += 1;
        }
        println!(
            "teacher epoch {}/{TEACHER_EPOCHS}: cross-entropy {:.3} ({:.1} s)",
            epoch + 1,
            loss / batches.max(1) as f32,
            t0.elapsed().as_secs_f64()
        );
    }
    let teacher_top1 = top1(&teacher.model, &valid_w, n_valid)?;
    let teacher_eval = evaluate(&teacher.model, &valid_w, n_valid, None)?;
    let teacher_tensors = teacher.tensors()?;
    save_hf(&out.join("teacher"), &tcfg, &teacher_tensors, Some(&tok))?;
    let served = LanguageModel::from_tensors(tcfg, teacher_tensors, Some(tok.clone()), &dev)?;

    // 2. Serve it; the two runs through the coordinator and a worker.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let url = rt.block_on(async {
        let service = build_sequence_service(served, &ServeOptions::default())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(serve(service, listener, 64 << 20, shutdown.clone()));
        anyhow::Ok(url)
    })?;
    println!("teacher served at {url}");
    let scfg = LlamaConfig::small(1, 32, vocab);
    let mut results = Vec::new();
    for (name, alpha, model_dir) in [
        ("distilled", ALPHA, "student"),
        ("baseline", 0.0, "baseline-student"),
    ] {
        let dir = out.join(format!("run-{name}"));
        let cache = (alpha > 0.0).then(|| out.join("cache"));
        let cfg = run_config(seed, &dir, &url, alpha, vocab, cache.as_deref())?;
        let bar = crate::demo_cmd::progress(1, &format!("{name} student (alpha {alpha})"));
        bar.set_message("batches");
        let t0 = Instant::now();
        let outcome = rt.block_on(crate::local::serve_with_workers(
            cfg,
            1,
            dir.clone(),
            Some(bar.clone()),
            CancellationToken::new(),
        ))?;
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        let report = outcome.report;
        let ck = Checkpoint::read(&report.student_checkpoint)?;
        let tensors = ck.tensors(&dev)?;
        let student = Llama::new(
            &scfg,
            VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev),
        )?;
        let e = evaluate(&student, &valid_w, n_valid, Some(&teacher_top1))?;
        save_hf(&out.join(model_dir), &scfg, &tensors, Some(&tok))?;
        println!(
            "{name} run: {} batches in {secs:.1} s, teacher asked for {:?} of them per epoch; \
             perplexity {:.2} (the coordinator's scoring: {:.2})",
            report.batches_trained,
            report.teacher_batches_per_epoch,
            e.perplexity(),
            report.student_perplexity.unwrap_or(f64::NAN),
        );
        results.push((e, report, secs));
    }
    shutdown.cancel();
    let [(ek, kd, kd_secs), (eb, _, base_secs)]: [(LmEval, coordinator::RunReport, f64); 2] =
        results
            .try_into()
            .map_err(|_| anyhow::anyhow!("two runs"))?;
    let positions = kd.batches_trained as f64 * (BATCH * SEQ_LEN) as f64;
    let asked: u64 = kd.teacher_batches_per_epoch.iter().sum();
    // The teacher scored the batches it was asked for and, at start, the validation windows.
    let served_tokens = (asked as usize * BATCH + n_valid) as f64 * SEQ_LEN as f64;
    let teacher_secs: f64 = kd.members.iter().map(|m| m.total_latency_secs).sum();
    let bytes_per_token =
        distill_core::topk::TopKFormat::new(vocab, TOP_K)?.bytes_per_sample() as f64;
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };

    println!();
    println!(
        "validation, {} positions (T = 1, k = {TOP_K}, alpha = {ALPHA}, equal tokens)",
        ek.tokens
    );
    println!("{:<44} {:>10} {:>10}", "model", "perplexity", "agreement");
    println!(
        "{:<44} {:>10.2} {:>10}",
        "teacher llama 2x64",
        teacher_eval.perplexity(),
        "-"
    );
    println!(
        "{:<44} {:>10.2} {:>10.3}",
        "baseline student llama 1x32 (next tokens)",
        eb.perplexity(),
        eb.agreement()
    );
    println!(
        "{:<44} {:>10.2} {:>10.3}",
        "distilled student llama 1x32 (teacher top-k)",
        ek.perplexity(),
        ek.agreement()
    );
    println!(
        "distilled / baseline perplexity: {:.3}",
        ek.perplexity() / eb.perplexity().max(f64::MIN_POSITIVE)
    );
    println!(
        "wire: {bytes_per_token:.0} bytes per token at k = {TOP_K}; teacher {:.0} tokens/s over \
         gRPC; runs of {:.0} (distilled) and {:.0} (baseline) training tokens/s",
        rate(served_tokens, teacher_secs),
        rate(positions, kd_secs),
        rate(positions, base_secs),
    );
    println!(
        "{asked} teacher batches in all; took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let report = serde_json::json!({
        "seq_len": SEQ_LEN,
        "top_k": TOP_K,
        "alpha": ALPHA,
        "validation_tokens": ek.tokens,
        "teacher_perplexity": teacher_eval.perplexity(),
        "baseline_perplexity": eb.perplexity(),
        "distilled_perplexity": ek.perplexity(),
        "baseline_agreement": eb.agreement(),
        "distilled_agreement": ek.agreement(),
        "bytes_per_token": bytes_per_token,
        "teacher_requests_per_epoch": kd.teacher_batches_per_epoch,
        "teacher_tokens_per_sec": rate(served_tokens, teacher_secs),
        "student_tokens_per_sec": rate(positions, kd_secs),
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = out.join("lm-report.json");
    distill_core::fsutil::atomic_write(&path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("models, runs and lm-report.json in {}", out.display());
    Ok(())
}
