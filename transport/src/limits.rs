//! The limits every distill server runs under, so that no client can grow a server without
//! bound or hold its resources forever: streams per connection, calls in progress per
//! connection (the excess is answered `RESOURCE_EXHAUSTED` at once, not queued), HTTP/2
//! keepalive (a peer that stops answering pings is dropped), a deadline for each call's
//! handler to answer and for each TLS handshake.
//!
//! The defaults fit every role: a coordinator holds one long `Batches` stream per worker
//! connection and a teacher one `InferStream` per coordinator connection, so a few streams per
//! connection are used and [`Limits::max_streams_per_connection`] is far above them.

use std::time::Duration;

use tonic::transport::Server;

/// Limits applied to a server (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_streams_per_connection: u32,
    /// Calls per connection whose handler has not answered yet; more are shed with
    /// `RESOURCE_EXHAUSTED`.
    pub in_progress_per_connection: usize,
    /// Interval of the server's HTTP/2 pings.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long a handler may take to answer (for a stream: to start answering).
    pub handler_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 256,
            in_progress_per_connection: 256,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            handler_timeout: Duration::from_secs(120),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// `server` with these limits (the TLS handshake deadline is applied with the TLS config).
    pub fn apply<L>(&self, server: Server<L>) -> Server<L> {
        server
            .max_concurrent_streams(self.max_streams_per_connection)
            .concurrency_limit_per_connection(self.in_progress_per_connection)
            .load_shed(true)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .timeout(self.handler_timeout)
    }
}
