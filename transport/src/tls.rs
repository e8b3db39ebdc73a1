//! TLS and mutual TLS on every server and client, through tonic's rustls support.
//!
//! Every role takes the same three flags ([`TlsArgs`]). As a server, `--tls-cert`/`--tls-key`
//! are its certificate and key, and `--tls-ca` makes client certificates signed by that CA
//! required (mutual TLS). As a client, `--tls-ca` verifies the server and the role's own
//! certificate is presented to it. A role that is both (a teacher registering with a
//! coordinator, a coordinator calling teachers) uses the same files both ways.
//!
//! Addresses say what they expect: with TLS configured only `https://` is dialled (an
//! `http://` address would silently go plaintext), and without it `https://` is refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::auth::{AuthChannel, AuthLayer, Bearer, Credentials, Policy, Token};
use crate::limits::Limits;
use crate::{Error, Result, read_file};

/// The TLS flags of every role.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// PEM certificate this process presents: as a server, and as a client under mutual TLS.
    #[arg(long, env = "DISTILL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "DISTILL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): a server requires client certificates signed by it (mutual TLS);
    /// a client verifies the server with it.
    #[arg(long, env = "DISTILL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Whether any TLS flag is given.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let (c, k) = (read_file(cert)?, read_file(key)?);
                check_pem(cert, &c, "CERTIFICATE")?;
                check_pem(key, &k, "PRIVATE KEY")?;
                Ok(Some(Identity::from_pem(c, k)))
            }
            (None, None) => Ok(None),
            _ => Err(Error::Tls(
                "--tls-cert and --tls-key go together: give both or neither".into(),
            )),
        }
    }

    fn ca(&self) -> Result<Option<Certificate>> {
        match &self.tls_ca {
            Some(path) => {
                let pem = read_file(path)?;
                check_pem(path, &pem, "CERTIFICATE")?;
                Ok(Some(Certificate::from_pem(pem)))
            }
            None => Ok(None),
        }
    }
}

/// A clearer error than rustls' for a file that is not the PEM it should be.
fn check_pem(path: &std::path::Path, bytes: &[u8], label: &str) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY".
    if text.contains("-----BEGIN ") && text.contains(&format!("{label}-----")) {
        Ok(())
    } else {
        Err(Error::File {
            path: path.to_path_buf(),
            msg: format!("not a PEM file holding a {}", label.to_lowercase()),
        })
    }
}

/// What a server presents and accepts: its TLS configuration and its credentials.
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    tls: Option<ServerTlsConfig>,
    mutual: bool,
    credentials: Credentials,
    limits: Limits,
}

/// The server builder every role uses: limits applied, the credential check in front.
pub type SecureServer = Server<Stack<AuthLayer, NoLayer>>;

impl ServerSecurity {
    /// Plaintext, no credential: a trusted loopback.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// From the TLS flags and the credentials this server accepts.
    pub fn new(tls: &TlsArgs, credentials: Credentials) -> Result<Self> {
        let limits = Limits::default();
        let identity = tls.identity()?;
        let ca = tls.ca()?;
        let (tls, mutual) = match (identity, ca) {
            (None, None) => (None, false),
            (None, Some(_)) => {
                return Err(Error::Tls(
                    "a server needs --tls-cert and --tls-key; --tls-ca alone only verifies clients"
                        .into(),
                ));
            }
            (Some(id), ca) => {
                let mutual = ca.is_some();
                let mut cfg = ServerTlsConfig::new()
                    .identity(id)
                    .timeout(limits.tls_handshake_timeout);
                if let Some(ca) = ca {
                    cfg = cfg.client_ca_root(ca);
                }
                (Some(cfg), mutual)
            }
        };
        Ok(Self {
            tls,
            mutual,
            credentials,
            limits,
        })
    }

    /// These settings with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether connections are encrypted.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether client certificates are required.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The credentials this server accepts.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// A server builder with TLS, the limits and the credential check under `policy`.
    pub fn builder(&self, policy: Policy) -> Result<SecureServer> {
        let mut server = self.limits.apply(Server::builder());
        if let Some(tls) = &self.tls {
            server = server
                .tls_config(tls.clone())
                .map_err(|e| Error::Tls(format!("the certificate and key do not fit: {e}")))?;
        }
        Ok(server.layer(AuthLayer::new(self.credentials.clone(), policy)))
    }

    /// Warns when a server on a non-loopback address is plaintext or takes every call.
    pub fn warn_if_exposed(&self, addr: SocketAddr, role: &str) {
        if addr.ip().is_loopback() {
            return;
        }
        if self.tls.is_none() {
            tracing::warn!(
                %addr,
                "{role} listens without TLS on a non-loopback address: traffic is plaintext \
                 (give --tls-cert, --tls-key and --tls-ca)"
            );
        }
        if self.credentials.is_empty() && !self.mutual {
            tracing::warn!(
                %addr,
                "{role} takes calls from anyone who can reach it: no credential is configured"
            );
        }
    }
}

/// What a client presents: the CA that verifies servers, its own certificate, its credential.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    tls: Option<ClientTlsConfig>,
    bearer: Bearer,
}

impl ClientSecurity {
    /// Plaintext, no credential.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// From the TLS flags and the credential to present (none: calls carry no credential).
    pub fn new(tls: &TlsArgs, token: Option<&Token>) -> Result<Self> {
        let identity = tls.identity()?;
        let ca = tls.ca()?;
        let tls = match (ca, identity) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::Tls(
                    "a client needs --tls-ca to verify the servers it dials".into(),
                ));
            }
            (Some(ca), id) => {
                let mut cfg = ClientTlsConfig::new().ca_certificate(ca);
                if let Some(id) = id {
                    cfg = cfg.identity(id);
                }
                Some(cfg)
            }
        };
        Ok(Self {
            tls,
            bearer: Bearer::new(token),
        })
    }

    /// These settings presenting `token` instead.
    pub fn with_token(mut self, token: Option<&Token>) -> Self {
        self.bearer = Bearer::new(token);
        self
    }

    /// Whether servers are dialled over TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The scheme addresses must have: `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.uses_tls() { "https" } else { "http" }
    }

    /// `address` with this configuration's scheme when it has none (`HOST:PORT`).
    pub fn url(&self, address: &str) -> String {
        if address.contains("://") {
            address.to_string()
        } else {
            format!("{}://{address}", self.scheme())
        }
    }

    /// Whether `url` can be dialled with this configuration (see the module doc).
    pub fn check_url(&self, url: &str) -> Result<()> {
        let bad = |msg: &str| Error::Address {
            url: url.to_string(),
            msg: msg.to_string(),
        };
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match (scheme, self.uses_tls()) {
            ("https", true) | ("http", false) => Ok(()),
            ("http", true) => Err(bad(
                "TLS is configured, so only https:// addresses are dialled (http:// would be plaintext)",
            )),
            ("https", false) => Err(bad(
                "an https:// address needs TLS: give --tls-ca (the CA that signed the server's certificate)",
            )),
            _ => Err(bad("the address must start with http:// or https://")),
        }
    }

    /// An endpoint for `url` with TLS set up; the caller adds timeouts and windows.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        self.endpoint_named(url, None)
    }

    /// [`ClientSecurity::endpoint`], the server's certificate checked against `server_name`
    /// when given instead of the URL's host (a replica found through DNS is dialled by IP
    /// address but certified under its name).
    pub fn endpoint_named(&self, url: &str, server_name: Option<&str>) -> Result<Endpoint> {
        self.check_url(url)?;
        let ep = Endpoint::from_shared(url.to_string()).map_err(|e| Error::Address {
            url: url.to_string(),
            msg: e.to_string(),
        })?;
        match &self.tls {
            Some(tls) => {
                let tls = match server_name {
                    Some(name) => tls.clone().domain_name(name),
                    None => tls.clone(),
                };
                ep.tls_config(tls).map_err(|e| Error::Address {
                    url: url.to_string(),
                    msg: format!("TLS: {e}"),
                })
            }
            None => Ok(ep),
        }
    }

    /// A lazily connecting channel over `endpoint` that presents the credential.
    pub fn channel(&self, endpoint: Endpoint) -> AuthChannel {
        tonic::service::interceptor::InterceptedService::new(
            endpoint.connect_lazy(),
            self.bearer.clone(),
        )
    }
}
