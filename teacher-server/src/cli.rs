//! The `teacher-server` command line (also `distill teacher-server`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::{ServeOptions, build_service, load_checkpoint, serve};

/// Serve a distill checkpoint's tempered logits (z/T) over gRPC.
#[derive(clap::Parser, Debug)]
#[command(name = "teacher-server", version, about)]
pub struct Args {
    /// Checkpoint to serve (a distill safetensors file).
    #[arg(long, env = "DISTILL_MODEL")]
    pub model: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "DISTILL_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Ensemble member name this replica serves.
    #[arg(long, env = "DISTILL_MEMBER", default_value = "default")]
    pub member: String,
    /// Most rows per forward pass (and per request).
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,
    /// Longest wait, in ms, to coalesce requests into one batch.
    #[arg(long, default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Most requests in flight; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_inflight: usize,
    /// Largest gRPC message, in MiB, in either direction.
    #[arg(long, default_value_t = 64)]
    pub max_message_mb: usize,
    /// Device: cpu, auto or cuda:N.
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Benchmarking aid: add this much latency (ms) to every forward pass.
    #[arg(long, default_value_t = 0)]
    pub simulate_latency_ms: u64,
}

/// Loads the model, prints `listening on HOST:PORT`, serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
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
    println!("listening on {}", listener.local_addr()?);
    let shutdown = distill_proto::shutdown::on_signal();
    serve(service, listener, opts.max_message_bytes, shutdown).await?;
    Ok(())
}
