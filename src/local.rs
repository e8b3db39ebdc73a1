//! A whole distillation run inside one process, on loopback: teacher servers (one or more
//! replicas per member), the coordinator and student workers, each on its own `127.0.0.1:0`
//! socket and talking real gRPC. `distill demo` and `distill bench` use it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use coordinator::RunReport;
use coordinator::config::{MemberConfig, RunConfig};
use distill_core::checkpoint::Checkpoint;
use student_worker::WorkerReport;
use tokio_util::sync::CancellationToken;

/// One ensemble member served locally.
pub struct LocalMember {
    /// Member name.
    pub name: String,
    /// Its weights.
    pub checkpoint: Checkpoint,
    /// Replicas (servers) of it.
    pub replicas: usize,
    /// Server options of each replica (`member` is overwritten with `name`).
    pub opts: teacher_server::ServeOptions,
}

/// What a local run produced.
pub struct LocalOutcome {
    /// The coordinator's report.
    pub report: RunReport,
    /// Each worker's report, in worker order.
    pub workers: Vec<WorkerReport>,
}

/// Runs `cfg` (its `members` are replaced by the local servers, `min_workers` by `workers`)
/// with `workers` student workers whose work dirs go under `work_root`.
pub async fn run(
    cfg: RunConfig,
    members: &[LocalMember],
    workers: usize,
    work_root: PathBuf,
) -> anyhow::Result<LocalOutcome> {
    run_with_progress(cfg, members, workers, work_root, None).await
}

/// [`run`], showing the run's progress (batches trained of expected, the epoch) on `bar`.
pub async fn run_with_progress(
    mut cfg: RunConfig,
    members: &[LocalMember],
    workers: usize,
    work_root: PathBuf,
    bar: Option<indicatif::ProgressBar>,
) -> anyhow::Result<LocalOutcome> {
    let shutdown = CancellationToken::new();
    let mut servers = Vec::new();
    cfg.members.clear();
    for m in members {
        let mut endpoints = Vec::new();
        for _ in 0..m.replicas.max(1) {
            let opts = teacher_server::ServeOptions {
                member: m.name.clone(),
                ..m.opts.clone()
            };
            let service = teacher_server::build_service(&m.checkpoint, &Device::Cpu, &opts)?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            endpoints.push(format!("http://{}", listener.local_addr()?));
            servers.push(tokio::spawn(teacher_server::serve(
                service,
                listener,
                opts.max_message_bytes,
                shutdown.clone(),
            )));
        }
        cfg.members.push(MemberConfig {
            name: m.name.clone(),
            endpoints,
            weight: 1.0,
            ..Default::default()
        });
    }
    let outcome = serve_with_workers(cfg, workers, work_root, bar, shutdown.clone()).await;
    shutdown.cancel();
    for s in servers {
        s.await.context("teacher task")??;
    }
    outcome
}

/// Runs `cfg` as it is (its members already serving, or none: an offline run from a cache)
/// with `workers` in-process student workers; cancels `shutdown` for them once the run ends.
pub async fn serve_with_workers(
    mut cfg: RunConfig,
    workers: usize,
    work_root: PathBuf,
    bar: Option<indicatif::ProgressBar>,
    shutdown: CancellationToken,
) -> anyhow::Result<LocalOutcome> {
    cfg.min_workers = workers.max(1);
    // The worker's credit window matches the coordinator's prefetch.
    let prefetch = cfg.prefetch.clamp(1, 1024);
    cfg.validate()?;
    let run = coordinator::prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coord_addr = listener.local_addr()?;
    let coord = tokio::spawn(coordinator::serve(run, listener, shutdown.clone()));
    let handles: Vec<_> = (0..workers.max(1))
        .map(|i| {
            let worker_cfg = student_worker::WorkerConfig {
                coordinator: format!("http://{coord_addr}"),
                work_dir: work_root.join(format!("worker-{i}")),
                worker_id: Some(format!("worker-{i}")),
                connect_timeout: Duration::from_secs(30),
                prefetch: prefetch as u32,
                ..Default::default()
            };
            tokio::spawn(student_worker::run(worker_cfg, shutdown.clone()))
        })
        .collect();
    let watching = CancellationToken::new();
    if let Some(bar) = bar {
        tokio::spawn(show_progress(
            format!("http://{coord_addr}"),
            bar,
            watching.clone(),
        ));
    }
    let report = coord.await.context("coordinator task");
    watching.cancel();
    let report = report??;
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.context("worker task")?);
    }
    shutdown.cancel();
    let workers = results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .context("a student worker failed")?;
    Ok(LocalOutcome {
        report: report.context("the coordinator stopped before the run completed")?,
        workers,
    })
}

/// Polls the coordinator's `RunStatus` a few times a second and shows it on `bar` until
/// `stop`. (Display only: nothing waits on it, and a status it cannot get is skipped.)
async fn show_progress(url: String, bar: indicatif::ProgressBar, stop: CancellationToken) {
    use distill_proto::pb::RunStatusRequest;
    use distill_proto::pb::coordinator_client::CoordinatorClient;
    let mut client = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if client.is_none() {
            client = CoordinatorClient::connect(url.clone()).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        match c.run_status(RunStatusRequest {}).await {
            Ok(s) => {
                let s = s.into_inner();
                bar.set_length(s.batches_expected.max(1));
                bar.set_position(s.batches_trained);
                // The epoch the trained batches have reached (the coordinator's own epoch
                // counter runs ahead by its prefetch).
                let per_epoch = (s.batches_expected / u64::from(s.epochs.max(1))).max(1);
                let epoch = (s.batches_trained / per_epoch + 1).min(u64::from(s.epochs.max(1)));
                bar.set_message(format!(
                    "epoch {epoch}/{} · {:.0} samples/s",
                    s.epochs, s.samples_per_sec
                ));
            }
            Err(_) => client = None,
        }
    }
    bar.finish_and_clear();
}
