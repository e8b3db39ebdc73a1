//! Server assembly: the Coordinator and Registry services, health and reflection on one
//! listener, the background tasks of the membership, and the one driver of the run.

pub mod coordinator;
pub mod feeder;

use std::time::Duration;

use distill_proto::pb::coordinator_server::CoordinatorServer;
use distill_proto::pb::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::report::RunReport;
use crate::driver::context::Run;
use crate::driver::{Driver, Outcome};
use crate::error::{Error, Result};
use crate::registry::{self, RegistryService};
use coordinator::CoordinatorService;

/// How long the streams get to deliver their last messages once the run is over.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `run` on `listener` until it is complete (the report is written), fails, or
/// `shutdown` is cancelled; returns the report if the run completed, and the run's error if
/// it failed (its stored state is then resumable).
pub async fn serve(
    run: Run,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Option<RunReport>> {
    let max_msg = run.ctx.cfg.max_message_bytes();
    let security = run.ctx.security.clone();
    if let Ok(addr) = listener.local_addr() {
        security.server.warn_if_exposed(addr, "the coordinator");
    }
    let builder = security
        .server
        .builder(crate::security::policy)
        .map_err(|e| Error::Config(e.to_string()))?;
    let registry_service = RegistryService::new(run.ctx.pool.membership().clone())
        .dialling_with(security.teachers.clone());
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

    let (driver, handle, ctx) = Driver::new(run, &shutdown);
    let finished = CancellationToken::new();
    let streams = TaskTracker::new();
    let background = TaskTracker::new();
    let svc = CoordinatorServer::new(CoordinatorService::new(
        ctx.clone(),
        handle.clone(),
        streams.clone(),
        finished.clone(),
    ))
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    let registry = RegistryServer::new(registry_service.clone())
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let stop_background = CancellationToken::new();
    // Expires the leases of registered replicas that stopped heartbeating.
    background.spawn(registry::run_ticker(
        registry_service,
        Duration::from_millis(100),
        stop_background.clone(),
    ));
    // Probes the replicas taken out of rotation until they answer again.
    {
        let (ctx, stop) = (ctx.clone(), stop_background.clone());
        background.spawn(async move { ctx.pool.run_prober(stop).await });
    }
    // Resolves the members' `dns://` endpoints into replicas, now and periodically.
    background.spawn(crate::discovery::run(ctx.clone(), stop_background.clone()));
    background.spawn(crate::telemetry::run_publisher(
        handle,
        ctx.pool.clone(),
        stop_background.clone(),
    ));
    let stop_server = CancellationToken::new();
    let signal = {
        let stop = stop_server.clone();
        async move {
            stop.cancelled().await;
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
    let server = tokio::spawn(
        builder
            .http2_adaptive_window(Some(true))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(svc)
            .add_service(registry)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal),
    );

    let outcome = driver.run(shutdown.clone()).await;
    // The streams stop reading, deliver what the driver queued (Done, or the run's error) and
    // end; then the server stops taking calls and the background tasks stop.
    finished.cancel();
    streams.close();
    if tokio::time::timeout(DRAIN, streams.wait()).await.is_err() {
        tracing::debug!("some streams did not end within the drain time");
    }
    stop_server.cancel();
    stop_background.cancel();
    background.close();
    background.wait().await;
    match tokio::time::timeout(DRAIN, server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(Error::Internal(format!("server task: {e}"))),
        // Idle client connections may keep a graceful shutdown waiting; they are dropped.
        Err(_) => tracing::debug!("the server did not stop within the drain time"),
    }
    match outcome {
        Outcome::Complete(report) => Ok(Some(*report)),
        Outcome::Stopped => Ok(None),
        Outcome::Failed(e) => Err(Error::RunFailed(e)),
    }
}
