//! How distill's roles reach each other on a real network: TLS and mutual TLS
//! ([`tls`]), a bearer credential per role checked on every RPC ([`auth`]), and the limits
//! every server runs under ([`limits`]); the secrets servers hand out and ask back ([`secret`]);
//! the Prometheus endpoint each role serves for its operators ([`metrics`]).
//!
//! A server is built from a [`ServerSecurity`] (its certificate, the CA its clients must be
//! signed by, the credentials it accepts) and a [`auth::Policy`] saying which role each of its
//! RPCs needs; a client dials through a [`ClientSecurity`] (the CA that verifies the server,
//! its own certificate for mutual TLS, the credential it presents).
//!
//! Nothing is required: with no TLS flag a role speaks plaintext, and with no credential a
//! server takes every call, as on a trusted loopback. A server listening on a non-loopback
//! address in either state says so with a warning ([`ServerSecurity::warn_if_exposed`]).

pub mod auth;
pub mod limits;
pub mod metrics;
pub mod secret;
pub mod tls;

pub use auth::{Access, AuthChannel, Bearer, Credentials, Policy, Role, Token};
pub use limits::Limits;
pub use metrics::MetricsArgs;
pub use tls::{ClientSecurity, ServerSecurity, TlsArgs};

use std::path::PathBuf;

/// What can go wrong setting up a role's transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate, key, CA or token file could not be used.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file named on the command line or in the environment.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A credential given in the environment is unusable, or two roles share one.
    #[error("{0}")]
    Credential(String),
    /// The TLS flags do not make a usable configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// An address cannot be dialled with this configuration.
    #[error("address `{url}`: {msg}")]
    Address {
        /// The address as given.
        url: String,
        /// Why it cannot be used.
        msg: String,
    },
    /// The metrics endpoint could not be set up.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Reads a file that a flag or variable names, with the path in the error.
fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: format!("cannot read it: {e}"),
    })
}
