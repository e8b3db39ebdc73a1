//! The Prometheus endpoint every role serves with `--metrics-listen ADDR`: `GET /metrics` in
//! the Prometheus text format, rendered by `metrics-exporter-prometheus` from what the role
//! records through the `metrics` facade (each role lists its series in its `telemetry` module).
//!
//! The listener is our own rather than the exporter's so that port 0 works (the bound address
//! is logged, `metrics on http://ADDR/metrics`, for tests and supervisors to read) and so that it
//! stops with the role's one shutdown token. Without the flag no recorder is installed and every
//! `metrics::counter!` is a no-op.
//!
//! The endpoint has no authentication: it serves counters and latencies, never data, tokens or
//! weights. Bind it to an address only the cluster's scraper reaches.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The `--metrics-listen` flag, shared by every role's command line.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the address
    /// is logged). Off when not given.
    #[arg(long, env = "DISTILL_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Bucket bounds of every `*_seconds` histogram: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds of every `*_rows` histogram (rows per batch).
const ROWS_BUCKETS: &[f64] = &[
    1.0, 8.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

impl MetricsArgs {
    /// Installs the process's recorder and serves it until `shutdown` when the flag is given;
    /// returns the bound address. A role calls this once, before it serves.
    pub async fn serve(&self, shutdown: CancellationToken) -> Result<Option<SocketAddr>, Error> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Metrics(format!("binding --metrics-listen {addr}: {e}")))?;
        let handle = install()?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Metrics(format!("--metrics-listen {addr}: {e}")))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    // Histograms' rolling windows are kept up to date at each scrape rather
                    // than by a thread of their own.
                    handle.run_upkeep();
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
        tracing::info!(addr = %local, "metrics on http://{local}/metrics");
        Ok(Some(local))
    }
}

/// The process's Prometheus recorder (one per process: a second install is an error).
fn install() -> Result<PrometheusHandle, Error> {
    let bad = |e: metrics_exporter_prometheus::BuildError| Error::Metrics(e.to_string());
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(bad)?
        .set_buckets_for_metric(Matcher::Suffix("_rows".into()), ROWS_BUCKETS)
        .map_err(bad)?
        .install_recorder()
        .map_err(bad)
}
