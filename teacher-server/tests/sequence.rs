//! A sequence teacher (a tiny llama written by the test as a Hugging Face directory and as a
//! GGUF file), served in-process on 127.0.0.1:0 and called over gRPC: top-k rows per position
//! that decode to the model's own tempered distribution, padding, coalescing, and precise
//! errors that leave it serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use candle_core::{Device, Tensor};
use distill_core::llama::LlamaConfig;
use distill_core::lm::{LanguageModel, init_tensors, save_hf};
use distill_core::topk::{self, TopKFormat};
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, InferRequest};
use distill_proto::{DType, HostTensor};
use distill_testkit::Deadline;
use teacher_server::{ServeOptions, build_sequence_service, serve};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const MAX_MSG: usize = 64 << 20;
const VOCAB: usize = 61;

fn cfg() -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
    }
}

/// The tiny model as a Hugging Face directory, and the same loaded in-process.
fn model(dir: &std::path::Path) -> LanguageModel {
    let c = cfg();
    let tensors = init_tensors(&c, 3, &Device::Cpu).unwrap();
    save_hf(dir, &c, &tensors, None).unwrap();
    LanguageModel::load(dir, &Device::Cpu).unwrap()
}

async fn start(
    lm: LanguageModel,
    opts: ServeOptions,
) -> (
    TeacherClient<Channel>,
    CancellationToken,
    teacher_server::TeacherService,
) {
    let service = build_sequence_service(lm, &opts).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").deadline().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(service.clone(), listener, MAX_MSG, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .deadline()
        .await
        .unwrap();
    (TeacherClient::new(channel), shutdown, service)
}

fn tokens(n: usize, l: usize, seed: usize) -> Vec<i64> {
    (0..n * l)
        .map(|i| ((i * 17 + seed * 5 + 1) % VOCAB) as i64)
        .collect()
}

fn request(
    id: u64,
    toks: &[i64],
    n: usize,
    l: usize,
    lengths: &[u32],
    k: u32,
    t: f32,
) -> InferRequest {
    let bytes: Vec<u8> = toks.iter().flat_map(|v| v.to_le_bytes()).collect();
    InferRequest {
        request_id: id,
        inputs: Some(
            HostTensor::new(vec![n, l], DType::I64, bytes)
                .unwrap()
                .into(),
        ),
        temperature: t,
        top_k: k,
        lengths: lengths.to_vec(),
        ..Default::default()
    }
}

/// The decoded distribution of every real position of one reply.
fn decoded(r: &pb::InferResponse, rows: usize, k: usize) -> Vec<f32> {
    let t = r.topk.as_ref().expect("top-k rows");
    assert_eq!((t.k as usize, t.classes as usize), (k, VOCAB));
    topk::decode_dense(&t.data, rows, &TopKFormat::new(VOCAB, k).unwrap()).unwrap()
}

/// softmax(z / t) at every position of one unpadded sequence, in-process.
fn reference(lm: &LanguageModel, toks: &[i64], t: f32) -> Vec<Vec<f32>> {
    let ids: Vec<u32> = toks.iter().map(|&v| v as u32).collect();
    let x = Tensor::from_vec(ids, (1, toks.len()), &Device::Cpu).unwrap();
    let z: Vec<f32> = lm
        .model
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    z.chunks(VOCAB)
        .map(|row| {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b / t));
            let e: Vec<f32> = row.iter().map(|v| (v / t - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        })
        .collect()
}

/// Largest |decoded − reference| over the k classes the reference ranks highest.
fn kept_error(got: &[f32], want: &[f32], k: usize) -> f32 {
    let mut order: Vec<usize> = (0..VOCAB).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    order[..k]
        .iter()
        .map(|&c| (got[c] - want[c]).abs())
        .fold(0.0, f32::max)
}

#[tokio::test]
async fn every_position_is_answered_in_top_k_and_decodes_to_the_models_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let lm = model(dir.path());
    let local = LanguageModel::load(dir.path(), &Device::Cpu).unwrap();
    let (mut c, _stop, _svc) = start(lm, ServeOptions::default()).await;
    let d = c
        .describe(pb::DescribeRequest {})
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.num_classes as usize, VOCAB);
    assert_eq!(d.model_id, local.model_id());
    assert_eq!(d.max_sequence_length, 32);
    assert_eq!(d.input_dtypes, vec![pb::DType::DtypeI64 as i32]);

    // Three sequences padded to 9: lengths 9, 5 and 1. Padding holds junk ids that must not
    // matter (they are not even ids of the vocabulary).
    let (n, l, k, t) = (3, 9, 12, 2.5f32);
    let mut toks = tokens(n, l, 1);
    for p in [9 + 5, 9 + 8, 18 + 1, 18 + 7] {
        toks[p] = 10_000;
    }
    let lengths = [9u32, 5, 1];
    let r = c
        .infer(request(4, &toks, n, l, &lengths, k as u32, t))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.request_id, 4);
    assert!(r.logits.is_none());
    let got = decoded(&r, 15, k);
    let mut row = 0;
    for (i, &len) in lengths.iter().enumerate() {
        let want = reference(&local, &toks[i * l..i * l + len as usize], t);
        for w in want {
            let g = &got[row * VOCAB..(row + 1) * VOCAB];
            let e = kept_error(g, &w, k);
            assert!(e < 2e-3, "sequence {i}, row {row}: {e}");
            row += 1;
        }
    }
    assert_eq!(row, 15);
    // 4 + k·(2 + 2) bytes per position.
    assert_eq!(r.topk.unwrap().data.len(), 15 * (4 + 4 * k));
}

#[tokio::test]
async fn concurrent_requests_share_forward_passes_and_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let lm = model(dir.path());
    let local = LanguageModel::load(dir.path(), &Device::Cpu).unwrap();
    let opts = ServeOptions {
        max_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let (c, _stop, svc) = start(lm, opts).await;
    let mut calls = Vec::new();
    for i in 0..6usize {
        let mut c = c.clone();
        let (l, k, t) = (4 + i, 4 + i as u32, 1.0 + i as f32);
        let toks = tokens(2, l, i);
        calls.push(tokio::spawn(async move {
            let r = c
                .infer(request(i as u64, &toks, 2, l, &[], k, t))
                .deadline()
                .await
                .unwrap()
                .into_inner();
            (toks, l, k as usize, t, r)
        }));
    }
    for call in calls {
        let (toks, l, k, t, r) = call.await.unwrap();
        let got = decoded(&r, 2 * l, k);
        for s in 0..2 {
            for (j, w) in reference(&local, &toks[s * l..(s + 1) * l], t)
                .iter()
                .enumerate()
            {
                let row = s * l + j;
                let e = kept_error(&got[row * VOCAB..(row + 1) * VOCAB], w, k);
                assert!(e < 2e-3, "T {t}, row {row}: {e}");
            }
        }
    }
    let stats = svc.stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert!(batches < 6, "{batches} forward passes for 6 requests");
    assert_eq!(
        stats.rows.load(std::sync::atomic::Ordering::Relaxed),
        (0..6u64).map(|i| 2 * (4 + i)).sum::<u64>()
    );
}

#[tokio::test]
async fn malformed_sequence_requests_get_invalid_argument_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let lm = model(dir.path());
    let opts = ServeOptions {
        max_tokens: 64,
        ..Default::default()
    };
    let (mut c, _stop, _svc) = start(lm, opts).await;
    let ok = tokens(2, 4, 0);
    let f32_inputs = InferRequest {
        inputs: Some(HostTensor::from_f32(vec![2, 4], &[0.0; 8]).unwrap().into()),
        top_k: 4,
        temperature: 1.0,
        ..Default::default()
    };
    let mut bad_token = ok.clone();
    bad_token[5] = VOCAB as i64;
    let mut negative = ok.clone();
    negative[0] = -1;
    let cases: Vec<(InferRequest, &str)> = vec![
        (request(1, &ok, 2, 4, &[], 0, 1.0), "top_k 0"),
        (request(2, &ok, 2, 4, &[], VOCAB as u32 + 1, 1.0), "top_k"),
        (request(3, &ok, 2, 4, &[], 4, 0.0), "temperature"),
        (
            request(4, &ok, 2, 4, &[4], 4, 1.0),
            "1 lengths for 2 sequences",
        ),
        (request(5, &ok, 2, 4, &[4, 5], 4, 1.0), "length 5"),
        (request(6, &ok, 2, 4, &[0, 4], 4, 1.0), "length 0"),
        (
            request(7, &bad_token, 2, 4, &[], 4, 1.0),
            "sequence 1, position 1",
        ),
        (request(8, &negative, 2, 4, &[], 4, 1.0), "token -1"),
        (
            request(9, &tokens(3, 32, 0), 3, 32, &[], 4, 1.0),
            "at most 64",
        ),
        (
            request(10, &tokens(1, 33, 0), 1, 33, &[], 4, 1.0),
            "1 to 32 tokens",
        ),
        (f32_inputs, "dtype I64"),
    ];
    for (req, want) in cases {
        let e = c.infer(req).deadline().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{want}: {e}");
        assert!(
            e.message().contains(want),
            "want `{want}` in: {}",
            e.message()
        );
    }
    let r = c
        .infer(request(11, &ok, 2, 4, &[], 4, 1.0))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.topk.unwrap().data.len(), 8 * (4 + 4 * 4));
}

#[tokio::test]
async fn a_gguf_teacher_answers_as_its_hugging_face_twin() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg();
    let tensors = init_tensors(&c, 3, &Device::Cpu).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    distill_core::gguf::write_llama(
        &gguf,
        &c,
        &tensors,
        candle_core::quantized::GgmlDType::F32,
        tiny_tokenizer_metadata(),
    )
    .unwrap();
    let hf = LanguageModel::from_tensors(c, tensors, None, &Device::Cpu).unwrap();
    let lm = LanguageModel::load(&gguf, &Device::Cpu).unwrap();
    assert_eq!(
        lm.digest, hf.digest,
        "the same weights after the round trip"
    );
    assert!(!lm.tokenizer_digest.is_empty());
    let digest = lm.tokenizer_digest.clone();
    let (mut client, _stop, _svc) = start(lm, ServeOptions::default()).await;
    let d = client
        .describe(pb::DescribeRequest {})
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.tokenizer_digest, digest);
    let toks = tokens(1, 7, 2);
    let r = client
        .infer(request(1, &toks, 1, 7, &[], 8, 1.0))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    let got = decoded(&r, 7, 8);
    for (j, w) in reference(&hf, &toks, 1.0).iter().enumerate() {
        assert!(kept_error(&got[j * VOCAB..(j + 1) * VOCAB], w, 8) < 2e-3);
    }
}

/// A GPT-2 style byte-level vocabulary of `VOCAB` tokens in GGUF metadata: printable ASCII
/// bytes as themselves, then one control token; no merges.
fn tiny_tokenizer_metadata() -> Vec<(String, candle_core::quantized::gguf_file::Value)> {
    use candle_core::quantized::gguf_file::Value;
    let mut tokens: Vec<Value> = (b'!'..=b'~')
        .take(VOCAB - 1)
        .map(|b| Value::String((b as char).to_string()))
        .collect();
    tokens.push(Value::String("<|endoftext|>".into()));
    let mut types = vec![Value::I32(1); VOCAB - 1];
    types.push(Value::I32(3));
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
    ]
}
