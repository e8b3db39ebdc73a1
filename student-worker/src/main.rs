//! `student-worker --coordinator URL`: join a distillation run and train its student.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    distill_core::logging::init();
    student_worker::cli::main(student_worker::cli::Args::parse())
}
