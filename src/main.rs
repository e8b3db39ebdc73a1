//! The `distill` command line: demo, training, evaluation, serving and benchmarks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cache_cmd;
mod credentials_cmd;
mod demo_cmd;
mod demo_lm;
mod eval_cmd;
mod gpu_smoke_cmd;
mod import_cmd;
mod lm_eval_cmd;
mod local;
mod report_cmd;
mod sweep_cmd;
mod train_cmd;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Distributed knowledge distillation (Hinton, Vinyals & Dean 2015) over gRPC.
#[derive(Parser)]
#[command(name = "distill", version, about)]
struct Cli {
    /// Log lines as `text` (default) or `json` (one object per line, for log collectors).
    #[arg(
        long,
        global = true,
        env = "DISTILL_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: distill_core::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system in one process on the embedded synthetic data: train two teachers,
    /// serve them, distil a student through the coordinator, compare with a baseline.
    Demo(demo_cmd::DemoArgs),
    /// Train a model on hard labels (teachers and baseline students).
    Train(train_cmd::TrainArgs),
    /// Evaluate a checkpoint on a data set's test split.
    Eval(eval_cmd::EvalArgs),
    /// Convert a PyTorch nn.Sequential safetensors state dict into a distill checkpoint.
    ImportTorch(import_cmd::ImportArgs),
    /// Serve a checkpoint's tempered logits (same as the `teacher-server` binary).
    TeacherServer(teacher_server::cli::Args),
    /// Coordinate a distillation run (same as the `coordinator` binary).
    Coordinator(coordinator::cli::Args),
    /// Train a run's student on streamed batches (same as the `student-worker` binary).
    StudentWorker(student_worker::cli::Args),
    /// Write a CA, a certificate per role and a token per role for mutual TLS with tokens.
    Credentials(credentials_cmd::CredentialsArgs),
    /// Measure throughput on loopback and print the figures (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Fill a run's soft-target cache with one teacher pass (`fill`), or list a cache (`list`).
    Cache(cache_cmd::CacheArgs),
    /// Train a grid of students (T × alpha, …) from one filled cache, asking no teacher.
    Sweep(sweep_cmd::SweepArgs),
    /// Draw a run directory's report.html again, or compare several runs on one page.
    Report(report_cmd::ReportArgs),
    /// Check a CUDA build against the CPU: logits, loss curves, samples/s (docs/cuda.md).
    GpuSmoke(gpu_smoke_cmd::GpuSmokeArgs),
    /// A language model's perplexity and tokens/s on a text file (GGUF or Hugging Face).
    LmEval(lm_eval_cmd::LmEvalArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo is for people trying the system: progress bars and a table, no log lines
    // (`RUST_LOG=info` brings them back).
    distill_core::logging::init_with(
        cli.log_format,
        match cli.command {
            Command::Demo(_) => "warn",
            _ => "info",
        },
    );
    let result = match cli.command {
        Command::Demo(a) => demo_cmd::run(a),
        Command::Train(a) => train_cmd::run(a),
        Command::Eval(a) => eval_cmd::run(a),
        Command::ImportTorch(a) => import_cmd::run(a),
        Command::TeacherServer(a) => block_on(teacher_server::cli::run(a)),
        Command::Coordinator(a) => block_on(coordinator::cli::run(a)),
        Command::StudentWorker(a) => return student_worker::cli::main(a),
        Command::GpuSmoke(a) => gpu_smoke_cmd::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Credentials(a) => credentials_cmd::run(a),
        Command::Report(a) => report_cmd::run(a),
        Command::Cache(a) => cache_cmd::run(a),
        Command::Sweep(a) => sweep_cmd::run(a),
        Command::LmEval(a) => lm_eval_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
