//! The `distill` command line: demo, training, evaluation, serving and benchmarks.

use clap::{Parser, Subcommand};

mod eval_cmd;
mod import_cmd;
mod train_cmd;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Distributed knowledge distillation (Hinton, Vinyals & Dean 2015) over gRPC.
#[derive(Parser)]
#[command(name = "distill", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on hard labels (teachers and baseline students).
    Train(train_cmd::TrainArgs),
    /// Evaluate a checkpoint on a data set's test split.
    Eval(eval_cmd::EvalArgs),
    /// Convert a PyTorch nn.Sequential safetensors state dict into a distill checkpoint.
    ImportTorch(import_cmd::ImportArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(a) => train_cmd::run(a),
        Command::Eval(a) => eval_cmd::run(a),
        Command::ImportTorch(a) => import_cmd::run(a),
    }
}
