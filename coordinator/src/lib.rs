//! The distill coordinator: reads and shards the data, leases batches to student workers,
//! asks the teacher ensemble for soft targets ahead of need, and keeps the run's state and
//! report in its run directory.
//!
//! The binary is thin: it parses flags, binds the listener and calls [`serve`]; tests and
//! `distill demo` call [`serve`] in-process.

pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod ledger;
pub mod membership;
pub mod registry;
pub mod run;
pub mod service;
pub mod state;
pub mod sync;
pub mod teachers;

use std::sync::Arc;
use std::time::Duration;

use distill_proto::pb::coordinator_server::CoordinatorServer;
use distill_proto::pb::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use config::RunConfig;
pub use error::{Error, Result};
pub use registry::RegistryService;
pub use run::{Run, RunReport};
pub use service::CoordinatorService;

/// Loads the run's data set (off the async threads) and builds the run.
pub async fn prepare(cfg: RunConfig) -> Result<Arc<Run>> {
    let source = cfg.data.clone();
    let data = tokio::task::spawn_blocking(move || distill_core::data::Dataset::load(&source))
        .await
        .map_err(|e| Error::Internal(format!("data loading task: {e}")))??;
    tracing::info!(
        data = %data.source,
        train = data.train.len(),
        test = data.test.len(),
        classes = data.classes,
        "data loaded"
    );
    let run = Run::new(cfg, data)?;
    let digests = run
        .pool
        .check_models(run.data.row_len(), run.data.classes)
        .await?;
    // `check_models` pinned them as it recorded the replicas; pinned again here so that the
    // cache key and the membership can never disagree.
    run.pool.pin_digests(&digests)?;
    let r = run.clone();
    tokio::task::spawn_blocking(move || r.open_cache(&digests))
        .await
        .map_err(|e| Error::Internal(format!("cache task: {e}")))??;
    Ok(run)
}

/// Serves the run on `listener` until it is complete (the report is written) or `shutdown`
/// is cancelled; returns the report if the run completed.
pub async fn serve(
    run: Arc<Run>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Option<RunReport>> {
    let max_msg = run.cfg.max_message_bytes();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health_reporter
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distill_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection service: {e}")))?;
    let svc = CoordinatorServer::new(CoordinatorService::new(run.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let registry_service = RegistryService::new(run.pool.membership().clone());
    let registry = RegistryServer::new(registry_service.clone())
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    // Expires the leases of registered replicas that stopped heartbeating.
    let lease_ticker = tokio::spawn(registry::run_ticker(
        registry_service,
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    // Probes the replicas taken out of rotation until they answer again.
    let prober = {
        let (run, stop) = (run.clone(), shutdown.clone());
        tokio::spawn(async move { run.pool.run_prober(stop).await })
    };

    let ticker = {
        let (run, stop) = (run.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = run.finished.cancelled() => break,
                    _ = every.tick() => run.tick(),
                }
            }
        })
    };
    let teacher_eval = {
        let (run, stop) = (run.clone(), shutdown.clone());
        tokio::spawn(async move {
            if run.is_offline() {
                tracing::info!("offline run: no teachers to evaluate");
            } else if let Err(e) = run.clone().evaluate_teachers(stop).await {
                tracing::warn!(error = %e, "teacher evaluation did not finish");
            }
        })
    };
    let signal = {
        let (run, shutdown) = (run.clone(), shutdown.clone());
        async move {
            tokio::select! {
                _ = run.finished.cancelled() => {},
                _ = shutdown.cancelled() => tracing::info!("shutting down"),
            }
            health_reporter
                .set_not_serving::<CoordinatorServer<CoordinatorService>>()
                .await;
            health_reporter
                .set_not_serving::<RegistryServer<RegistryService>>()
                .await;
        }
    };
    // Parameters and soft targets are megabytes per message: let HTTP/2 grow its flow-control
    // windows instead of waiting for a window update every 64 KiB.
    let server = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(svc)
        .add_service(registry)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    // Graceful shutdown would also wait for idle client connections to close; give streams a
    // short grace to deliver their last messages, then drop what is left.
    let drained = {
        let (run, shutdown) = (run.clone(), shutdown.clone());
        async move {
            tokio::select! {
                _ = run.finished.cancelled() => {},
                _ = shutdown.cancelled() => {},
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    tokio::select! {
        r = server => r?,
        _ = drained => {}
    }
    ticker.abort();
    teacher_eval.abort();
    lease_ticker.abort();
    prober.abort();
    Ok(run.report())
}
