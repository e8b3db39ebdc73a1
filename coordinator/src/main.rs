//! `coordinator --config FILE --listen ADDR`: run one distillation.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use coordinator::{RunConfig, prepare, serve};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Coordinate a distributed distillation run: shards the data, asks the teachers for soft
/// targets and streams batches to student workers.
#[derive(Parser)]
#[command(name = "coordinator", version, about)]
struct Args {
    /// Run config (TOML; see docs/config.md).
    #[arg(long, env = "DISTILL_CONFIG")]
    config: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "DISTILL_LISTEN", default_value = "127.0.0.1:50050")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_core::logging::init();
    let args = Args::parse();
    let cfg = RunConfig::from_file(&args.config)?;
    let run = prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    match serve(run, listener, shutdown).await? {
        Some(report) => {
            println!(
                "run complete: student test errors {}/{}, {} batches, {:.0} samples/s; report in {}",
                report.student_test_errors,
                report.test_size,
                report.batches_trained,
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
