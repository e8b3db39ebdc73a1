//! The `distill.v1.Coordinator` gRPC service: thin handlers that check and convert what a worker
//! sends, hand it to the driver and map the answer to a reply.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use distill_core::checkpoint::Checkpoint;
use distill_proto::params::ParamAssembler;
use distill_proto::pb::coordinator_server::Coordinator;
use distill_proto::pb::{
    self, CoordinatorMessage, JoinRequest, JoinResponse, RunStatusRequest, RunStatusResponse,
    WorkerMessage, worker_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use super::feeder;
use crate::domain::counters::AckTimes;
use crate::domain::ledger::Worker;
use crate::domain::run_state::SyncUpload;
use crate::domain::workers::StreamId;
use crate::driver::context::RunContext;
use crate::driver::{Command, Handle, OUTBOX, StatusView};
use crate::error::Error;

/// The Coordinator service of one run.
#[derive(Clone)]
pub struct CoordinatorService {
    ctx: Arc<RunContext>,
    driver: Handle,
    /// The streams' tasks, awaited when the server stops.
    tasks: TaskTracker,
    /// Cancelled once the run is over: the streams stop reading.
    finished: CancellationToken,
}

impl CoordinatorService {
    /// A service over the run `ctx` driven through `driver`.
    pub fn new(
        ctx: Arc<RunContext>,
        driver: Handle,
        tasks: TaskTracker,
        finished: CancellationToken,
    ) -> Self {
        Self {
            ctx,
            driver,
            tasks,
            finished,
        }
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let JoinRequest {
            worker_id,
            resume_step,
            session_secret,
        } = req.into_inner();
        let (reply, rx) = oneshot::channel();
        let joined = self
            .driver
            .ask(
                Command::Join {
                    requested_id: worker_id,
                    presented: session_secret,
                    reply,
                },
                rx,
            )
            .await??;
        let worker = joined.worker;
        tracing::info!(%worker, resume_step, "worker joined");
        let ctx = &self.ctx;
        Ok(Response::new(JoinResponse {
            worker_id: worker.id,
            incarnation: worker.incarnation,
            settings_json: ctx.settings_json.clone(),
            batches_per_epoch: ctx.batches_per_epoch,
            classes: u32::try_from(ctx.data.classes)
                .map_err(|_| Error::Internal("more than 2^32 classes".into()))?,
            input_shape: ctx.data.input_shape.iter().map(|&d| d as u64).collect(),
            resume_step,
            sync: Some(pb::SyncSettings {
                every: ctx.cfg.sync.every,
                dtype: pb::DType::from(ctx.cfg.sync.dtype.wire()) as i32,
                chunk_bytes: ctx.cfg.sync.chunk_bytes as u64,
                gradients: ctx.cfg.sync.average == crate::config::SyncAverage::Gradients,
            }),
            session_secret: joined.secret,
        }))
    }

    type BatchesStream = BatchStream;

    async fn batches(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::BatchesStream>, Status> {
        let mut inbound = req.into_inner();
        let hello_timeout = Duration::from_secs_f64(self.ctx.cfg.hello_timeout_secs);
        let first = tokio::time::timeout(hello_timeout, inbound.next())
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "no Hello within {:?} of opening the Batches stream",
                    hello_timeout
                ))
            })?;
        let hello = match first {
            Some(Ok(WorkerMessage {
                kind: Some(worker_message::Kind::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Error::InvalidArgument(
                    "the first message on Batches must be Hello".into(),
                )
                .into());
            }
            Some(Err(s)) => return Err(s),
            None => {
                return Err(
                    Error::InvalidArgument("Batches stream closed before Hello".into()).into(),
                );
            }
        };
        let worker = Worker::new(hello.worker_id, hello.incarnation);
        let (out_tx, out_rx) = mpsc::channel(OUTBOX);
        let (reply, rx) = oneshot::channel();
        let stream = self
            .driver
            .ask(
                Command::OpenStream {
                    worker: worker.clone(),
                    secret: hello.session_secret,
                    credits: hello.credits,
                    outbox: out_tx,
                    reply,
                },
                rx,
            )
            .await??;
        // The response channel is short: the outbox in front of it holds the backlog.
        let (wire, wire_rx) = mpsc::channel(4);
        self.tasks.spawn(feeder::feed(
            self.ctx.clone(),
            stream,
            out_rx,
            wire.clone(),
            self.driver.clone(),
            Duration::from_secs_f64(self.ctx.cfg.stall_timeout_secs),
        ));
        self.tasks.spawn(read_stream(
            inbound,
            wire,
            worker,
            stream,
            self.ctx.param_shapes.clone(),
            self.driver.clone(),
            self.finished.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(wire_rx))))
    }

    async fn run_status(
        &self,
        _req: Request<RunStatusRequest>,
    ) -> Result<Response<RunStatusResponse>, Status> {
        let (reply, rx) = oneshot::channel();
        let view = self.driver.ask(Command::Status { reply }, rx).await?;
        Ok(Response::new(status_response(view)))
    }
}

/// Reads a worker's messages until its stream ends, the run is over or the worker sends
/// something the stream cannot take.
async fn read_stream(
    mut inbound: Streaming<WorkerMessage>,
    // Held so that the response stays open while the worker still talks (its evaluation
    // result comes after the coordinator's `Done`).
    _response: feeder::Wire,
    worker: Worker,
    stream: StreamId,
    shapes: Vec<(String, Vec<usize>)>,
    driver: Handle,
    finished: CancellationToken,
) {
    let mut upload: Option<Upload> = None;
    loop {
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = finished.cancelled() => return,
        };
        let kind = match msg {
            Some(Ok(WorkerMessage { kind: Some(k) })) => k,
            Some(Ok(WorkerMessage { kind: None })) => {
                tracing::warn!(%worker, "empty worker message ignored");
                continue;
            }
            Some(Err(status)) => {
                tracing::warn!(%worker, %status, "batch stream broke");
                break;
            }
            None => break,
        };
        let cmd = match kind {
            worker_message::Kind::Ack(ack) => {
                let pb::Ack {
                    lease_id,
                    loss,
                    wait_seconds,
                    step_seconds,
                    sync_seconds,
                    step: _,
                } = ack;
                Command::Ack {
                    stream,
                    lease_id,
                    times: AckTimes {
                        wait_seconds,
                        step_seconds,
                        sync_seconds,
                        loss,
                    },
                }
            }
            worker_message::Kind::Credits(n) => Command::Credits { stream, n },
            worker_message::Kind::Eval(result) => {
                let pb::EvalResult {
                    errors,
                    total,
                    checkpoint_bytes,
                    checkpoint: _,
                } = result;
                match Checkpoint::from_bytes(&checkpoint_bytes) {
                    // The worker leaves out a checkpoint too large for the wire (the driver
                    // decides whether the run can do without it).
                    _ if checkpoint_bytes.is_empty() => {
                        tracing::warn!(%worker, "the final result came without its checkpoint (over the message-size limit)");
                        Command::Eval {
                            stream,
                            errors,
                            total,
                            checkpoint: None,
                        }
                    }
                    Ok(ck) => Command::Eval {
                        stream,
                        errors,
                        total,
                        checkpoint: Some(Box::new(ck)),
                    },
                    Err(e) => Command::CloseStream {
                        stream,
                        error: Error::InvalidArgument(format!(
                            "final checkpoint from {worker}: {e}"
                        )),
                    },
                }
            }
            worker_message::Kind::Sync(up) => match receive_sync(&shapes, &worker, &mut upload, up)
            {
                Ok(None) => continue,
                Ok(Some(upload)) => Command::Contribute { stream, upload },
                Err(e) => {
                    tracing::warn!(%worker, error = %e, "bad synchronisation message");
                    Command::CloseStream { stream, error: e }
                }
            },
            worker_message::Kind::Hello(_) => Command::CloseStream {
                stream,
                error: Error::InvalidArgument("Hello may only be the first message".into()),
            },
        };
        let closing = matches!(cmd, Command::CloseStream { .. });
        if driver.send(cmd).await.is_err() || closing {
            return;
        }
    }
    tracing::info!(%worker, "worker left; its leases go back in line");
    let _ = driver.send(Command::StreamClosed { stream }).await;
}

/// A contribution being received in chunks.
struct Upload {
    base_version: u64,
    is_final: bool,
    gradients: bool,
    wire_bytes: u64,
    assembler: ParamAssembler,
}

/// Adds one `SyncUp` message to the upload in progress; returns the contribution when it is
/// complete. The `samples` a worker claims are not used: the coordinator weighs a
/// contribution by the rows it knows the worker trained.
fn receive_sync(
    shapes: &[(String, Vec<usize>)],
    worker: &Worker,
    upload: &mut Option<Upload>,
    up: pb::SyncUp,
) -> Result<Option<SyncUpload>, Error> {
    let pb::SyncUp {
        base_version,
        samples: _,
        chunks,
        last,
        r#final,
        gradients,
    } = up;
    let u = upload.get_or_insert_with(|| Upload {
        base_version,
        is_final: r#final,
        gradients,
        wire_bytes: 0,
        assembler: ParamAssembler::new(shapes.to_vec()),
    });
    if (u.base_version, u.is_final, u.gradients) != (base_version, r#final, gradients) {
        return Err(Error::InvalidArgument(
            "SyncUp messages of one contribution disagree on base_version, final or gradients"
                .into(),
        ));
    }
    for c in chunks {
        let bytes = c.values.as_ref().map_or(0, |v| v.data.len() as u64);
        u.wire_bytes = u.wire_bytes.saturating_add(bytes);
        u.assembler
            .add(c)
            .map_err(|e| Error::InvalidArgument(format!("SyncUp from {worker}: {e}")))?;
    }
    if !last {
        return Ok(None);
    }
    let Some(u) = upload.take() else {
        return Ok(None);
    };
    let params = u
        .assembler
        .finish()
        .map_err(|e| Error::InvalidArgument(format!("SyncUp from {worker}: {e}")))?;
    Ok(Some(SyncUpload {
        base_version: u.base_version,
        params: Arc::new(params),
        is_final: u.is_final,
        gradients: u.gradients,
        wire_bytes: u.wire_bytes,
    }))
}

/// `RunStatus` from the driver's snapshot.
fn status_response(view: StatusView) -> RunStatusResponse {
    let StatusView {
        facts,
        members,
        retries,
    } = view;
    let c = &facts.counters;
    RunStatusResponse {
        epoch: facts.progress.epoch,
        epochs: facts.progress.epochs,
        batches_trained: facts.progress.total_acked,
        batches_expected: facts.progress.expected_total,
        samples_per_sec: facts.samples_per_sec,
        student_wait_seconds: c.wait_secs,
        student_step_seconds: c.step_secs,
        members: members
            .into_iter()
            .map(|m| pb::MemberStatus {
                mean_latency_ms: if m.requests > 0 {
                    1e3 * m.total_latency_secs / m.requests as f64
                } else {
                    0.0
                },
                max_latency_ms: 1e3 * m.max_latency_secs,
                member: m.member,
                requests: m.requests,
                failures: m.failures,
                hedged_requests: m.hedged_requests,
                hedge_wins: m.hedge_wins,
                canary_refused: m.canary_refused,
            })
            .collect(),
        queues: facts
            .queues
            .iter()
            .map(|(w, d)| pb::QueueDepth {
                worker_id: w.clone(),
                depth: u32::try_from(*d).unwrap_or(u32::MAX),
            })
            .collect(),
        requeued_batches: facts.ledger.requeued_batches,
        retries,
        done: facts.done,
        degraded_batches: c.degraded_batches,
        resumes: facts.resumes,
        sync_rounds: facts.rounds,
        workers: c
            .per_worker
            .values()
            .map(|w| pb::WorkerSamples {
                worker_id: w.worker_id.clone(),
                samples: w.samples,
                batches: w.batches,
                unaveraged_batches: facts.unaveraged.get(&w.worker_id).copied().unwrap_or(0),
            })
            .collect(),
    }
}
