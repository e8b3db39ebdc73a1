//! The student worker's Prometheus series (served with `--metrics-listen`; no-ops without it),
//! each labelled with the worker id.
//!
//! | series | kind |
//! | --- | --- |
//! | `distill_worker_loss` | gauge: the loss of the last batch trained |
//! | `distill_worker_samples_total` | counter: rows trained (samples/s is its rate) |
//! | `distill_worker_batches_total` | counter: batches trained |
//! | `distill_worker_step_seconds` | histogram: time of one training step |
//! | `distill_worker_wait_seconds_total` | gauge that only grows: seconds spent waiting for batches |

/// One batch of `rows` rows trained to `loss` in `step_seconds`, after waiting `wait_seconds`.
pub fn trained(worker: &str, loss: f32, rows: usize, step_seconds: f64, wait_seconds: f64) {
    let w = worker.to_string();
    if loss.is_finite() {
        metrics::gauge!("distill_worker_loss", "worker" => w.clone()).set(f64::from(loss));
    }
    metrics::counter!("distill_worker_samples_total", "worker" => w.clone()).increment(rows as u64);
    metrics::counter!("distill_worker_batches_total", "worker" => w.clone()).increment(1);
    metrics::histogram!("distill_worker_step_seconds", "worker" => w.clone()).record(step_seconds);
    // The facade's counters are integers: seconds go into a gauge that only grows, which
    // `rate()` reads as it reads a counter.
    metrics::gauge!("distill_worker_wait_seconds_total", "worker" => w).increment(wait_seconds);
}
