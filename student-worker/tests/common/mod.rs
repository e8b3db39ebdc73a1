//! Synthetic batches in wire form, shared by the tests.
#![allow(dead_code)]

use bytes::Bytes;
use distill_core::data::Dataset;
use distill_core::optim::OptimConfig;
use distill_core::settings::StudentSettings;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::pb;

/// Run temperature used by every test.
pub const T: f32 = 2.0;

/// A small student for the synthetic set.
pub fn settings() -> StudentSettings {
    StudentSettings {
        spec: ModelSpec {
            arch: Arch::parse("mlp:784-32-10").unwrap(),
            dropout: 0.1,
            input_dropout: 0.0,
        },
        optim: OptimConfig::adamw(3e-3, 0.0),
        temperature: f64::from(T),
        alpha: 0.7,
        epochs: 1,
        batch_size: 32,
        seed: 3,
        checkpoint_every: 0,
        precision: Default::default(),
        init: None,
    }
}

fn tensor(shape: Vec<u64>, dtype: pb::DType, data: Vec<u8>) -> Option<pb::Tensor> {
    Some(pb::Tensor {
        shape,
        dtype: dtype as i32,
        data: Bytes::from(data),
    })
}

fn labels(y: &[u32]) -> Option<pb::Tensor> {
    let b = y.iter().flat_map(|&v| i64::from(v).to_le_bytes()).collect();
    tensor(vec![y.len() as u64], pb::DType::DtypeI64, b)
}

/// Training batch `i` (rows `32·i ..`) of `synthetic:0`: u8 inputs, one-hot-ish soft targets
/// (0.9 on the label, 0.1/9 elsewhere), lease id `100 + i`.
pub fn train_batch(data: &Dataset, i: usize) -> pb::TrainBatch {
    let idx: Vec<usize> = (i * 32..(i + 1) * 32).collect();
    let y = data.train.labels(&idx);
    let soft: Vec<u8> = y
        .iter()
        .flat_map(|&l| (0..10).map(move |c| if c == l { 0.9f32 } else { 0.1 / 9.0 }))
        .flat_map(|p| p.to_le_bytes())
        .collect();
    pb::TrainBatch {
        lease_id: 100 + i as u64,
        epoch: 0,
        index: i as u32,
        inputs: tensor(
            vec![32, 1, 28, 28],
            pb::DType::DtypeU8,
            data.train.rows_u8(&idx).unwrap(),
        ),
        labels: labels(&y),
        soft_targets: tensor(vec![32, 10], pb::DType::DtypeF32, soft),
        temperature: T,
        members: vec!["a".into(), "b".into()],
        topk_targets: None,
        encoding: "f32".into(),
        cached: false,
    }
}

/// [`train_batch`] with its soft targets in the top-k encoding (f16 values).
pub fn train_batch_topk(data: &Dataset, i: usize, k: usize) -> pb::TrainBatch {
    let mut b = train_batch(data, i);
    let soft = b.soft_targets.take().unwrap();
    let probs: Vec<f32> = soft
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let format = distill_core::topk::TopKFormat::new(10, k).unwrap();
    let bytes = distill_core::topk::encode_probs(&probs, 32, &format).unwrap();
    b.topk_targets = Some(pb::TopKTargets {
        k: k as u32,
        classes: 10,
        value_dtype: pb::DType::DtypeF16 as i32,
        data: bytes,
    });
    b.encoding = format!("topk:{k}");
    b
}

/// Test rows `start..start + n` of `synthetic:0`.
pub fn eval_batch(data: &Dataset, start: usize, n: usize) -> pb::EvalBatch {
    let idx: Vec<usize> = (start..start + n).collect();
    pb::EvalBatch {
        inputs: tensor(
            vec![n as u64, 784],
            pb::DType::DtypeU8,
            data.test.rows_u8(&idx).unwrap(),
        ),
        labels: labels(&data.test.labels(&idx)),
    }
}
