//! `teacher-server --model FILE --listen ADDR`: serve one model's tempered logits.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    distill_core::logging::init();
    teacher_server::cli::run(teacher_server::cli::Args::parse()).await
}
