//! Credentials per role: a bearer token for each thing a caller may do, checked on every RPC
//! but health by one tower layer in front of all of a server's services.
//!
//! Four roles, four tokens: calling a teacher ([`Role::Infer`]), joining a run as a worker
//! ([`Role::Worker`]), registering a teacher replica ([`Role::Register`]) and reading a run's
//! status ([`Role::Status`]). A server holds the SHA-256 of each token it accepts and compares
//! the hash of what a caller presents with each of them in constant time, so neither a token
//! nor its length leaks through timing.
//!
//! Once a server holds any credential, every RPC but health needs one: none at all is
//! `UNAUTHENTICATED`, one that is no credential of this server is `UNAUTHENTICATED`, and one of
//! another role is `PERMISSION_DENIED`. A server with no credential takes every call (a
//! trusted loopback).
//!
//! Tokens come from a file (`--<role>-token-file`) or from the environment
//! (`DISTILL_<ROLE>_TOKEN`), never from a command-line value, and are never logged
//! ([`Token`]'s `Debug` shows no secret).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::{Error, Result};

/// Shortest token accepted: 16 characters of a random token carry at least 96 bits.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (it travels in a header on every call).
pub const MAX_TOKEN_LEN: usize = 4096;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Ask a teacher for tempered logits (the coordinator's credential towards the teachers).
    Infer,
    /// Join a run and train on its batches.
    Worker,
    /// Register a teacher replica with a coordinator.
    Register,
    /// Read a run's status.
    Status,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Infer, Role::Worker, Role::Register, Role::Status];

    /// The role's name in flags, variables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Worker => "worker",
            Role::Register => "register",
            Role::Status => "status",
        }
    }

    /// The environment variable that may hold this role's token.
    pub fn env_var(self) -> &'static str {
        match self {
            Role::Infer => "DISTILL_INFER_TOKEN",
            Role::Worker => "DISTILL_WORKER_TOKEN",
            Role::Register => "DISTILL_REGISTER_TOKEN",
            Role::Status => "DISTILL_STATUS_TOKEN",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A bearer token: visible ASCII, [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text; `what` names where it came from in the error.
    pub fn new(text: &str, what: &str) -> Result<Token> {
        validate(text)
            .map(|t| Token(t.into()))
            .map_err(|msg| Error::Credential(format!("{what}: {msg}")))
    }

    /// The token in `path` (surrounding whitespace, such as a final newline, is dropped).
    pub fn from_file(path: &Path) -> Result<Token> {
        let bad = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = crate::read_file(path)?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| bad("a token file must hold text".into()))?;
        validate(text).map(|t| Token(t.into())).map_err(bad)
    }

    /// `role`'s token: from `file` if one is named, else from the role's variable
    /// ([`Role::env_var`]), else none.
    pub fn resolve(role: Role, file: Option<&Path>) -> Result<Option<Token>> {
        if let Some(path) = file {
            return Token::from_file(path).map(Some);
        }
        match std::env::var(role.env_var()) {
            Ok(v) => Token::new(&v, role.env_var()).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::Credential(format!(
                "{}: the token is not valid text",
                role.env_var()
            ))),
        }
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

/// The credentials a server accepts, one per role at most, kept as hashes.
#[derive(Clone, Default)]
pub struct Credentials {
    entries: Vec<(Role, [u8; 32])>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<&str> = self.entries.iter().map(|(r, _)| r.name()).collect();
        f.debug_struct("Credentials")
            .field("roles", &roles)
            .finish()
    }
}

impl Credentials {
    /// No credential: every call is taken.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `role`'s token (nothing when `token` is None). Two roles may not share a token:
    /// a caller holding one would then hold both.
    pub fn with(mut self, role: Role, token: Option<Token>) -> Result<Self> {
        let Some(token) = token else {
            return Ok(self);
        };
        let digest = token.digest();
        for (other, d) in &self.entries {
            if *other == role {
                return Err(Error::Credential(format!(
                    "the {role} token is given twice"
                )));
            }
            if bool::from(d.ct_eq(&digest)) {
                return Err(Error::Credential(format!(
                    "the {other} and {role} tokens are the same; each role needs its own"
                )));
            }
        }
        self.entries.push((role, digest));
        Ok(self)
    }

    /// Whether no credential is held (every call is then taken).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The roles that have a credential here.
    pub fn roles(&self) -> Vec<Role> {
        self.entries.iter().map(|(r, _)| *r).collect()
    }

    /// The role whose token `presented` is, comparing with every credential in constant time.
    fn identify(&self, presented: &[u8]) -> Option<Role> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (role, d) in &self.entries {
            // No early exit: every credential is compared, whichever matches.
            if bool::from(d.ct_eq(&digest)) {
                found = Some(*role);
            }
        }
        found
    }

    /// Whether a call to `path` carrying the `authorization` header `header` may go on.
    pub fn check(
        &self,
        policy: Policy,
        path: &str,
        header: Option<&[u8]>,
    ) -> std::result::Result<(), Status> {
        let access = policy(path);
        if self.is_empty() || access == Access::Open {
            return Ok(());
        }
        let Some(header) = header else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a credential (authorization: Bearer <token>){}",
                needs(access)
            )));
        };
        let token = strip_bearer(header).ok_or_else(|| {
            Status::unauthenticated("the authorization header must be `Bearer <token>`")
        })?;
        let Some(role) = self.identify(token) else {
            return Err(Status::unauthenticated(format!(
                "the credential presented for {path} is not one this server accepts"
            )));
        };
        match access {
            Access::Open | Access::AnyRole => Ok(()),
            Access::Role(needed) if needed == role => Ok(()),
            Access::Role(needed) => Err(Status::permission_denied(format!(
                "a {role} credential may not call {path}; it needs the {needed} credential"
            ))),
        }
    }
}

/// The token in `text` without surrounding whitespace, or why it cannot be one.
fn validate(text: &str) -> std::result::Result<&str, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the token is empty".into());
    }
    if text.len() < MIN_TOKEN_LEN || text.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters, this one has {}",
            text.len()
        ));
    }
    if let Some(c) = text.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "a token may hold only visible ASCII characters, this one holds {c:?}"
        ));
    }
    Ok(text)
}

fn needs(access: Access) -> String {
    match access {
        Access::Role(r) => format!(": the {r} token"),
        _ => String::new(),
    }
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (health checks: load balancers and orchestrators probe without credentials).
    Open,
    /// The credential of this role.
    Role(Role),
    /// Any credential the server accepts (reflection, which only describes the services).
    AnyRole,
}

/// Which access each RPC of a server needs, by its path (`/package.Service/Method`).
pub type Policy = fn(&str) -> Access;

/// The path prefix of the standard health service, open on every server.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The tower layer that checks every call against the server's credentials.
#[derive(Clone)]
pub struct AuthLayer {
    gate: Arc<(Credentials, Policy)>,
}

impl AuthLayer {
    /// A layer accepting `credentials` under `policy`.
    pub fn new(credentials: Credentials, policy: Policy) -> Self {
        Self {
            gate: Arc::new((credentials, policy)),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            gate: self.gate.clone(),
            inner,
        }
    }
}

/// A server's services behind the credential check ([`AuthLayer`]).
#[derive(Clone)]
pub struct Auth<S> {
    gate: Arc<(Credentials, Policy)>,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<std::result::Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (credentials, policy) = &*self.gate;
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match credentials.check(*policy, req.uri().path(), header) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(status) => {
                tracing::debug!(path = req.uri().path(), code = ?status.code(), "call refused");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

/// The client side: attaches the role's token to every call (nothing without one).
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// Presents `token` (none: calls go without a credential).
    pub fn new(token: Option<&Token>) -> Self {
        Bearer(token.and_then(|t| {
            // A token is visible ASCII by construction, so it always makes a header value.
            let mut v = MetadataValue::try_from(format!("Bearer {}", t.0)).ok()?;
            v.set_sensitive(true);
            Some(v)
        }))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that presents the role's credential on every call.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Option<Token> {
        Some(Token::new(s, "test").unwrap())
    }

    fn policy(path: &str) -> Access {
        if path.starts_with(HEALTH_PREFIX) {
            Access::Open
        } else if path == "/p.S/Status" {
            Access::Role(Role::Status)
        } else if path.starts_with("/p.S/") {
            Access::Role(Role::Worker)
        } else {
            Access::AnyRole
        }
    }

    fn creds() -> Credentials {
        Credentials::none()
            .with(Role::Worker, token("worker-token-0123456789"))
            .unwrap()
            .with(Role::Status, token("status-token-0123456789"))
            .unwrap()
    }

    #[test]
    fn each_outcome_of_a_check() {
        let c = creds();
        let check = |path: &str, h: Option<&str>| c.check(policy, path, h.map(str::as_bytes));
        assert!(check("/p.S/Join", Some("Bearer worker-token-0123456789")).is_ok());
        assert!(check("/p.S/Join", Some("bearer worker-token-0123456789")).is_ok());
        assert!(check("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(check("/x.R/Info", Some("Bearer status-token-0123456789")).is_ok());
        let code = |r: std::result::Result<(), Status>| r.unwrap_err().code();
        assert_eq!(code(check("/p.S/Join", None)), tonic::Code::Unauthenticated);
        assert_eq!(code(check("/x.R/Info", None)), tonic::Code::Unauthenticated);
        assert_eq!(
            code(check("/p.S/Join", Some("Bearer worker-token-012345678X"))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(check("/p.S/Join", Some("worker-token-0123456789"))),
            tonic::Code::Unauthenticated
        );
        let denied = check("/p.S/Join", Some("Bearer status-token-0123456789")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("status") && denied.message().contains("worker"));
    }

    #[test]
    fn no_credentials_take_every_call() {
        let c = Credentials::none();
        assert!(c.check(policy, "/p.S/Join", None).is_ok());
        assert!(
            c.check(policy, "/p.S/Join", Some(b"Bearer nonsense"))
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_checked_when_made() {
        assert!(Token::new("short", "x").is_err());
        assert!(Token::new("has a space in the middle", "x").is_err());
        assert!(Token::new(&"a".repeat(MAX_TOKEN_LEN + 1), "x").is_err());
        let t = Token::new("  0123456789abcdef\n", "x").unwrap();
        assert_eq!(&*t.0, "0123456789abcdef");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        // One token for two roles would give either role both.
        let same = Credentials::none()
            .with(Role::Worker, token("same-token-0123456789"))
            .unwrap()
            .with(Role::Register, token("same-token-0123456789"));
        assert!(
            same.unwrap_err()
                .to_string()
                .contains("worker and register")
        );
    }

    #[test]
    fn token_files_name_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("worker.token");
        std::fs::write(&p, "tiny\n").unwrap();
        let e = Token::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("worker.token") && e.contains("16"), "{e}");
        let e = Token::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        assert!(Token::from_file(&p).is_ok());
    }
}
