//! The coordinator's error type and its one mapping to gRPC statuses.

/// Everything the coordinator can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run config is invalid (the message names the key).
    #[error("config: {0}")]
    Config(String),
    /// A message from a worker is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The worker is not part of the run.
    #[error("{0}")]
    NotFound(String),
    /// The caller holds a credential of the right role but not the secret of what it asks
    /// for (another worker's id).
    #[error("{0}")]
    PermissionDenied(String),
    /// The worker's incarnation was replaced by a newer one.
    #[error("{0}")]
    Stale(String),
    /// The coordinator is shutting down.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// No replica of a teacher member answered.
    #[error("teacher member `{member}`: {msg}")]
    Teacher { member: String, msg: String },
    /// A teacher refused a request (a model that does not fit the data, a malformed request).
    #[error("teacher member `{member}` refused the request: {msg}")]
    TeacherRejected { member: String, msg: String },
    /// Loading data, computing soft targets or writing run files failed.
    #[error(transparent)]
    Core(#[from] distill_core::Error),
    /// Writing or reading a run file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The run state could not be read or written (the message names the file).
    #[error("run state: {0}")]
    Store(String),
    /// The run cannot go on (the message says why); its state on disk is resumable.
    #[error("the run failed: {0}")]
    RunFailed(String),
    /// Serving failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The soft-target cache failed (the message names its file).
    #[error(transparent)]
    Cache(#[from] crate::store::cache::CacheError),
    /// The caller took too long (a first message, an evaluation).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A run directory's files could not be drawn into its report page (the message names the
    /// file and line).
    #[error("report: {0}")]
    Report(String),
    /// A bug of ours (a task panicked, a lock was poisoned).
    #[error("internal: {0}")]
    Internal(String),
}

/// Result alias of the coordinator.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Config(_) | Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Stale(_) | Error::TeacherRejected { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            Error::ShuttingDown | Error::Teacher { .. } | Error::RunFailed(_) => {
                tonic::Status::unavailable(msg)
            }
            Error::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(msg),
            Error::Core(_)
            | Error::Io { .. }
            | Error::Transport(_)
            | Error::Cache(_)
            | Error::Store(_)
            | Error::Report(_)
            | Error::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
