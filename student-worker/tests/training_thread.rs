//! The training thread driven directly with wire batches (no gRPC): it trains, acks in order,
//! evaluates, checkpoints, and turns bad batches and stops into results, not panics.

// Test code: a panic is the failure report (clippy.toml allows unwrap only inside #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::time::Duration;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_proto::pb;
use student_worker::Error;
use student_worker::decode::BatchSpec;
use student_worker::student::{KEY_STEP, STUDENT_FILE};
use student_worker::trainer::{
    Command, Outcome, ParamsDown, Setup, SyncOut, SyncSettings, TrainingThread, Up, spawn,
};
use tokio_util::sync::CancellationToken;

fn setup(dir: &std::path::Path) -> Setup {
    Setup {
        settings: common::settings(),
        batches_per_epoch: 1000,
        batch_spec: BatchSpec {
            input_shape: vec![1, 28, 28],
            classes: 10,
            temperature: f64::from(common::T),
            positions: None,
        },
        device: Device::Cpu,
        work_dir: dir.to_path_buf(),
        worker_id: "w1".into(),
        resume: None,
        sync: SyncSettings::default(),
        stream: Default::default(),
    }
}

/// Longest wait for any one thing the training thread does (a step takes milliseconds).
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f` to completion on a throwaway runtime, panicking with `what` after [`DEADLINE`]:
/// no wait in these tests can block forever.
fn within<F: Future>(what: &str, f: F) -> F::Output {
    distill_testkit::block_within(DEADLINE, what, f)
}

/// Hands the thread a command (the channel is bounded: a stuck thread fails the test).
fn send(t: &TrainingThread, cmd: Command) {
    within(
        "sending a command to the training thread",
        t.commands.send(cmd),
    )
    .unwrap_or_else(|_| panic!("the training thread is gone"));
}

/// The thread's result, once it has ended.
fn outcome(t: &mut TrainingThread) -> student_worker::Result<Outcome> {
    within("waiting for the training thread's outcome", &mut t.done)
        .expect("the training thread ended without an outcome")
}

/// The next ack from the thread (None when it ended); panics on anything else.
fn next_ack(rx: &mut tokio::sync::mpsc::Receiver<Up>) -> Option<pb::Ack> {
    match within("waiting for an ack", rx.recv())? {
        Up::Ack(a, _) => Some(a),
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn next_sync(rx: &mut tokio::sync::mpsc::Receiver<Up>) -> SyncOut {
    next_sync_on(rx).0
}

/// The next contribution and the batch stream it is stamped with.
fn next_sync_on(rx: &mut tokio::sync::mpsc::Receiver<Up>) -> (SyncOut, u64) {
    match within("waiting for the round's parameters", rx.recv()) {
        Some(Up::Sync(s, stream)) => (*s, stream),
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
        send(&t, Command::Train(Box::new(common::train_batch(&data, i))));
        // Keep at most 4 batches in flight, like the credit window.
        if i >= 3 {
            acks.push(next_ack(&mut t.acks).unwrap());
        }
    }
    for i in 0..5 {
        send(
            &t,
            Command::Eval(Box::new(common::eval_batch(&data, i * 200, 200))),
        );
    }
    send(&t, Command::Finish);
    while let Some(a) = next_ack(&mut t.acks) {
        acks.push(a);
    }
    let out = outcome(&mut t).unwrap();

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
    send(&t, Command::Train(Box::new(common::train_batch(&data, 0))));
    let mut bad = common::train_batch(&data, 1);
    if let Some(s) = bad.soft_targets.as_mut() {
        let mut v = s.data.to_vec();
        v[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        s.data = v.into();
    }
    send(&t, Command::Train(Box::new(bad)));
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(1));
    assert!(next_ack(&mut t.acks).is_none());
    let e = outcome(&mut t).unwrap_err();
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
        send(&t, Command::Train(Box::new(common::train_batch(&data, i))));
    }
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(1));
    assert_eq!(next_ack(&mut t.acks).map(|a| a.step), Some(2));
    stop.cancel();
    // Queued after the stop: never trained.
    send(&t, Command::Train(Box::new(common::train_batch(&data, 2))));
    assert!(next_ack(&mut t.acks).is_none());
    let out = outcome(&mut t).unwrap();
    assert!(!out.completed);
    assert_eq!((out.steps, out.batches), (2, 2));
    assert_eq!(step_of(&dir.path().join(STUDENT_FILE)), 2);
}

/// Learning rate of the synchronisation test's plain SGD.
const SGD_LR: f64 = 0.1;

#[test]
fn synchronisation_rounds_send_parameters_wait_and_take_the_average() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path());
    s.sync.every = 3;
    // Plain SGD (no momentum, no decay, constant rate): the optimizer carries no state across
    // the round, so the step after the average depends on the average and the batch alone.
    s.settings.optim = distill_core::optim::OptimConfig::sgd(SGD_LR, 0.0);
    let mut t = spawn(s, 4, CancellationToken::new()).unwrap();
    for i in 0..3 {
        send(&t, Command::Train(Box::new(common::train_batch(&data, i))));
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
    // Three steps from a random start: no parameter tensor is all zero, so a worker that kept
    // its own parameters could not pass the checks below.
    for (n, _, v) in &up.params {
        assert!(
            v.iter().any(|&x| x != 0.0),
            "`{n}` is all zero before the round"
        );
    }
    // A batch that arrives during the round waits for the average, then trains from it.
    send(&t, Command::Train(Box::new(common::train_batch(&data, 3))));
    let zeros: Vec<_> = shapes
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), vec![0f32; s.iter().product()]))
        .collect();
    send(
        &t,
        Command::Params(Box::new(ParamsDown {
            version: 1,
            params: Some(zeros.clone()),
            contributors: 2,
            stream: 0,
        })),
    );
    let a = next_ack(&mut t.acks).unwrap();
    assert_eq!(a.step, 4);
    assert!(a.sync_seconds > 0.0 && a.wait_seconds == 0.0, "{a:?}");
    // From all-zero parameters every logit is 0 (softmax uniform at any T), whatever the
    // inputs: the loss is alpha·T²·KL(p ‖ uniform) + (1 − alpha)·ln 10, and each soft target
    // row is 0.9 on the label and 0.1/9 elsewhere, so KL = 0.9·ln 9 + 0.1·ln(1/9) = 0.8·ln 9.
    let st = common::settings();
    let (alpha, temp) = (st.alpha, st.temperature);
    let zero_loss = alpha * temp * temp * 0.8 * 9f64.ln() + (1.0 - alpha) * 10f64.ln();
    assert!(
        (f64::from(a.loss) - zero_loss).abs() < 1e-4,
        "step 4's loss {} is not the loss of the zero average ({zero_loss}): the batch was not \
         trained from the average",
        a.loss
    );
    send(&t, Command::SyncNow(true));
    let up = next_sync(&mut t.acks);
    assert_eq!((up.base_version, up.samples, up.is_final), (1, 32, true));
    // One SGD step from zero: the hidden activations are relu(0) = 0 and the output weights 0,
    // so the gradient of every weight and of the hidden bias is exactly 0; only the output
    // bias moves, by −lr·∂L/∂z summed over the batch, where (per the KD objective)
    // ∂L/∂z = [alpha·T·(0.1 − p) + (1 − alpha)·(0.1 − onehot(y))] / N.
    let labels = data.train.labels(&(96..128).collect::<Vec<_>>());
    let want_bias: Vec<f64> = (0..10u32)
        .map(|c| {
            let f = labels.iter().filter(|&&l| l == c).count() as f64 / labels.len() as f64;
            let p = 0.9 * f + (0.1 / 9.0) * (1.0 - f);
            -SGD_LR * (alpha * temp * (0.1 - p) + (1.0 - alpha) * (0.1 - f))
        })
        .collect();
    for (name, shape, v) in &up.params {
        assert!(v.iter().all(|x| x.is_finite()), "`{name}` is not finite");
        if name == "fc1.bias" {
            assert_eq!(shape, &vec![10]);
            for (c, (&got, want)) in v.iter().zip(&want_bias).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "output bias of class {c}: {got}, expected {want} (all: {v:?})"
                );
            }
            assert!(v.iter().any(|&x| x != 0.0), "the output bias did not move");
        } else {
            assert!(
                v.iter().all(|&x| x == 0.0),
                "`{name}` moved off the zero average: the batch did not train from it \
                 (first values {:?})",
                &v[..v.len().min(8)]
            );
        }
    }
    let flat: Vec<f32> = up.params.iter().flat_map(|(_, _, v)| v.clone()).collect();
    // A lone contributor keeps its own parameters. These come on a newer batch stream (the
    // worker joined again): what the thread sends from then on is stamped with that stream,
    // so the worker never sends it on another.
    send(
        &t,
        Command::Params(Box::new(ParamsDown {
            version: 2,
            params: None,
            contributors: 1,
            stream: 1,
        })),
    );
    send(&t, Command::SyncNow(false));
    let (_, on) = next_sync_on(&mut t.acks);
    assert_eq!(
        on, 1,
        "a contribution after stream 1's parameters belongs to stream 1"
    );
    send(
        &t,
        Command::Params(Box::new(ParamsDown {
            version: 3,
            params: None,
            contributors: 1,
            stream: 1,
        })),
    );
    send(&t, Command::Finish);
    assert!(next_ack(&mut t.acks).is_none());
    let out = outcome(&mut t).unwrap();
    assert!(out.completed);
    assert_eq!((out.steps, out.rounds), (4, 3));
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
        send(
            &t,
            Command::Train(Box::new(common::train_batch_topk(&data, i, 2))),
        );
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
    send(&t, Command::Train(Box::new(bad)));
    assert!(next_ack(&mut t.acks).is_none());
    let e = outcome(&mut t).unwrap_err().to_string();
    assert!(
        e.contains("epoch 0 batch 40") && e.contains("`topk_targets`"),
        "{e}"
    );
}
