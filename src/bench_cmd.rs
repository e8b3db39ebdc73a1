//! `distill bench`: throughput figures measured in one run on loopback, printed as a table
//! (BENCHMARKS.md holds the results with the commands).
//!
//! Sections (`--only` picks some; all by default):
//! - `workers`: the same distillation with 1 and 2 student workers (synchronisation rounds
//!   every `--sync-every` updates) behind a teacher fast enough not to be the bottleneck:
//!   samples/s, rounds, seconds per round (coordinator: first contribution to close; workers:
//!   blocked per round) and parameter bytes moved per round. On a 2-core machine the workers
//!   share the cores, so no speed-up is expected; the bytes and seconds per round are what
//!   scale on a cluster.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use coordinator::config::{RunConfig, SoftTargetEncoding, StudentConfig, SyncConfig};
use distill_core::checkpoint::Checkpoint;
use distill_core::kd::Combine;
use distill_core::model::init_params;
use distill_core::optim::OptimConfig;
use distill_core::spec::{Arch, ModelSpec};

use crate::local::LocalMember;

/// Flags of `distill bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Sections to run (comma-separated): workers. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Data source.
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Student architecture.
    #[arg(long, default_value = "mlp:784-800-800-10")]
    pub student: String,
    /// Teacher architecture (random weights: only its speed matters here).
    #[arg(long, default_value = "mlp:784-64-10")]
    pub teacher: String,
    /// Epochs per measured run.
    #[arg(long, default_value_t = 2)]
    pub epochs: u32,
    /// Rows per batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Local updates between synchronisation rounds (`workers`).
    #[arg(long, default_value_t = 10)]
    pub sync_every: u64,
    /// Scratch directory for run directories (default: a temporary one).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `distill bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let wants = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().to_path_buf());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "distill bench on {} ({} cores), data {}, student {}, batch {}",
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.data,
        a.student,
        a.batch
    );
    if wants("workers") {
        rt.block_on(workers(&a, &out))?;
    }
    Ok(())
}

/// A teacher with seeded random weights.
fn random_teacher(arch: &str) -> anyhow::Result<Checkpoint> {
    let spec = ModelSpec::new(Arch::parse(arch)?);
    let params = init_params(&spec.arch, 7);
    Ok(Checkpoint {
        spec,
        params,
        extra: Default::default(),
    })
}

fn base_config(a: &BenchArgs, run_dir: PathBuf) -> RunConfig {
    RunConfig {
        data: a.data.clone(),
        run_dir,
        epochs: a.epochs,
        batch_size: a.batch,
        seed: 0,
        temperature: 4.0,
        alpha: 0.9,
        combine: Combine::MeanProb,
        soft_targets: SoftTargetEncoding::F32,
        checkpoint_every: 0,
        lease_timeout_secs: 60.0,
        prefetch: 8,
        teacher_timeout_secs: 30.0,
        max_message_mb: 64,
        min_workers: 1,
        cache: None,
        sync: SyncConfig {
            every: a.sync_every,
            ..Default::default()
        },
        student: StudentConfig {
            arch: a.student.clone(),
            dropout: 0.0,
            input_dropout: 0.0,
            precision: Default::default(),
        },
        optim: OptimConfig::sgd(0.05, 0.9),
        members: Vec::new(),
    }
}

async fn workers(a: &BenchArgs, out: &std::path::Path) -> anyhow::Result<()> {
    println!();
    println!(
        "[workers] one student, 1 vs 2 workers, sync every {} updates, fast teacher {}",
        a.sync_every, a.teacher
    );
    println!(
        "{:>8} {:>12} {:>8} {:>14} {:>18} {:>14}",
        "workers", "samples/s", "rounds", "round open ms", "worker blocked ms", "MiB per round"
    );
    let members = [LocalMember {
        name: "t".into(),
        checkpoint: random_teacher(&a.teacher)?,
        replicas: 1,
        opts: Default::default(),
    }];
    for n in [1usize, 2] {
        let dir = out.join(format!("workers-{n}"));
        let cfg = base_config(a, dir.clone());
        let t0 = Instant::now();
        let o = crate::local::run(cfg, &members, n, dir).await?;
        let r = &o.report;
        let blocked: f64 = o.workers.iter().map(|w| w.sync_seconds).sum();
        let per_worker_round = if r.sync.rounds > 0 {
            1e3 * blocked / (r.sync.rounds as f64 * n as f64)
        } else {
            0.0
        };
        println!(
            "{:>8} {:>12.0} {:>8} {:>14.2} {:>18.2} {:>14.2}",
            n,
            r.samples_per_sec,
            r.sync.rounds,
            1e3 * r.sync.mean_round_seconds,
            per_worker_round,
            r.sync.mean_bytes_per_round / f64::from(1u32 << 20),
        );
        tracing::info!(workers = n, seconds = t0.elapsed().as_secs_f64(), shares = ?r.workers.iter().map(|w| (w.worker_id.clone(), w.samples)).collect::<Vec<_>>(), "bench run");
    }
    Ok(())
}
