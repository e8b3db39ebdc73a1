//! The error type of `student-worker`.

use std::path::PathBuf;

/// Everything that can end a worker's run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A worker setting is invalid (flags, config).
    #[error("invalid worker setting: {0}")]
    Config(String),
    /// The coordinator could not be reached before the connect deadline.
    #[error("cannot reach the coordinator at {url}: {msg}")]
    Connect { url: String, msg: String },
    /// The coordinator answered an RPC with an error status.
    #[error("coordinator replied {}: {}", .0.code(), .0.message())]
    Rpc(Box<tonic::Status>),
    /// The coordinator's `JoinResponse` is unusable (bad settings JSON, shapes that do not fit
    /// the student, an impossible resume step).
    #[error("coordinator sent unusable run settings: {0}")]
    Settings(String),
    /// A batch from the coordinator is malformed (shape, dtype, byte length, non-finite values,
    /// labels out of range, wrong temperature).
    #[error("bad batch from the coordinator: {0}")]
    BadBatch(String),
    /// The coordinator broke the batch-stream protocol (e.g. closed it before `Done`).
    #[error("batch stream: {0}")]
    Protocol(String),
    /// The worker checkpoint in the work dir cannot be used.
    #[error("worker checkpoint in {dir}: {msg}")]
    Resume { dir: PathBuf, msg: String },
    /// An error from the model, the optimizer, a checkpoint file or the KD math.
    #[error(transparent)]
    Core(#[from] distill_core::Error),
    /// An I/O error with the file it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The training thread panicked (a bug); the message is the panic's.
    #[error("the training thread panicked: {0}")]
    Panic(String),
    /// The run was stopped by a shutdown signal; the checkpoint at `step` was written.
    #[error("stopped by shutdown after {step} updates (checkpoint saved)")]
    Cancelled { step: u64 },
}

/// Result alias of `student-worker`.
pub type Result<T> = std::result::Result<T, Error>;

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc(Box::new(s))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Core(distill_core::Error::Candle(e))
    }
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
