//! What a caller presents to keep an identity the coordinator handed out — a replica's
//! registration at its address, a worker id's current incarnation — and the fresh secret a
//! new one will hold. The caller (a transport handler) draws `fresh` from a cryptographic
//! generator ([`distill_transport::secret::fresh_secret`]); the state machines only keep and
//! compare secrets, so they stay pure and their tests choose the secrets.

/// The secret a request presents (empty when it holds none) and the one a new identity gets.
#[derive(Clone, PartialEq, Eq)]
pub struct Claim {
    /// The secret presented with the request.
    pub presented: String,
    /// The secret a new registration or incarnation gets.
    pub fresh: String,
}

impl Claim {
    /// A claim presenting `presented`, with `fresh` for what it creates.
    pub fn new(presented: impl Into<String>, fresh: impl Into<String>) -> Self {
        Self {
            presented: presented.into(),
            fresh: fresh.into(),
        }
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Claim(<redacted>)")
    }
}
