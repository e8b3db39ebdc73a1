//! `distill bench`: throughput figures measured in one run on loopback, printed as a table
//! (BENCHMARKS.md holds the results with the commands).
//!
//! Sections (`--only` picks some; all by default). Single-worker runs here set `sync.every = 0`
//! (no averaging rounds: one worker has nothing to average, and a lone worker's upload would
//! only cost time).
//! - `e2e` (a) and `cache` (e) ([`steady`]): medians over `--rounds` rounds of interleaved
//!   windows of `--window-secs` each — student-only (the same student trained on soft targets
//!   precomputed in memory: the limit), end-to-end distillation (one worker, a teacher that
//!   keeps up) and cached epochs (soft targets from the soft-target cache, no teacher asked), in
//!   turn, so machine noise hits all three alike; each pipeline window starts after its run's
//!   first epoch (steady state). Ratios are of medians, with the median of per-round ratios.
//! - `teacher` (b): teacher-server rows/s ÷ in-process forward at batch 128 and 1024, over
//!   `distill.v1.Teacher` (f32 and u8 inputs) and over the Open Inference Protocol.
//! - `slow` (c): teachers with a fixed extra latency per pass (4× the student's step time)
//!   behind 1, 2 and 4 replicas answering one batch per pass, then 1 and 2 replicas batching up
//!   to 1,024 rows per pass (the server's default): student wait fraction and samples/s.
//! - `bytes` (d): soft-target bytes per sample on the wire for each encoding, for 10 and 32,000
//!   classes, and the KD-loss difference of top-k against dense targets.
//! - `cpu`: CPU samples/s of one training step (batch 128) of the student (SGD, AdamW), the
//!   teacher (`mlp:784-1200-1200-10`, dropout) and the distillation step (KD loss at T = 20):
//!   the candle side of the candle ÷ PyTorch comparison (BENCHMARKS.md has the PyTorch side and
//!   the commands).
//! - `workers`: the same distillation with 1 and 2 student workers (synchronisation rounds
//!   every `--sync-every` updates) behind a teacher fast enough not to be the bottleneck:
//!   samples/s, rounds, seconds per round (coordinator: first contribution to close; workers:
//!   blocked per round) and parameter bytes moved per round. On a 2-core machine the workers
//!   share the cores, so no speed-up is expected; the bytes and seconds per round are what
//!   scale on a cluster.
//! - `capacity` ([`capacity`]): batches/s and MB/s one coordinator sustains, serving soft
//!   targets from its cache, to 1, 4, 16 and 64 simulated workers that ack on arrival, with
//!   the process's CPU use per window: where one coordinator saturates.
//! - `workers-quality` ([`quality`], only when named): the student's test errors with 1, 2 and 4
//!   workers in each averaging mode over several seeds.
//! - `lm-teacher` ([`lm`], only when named): a sequence teacher's tokens/s through the
//!   teacher server against its in-process forward (`--lm-model`, `--lm-len`).
//! - `lm-student` ([`lm::student`], only when named): a language-model student's training
//!   tokens/s at SmolLM2-135M's width (`--lm-layers`, `--lm-batch`, `--lm-len`), to put beside
//!   PyTorch's (`scripts/lm-vs-torch.sh`).
//! - `load` ([`load`]): many concurrent clients against a teacher-server process and a
//!   coordinator process's Registry: answers and refusals per second with their latency
//!   quantiles, and the servers' resident memory before, at peak and after.

mod capacity;
mod lm;
mod load;
mod quality;
mod stats;
mod steady;

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
    /// Sections to run (comma-separated): e2e, teacher, slow, bytes, cache, cpu, workers,
    /// capacity, load, workers-quality, lm-teacher, lm-student. Default: all but
    /// workers-quality, lm-teacher and lm-student.
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
    /// Epochs per measured run (`slow`, `workers`; `e2e` and `cache` measure windows).
    #[arg(long, default_value_t = 2)]
    pub epochs: u32,
    /// Rounds of interleaved windows (`e2e`/`cache`: student-only, end-to-end, cached in turn;
    /// `capacity`: each worker count in turn); figures are medians over the rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds of steady state per window (after the warm-up).
    #[arg(long, default_value_t = 4.0)]
    pub window_secs: f64,
    /// Simulated worker counts of `capacity` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub capacity_workers: Vec<usize>,
    /// Training rows of `capacity`'s data set (the synthetic rows repeated): at 128 rows per
    /// batch, 120,000 rows are 938 batches per epoch, several times the 64 × 8 credits in
    /// flight, so the epoch barrier (no batch of epoch e + 1 before every batch of e is acked)
    /// drains the pipeline only once per 938 batches.
    #[arg(long, default_value_t = 120_000)]
    pub capacity_rows: usize,
    /// Credits (batches in flight) per simulated worker in `capacity`, and the coordinator's
    /// prefetch there.
    #[arg(long, default_value_t = 8)]
    pub capacity_credits: u32,
    /// Rows per batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Local updates between synchronisation rounds (`workers`).
    #[arg(long, default_value_t = 10)]
    pub sync_every: u64,
    /// Batches prepared ahead per worker (coordinator `prefetch` and the worker's credit window).
    /// 16 covers the `slow` section's teachers (4× the student step): about 4 × teacher latency
    /// ÷ student step is needed; at 8 four replicas reach only ~0.7 of (a).
    #[arg(long, default_value_t = 16)]
    pub prefetch: usize,
    /// Concurrent clients of `load`, each on its own connection.
    #[arg(long, default_value_t = 256)]
    pub load_clients: usize,
    /// Seconds `load` drives each target.
    #[arg(long, default_value_t = 5.0)]
    pub load_secs: f64,
    /// Most requests `load` sends to each target.
    #[arg(long, default_value_t = 500_000)]
    pub load_requests: u64,
    /// The teacher's `--max-inflight` in `load`.
    #[arg(long, default_value_t = 16)]
    pub load_inflight: usize,
    /// Seeds per figure of `workers-quality`.
    #[arg(long, default_value_t = 3)]
    pub quality_seeds: u64,
    /// Worker counts of `workers-quality`.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub quality_workers: Vec<usize>,
    /// Epochs of each `workers-quality` run (the demo's default).
    #[arg(long, default_value_t = 20)]
    pub quality_epochs: u32,
    /// Modes of `workers-quality` (plain, step, diloco, diloco-50, sync). Default: all.
    #[arg(long, value_delimiter = ',')]
    pub quality_modes: Vec<String>,
    /// `lm-teacher`: the language model to serve (a GGUF file or a Hugging Face directory;
    /// default: random weights of SmolLM2-135M's shape).
    #[arg(long)]
    pub lm_model: Option<PathBuf>,
    /// `lm-teacher`, `lm-student`: tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub lm_len: usize,
    /// `lm-student`: decoder layers of the student (at SmolLM2-135M's width).
    #[arg(long, default_value_t = 4)]
    pub lm_layers: usize,
    /// `lm-student`: sequences per update.
    #[arg(long, default_value_t = 8)]
    pub lm_batch: usize,
    /// Scratch directory for run directories (default: a temporary one).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The sections `--only` may name.
const SECTIONS: [&str; 12] = [
    "e2e",
    "teacher",
    "slow",
    "bytes",
    "cache",
    "cpu",
    "workers",
    "capacity",
    "load",
    "workers-quality",
    "lm-teacher",
    "lm-student",
];

/// Runs `distill bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let wants = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    if let Some(bad) = a.only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        anyhow::bail!(
            "unknown section `{bad}` (sections: {})",
            SECTIONS.join(", ")
        );
    }
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
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
    // The steady-state figures (a) and (e), and the student's speed (c) is sized by.
    let steady = if wants("e2e") || wants("slow") || wants("cache") {
        let with_e2e = wants("e2e") || wants("slow");
        Some(steady::run(&a, &rt, &out, with_e2e, wants("cache"))?)
    } else {
        None
    };
    if wants("teacher") {
        rt.block_on(teacher(&a))?;
    }
    if let (true, Some(s)) = (wants("slow"), steady) {
        let step = a.batch as f64 / s.student.median.max(1e-9);
        let reference = s.e2e.map_or(s.student.median, |e| e.median);
        rt.block_on(slow(&a, &out, step, reference))?;
    }
    if wants("bytes") {
        bytes()?;
    }
    if wants("cpu") {
        cpu()?;
    }
    if wants("workers") {
        rt.block_on(workers(&a, &out))?;
    }
    if wants("capacity") {
        capacity::run(&a, &rt, &out)?;
    }
    // Minutes, not seconds: only when named.
    if a.only.iter().any(|o| o == "workers-quality") {
        rt.block_on(quality::run(
            a.quality_seeds,
            &a.quality_workers,
            a.quality_epochs,
            &a.quality_modes,
            &out,
        ))?;
    }
    if wants("load") {
        load::run(&a, &rt, &out)?;
    }
    if a.only.iter().any(|o| o == "lm-teacher") {
        rt.block_on(lm::run(a.lm_model.as_deref(), a.lm_len, a.window_secs))?;
    }
    if a.only.iter().any(|o| o == "lm-student") {
        lm::student(a.lm_layers, a.lm_batch, a.lm_len, a.window_secs)?;
    }
    Ok(())
}

fn cpu() -> anyhow::Result<()> {
    use distill_core::speed::{StepObjective, measure_steps};
    println!();
    println!(
        "[cpu] one training step on the CPU, batch 128, {} threads (RAYON_NUM_THREADS to change)",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
    );
    let student = ModelSpec::new(Arch::parse("mlp:784-800-800-10")?);
    let teacher = ModelSpec {
        arch: Arch::parse("mlp:784-1200-1200-10")?,
        dropout: 0.5,
        input_dropout: 0.2,
    };
    let kd = StepObjective::Kd {
        temperature: 20.0,
        alpha: 0.9,
    };
    for (what, spec, optim, objective) in [
        (
            "student 784-800-800-10, SGD",
            &student,
            OptimConfig::sgd(0.01, 0.9),
            StepObjective::CrossEntropy,
        ),
        (
            "student 784-800-800-10, AdamW",
            &student,
            OptimConfig::adamw(1e-3, 0.0),
            StepObjective::CrossEntropy,
        ),
        (
            "teacher 784-1200-1200-10, dropout, SGD",
            &teacher,
            OptimConfig::sgd(0.01, 0.9),
            StepObjective::CrossEntropy,
        ),
        (
            "distillation step (student, KD at T = 20)",
            &student,
            OptimConfig::sgd(0.01, 0.9),
            kd,
        ),
    ] {
        let sps = measure_steps(spec, &optim, 128, 150, objective)?;
        println!("{what:<44} {sps:>10.0} samples/s");
    }
    Ok(())
}

fn one_worker_config(a: &BenchArgs, dir: PathBuf) -> RunConfig {
    let mut cfg = base_config(a, dir);
    cfg.sync.every = 0;
    cfg
}

async fn teacher(a: &BenchArgs) -> anyhow::Result<()> {
    use teacher_server::bench::{in_process, served, served_oip};
    let arch = "mlp:784-1200-1200-10";
    let ck = random_teacher(arch)?;
    println!();
    println!(
        "[teacher] (b) teacher server ÷ in-process forward, {arch}, 16 requests in flight \
         (InferStream; OIP: concurrent ModelInfer calls, f32 raw contents)"
    );
    println!(
        "{:>6} {:>14} {:>14} {:>14} {:>14} {:>10} {:>10} {:>10}",
        "batch",
        "in-process/s",
        "server f32/s",
        "server u8/s",
        "oip f32/s",
        "f32 ratio",
        "u8 ratio",
        "oip ratio"
    );
    let secs = 3.0;
    for batch in [128usize, 1024] {
        let local = in_process(&ck, batch, secs)?;
        let f = served(&ck, batch, secs, 16, distill_proto::DType::F32).await?;
        let u = served(&ck, batch, secs, 16, distill_proto::DType::U8).await?;
        let o = served_oip(&ck, batch, secs, 16, distill_proto::DType::F32).await?;
        println!(
            "{batch:>6} {local:>14.0} {f:>14.0} {u:>14.0} {o:>14.0} {:>10.3} {:>10.3} {:>10.3}",
            f / local,
            u / local,
            o / local
        );
    }
    let _ = a;
    Ok(())
}

async fn slow(
    a: &BenchArgs,
    out: &std::path::Path,
    step_secs: f64,
    reference: f64,
) -> anyhow::Result<()> {
    let latency = std::time::Duration::from_secs_f64(4.0 * step_secs);
    println!();
    println!(
        "[slow] (c) teachers {:.0} ms per pass (4× the student step), prefetch {}",
        1e3 * latency.as_secs_f64(),
        a.prefetch
    );
    println!(
        "{:>9} {:>14} {:>12} {:>12} {:>16}",
        "replicas", "rows per pass", "samples/s", "wait %", "÷ end-to-end (a)"
    );
    // One batch per pass: each replica answers one batch per latency, so 4 replicas exactly
    // match the student (the worst case). Then the server's default batching (up to 1,024
    // rows per pass): requests that arrive while a pass runs share the next one, as on a GPU
    // whose latency hardly grows with the batch.
    let cases = [
        (1usize, a.batch),
        (2, a.batch),
        (4, a.batch),
        (1, 1024),
        (2, 1024),
    ];
    for (replicas, max_batch) in cases {
        let members = [LocalMember {
            name: "t".into(),
            checkpoint: random_teacher(&a.teacher)?,
            replicas,
            opts: teacher_server::ServeOptions {
                max_batch,
                simulate_latency: latency,
                ..Default::default()
            },
        }];
        let dir = out.join(format!("slow-{replicas}-{max_batch}"));
        let mut cfg = one_worker_config(a, dir.clone());
        cfg.epochs = 1;
        let o = crate::local::run(cfg, &members, 1, dir).await?;
        let r = &o.report;
        println!(
            "{replicas:>9} {max_batch:>14} {:>12.0} {:>12.1} {:>16.3}",
            r.samples_per_sec,
            100.0 * r.student_wait_fraction,
            r.samples_per_sec / reference
        );
    }
    Ok(())
}

fn bytes() -> anyhow::Result<()> {
    use coordinator::config::SoftTargetEncoding as E;
    use prost::Message;
    println!();
    println!("[bytes] (d) soft-target bytes per sample on the wire (TrainBatch fields, protobuf)");
    println!(
        "{:>8} {:>10} {:>14} {:>14}",
        "classes", "encoding", "bytes/sample", "KD loss Δ rel"
    );
    let rows = 128;
    for classes in [10usize, 32_000] {
        // Peaked, Zipf-like teacher logits at T: what a trained teacher's look like.
        let mut logits = Vec::with_capacity(rows * classes);
        for r in 0..rows {
            for c in 0..classes {
                let rank = ((c + 7 * r) % classes) as f32 + 1.0;
                logits.push(-2.0 * rank.ln());
            }
        }
        let z =
            candle_core::Tensor::from_slice(&logits, (rows, classes), &candle_core::Device::Cpu)?;
        let probs = candle_core::D::Minus1;
        let p = candle_nn::ops::softmax(&z, probs)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let student = (z.affine(0.5, 0.0)?).clone();
        let mut encodings = vec![E::F32, E::F16, E::Bf16];
        encodings.push(E::TopK(if classes > 32 { 32 } else { 3 }));
        for enc in encodings {
            let bytes = coordinator::driver::batch::encode_targets(&p, rows, classes, enc)?;
            let (dense, topk) =
                coordinator::driver::batch::target_fields(bytes, rows, classes, enc)?;
            let wire = dense.map_or(0, |t| t.encoded_len()) + topk.map_or(0, |t| t.encoded_len());
            let gap = match enc.topk_format(classes)? {
                Some(f) => {
                    let g = distill_core::topk::loss_gap(&logits, rows, &student, 1.0, &f)?;
                    format!("{:.2e}", g.rel_diff)
                }
                None => "-".into(),
            };
            println!(
                "{classes:>8} {:>10} {:>14.1} {gap:>14}",
                enc.to_string(),
                wire as f64 / rows as f64
            );
        }
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
        transfer: None,
        eval: None,
        lm: None,
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
        prefetch: a.prefetch,
        teacher_timeout_secs: 30.0,
        teacher_policy: Default::default(),
        max_message_mb: 64,
        min_workers: 1,
        eval_timeout_secs: 600.0,
        eval_every_epoch: false,
        hello_timeout_secs: 10.0,
        stall_timeout_secs: 120.0,
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
            init: None,
            init_layers: None,
        },
        optim: OptimConfig::sgd(0.05, 0.9),
        members: Vec::new(),
        membership: Default::default(),
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
