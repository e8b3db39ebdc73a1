//! Sequence members through the coordinator's teacher pool: a tiny llama with a word-level
//! tokenizer served by a real teacher server on 127.0.0.1:0, checked at start against the
//! run's token data (vocabulary, tokenizer digest, sequence length) and asked for top-k rows
//! per position (`TeacherPool::infer_tokens`), which must decode to what the model computes
//! in-process. A teacher with another tokenizer, or a classifier, is refused at start with a
//! message that says why.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use candle_core::Device;
use coordinator::config::{MemberConfig, MembershipSettings};
use coordinator::domain::membership::{Membership, SequenceData};
use coordinator::membership::MembershipHandle;
use coordinator::teachers::{TeacherPool, TokenRequest};
use distill_core::llama::LlamaConfig;
use distill_core::lm::{LanguageModel, init_tensors};
use distill_core::tokenizer;
use distill_core::topk::{self, TopKFormat};
use tokio_util::sync::CancellationToken;

const LEN: usize = 12;
const K: u32 = 8;

fn words() -> Vec<&'static str> {
    distill_core::data::grammar::vocabulary()
}

fn cfg(vocab: usize) -> LlamaConfig {
    LlamaConfig::small(2, 32, vocab)
}

/// A model over the grammar's words, in `order` (another order: another tokenizer of the same
/// vocabulary size).
fn model(order: &[&str]) -> LanguageModel {
    let tok = tokenizer::word_level(order, "<unk>").unwrap();
    let c = cfg(order.len());
    let tensors = init_tensors(&c, 5, &Device::Cpu).unwrap();
    LanguageModel::from_tensors(c, tensors, Some(tok), &Device::Cpu).unwrap()
}

/// Serves `lm` in-process; returns its URL.
async fn start(lm: LanguageModel, shutdown: &CancellationToken) -> String {
    distill_testkit::serve_sequence_teacher(lm, shutdown).await
}

/// A pool with one member `t` at `endpoint`, expecting the token data of `data`.
fn pool(endpoint: &str, data: SequenceData) -> TeacherPool {
    let settings = MembershipSettings {
        hedge: false,
        ..Default::default()
    };
    let mut membership = Membership::new(
        settings.to_config(1),
        [("t".to_string(), vec![endpoint.to_string()])],
    )
    .unwrap();
    membership.expect_sequences(data);
    let member = MemberConfig {
        name: "t".into(),
        endpoints: vec![endpoint.to_string()],
        weight: 1.0,
        ..Default::default()
    };
    TeacherPool::new(
        &[member],
        MembershipHandle::new(membership),
        Duration::from_secs(30),
        64 << 20,
    )
    .unwrap()
}

fn data_of(lm: &LanguageModel) -> SequenceData {
    SequenceData {
        vocab: lm.model.config().vocab_size as u32,
        tokenizer_digest: lm.tokenizer_digest.clone(),
        seq_len: LEN as u32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_member_is_checked_at_start_and_answers_top_k_rows_per_position() {
    let shutdown = CancellationToken::new();
    let order = words();
    let url = start(model(&order), &shutdown).await;
    // The same model in-process (same seed, same tokenizer): the reference.
    let lm = model(&order);
    let pool = pool(&url, data_of(&lm));
    let digests = pool.check_models(LEN, order.len()).await.unwrap();
    assert_eq!(digests, vec![Some(lm.digest.clone())]);

    // Three sequences of the grammar, the last one right-padded after 5 tokens.
    let text = distill_core::data::grammar::corpus(3, 40);
    let tok = lm.tokenizer.as_ref().unwrap();
    let ids = tokenizer::encode(tok, &text).unwrap();
    assert!(ids.len() >= 3 * LEN, "{} tokens", ids.len());
    let mut batch: Vec<u32> = ids[..3 * LEN].to_vec();
    batch[2 * LEN + 5..].iter_mut().for_each(|v| *v = 0);
    let lengths = [LEN, LEN, 5];
    let req = TokenRequest::new(
        &batch,
        3,
        LEN,
        lengths.iter().map(|&l| l as u32).collect(),
        2.0,
        K,
    )
    .unwrap();
    let rows = LEN + LEN + 5;
    assert_eq!(req.positions(), rows);
    let got = pool.infer_tokens(0, &req).await.unwrap();
    assert_eq!((got.k, got.classes as usize), (K, order.len()));
    let format = TopKFormat::new(order.len(), K as usize).unwrap();
    let got = topk::decode_dense(&got.data, rows, &format).unwrap();
    let want = lm
        .score_topk(batch.clone(), LEN, &lengths, 2.0, &format)
        .unwrap();
    let want = topk::decode_dense(&want, rows, &format).unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 2e-3, "served and in-process rows differ by {worst}");
    assert_eq!(pool.stats()[0].requests, 1);

    // A request the teacher refuses (k above the vocabulary) is an error naming the member,
    // and the teacher keeps serving.
    let bad = TokenRequest::new(&batch, 3, LEN, Vec::new(), 1.0, 10_000).unwrap();
    let e = pool.infer_tokens(0, &bad).await.unwrap_err().to_string();
    assert!(e.contains("`t`") && e.contains("top_k"), "{e}");
    pool.infer_tokens(0, &req).await.unwrap();
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_with_another_tokenizer_or_a_classifier_is_refused_at_start() {
    let shutdown = CancellationToken::new();
    let order = words();
    let data = data_of(&model(&order));
    // The same words in another order: the same vocabulary size, another tokenizer.
    let mut other = order.clone();
    other.swap(2, 3);
    let url = start(model(&other), &shutdown).await;
    let e = pool(&url, data.clone())
        .check_models(LEN, order.len())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("share one tokenizer") && e.contains("`t`"),
        "{e}"
    );

    // A classifier where token sequences are trained.
    let mut procs = common::Procs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let classifier = tokio::task::spawn_blocking({
        let d = dir.path().to_path_buf();
        move || {
            let url = common::trained_teacher(&mut procs, &d);
            (url, procs)
        }
    })
    .await
    .unwrap();
    let e = pool(&classifier.0, data)
        .check_models(LEN, order.len())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("serves a classifier"), "{e}");
    shutdown.cancel();
}
