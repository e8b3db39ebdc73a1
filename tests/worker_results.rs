//! What a worker hands in at the end is checked, not believed: a hand-driven evaluator (a real
//! coordinator in-process over loopback, a real teacher server) first uploads a checkpoint of
//! another network, which is refused, then a "trojaned" student with made-up errors; the run
//! completes with the coordinator's own scoring of the student it wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use candle_core::Device;
use coordinator::config::RunConfig;
use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::coordinator_client::CoordinatorClient;
use distill_proto::pb::{self, WorkerMessage, worker_message};
use tokio_util::sync::CancellationToken;

const TEST_DEADLINE: Duration = Duration::from_secs(300);

/// Acks every batch and waits out the evaluation batches until `Done`; returns how many test
/// rows were sent.
async fn until_done(
    tx: &tokio::sync::mpsc::Sender<WorkerMessage>,
    down: &mut tonic::Streaming<pb::CoordinatorMessage>,
) -> u64 {
    let mut rows = 0;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), down.message())
            .await
            .expect("a message within 60 s")
            .unwrap()
            .expect("the stream is open");
        match msg.kind {
            Some(pb::coordinator_message::Kind::Train(b)) => tx
                .send(WorkerMessage {
                    kind: Some(worker_message::Kind::Ack(pb::Ack {
                        lease_id: b.lease_id,
                        ..Default::default()
                    })),
                })
                .await
                .unwrap(),
            Some(pb::coordinator_message::Kind::Eval(e)) => {
                rows += e.labels.unwrap().shape[0];
            }
            Some(pb::coordinator_message::Kind::Done(_)) => return rows,
            _ => {}
        }
    }
}

fn eval_result(ck: &Checkpoint, errors: u64, total: u64) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Eval(pb::EvalResult {
            errors,
            total,
            checkpoint: "student.safetensors".into(),
            checkpoint_bytes: ck.to_bytes().unwrap().into(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_network_is_refused_and_made_up_errors_are_rescored() {
    common::within(
        TEST_DEADLINE,
        "a_foreign_network_is_refused_and_made_up_errors_are_rescored",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let teacher = common::random_checkpoint("mlp:784-16-10", 1);
            let (_, url) = common::serve_teacher(&teacher, &Default::default(), &shutdown).await;
            let cfg = RunConfig::from_toml(&format!(
                r#"
data = "synthetic:5"
run_dir = "{}"
epochs = 1
batch_size = 1000
[sync]
every = 0
[student]
arch = "mlp:784-16-10"
[[members]]
name = "t"
endpoints = ["{url}"]
"#,
                dir.path().join("run").display()
            ))
            .unwrap();
            let run = coordinator::prepare(cfg).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let served = tokio::spawn(coordinator::serve(run, listener, shutdown.clone()));
            let mut client = CoordinatorClient::connect(format!("http://{addr}"))
                .await
                .unwrap();

            // The elected evaluator hands in a checkpoint of another network: its stream is
            // closed with a message naming both, and the run goes on.
            let (tx, mut down) = common::open_stream(&mut client, "w1", 4).await;
            let total = until_done(&tx, &mut down).await;
            assert!(total > 0);
            let foreign = common::random_checkpoint("mlp:784-8-10", 2);
            tx.send(eval_result(&foreign, 0, total)).await.unwrap();
            let status = loop {
                match down.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without an error"),
                    Err(s) => break s,
                }
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains("mlp:784-8-10")
                    && status.message().contains("mlp:784-16-10"),
                "{status:?}"
            );

            // The next evaluator claims a perfect score for an untrained student.
            let (tx, mut down) = common::open_stream(&mut client, "w2", 4).await;
            assert_eq!(until_done(&tx, &mut down).await, total);
            let trojan = common::random_checkpoint("mlp:784-16-10", 9);
            tx.send(eval_result(&trojan, 0, total)).await.unwrap();
            let report = tokio::time::timeout(Duration::from_secs(60), served)
                .await
                .expect("the run completes")
                .unwrap()
                .unwrap()
                .expect("a report");

            // The report has the coordinator's scoring of what it wrote, not the claim.
            let written = Checkpoint::read(&report.student_checkpoint).unwrap();
            let data = distill_core::data::Dataset::load("synthetic:5").unwrap();
            let model = written.to_model(&Device::Cpu).unwrap();
            let own = distill_core::eval::evaluate(&model, &data.test, 512).unwrap();
            assert_eq!(report.student_test_errors, own.errors as u64);
            assert_eq!(report.test_size, total);
            assert!(report.student_test_errors > 0, "the made-up 0 was believed");
            let on_disk = common::read_report(&dir.path().join("run"));
            assert_eq!(
                common::count(&on_disk, "student_test_errors"),
                own.errors as u64
            );
            shutdown.cancel();
        },
    )
    .await
}
