//! `student-worker`: trains a student network on batches streamed by the coordinator
//! (`distill.v1.Coordinator`), with the knowledge-distillation loss of Hinton et al. (2015).
//!
//! # Flow of [`run`]
//! 1. Read the worker checkpoint in the work dir, if any (see [`student`]), for its step.
//! 2. `Join{worker_id, resume_step}`, retrying with exponential backoff while the coordinator
//!    is unreachable (UNAVAILABLE, or the connection broke), until [`WorkerConfig::connect_timeout`]: a worker may start
//!    before its coordinator.
//! 3. Parse and validate `settings_json`; check the student fits the data (`input_shape`,
//!    `classes`); build the student on the training thread ([`trainer`]), fresh or resumed.
//! 4. Open `Batches` with `Hello{worker_id, incarnation, credits: prefetch}`. Each `TrainBatch`
//!    is trained (one update) and acked; every ack returns one credit, so the window stays at
//!    `prefetch` and no `credits` message is ever sent. `EvalBatch`es are scored; on `Done` the
//!    final checkpoint is written, `EvalResult` (errors, total, file name, the checkpoint's
//!    bytes) is sent, the stream is half-closed, and the worker waits (bounded) for the
//!    coordinator to end its side before returning the [`WorkerReport`].
//!
//! # Decisions written down here
//! - `JoinResponse.resume_step` is the coordinator's word: equal to the local checkpoint's step
//!   → resume from it; 0 → start fresh (the local checkpoint is overwritten at the next save);
//!   anything else → [`Error::Settings`] (the worker cannot resume from a step it does not have).
//! - Without `worker_id`, the id the coordinator assigns is stored in `work_dir/worker_id` and
//!   reused on restart, so a restarted worker is recognised as the same worker.
//! - A malformed batch ends the run with [`Error::BadBatch`] naming the field (after writing a
//!   checkpoint: nothing was trained on the bad batch).
//! - On shutdown the worker stops taking batches, finishes the update in progress, acks it,
//!   writes a checkpoint and returns [`Error::Cancelled`]; unacked batches go back to the
//!   coordinator's queue when their leases expire.
//! - An `EvalResult` whose checkpoint would exceed the message-size limit is sent without the
//!   bytes (logged); the file stays in the work dir.

#[cfg(feature = "nccl")]
pub mod allreduce;
pub mod cli;
pub mod decode;
pub mod error;
pub mod objective;
pub mod student;
pub mod telemetry;
pub mod trainer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use distill_core::settings::StudentSettings;
use distill_proto::pb;
use distill_proto::pb::coordinator_client::CoordinatorClient;
use distill_transport::{AuthChannel, ClientSecurity};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};

use decode::BatchSpec;
use distill_proto::params::ParamAssembler;
use trainer::{Command, Outcome, ParamsDown, Setup, SyncSettings, Up};

/// Default largest gRPC message in either direction (64 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default batches the worker holds ahead of training.
pub const DEFAULT_PREFETCH: u32 = 4;
/// Default time to keep trying to reach the coordinator.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// File in the work dir holding the worker id the coordinator assigned.
pub const WORKER_ID_FILE: &str = "worker_id";
/// How long to wait for the coordinator to close the stream after the `EvalResult`.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// How to run a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, `http://host:port`.
    pub coordinator: String,
    /// Where the student trains.
    pub device: Device,
    /// Where checkpoints (and the assigned worker id) go; a restart with the same dir resumes.
    pub work_dir: PathBuf,
    /// Stable worker name; None: the one stored in `work_dir`, else the coordinator picks.
    pub worker_id: Option<String>,
    /// Batches held ahead of training (the credit window, >= 1).
    pub prefetch: u32,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// How long to keep retrying an unreachable coordinator before giving up.
    pub connect_timeout: Duration,
    /// TLS towards the coordinator, and the worker credential presented.
    pub security: ClientSecurity,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:50052".into(),
            device: Device::Cpu,
            work_dir: PathBuf::from("student-work"),
            worker_id: None,
            prefetch: DEFAULT_PREFETCH,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            security: ClientSecurity::plaintext(),
        }
    }
}

/// What a finished worker did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerReport {
    /// The id the worker ran under.
    pub worker_id: String,
    /// The student's update count at the end (including updates before a resume).
    pub steps: u64,
    /// Training batches trained in this session.
    pub batches: u64,
    /// Training rows trained in this session.
    pub samples: u64,
    /// Misclassified test rows of the final student.
    pub test_errors: u64,
    /// Test rows evaluated.
    pub test_total: u64,
    /// Seconds the training thread sat idle waiting for batches.
    pub wait_seconds: f64,
    /// Seconds spent in training steps.
    pub step_seconds: f64,
    /// Seconds blocked in synchronisation rounds.
    pub sync_seconds: f64,
    /// Averaged parameter sets taken.
    pub rounds: u64,
    /// The final student checkpoint.
    pub checkpoint: PathBuf,
}

/// Joins the coordinator's run, trains until `Done`, evaluates, reports; see the module docs.
/// Returns [`Error::Cancelled`] (after writing a checkpoint) when `shutdown` fires first.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<WorkerReport> {
    if cfg.prefetch == 0 {
        return Err(Error::Config("prefetch must be at least 1".into()));
    }
    if cfg.max_message_bytes < 1 << 16 {
        return Err(Error::Config(format!(
            "max_message_bytes {} is too small (at least 64 KiB)",
            cfg.max_message_bytes
        )));
    }
    let work_dir = cfg.work_dir.clone();
    std::fs::create_dir_all(&work_dir).map_err(|e| Error::io(&work_dir, e))?;
    let dir = work_dir.clone();
    let local = tokio::task::spawn_blocking(move || student::read_checkpoint(&dir))
        .await
        .map_err(|e| Error::Panic(e.to_string()))??;
    let local_step = match &local {
        Some(ck) => student::checkpoint_step(ck).map_err(|msg| Error::Resume {
            dir: work_dir.clone(),
            msg,
        })?,
        None => 0,
    };
    let worker_id = match &cfg.worker_id {
        Some(id) => id.clone(),
        None => read_worker_id(&work_dir)?.unwrap_or_default(),
    };

    let channel = channel(&cfg)?;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let join = join(&mut client, &cfg, worker_id, "", local_step, &shutdown).await?;
    let pb::JoinResponse {
        worker_id,
        incarnation,
        settings_json,
        batches_per_epoch,
        classes,
        input_shape,
        resume_step,
        sync,
        session_secret,
    } = join;
    // Held for this process only: a rejoin after a broken stream presents it.
    let mut session_secret = session_secret;
    let sync = sync_settings(sync)?;
    if cfg.worker_id.is_none() && !worker_id.is_empty() {
        distill_core::fsutil::atomic_write(&work_dir.join(WORKER_ID_FILE), worker_id.as_bytes())?;
    }
    let settings = parse_settings(&settings_json)?;
    let batch_spec = check_fit(&settings, classes, &input_shape, batches_per_epoch)?;
    let resume = match (resume_step, local) {
        (0, Some(_)) if local_step > 0 => {
            tracing::warn!(
                local_step,
                "the coordinator starts this worker afresh; the old checkpoint will be replaced"
            );
            None
        }
        (0, _) => None,
        (r, Some(ck)) if r == local_step => Some(ck),
        (r, _) => {
            return Err(Error::Settings(format!(
                "the coordinator asks to resume from update {r}, but the checkpoint in {} is at \
                 update {local_step}",
                work_dir.display()
            )));
        }
    };
    tracing::info!(%worker_id, incarnation, resume_step, batches_per_epoch, arch = %settings.spec.arch, "joined the run");

    let window = cfg.prefetch as usize;
    let shapes = settings.spec.arch.param_shapes();
    let reader_spec = batch_spec.clone();
    let stop = CancellationToken::new();
    let stream = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let training = trainer::spawn(
        Setup {
            settings,
            batches_per_epoch,
            batch_spec,
            device: cfg.device.clone(),
            work_dir: work_dir.clone(),
            worker_id: worker_id.clone(),
            resume,
            sync,
            stream: stream.clone(),
        },
        window + 2,
        stop.clone(),
    )?;
    let (sync_dtype, sync_chunk) = (sync.dtype, sync.chunk_bytes);
    let trainer::TrainingThread {
        commands,
        mut acks,
        done,
    } = training;

    // Acks are bounded by the credit window; a few more slots for Hello and EvalResult.
    let (out_tx, out_rx) = mpsc::channel::<pb::WorkerMessage>(window + 4);
    let hello = pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: worker_id.clone(),
            incarnation,
            credits: cfg.prefetch,
            session_secret: session_secret.clone(),
        })),
    };
    out_tx
        .send(hello)
        .await
        .map_err(|_| Error::Protocol("the outgoing stream closed before Hello".into()))?;
    let inbound = tokio::select! {
        r = client.batches(ReceiverStream::new(out_rx)) => r?.into_inner(),
        _ = shutdown.cancelled() => {
            drop(commands);
            return Err(stopped(done, &stop).await);
        }
    };
    // A worker whose stream breaks (the coordinator died or restarted) joins again and carries
    // on: with synchronisation rounds from the average it is sent first (the average is the
    // model), without them from its own parameters (the restarted coordinator re-leases what
    // its last commit point lacks). It keeps a command sender so that its training thread
    // outlives the stream.
    let mut keep_commands = Some(commands.clone());
    let mut reader: JoinHandle<Result<()>> = tokio::spawn(read_batches(
        inbound,
        commands,
        shapes.clone(),
        reader_spec.clone(),
        cfg.device.clone(),
        0,
    ));
    let mut reader_result: Option<Result<()>> = None;
    let mut cancelled = false;
    let mut out_tx = out_tx;

    // Forward acks until the training thread ends (its ack channel closes).
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !cancelled => {
                tracing::info!("shutdown: finishing the current update and writing a checkpoint");
                cancelled = true;
                stop.cancel();
                keep_commands = None;
                reader.abort(); // drops the command sender, waking the training thread
            }
            up = acks.recv() => match up {
                Some(Up::Ack(_, n) | Up::Sync(_, n))
                    if n < stream.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    tracing::debug!(stream = n, "an ack or contribution of an earlier stream dropped");
                }
                Some(Up::Ack(ack, _)) => {
                    let msg = pb::WorkerMessage { kind: Some(pb::worker_message::Kind::Ack(ack)) };
                    if out_tx.send(msg).await.is_err() {
                        tracing::warn!("the batch stream is gone; acks are dropped");
                    }
                }
                Some(Up::Sync(c, _)) => {
                    if let Err(e) = send_contribution(&out_tx, *c, sync_dtype, sync_chunk).await {
                        tracing::warn!(error = %e, "could not send the parameters");
                    }
                }
                None => break,
            },
            r = &mut reader, if reader_result.is_none() => {
                let r = r.unwrap_or_else(|e| if e.is_cancelled() { Ok(()) } else { Err(Error::Panic(e.to_string())) });
                if let (Err(e), Some(commands)) = (&r, &keep_commands)
                    && is_stream_break(e)
                {
                    tracing::warn!(error = %e, "the batch stream broke; joining the run again");
                    match reopen(&mut client, &cfg, &worker_id, &session_secret, &shutdown).await {
                        Ok((tx, inbound, secret)) => {
                            out_tx = tx;
                            session_secret = secret;
                            let n = stream.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
                            reader = tokio::spawn(read_batches(
                                inbound,
                                commands.clone(),
                                shapes.clone(),
                                reader_spec.clone(),
                                cfg.device.clone(),
                                n,
                            ));
                            continue;
                        }
                        Err(e) => tracing::error!(error = %e, "could not join the run again"),
                    }
                }
                keep_commands = None;
                if r.is_err() {
                    stop.cancel(); // the stream is broken: acks cannot reach the coordinator
                }
                reader_result = Some(r);
            }
        }
    }
    let outcome = done.await.unwrap_or_else(|_| {
        Err(Error::Panic(
            "training thread ended without a result".into(),
        ))
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            reader.abort();
            return Err(e);
        }
    };
    if cancelled {
        return Err(Error::Cancelled {
            step: outcome.steps,
        });
    }
    if !outcome.completed {
        // The training thread stopped because the reader ended: its result says why.
        let r = match reader_result {
            Some(r) => r,
            None => reader
                .await
                .unwrap_or_else(|e| Err(Error::Panic(e.to_string()))),
        };
        return Err(match r {
            Err(e) => e,
            Ok(()) => Error::Protocol("the batch stream ended before Done".into()),
        });
    }
    // Only the worker the coordinator asked to evaluate has a result to send.
    if outcome.test_total > 0 {
        send_result(&out_tx, &outcome, cfg.max_message_bytes).await;
    }
    drop(out_tx); // half-close: nothing more from this worker
    if reader_result.is_none() {
        tokio::select! {
            r = &mut reader => {
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "the batch stream ended with an error after Done");
                }
            }
            _ = tokio::time::sleep(CLOSE_GRACE) => {
                tracing::warn!("the coordinator did not close the batch stream after the result");
                reader.abort();
            }
            _ = shutdown.cancelled() => reader.abort(),
        }
    }
    let Outcome {
        completed: _,
        steps,
        batches,
        samples,
        test_errors,
        test_total,
        wait_seconds,
        step_seconds,
        sync_seconds,
        rounds,
        checkpoint,
        checkpoint_bytes: _,
    } = outcome;
    Ok(WorkerReport {
        worker_id,
        steps,
        batches,
        samples,
        test_errors,
        test_total,
        wait_seconds,
        step_seconds,
        sync_seconds,
        rounds,
        checkpoint,
    })
}

/// Whether a reader error means the stream (or the coordinator) went away, not that the
/// coordinator refused this worker or sent something malformed.
fn is_stream_break(e: &Error) -> bool {
    match e {
        Error::Protocol(_) => true,
        Error::Rpc(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Internal
        ),
        _ => false,
    }
}

/// Joins the run again (a new incarnation, retried with backoff while the coordinator is
/// unreachable), presenting the session secret of the incarnation whose stream broke, and
/// opens a new batch stream; returns its sender, its inbound side and the new secret.
async fn reopen(
    client: &mut CoordinatorClient<AuthChannel>,
    cfg: &WorkerConfig,
    worker_id: &str,
    session_secret: &str,
    shutdown: &CancellationToken,
) -> Result<(
    mpsc::Sender<pb::WorkerMessage>,
    tonic::Streaming<pb::CoordinatorMessage>,
    String,
)> {
    let j = join(
        client,
        cfg,
        worker_id.to_string(),
        session_secret,
        0,
        shutdown,
    )
    .await?;
    tracing::info!(
        worker_id,
        incarnation = j.incarnation,
        "joined the run again"
    );
    let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(cfg.prefetch as usize + 4);
    tx.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: worker_id.to_string(),
            incarnation: j.incarnation,
            credits: cfg.prefetch,
            session_secret: j.session_secret.clone(),
        })),
    })
    .await
    .map_err(|_| Error::Protocol("the outgoing stream closed before Hello".into()))?;
    let inbound = client.batches(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound, j.session_secret))
}

/// Ends a training thread that got no batches and returns the cancellation error.
async fn stopped(
    done: tokio::sync::oneshot::Receiver<Result<Outcome>>,
    stop: &CancellationToken,
) -> Error {
    stop.cancel();
    match done.await {
        Ok(Ok(o)) => Error::Cancelled { step: o.steps },
        Ok(Err(e)) => e,
        Err(_) => Error::Panic("training thread ended without a result".into()),
    }
}

/// Turns the coordinator's `SyncSettings` into the trainer's.
fn sync_settings(s: Option<pb::SyncSettings>) -> Result<SyncSettings> {
    let Some(s) = s else {
        return Ok(SyncSettings::default());
    };
    let dtype = distill_proto::DType::try_from(s.dtype)
        .ok()
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::Settings(format!("sync.dtype {} is not F32, F16 or BF16", s.dtype))
        })?;
    if s.gradients && s.every != 1 {
        return Err(Error::Settings(format!(
            "sync.gradients needs every = 1, got {}",
            s.every
        )));
    }
    if s.every > 0 && s.chunk_bytes < 1024 {
        return Err(Error::Settings(format!(
            "sync.chunk_bytes {} is below 1024",
            s.chunk_bytes
        )));
    }
    Ok(SyncSettings {
        every: s.every,
        dtype,
        chunk_bytes: usize::try_from(s.chunk_bytes).unwrap_or(usize::MAX),
        gradients: s.gradients,
    })
}

/// Streams the worker's parameters to the coordinator as a run of `SyncUp` messages.
async fn send_contribution(
    out: &mpsc::Sender<pb::WorkerMessage>,
    c: trainer::SyncOut,
    dtype: distill_proto::DType,
    chunk_bytes: usize,
) -> Result<()> {
    let groups = distill_proto::params::to_chunk_groups(&c.params, dtype, chunk_bytes)
        .map_err(|e| Error::Protocol(format!("encoding parameters: {e}")))?;
    let n = groups.len();
    for (i, chunks) in groups.into_iter().enumerate() {
        let msg = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Sync(pb::SyncUp {
                base_version: c.base_version,
                samples: c.samples,
                chunks,
                last: i + 1 == n,
                r#final: c.is_final,
                gradients: c.gradients,
            })),
        };
        out.send(msg)
            .await
            .map_err(|_| Error::Protocol("the batch stream is gone".into()))?;
    }
    Ok(())
}

async fn send_result(out: &mpsc::Sender<pb::WorkerMessage>, o: &Outcome, max_bytes: usize) {
    let name = o
        .checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Leave room for the other fields and framing.
    let bytes = if o.checkpoint_bytes.len() + 4096 > max_bytes {
        tracing::warn!(
            bytes = o.checkpoint_bytes.len(),
            max_bytes,
            "the checkpoint exceeds the message-size limit; sending the result without it"
        );
        bytes::Bytes::new()
    } else {
        o.checkpoint_bytes.clone()
    };
    let msg = pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Eval(pb::EvalResult {
            errors: o.test_errors,
            total: o.test_total,
            checkpoint: name,
            checkpoint_bytes: bytes,
        })),
    };
    if out.send(msg).await.is_err() {
        tracing::warn!("the batch stream closed before the evaluation result could be sent");
    }
}

/// Reads the coordinator's side of the batch stream into the training thread's commands.
/// Returns Ok when the stream ends after `Done`; an error when it breaks or ends before.
async fn read_batches(
    mut inbound: tonic::Streaming<pb::CoordinatorMessage>,
    commands: mpsc::Sender<Command>,
    shapes: Vec<(String, Vec<usize>)>,
    batch_spec: BatchSpec,
    device: Device,
    generation: u64,
) -> Result<()> {
    use pb::coordinator_message::Kind;
    let mut done = false;
    let mut download: Option<(u64, ParamAssembler)> = None;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) if done => return Ok(()),
            Ok(None) => {
                return Err(Error::Protocol(
                    "the coordinator closed the batch stream before Done".into(),
                ));
            }
            Err(s) if done => {
                tracing::debug!(status = %s, "batch stream ended after Done");
                return Ok(());
            }
            Err(s) => return Err(s.into()),
        };
        let pb::CoordinatorMessage { kind } = msg;
        let cmd = match kind {
            Some(_) if done => {
                tracing::warn!("message after Done ignored");
                continue;
            }
            Some(Kind::Params(d)) => {
                let pb::SyncDown {
                    version,
                    chunks,
                    last,
                    unchanged,
                    contributors,
                } = d;
                if unchanged {
                    if download.is_some() {
                        return Err(Error::BadBatch(
                            "SyncDown: `unchanged` in the middle of a parameter download".into(),
                        ));
                    }
                    Command::Params(Box::new(ParamsDown {
                        version,
                        params: None,
                        contributors,
                        stream: generation,
                    }))
                } else {
                    let (v, assembler) = download
                        .get_or_insert_with(|| (version, ParamAssembler::new(shapes.clone())));
                    if *v != version {
                        return Err(Error::BadBatch(format!(
                            "SyncDown: version {version} in the middle of version {v}"
                        )));
                    }
                    for c in chunks {
                        assembler
                            .add(c)
                            .map_err(|e| Error::BadBatch(format!("SyncDown: {e}")))?;
                    }
                    if !last {
                        continue;
                    }
                    let Some((_, assembler)) = download.take() else {
                        continue;
                    };
                    let params = assembler
                        .finish()
                        .map_err(|e| Error::BadBatch(format!("SyncDown: {e}")))?;
                    Command::Params(Box::new(ParamsDown {
                        version,
                        params: Some(params),
                        contributors,
                        stream: generation,
                    }))
                }
            }
            Some(Kind::SyncNow(pb::SyncNow { r#final })) => Command::SyncNow(r#final),
            Some(Kind::Train(b)) => {
                // Decode and copy to the device here, off the training thread, so it overlaps
                // the update in progress.
                let (spec, dev) = (batch_spec.clone(), device.clone());
                let ready = tokio::task::spawn_blocking(move || {
                    decode::decode_train(b, &spec).and_then(|d| student::upload(d, &dev))
                })
                .await;
                match ready {
                    Ok(Ok(u)) => Command::Uploaded(Box::new(u), generation),
                    Ok(Err(e)) => Command::Invalid(e),
                    Err(e) => Command::Invalid(Error::Panic(e.to_string())),
                }
            }
            Some(Kind::Eval(b)) => Command::Eval(Box::new(b)),
            Some(Kind::Done(pb::Done { reason })) => {
                tracing::info!(%reason, "coordinator: done");
                done = true;
                Command::Finish
            }
            None => {
                tracing::warn!("empty (or unknown) coordinator message ignored");
                continue;
            }
        };
        if commands.send(cmd).await.is_err() {
            // The training thread ended; its own result says why.
            return Ok(());
        }
    }
}

fn channel(cfg: &WorkerConfig) -> Result<AuthChannel> {
    let bad = |msg: String| Error::Connect {
        url: cfg.coordinator.clone(),
        msg,
    };
    let ep = cfg
        .security
        .endpoint(&cfg.coordinator)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Notice a dead coordinator on an idle stream.
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(cfg.security.channel(ep))
}

/// `Join`, retried with exponential backoff while the coordinator is UNAVAILABLE.
async fn join(
    client: &mut CoordinatorClient<AuthChannel>,
    cfg: &WorkerConfig,
    worker_id: String,
    session_secret: &str,
    resume_step: u64,
    shutdown: &CancellationToken,
) -> Result<pb::JoinResponse> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut req = tonic::Request::new(pb::JoinRequest {
            worker_id: worker_id.clone(),
            resume_step,
            session_secret: session_secret.to_string(),
        });
        req.set_timeout(Duration::from_secs(30));
        let status = tokio::select! {
            r = client.join(req) => match r {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) => s,
            },
            _ = shutdown.cancelled() => return Err(Error::Cancelled { step: resume_step }),
        };
        if !is_transient(&status) {
            return Err(status.into());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Connect {
                url: cfg.coordinator.clone(),
                msg: format!(
                    "still unavailable after {:?}: {}",
                    cfg.connect_timeout,
                    status.message()
                ),
            });
        }
        tracing::info!(url = %cfg.coordinator, retry_in = ?backoff, "coordinator unavailable: {}", status.message());
        // A retry backoff, not synchronisation: nothing signals the coordinator's arrival.
        tokio::select! {
            _ = tokio::time::sleep(backoff.min(deadline - now)) => {},
            _ = shutdown.cancelled() => return Err(Error::Cancelled { step: resume_step }),
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Whether a failed call is worth retrying: the coordinator is UNAVAILABLE (not up yet,
/// draining) or the connection broke before an answer (then the status, UNKNOWN or CANCELLED,
/// has a `tonic::transport::Error` source). Join may be repeated: a repeat only bumps the
/// worker's incarnation.
fn is_transient(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    s.code() == tonic::Code::Unavailable
        || s.source()
            .is_some_and(|e| e.is::<tonic::transport::Error>())
}

fn parse_settings(json: &str) -> Result<StudentSettings> {
    let s: StudentSettings =
        serde_json::from_str(json).map_err(|e| Error::Settings(format!("settings_json: {e}")))?;
    s.validate()
        .map_err(|e| Error::Settings(format!("settings_json: {e}")))?;
    Ok(s)
}

/// Checks that the student fits the data the coordinator will send.
fn check_fit(
    s: &StudentSettings,
    classes: u32,
    input_shape: &[u64],
    batches_per_epoch: u64,
) -> Result<BatchSpec> {
    let arch = &s.spec.arch;
    let shape: Vec<usize> = input_shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Settings(format!("input_shape {input_shape:?} is too large")))?;
    let row = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(0);
    let positions = match arch.llama() {
        // A language model reads windows of L + 1 tokens, L up to its positions.
        Some(cfg) => match shape.as_slice() {
            &[w] if w >= 2 && w - 1 <= cfg.max_position_embeddings => Some(w - 1),
            _ => {
                return Err(Error::Settings(format!(
                    "the data's rows have shape {shape:?} but the student {arch} takes windows \
                     of 2 to {} tokens",
                    cfg.max_position_embeddings.saturating_add(1)
                )));
            }
        },
        None => None,
    };
    if positions.is_none() && (shape.is_empty() || row != arch.input_size()) {
        return Err(Error::Settings(format!(
            "the data's rows have shape {shape:?} but the student {arch} takes {} values",
            arch.input_size()
        )));
    }
    if classes as usize != arch.classes() {
        return Err(Error::Settings(format!(
            "the data has {classes} classes but the student {arch} outputs {}",
            arch.classes()
        )));
    }
    if batches_per_epoch == 0 {
        return Err(Error::Settings("batches_per_epoch is 0".into()));
    }
    Ok(BatchSpec {
        input_shape: shape,
        classes: classes as usize,
        temperature: s.temperature,
        positions,
    })
}

fn read_worker_id(dir: &Path) -> Result<Option<String>> {
    let p = dir.join(WORKER_ID_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(p, e)),
    }
}
