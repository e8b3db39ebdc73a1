//! `distill cache fill --config RUN.toml` (the one teacher pass, [`coordinator::fill`]) and
//! `distill cache list DIR` (what a cache holds).

use std::path::PathBuf;

use anyhow::Context;
use coordinator::RunConfig;
use coordinator::security::SecurityArgs;

/// Flags of `distill cache`.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// What `distill cache` does.
#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Ask the run's teachers once for every training sample and record each member's
    /// answers in the run's `[cache]` (read-write); train nothing. Runs again resume.
    Fill(FillArgs),
    /// List the keys and member records a cache directory holds.
    List {
        /// The cache directory (`[cache] dir`).
        dir: PathBuf,
    },
}

/// Flags of `distill cache fill`.
#[derive(clap::Args, Debug)]
pub struct FillArgs {
    /// Run config (TOML; see docs/config.md) with a read-write `[cache]`.
    #[arg(long)]
    pub config: PathBuf,
    /// TLS and credentials for the teachers, as for the coordinator (docs/security.md).
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Runs `distill cache`.
pub fn run(a: CacheArgs) -> anyhow::Result<()> {
    match a.command {
        CacheCommand::Fill(f) => fill(f),
        CacheCommand::List { dir } => list(&dir),
    }
}

fn fill(a: FillArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let security = a.security.load()?;
    let rt = tokio::runtime::Runtime::new()?;
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "filling the cache {bar:30} {pos}/{len} batches · {elapsed}",
    )?);
    // The signal handlers are tasks of the runtime.
    let shutdown = {
        let _in = rt.enter();
        distill_shutdown::on_signal()
    };
    let show = bar.clone();
    let report = rt.block_on(coordinator::fill::fill(
        cfg,
        security,
        shutdown,
        move |done, of| {
            show.set_length(of);
            show.set_position(done);
        },
    ))?;
    bar.finish_and_clear();
    println!(
        "{} of {} batches asked the teachers, {} were recorded already; {:.1} s",
        report.asked_batches, report.batches, report.cached_batches, report.seconds
    );
    for r in &report.records {
        println!(
            "  {}: {} of {} rows · {}",
            r.member, r.rows, report.rows, r.key
        );
    }
    if !coordinator::fill::is_complete(&report) {
        anyhow::bail!(
            "the cache {} is not complete (stopped, or a member did not answer); run the fill again",
            report.cache.display()
        );
    }
    Ok(())
}

fn list(dir: &std::path::Path) -> anyhow::Result<()> {
    let cache = coordinator::cache::SoftTargetCache::open_read_only(dir)
        .with_context(|| format!("opening the cache in {}", dir.display()))?;
    let keys = cache.keys()?;
    if keys.is_empty() {
        println!("{}: empty", cache.path().display());
    }
    for k in keys {
        let kind = if coordinator::store::member_records::MemberRecord::from_key(&k.key).is_some() {
            "record"
        } else {
            "combined"
        };
        println!(
            "{kind:8} {:>9} rows{} · {}",
            k.rows,
            if k.is_complete() { " (complete)" } else { "" },
            k.description
        );
    }
    Ok(())
}
