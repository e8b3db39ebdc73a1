//! The `distill.v1.Teacher` gRPC service: validate → convert → batch → reply.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use distill_proto::pb::teacher_server::Teacher;
use distill_proto::pb::{
    self, DescribeRequest, DescribeResponse, InferRequest, InferResponse, InferStreamResponse,
    RequestError, infer_stream_response,
};
use distill_proto::{DType, HostTensor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::batcher::{Batcher, Job};
use crate::error::{Error, Result};
use crate::sequence::{SeqBatcher, SeqJob};
use crate::telemetry::{self, Protocol};
use distill_core::topk::TopKFormat;

/// What the service knows about its model.
#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    /// `arch@digest16`.
    pub model_id: String,
    /// Ensemble member name.
    pub member: String,
    /// One input row's shape.
    pub input_shape: Vec<usize>,
    /// Logits per row.
    pub classes: usize,
    /// Full SHA-256 of the weights.
    pub digest: String,
    /// Architecture string.
    pub arch: String,
    /// Most rows per request.
    pub max_batch: usize,
    /// A sequence model's limits and tokenizer (None for a classifier).
    pub sequence: Option<SequenceInfo>,
}

/// What a sequence model (a language model) adds to [`ModelInfo`].
#[derive(Debug, Clone, Default)]
pub struct SequenceInfo {
    /// The tokenizer's digest.
    pub tokenizer_digest: String,
    /// Most padded tokens (rows × L) per request and per forward pass.
    pub max_tokens: usize,
    /// Longest sequence.
    pub max_len: usize,
}

/// What computes the answers: a classifier's row batcher or a sequence model's.
#[derive(Clone)]
pub enum Engine {
    /// Rows of features → tempered logits.
    Rows(Batcher),
    /// Token sequences → top-k rows per position.
    Tokens(crate::sequence::SeqBatcher),
}

/// A request that passed validation, ready for the batcher.
pub struct Validated {
    /// The decoded rows and where their answer goes.
    pub job: Job,
    /// Receives the tempered logits.
    pub reply: oneshot::Receiver<Result<Vec<f32>>>,
    /// Element type the reply is encoded in.
    pub out_dtype: DType,
    /// The client's request id, echoed back.
    pub request_id: u64,
}

/// A sequence model's request that passed validation.
pub struct ValidatedSequences {
    /// The token rows and where their answer goes.
    pub job: SeqJob,
    /// Receives the encoded top-k rows.
    pub reply: oneshot::Receiver<Result<Vec<u8>>>,
    /// The client's request id, echoed back.
    pub request_id: u64,
}

/// The Teacher service over a running engine.
#[derive(Clone)]
pub struct TeacherService {
    info: Arc<ModelInfo>,
    engine: Engine,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    reply_deadline: Duration,
    /// `InferStream`s closed because their client stopped reading.
    stalled_streams: Arc<std::sync::atomic::AtomicU64>,
}

/// Default longest wait for an `InferStream` client to take a reply (see
/// [`TeacherService::with_reply_deadline`]).
pub const DEFAULT_REPLY_DEADLINE: Duration = Duration::from_secs(30);

impl TeacherService {
    /// A service answering from `engine`, with at most `max_inflight` requests in flight.
    /// `inflight` must hold `max_inflight` permits and be shared with the engine.
    pub fn new(
        info: ModelInfo,
        engine: Engine,
        inflight: Arc<Semaphore>,
        max_inflight: usize,
    ) -> Self {
        Self {
            info: Arc::new(info),
            engine,
            inflight,
            max_inflight,
            reply_deadline: DEFAULT_REPLY_DEADLINE,
            stalled_streams: Arc::default(),
        }
    }

    /// This service closing an `InferStream` whose client has not taken a reply within
    /// `deadline`: a request's in-flight permit is held until its reply is handed to the
    /// stream, so a client that stops reading would otherwise keep its permits forever.
    pub fn with_reply_deadline(mut self, deadline: Duration) -> Self {
        self.reply_deadline = deadline;
        self
    }

    /// Model facts.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The compute thread's counters (forward passes and rows).
    pub fn stats(&self) -> &crate::batcher::BatchStats {
        match &self.engine {
            Engine::Rows(b) => &b.stats,
            Engine::Tokens(b) => &b.stats,
        }
    }

    /// `InferStream`s closed so far because their client did not take a reply within the
    /// reply deadline.
    pub fn stalled_streams(&self) -> u64 {
        self.stalled_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests in flight right now (queued or computing).
    pub fn inflight(&self) -> usize {
        self.max_inflight - self.inflight.available_permits()
    }

    /// Checks a request and decodes its inputs to f32 rows (U8 pixels through
    /// [`distill_core::data::pixels_to_f32`]).
    pub fn validate(&self, req: InferRequest) -> Result<Validated> {
        let InferRequest {
            request_id,
            inputs,
            temperature,
            output_dtype,
            top_k,
            lengths: _,
        } = req;
        let bad = |m: String| Error::InvalidArgument(m);
        let t = temperature;
        if !t.is_finite() || t <= 0.0 {
            return Err(bad(format!("temperature must be finite and > 0, got {t}")));
        }
        let out_dtype = match output_dtype {
            0 => DType::F32,
            v => match DType::try_from(v) {
                Ok(d) if d.is_float() => d,
                _ => {
                    return Err(bad(format!(
                        "output_dtype {v} is not supported (expected F32, F16 or BF16)"
                    )));
                }
            },
        };
        if top_k != 0 {
            return Err(bad(format!(
                "top_k {top_k} asked of a classifier, which answers dense logits (top_k 0)"
            )));
        }
        let inputs = inputs.ok_or_else(|| bad("missing `inputs` tensor".into()))?;
        let x = HostTensor::try_from(inputs).map_err(|e| bad(format!("inputs: {e}")))?;
        let shape = x.shape();
        let row_shape = &self.info.input_shape;
        let row_len: usize = row_shape.iter().product();
        // Rows may come shaped like the model's input or flattened: only the values per row count.
        let rows_ok = shape.len() >= 2 && shape[1..].iter().product::<usize>() == row_len;
        if !rows_ok {
            return Err(bad(format!(
                "inputs have shape {shape:?}; expected [N, ...] with {row_len} values per row \
                 (the model's input is {row_shape:?})"
            )));
        }
        let rows = shape[0];
        if rows == 0 || rows > self.info.max_batch {
            return Err(bad(format!(
                "batch of {rows} rows; this server takes 1 to {} rows",
                self.info.max_batch
            )));
        }
        let values = match x.dtype() {
            DType::I64 => {
                return Err(bad(
                    "inputs of dtype I64 are not supported (expected F32, F16, BF16 or U8)".into(),
                ));
            }
            // The one pixel scaling of distill: the student trains on exactly these values.
            DType::U8 => distill_core::data::pixels_to_f32(x.data()),
            DType::F32 | DType::F16 | DType::BF16 => {
                // One decode pass, then a scan of plain f32s (a non-finite f16/bf16 stays
                // non-finite).
                let values = x.to_f32_vec();
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(bad(format!(
                        "inputs hold a non-finite value at row {}, column {}",
                        i / row_len,
                        i % row_len
                    )));
                }
                values
            }
        };
        let (reply, rx) = oneshot::channel();
        Ok(Validated {
            job: Job {
                x: values,
                rows,
                temperature: t,
                reply,
            },
            reply: rx,
            out_dtype,
            request_id,
        })
    }

    /// One in-flight permit, or `RESOURCE_EXHAUSTED` at once when all are taken.
    fn permit(&self) -> Result<OwnedSemaphorePermit> {
        let permit = self.inflight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!(
                "too many requests in flight (limit {})",
                self.max_inflight
            ))
        })?;
        telemetry::queue_depth(self.inflight());
        Ok(permit)
    }

    /// Runs one request end to end, counting it in the metrics as coming through `protocol`.
    pub async fn infer_one(&self, req: InferRequest, protocol: Protocol) -> Result<InferResponse> {
        let result = match self.permit() {
            Ok(_permit) => self.infer_admitted(req, protocol).await,
            Err(e) => Err(e),
        };
        telemetry::queue_depth(self.inflight());
        result
    }

    /// Counts a refusal of a request that came through `protocol`.
    pub fn count_refusal(&self, protocol: Protocol, status: &Status) {
        telemetry::refused(&self.info.member, protocol, status);
    }

    /// Runs a request that holds an in-flight permit; an answer is counted in the metrics here,
    /// a refusal by whoever turns it into a status.
    async fn infer_admitted(&self, req: InferRequest, protocol: Protocol) -> Result<InferResponse> {
        let batcher = match &self.engine {
            Engine::Rows(b) => b,
            Engine::Tokens(b) => return self.infer_sequences(b, req, protocol).await,
        };
        let started = std::time::Instant::now();
        let Validated {
            job,
            reply: rx,
            out_dtype,
            request_id,
        } = self.validate(req)?;
        let rows = job.rows;
        batcher.submit(job)?;
        let logits = rx.await.map_err(|_| Error::ShuttingDown)??;
        let tensor = encode_logits(&logits, rows, self.info.classes, out_dtype)?;
        telemetry::answered(&self.info.member, protocol, rows, started.elapsed());
        Ok(InferResponse {
            request_id,
            logits: Some(tensor.into()),
            model_id: self.info.model_id.clone(),
            topk: None,
        })
    }

    /// Answers one admitted request of an `InferStream`, holding its permit until the reply
    /// is handed to the stream.
    async fn answer_streamed(
        &self,
        req: InferRequest,
        permit: OwnedSemaphorePermit,
        tx: mpsc::Sender<InferStreamResponse>,
        stalled: CancellationToken,
    ) {
        let id = req.request_id;
        let result = self.infer_admitted(req, Protocol::Distill).await;
        let reply = self.stream_reply(id, result);
        self.hand_over(&tx, reply, &stalled).await;
        drop(permit);
        telemetry::queue_depth(self.inflight());
    }

    /// Hands `reply` to the stream; false (and the stream marked stalled) when the client did
    /// not take it within the deadline.
    async fn hand_over(
        &self,
        tx: &mpsc::Sender<InferStreamResponse>,
        reply: InferStreamResponse,
        stalled: &CancellationToken,
    ) -> bool {
        match tokio::time::timeout(self.reply_deadline, tx.send(reply)).await {
            // Sent, or the client went away (the stream then ends by itself).
            Ok(_) => true,
            Err(_) => {
                if !stalled.is_cancelled() {
                    stalled.cancel();
                    self.stalled_streams
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        deadline = ?self.reply_deadline,
                        "InferStream closed: its client did not read a reply in time"
                    );
                }
                false
            }
        }
    }
}

impl TeacherService {
    /// Checks a sequence model's request: token ids `[N, L]` (I64, each below the vocabulary)
    /// with their real lengths, a temperature and k.
    pub fn validate_sequences(&self, req: InferRequest) -> Result<ValidatedSequences> {
        let bad = |m: String| Error::InvalidArgument(m);
        let seq = self
            .info
            .sequence
            .as_ref()
            .ok_or_else(|| bad("this teacher is not a sequence model".into()))?;
        let InferRequest {
            request_id,
            inputs,
            temperature: t,
            output_dtype: _,
            top_k,
            lengths,
        } = req;
        if !t.is_finite() || t <= 0.0 {
            return Err(bad(format!("temperature must be finite and > 0, got {t}")));
        }
        let vocab = self.info.classes;
        let k = usize::try_from(top_k).unwrap_or(usize::MAX);
        if k == 0 || k > vocab {
            return Err(bad(format!(
                "top_k {top_k}: a sequence model answers in the top-k encoding, 1 <= top_k <= {vocab}"
            )));
        }
        let format = TopKFormat::new(vocab, k).map_err(|e| bad(e.to_string()))?;
        let inputs = inputs.ok_or_else(|| bad("missing `inputs` tensor".into()))?;
        let x = HostTensor::try_from(inputs).map_err(|e| bad(format!("inputs: {e}")))?;
        let (n, len) = match (x.dtype(), x.shape()) {
            (DType::I64, [n, l]) => (*n, *l),
            (d, s) => {
                return Err(bad(format!(
                    "inputs of a sequence model are token ids [N, L] of dtype I64, got {d:?} {s:?}"
                )));
            }
        };
        if n == 0 || len == 0 || len > seq.max_len {
            return Err(bad(format!(
                "{n} sequences of {len} tokens; sequences are 1 to {} tokens long, at least one",
                seq.max_len
            )));
        }
        if n.saturating_mul(len) > seq.max_tokens {
            return Err(bad(format!(
                "{n} × {len} = {} tokens; this server takes at most {} per request",
                n.saturating_mul(len),
                seq.max_tokens
            )));
        }
        let lengths: Vec<usize> = if lengths.is_empty() {
            vec![len; n]
        } else if lengths.len() != n {
            return Err(bad(format!("{} lengths for {n} sequences", lengths.len())));
        } else {
            lengths.iter().map(|&l| l as usize).collect()
        };
        if let Some(i) = lengths.iter().position(|&l| l == 0 || l > len) {
            return Err(bad(format!(
                "sequence {i} has length {}; lengths are 1 to {len}",
                lengths[i]
            )));
        }
        let mut tokens = Vec::with_capacity(n * len);
        for (i, c) in x.data().chunks_exact(8).enumerate() {
            let (row, pos) = (i / len, i % len);
            if pos >= lengths[row] {
                // Padding is never looked at: any value is accepted and none reaches the model.
                tokens.push(0);
                continue;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = i64::from_le_bytes(b);
            match u32::try_from(v) {
                Ok(id) if (id as usize) < vocab => tokens.push(id),
                _ => {
                    return Err(bad(format!(
                        "token {v} at sequence {row}, position {pos} is not an id of the vocabulary (0 to {})",
                        vocab - 1
                    )));
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        Ok(ValidatedSequences {
            job: SeqJob {
                tokens,
                len,
                lengths,
                temperature: t,
                format,
                reply,
            },
            reply: rx,
            request_id,
        })
    }

    async fn infer_sequences(
        &self,
        batcher: &SeqBatcher,
        req: InferRequest,
        protocol: Protocol,
    ) -> Result<InferResponse> {
        let started = std::time::Instant::now();
        let ValidatedSequences {
            job,
            reply: rx,
            request_id,
        } = self.validate_sequences(req)?;
        let format = job.format;
        let positions: usize = job.lengths.iter().sum();
        batcher.submit(job)?;
        let data = rx.await.map_err(|_| Error::ShuttingDown)??;
        telemetry::answered(&self.info.member, protocol, positions, started.elapsed());
        Ok(InferResponse {
            request_id,
            logits: None,
            model_id: self.info.model_id.clone(),
            topk: Some(pb::TopKTargets {
                k: format.k as u32,
                classes: format.classes as u32,
                value_dtype: pb::DType::DtypeF16 as i32,
                data,
            }),
        })
    }

    /// The stream message answering request `id` (a refusal counted in the metrics).
    fn stream_reply(&self, id: u64, result: Result<InferResponse>) -> InferStreamResponse {
        let result = match result {
            Ok(r) => infer_stream_response::Result::Response(r),
            Err(e) => {
                let s = Status::from(e);
                self.count_refusal(Protocol::Distill, &s);
                infer_stream_response::Result::Error(RequestError {
                    code: s.code() as i32,
                    message: s.message().to_string(),
                })
            }
        };
        InferStreamResponse {
            request_id: id,
            result: Some(result),
        }
    }
}

/// Encodes `rows × classes` f32 logits in the requested float dtype; an error when a logit does
/// not fit it (|z/T| beyond f16's 65,504 at a small T), so a client never receives an infinity.
fn encode_logits(v: &[f32], rows: usize, classes: usize, dtype: DType) -> Result<HostTensor> {
    let t = HostTensor::from_f32_as(vec![rows, classes], v, dtype)
        .map_err(|e| Error::Compute(format!("logits encoding: {e}")))?;
    match t.first_non_finite() {
        None => Ok(t),
        Some(i) => Err(Error::InvalidArgument(format!(
            "tempered logit {} at row {}, class {} does not fit {dtype:?}: raise the temperature \
             or ask for F32 output",
            v[i],
            i / classes,
            i % classes
        ))),
    }
}

type ReplyStream =
    Pin<Box<dyn Stream<Item = std::result::Result<InferStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Teacher for TeacherService {
    async fn describe(
        &self,
        _req: Request<DescribeRequest>,
    ) -> std::result::Result<Response<DescribeResponse>, Status> {
        let i = &self.info;
        Ok(Response::new(DescribeResponse {
            model_id: i.model_id.clone(),
            member: i.member.clone(),
            input_shape: i.input_shape.iter().map(|&d| d as u64).collect(),
            num_classes: i.classes as u32,
            weights_digest: i.digest.clone(),
            max_batch: i.max_batch as u32,
            arch: i.arch.clone(),
            input_dtypes: match &i.sequence {
                Some(_) => vec![pb::DType::from(DType::I64) as i32],
                None => [DType::F32, DType::F16, DType::BF16, DType::U8]
                    .into_iter()
                    .map(|d| pb::DType::from(d) as i32)
                    .collect(),
            },
            tokenizer_digest: i
                .sequence
                .as_ref()
                .map(|s| s.tokenizer_digest.clone())
                .unwrap_or_default(),
            max_tokens: i.sequence.as_ref().map_or(0, |s| s.max_tokens as u64),
            max_sequence_length: i
                .sequence
                .as_ref()
                .map_or(0, |s| u32::try_from(s.max_len).unwrap_or(u32::MAX)),
        }))
    }

    async fn infer(
        &self,
        req: Request<InferRequest>,
    ) -> std::result::Result<Response<InferResponse>, Status> {
        match self.infer_one(req.into_inner(), Protocol::Distill).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                let status = Status::from(e);
                self.count_refusal(Protocol::Distill, &status);
                Err(status)
            }
        }
    }

    type InferStreamStream = ReplyStream;

    async fn infer_stream(
        &self,
        req: Request<Streaming<InferRequest>>,
    ) -> std::result::Result<Response<Self::InferStreamStream>, Status> {
        let mut inbound = req.into_inner();
        // Replies wait here for the client to read them. Each admitted request holds an
        // in-flight permit until its reply is in this channel, and refusals are handed over by
        // the reading loop itself, so a client that stops reading stops being read: it can
        // hold at most `max_inflight` permits, and only until the reply deadline.
        let (tx, rx) = mpsc::channel(self.max_inflight.max(1));
        let stalled = CancellationToken::new();
        let svc = self.clone();
        let stop = stalled.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = stop.cancelled() => break,
                    item = inbound.next() => item,
                };
                let req = match item {
                    Some(Ok(r)) => r,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "InferStream: client stream ended with an error");
                        break;
                    }
                    None => break,
                };
                match svc.permit() {
                    Ok(permit) => {
                        let (svc, tx, stop) = (svc.clone(), tx.clone(), stop.clone());
                        tokio::spawn(async move {
                            svc.answer_streamed(req, permit, tx, stop).await;
                        });
                    }
                    Err(e) => {
                        let reply = svc.stream_reply(req.request_id, Err(e));
                        if !svc.hand_over(&tx, reply, &stop).await {
                            break;
                        }
                    }
                }
            }
        });
        let deadline = self.reply_deadline;
        let replies = futures::stream::unfold(Some((rx, stalled)), move |state| async move {
            let (mut rx, stalled) = state?;
            let closed = || {
                Status::resource_exhausted(format!(
                    "InferStream closed: a reply waited more than {deadline:?} for the client \
                     to read it"
                ))
            };
            if stalled.is_cancelled() {
                return Some((Err(closed()), None));
            }
            tokio::select! {
                m = rx.recv() => m.map(|m| (Ok(m), Some((rx, stalled)))),
                _ = stalled.cancelled() => Some((Err(closed()), None)),
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }
}
