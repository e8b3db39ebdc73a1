//! `teacher-server --model FILE --listen ADDR`: serve one model's tempered logits.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use teacher_server::{ServeOptions, build_service, load_checkpoint, serve};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serve a distill checkpoint's tempered logits (z/T) over gRPC.
#[derive(Parser)]
#[command(name = "teacher-server", version, about)]
struct Args {
    /// Checkpoint to serve (a distill safetensors file).
    #[arg(long, env = "DISTILL_MODEL")]
    model: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "DISTILL_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Ensemble member name this replica serves.
    #[arg(long, env = "DISTILL_MEMBER", default_value = "default")]
    member: String,
    /// Most rows per forward pass (and per request).
    #[arg(long, default_value_t = 1024)]
    max_batch: usize,
    /// Longest wait, in ms, to coalesce requests into one batch.
    #[arg(long, default_value_t = 2)]
    max_delay_ms: u64,
    /// Most requests in flight; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    max_inflight: usize,
    /// Largest gRPC message, in MiB, in either direction.
    #[arg(long, default_value_t = 64)]
    max_message_mb: usize,
    /// Device: cpu, auto or cuda:N.
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    device: String,
    /// Benchmarking aid: add this much latency (ms) to every forward pass.
    #[arg(long, default_value_t = 0)]
    simulate_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_core::logging::init();
    let args = Args::parse();
    let device = distill_core::device::parse_device(&args.device)?;
    let ck = load_checkpoint(&args.model)?;
    let opts = ServeOptions {
        member: args.member,
        max_batch: args.max_batch,
        max_delay: Duration::from_millis(args.max_delay_ms),
        max_inflight: args.max_inflight,
        max_message_bytes: args.max_message_mb << 20,
        simulate_latency: Duration::from_millis(args.simulate_latency_ms),
    };
    let service = build_service(&ck, &device, &opts)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    serve(service, listener, opts.max_message_bytes, shutdown).await?;
    Ok(())
}

async fn wait_for_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}
