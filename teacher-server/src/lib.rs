//! `teacher-server`: serves one model's tempered logits z/T over gRPC (`distill.v1.Teacher`,
//! and the Open Inference Protocol's `inference.GRPCInferenceService` on the same port: [`oip`]),
//! with dynamic batching on a dedicated compute thread, input validation, an in-flight limit,
//! standard health and reflection services, and graceful shutdown.
//!
//! The binary is a thin wrapper: it parses flags, installs the signal handler, binds the
//! listener and calls [`serve`]. Tests call [`serve`] in-process on `127.0.0.1:0`.

pub mod batcher;
pub mod bench;
pub mod cli;
pub mod error;
pub mod oip;
pub mod register;
pub mod sequence;
pub mod service;
pub mod telemetry;

use std::time::Duration;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::teacher_server::TeacherServer;
use distill_proto::pb_oip::grpc_inference_service_server::GrpcInferenceServiceServer;
use distill_transport::{Access, Role, ServerSecurity};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};
pub use service::{Engine, ModelInfo, SequenceInfo, TeacherService};

use batcher::{BatchConfig, Batcher};

/// Default largest gRPC message in either direction (64 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Serving options (everything but the model).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Ensemble member this replica serves.
    pub member: String,
    /// Most rows per forward pass and per request.
    pub max_batch: usize,
    /// Longest wait to fill a batch after its first request.
    pub max_delay: Duration,
    /// Most requests in flight (queued or computing); more get RESOURCE_EXHAUSTED.
    pub max_inflight: usize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Extra latency per forward pass, a benchmarking aid (0 normally).
    pub simulate_latency: Duration,
    /// Sequence models: most padded tokens (sequences × L) per request and per forward pass.
    pub max_tokens: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            member: "default".into(),
            max_batch: 1024,
            max_delay: Duration::from_millis(2),
            max_inflight: 64,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            simulate_latency: Duration::ZERO,
            max_tokens: 4096,
        }
    }
}

/// Builds the service for a checkpoint: loads the model on `device`, starts its compute thread.
pub fn build_service(
    ck: &Checkpoint,
    device: &Device,
    opts: &ServeOptions,
) -> Result<TeacherService> {
    if opts.max_batch == 0 || opts.max_inflight == 0 {
        return Err(Error::InvalidArgument(
            "max-batch and max-inflight must be at least 1".into(),
        ));
    }
    let model = ck.to_model(device)?;
    let digest = ck.digest();
    let info = ModelInfo {
        model_id: format!("{}@{}", ck.spec.arch, &digest[..16]),
        member: opts.member.clone(),
        input_shape: ck.spec.arch.input_shape(),
        classes: ck.spec.arch.classes(),
        digest,
        arch: ck.spec.arch.to_string(),
        max_batch: opts.max_batch,
        sequence: None,
    };
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(opts.max_inflight));
    let batcher = Batcher::start(
        model,
        BatchConfig {
            max_batch: opts.max_batch,
            max_delay: opts.max_delay,
            simulate_latency: opts.simulate_latency,
        },
        opts.max_inflight,
        inflight.clone(),
    )
    .map_err(|e| Error::Compute(format!("starting the compute thread: {e}")))?;
    Ok(TeacherService::new(
        info,
        Engine::Rows(batcher),
        inflight,
        opts.max_inflight,
    ))
}

/// Builds the service for a language model (a GGUF file or a Hugging Face directory, see
/// [`distill_core::lm`]): every position of every sequence answered in the top-k encoding.
pub fn build_sequence_service(
    lm: distill_core::lm::LanguageModel,
    opts: &ServeOptions,
) -> Result<TeacherService> {
    if opts.max_tokens == 0 || opts.max_inflight == 0 {
        return Err(Error::InvalidArgument(
            "max-tokens and max-inflight must be at least 1".into(),
        ));
    }
    let cfg = lm.model.config().clone();
    let max_len = cfg.max_position_embeddings.min(opts.max_tokens);
    let info = ModelInfo {
        model_id: lm.model_id(),
        member: opts.member.clone(),
        input_shape: vec![max_len],
        classes: cfg.vocab_size,
        digest: lm.digest.clone(),
        arch: lm.arch(),
        max_batch: opts.max_tokens / max_len.max(1),
        sequence: Some(SequenceInfo {
            tokenizer_digest: lm.tokenizer_digest.clone(),
            max_tokens: opts.max_tokens,
            max_len,
        }),
    };
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(opts.max_inflight));
    let batcher = sequence::SeqBatcher::start(
        lm,
        opts.max_tokens,
        opts.max_delay,
        opts.max_inflight,
        inflight.clone(),
    )
    .map_err(|e| Error::Compute(format!("starting the compute thread: {e}")))?;
    Ok(TeacherService::new(
        info,
        Engine::Tokens(batcher),
        inflight,
        opts.max_inflight,
    ))
}

/// Whether `path` names a language model (a `.gguf` file or a directory with `config.json`)
/// rather than a distill checkpoint.
pub fn is_language_model(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf") || path.join("config.json").is_file()
}

/// Loads a checkpoint file for serving.
pub fn load_checkpoint(path: &std::path::Path) -> Result<Checkpoint> {
    Ok(Checkpoint::read(path)?)
}

/// Serves `service` on `listener` in plaintext with no credential (a trusted loopback: tests,
/// the demo), as [`serve_with`].
pub async fn serve(
    service: TeacherService,
    listener: TcpListener,
    max_message_bytes: usize,
    shutdown: CancellationToken,
) -> Result<()> {
    serve_with(
        service,
        listener,
        max_message_bytes,
        &ServerSecurity::plaintext(),
        shutdown,
    )
    .await
}

/// Which credential each RPC of a teacher needs: `Teacher` calls the infer one, reflection any
/// credential of this server, health none.
pub fn policy(path: &str) -> Access {
    if path.starts_with(distill_transport::auth::HEALTH_PREFIX) {
        Access::Open
    } else if path.starts_with("/distill.v1.Teacher/")
        || path.starts_with("/inference.GRPCInferenceService/")
    {
        Access::Role(Role::Infer)
    } else {
        Access::AnyRole
    }
}

/// Serves `service` on `listener` under `security` (TLS, credentials, limits) until
/// `shutdown` is cancelled, then flips health to NOT_SERVING, lets in-flight requests finish
/// and returns.
pub async fn serve_with(
    service: TeacherService,
    listener: TcpListener,
    max_message_bytes: usize,
    security: &ServerSecurity,
    shutdown: CancellationToken,
) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        security.warn_if_exposed(addr, "the teacher server");
    }
    let builder = security
        .builder(policy)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TeacherServer<TeacherService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distill_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Compute(format!("reflection service: {e}")))?;
    let info = service.info().clone();
    let drain_view = service.clone();
    let oip =
        GrpcInferenceServiceServer::new(oip::OipService::new(service.clone(), shutdown.clone()))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
    let teacher = TeacherServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tracing::info!(model = %info.model_id, member = %info.member, max_batch = info.max_batch, "teacher serving");
    let stop = shutdown.clone();
    let signal = async move {
        stop.cancelled().await;
        tracing::info!("shutting down: health NOT_SERVING, draining in-flight requests");
        health_reporter
            .set_not_serving::<TeacherServer<TeacherService>>()
            .await;
    };
    let server = builder
        .http2_adaptive_window(Some(true))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(teacher)
        .add_service(oip)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    // tonic's graceful shutdown also waits for idle client connections to close, which a
    // long-lived client (a coordinator) never does: once every request in flight is answered,
    // or after DRAIN_GRACE, the remaining connections are dropped.
    let drained = async {
        shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        while drain_view.inflight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Let the last replies leave the socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::select! {
        r = server => r?,
        _ = drained => {}
    }
    tracing::info!("teacher server stopped");
    Ok(())
}

/// Longest wait for in-flight requests after a shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
