//! Several student workers train one student (issue: data parallel by periodic parameter
//! averaging), with real processes on loopback: one teacher server, a coordinator and one or two
//! student workers, each a process of the built `distill` binary.
//!
//! - `two_workers_share_the_batches_and_match_one_worker`: both workers ack a share of the
//!   batches, synchronisation rounds ran, and the final student is as good as a one-worker run
//!   of the same config (tolerance below).
//! - `two_runs_of_two_workers_give_the_same_student_bit_for_bit`: on the fixed round schedule
//!   the student is a function of the config and the workers, not of the timing: two runs
//!   with the same seed write byte-identical students, while a third with another seed does
//!   not (so the comparison can fail).
//! - `synchronous_gradient_averaging_equals_one_worker_with_twice_the_batch`: two workers
//!   averaging gradients after every batch (`average = "gradients"`) write the student one
//!   worker writes with batches twice as large, to f32 rounding; averaging parameters after
//!   every batch instead (AdamW's moments stay local) does not, so the comparison can fail.
//! - `killing_one_worker_mid_run_still_completes_with_the_other`: SIGKILL one of two workers
//!   while the run is between 20% and 70% trained; the other finishes, every batch is trained,
//!   the killed worker's unaveraged batches are trained again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Proc, Setup, count as u, read_report, run_status, setup, small_run, static_member, wait_until,
    worker, write_config,
};

/// Tolerance of the 2-worker student against the 1-worker one: at most this many more test
/// errors (of 2000) than 1.25 × the 1-worker errors. Averaging every 10 updates is close to, not
/// equal to, one worker's sequence of updates.
const EXTRA_ERRORS: u64 = 30;

/// Starts a coordinator for `workers` workers; returns its process, address and run dir.
fn coordinator(s: &Setup, name: &str, workers: usize, epochs: u32) -> (Proc, String, PathBuf) {
    seeded_coordinator(s, name, workers, epochs, 3)
}

/// [`coordinator`] with the run's seed.
fn seeded_coordinator(
    s: &Setup,
    name: &str,
    workers: usize,
    epochs: u32,
    seed: u64,
) -> (Proc, String, PathBuf) {
    let d = s.dir.path();
    let mut cfg = small_run(name);
    cfg.epochs = epochs;
    cfg.seed = seed;
    cfg.lease_timeout_secs = 30.0;
    cfg.min_workers = workers;
    cfg.sync.every = 10;
    cfg.sync.round_timeout_secs = 20.0;
    cfg.members = vec![static_member("t", &[&s.teacher])];
    let cfg = write_config(d, name, &cfg);
    let (c, addr) = common::coordinator(d, &cfg, "127.0.0.1:0", &format!("{name}-coordinator.log"));
    (c, addr, d.join(name))
}

/// Waits for the workers, then the coordinator, to exit successfully.
fn finish(d: &Path, coordinator: Proc, workers: Vec<Proc>) {
    common::finish(d, coordinator, workers, Duration::from_secs(300));
}

#[test]
fn two_workers_share_the_batches_and_match_one_worker() {
    let s = setup();
    let d = s.dir.path().to_path_buf();

    let (c1, a1, run1) = coordinator(&s, "one", 1, 3);
    let w = worker(&d, &a1, "solo", &[]);
    finish(&d, c1, vec![w]);
    let one = read_report(&run1);

    let (c2, a2, run2) = coordinator(&s, "two", 2, 3);
    let ws = vec![worker(&d, &a2, "w0", &[]), worker(&d, &a2, "w1", &[])];
    finish(&d, c2, ws);
    let two = read_report(&run2);

    for r in [&one, &two] {
        assert_eq!(u(r, "batches_trained"), u(r, "batches_expected"), "{r}");
        assert_eq!(u(r, "batches_expected"), 3 * 12_000u64.div_ceil(64));
    }
    // Both workers trained a real share of the rows.
    let shares = two["workers"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{two}");
    let total: u64 = shares.iter().map(|w| u(w, "samples")).sum();
    assert!(total >= 3 * 12_000, "{two}");
    for w in shares {
        assert!(
            u(w, "samples") * 5 >= total,
            "a worker trained under 20%: {two}"
        );
    }
    // Rounds ran and moved parameters: about one per 10 updates of each worker.
    let sync = &two["sync"];
    let rounds = u(sync, "rounds");
    assert!(rounds >= u(&two, "batches_expected") / 40, "rounds: {sync}");
    assert!(
        sync["mean_bytes_per_round"].as_f64().unwrap() > 4.0 * 25_450.0,
        "{sync}"
    );
    // As good as one worker, within the stated tolerance.
    let (e1, e2) = (
        u(&one, "student_test_errors"),
        u(&two, "student_test_errors"),
    );
    assert!(
        e1 < 2000 * 3 / 10,
        "the 1-worker student did not learn: {one}"
    );
    assert!(
        e2 <= e1 * 5 / 4 + EXTRA_ERRORS,
        "2 workers: {e2} test errors; 1 worker: {e1}"
    );
    eprintln!("test errors: 1 worker {e1}, 2 workers {e2}; {rounds} rounds");
}

#[test]
fn two_runs_of_two_workers_give_the_same_student_bit_for_bit() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let mut students = Vec::new();
    for (name, seed) in [("first", 3), ("again", 3), ("other", 4)] {
        let (c, addr, run) = seeded_coordinator(&s, name, 2, 2, seed);
        // Different worker processes each time, the second one started first in one run: the
        // schedule depends on who the members are, not on who came first.
        let wd = d.join(format!("{name}-workers"));
        std::fs::create_dir_all(&wd).unwrap();
        let ws = if name == "again" {
            let w1 = worker(&wd, &addr, "w1", &[]);
            vec![w1, worker(&wd, &addr, "w0", &[])]
        } else {
            let w0 = worker(&wd, &addr, "w0", &[]);
            vec![w0, worker(&wd, &addr, "w1", &[])]
        };
        finish(&d, c, ws);
        let r = read_report(&run);
        assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
        assert!(u(&r["sync"], "rounds") > 10, "{r}");
        students.push(tensors(
            &std::fs::read(run.join("student.safetensors")).unwrap(),
        ));
    }
    assert!(
        students[0] == students[1],
        "two runs with the same seed and workers wrote different students"
    );
    assert!(
        students[0] != students[2],
        "another seed wrote the same student: the comparison cannot fail"
    );
}

#[test]
fn synchronous_gradient_averaging_equals_one_worker_with_twice_the_batch() {
    use coordinator::config::SyncAverage;
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let run = |name: &str, workers: usize, batch: usize, every: u64, average: SyncAverage| {
        let mut cfg = small_run(name);
        cfg.epochs = 1;
        cfg.seed = 5;
        cfg.batch_size = batch;
        cfg.lease_timeout_secs = 30.0;
        cfg.min_workers = workers;
        cfg.eval_every_epoch = false;
        cfg.sync.every = every;
        cfg.sync.average = average;
        cfg.sync.round_timeout_secs = 20.0;
        cfg.members = vec![static_member("t", &[&s.teacher])];
        let path = write_config(&d, name, &cfg);
        let (c, addr) =
            common::coordinator(&d, &path, "127.0.0.1:0", &format!("{name}-coordinator.log"));
        let wd = d.join(format!("{name}-workers"));
        std::fs::create_dir_all(&wd).unwrap();
        let ws = (0..workers)
            .map(|i| worker(&wd, &addr, &format!("w{i}"), &[]))
            .collect();
        finish(&d, c, ws);
        let r = read_report(&d.join(name));
        assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
        let file = std::fs::read(d.join(name).join("student.safetensors")).unwrap();
        (r, student_values(&file))
    };
    let (_, big) = run("big", 1, 128, 0, SyncAverage::Parameters);
    let (r, sync) = run("sync", 2, 64, 1, SyncAverage::Gradients);
    // A round per pair of batches (188 batches of 64, the last one of 32 rows), then the
    // final contributions' rounds.
    let rounds = u(&r["sync"], "rounds");
    assert!((94..=96).contains(&rounds), "{r}");
    let shares = r["workers"].as_array().unwrap();
    assert!(shares.iter().all(|w| u(w, "batches") == 94), "{r}");
    let (_, local) = run("local", 2, 64, 1, SyncAverage::Parameters);
    let gap = max_abs_diff(&big, &sync);
    let other = max_abs_diff(&big, &local);
    eprintln!(
        "largest difference from one worker with twice the batch: gradients {gap:e}, parameters {other:e}"
    );
    assert!(gap < 1e-5, "gradient averaging is {gap} from one worker");
    assert!(
        other > 100.0 * gap.max(1e-7),
        "parameter averaging is as close ({other}): the comparison cannot fail"
    );
}

/// The tensors of a safetensors student file as f32 values, in name order.
fn student_values(file: &[u8]) -> Vec<(String, Vec<f32>)> {
    let (header, data) = tensors(file);
    let mut out: Vec<(String, Vec<f32>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}: {v}");
            let off = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            let vals = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!((na, va.len()), (nb, vb.len()));
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// A safetensors file's header (as JSON: its metadata map is written in any order) and its
/// tensor bytes.
fn tensors(file: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&file[8..8 + n]).unwrap();
    (header, file[8 + n..].to_vec())
}

#[test]
fn killing_one_worker_mid_run_still_completes_with_the_other() {
    let s = setup();
    let d = s.dir.path().to_path_buf();
    let (c, addr, run) = coordinator(&s, "kill", 2, 6);
    let mut victim = worker(&d, &addr, "victim", &[]);
    let survivor = worker(&d, &addr, "survivor", &[]);
    // Freeze the victim once the run is under way, and kill it only while it holds batches that
    // no average has (RunStatus' `unaveraged_batches`, read while it can neither train nor
    // contribute): exactly those must be rolled back and trained again.
    let pid = victim.id();
    let signal = |sig: &str| common::signal(pid, sig);
    let victim_of = |st: &distill_proto::pb::RunStatusResponse| {
        st.workers
            .iter()
            .find(|w| w.worker_id == "victim")
            .map_or((0, 0), |w| (w.samples, w.unaveraged_batches))
    };
    let (at, at_risk) = wait_until(
        Duration::from_secs(240),
        "the victim holding unaveraged batches, mid-run",
        || {
            let st = run_status(&addr)?;
            if st.batches_trained * 5 < st.batches_expected || victim_of(&st).0 == 0 {
                return None;
            }
            signal("-STOP");
            // Frozen: what the coordinator knows of it settles once its last messages are in.
            let mut last = victim_of(&st);
            let settled = loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = run_status(&addr)?;
                if victim_of(&now) == last {
                    break now;
                }
                last = victim_of(&now);
            };
            let risk = victim_of(&settled).1;
            if risk > 0 {
                return Some((settled, risk));
            }
            signal("-CONT");
            None
        },
    );
    victim.kill().unwrap();
    let _ = victim.wait();
    assert!(
        at.batches_trained * 10 < at.batches_expected * 7,
        "the kill came too late to test anything: {} of {}",
        at.batches_trained,
        at.batches_expected
    );
    finish(&d, c, vec![survivor]);
    let r = read_report(&run);
    assert_eq!(u(&r, "batches_trained"), u(&r, "batches_expected"), "{r}");
    // The victim's batches since its last round were undone and trained again: exactly those.
    assert_eq!(u(&r, "rolled_back_batches"), at_risk, "{r}");
    assert!(
        u(&r, "requeued_batches") >= u(&r, "rolled_back_batches"),
        "{r}"
    );
    let shares = r["workers"].as_array().unwrap();
    let rows = |id: &str| {
        shares
            .iter()
            .find(|w| w["worker_id"] == id)
            .map_or(0, |w| u(w, "samples"))
    };
    assert!(
        rows("victim") > 0 && rows("survivor") > rows("victim"),
        "{r}"
    );
    assert!(u(&r, "student_test_errors") < 2000 * 3 / 10, "{r}");
}
