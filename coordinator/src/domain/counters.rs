//! The run's counters: one struct, owned by [`super::run_state::RunState`], persisted with every
//! commit point and read by `RunStatus` and the report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Rows and batches one worker trained.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerShare {
    /// Worker id.
    pub worker_id: String,
    /// Training rows acked (all incarnations).
    pub samples: u64,
    /// Batches acked.
    pub batches: u64,
}

/// Counters of the run that survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Training rows acked.
    pub samples: u64,
    /// Seconds workers waited for batches.
    pub wait_secs: f64,
    /// Seconds workers spent in steps.
    pub step_secs: f64,
    /// Seconds workers were blocked in rounds.
    pub sync_secs: f64,
    /// Parameter bytes sent to workers.
    pub down_bytes: u64,
    /// Per worker id: rows and batches acked.
    pub per_worker: BTreeMap<String, WorkerShare>,
    /// Per epoch: batches from the teachers.
    pub teacher_batches: Vec<u64>,
    /// Per epoch: batches from the cache.
    pub cached_batches: Vec<u64>,
    /// Batches combined from a subset of the members.
    pub degraded_batches: u64,
    /// Batches whose preparation failed and that went back in line, by reason.
    pub failed_preparations: BTreeMap<String, u64>,
    /// Rounds of the fixed schedule whose members differ from the previous round's (a worker
    /// joined or left).
    #[serde(default)]
    pub schedule_changes: u64,
    /// Sum of the acked losses of the current epoch (non-finite losses are not summed).
    pub epoch_loss: f64,
    /// Acks summed in `epoch_loss`.
    pub epoch_batches: u64,
}

impl Counters {
    /// Counts an accepted ack of `rows` rows by `worker_id`.
    pub fn ack(&mut self, worker_id: &str, rows: u64, times: AckTimes) {
        // Times and losses are the worker's claims: clamp them so that one bad value cannot
        // poison a sum (NaN) or make it negative.
        let clean = |x: f32| {
            if x.is_finite() && x > 0.0 {
                f64::from(x)
            } else {
                0.0
            }
        };
        self.samples = self.samples.saturating_add(rows);
        self.wait_secs += clean(times.wait_seconds);
        self.step_secs += clean(times.step_seconds);
        self.sync_secs += clean(times.sync_seconds);
        if times.loss.is_finite() {
            self.epoch_loss += f64::from(times.loss);
            self.epoch_batches += 1;
        }
        let share = self.per_worker.entry(worker_id.to_string()).or_default();
        share.worker_id = worker_id.to_string();
        share.samples = share.samples.saturating_add(rows);
        share.batches = share.batches.saturating_add(1);
    }

    /// Counts a batch sent to a worker: from the cache or from the teachers, degraded or not.
    pub fn batch_sent(&mut self, epoch: u32, from_cache: bool, degraded: bool) {
        let e = epoch as usize;
        if self.teacher_batches.len() <= e {
            self.teacher_batches.resize(e + 1, 0);
            self.cached_batches.resize(e + 1, 0);
        }
        if from_cache {
            self.cached_batches[e] += 1;
        } else {
            self.teacher_batches[e] += 1;
        }
        if degraded {
            self.degraded_batches += 1;
        }
    }

    /// The mean loss of the epoch that just completed; starts the next one.
    pub fn take_epoch_loss(&mut self) -> f64 {
        let mean = self.epoch_loss / self.epoch_batches.max(1) as f64;
        self.epoch_loss = 0.0;
        self.epoch_batches = 0;
        mean
    }
}

/// What an ack reports besides its lease: the worker's own timings and loss.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AckTimes {
    /// Seconds the worker waited for this batch.
    pub wait_seconds: f32,
    /// Seconds its training step took.
    pub step_seconds: f32,
    /// Seconds it was blocked in a round since its last ack.
    pub sync_seconds: f32,
    /// The batch's loss.
    pub loss: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_claims_in_acks_do_not_poison_the_sums() {
        let mut c = Counters::default();
        let t = |w: f32, loss: f32| AckTimes {
            wait_seconds: w,
            step_seconds: 1.0,
            sync_seconds: 0.0,
            loss,
        };
        c.ack("a", 10, t(f32::NAN, 2.0));
        c.ack("a", 10, t(-5.0, f32::INFINITY));
        c.ack("b", 5, t(0.5, 4.0));
        assert_eq!(c.samples, 25);
        assert_eq!(c.wait_secs, 0.5);
        assert_eq!(c.step_secs, 3.0);
        assert_eq!(c.epoch_batches, 2);
        assert_eq!(c.take_epoch_loss(), 3.0);
        assert_eq!(c.epoch_batches, 0);
        assert_eq!(c.per_worker["a"].batches, 2);
        assert_eq!(c.per_worker["b"].samples, 5);
    }
}
