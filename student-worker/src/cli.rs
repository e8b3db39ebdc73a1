//! The `student-worker` command line (also `distill student-worker`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{DEFAULT_MAX_MESSAGE_BYTES, Error, WorkerConfig, run};

/// Train a distillation run's student on batches streamed by its coordinator.
#[derive(clap::Parser, Debug)]
#[command(name = "student-worker", version, about)]
pub struct Args {
    /// The coordinator's URL, e.g. http://10.0.0.5:50052.
    #[arg(long, env = "DISTILL_COORDINATOR")]
    pub coordinator: String,
    /// Device: cpu, auto or cuda:N (cuda needs a build with the `cuda` feature).
    #[arg(long, env = "DISTILL_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Directory for checkpoints; restarting with the same directory resumes.
    #[arg(long, env = "DISTILL_WORK_DIR", default_value = "student-work")]
    pub work_dir: PathBuf,
    /// Stable worker name (default: the one stored in the work dir, else assigned).
    #[arg(long, env = "DISTILL_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Batches to hold ahead of training (the credit window).
    #[arg(long, env = "DISTILL_PREFETCH", default_value_t = crate::DEFAULT_PREFETCH)]
    pub prefetch: u32,
    /// CPU threads for the math (default: one per core).
    #[arg(long, env = "DISTILL_THREADS")]
    pub threads: Option<usize>,
    /// Seconds to keep retrying an unreachable coordinator.
    #[arg(long, env = "DISTILL_CONNECT_TIMEOUT", default_value_t = 30)]
    pub connect_timeout_s: u64,
    /// Largest gRPC message, in MiB, in either direction.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES >> 20)]
    pub max_message_mb: usize,
    /// TLS: the CA that verifies the coordinator, and this worker's certificate and key
    /// for mutual TLS.
    #[command(flatten)]
    pub tls: distill_transport::TlsArgs,
    /// The Prometheus endpoint (`--metrics-listen`).
    #[command(flatten)]
    pub metrics: distill_transport::MetricsArgs,
    /// File holding the worker token presented to the coordinator (else
    /// DISTILL_WORKER_TOKEN).
    #[arg(long, env = "DISTILL_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
}

/// Runs the worker to the end of the run; the exit code is 0 when the run completed, 130 when
/// stopped by a signal, 2 for bad flags, 1 for other errors.
pub fn main(args: Args) -> ExitCode {
    if let Some(n) = args.threads
        && let Err(e) = apply_threads(n)
    {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    // The async side only moves messages; the math runs on the training thread and candle's
    // own pool, so two runtime threads are plenty.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async_main(args))
}

async fn async_main(args: Args) -> ExitCode {
    let device = match distill_core::device::parse_device(&args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let security = distill_transport::Token::resolve(
        distill_transport::Role::Worker,
        args.worker_token_file.as_deref(),
    )
    .and_then(|token| distill_transport::ClientSecurity::new(&args.tls, token.as_ref()));
    let security = match security {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = WorkerConfig {
        coordinator: security.url(&args.coordinator),
        device,
        work_dir: args.work_dir,
        worker_id: args.worker_id,
        prefetch: args.prefetch,
        max_message_bytes: args.max_message_mb << 20,
        connect_timeout: std::time::Duration::from_secs(args.connect_timeout_s),
        security,
    };
    let shutdown = distill_shutdown::on_signal();
    if let Err(e) = args.metrics.serve(shutdown.clone()).await {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cfg, shutdown).await {
        Ok(r) => {
            let pct = 100.0 * r.test_errors as f64 / r.test_total.max(1) as f64;
            let busy = r.wait_seconds + r.step_seconds;
            println!(
                "student-worker {}: {} updates ({} batches, {} samples this session), test errors \
                 {}/{} ({pct:.2}%), waited {:.1}s of {busy:.1}s, checkpoint {}",
                r.worker_id,
                r.steps,
                r.batches,
                r.samples,
                r.test_errors,
                r.test_total,
                r.wait_seconds,
                r.checkpoint.display()
            );
            ExitCode::SUCCESS
        }
        Err(e @ Error::Cancelled { .. }) => {
            eprintln!("student-worker: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// candle reads its thread count from `RAYON_NUM_THREADS` on every call, and setting the
/// environment of a running process is `unsafe`, so `--threads` replaces this process (exec,
/// same pid, so signals and kills still reach the worker) with itself with the variable set.
fn apply_threads(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!("--threads must be >= 1");
    }
    let want = n.to_string();
    let set = |k: &str| std::env::var(k).ok().as_deref() == Some(want.as_str());
    if set("RAYON_NUM_THREADS") && set("CANDLE_NUM_THREADS") {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .env("RAYON_NUM_THREADS", &want)
        .env("CANDLE_NUM_THREADS", &want);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec(); // returns only on failure
        anyhow::bail!("re-running {} with {n} threads: {e}", exe.display())
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
}
