//! Claims of README and docs/config.md that no other test checked (issue 19, point 4), with real
//! processes of the built `distill` binary on loopback (one teacher server, a coordinator, one
//! or two student workers):
//!
//! - `a_hung_worker_s_leases_expire_and_the_other_worker_trains_them`: `lease_timeout_secs` —
//!   a worker frozen with SIGSTOP (alive, its stream open) holds leases; they expire, go back in
//!   line (`requeued_batches` while nobody left) and the other worker trains every batch of the
//!   run while the frozen one is still frozen.
//! - `rounds_in_bf16_and_f16_complete_and_the_student_learns`: `[sync] dtype` — two workers
//!   averaging in bf16 (then f16): the run completes, the report names the dtype, a round moves
//!   2 bytes per parameter value, and the student learned.
//! - `a_restart_with_other_student_settings_is_refused`: a coordinator started again on a run
//!   directory with a commit point, with another `[student] arch` (then another `[optim] lr`),
//!   exits non-zero naming `state.redb` and the stored settings.
//! - `killing_the_coordinator_of_a_two_worker_run_resumes_with_both_workers`: SIGKILL of the
//!   coordinator mid-run with two workers and rounds; restarted on the same port, both workers
//!   join again by themselves and train, `resumes = 1`, every batch trained.
//! - `checkpoint_every_writes_worker_checkpoints_between_epoch_ends`: `checkpoint_every = N` —
//!   the worker's `student.safetensors` is rewritten during the run at steps that are multiples
//!   of N, not only at epoch ends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{
    Proc, Setup, count as u, distill, logs, read_report, reserve_port, resumable, run_status,
    setup, signal, small_run, static_member, wait_until, wait_with_deadline, worker, write_config,
};
use coordinator::config::{ParamDtype, RunConfig};
use distill_core::checkpoint::Checkpoint;

/// Workers keep trying to reach a restarted coordinator for this long.
const RECONNECT: &[&str] = &["--connect-timeout-s", "60"];

/// Batches per epoch of the synthetic set (12,000 training rows) at batch size 64.
const PER_EPOCH: u64 = 12_000u64.div_ceil(64);

/// Parameter values of `mlp:784-32-10`.
const PARAMS: u64 = 784 * 32 + 32 + 32 * 10 + 10;

/// A student that learned: well under chance (1,800 of 2,000 test rows wrong).
const LEARNED: u64 = 2000 * 3 / 10;

/// Writes run config `name.toml` (run dir `name`, seed 7, the teacher of `s` as member `t`)
/// with `tweak` applied.
fn config(s: &Setup, name: &str, tweak: impl FnOnce(&mut RunConfig)) -> PathBuf {
    let mut cfg = small_run(name);
    cfg.seed = 7;
    cfg.members = vec![static_member("t", &[&s.teacher])];
    tweak(&mut cfg);
    write_config(s.dir.path(), name, &cfg)
}

/// Starts a coordinator on `listen`; returns it and the address it listens on.
fn coordinator(s: &Setup, cfg: &Path, listen: &str, log: &str) -> (Proc, String) {
    common::coordinator(s.dir.path(), cfg, listen, log)
}

/// Waits for the workers, then the coordinator, to exit successfully.
fn finish(d: &Path, coordinator: Proc, workers: Vec<Proc>) {
    common::finish(d, coordinator, workers, Duration::from_secs(120));
}

/// Rows worker `id` trained, per the report (0 when it is not listed).
fn report_samples(r: &serde_json::Value, id: &str) -> u64 {
    r["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == id)
        .map_or(0, |w| u(w, "samples"))
}

/// Rows worker `id` trained, per RunStatus (0 when it is not listed).
fn status_samples(st: &distill_proto::pb::RunStatusResponse, id: &str) -> u64 {
    st.workers
        .iter()
        .find(|w| w.worker_id == id)
        .map_or(0, |w| w.samples)
}

/// The last `n` lines of the file at `path` (empty when it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn a_hung_worker_s_leases_expire_and_the_other_worker_trains_them() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    // No rounds, so nothing waits for the frozen worker but its leases; its stream stays open
    // (the stall timeout is far away), so only lease expiry can give its batches to the other.
    let cfg = config(&s, "hung", |c| {
        c.epochs = 2;
        c.min_workers = 2;
        c.lease_timeout_secs = 2.0;
        c.stall_timeout_secs = 600.0;
        c.sync.every = 0;
        c.sync.round_timeout_secs = 1.0;
    });
    // Its preparations and teacher calls logged, so that a run that stops short says where
    // (the tail of this log is in the failure message).
    let mut cmd = common::distill();
    cmd.env(
        "RUST_LOG",
        "warn,coordinator::driver=debug,coordinator::teachers=debug,coordinator::domain::run_state=debug",
    )
    .arg("coordinator")
    .arg("--config")
    .arg(&cfg)
    .args(["--listen", "127.0.0.1:0"]);
    let coordinator_log = d.join("hung-coordinator.debug");
    let (c, addr) = common::spawn_server(cmd, &coordinator_log);
    let mut frozen = worker(&d, &addr, "frozen", &[]);
    let other = worker(&d, &addr, "other", &[]);
    let pid = frozen.id();
    // Freeze it once it trains, early in the run (it holds the leases of its prefetch queue).
    let at = wait_until(Duration::from_secs(60), "the run under way", || {
        let st = run_status(&addr)?;
        (st.batches_trained * 10 >= st.batches_expected && status_samples(&st, "frozen") > 0)
            .then_some(st)
    });
    signal(pid, "-STOP");
    assert!(
        at.batches_trained * 2 < at.batches_expected,
        "frozen too late: {} of {}",
        at.batches_trained,
        at.batches_expected
    );
    assert_eq!(at.requeued_batches, 0, "nothing requeued before the freeze");
    // While it stays frozen (alive, connected), the other worker trains every batch. (The inner
    // deadline fails with the last RunStatus and the logs; `wait_until`'s is the backstop.)
    let mut last = None;
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let done = wait_until(
        Duration::from_secs(90),
        "every batch trained while one worker is frozen",
        || {
            let st = run_status(&addr);
            assert!(
                std::time::Instant::now() < end,
                "every batch trained while one worker is frozen: not within 60 s; last \
                 RunStatus {last:?}\n{}\n--- the coordinator's last 150 lines\n{}",
                logs(&d),
                tail(&coordinator_log, 150)
            );
            let st = st?;
            last = Some(st.clone());
            (st.batches_trained == st.batches_expected).then_some(st)
        },
    );
    assert!(
        matches!(frozen.try_wait(), Ok(None)),
        "the frozen worker is still there"
    );
    assert!(
        done.requeued_batches >= 1,
        "the frozen worker's leases expired and went back in line: {done:?}"
    );
    frozen.kill().unwrap();
    let _ = frozen.wait();
    finish(&d, c, vec![other]);
    let r = read_report(&d.join("hung"));
    assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
    assert_eq!(u(&r, "batches_expected"), 2 * PER_EPOCH);
    assert!(u(&r, "requeued_batches") >= done.requeued_batches, "{r}");
    let (f, o) = (report_samples(&r, "frozen"), report_samples(&r, "other"));
    assert!(f > 0 && o > f, "{r}");
    assert_eq!(f + o, 2 * 12_000, "every row trained once: {r}");
    eprintln!(
        "{} batches requeued while frozen; rows: frozen {f}, other {o}",
        done.requeued_batches
    );
}

#[test]
fn rounds_in_bf16_and_f16_complete_and_the_student_learns() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    for (dtype, wire) in [("bf16", ParamDtype::Bf16), ("f16", ParamDtype::F16)] {
        let cfg = config(&s, dtype, |c| {
            c.epochs = 3;
            c.min_workers = 2;
            c.lease_timeout_secs = 30.0;
            c.sync.every = 10;
            c.sync.round_timeout_secs = 20.0;
            c.sync.dtype = wire;
        });
        let (c, addr) = coordinator(&s, &cfg, "127.0.0.1:0", &format!("{dtype}-c.log"));
        let ws = vec![
            worker(&d, &addr, &format!("{dtype}-w0"), &[]),
            worker(&d, &addr, &format!("{dtype}-w1"), &[]),
        ];
        finish(&d, c, ws);
        let r = read_report(&d.join(dtype));
        assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
        let sync = &r["sync"];
        assert_eq!(sync["dtype"], dtype, "{sync}");
        let rounds = u(sync, "rounds");
        assert!(rounds >= 3 * PER_EPOCH / 40, "rounds: {sync}");
        // A round moves each of two workers' parameters up and the average down to each: at
        // most 4 × PARAMS values, 2 bytes each (f32 would be 4); a margin for the headers and
        // the parameters sent at joins and for the evaluation.
        let per_round = sync["mean_bytes_per_round"].as_f64().unwrap();
        assert!(
            per_round > PARAMS as f64 * 2.0 && per_round < 1.25 * (4 * PARAMS * 2) as f64,
            "{dtype}: {per_round} bytes per round: {sync}"
        );
        let e = u(&r, "student_test_errors");
        assert!(e < LEARNED, "{dtype}: the student did not learn: {r}");
        eprintln!("{dtype}: {e} test errors, {rounds} rounds, {per_round:.0} bytes per round");
    }
}

#[test]
fn a_restart_with_other_student_settings_is_refused() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let settings = |c: &mut RunConfig| {
        resumable(c);
        c.epochs = 3;
    };
    let cfg = config(&s, "run", settings);
    let (mut c, addr) = coordinator(&s, &cfg, "127.0.0.1:0", "run-coordinator.log");
    let mut w = worker(&d, &addr, "w", &[]);
    // A commit point: rounds closed (each one written, `state_every_secs = 0`).
    wait_until(Duration::from_secs(60), "a commit point", || {
        let st = run_status(&addr)?;
        (st.sync_rounds >= 2 && st.batches_trained > 0).then_some(())
    });
    c.kill().unwrap();
    let _ = c.wait();
    w.kill().unwrap();
    let _ = w.wait();
    assert!(d.join("run/state.redb").exists());
    let refused = |what: &str, cfg: &Path| {
        let log = d.join(format!("refused-{what}.log"));
        let child = distill()
            .arg("coordinator")
            .arg("--config")
            .arg(cfg)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let st = wait_with_deadline(child, Duration::from_secs(30), "the refused coordinator");
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(
            !st.success(),
            "{what}: a restart with other settings ran: {err}"
        );
        assert!(
            err.contains("state.redb")
                && err.contains("other student settings")
                && err.contains("move it away"),
            "{what}: {err}"
        );
        // It names the stored settings.
        assert!(
            err.contains(r#""hidden":[32]"#) && err.contains(r#""lr":0.002"#),
            "{what}: {err}"
        );
    };
    // Another architecture (the same config file, rewritten).
    let other = config(&s, "run", |c| {
        settings(c);
        c.student.arch = "mlp:784-48-10".into();
    });
    refused("arch", &other);
    // Another learning rate.
    let other = config(&s, "run", |c| {
        settings(c);
        c.optim.lr = 0.003;
    });
    refused("lr", &other);
}

#[test]
// This test found the bug of a rejoining worker sending its old stream's queued contribution
// and acks on the new one (each message now carries its stream number; stale ones are dropped).
fn killing_the_coordinator_of_a_two_worker_run_resumes_with_both_workers() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let cfg = config(&s, "resume", |c| {
        resumable(c);
        c.epochs = 3;
        c.min_workers = 2;
    });
    // Held until the test ends: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();
    let (mut c1, _) = coordinator(&s, &cfg, &listen, "resume-coordinator-1.log");
    let ws = vec![
        worker(&d, &listen, "w0", RECONNECT),
        worker(&d, &listen, "w1", RECONNECT),
    ];
    let at = wait_until(Duration::from_secs(90), "a quarter of the run", || {
        let st = run_status(&listen)?;
        (st.batches_trained * 4 >= st.batches_expected && st.sync_rounds >= 2).then_some(st)
    });
    c1.kill().unwrap();
    let _ = c1.wait();
    assert!(
        at.batches_trained * 4 < at.batches_expected * 3,
        "the kill came too late: {} of {}",
        at.batches_trained,
        at.batches_expected
    );
    let before = [status_samples(&at, "w0"), status_samples(&at, "w1")];
    assert!(before.iter().all(|&n| n > 0), "both trained: {at:?}");
    let (c2, _) = coordinator(&s, &cfg, &listen, "resume-coordinator-2.log");
    finish(&d, c2, ws);
    let r = read_report(&d.join("resume"));
    assert_eq!(u(&r, "resumes"), 1, "{r}");
    assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
    assert_eq!(u(&r, "batches_expected"), 3 * PER_EPOCH);
    // Both joined the restarted coordinator and trained there: more rows than they had when it
    // was killed (what a rollback undoes is at most their last few updates).
    for (id, n) in ["w0", "w1"].into_iter().zip(before) {
        assert!(
            report_samples(&r, id) > n,
            "{id} trained {n} rows before the kill and {} in all: {r}",
            report_samples(&r, id)
        );
    }
    let e = u(&r, "student_test_errors");
    assert!(e < LEARNED, "the resumed student did not learn: {r}");
    eprintln!("resumed with both workers: {e} test errors");
}

#[test]
fn checkpoint_every_writes_worker_checkpoints_between_epoch_ends() {
    const EVERY: u64 = 7;
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let cfg = config(&s, "ck", |c| {
        c.epochs = 2;
        c.checkpoint_every = EVERY;
        c.sync.every = 0;
    });
    let (c, addr) = coordinator(&s, &cfg, "127.0.0.1:0", "ck-coordinator.log");
    let mut w = worker(&d, &addr, "ck-worker", &[]);
    let file = d.join("ck-worker/student.safetensors");
    // Every step the worker checkpoint is seen at, until the worker exits.
    let mut seen = std::collections::BTreeSet::new();
    wait_until(Duration::from_secs(120), "the worker's end", || {
        let exited = w.try_wait().unwrap().is_some();
        if let Ok(ck) = Checkpoint::read(&file) {
            seen.insert(ck.extra["distill.step"].parse::<u64>().unwrap());
        }
        exited.then_some(())
    });
    finish(&d, c, vec![w]);
    let between: Vec<u64> = seen
        .iter()
        .copied()
        .filter(|s| s % PER_EPOCH != 0)
        .collect();
    assert!(
        between.len() >= 2,
        "checkpoints between epoch ends, at several steps: {seen:?}"
    );
    assert!(
        between.iter().all(|s| s % EVERY == 0),
        "every {EVERY} updates: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&(2 * PER_EPOCH)), "the final checkpoint");
    eprintln!("worker checkpoints seen at {} steps: {seen:?}", seen.len());
}
