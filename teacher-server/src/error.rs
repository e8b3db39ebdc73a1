//! The teacher server's error type and its one mapping to gRPC statuses.

/// Everything a teacher request or the server itself can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: wrong shape or dtype, bad T, NaN, too many rows, ...
    #[error("{0}")]
    InvalidArgument(String),
    /// Too many requests in flight.
    #[error("{0}")]
    Overloaded(String),
    /// The server is shutting down and takes no new work.
    #[error("teacher server is shutting down")]
    ShuttingDown,
    /// The model failed while computing (a bug or a device failure).
    #[error("inference failed: {0}")]
    Compute(String),
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] distill_core::Error),
    /// The in-process throughput measurement's own client failed ([`crate::bench`]).
    #[error("benchmark client: {0}")]
    Client(String),
    /// Binding or serving failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Result alias of the teacher server.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Overloaded(_) => tonic::Status::resource_exhausted(msg),
            Error::ShuttingDown => tonic::Status::unavailable(msg),
            Error::Compute(_) | Error::Load(_) | Error::Transport(_) | Error::Client(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}
