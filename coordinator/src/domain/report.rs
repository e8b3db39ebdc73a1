//! The run's report, written to `report.json` in the run directory when the run completes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::counters::WorkerShare;
use crate::teachers::MemberStats;

/// How the run used the soft-target cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheReport {
    /// The cache directory.
    pub dir: PathBuf,
    /// `read-write`, `read-only` or `offline`.
    pub mode: String,
    /// Digest of the run's key in the cache.
    pub key: String,
    /// Rows found in the cache.
    pub hit_rows: u64,
    /// Rows looked up and not found (then asked of the teachers).
    pub missed_rows: u64,
    /// Rows written to the cache.
    pub rows_written: u64,
}

/// Synchronisation figures of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReport {
    /// Local updates between rounds (0: no rounds).
    pub every: u64,
    /// Parameter dtype on the wire.
    pub dtype: String,
    /// Rounds closed.
    pub rounds: u64,
    /// Mean seconds a round was open (first contribution to close).
    pub mean_round_seconds: f64,
    /// Mean parameter bytes moved per round, up and down together.
    pub mean_bytes_per_round: f64,
    /// Seconds workers were blocked in rounds, all workers together.
    pub worker_sync_seconds: f64,
    /// `fixed` or `free` (`[sync] schedule`).
    #[serde(default)]
    pub schedule: String,
    /// Rounds of the fixed schedule whose members differed from the previous round's.
    #[serde(default)]
    pub schedule_changes: u64,
}

/// Test errors of one teacher member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherErrors {
    /// Member name.
    pub member: String,
    /// Test errors (arg-max of its logits vs the label).
    pub test_errors: u64,
    /// A language model's validation perplexity as its top-k rows at T = 1 tell it: the next
    /// token's probability when it is among the k, else the rest's mass spread evenly over the
    /// tokens not sent (an estimate: the true next token is usually likelier than that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity_from_topk: Option<f64>,
}

/// The run's result, written to `report.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Data source.
    pub data: String,
    /// Student architecture.
    pub student_arch: String,
    /// Temperature and alpha of the KD loss.
    pub temperature: f64,
    /// Weight of the soft-target term.
    pub alpha: f64,
    /// Each member's test errors.
    pub teachers: Vec<TeacherErrors>,
    /// Test errors of the combined ensemble (its combination at T = 1).
    pub ensemble_test_errors: Option<u64>,
    /// Test errors of the same student trained on hard labels alone (filled by `distill demo`).
    pub baseline_student_test_errors: Option<u64>,
    /// Test errors of the distilled student (a language model's: validation positions whose
    /// top-1 is not the next token).
    pub student_test_errors: u64,
    /// Rows in the test split (a language model's: validation positions).
    pub test_size: u64,
    /// A language model's validation perplexity, `exp(mean next-token NLL)`.
    #[serde(default)]
    pub student_perplexity: Option<f64>,
    /// A language model's share of validation positions whose top-1 is the teacher's (when the
    /// teacher's evaluation finished before the run).
    #[serde(default)]
    pub student_agreement: Option<f64>,
    /// Epochs trained.
    pub epochs: u32,
    /// Training samples per second, from the first batch sent to the last ack.
    pub samples_per_sec: f64,
    /// Batches acked.
    pub batches_trained: u64,
    /// Batches the run needed.
    pub batches_expected: u64,
    /// Seconds workers waited for batches.
    pub student_wait_seconds: f64,
    /// Seconds workers spent training.
    pub student_step_seconds: f64,
    /// Wait as a fraction of the training time line (wait / (wait + step)).
    pub student_wait_fraction: f64,
    /// Batches leased again (expired leases, departed workers, rollbacks).
    pub requeued_batches: u64,
    /// Trained batches undone because the worker that trained them died before they were
    /// averaged (with rounds), and trained again.
    pub rolled_back_batches: u64,
    /// Teacher requests retried on another replica.
    pub retries: u64,
    /// Batches whose soft targets came from only the members that answered (`degrade`).
    pub degraded_batches: u64,
    /// Times the coordinator resumed this run from its stored state.
    pub resumes: u64,
    /// Per-member teacher statistics.
    pub members: Vec<MemberStats>,
    /// Wall-clock seconds of the run.
    pub run_seconds: f64,
    /// The final student's checkpoint in the run directory.
    pub student_checkpoint: PathBuf,
    /// What each worker trained.
    pub workers: Vec<WorkerShare>,
    /// Synchronisation rounds.
    pub sync: SyncReport,
    /// Per epoch, batches whose soft targets came from the teachers.
    pub teacher_batches_per_epoch: Vec<u64>,
    /// Per epoch, batches whose soft targets came from the cache.
    pub cached_batches_per_epoch: Vec<u64>,
    /// The soft-target cache, when the run had one.
    pub cache: Option<CacheReport>,
}
