//! The `teacher-server` command line (also `distill teacher-server`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::register;
use crate::{ServeOptions, build_service, load_checkpoint, serve_with};
use distill_transport::{ClientSecurity, Credentials, Role, ServerSecurity, TlsArgs, Token};

/// Serve a distill checkpoint's tempered logits (z/T) over gRPC.
#[derive(clap::Parser, Debug)]
#[command(name = "teacher-server", version, about)]
pub struct Args {
    /// Model to serve: a distill checkpoint (safetensors), or a language model: a llama-family
    /// `.gguf` file or a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
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
    /// Language models: most padded tokens (sequences × length) per request and forward pass.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Largest gRPC message, in MiB, in either direction.
    #[arg(long, default_value_t = 64)]
    pub max_message_mb: usize,
    /// Device: cpu, auto or cuda:N.
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Benchmarking aid: add this much latency (ms) to every forward pass.
    #[arg(long, default_value_t = 0)]
    pub simulate_latency_ms: u64,
    /// Coordinator to register this replica with, under `--member` (elastic membership), e.g.
    /// http://coord:50050; heartbeats keep the registration, it deregisters on shutdown.
    #[arg(long, env = "DISTILL_REGISTER")]
    pub register: Option<String>,
    /// Address the coordinator should dial this replica at, HOST:PORT or http://HOST:PORT
    /// (default: the bound listen address; an unspecified host such as 0.0.0.0 is replaced by
    /// the coordinator with the host the registration came from).
    #[arg(long, env = "DISTILL_ADVERTISE", requires = "register")]
    pub advertise: Option<String>,
    /// TLS: this server's certificate and key, and the CA its clients must be signed by
    /// (the same files serve the registration with the coordinator).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The Prometheus endpoint (`--metrics-listen`).
    #[command(flatten)]
    pub metrics: distill_transport::MetricsArgs,
    /// File holding the infer token callers must present (else DISTILL_INFER_TOKEN; with
    /// neither, calls need no token).
    #[arg(long, env = "DISTILL_INFER_TOKEN_FILE")]
    pub infer_token_file: Option<PathBuf>,
    /// File holding the register token presented to the coordinator (else
    /// DISTILL_REGISTER_TOKEN).
    #[arg(long, env = "DISTILL_REGISTER_TOKEN_FILE")]
    pub register_token_file: Option<PathBuf>,
}

/// Loads the model, prints `listening on HOST:PORT`, serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let device = distill_core::device::parse_device(&args.device)?;
    let opts = ServeOptions {
        member: args.member,
        max_batch: args.max_batch,
        max_delay: Duration::from_millis(args.max_delay_ms),
        max_inflight: args.max_inflight,
        max_message_bytes: args.max_message_mb << 20,
        simulate_latency: Duration::from_millis(args.simulate_latency_ms),
        max_tokens: args.max_tokens,
    };
    let infer = Token::resolve(Role::Infer, args.infer_token_file.as_deref())?;
    let security = ServerSecurity::new(&args.tls, Credentials::none().with(Role::Infer, infer)?)?;
    let register_token = Token::resolve(Role::Register, args.register_token_file.as_deref())?;
    let client_security = ClientSecurity::new(&args.tls, register_token.as_ref())?;
    let service = if crate::is_language_model(&args.model) {
        let lm = distill_core::lm::LanguageModel::load(&args.model, &device)?;
        crate::build_sequence_service(lm, &opts)?
    } else {
        build_service(&load_checkpoint(&args.model)?, &device, &opts)?
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Signals are handled from here on, so a supervisor may stop us as soon as it reads this.
    let shutdown = distill_shutdown::on_signal();
    args.metrics.serve(shutdown.clone()).await?;
    println!("listening on {local}");
    let registrar = match args.register {
        Some(coordinator) => {
            let advertise = args.advertise.unwrap_or_else(|| local.to_string());
            let mut reg_opts = register::RegisterOptions::new(
                coordinator,
                client_security.url(&advertise),
                service.info().clone(),
                u32::try_from(opts.max_inflight).unwrap_or(u32::MAX),
            );
            reg_opts.security = client_security;
            let view = service.clone();
            let in_flight =
                std::sync::Arc::new(move || u32::try_from(view.inflight()).unwrap_or(u32::MAX));
            Some(register::spawn(reg_opts, in_flight, shutdown.clone())?)
        }
        None => None,
    };
    serve_with(
        service,
        listener,
        opts.max_message_bytes,
        &security,
        shutdown,
    )
    .await?;
    if let Some(r) = registrar {
        // It deregisters within its call deadline once the token is cancelled.
        let _ = r.task.await;
    }
    Ok(())
}
