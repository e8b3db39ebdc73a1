//! One task per batch stream that moves what the driver decided onto the wire.
//!
//! The driver never waits on a worker: it hands messages to the stream's bounded outbox and goes
//! on. The feeder writes them to the gRPC response in order; a write that does not complete
//! within the stall limit (the worker stopped reading and HTTP/2 flow control holds the stream)
//! ends the stream, and the driver is told, so that its leases go back in line.

use std::sync::Arc;
use std::time::Duration;

use distill_proto::pb::{self, CoordinatorMessage, coordinator_message};
use tokio::sync::mpsc;
use tonic::Status;

use crate::domain::workers::StreamId;
use crate::driver::context::RunContext;
use crate::driver::{Command, Handle, Outgoing, batch};

/// The gRPC side of a stream.
pub type Wire = mpsc::Sender<Result<CoordinatorMessage, Status>>;

fn done() -> CoordinatorMessage {
    CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Done(pb::Done {
            reason: "complete".into(),
        })),
    }
}

/// Feeds `stream` until its outbox closes, the run sends `Done`, or the worker is gone.
pub async fn feed(
    ctx: Arc<RunContext>,
    stream: StreamId,
    mut outbox: mpsc::Receiver<Outgoing>,
    wire: Wire,
    driver: Handle,
    stall: Duration,
) {
    let send = |msg: CoordinatorMessage| {
        let wire = wire.clone();
        async move {
            matches!(
                tokio::time::timeout(stall, wire.send(Ok(msg))).await,
                Ok(Ok(()))
            )
        }
    };
    let mut gone = false;
    while let Some(item) = outbox.recv().await {
        match item {
            Outgoing::Message(m) => gone = !send(*m).await,
            Outgoing::Messages(ms) => {
                for m in ms {
                    if !send(m).await {
                        gone = true;
                        break;
                    }
                }
            }
            // The worker evaluates what it was sent when it is told `Done`, and answers with its
            // result on the request side, which stays open (the reader holds the response
            // open until the worker closes).
            Outgoing::Evaluate(params) => {
                for m in params {
                    if !send(m).await {
                        gone = true;
                        break;
                    }
                }
                if !gone {
                    tracing::info!(
                        stream,
                        rows = ctx.data.test.len(),
                        "sending the test split for evaluation"
                    );
                    for m in batch::eval_messages(&ctx) {
                        match m {
                            Ok(m) => {
                                if !send(m).await {
                                    gone = true;
                                    break;
                                }
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot build an evaluation batch");
                                let _ = wire.try_send(Err(Status::from(e)));
                                gone = true;
                                break;
                            }
                        }
                    }
                }
                if !gone {
                    let _ = send(done()).await;
                    // The answer may still be refused (a checkpoint of another network): the
                    // worker is then told why before its stream closes.
                    while let Some(item) = outbox.recv().await {
                        match item {
                            Outgoing::Close(e) => {
                                let _ =
                                    tokio::time::timeout(stall, wire.send(Err(Status::from(e))))
                                        .await;
                                break;
                            }
                            Outgoing::Done => break,
                            _ => {}
                        }
                    }
                    return;
                }
            }
            Outgoing::Done => {
                let _ = send(done()).await;
                return;
            }
            Outgoing::Close(e) => {
                let _ = tokio::time::timeout(stall, wire.send(Err(Status::from(e)))).await;
                gone = true;
            }
        }
        if gone {
            break;
        }
    }
    if gone {
        tracing::debug!(stream, "stream gone");
    }
    // Whether the worker left or the driver closed the outbox, the stream is over.
    let _ = driver.send(Command::StreamClosed { stream }).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn message() -> Outgoing {
        Outgoing::Message(Box::new(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::SyncNow(pb::SyncNow {
                r#final: false,
            })),
        }))
    }

    /// A worker that stops reading holds the HTTP/2 stream, so the response channel stays full:
    /// the feeder gives up after the stall limit and tells the driver the stream is over.
    #[tokio::test]
    async fn a_worker_that_stops_reading_loses_its_stream_after_the_stall_limit() {
        let (driver, mut commands) = Handle::channel(8);
        let (outbox_tx, outbox) = mpsc::channel(8);
        for _ in 0..3 {
            outbox_tx.send(message()).await.unwrap();
        }
        // Room for one message, and nobody reads it.
        let (wire, _unread) = mpsc::channel(1);
        let dataset = distill_core::data::Dataset::load("synthetic:1").unwrap();
        let ctx = Arc::new(test_context(dataset));
        let task = tokio::spawn(feed(
            ctx,
            7,
            outbox,
            wire,
            driver,
            Duration::from_millis(50),
        ));
        let cmd = tokio::time::timeout(Duration::from_secs(10), commands.recv())
            .await
            .expect("the feeder reported within 10 s")
            .expect("a command");
        assert!(
            matches!(cmd, Command::StreamClosed { stream: 7 }),
            "{cmd:?}"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    fn test_context(data: distill_core::data::Dataset) -> RunContext {
        let cfg: crate::RunConfig = crate::RunConfig::from_toml(
            r#"
data = "synthetic:1"
[student]
arch = "mlp:784-4-10"
[optim]
kind = "sgd"
lr = 0.1
[[members]]
name = "t"
endpoints = ["http://127.0.0.1:1"]
"#,
        )
        .unwrap();
        let settings = cfg.student_settings().unwrap();
        let mut membership = crate::domain::membership::Membership::new(
            cfg.membership.to_config(0),
            cfg.members
                .iter()
                .map(|m| (m.name.clone(), m.endpoints.clone())),
        )
        .unwrap();
        membership.expect_model(784, 10);
        let pool = crate::teachers::TeacherPool::new(
            &cfg.members,
            crate::membership::MembershipHandle::new(membership),
            Duration::from_secs(1),
            1 << 20,
        )
        .unwrap();
        RunContext {
            settings_json: String::new(),
            param_shapes: settings.spec.arch.param_shapes(),
            settings,
            data: Arc::new(data),
            pool: Arc::new(pool),
            cache: None,
            batches_per_epoch: 1,
            security: Default::default(),
            cfg,
        }
    }
}
