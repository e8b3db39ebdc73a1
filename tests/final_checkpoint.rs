//! A final student checkpoint larger than the worker's message-size limit: the worker sends its
//! result without it. The run must not wait for it forever: with synchronisation rounds the
//! coordinator writes its own average instead and completes; without them it fails at once
//! with a message that says which limit to raise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// `mlp:784-400-10` is 318,010 parameters (1.27 MB on the wire); the worker's limit, 1 MiB,
/// still takes every batch (an evaluation batch of 256 rows of 784 pixels is 200 KB).
async fn run(
    dir: &std::path::Path,
    sync_every: u64,
) -> coordinator::Result<Option<coordinator::RunReport>> {
    let shutdown = CancellationToken::new();
    let ck = common::random_checkpoint("mlp:784-16-10", 1);
    let (_, url) = common::serve_teacher(&ck, &Default::default(), &shutdown).await;
    let mut cfg = common::small_run(dir.join("run"));
    cfg.student.arch = "mlp:784-400-10".into();
    cfg.epochs = 1;
    cfg.members = vec![common::static_member("t", &[&url])];
    cfg.sync.every = sync_every;
    // Parameters travel in chunks the worker's limit takes.
    cfg.sync.chunk_bytes = 256 << 10;
    let (addr, served) = common::serve_run(cfg, &shutdown).await;
    let worker = tokio::spawn(student_worker::run(
        student_worker::WorkerConfig {
            coordinator: format!("http://{addr}"),
            work_dir: dir.join("worker"),
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 1 << 20,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let out = common::within(Duration::from_secs(120), "the run", served)
        .await
        .unwrap();
    shutdown.cancel();
    let _ = worker.await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rounds_the_run_fails_naming_the_limit_instead_of_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(dir.path(), 0)
        .await
        .expect_err("the run fails")
        .to_string();
    assert!(e.contains("max_message_mb"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rounds_the_coordinator_writes_its_own_average_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(dir.path(), 5).await.unwrap().expect("completed");
    assert_eq!(report.batches_trained, report.batches_expected);
    let ck = distill_core::checkpoint::Checkpoint::read(&report.student_checkpoint).unwrap();
    assert_eq!(ck.spec.arch.to_string(), "mlp:784-400-10");
    assert!(report.test_size > 0);
}
