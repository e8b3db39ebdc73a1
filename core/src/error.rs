//! The error type of `distill-core`.

use std::path::PathBuf;

/// Everything that can go wrong in `distill-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model architecture string or spec is invalid.
    #[error("invalid model spec: {0}")]
    Spec(String),
    /// A checkpoint file is unreadable, malformed or does not match its spec.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A data source is missing, malformed or truncated.
    #[error("data {path}: {msg}")]
    Data { path: PathBuf, msg: String },
    /// A data source string is invalid.
    #[error("data source `{source_str}`: {msg}")]
    DataSource { source_str: String, msg: String },
    /// An input has the wrong shape, dtype or values.
    #[error("{0}")]
    Input(String),
    /// A training or optimizer setting is invalid.
    #[error("invalid setting: {0}")]
    Config(String),
    /// An error from candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the file it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of `distill-core`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A checkpoint error about `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A data error about `path`.
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
