//! The `coordinator` command line (also `distill coordinator`).

use std::path::PathBuf;

use anyhow::Context;

use crate::security::SecurityArgs;
use crate::{RunConfig, prepare_with, serve};

/// Coordinate a distributed distillation run: shards the data, asks the teachers for soft
/// targets and streams batches to student workers; exits when the run is complete.
#[derive(clap::Parser, Debug)]
#[command(name = "coordinator", version, about)]
pub struct Args {
    /// Run config (TOML; see docs/config.md).
    #[arg(long, env = "DISTILL_CONFIG")]
    pub config: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "DISTILL_LISTEN", default_value = "127.0.0.1:50050")]
    pub listen: String,
    /// TLS and the credentials of each role (see docs/security.md).
    #[command(flatten)]
    pub security: SecurityArgs,
    /// The Prometheus endpoint (`--metrics-listen`).
    #[command(flatten)]
    pub metrics: distill_transport::MetricsArgs,
}

/// Loads the config and the data, prints `listening on HOST:PORT`, runs until the run is
/// complete (or SIGINT/SIGTERM).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::from_file(&args.config)?;
    let security = args.security.load()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let shutdown = distill_shutdown::on_signal();
    args.metrics.serve(shutdown.clone()).await?;
    let run = prepare_with(cfg, security).await?;
    println!("listening on {}", listener.local_addr()?);
    match serve(run, listener, shutdown).await? {
        Some(report) => {
            use std::io::Write;
            // The run is done and its report written: a closed stdout is not an error here.
            let _ = writeln!(
                std::io::stdout(),
                "run complete: student test errors {}/{}, {} of {} batches, {:.0} samples/s; report in {}",
                report.student_test_errors,
                report.test_size,
                report.batches_trained,
                report.batches_expected,
                report.samples_per_sec,
                report
                    .student_checkpoint
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            Ok(())
        }
        None => anyhow::bail!("the run was stopped before it completed"),
    }
}
