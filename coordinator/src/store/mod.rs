//! What the coordinator keeps on disk: the run directory's lock, the run state
//! ([`run_store`]) and the soft-target cache ([`cache`]) with its per-member teacher records
//! ([`member_records`]).

pub mod cache;
pub mod member_records;
pub mod run_store;

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file in the run directory.
pub const LOCK_FILE: &str = "coordinator.lock";

/// An exclusive lock on a run directory, held for the life of the run, so that two coordinators
/// never write one run. Taken before anything is written there; released when dropped (or when
/// the process dies: the operating system drops the lock with the file).
#[derive(Debug)]
pub struct RunDirLock {
    _file: File,
    path: PathBuf,
}

impl RunDirLock {
    /// Creates `run_dir` if needed and locks it; fails at once if another process holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let io = |path: &Path, source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(|e| io(run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(Error::Config(format!(
                "`run_dir`: {} is in use by another coordinator (it holds {})",
                run_dir.display(),
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(io(&path, e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_lock_on_a_run_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = RunDirLock::acquire(&run).unwrap();
        let err = RunDirLock::acquire(&run).unwrap_err().to_string();
        assert!(err.contains("in use by another coordinator"), "{err}");
        drop(first);
        RunDirLock::acquire(&run).unwrap();
    }
}
