//! How the coordinator meets the network: what its server presents and accepts (TLS, the
//! worker, register and status credentials) and how it dials the teachers (TLS, the infer
//! credential). See `distill_transport` for the mechanisms and `docs/security.md` for the
//! whole picture.

use std::path::PathBuf;

use distill_transport::{
    Access, ClientSecurity, Credentials, Role, ServerSecurity, TlsArgs, Token,
};

use crate::error::{Error, Result};

/// The coordinator's side of the network.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// What the Coordinator and Registry server presents and accepts.
    pub server: ServerSecurity,
    /// How the teachers are dialled.
    pub teachers: ClientSecurity,
}

impl Security {
    /// Plaintext both ways, no credential (a trusted loopback: tests, the demo).
    pub fn plaintext() -> Self {
        Self::default()
    }
}

/// Which credential each RPC of the coordinator's server needs: `RunStatus` the status one,
/// the rest of `Coordinator` the worker one, `Registry` the register one, reflection any,
/// health none.
pub fn policy(path: &str) -> Access {
    if path.starts_with(distill_transport::auth::HEALTH_PREFIX) {
        Access::Open
    } else if path == "/distill.v1.Coordinator/RunStatus" {
        Access::Role(Role::Status)
    } else if path.starts_with("/distill.v1.Coordinator/") {
        Access::Role(Role::Worker)
    } else if path.starts_with("/distill.v1.Registry/") {
        Access::Role(Role::Register)
    } else {
        Access::AnyRole
    }
}

/// The coordinator's security flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// TLS: the server's certificate and key, and the CA its clients (workers, registering
    /// teachers) must be signed by; the same files are used to dial the teachers.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// File holding the token workers must present (else DISTILL_WORKER_TOKEN).
    #[arg(long, env = "DISTILL_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// File holding the token registering teacher replicas must present (else
    /// DISTILL_REGISTER_TOKEN).
    #[arg(long, env = "DISTILL_REGISTER_TOKEN_FILE")]
    pub register_token_file: Option<PathBuf>,
    /// File holding the token `RunStatus` callers must present (else DISTILL_STATUS_TOKEN).
    #[arg(long, env = "DISTILL_STATUS_TOKEN_FILE")]
    pub status_token_file: Option<PathBuf>,
    /// File holding the token presented to the teachers (else DISTILL_INFER_TOKEN).
    #[arg(long, env = "DISTILL_INFER_TOKEN_FILE")]
    pub infer_token_file: Option<PathBuf>,
}

impl SecurityArgs {
    /// Loads the files the flags name.
    pub fn load(&self) -> Result<Security> {
        let bad = |e: distill_transport::Error| Error::Config(e.to_string());
        let token = |role, file: &Option<PathBuf>| Token::resolve(role, file.as_deref());
        let credentials = Credentials::none()
            .with(
                Role::Worker,
                token(Role::Worker, &self.worker_token_file).map_err(bad)?,
            )
            .and_then(|c| {
                c.with(
                    Role::Register,
                    token(Role::Register, &self.register_token_file)?,
                )
            })
            .and_then(|c| c.with(Role::Status, token(Role::Status, &self.status_token_file)?))
            .map_err(bad)?;
        let infer = token(Role::Infer, &self.infer_token_file).map_err(bad)?;
        Ok(Security {
            server: ServerSecurity::new(&self.tls, credentials).map_err(bad)?,
            teachers: ClientSecurity::new(&self.tls, infer.as_ref()).map_err(bad)?,
        })
    }
}
