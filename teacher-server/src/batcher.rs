//! Dynamic batching on a dedicated compute thread.
//!
//! Requests are queued on a bounded channel. The compute thread takes the first one, then keeps
//! taking queued requests until the batch holds `max_batch` rows or `max_delay` has passed since
//! the first one arrived, runs ONE forward pass over the concatenated rows, and splits the
//! logits back, dividing each request's rows by its own temperature. The forward pass does not
//! depend on T, so requests with different temperatures share a batch. candle never runs on the
//! async runtime's threads.
//!
//! # Batching never changes an answer
//! candle's CPU matmul (the `gemm` crate) takes a different code path, with a different
//! summation order, for products of at most 64 rows, so the same row could come out 1 ulp
//! apart depending on what it was batched with. The compute thread therefore pads every pass to
//! at least [`DETERMINISTIC_MIN_ROWS`] rows (zeros, dropped afterwards): a row's logits are then
//! bit-identical whether it was computed alone or coalesced with others. The cost is a 65-row
//! pass for tiny requests (well under a millisecond for the MLPs here); distillation traffic
//! sends 128+ rows and never pays it.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use distill_core::model::Model;
use std::sync::Arc;

use tokio::sync::{Semaphore, oneshot};

use crate::error::{Error, Result};

/// Smallest number of rows a forward pass runs with (see the module docs).
pub const DETERMINISTIC_MIN_ROWS: usize = 65;

/// One request's rows, already validated and decoded to f32.
pub struct Job {
    /// `rows × input_size` values, row-major.
    pub x: Vec<f32>,
    /// Number of rows.
    pub rows: usize,
    /// Temperature T (finite, > 0).
    pub temperature: f32,
    /// Where the tempered logits (`rows × classes`, row-major) go.
    pub reply: oneshot::Sender<Result<Vec<f32>>>,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows in one forward pass.
    pub max_batch: usize,
    /// Longest wait for more requests after the first one arrives.
    pub max_delay: Duration,
    /// Extra latency added to every forward pass (benchmarking aid, 0 normally).
    pub simulate_latency: Duration,
}

/// Counters the compute thread keeps (for logs and tests).
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Forward passes run.
    pub batches: std::sync::atomic::AtomicU64,
    /// Rows computed.
    pub rows: std::sync::atomic::AtomicU64,
}

/// Handle to the compute thread; dropping every handle stops the thread once the queue drains.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    /// Shared counters.
    pub stats: std::sync::Arc<BatchStats>,
}

impl Batcher {
    /// Starts the compute thread for `model`. `queue` bounds the number of queued requests.
    ///
    /// `inflight` holds one permit per request the service has admitted and not yet answered
    /// (of `queue` in all): the compute thread stops waiting for company as soon as every
    /// admitted request is in the batch, so a lone client never pays `max_delay`.
    pub fn start(
        model: Model,
        cfg: BatchConfig,
        queue: usize,
        inflight: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let stats = std::sync::Arc::new(BatchStats::default());
        let s = stats.clone();
        let admitted = move || queue.saturating_sub(inflight.available_permits());
        std::thread::Builder::new()
            .name("teacher-compute".into())
            .spawn(move || compute_loop(&model, &rx, cfg, &s, &admitted))?;
        Ok(Self { tx, stats })
    }

    /// Queues a job; fails at once (never blocks) if the queue is full.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.tx.try_send(job).map_err(queue_error)
    }
}

/// What a refused `try_send` to a compute thread's queue means for the request.
pub fn queue_error<T>(e: TrySendError<T>) -> Error {
    match e {
        TrySendError::Full(_) => Error::Overloaded("teacher compute queue is full".into()),
        TrySendError::Disconnected(_) => Error::ShuttingDown,
    }
}

fn compute_loop(
    model: &Model,
    rx: &Receiver<Job>,
    cfg: BatchConfig,
    stats: &BatchStats,
    admitted: &dyn Fn() -> usize,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + cfg.max_delay;
        let mut rows = first.rows;
        let mut jobs = vec![first];
        while rows < cfg.max_batch {
            // Nobody else is on the way: waiting could only add latency.
            let wait = if admitted() > jobs.len() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match rx.recv_timeout(wait) {
                Ok(j) if rows + j.rows > cfg.max_batch => {
                    carried = Some(j);
                    break;
                }
                Ok(j) => {
                    rows += j.rows;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // Counted before the replies go out, so a client holding its answer sees it counted.
        stats
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stats
            .rows
            .fetch_add(rows as u64, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::batch(rows);
        run_batch(model, jobs, rows, cfg.simulate_latency);
    }
}

/// `z / t` for one request's logits, refusing any result that is not finite: a NaN or infinite
/// logit from the model is our failure (`Compute`), a finite one that overflows at this `t` is
/// the request's (`InvalidArgument`: T too small), so no client ever receives a non-finite logit.
fn temper(z: &[f32], t: f32, classes: usize) -> Result<Vec<f32>> {
    let at = |i: usize| format!("row {}, class {}", i / classes, i % classes);
    if let Some(i) = z.iter().position(|v| !v.is_finite()) {
        return Err(Error::Compute(format!(
            "the model produced a non-finite logit ({}) at {}",
            z[i],
            at(i)
        )));
    }
    let out: Vec<f32> = z.iter().map(|v| v / t).collect();
    match out.iter().position(|v| !v.is_finite()) {
        None => Ok(out),
        Some(i) => Err(Error::InvalidArgument(format!(
            "temperature {t} is too small: logit {} at {} divided by it overflows f32",
            z[i],
            at(i)
        ))),
    }
}

fn run_batch(model: &Model, mut jobs: Vec<Job>, rows: usize, simulate_latency: Duration) {
    let started = Instant::now();
    let width = model.spec().arch.input_size();
    let padded = rows.max(DETERMINISTIC_MIN_ROWS);
    // A lone request's rows are used in place; several are concatenated.
    let mut x = match jobs.as_mut_slice() {
        [only] => std::mem::take(&mut only.x),
        many => {
            let mut x = Vec::with_capacity(padded * width);
            for j in many.iter() {
                x.extend_from_slice(&j.x);
            }
            x
        }
    };
    x.resize(padded * width, 0.0);
    let forward = || -> Result<Vec<f32>> {
        let run = || -> distill_core::Result<Vec<f32>> {
            // [padded, input_size] -> [padded, classes]; padding rows are ignored below.
            let xt = Tensor::from_vec(x, (padded, width), model.device())?;
            Ok(model.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?)
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|_| Error::Compute("the model panicked".into()))?
            .map_err(|e| Error::Compute(e.to_string()))
    };
    let result = forward();
    if let Some(rest) = simulate_latency.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let classes = model.spec().arch.classes();
    match result {
        Ok(logits) => {
            let mut offset = 0;
            for j in jobs {
                let part = &logits[offset * classes..(offset + j.rows) * classes];
                offset += j.rows;
                // The receiver may have gone (client cancelled): nothing to do then.
                let _ = j.reply.send(temper(part, j.temperature, classes));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, rows, "teacher forward pass failed");
            for j in jobs {
                let _ = j.reply.send(Err(Error::Compute(e.to_string())));
            }
        }
    }
}
