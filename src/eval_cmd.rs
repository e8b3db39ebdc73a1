//! `distill eval` (being written).

/// Flags of `distill eval`.
#[derive(clap::Args)]
pub struct EvalArgs {}

/// Runs `distill eval`.
pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("distill eval is not implemented yet")
}
