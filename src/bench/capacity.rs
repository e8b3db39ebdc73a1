//! `capacity`: how many batches/s and MB/s one coordinator sustains as the data plane of a run,
//! with 1, 4, 16, 64 simulated workers that ack every batch the moment it arrives (no training).
//!
//! Set-up, through the public API only (`coordinator::prepare`, `coordinator::serve` on a
//! `127.0.0.1:0` listener, and the `distill.v1.Coordinator` gRPC service), so the bench keeps
//! working whatever the coordinator's internals become:
//! - a data set larger than the synthetic one (its rows repeated into a safetensors file), so
//!   that every simulated worker's credit window fits in one epoch many times over and the
//!   epoch barrier is a small part of the window;
//! - the soft-target cache filled by one epoch of a real run (a real teacher server, a real
//!   tiny worker); then every measured run is **offline**: no teachers, each batch's soft
//!   targets read from the cache — the coordinator's own work per batch (lease, cache read,
//!   encode, send, ack) and nothing else;
//! - `[sync] every = 0` (no averaging rounds), and runs long enough never to reach their end:
//!   after the window the bench cancels the run's shutdown token, which is simpler than having
//!   simulated workers answer the final evaluation.
//!
//! Each simulated worker is a small tokio client: `Join`, `Batches` opened with
//! `Hello{credits}`, an `Ack` for every `TrainBatch` as it arrives, counting the protobuf bytes
//! of what it receives. The clients run on their own runtime whose threads are named
//! [`CLIENT_THREAD`], so the process's CPU time (from `/proc`) can be split into the clients'
//! part and the rest (the coordinator, mostly; the same process also holds the idle runtime of
//! the other sections). The clients share the machine with the coordinator: on 2 cores their
//! CPU is taken from it, so the figures are a lower bound on a coordinator with its own node.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use distill_proto::pb::{self, coordinator_client::CoordinatorClient, coordinator_message};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::stats::{Spread, Summary, cpu_seconds};
use super::{BenchArgs, base_config, random_teacher};

/// Name (prefix) of the simulated workers' threads.
pub const CLIENT_THREAD: &str = "sim-worker";
/// How long the simulated workers may take to ack their first epoch.
const WARMUP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a stopped run's coordinator and clients may take to wind down.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// An upper bound on the batches/s here, to size runs that must outlast their window.
const MAX_BATCHES_PER_SEC: f64 = 50_000.0;
/// Growth below this factor from one worker count to the next counts as "stopped growing".
const GROWTH: f64 = 1.1;

/// What one window measured.
#[derive(Debug, Clone, Copy)]
struct Window {
    batches: u64,
    bytes: u64,
    secs: f64,
    /// CPU seconds of the whole process in the window.
    cpu: Option<f64>,
    /// CPU seconds of the clients' threads in the window.
    cpu_clients: Option<f64>,
}

impl Window {
    fn batches_per_sec(&self) -> f64 {
        self.batches as f64 / self.secs.max(1e-9)
    }
    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
    /// Cores used: (process, clients, rest).
    fn cores(&self) -> Option<(f64, f64, f64)> {
        let (t, c) = (self.cpu? / self.secs, self.cpu_clients? / self.secs);
        Some((t, c, (t - c).max(0.0)))
    }
}

/// What the simulated workers count, together.
#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    bytes: AtomicU64,
    /// Batches after which the warm-up is over (the first epoch).
    warm_at: u64,
    /// Told once `batches` reaches `warm_at` (a stored permit if nobody waits yet).
    warm: Notify,
    /// Set when a client saw the run's end (evaluation or Done): the window was too long.
    ended: AtomicBool,
}

/// Runs the capacity section and prints its table.
pub fn run(a: &BenchArgs, rt: &tokio::runtime::Runtime, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(a.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        !a.capacity_workers.is_empty() && a.capacity_workers.iter().all(|&n| n >= 1),
        "--capacity-workers needs counts of at least 1"
    );
    anyhow::ensure!(
        a.capacity_credits >= 1,
        "--capacity-credits must be at least 1"
    );
    let data = write_data(a.capacity_rows, &out.join("capacity-data.safetensors"))?;
    let cache_dir = out.join("capacity-cache");
    let teacher = random_teacher(&a.teacher)?;
    {
        let dir = out.join("capacity-fill");
        let mut cfg = base_config(a, dir.clone());
        cfg.data = data.clone();
        cfg.epochs = 1;
        cfg.sync.every = 0;
        cfg.student.arch = super::steady::FILL_STUDENT.into();
        cfg.cache = Some(coordinator::cache::CacheConfig {
            dir: cache_dir.clone(),
            mode: coordinator::cache::CacheMode::ReadWrite,
            record: None,
        });
        rt.block_on(super::steady::fill(cfg, &teacher, dir))?;
    }
    // The clients' own runtime: named threads, so their CPU time can be told apart.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()?;
    let per_epoch = a.capacity_rows.div_ceil(a.batch) as u64;
    println!();
    println!(
        "[capacity] one coordinator, offline from a full soft-target cache, simulated workers acking on arrival; {} rows ({per_epoch} batches of {} per epoch), {} credits per worker, {} rounds of {:.1} s windows after the first epoch, {cores} cores",
        a.capacity_rows, a.batch, a.capacity_credits, a.rounds, a.window_secs
    );
    let mut windows: Vec<Vec<Window>> = vec![Vec::new(); a.capacity_workers.len()];
    for round in 0..a.rounds {
        for (i, &n) in a.capacity_workers.iter().enumerate() {
            let dir = out.join(format!("capacity-{n}-{round}"));
            let mut cfg = base_config(a, dir);
            cfg.data = data.clone();
            cfg.members.clear();
            cfg.sync.every = 0;
            cfg.min_workers = n;
            cfg.prefetch = a.capacity_credits as usize;
            let budget = MAX_BATCHES_PER_SEC * (a.window_secs + WARMUP_DEADLINE.as_secs_f64());
            cfg.epochs = 2 + (budget / per_epoch as f64).ceil() as u32;
            cfg.cache = Some(coordinator::cache::CacheConfig {
                dir: cache_dir.clone(),
                mode: coordinator::cache::CacheMode::Offline,
                record: None,
            });
            let w = rt.block_on(window(cfg, n, a.capacity_credits, per_epoch, a, &clients))?;
            tracing::info!(
                round = round + 1,
                workers = n,
                batches_per_sec = w.batches_per_sec(),
                mb_per_sec = w.mb_per_sec(),
                "capacity window"
            );
            windows[i].push(w);
        }
    }
    clients.shutdown_timeout(STOP_DEADLINE);

    println!(
        "{:>8} {:>26} {:>22} {:>8} {:>8} {:>8} {:>8}  (CPU: cores used in the window, medians)",
        "workers", "batches/s [min–max]", "MB/s [min–max]", "CPU", "clients", "rest", "growth"
    );
    let mut previous: Option<f64> = None;
    let mut saturated: Option<(usize, f64, f64, f64)> = None;
    let mut best: Option<(usize, f64, f64)> = None;
    for (&n, ws) in a.capacity_workers.iter().zip(&windows) {
        let b = Summary::of(&ws.iter().map(Window::batches_per_sec).collect::<Vec<_>>())
            .context("no capacity window")?;
        let m = Summary::of(&ws.iter().map(Window::mb_per_sec).collect::<Vec<_>>())
            .context("no capacity window")?;
        let cores_used: Vec<(f64, f64, f64)> = ws.iter().filter_map(Window::cores).collect();
        let med = |f: fn(&(f64, f64, f64)) -> f64| {
            Summary::of(&cores_used.iter().map(f).collect::<Vec<_>>())
                .map_or("-".into(), |s| format!("{:.2}", s.median))
        };
        let growth = previous.map(|p| b.median / p);
        println!(
            "{n:>8} {:>26} {:>22} {:>8} {:>8} {:>8} {:>8}",
            Spread(&b, 0).to_string(),
            Spread(&m, 1).to_string(),
            med(|c| c.0),
            med(|c| c.1),
            med(|c| c.2),
            growth.map_or("-".into(), |g| format!("{g:.2}×")),
        );
        if saturated.is_none()
            && let Some(g) = growth
            && g < GROWTH
        {
            let total = Summary::of(&cores_used.iter().map(|c| c.0).collect::<Vec<_>>())
                .map_or(f64::NAN, |s| s.median);
            saturated = Some((n, b.median, m.median, total));
        }
        if best.is_none_or(|(_, bb, _)| b.median > bb) {
            best = Some((n, b.median, m.median));
        }
        previous = Some(b.median);
    }
    match (saturated, best) {
        (Some((n, b, m, cpu)), Some((bn, bb, bm))) => println!(
            "batches/s stopped growing (< {GROWTH}× the previous count) at {n} workers: {b:.0} batches/s, {m:.1} MB/s, the process using {cpu:.2} of {cores} cores; best {bb:.0} batches/s ({bm:.1} MB/s) at {bn} workers"
        ),
        (None, Some((bn, bb, bm))) => println!(
            "batches/s still growing at {bn} workers: {bb:.0} batches/s, {bm:.1} MB/s (not saturated by these counts)"
        ),
        _ => {}
    }
    Ok(())
}

/// One run with `n` simulated workers: warm-up (the first epoch), then `a.window_secs`.
async fn window(
    cfg: coordinator::RunConfig,
    n: usize,
    credits: u32,
    per_epoch: u64,
    a: &BenchArgs,
    clients: &tokio::runtime::Runtime,
) -> anyhow::Result<Window> {
    cfg.validate()?;
    let max_msg = cfg.max_message_bytes();
    let run = coordinator::prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let served = tokio::spawn(coordinator::serve(run, listener, stop.clone()));
    let counters = Arc::new(Counters {
        warm_at: per_epoch,
        ..Default::default()
    });
    let sims: Vec<_> = (0..n)
        .map(|i| {
            clients.spawn(sim_worker(
                url.clone(),
                format!("sim-{i}"),
                credits,
                max_msg,
                counters.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let measured = async {
        tokio::time::timeout(WARMUP_DEADLINE, counters.warm.notified())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{n} simulated workers did not ack one epoch within {WARMUP_DEADLINE:?} ({} batches)",
                    counters.batches.load(Ordering::Relaxed)
                )
            })?;
        let (b0, y0) = (
            counters.batches.load(Ordering::Relaxed),
            counters.bytes.load(Ordering::Relaxed),
        );
        let c0 = cpu_seconds(CLIENT_THREAD);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(a.window_secs)).await;
        let (b1, y1) = (
            counters.batches.load(Ordering::Relaxed),
            counters.bytes.load(Ordering::Relaxed),
        );
        let c1 = cpu_seconds(CLIENT_THREAD);
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            !counters.ended.load(Ordering::Relaxed),
            "the run ended within its window: it needs more epochs"
        );
        let cpu = c0.zip(c1).map(|((t0, n0), (t1, n1))| (t1 - t0, n1 - n0));
        Ok(Window {
            batches: b1 - b0,
            bytes: y1 - y0,
            secs,
            cpu: cpu.map(|c| c.0),
            cpu_clients: cpu.map(|c| c.1),
        })
    }
    .await;
    stop.cancel();
    for s in sims {
        match tokio::time::timeout(STOP_DEADLINE, s).await {
            Err(_) => anyhow::bail!("a simulated worker did not stop within {STOP_DEADLINE:?}"),
            Ok(r) => {
                if let Err(e) = r.context("simulated worker task")? {
                    // After the window a client may see its stream end first: only the window
                    // matters, and it has been measured.
                    tracing::debug!(error = %e, "simulated worker");
                    if measured.is_err() {
                        tracing::warn!(error = %e, "simulated worker failed");
                    }
                }
            }
        }
    }
    match tokio::time::timeout(STOP_DEADLINE, served).await {
        Err(_) => anyhow::bail!("the coordinator did not stop within {STOP_DEADLINE:?}"),
        Ok(r) => {
            r.context("coordinator task")??;
        }
    }
    measured
}

/// One simulated worker: joins, opens its batch stream with `credits`, acks every batch on
/// arrival and counts what it received, until `stop`.
async fn sim_worker(
    url: String,
    id: String,
    credits: u32,
    max_msg: usize,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await
        .context("connecting to the coordinator")?;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let joined = client
        .join(pb::JoinRequest {
            worker_id: id,
            resume_step: 0,
            session_secret: String::new(),
        })
        .await?
        .into_inner();
    // At most `credits` batches are unacked, so at most that many acks wait here.
    let (tx, rx) = mpsc::channel(credits as usize + 1);
    tx.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: joined.worker_id,
            incarnation: joined.incarnation,
            credits,
            session_secret: joined.session_secret,
        })),
    })
    .await
    .context("the outgoing stream closed before Hello")?;
    let mut inbound = tokio::select! {
        r = client.batches(ReceiverStream::new(rx)) => r?.into_inner(),
        _ = stop.cancelled() => return Ok(()),
    };
    let mut step = 0;
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        let bytes = msg.encoded_len() as u64;
        match msg.kind {
            Some(coordinator_message::Kind::Train(b)) => {
                step += 1;
                let ack = pb::Ack {
                    lease_id: b.lease_id,
                    loss: 0.0,
                    step,
                    wait_seconds: 0.0,
                    step_seconds: 0.0,
                    sync_seconds: 0.0,
                };
                if tx
                    .send(pb::WorkerMessage {
                        kind: Some(pb::worker_message::Kind::Ack(ack)),
                    })
                    .await
                    .is_err()
                {
                    return Ok(()); // the stream is gone
                }
                counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                let done = counters.batches.fetch_add(1, Ordering::Relaxed) + 1;
                if done == counters.warm_at {
                    counters.warm.notify_one();
                }
            }
            Some(coordinator_message::Kind::Eval(_) | coordinator_message::Kind::Done(_)) => {
                counters.ended.store(true, Ordering::Relaxed);
                return Ok(());
            }
            // No synchronisation rounds in this run: nothing else should come.
            Some(coordinator_message::Kind::Params(_) | coordinator_message::Kind::SyncNow(_))
            | None => {
                counters.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }
}

/// Writes the synthetic set's training rows repeated up to `rows` rows (and its test split)
/// into a safetensors file; returns its data source string.
fn write_data(rows: usize, path: &Path) -> anyhow::Result<String> {
    use candle_core::{Device, Tensor};
    use distill_core::data::Features;
    anyhow::ensure!(rows >= 1, "--capacity-rows must be at least 1");
    let ds = distill_core::data::Dataset::load("synthetic")?;
    let u8s = |f: &Features| match f {
        Features::U8(v) => Ok(v.clone()),
        Features::F32(_) | Features::Tokens(_) => {
            Err(anyhow::anyhow!("the synthetic set is expected as u8"))
        }
    };
    let (x, y) = (u8s(&ds.train.x)?, &ds.train.y);
    let row = ds.row_len();
    let n = y.len();
    anyhow::ensure!(n > 0, "the synthetic set has no training rows");
    let mut xs = Vec::with_capacity(rows * row);
    let mut ys = Vec::with_capacity(rows);
    for r in 0..rows {
        let i = r % n;
        xs.extend_from_slice(&x[i * row..(i + 1) * row]);
        ys.push(y[i]);
    }
    let shape = |n: usize| {
        let mut s = vec![n];
        s.extend(&ds.input_shape);
        s
    };
    let tensors = std::collections::HashMap::from([
        (
            "x".to_string(),
            Tensor::from_vec(xs, shape(rows), &Device::Cpu)?,
        ),
        ("y".to_string(), Tensor::from_vec(ys, rows, &Device::Cpu)?),
        (
            "x_test".to_string(),
            Tensor::from_vec(u8s(&ds.test.x)?, shape(ds.test.y.len()), &Device::Cpu)?,
        ),
        (
            "y_test".to_string(),
            Tensor::from_vec(ds.test.y.clone(), ds.test.y.len(), &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("safetensors:{}", path.display()))
}
