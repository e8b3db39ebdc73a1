//! Sequence models (language models): token-budget batching on a dedicated compute thread.
//!
//! A request carries N token sequences `[N, L]` (right-padded, with their real lengths) and
//! asks for the top-k encoding of the tempered next-token distribution at every real position.
//! The compute thread takes the first queued request, then more while the batch stays within
//! `max_tokens` padded tokens (rows × the longest L) and `max_delay` has not passed, runs ONE
//! all-positions forward over them (shorter sequences padded on the right, which a causal
//! model never attends to from a real position), and encodes each request's rows with its own
//! temperature and k. Padding changes the shapes of the matmuls, so a position's logits can
//! differ in the last bits with the batch it was computed in (f32 weights: ~1e-6).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use distill_core::lm::LanguageModel;
use distill_core::topk::TopKFormat;
use tokio::sync::{Semaphore, oneshot};

use crate::batcher::BatchStats;
use crate::error::{Error, Result};

/// One request's sequences, validated.
pub struct SeqJob {
    /// `rows × len` token ids, row-major, right-padded.
    pub tokens: Vec<u32>,
    /// Padded length L.
    pub len: usize,
    /// Real length of each row (1..=L).
    pub lengths: Vec<usize>,
    /// Temperature T (finite, > 0).
    pub temperature: f32,
    /// The reply's top-k format (C = the vocabulary).
    pub format: TopKFormat,
    /// Where the encoded rows (one per real position) go.
    pub reply: oneshot::Sender<Result<Vec<u8>>>,
}

/// Handle to the compute thread of a sequence model.
#[derive(Clone)]
pub struct SeqBatcher {
    tx: SyncSender<SeqJob>,
    /// Forward passes, and positions answered (`rows`).
    pub stats: Arc<BatchStats>,
}

impl SeqBatcher {
    /// Starts the compute thread for `model`, coalescing requests up to `max_tokens` padded
    /// tokens per pass (see [`crate::batcher::Batcher::start`] for `queue` and `inflight`).
    pub fn start(
        model: LanguageModel,
        max_tokens: usize,
        max_delay: Duration,
        queue: usize,
        inflight: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let stats = Arc::new(BatchStats::default());
        let s = stats.clone();
        let admitted = move || queue.saturating_sub(inflight.available_permits());
        std::thread::Builder::new()
            .name("teacher-compute".into())
            .spawn(move || compute_loop(&model, &rx, max_tokens, max_delay, &s, &admitted))?;
        Ok(Self { tx, stats })
    }

    /// Queues a job; fails at once (never blocks) if the queue is full.
    pub fn submit(&self, job: SeqJob) -> Result<()> {
        self.tx.try_send(job).map_err(crate::batcher::queue_error)
    }
}

fn compute_loop(
    model: &LanguageModel,
    rx: &Receiver<SeqJob>,
    max_tokens: usize,
    max_delay: Duration,
    stats: &BatchStats,
    admitted: &dyn Fn() -> usize,
) {
    let mut carried: Option<SeqJob> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + max_delay;
        let (mut rows, mut len) = (first.lengths.len(), first.len);
        let mut jobs = vec![first];
        loop {
            let wait = if admitted() > jobs.len() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match rx.recv_timeout(wait) {
                Ok(j) => {
                    let (r, l) = (rows + j.lengths.len(), len.max(j.len));
                    if r.saturating_mul(l) > max_tokens {
                        carried = Some(j);
                        break;
                    }
                    (rows, len) = (r, l);
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let positions: usize = jobs.iter().flat_map(|j| j.lengths.iter()).sum();
        stats
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stats
            .rows
            .fetch_add(positions as u64, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::batch(positions);
        run_batch(model, jobs, len);
    }
}

/// One forward over every job's sequences padded to `len`, then each job's rows encoded.
fn run_batch(model: &LanguageModel, mut jobs: Vec<SeqJob>, len: usize) {
    let vocab = model.model.config().vocab_size;
    let run = |jobs: &mut [SeqJob]| -> distill_core::Result<Vec<Vec<u8>>> {
        if let [only] = jobs {
            let tokens = std::mem::take(&mut only.tokens);
            return Ok(vec![model.score_topk(
                tokens,
                only.len,
                &only.lengths,
                only.temperature,
                &only.format,
            )?]);
        }
        // Several requests: one pass over all their rows padded to the longest, then each
        // request's positions tempered and encoded with its own T and k.
        let rows: usize = jobs.iter().map(|j| j.lengths.len()).sum();
        let mut tokens = Vec::with_capacity(rows * len);
        let mut lengths = Vec::with_capacity(rows);
        for j in jobs.iter() {
            for (r, &l) in j.lengths.iter().enumerate() {
                let row = &j.tokens[r * j.len..r * j.len + j.len];
                tokens.extend_from_slice(row);
                tokens.extend(std::iter::repeat_n(0, len - j.len));
                lengths.push(l);
            }
        }
        let logits = model.logits(tokens, len, &lengths)?;
        let mut out = Vec::with_capacity(jobs.len());
        let mut at = 0usize;
        for j in jobs.iter() {
            let n: usize = j.lengths.iter().sum();
            let part = &logits[at * vocab..(at + n) * vocab];
            at += n;
            out.push(distill_core::lm::encode_tempered(
                part,
                n,
                j.temperature,
                &j.format,
            )?);
        }
        Ok(out)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut jobs)))
        .map_err(|_| Error::Compute("the model panicked".into()))
        .and_then(|r| {
            r.map_err(|e| match e {
                distill_core::Error::Input(m) => Error::InvalidArgument(m),
                e => Error::Compute(e.to_string()),
            })
        });
    match result {
        Ok(parts) => {
            for (j, bytes) in jobs.into_iter().zip(parts) {
                let _ = j.reply.send(Ok(bytes));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "teacher forward pass failed");
            for j in jobs {
                let _ = j.reply.send(Err(match &e {
                    Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
                    other => Error::Compute(other.to_string()),
                }));
            }
        }
    }
}
