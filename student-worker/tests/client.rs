//! The worker's side of the protocol against a scripted coordinator (an in-process tonic
//! server on 127.0.0.1:0 that plays a fixed script and records what the worker sends). This
//! checks the client's conversation — Join, Hello with the credit window, one ack per batch,
//! EvalResult with the checkpoint, half-close, resume after a stop — not the real
//! coordinator; the end-to-end tests in the workspace's `tests/` use that.

// Test code: a panic is the failure report (clippy.toml allows unwrap only inside #[test] fns).
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_proto::pb;
use distill_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use student_worker::student::{KEY_STEP, STUDENT_FILE};
use student_worker::{Error, WorkerConfig, WorkerReport, run};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Longest wait for any one thing in these tests (a whole scripted run takes about a second).
const DEADLINE: Duration = Duration::from_secs(120);

/// `f`, or a panic naming `what` after [`DEADLINE`]: no await in these tests can hang.
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    distill_testkit::within(DEADLINE, what, f).await
}

/// What the scripted coordinator saw, in order.
#[derive(Debug)]
enum Seen {
    Join(pb::JoinRequest),
    Hello(pb::Hello),
    Ack(pb::Ack),
    Result(pb::EvalResult),
    /// The worker ended its side: true for a clean half-close.
    Closed(bool),
    Unexpected(String),
}

#[derive(Clone)]
struct Script {
    classes: u32,
    train: Arc<Vec<pb::TrainBatch>>,
    eval: Arc<Vec<pb::EvalBatch>>,
    /// Send only this many training batches, then wait (never `Done`).
    stall_after: Option<usize>,
    seen: mpsc::Sender<Seen>,
}

#[tonic::async_trait]
impl Coordinator for Script {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        let _ = within("recording the Join", self.seen.send(Seen::Join(r.clone()))).await;
        Ok(Response::new(pb::JoinResponse {
            worker_id: if r.worker_id.is_empty() {
                "assigned-1".into()
            } else {
                r.worker_id
            },
            incarnation: 7,
            settings_json: serde_json::to_string(&common::settings()).unwrap(),
            batches_per_epoch: 1000,
            classes: self.classes,
            input_shape: vec![1, 28, 28],
            resume_step: r.resume_step,
            sync: None,
            session_secret: "scripted-secret".into(),
        }))
    }

    type BatchesStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn batches(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::BatchesStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        // The script as a whole has a deadline: a stuck conversation ends (and the worker sees
        // the stream close) instead of waiting forever.
        let drive = self.clone().drive(req.into_inner(), tx);
        tokio::spawn(async move {
            if tokio::time::timeout(DEADLINE, drive).await.is_err() {
                eprintln!("the scripted coordinator gave up after {DEADLINE:?}");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn run_status(
        &self,
        _: Request<pb::RunStatusRequest>,
    ) -> Result<Response<pb::RunStatusResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

fn down(kind: pb::coordinator_message::Kind) -> Result<pb::CoordinatorMessage, Status> {
    Ok(pb::CoordinatorMessage { kind: Some(kind) })
}

impl Script {
    /// Sends training batches within the worker's credit window, then the evaluation batches
    /// and `Done`, then waits for the result and the worker's half-close.
    async fn drive(
        self,
        mut inbound: Streaming<pb::WorkerMessage>,
        tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    ) {
        use pb::coordinator_message::Kind as Down;
        use pb::worker_message::Kind as Up;
        let credits = match inbound.message().await {
            Ok(Some(pb::WorkerMessage {
                kind: Some(Up::Hello(h)),
            })) => {
                let c = h.credits as usize;
                let _ = self.seen.send(Seen::Hello(h)).await;
                c
            }
            other => {
                let _ = self
                    .seen
                    .send(Seen::Unexpected(format!("first message {other:?}")))
                    .await;
                return;
            }
        };
        let n = self.train.len();
        let limit = self.stall_after.unwrap_or(n).min(n);
        let (mut sent, mut acked) = (0, 0);
        while acked < n {
            while sent < limit && sent - acked < credits {
                let _ = tx.send(down(Down::Train(self.train[sent].clone()))).await;
                sent += 1;
            }
            match inbound.message().await {
                Ok(Some(pb::WorkerMessage {
                    kind: Some(Up::Ack(a)),
                })) => {
                    acked += 1;
                    let _ = self.seen.send(Seen::Ack(a)).await;
                }
                Ok(Some(m)) => {
                    let _ = self.seen.send(Seen::Unexpected(format!("{m:?}"))).await;
                }
                Ok(None) | Err(_) => {
                    let _ = self.seen.send(Seen::Closed(false)).await;
                    return;
                }
            }
        }
        for e in self.eval.iter() {
            let _ = tx.send(down(Down::Eval(e.clone()))).await;
        }
        let _ = tx
            .send(down(Down::Done(pb::Done {
                reason: "complete".into(),
            })))
            .await;
        match inbound.message().await {
            Ok(Some(pb::WorkerMessage {
                kind: Some(Up::Eval(r)),
            })) => {
                let _ = self.seen.send(Seen::Result(r)).await;
            }
            other => {
                let _ = self
                    .seen
                    .send(Seen::Unexpected(format!(
                        "instead of the result: {other:?}"
                    )))
                    .await;
                return;
            }
        }
        let end = inbound.message().await;
        let _ = self.seen.send(Seen::Closed(matches!(end, Ok(None)))).await;
        // Dropping `tx` ends the coordinator's side.
    }
}

/// A scripted coordinator with training batches `range` and `evals` test rows.
fn script(
    data: &Dataset,
    range: std::ops::Range<usize>,
    evals: usize,
) -> (Script, mpsc::Receiver<Seen>) {
    let (seen, rx) = mpsc::channel(1000);
    let s = Script {
        classes: 10,
        train: Arc::new(range.map(|i| common::train_batch(data, i)).collect()),
        eval: Arc::new(
            (0..evals / 100)
                .map(|i| common::eval_batch(data, i * 100, 100))
                .collect(),
        ),
        stall_after: None,
        seen,
    };
    (s, rx)
}

fn serve(s: Script, listener: TcpListener) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(s))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
            .await
    });
    stop
}

fn config(addr: std::net::SocketAddr, dir: &std::path::Path) -> WorkerConfig {
    WorkerConfig {
        coordinator: format!("http://{addr}"),
        work_dir: dir.to_path_buf(),
        prefetch: 3,
        connect_timeout: Duration::from_secs(20),
        ..WorkerConfig::default()
    }
}

fn drain(rx: &mut mpsc::Receiver<Seen>) -> Vec<Seen> {
    let mut v = Vec::new();
    while let Ok(s) = rx.try_recv() {
        v.push(s);
    }
    v
}

fn step_of(bytes: &[u8]) -> u64 {
    Checkpoint::from_bytes(bytes).unwrap().extra[KEY_STEP]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_scripted_run_after_a_failed_first_connection() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, mut seen) = script(&data, 0..12, 200);
    let listener = within("binding", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let worker = tokio::spawn(run(config(addr, dir.path()), CancellationToken::new()));
    // The worker's first connection is dropped before any HTTP/2 is spoken: it must retry.
    let (sock, _) = within("the worker's first connection", listener.accept())
        .await
        .unwrap();
    drop(sock);
    let stop = serve(s, listener);
    let report: WorkerReport = within("the worker's run", worker).await.unwrap().unwrap();
    stop.cancel();

    assert_eq!(report.worker_id, "assigned-1");
    assert_eq!(
        (report.steps, report.batches, report.samples),
        (12, 12, 12 * 32)
    );
    assert_eq!(report.test_total, 200);
    assert_eq!(report.checkpoint, dir.path().join(STUDENT_FILE));
    assert!(report.step_seconds > 0.0 && report.wait_seconds >= 0.0);

    let seen = drain(&mut seen);
    let mut it = seen.iter();
    match it.next() {
        Some(Seen::Join(j)) => assert_eq!((j.worker_id.as_str(), j.resume_step), ("", 0)),
        other => panic!("expected Join first, got {other:?}"),
    }
    match it.next() {
        Some(Seen::Hello(h)) => {
            assert_eq!(
                (h.worker_id.as_str(), h.incarnation, h.credits),
                ("assigned-1", 7, 3)
            )
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    for i in 0..12u64 {
        match it.next() {
            Some(Seen::Ack(a)) => {
                assert_eq!((a.lease_id, a.step), (100 + i, i + 1));
                assert!(a.loss.is_finite() && a.step_seconds > 0.0);
            }
            other => panic!("expected ack {i}, got {other:?}"),
        }
    }
    match it.next() {
        Some(Seen::Result(r)) => {
            assert_eq!((r.errors, r.total), (report.test_errors, 200));
            assert_eq!(r.checkpoint, STUDENT_FILE);
            assert_eq!(
                r.checkpoint_bytes.to_vec(),
                std::fs::read(dir.path().join(STUDENT_FILE)).unwrap()
            );
            assert_eq!(step_of(&r.checkpoint_bytes), 12);
        }
        other => panic!("expected the result, got {other:?}"),
    }
    assert!(matches!(it.next(), Some(Seen::Closed(true))), "{seen:?}");
    assert!(it.next().is_none(), "{seen:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(student_worker::WORKER_ID_FILE)).unwrap(),
        "assigned-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_saves_its_step_and_a_restart_resumes_there() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();

    // First life: the coordinator hands out 5 batches and then nothing; the worker is stopped.
    let (mut s, mut seen) = script(&data, 0..10, 100);
    s.stall_after = Some(5);
    let listener = within("binding", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop_server = serve(s, listener);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run(config(addr, dir.path()), shutdown.clone()));
    let mut acks = 0;
    while acks < 5 {
        match within("the worker's next message", seen.recv()).await {
            Some(Seen::Ack(_)) => acks += 1,
            Some(Seen::Unexpected(m)) => panic!("{m}"),
            Some(_) => {}
            None => panic!("script ended early"),
        }
    }
    shutdown.cancel();
    let r = within("the stopped worker", worker).await.unwrap();
    assert!(matches!(r, Err(Error::Cancelled { step: 5 })), "{r:?}");
    assert!(matches!(
        within("the worker's close", seen.recv()).await,
        Some(Seen::Closed(_))
    ));
    stop_server.cancel();
    let ck = std::fs::read(dir.path().join(STUDENT_FILE)).unwrap();
    assert_eq!(step_of(&ck), 5);

    // Second life: the same work dir joins with its step and the stored id, and goes on.
    let (s, mut seen) = script(&data, 5..10, 100);
    let listener = within("binding", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop_server = serve(s, listener);
    let report = within(
        "the resumed run",
        run(config(addr, dir.path()), CancellationToken::new()),
    )
    .await
    .unwrap();
    stop_server.cancel();
    assert_eq!((report.steps, report.batches), (10, 5));
    let seen = drain(&mut seen);
    match seen.first() {
        Some(Seen::Join(j)) => assert_eq!((j.worker_id.as_str(), j.resume_step), ("assigned-1", 5)),
        other => panic!("expected Join, got {other:?}"),
    }
    let steps: Vec<u64> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Ack(a) => Some(a.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![6, 7, 8, 9, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_on_an_absent_coordinator_after_the_deadline() {
    // A port this test keeps, where no coordinator ever answers: every connection is
    // accepted and dropped before any HTTP/2 is spoken (binding and dropping a port instead
    // would race with anything else that picks the number up).
    let listener = within("binding", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let refuser = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorkerConfig {
        connect_timeout: Duration::from_millis(300),
        ..config(addr, dir.path())
    };
    let e = within(
        "giving up on the coordinator",
        run(cfg, CancellationToken::new()),
    )
    .await
    .unwrap_err();
    refuser.abort();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("still unavailable after"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_run_whose_data_does_not_fit_the_student() {
    let data = Dataset::load("synthetic:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _seen) = script(&data, 0..1, 0);
    s.classes = 7;
    let listener = within("binding", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = serve(s, listener);
    let e = within(
        "the refused run",
        run(config(addr, dir.path()), CancellationToken::new()),
    )
    .await
    .unwrap_err();
    stop.cancel();
    assert!(
        e.to_string()
            .contains("the data has 7 classes but the student mlp:784-32-10 outputs 10"),
        "{e}"
    );
}
