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
use student_worker::trainer::{Command, ParamsDown, Setup, SyncOut, SyncSettings, Up, spawn};
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
        sync: SyncSettings::default(),
        stream: Default::default(),
    }
}

/// The next ack from the thread (None when it ended); panics on anything else.
fn next_ack(rx: &mut tokio::sync::mpsc::Receiver<Up>) -> Option<pb::Ack> {
    match rx.blocking_recv()? {
        Up::Ack(a) => Some(a),
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn next_sync(rx: &mut tokio::sync::mpsc::Receiver<Up>) -> SyncOut {
    match rx.blocking_recv() {
        Some(Up::Sync(s)) => *s,
        other => panic!("expected parameters, got {other:?}"),
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
            acks.push(next_ack(&mut t.acks).unwrap());
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
    while let Some(a) = next_ack(&mut t.acks) {
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
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(1));
    assert!(next_ack(&mut t.acks).is_none());
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
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(1));
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(2));
    stop.cancel();
    // Queued after the stop: never trained.
    t.commands
        .blocking_send(Command::Train(Box::new(common::train_batch(&data, 2))))
        .unwrap();
    assert!(next_ack(&mut t.acks).is_none());
    let out = t.done.blocking_recv().unwrap().unwrap();
    assert!(!out.completed);
    assert_eq!((out.steps, out.batches), (2, 2));
    assert_eq!(step_of(&dir.path().join(STUDENT_FILE)), 2);
}

#[test]
fn synchronisation_rounds_send_parameters_wait_and_take_the_average() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path());
    s.sync.every = 3;
    let mut t = spawn(s, 4, CancellationToken::new()).unwrap();
    for i in 0..3 {
        t.commands
            .blocking_send(Command::Train(Box::new(common::train_batch(&data, i))))
            .unwrap();
    }
    for i in 0..3 {
        assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(i + 1));
    }
    let up = next_sync(&mut t.acks);
    assert_eq!((up.base_version, up.samples, up.is_final), (0, 96, false));
    let shapes = common::settings().spec.arch.param_shapes();
    assert_eq!(
        up.params
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect::<Vec<_>>(),
        shapes
    );
    // A batch that arrives during the round waits for the average, then trains from it.
    t.commands
        .blocking_send(Command::Train(Box::new(common::train_batch(&data, 3))))
        .unwrap();
    let zeros: Vec<_> = shapes
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), vec![0f32; s.iter().product()]))
        .collect();
    t.commands
        .blocking_send(Command::Params(Box::new(ParamsDown {
            version: 1,
            params: Some(zeros.clone()),
            contributors: 2,
        })))
        .unwrap();
    let a = next_ack(&mut t.acks).unwrap();
    assert_eq!(a.step, 4);
    assert!(a.sync_seconds > 0.0 && a.wait_seconds == 0.0, "{a:?}");
    t.commands.blocking_send(Command::SyncNow(true)).unwrap();
    let up = next_sync(&mut t.acks);
    assert_eq!((up.base_version, up.samples, up.is_final), (1, 32, true));
    // Trained one step from the zero average: the output bias moved, nothing is NaN.
    let flat: Vec<f32> = up.params.iter().flat_map(|(_, _, v)| v.clone()).collect();
    assert!(flat.iter().all(|v| v.is_finite()));
    assert!(
        flat.iter().any(|&v| v != 0.0),
        "the batch was trained before the average arrived"
    );
    // A lone contributor keeps its own parameters.
    t.commands
        .blocking_send(Command::Params(Box::new(ParamsDown {
            version: 2,
            params: None,
            contributors: 1,
        })))
        .unwrap();
    t.commands.blocking_send(Command::Finish).unwrap();
    assert!(next_ack(&mut t.acks).is_none());
    let out = t.done.blocking_recv().unwrap().unwrap();
    assert!(out.completed);
    assert_eq!((out.steps, out.rounds), (4, 2));
    assert!(out.sync_seconds > 0.0);
    let saved = Checkpoint::read(&out.checkpoint).unwrap();
    let saved: Vec<f32> = saved
        .params
        .iter()
        .flat_map(|(_, _, v)| v.clone())
        .collect();
    assert_eq!(
        saved, flat,
        "the final checkpoint holds the parameters it kept"
    );
}

#[test]
fn trains_on_top_k_targets_and_rejects_malformed_ones() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut t = spawn(setup(dir.path()), 4, CancellationToken::new()).unwrap();
    let mut losses = Vec::new();
    for i in 0..40 {
        t.commands
            .blocking_send(Command::Train(Box::new(common::train_batch_topk(
                &data, i, 2,
            ))))
            .unwrap();
        losses.push(next_ack(&mut t.acks).unwrap().loss);
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (early, late) = (mean(&losses[..8]), mean(&losses[32..]));
    assert!(late < 0.8 * early, "top-k KD loss {early} -> {late}");
    // An index out of range (class 10 of 10) is named, and the thread ends cleanly.
    let mut bad = common::train_batch_topk(&data, 40, 2);
    if let Some(tk) = bad.topk_targets.as_mut() {
        let mut v = tk.data.to_vec();
        v[4..6].copy_from_slice(&10u16.to_le_bytes());
        tk.data = v;
    }
    t.commands
        .blocking_send(Command::Train(Box::new(bad)))
        .unwrap();
    assert!(next_ack(&mut t.acks).is_none());
    let e = t.done.blocking_recv().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("epoch 0 batch 40") && e.contains("`topk_targets`"),
        "{e}"
    );
}
