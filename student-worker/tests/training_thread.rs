//! The training thread driven directly with wire batches (no gRPC): it trains, acks in order,
//! evaluates, checkpoints, and turns bad batches and stops into results, not panics.

// Test code: a panic is the failure report (clippy.toml allows unwrap only inside #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_proto::pb;
use student_worker::Error;
use student_worker::decode::BatchSpec;
use student_worker::student::{KEY_STEP, STUDENT_FILE};
use student_worker::trainer::{Command, Setup, spawn};
use tokio_util::sync::CancellationToken;

fn setup(dir: &std::path::Path) -> Setup {
    Setup {
        settings: common::settings(),
        batches_per_epoch: 1000,
        batch_spec: BatchSpec {
            input_shape: vec![1, 28, 28],
            classes: 10,
            temperature: f64::from(common::T),
        },
        device: Device::Cpu,
        work_dir: dir.to_path_buf(),
        worker_id: "w1".into(),
        resume: None,
    }
}

fn step_of(path: &std::path::Path) -> u64 {
    let ck = Checkpoint::read(path).unwrap();
    ck.extra[KEY_STEP].parse().unwrap()
}

#[test]
fn trains_acks_in_order_lowers_the_loss_and_evaluates() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut t = spawn(setup(dir.path()), 4, CancellationToken::new()).unwrap();
    let n = 60;
    let mut acks = Vec::new();
    for i in 0..n {
        t.commands
            .blocking_send(Command::Train(Box::new(common::train_batch(&data, i))))
            .unwrap();
        // Keep at most 4 batches in flight, like the credit window.
        if i >= 3 {
            acks.push(t.acks.blocking_recv().unwrap());
        }
    }
    for i in 0..5 {
        t.commands
            .blocking_send(Command::Eval(Box::new(common::eval_batch(
                &data,
                i * 200,
                200,
            ))))
            .unwrap();
    }
    t.commands.blocking_send(Command::Finish).unwrap();
    while let Some(a) = t.acks.blocking_recv() {
        acks.push(a);
    }
    let out = t.done.blocking_recv().unwrap().unwrap();

    assert_eq!(acks.len(), n);
    for (i, a) in acks.iter().enumerate() {
        assert_eq!((a.lease_id, a.step), (100 + i as u64, i as u64 + 1));
        assert!(
            a.loss.is_finite() && a.step_seconds > 0.0 && a.wait_seconds >= 0.0,
            "{a:?}"
        );
    }
    let mean = |v: &[pb::Ack]| v.iter().map(|a| a.loss).sum::<f32>() / v.len() as f32;
    let (early, late) = (mean(&acks[..10]), mean(&acks[n - 10..]));
    assert!(late < 0.7 * early, "KD loss {early} -> {late}");

    assert!(out.completed);
    assert_eq!((out.steps, out.batches, out.samples), (60, 60, 60 * 32));
    assert_eq!(out.test_total, 1000);
    // 10 balanced classes: chance is 900 errors of 1000. 60 updates of a 32-unit MLP on 1,920
    // rows gets well below that (seen: 366).
    assert!(out.test_errors < 600, "{} test errors", out.test_errors);
    assert_eq!(out.checkpoint, dir.path().join(STUDENT_FILE));
    assert_eq!(
        std::fs::read(&out.checkpoint).unwrap(),
        out.checkpoint_bytes.to_vec()
    );
    assert_eq!(step_of(&out.checkpoint), 60);
}

#[test]
fn a_bad_batch_ends_the_thread_with_a_clear_error_and_a_checkpoint() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut t = spawn(setup(dir.path()), 4, CancellationToken::new()).unwrap();
    t.commands
        .blocking_send(Command::Train(Box::new(common::train_batch(&data, 0))))
        .unwrap();
    let mut bad = common::train_batch(&data, 1);
    if let Some(s) = bad.soft_targets.as_mut() {
        let mut v = s.data.to_vec();
        v[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        s.data = v.into();
    }
    t.commands
        .blocking_send(Command::Train(Box::new(bad)))
        .unwrap();
    assert_eq!(t.acks.blocking_recv().map(|a| a.step), Some(1));
    assert!(t.acks.blocking_recv().is_none());
    let e = t.done.blocking_recv().unwrap().unwrap_err();
    assert!(matches!(e, Error::BadBatch(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("epoch 0 batch 1 (lease 101)")
            && msg.contains("`soft_targets` element 1 (row 0, class 1) is not finite"),
        "{msg}"
    );
    assert_eq!(step_of(&dir.path().join(STUDENT_FILE)), 1);
}

#[test]
fn stopping_drops_queued_batches_and_writes_a_checkpoint() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut t = spawn(setup(dir.path()), 4, stop.clone()).unwrap();
    for i in 0..2 {
        t.commands
            .blocking_send(Command::Train(Box::new(common::train_batch(&data, i))))
            .unwrap();
    }
    assert_eq!(t.acks.blocking_recv().map(|a| a.step), Some(1));
    assert_eq!(t.acks.blocking_recv().map(|a| a.step), Some(2));
    stop.cancel();
    // Queued after the stop: never trained.
    t.commands
        .blocking_send(Command::Train(Box::new(common::train_batch(&data, 2))))
        .unwrap();
    assert!(t.acks.blocking_recv().is_none());
    let out = t.done.blocking_recv().unwrap().unwrap();
    assert!(!out.completed);
    assert_eq!((out.steps, out.batches), (2, 2));
    assert_eq!(step_of(&dir.path().join(STUDENT_FILE)), 2);
}
