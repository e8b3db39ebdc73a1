//! `coordinator --config FILE --listen ADDR`: run one distillation.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_core::logging::init();
    coordinator::cli::run(coordinator::cli::Args::parse()).await
}
