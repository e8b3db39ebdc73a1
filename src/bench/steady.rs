//! (a) and (e) as medians of interleaved windows: student-only, end-to-end, cached, in turn,
//! round after round, so that whatever else loads the machine hits all three alike.
//!
//! - **student-only**: the worker's `Student::train` on soft targets precomputed in memory (the
//!   limit), after a few warm-up steps (the pipelines that ran in between cooled its caches).
//! - **end-to-end** (a): a fresh run (one teacher server, the coordinator, one real student
//!   worker on loopback) long enough never to finish; after its first epoch (which fills the
//!   pipeline and warms every role up) the window counts the rows the coordinator reports acked,
//!   then the bench stops the run through its shutdown token.
//! - **cached** (e): the same with the soft-target cache filled beforehand and opened read-only,
//!   so every batch of every epoch is a cache hit; the teacher server is up but must not be asked
//!   (the window reports the teacher requests it saw: 0 is the proof).
//!
//! Stopping by the shutdown token instead of letting the run end spares the bench the final
//! evaluation and keeps every window the same length whatever the speed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use coordinator::config::{MemberConfig, RunConfig};
use distill_proto::pb::{self, coordinator_client::CoordinatorClient};
use student_worker::decode::{Targets, TrainData};
use tokio_util::sync::CancellationToken;

use super::stats::{Spread, Summary};
use super::{BenchArgs, base_config, random_teacher};
use crate::local::LocalMember;

/// Steps trained before each student-only window: the pipelines run in between leave the
/// student's buffers cold, as the first epoch does for a run.
const WARMUP_STEPS: usize = 10;
/// How long a run may take to train its first epoch before the bench gives up.
const WARMUP_DEADLINE: Duration = Duration::from_secs(120);
/// How often the warm-up asks RunStatus whether the first epoch is trained. The public API has
/// no progress stream; the window starts at the status sample that ended the warm-up (time and
/// counters from the same sample), so this granularity does not bias the figure.
const STATUS_POLL: Duration = Duration::from_millis(50);
/// How long a stopped run's coordinator and worker may take to wind down.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// An upper bound on anyone's samples/s here, to size runs that must outlast their window.
const MAX_SAMPLES_PER_SEC: f64 = 100_000.0;

/// What one window measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// Training rows trained in the window.
    pub samples: u64,
    /// Batches trained in the window.
    pub batches: u64,
    /// Length of the window.
    pub secs: f64,
    /// Seconds the student spent in training steps.
    pub step_secs: f64,
    /// Seconds the student waited for batches.
    pub wait_secs: f64,
    /// Teacher requests answered during the window.
    pub teacher_requests: u64,
    /// CPU seconds the whole process used in the window (every role is in this process).
    pub cpu_secs: Option<f64>,
}

impl Window {
    /// Training samples per second.
    pub fn samples_per_sec(&self) -> f64 {
        self.samples as f64 / self.secs.max(1e-9)
    }

    /// Milliseconds of training step per batch.
    pub fn step_ms(&self) -> f64 {
        1e3 * self.step_secs / self.batches.max(1) as f64
    }

    /// Cores the process used on average in the window.
    pub fn cores(&self) -> Option<f64> {
        self.cpu_secs.map(|c| c / self.secs.max(1e-9))
    }

    /// Milliseconds waited per batch.
    pub fn wait_ms(&self) -> f64 {
        1e3 * self.wait_secs / self.batches.max(1) as f64
    }

    /// The window between two RunStatus samples taken `secs` apart.
    fn between(a: &pb::RunStatusResponse, b: &pb::RunStatusResponse, secs: f64) -> Window {
        let samples = |s: &pb::RunStatusResponse| s.workers.iter().map(|w| w.samples).sum::<u64>();
        let requests =
            |s: &pb::RunStatusResponse| s.members.iter().map(|m| m.requests).sum::<u64>();
        Window {
            samples: samples(b).saturating_sub(samples(a)),
            batches: b.batches_trained.saturating_sub(a.batches_trained),
            secs,
            step_secs: (b.student_step_seconds - a.student_step_seconds).max(0.0),
            wait_secs: (b.student_wait_seconds - a.student_wait_seconds).max(0.0),
            teacher_requests: requests(b).saturating_sub(requests(a)),
            cpu_secs: None,
        }
    }
}

/// The medians the other sections compare against.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    /// Student-only samples/s.
    pub student: Summary,
    /// End-to-end samples/s, when measured.
    pub e2e: Option<Summary>,
}

/// Runs `a.rounds` rounds of interleaved windows (end-to-end and cached only when asked for),
/// prints each round and the summary, and returns the medians.
pub fn run(
    a: &BenchArgs,
    rt: &tokio::runtime::Runtime,
    out: &Path,
    with_e2e: bool,
    with_cache: bool,
) -> anyhow::Result<Steady> {
    anyhow::ensure!(a.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        a.window_secs > 0.0 && a.window_secs.is_finite(),
        "--window-secs must be positive"
    );
    let mut student = StudentOnly::new(a)?;
    let teacher = random_teacher(&a.teacher)?;
    let shutdown = CancellationToken::new();
    let endpoint = rt.block_on(serve_teacher(&teacher, &shutdown))?;
    let cache_dir = out.join("steady-cache");
    if with_cache {
        rt.block_on(fill_cache(a, &teacher, &cache_dir, out.join("steady-fill")))?;
    }
    println!();
    println!(
        "[steady] {} rounds of interleaved windows of {:.1} s (student-only{}{}), batch {}, prefetch {}, teacher {}",
        a.rounds,
        a.window_secs,
        if with_e2e { ", end-to-end" } else { "" },
        if with_cache { ", cached" } else { "" },
        a.batch,
        a.prefetch,
        a.teacher
    );
    println!(
        "{:>6} {:>14} {:>12} {:>10} {:>10} {:>10}  cores used (student-only / end-to-end / cached)",
        "round", "student-only/s", "end-to-end/s", "cached/s", "(a) ratio", "(e) ratio"
    );
    let (mut so, mut e2e, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let s = student.window(a.window_secs)?;
        so.push(s);
        let e = if with_e2e {
            let dir = out.join(format!("steady-e2e-{round}"));
            let cfg = window_config(a, dir.clone(), student.rows, None);
            Some(rt.block_on(pipeline_window(cfg, &endpoint, &dir, a.window_secs))?)
        } else {
            None
        };
        let c = if with_cache {
            let dir = out.join(format!("steady-cache-{round}"));
            let cache = coordinator::cache::CacheConfig {
                dir: cache_dir.clone(),
                mode: coordinator::cache::CacheMode::ReadOnly,
                record: None,
            };
            let cfg = window_config(a, dir.clone(), student.rows, Some(cache));
            Some(rt.block_on(pipeline_window(cfg, &endpoint, &dir, a.window_secs))?)
        } else {
            None
        };
        let cell =
            |w: Option<Window>| w.map_or("-".into(), |w| format!("{:.0}", w.samples_per_sec()));
        let ratio = |w: Option<Window>| {
            w.map_or("-".into(), |w| {
                format!("{:.3}", w.samples_per_sec() / s.samples_per_sec())
            })
        };
        let cores = |w: Option<Window>| {
            w.and_then(|w| w.cores())
                .map_or("-".into(), |c| format!("{c:.2}"))
        };
        println!(
            "{:>6} {:>14.0} {:>12} {:>10} {:>10} {:>10}  {} / {} / {}",
            round + 1,
            s.samples_per_sec(),
            cell(e),
            cell(c),
            ratio(e),
            ratio(c),
            cores(Some(s)),
            cores(e),
            cores(c)
        );
        e2e.extend(e);
        cached.extend(c);
    }
    shutdown.cancel();

    let sps = |ws: &[Window]| ws.iter().map(Window::samples_per_sec).collect::<Vec<_>>();
    let student_sum = Summary::of(&sps(&so)).context("no student-only window gave a figure")?;
    println!(
        "student-only   {} samples/s (median [min–max]; IQR {:.0}–{:.0}), {:.2} ms per step",
        Spread(&student_sum, 0),
        student_sum.q1,
        student_sum.q3,
        1e3 * a.batch as f64 / student_sum.median
    );
    let e2e_sum = report("(a) end-to-end", &e2e, &so, a.batch, 0.95)?;
    report("(e) cached    ", &cached, &so, a.batch, 0.98)?;
    if !cached.is_empty() {
        let asked: u64 = cached.iter().map(|w| w.teacher_requests).sum();
        println!("(e) teacher requests during the cached windows: {asked} (0 expected)");
    }
    Ok(Steady {
        student: student_sum,
        e2e: e2e_sum,
    })
}

/// Prints one pipeline's summary against the student-only windows of the same rounds.
fn report(
    what: &str,
    windows: &[Window],
    student: &[Window],
    batch: usize,
    target: f64,
) -> anyhow::Result<Option<Summary>> {
    if windows.is_empty() {
        return Ok(None);
    }
    let sps: Vec<f64> = windows.iter().map(Window::samples_per_sec).collect();
    let s = Summary::of(&sps).context("no window gave a figure")?;
    let limit = Summary::of(
        &student
            .iter()
            .map(Window::samples_per_sec)
            .collect::<Vec<_>>(),
    )
    .context("no student-only figure")?;
    // The same round's student-only window is the fairest reference for each window.
    let per_round: Vec<f64> = windows
        .iter()
        .zip(student)
        .map(|(w, s)| w.samples_per_sec() / s.samples_per_sec())
        .collect();
    let r = Summary::of(&per_round).context("no ratio")?;
    let step = Summary::of(&windows.iter().map(Window::step_ms).collect::<Vec<_>>());
    let wait = Summary::of(&windows.iter().map(Window::wait_ms).collect::<Vec<_>>());
    println!(
        "{what} {} samples/s (IQR {:.0}–{:.0}); ÷ student-only: ratio of medians {:.3}, per-round ratios {} (target ≥ {target})",
        Spread(&s, 0),
        s.q1,
        s.q3,
        s.median / limit.median,
        Spread(&r, 3),
    );
    if let (Some(step), Some(wait)) = (step, wait) {
        println!(
            "{:>w$} per batch (medians): {:.2} ms step (alone: {:.2} ms) + {:.2} ms waiting",
            "",
            step.median,
            1e3 * batch as f64 / limit.median,
            wait.median,
            w = what.len()
        );
    }
    Ok(Some(s))
}

/// The student of the run trained on soft targets held in memory (the worker's
/// `Student::train`, the same update the distributed run makes): the limit of (a) and (e).
struct StudentOnly {
    student: student_worker::student::Student,
    prepared: Vec<TrainData>,
    next: usize,
    /// Training rows of the data set.
    rows: usize,
}

impl StudentOnly {
    fn new(a: &BenchArgs) -> anyhow::Result<Self> {
        let data = distill_core::data::Dataset::load(&a.data)?;
        let teacher = random_teacher(&a.teacher)?.to_model(&candle_core::Device::Cpu)?;
        let cfg = base_config(a, PathBuf::from("unused"));
        let settings = cfg.student_settings()?;
        let n = data.train.len();
        let batches = n.div_ceil(a.batch);
        let student = student_worker::student::Student::new(
            settings,
            batches as u64,
            &candle_core::Device::Cpu,
        )?;
        let mut prepared = Vec::with_capacity(batches);
        for b in 0..batches {
            let idx: Vec<usize> = (b * a.batch..((b + 1) * a.batch).min(n)).collect();
            let x = data.train.rows_f32(&idx);
            let mut shape = vec![idx.len()];
            shape.extend(&data.input_shape);
            let xt =
                candle_core::Tensor::from_slice(&x, shape.as_slice(), &candle_core::Device::Cpu)?;
            let z = teacher.forward(&xt)?;
            let p = distill_core::kd::tempered_softmax(&z, cfg.temperature)?;
            let soft = p.flatten_all()?.to_vec1::<f32>()?;
            prepared.push(TrainData {
                lease_id: b as u64,
                epoch: 0,
                index: b as u32,
                x,
                x_shape: shape,
                y: data.train.labels(&idx),
                soft: Targets::Dense(soft),
                rows: idx.len(),
            });
        }
        anyhow::ensure!(!prepared.is_empty(), "{}: no training rows", a.data);
        Ok(Self {
            student,
            prepared,
            next: 0,
            rows: n,
        })
    }

    /// Trains for `secs` after the warm-up steps; the window ends with the first step that
    /// finishes past `secs`.
    fn window(&mut self, secs: f64) -> anyhow::Result<Window> {
        for _ in 0..WARMUP_STEPS {
            self.step()?;
        }
        let c0 = process_cpu();
        let t0 = Instant::now();
        let (mut samples, mut batches) = (0, 0);
        loop {
            samples += self.step()? as u64;
            batches += 1;
            if t0.elapsed().as_secs_f64() >= secs {
                break;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(Window {
            samples,
            batches,
            secs,
            step_secs: secs,
            cpu_secs: process_cpu().zip(c0).map(|(b, a)| b - a),
            ..Default::default()
        })
    }

    /// One update on the next prepared batch; returns its rows.
    fn step(&mut self) -> anyhow::Result<usize> {
        let d = &self.prepared[self.next % self.prepared.len()];
        self.next += 1;
        self.student.train(d)?;
        Ok(d.rows)
    }
}

/// Starts one teacher server replica on loopback; returns its endpoint.
async fn serve_teacher(
    ck: &distill_core::checkpoint::Checkpoint,
    shutdown: &CancellationToken,
) -> anyhow::Result<String> {
    let opts = teacher_server::ServeOptions {
        member: "t".into(),
        ..Default::default()
    };
    let service = teacher_server::build_service(ck, &candle_core::Device::Cpu, &opts)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(teacher_server::serve(
        service,
        listener,
        opts.max_message_bytes,
        shutdown.clone(),
    ));
    Ok(endpoint)
}

/// Fills `cache_dir` with the teacher's soft targets for every training row: one epoch of a
/// run with the cache read-write (a tiny student: only the soft targets matter, and the cache
/// key does not name the student).
async fn fill_cache(
    a: &BenchArgs,
    teacher: &distill_core::checkpoint::Checkpoint,
    cache_dir: &Path,
    dir: PathBuf,
) -> anyhow::Result<()> {
    let mut cfg = base_config(a, dir.clone());
    cfg.epochs = 1;
    cfg.sync.every = 0;
    cfg.student.arch = FILL_STUDENT.into();
    cfg.cache = Some(coordinator::cache::CacheConfig {
        dir: cache_dir.to_path_buf(),
        mode: coordinator::cache::CacheMode::ReadWrite,
        record: None,
    });
    fill(cfg, teacher, dir).await
}

/// The student of a cache-filling run.
pub const FILL_STUDENT: &str = "mlp:784-16-10";

/// Runs `cfg` (one epoch, cache read-write) to the end with one local teacher and one worker,
/// and checks that it wrote every training row.
pub async fn fill(
    cfg: RunConfig,
    teacher: &distill_core::checkpoint::Checkpoint,
    dir: PathBuf,
) -> anyhow::Result<()> {
    let members = [LocalMember {
        name: "t".into(),
        checkpoint: teacher.clone(),
        replicas: 1,
        opts: Default::default(),
    }];
    let t0 = Instant::now();
    let o = crate::local::run(cfg, &members, 1, dir).await?;
    let c = o
        .report
        .cache
        .as_ref()
        .context("the cache-filling run reports no cache")?;
    tracing::info!(
        rows = c.rows_written,
        secs = t0.elapsed().as_secs_f64(),
        "soft-target cache filled"
    );
    Ok(())
}

/// The run config of a window: one worker, no synchronisation rounds (a lone worker has
/// nothing to average), enough epochs to outlast warm-up and window.
fn window_config(
    a: &BenchArgs,
    dir: PathBuf,
    rows: usize,
    cache: Option<coordinator::cache::CacheConfig>,
) -> RunConfig {
    let mut cfg = base_config(a, dir);
    cfg.sync.every = 0;
    cfg.cache = cache;
    let budget = MAX_SAMPLES_PER_SEC * (a.window_secs + WARMUP_DEADLINE.as_secs_f64());
    cfg.epochs = 2 + (budget / rows.max(1) as f64).ceil() as u32;
    cfg
}

/// Runs `cfg` against the teacher at `endpoint` with one real student worker; measures
/// `secs` after the first epoch; stops the run.
async fn pipeline_window(
    mut cfg: RunConfig,
    endpoint: &str,
    dir: &Path,
    secs: f64,
) -> anyhow::Result<Window> {
    cfg.members = vec![MemberConfig {
        name: "t".into(),
        endpoints: vec![endpoint.to_string()],
        weight: 1.0,
        ..Default::default()
    }];
    cfg.min_workers = 1;
    cfg.validate()?;
    // The worker's credit window matches the coordinator's prefetch, as in `distill demo`.
    let prefetch = cfg.prefetch.clamp(1, 1024) as u32;
    let run = coordinator::prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let served = tokio::spawn(coordinator::serve(run, listener, stop.clone()));
    let worker = tokio::spawn(student_worker::run(
        student_worker::WorkerConfig {
            coordinator: format!("http://{addr}"),
            work_dir: dir.join("worker"),
            worker_id: Some("worker-0".into()),
            connect_timeout: Duration::from_secs(30),
            prefetch,
            ..Default::default()
        },
        stop.clone(),
    ));
    let measured = measure(addr, secs).await;
    stop.cancel();
    wind_down(worker, served).await?;
    measured
}

/// Waits for the first epoch to be trained, then measures `secs`.
async fn measure(addr: SocketAddr, secs: f64) -> anyhow::Result<Window> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("connecting to the coordinator for RunStatus")?;
    let mut client = CoordinatorClient::new(channel);
    let deadline = Instant::now() + WARMUP_DEADLINE;
    let mut poll = tokio::time::interval(STATUS_POLL);
    let start = loop {
        poll.tick().await;
        let s = client
            .run_status(pb::RunStatusRequest {})
            .await?
            .into_inner();
        let per_epoch = s.batches_expected / u64::from(s.epochs.max(1));
        if s.batches_trained >= per_epoch.max(1) {
            break s;
        }
        anyhow::ensure!(!s.done, "the run ended during its warm-up");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the first epoch was not trained within {WARMUP_DEADLINE:?} ({} of {per_epoch} batches)",
            s.batches_trained
        );
    };
    let c0 = process_cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let c1 = process_cpu();
    let end = client
        .run_status(pb::RunStatusRequest {})
        .await?
        .into_inner();
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        !end.done,
        "the run ended within its window: it needs more epochs"
    );
    Ok(Window {
        cpu_secs: c1.zip(c0).map(|(b, a)| b - a),
        ..Window::between(&start, &end, secs)
    })
}

/// CPU seconds of the whole process so far (`None` where `/proc` cannot be read).
fn process_cpu() -> Option<f64> {
    super::stats::cpu_seconds("").map(|(total, _)| total)
}

/// Waits (bounded) for a stopped run's worker and coordinator to end. A worker stopped by the
/// token reports `Cancelled`, or a broken stream when the coordinator went first: both expected.
async fn wind_down(
    worker: tokio::task::JoinHandle<student_worker::Result<student_worker::WorkerReport>>,
    served: tokio::task::JoinHandle<coordinator::Result<Option<coordinator::RunReport>>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(STOP_DEADLINE, worker).await {
        Err(_) => anyhow::bail!("the student worker did not stop within {STOP_DEADLINE:?}"),
        Ok(r) => match r.context("worker task")? {
            Ok(_) | Err(student_worker::Error::Cancelled { .. }) => {}
            Err(e) => tracing::debug!(error = %e, "stopped worker"),
        },
    }
    match tokio::time::timeout(STOP_DEADLINE, served).await {
        Err(_) => anyhow::bail!("the coordinator did not stop within {STOP_DEADLINE:?}"),
        Ok(r) => {
            r.context("coordinator task")??;
        }
    }
    Ok(())
}
