//! `distill train` (being written).

/// Flags of `distill train`.
#[derive(clap::Args)]
pub struct TrainArgs {}

/// Runs `distill train`.
pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("distill train is not implemented yet")
}
