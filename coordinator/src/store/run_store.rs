//! The run's state in an embedded transactional store: `run_dir/state.redb` (redb), so that a
//! coordinator killed at any point and started again on the same run directory resumes the run.
//!
//! What is stored, in one write transaction each time (the *commit point*):
//! - the resolved config (a restart with another config is refused),
//! - the ledger snapshot ([`crate::domain::ledger::LedgerState`]), with the commit points (per
//!   worker the highest ack sequence number inside the stored average),
//! - the worker table's incarnations, so that the old processes stay fenced off,
//! - the synchronisation state: the version of the latest average and the average itself
//!   (safetensors bytes), and the outer optimizer's momentum when it has one (safetensors
//!   bytes, written with the average it belongs to), or, in a gradient-averaging run, the
//!   student optimizer's state ([`crate::domain::gradient_step`]; its own format),
//! - the run's counters and how many times the run was resumed.
//!
//! When a commit point is written, and what a restore does with it, is decided by
//! [`crate::domain::run_state`]; every run keeps one, with or without synchronisation rounds.
//! With rounds the stored ledger and the stored average describe the same model; each (epoch,
//! batch) is then in the model's history exactly once (see the ledger's rollback for the one
//! exception: acks in an epoch already past the barrier).

use std::path::{Path, PathBuf};

use crate::domain::run_state::Snapshot;
use crate::error::{Error, Result};
use redb::{Database, ReadableDatabase, TableDefinition};

/// The store's file in the run directory.
pub const STATE_FILE: &str = "state.redb";

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("run");
const KEY: &str = "state";
const KEY_AVERAGE: &str = "average";
const KEY_MOMENTUM: &str = "outer_momentum";
const KEY_OPTIMIZER: &str = "optimizer";

/// What a commit point holds.
pub struct Stored {
    /// The run state.
    pub snapshot: Snapshot,
    /// The average's safetensors bytes, if one was written.
    pub average: Option<Vec<u8>>,
    /// The outer optimizer's momentum as safetensors bytes, if one was written.
    pub momentum: Option<Vec<u8>>,
    /// A gradient-averaging run's optimizer state, if one was written.
    pub optimizer: Option<Vec<u8>>,
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
            .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
        Ok(Self { db, path })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last commit point, if any was written.
    pub fn load(&self) -> Result<Option<Stored>> {
        let bad = |e: String| Error::Store(format!("{}: {e}", self.path.display()));
        let txn = self.db.begin_read().map_err(|e| bad(e.to_string()))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let Some(state) = table.get(KEY).map_err(|e| bad(e.to_string()))? else {
            return Ok(None);
        };
        let saved: Snapshot = serde_json::from_slice(state.value())
            .map_err(|e| bad(format!("the stored run state is unreadable: {e}")))?;
        let bytes = |key: &str| -> Result<Option<Vec<u8>>> {
            Ok(table
                .get(key)
                .map_err(|e| bad(e.to_string()))?
                .map(|v| v.value().to_vec()))
        };
        Ok(Some(Stored {
            snapshot: saved,
            average: bytes(KEY_AVERAGE)?,
            momentum: bytes(KEY_MOMENTUM)?,
            optimizer: bytes(KEY_OPTIMIZER)?,
        }))
    }

    /// Writes a commit point (and the average, the momentum and the optimizer state, when
    /// given) in one transaction.
    pub fn save(
        &self,
        saved: &Snapshot,
        average: Option<&[u8]>,
        momentum: Option<&[u8]>,
        optimizer: Option<&[u8]>,
    ) -> Result<()> {
        let bad = |e: String| Error::Store(format!("{}: {e}", self.path.display()));
        let json = serde_json::to_vec(saved).map_err(|e| bad(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| bad(e.to_string()))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| bad(e.to_string()))?;
            table
                .insert(KEY, json.as_slice())
                .map_err(|e| bad(e.to_string()))?;
            for (key, value) in [
                (KEY_AVERAGE, average),
                (KEY_MOMENTUM, momentum),
                (KEY_OPTIMIZER, optimizer),
            ] {
                if let Some(v) = value {
                    table.insert(key, v).map_err(|e| bad(e.to_string()))?;
                }
            }
        }
        txn.commit().map_err(|e| bad(e.to_string()))?;
        Ok(())
    }
}
