//! The `distill.v1.Coordinator` gRPC service: thin handlers over [`Run`].

use std::pin::Pin;
use std::sync::Arc;

use distill_proto::pb::coordinator_server::Coordinator;
use distill_proto::pb::{
    self, CoordinatorMessage, JoinRequest, JoinResponse, RunStatusRequest, RunStatusResponse,
    WorkerMessage, worker_message,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::ledger::Worker;
use crate::run::{ContributionHeader, Run};
use distill_proto::params::ParamAssembler;

/// Most credits a worker may hold (its prefetch window is capped at this).
pub const MAX_CREDITS: u32 = 1024;

/// The Coordinator service of one run.
#[derive(Clone)]
pub struct CoordinatorService {
    run: Arc<Run>,
}

impl CoordinatorService {
    /// A service over `run`.
    pub fn new(run: Arc<Run>) -> Self {
        Self { run }
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let JoinRequest {
            worker_id,
            resume_step,
        } = req.into_inner();
        let worker = self.run.join(&worker_id)?;
        tracing::info!(%worker, resume_step, "worker joined");
        Ok(Response::new(JoinResponse {
            worker_id: worker.id,
            incarnation: worker.incarnation,
            settings_json: self.run.settings_json.clone(),
            batches_per_epoch: self.run.batches_per_epoch(),
            classes: self.run.data.classes as u32,
            input_shape: self
                .run
                .data
                .input_shape
                .iter()
                .map(|&d| d as u64)
                .collect(),
            resume_step,
            sync: Some(pb::SyncSettings {
                every: self.run.cfg.sync.every,
                dtype: pb::DType::from(self.run.cfg.sync.dtype.wire()) as i32,
                chunk_bytes: self.run.cfg.sync.chunk_bytes as u64,
            }),
        }))
    }

    type BatchesStream = BatchStream;

    async fn batches(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::BatchesStream>, Status> {
        let mut inbound = req.into_inner();
        let hello = match inbound.next().await {
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
        self.run.check_worker(&worker)?;
        if hello.credits == 0 || hello.credits > MAX_CREDITS {
            return Err(Error::InvalidArgument(format!(
                "Hello.credits must be 1 to {MAX_CREDITS}, got {}",
                hello.credits
            ))
            .into());
        }
        tracing::info!(%worker, credits = hello.credits, "batch stream open");
        let credits = Arc::new(Semaphore::new(hello.credits as usize));
        let (tx, rx) = mpsc::channel(self.run.cfg.prefetch.max(1));
        let stop = CancellationToken::new();
        let (replies, start) = self.run.open_sync(&worker)?;
        let producer = tokio::spawn(self.run.clone().produce(
            worker.clone(),
            credits.clone(),
            tx.clone(),
            replies,
            start,
            stop.clone(),
        ));
        let run = self.run.clone();
        tokio::spawn(async move {
            let mut reported = false;
            let mut upload: Option<Upload> = None;
            let mut producer = producer;
            let mut run_complete = false;
            loop {
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = run.finished.cancelled() => {
                        run_complete = true;
                        break;
                    }
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
                match kind {
                    worker_message::Kind::Ack(ack) => match run.ack(&worker, &ack) {
                        Ok(true) => credits.add_permits(1),
                        Ok(false) => {}
                        Err(e) => tracing::error!(%worker, error = %e, "ack failed"),
                    },
                    worker_message::Kind::Credits(n) => {
                        let n = n.min(MAX_CREDITS) as usize;
                        credits.add_permits(n);
                    }
                    worker_message::Kind::Eval(result) => match run.finish(&worker, &result) {
                        Ok(_) => reported = true,
                        Err(e) => {
                            tracing::error!(%worker, error = %e, "bad evaluation result");
                            let _ = tx.send(Err(Status::from(e))).await;
                        }
                    },
                    worker_message::Kind::Sync(up) => {
                        if let Err(e) = receive_sync(&run, &worker, &mut upload, up) {
                            tracing::warn!(%worker, error = %e, "bad synchronisation message");
                            let _ = tx.send(Err(Status::from(e))).await;
                            break;
                        }
                    }
                    worker_message::Kind::Hello(_) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "Hello may only be the first message",
                            )))
                            .await;
                    }
                }
            }
            if run_complete {
                // The producer is sending `Done`: let it, briefly.
                if tokio::time::timeout(std::time::Duration::from_secs(2), &mut producer)
                    .await
                    .is_err()
                {
                    tracing::debug!(%worker, "producer did not end after the run completed");
                }
                reported = true;
            }
            stop.cancel();
            producer.abort();
            if !reported {
                tracing::warn!(%worker, "worker left; its leases go back in line");
                run.worker_gone(&worker);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn run_status(
        &self,
        _req: Request<RunStatusRequest>,
    ) -> Result<Response<RunStatusResponse>, Status> {
        Ok(Response::new(self.run.status()?))
    }
}

/// A contribution being received in chunks.
struct Upload {
    header: ContributionHeader,
    assembler: ParamAssembler,
}

/// Adds one `SyncUp` message to the upload in progress; hands the contribution to the run when
/// it is complete.
fn receive_sync(
    run: &Run,
    worker: &Worker,
    upload: &mut Option<Upload>,
    up: pb::SyncUp,
) -> Result<(), Error> {
    let pb::SyncUp {
        base_version,
        samples,
        chunks,
        last,
        r#final,
    } = up;
    let u = upload.get_or_insert_with(|| Upload {
        header: ContributionHeader {
            base_version,
            samples,
            is_final: r#final,
            wire_bytes: 0,
        },
        assembler: ParamAssembler::new(run.param_shapes.clone()),
    });
    if (u.header.base_version, u.header.samples, u.header.is_final)
        != (base_version, samples, r#final)
    {
        return Err(Error::InvalidArgument(
            "SyncUp messages of one contribution disagree on base_version, samples or final".into(),
        ));
    }
    for c in chunks {
        u.header.wire_bytes += c.values.as_ref().map_or(0, |v| v.data.len() as u64);
        u.assembler
            .add(c)
            .map_err(|e| Error::InvalidArgument(format!("SyncUp from {worker}: {e}")))?;
    }
    if last && let Some(u) = upload.take() {
        let params = u
            .assembler
            .finish()
            .map_err(|e| Error::InvalidArgument(format!("SyncUp from {worker}: {e}")))?;
        run.contribute(worker, u.header, params)?;
    }
    Ok(())
}

impl From<&pb::Hello> for Worker {
    fn from(h: &pb::Hello) -> Self {
        Worker::new(h.worker_id.clone(), h.incarnation)
    }
}
