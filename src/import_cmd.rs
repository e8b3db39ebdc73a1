//! `distill import-torch`: turn a PyTorch `nn.Sequential` state dict saved with
//! `safetensors.torch.save_file` into a distill checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use distill_core::checkpoint::import_sequential;
use distill_core::spec::{Arch, ModelSpec};

/// Flags of `distill import-torch`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The PyTorch safetensors file (keys `INDEX.weight` / `INDEX.bias`).
    #[arg(long = "in")]
    input: PathBuf,
    /// Architecture of the network, e.g. mlp:784-1200-1200-10.
    #[arg(long)]
    arch: String,
    /// Dropout on hidden layers the model trained with (recorded in the spec only).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Dropout on the input the model trained with (recorded in the spec only).
    #[arg(long, default_value_t = 0.0)]
    input_dropout: f32,
    /// Where to write the distill checkpoint.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `distill import-torch`.
pub fn run(a: ImportArgs) -> anyhow::Result<()> {
    let arch = Arch::parse(&a.arch)?;
    let spec = ModelSpec {
        arch,
        dropout: a.dropout,
        input_dropout: a.input_dropout,
    };
    let buf = std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let ck = import_sequential(&buf, spec)
        .with_context(|| format!("importing {}", a.input.display()))?;
    ck.save(&a.out)?;
    println!(
        "wrote {} ({}, model id {})",
        a.out.display(),
        ck.spec.arch,
        ck.model_id()
    );
    Ok(())
}
