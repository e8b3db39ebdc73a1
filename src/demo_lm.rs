//! `distill demo --lm`: token-level distillation of a small language model, end to end on this
//! machine, with nothing to download.
//!
//! 1. A seeded toy language ([`distill_core::data::grammar`]: 218 words, number agreement
//!    across phrases) tokenized word by word and packed into windows of [`SEQ_LEN`] + 1.
//! 2. A teacher llama (2 layers of 64) trained on it with next-token cross-entropy, then
//!    served by a real teacher server on 127.0.0.1 (its tokenizer with it).
//! 3. The coordinator's teacher pool checks the server at start (vocabulary, tokenizer digest,
//!    sequence length) and asks it for the top-[`TOP_K`] rows of every position of every
//!    training batch; the rows are kept per window, so the second epoch asks the teacher
//!    nothing (the soft-target cache's job in a run).
//! 4. Two students (1 layer of 32) from the same initialisation on the same windows: one on
//!    the teacher's rows (alpha [`ALPHA`]), one on the next tokens alone.
//!
//! It prints the three validation perplexities, the students' top-1 agreement with the
//! teacher, bytes per token on the wire and the teacher's and students' tokens/s. What it
//! does not do yet is the run itself — the coordinator's batches and a student worker's LM
//! step (docs/lm.md, "Not yet"): the students train in this process.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use coordinator::config::{MemberConfig, MembershipSettings};
use coordinator::domain::membership::{Membership, SequenceData};
use coordinator::membership::MembershipHandle;
use coordinator::teachers::{TeacherPool, TokenRequest};
use distill_core::data::{grammar, text};
use distill_core::llama::LlamaConfig;
use distill_core::lm::{LanguageModel, init_tensors, save_hf};
use distill_core::lm_train::{LmStudent, TokenObjective, evaluate, top1};
use distill_core::optim::OptimConfig;
use distill_core::token_kd::Divergence;
use distill_core::topk::{self, TopKFormat};
use teacher_server::{ServeOptions, build_sequence_service, serve};
use tokio_util::sync::CancellationToken;

/// Tokens per training sequence.
const SEQ_LEN: usize = 32;
/// Sentences of the toy language.
const SENTENCES: usize = 8000;
/// Windows per update.
const BATCH: usize = 16;
/// Teacher epochs.
const TEACHER_EPOCHS: u64 = 6;
/// Student epochs (those after the first from the kept rows).
const STUDENT_EPOCHS: u64 = 4;
/// Classes kept per position. The language spreads its mass over dozens of equally likely
/// nouns: at k = 16 much of it falls into the tail bucket, about whose split a student learns
/// nothing (core/src/lm_train.rs measures this).
const TOP_K: u32 = 64;
/// Weight of the soft term.
const ALPHA: f64 = 0.9;
/// Learning rate (AdamW) of teacher and students.
const LR: f64 = 3e-3;
/// Training windows the students see (the teacher sees all): distillation pays most where
/// the student's own data are few, as in the paper's 3%-of-the-data experiment.
const STUDENT_WINDOWS: usize = 640;
/// Validation windows scored.
const VALIDATION: usize = 64;

/// The flat `L + 1`-token windows `idx` of `p`.
fn windows(p: &text::Packed, idx: &[usize]) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::with_capacity(idx.len() * (p.seq_len() + 1));
    for &i in idx {
        out.extend_from_slice(p.window(i).context("window out of range")?);
    }
    Ok(out)
}

/// Runs the LM demo with `seed`, writing the three models (Hugging Face directories with the
/// tokenizer: `teacher/`, `baseline-student/`, `student/`) and `lm-report.json` into `out`.
pub fn run(seed: u64, out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let dev = Device::Cpu;
    let words = grammar::vocabulary();
    let tok = distill_core::tokenizer::word_level(&words, grammar::UNK)?;
    let eos = tok
        .token_to_id(grammar::EOS)
        .context("the grammar's tokenizer has no end-of-sequence token")?;
    let vocab = tok.get_vocab_size(true);
    let docs = grammar::corpus(seed, SENTENCES)
        .lines()
        .map(|l| distill_core::tokenizer::encode(&tok, l))
        .collect::<Result<Vec<_>, _>>()?;
    let packed = text::pack(&docs, eos, vocab, SEQ_LEN, 0.1)?;
    let train: Vec<usize> = packed.train_windows().collect();
    let valid: Vec<usize> = packed.validation_windows().take(VALIDATION).collect();
    let valid_w = windows(&packed, &valid)?;
    let student_train = &train[..STUDENT_WINDOWS.min(train.len())];
    println!(
        "distill demo --lm: a toy language of {vocab} words, {} training windows of {SEQ_LEN} \
         tokens (the students see {}), {} validation windows",
        train.len(),
        student_train.len(),
        valid.len()
    );
    let order = |windows: &[usize], epoch: u64| -> Vec<Vec<usize>> {
        text::epoch_order(windows.len(), seed, epoch)
            .chunks(BATCH)
            .filter(|c| c.len() == BATCH)
            .map(|c| c.iter().map(|&i| windows[i]).collect())
            .collect()
    };
    let adam = OptimConfig::adamw(LR, 0.0);
    let hard = TokenObjective {
        temperature: 1.0,
        alpha: 0.0,
        divergence: Divergence::ForwardKl,
    };

    // 1. The teacher.
    let tcfg = LlamaConfig::small(2, 64, vocab);
    let mut teacher = LmStudent::new(
        &tcfg,
        init_tensors(&tcfg, seed + 1, &dev)?,
        adam.clone(),
        &dev,
    )?;
    for epoch in 0..TEACHER_EPOCHS {
        let t0 = Instant::now();
        let mut loss = 0.0;
        let batches = order(&train, epoch);
        for idx in &batches {
            loss += teacher
                .step(&windows(&packed, idx)?, BATCH, None, &hard, LR)?
                .ce;
        }
        println!(
            "teacher epoch {}/{TEACHER_EPOCHS}: cross-entropy {:.3} ({:.1} s)",
            epoch + 1,
            loss / batches.len().max(1) as f32,
            t0.elapsed().as_secs_f64()
        );
    }
    let teacher_top1 = top1(&teacher.model, &valid_w, valid.len())?;
    let teacher_eval = evaluate(&teacher.model, &valid_w, valid.len(), None)?;
    let teacher_tensors = teacher.tensors()?;
    save_hf(&out.join("teacher"), &tcfg, &teacher_tensors, Some(&tok))?;
    let lm = LanguageModel::from_tensors(tcfg, teacher_tensors, Some(tok.clone()), &dev)?;
    let data = SequenceData {
        vocab: vocab as u32,
        tokenizer_digest: lm.tokenizer_digest.clone(),
        seq_len: SEQ_LEN as u32,
    };

    // 2. Serve it, ask it through the coordinator's pool, train the students.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let served = rt.block_on(async {
        let service = build_sequence_service(lm, &ServeOptions::default())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(serve(service, listener, 64 << 20, shutdown.clone()));
        let pool = pool(&url, data)?;
        pool.check_models(SEQ_LEN, vocab).await?;
        println!("teacher served at {url}: vocabulary, tokenizer and sequence length checked");
        anyhow::Ok(pool)
    });
    let pool = served?;
    let scfg = LlamaConfig::small(1, 32, vocab);
    let init = init_tensors(&scfg, seed + 2, &dev)?;
    let mut base = LmStudent::new(&scfg, init.clone(), adam.clone(), &dev)?;
    let mut kd = LmStudent::new(&scfg, init, adam, &dev)?;
    let soft = TokenObjective {
        temperature: 1.0,
        alpha: ALPHA,
        divergence: Divergence::ForwardKl,
    };
    let format = TopKFormat::new(vocab, TOP_K as usize)?;
    let row_bytes = format.bytes_per_sample();
    // Each window's rows as they came, for the epochs after the first.
    let mut kept: HashMap<usize, Vec<u8>> = HashMap::new();
    let (mut asked, mut wire_bytes, mut teacher_secs) = (0u64, 0u64, 0.0f64);
    let (mut base_secs, mut kd_secs, mut positions) = (0.0f64, 0.0f64, 0u64);
    let mut per_epoch = Vec::new();
    for epoch in 0..STUDENT_EPOCHS {
        let t0 = Instant::now();
        let asked_before = asked;
        for idx in order(student_train, epoch) {
            let w = windows(&packed, &idx)?;
            let missing: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|i| !kept.contains_key(i))
                .collect();
            if !missing.is_empty() {
                let inputs: Vec<u32> = missing
                    .iter()
                    .map(|&i| packed.window(i).map(|w| &w[..SEQ_LEN]))
                    .collect::<Option<Vec<_>>>()
                    .context("window out of range")?
                    .concat();
                let req =
                    TokenRequest::new(&inputs, missing.len(), SEQ_LEN, Vec::new(), 1.0, TOP_K)?;
                let t = Instant::now();
                let rows = rt.block_on(pool.infer_tokens(0, &req))?;
                teacher_secs += t.elapsed().as_secs_f64();
                asked += 1;
                wire_bytes += rows.data.len() as u64;
                for (i, r) in missing.iter().zip(rows.data.chunks(SEQ_LEN * row_bytes)) {
                    kept.insert(*i, r.to_vec());
                }
            }
            let mut bytes = Vec::with_capacity(BATCH * SEQ_LEN * row_bytes);
            for i in &idx {
                bytes.extend_from_slice(kept.get(i).context("rows of a window")?);
            }
            let targets = topk::decode(&bytes, BATCH * SEQ_LEN, &format)?;
            let t = Instant::now();
            base.step(&w, BATCH, None, &hard, LR)?;
            base_secs += t.elapsed().as_secs_f64();
            let t = Instant::now();
            kd.step(&w, BATCH, Some(&targets), &soft, LR)?;
            kd_secs += t.elapsed().as_secs_f64();
            positions += (BATCH * SEQ_LEN) as u64;
        }
        let e = evaluate(&kd.model, &valid_w, valid.len(), Some(&teacher_top1))?;
        println!(
            "student epoch {}/{STUDENT_EPOCHS}: distilled perplexity {:.2}, agreement {:.3}; \
             {} teacher requests ({:.1} s)",
            epoch + 1,
            e.perplexity(),
            e.agreement(),
            asked - asked_before,
            t0.elapsed().as_secs_f64()
        );
        per_epoch.push(asked - asked_before);
    }
    shutdown.cancel();
    let eb = evaluate(&base.model, &valid_w, valid.len(), Some(&teacher_top1))?;
    let ek = evaluate(&kd.model, &valid_w, valid.len(), Some(&teacher_top1))?;
    save_hf(&out.join("student"), &scfg, &kd.tensors()?, Some(&tok))?;
    save_hf(
        &out.join("baseline-student"),
        &scfg,
        &base.tensors()?,
        Some(&tok),
    )?;
    let served_tokens = kept.len() * SEQ_LEN;
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
        "wire: {:.0} bytes per token at k = {TOP_K}; teacher {:.0} tokens/s over gRPC; \
         students {:.0} (distilled) and {:.0} (baseline) training tokens/s",
        rate(wire_bytes as f64, served_tokens as f64),
        rate(served_tokens as f64, teacher_secs),
        rate(positions as f64, kd_secs),
        rate(positions as f64, base_secs),
    );
    println!(
        "{asked} teacher requests in all; took {:.0} s",
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
        "bytes_per_token": rate(wire_bytes as f64, served_tokens as f64),
        "teacher_requests": asked,
        "teacher_requests_per_epoch": per_epoch,
        "teacher_tokens_per_sec": rate(served_tokens as f64, teacher_secs),
        "student_tokens_per_sec": rate(positions as f64, kd_secs),
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = out.join("lm-report.json");
    distill_core::fsutil::atomic_write(&path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("models and lm-report.json in {}", out.display());
    Ok(())
}

/// The coordinator's pool over one sequence member `t` at `url`, expecting `data`.
fn pool(url: &str, data: SequenceData) -> anyhow::Result<TeacherPool> {
    let settings = MembershipSettings::default();
    let mut membership = Membership::new(
        settings.to_config(0),
        [("t".to_string(), vec![url.to_string()])],
    )?;
    membership.expect_sequences(data);
    let member = MemberConfig {
        name: "t".into(),
        endpoints: vec![url.to_string()],
        weight: 1.0,
        ..Default::default()
    };
    Ok(TeacherPool::new(
        &[member],
        MembershipHandle::new(membership),
        Duration::from_secs(60),
        64 << 20,
    )?)
}
