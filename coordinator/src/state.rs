//! The run's state in an embedded transactional store: `run_dir/state.redb` (redb), so that a
//! coordinator killed at any point and started again on the same run directory resumes the run.
//!
//! What is stored, in one write transaction each time (the *commit point*):
//! - the resolved config (a restart with another config is refused),
//! - the ledger snapshot ([`crate::ledger::LedgerState`]),
//! - the synchronisation state: the version of the latest average, the average itself
//!   (safetensors bytes), and per worker the highest ack sequence number inside it,
//! - the run's counters (rows and batches per worker, wait/step/sync seconds, teacher and cached
//!   batches per epoch, degraded batches) and how many times the run was resumed.
//!
//! A commit point is written when a synchronisation round closes (at most every
//! `[sync] state_every_secs`, and always for the final round), so the stored ledger and the
//! stored average describe the same model. On restore every outstanding lease goes back in line
//! and every ack above its worker's committed sequence number is rolled back: those updates were
//! in a worker's own parameters only, and every worker restarts from the stored average. Each
//! (epoch, batch) is then in the model's history exactly once (see the ledger's rollback for the
//! one exception: acks in an epoch already past the barrier).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::LedgerState;

/// The store's file in the run directory.
pub const STATE_FILE: &str = "state.redb";

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("run");
const KEY: &str = "state";
const KEY_AVERAGE: &str = "average";

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
    pub per_worker: BTreeMap<String, (u64, u64)>,
    /// Per epoch: batches from the teachers.
    pub teacher_batches: Vec<u64>,
    /// Per epoch: batches from the cache.
    pub cached_batches: Vec<u64>,
    /// Batches combined from a subset of the members.
    pub degraded_batches: u64,
}

/// One commit point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    /// The resolved config, as TOML.
    pub config: String,
    /// The ledger.
    pub ledger: LedgerState,
    /// Version of the stored average (0: none yet).
    pub sync_version: u64,
    /// Per worker id, the highest ack sequence number inside the stored average.
    pub committed: BTreeMap<String, u64>,
    /// The run's counters.
    pub counters: Counters,
    /// Times the run was resumed from this store.
    pub resumes: u64,
}

/// The run's store.
pub struct RunStore {
    db: Database,
    path: PathBuf,
}

impl RunStore {
    /// Opens (or creates) the store in `run_dir`.
    pub fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(STATE_FILE);
        let db = Database::create(&path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(Self { db, path })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last commit point and the average's safetensors bytes, if any was written.
    pub fn load(&self) -> Result<Option<(Saved, Option<Vec<u8>>)>> {
        let bad = |e: String| Error::Config(format!("{}: {e}", self.path.display()));
        let txn = self.db.begin_read().map_err(|e| bad(e.to_string()))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let Some(state) = table.get(KEY).map_err(|e| bad(e.to_string()))? else {
            return Ok(None);
        };
        let saved: Saved = serde_json::from_slice(state.value())
            .map_err(|e| bad(format!("the stored run state is unreadable: {e}")))?;
        let average = table
            .get(KEY_AVERAGE)
            .map_err(|e| bad(e.to_string()))?
            .map(|v| v.value().to_vec());
        Ok(Some((saved, average)))
    }

    /// Writes a commit point (and the average, when given) in one transaction.
    pub fn save(&self, saved: &Saved, average: Option<&[u8]>) -> Result<()> {
        let bad = |e: String| Error::Internal(format!("{}: {e}", self.path.display()));
        let json = serde_json::to_vec(saved).map_err(|e| bad(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| bad(e.to_string()))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| bad(e.to_string()))?;
            table
                .insert(KEY, json.as_slice())
                .map_err(|e| bad(e.to_string()))?;
            if let Some(a) = average {
                table
                    .insert(KEY_AVERAGE, a)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        txn.commit().map_err(|e| bad(e.to_string()))?;
        Ok(())
    }
}
