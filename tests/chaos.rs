//! Chaos (issue 6), with real processes on loopback killed with SIGKILL mid-run.
//!
//! - `teacher_and_worker_failures`: one run per scenario against an uninterrupted run of the same
//!   config and seed (members `t`, two replicas, and `u`, one replica): (a) one replica of `t`
//!   killed; (b) `u`'s only replica killed under `wait`, then started again on the same port;
//!   (c) the same under `degrade`, never restarted; (d) the student worker killed and started
//!   again on its work dir; (e) one replica of `t` hung (SIGSTOP). Every kill lands between 25%
//!   and 75% of the run. Each run completes with every batch trained, counts what happened in its
//!   `report.json` (failures, retries, hedges, degraded batches, requeued batches), and its student is within the tolerance below of the uninterrupted one.
//! - `killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run`: the coordinator is
//!   killed while the run is between 25% and 75% trained and started again on the same run
//!   directory and port; the worker joins again by itself, the run resumes from the stored state
//!   (`resumes = 1`) and completes with every batch trained, and the student is as good as an
//!   uninterrupted run's with the same seed (tolerance below).
//! - `killing_the_coordinator_of_a_run_with_outer_momentum_resumes_it_with_its_momentum`: the
//!   same with Nesterov outer momentum, whose buffer must be in the commit point at the kill.
//! - `killing_the_coordinator_of_a_gradient_averaging_run_resumes_it_with_its_optimizer`: the
//!   same in synchronous data parallelism, where the coordinator holds the student's optimizer:
//!   its state (step count and AdamW moments) must be in the commit point at the kill.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Proc, Procs, coordinator, count as u, logs, member, read_report, reserve_port, resumable_run,
    run_status, signal, static_member, teacher, train_teacher, trained_teacher, wait_until,
    wait_with_deadline, worker, write_config,
};
use coordinator::config::{MemberConfig, RunConfig, TeacherPolicy};
use distill_core::data::Dataset;

/// Workers keep trying to reach a restarted coordinator for this long.
const RECONNECT: &[&str] = &["--connect-timeout-s", "60"];

/// Test errors (of 2000) the resumed student may have beyond 1.25 × the uninterrupted one's.
const EXTRA_ERRORS: u64 = 40;

/// Run `name` (config `d/name.toml`, run dir `d/name`) of these members, with `tweak` applied.
fn config(
    d: &Path,
    name: &str,
    members: Vec<MemberConfig>,
    tweak: impl FnOnce(&mut RunConfig),
) -> std::path::PathBuf {
    let mut cfg = resumable_run(name);
    cfg.epochs = 4;
    cfg.seed = 5;
    cfg.members = members;
    tweak(&mut cfg);
    write_config(d, name, &cfg)
}

#[test]
fn killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run() {
    kill_the_coordinator_and_resume("", |_| {}, |_| {});
}

/// The same with an outer optimizer (Nesterov momentum on each round's change): the
/// momentum is in `state.redb` when the coordinator dies, the restarted one continues with it,
/// and the run completes within the same tolerance.
#[test]
fn killing_the_coordinator_of_a_run_with_outer_momentum_resumes_it_with_its_momentum() {
    kill_the_coordinator_and_resume(
        "momentum-",
        |c| {
            // At steady state a step of lr / (1 - momentum) = 1 times the round's change: on
            // 5-update rounds DiLoCo's 0.7 / 0.9 (7 times) diverges on this small run.
            c.sync.outer_lr = 0.5;
            c.sync.outer_momentum = 0.5;
        },
        |run| {
            let stored = commit_point(run);
            let momentum = stored
                .momentum
                .expect("the outer momentum in the commit point");
            assert!(momentum.len() > 4 * 25_450, "{} bytes", momentum.len());
        },
    );
}

/// The same in synchronous data parallelism (`average = "gradients"`): the coordinator steps
/// the student's optimizer, so its AdamW moments are in `state.redb` when it dies and the
/// restarted one continues from them.
#[test]
fn killing_the_coordinator_of_a_gradient_averaging_run_resumes_it_with_its_optimizer() {
    kill_the_coordinator_and_resume(
        "gradients-",
        |c| {
            c.sync.every = 1;
            c.sync.average = coordinator::config::SyncAverage::Gradients;
        },
        |run| {
            let stored = commit_point(run);
            let state = stored
                .optimizer
                .expect("the optimizer state in the commit point");
            let state = distill_core::optim::OptimState::from_bytes(&state).unwrap();
            assert!(state.step >= 2, "{} updates", state.step);
            // A round in which no worker uploaded gradients (one the coordinator asked for at
            // an epoch's end, say) closes a version without a step.
            assert!(
                state.step <= stored.snapshot.sync_version,
                "{} optimizer steps, version {}",
                state.step,
                stored.snapshot.sync_version
            );
        },
    );
}

/// The last commit point in `run`'s `state.redb`.
fn commit_point(run: &Path) -> coordinator::store::run_store::Stored {
    coordinator::store::run_store::RunStore::open(run)
        .unwrap()
        .load()
        .unwrap()
        .expect("a commit point before the kill")
}

/// Runs `{prefix}calm` to the end, then `{prefix}chaos` (the same config, `tweak` applied to
/// both) with its coordinator killed a quarter in, `check_store` called on the killed run's
/// directory, and the coordinator started again there; asserts that the resumed run completes
/// and its student is within the tolerance of the calm one's.
fn kill_the_coordinator_and_resume(
    prefix: &str,
    tweak: impl Fn(&mut RunConfig),
    check_store: impl FnOnce(&Path),
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs = Procs(Vec::new());
    let teacher = trained_teacher(&mut procs, d);
    let (calm_name, chaos_name) = (format!("{prefix}calm"), format!("{prefix}chaos"));

    // The uninterrupted run.
    let cfg = config(d, &calm_name, vec![static_member("t", &[&teacher])], &tweak);
    let (c, calm_addr) = coordinator(d, &cfg, "127.0.0.1:0", "calm-coordinator.log");
    let w = worker(d, &calm_addr, "calm-worker", RECONNECT);
    let st = wait_with_deadline(w, Duration::from_secs(300), "the calm worker");
    assert!(st.success(), "{}", logs(d));
    assert!(wait_with_deadline(c, Duration::from_secs(60), "the calm coordinator").success());
    let calm = read_report(&d.join(&calm_name));

    // The same run, with the coordinator killed mid-run and started again on the same port.
    // Held until the test ends: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();
    let cfg = config(
        d,
        &chaos_name,
        vec![static_member("t", &[&teacher])],
        &tweak,
    );
    let (mut c1, _) = coordinator(d, &cfg, &listen, "chaos-coordinator-1.log");
    let w = worker(d, &listen, "chaos-worker", RECONNECT);
    let at = wait_until(Duration::from_secs(240), "a quarter of the run", || {
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
    check_store(&d.join(&chaos_name));
    let (c2, _) = coordinator(d, &cfg, &listen, "chaos-coordinator-2.log");
    let st = wait_with_deadline(w, Duration::from_secs(300), "the chaos worker");
    assert!(st.success(), "{}", logs(d));
    assert!(
        wait_with_deadline(c2, Duration::from_secs(60), "the restarted coordinator").success(),
        "{}",
        logs(d)
    );
    let chaos = read_report(&d.join(&chaos_name));
    assert_eq!(u(&chaos, "resumes"), 1, "{chaos}");
    assert_eq!(u(&chaos, "batches_trained"), u(&chaos, "batches_expected"));
    assert_eq!(u(&chaos, "batches_expected"), 4 * 12_000u64.div_ceil(64));
    let (e0, e1) = (
        u(&calm, "student_test_errors"),
        u(&chaos, "student_test_errors"),
    );
    assert!(
        e0 < 2000 * 3 / 10,
        "the uninterrupted student did not learn: {calm}"
    );
    assert!(
        e1 <= e0 * 5 / 4 + EXTRA_ERRORS,
        "resumed: {e1} test errors; uninterrupted: {e0}"
    );
    eprintln!("{prefix}test errors: uninterrupted {e0}, coordinator killed and resumed {e1}");
}

/// The same for a run without synchronisation rounds (`[sync] every = 0`), which used to keep
/// no state at all: the restarted coordinator resumes from its last commit point and the run
/// completes with every batch trained.
#[test]
fn killing_the_coordinator_of_a_run_without_rounds_and_restarting_it_resumes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs = Procs(Vec::new());
    let teacher = trained_teacher(&mut procs, d);
    let cfg = config(d, "plain", vec![static_member("t", &[&teacher])], |c| {
        c.sync.every = 0;
    });
    // Held until the test ends: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();
    let (mut c1, _) = coordinator(d, &cfg, &listen, "plain-coordinator-1.log");
    let w = worker(d, &listen, "plain-worker", RECONNECT);
    let at = wait_until(Duration::from_secs(240), "a quarter of the run", || {
        let st = run_status(&listen)?;
        (st.batches_trained * 4 >= st.batches_expected).then_some(st)
    });
    c1.kill().unwrap();
    let _ = c1.wait();
    assert!(
        at.batches_trained * 4 < at.batches_expected * 3,
        "the kill came too late: {} of {}",
        at.batches_trained,
        at.batches_expected
    );
    assert_eq!(at.sync_rounds, 0, "a run without rounds");
    let (c2, _) = coordinator(d, &cfg, &listen, "plain-coordinator-2.log");
    let st = wait_with_deadline(w, Duration::from_secs(300), "the worker");
    assert!(st.success(), "{}", logs(d));
    assert!(
        wait_with_deadline(c2, Duration::from_secs(60), "the restarted coordinator").success(),
        "{}",
        logs(d)
    );
    let plain = read_report(&d.join("plain"));
    assert_eq!(u(&plain, "resumes"), 1, "{plain}");
    assert_eq!(u(&plain, "batches_trained"), u(&plain, "batches_expected"));
    assert_eq!(u(&plain, "batches_expected"), 4 * 12_000u64.div_ceil(64));
    assert!(
        u(&plain, "student_test_errors") < 2000 * 3 / 10,
        "the resumed student did not learn: {plain}"
    );
}

/// What a scenario does a quarter into its run: (coordinator address, the teacher processes t1,
/// t2, u1, the worker, u1's listen address).
type Chaos<'a> = dyn FnMut(&str, &mut Vec<Proc>, &mut Proc, &str) + 'a;

/// Waits until the run at `addr` is a quarter trained.
fn a_quarter_in(addr: &str) -> distill_proto::pb::RunStatusResponse {
    wait_until(Duration::from_secs(240), "a quarter of the run", || {
        let st = run_status(addr)?;
        (st.batches_trained * 4 >= st.batches_expected).then_some(st)
    })
}

fn not_too_late(at: &distill_proto::pb::RunStatusResponse, what: &str) {
    assert!(
        at.batches_trained * 4 < at.batches_expected * 3,
        "{what}: the kill came too late: {} of {}",
        at.batches_trained,
        at.batches_expected
    );
}

#[test]
fn teacher_and_worker_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = Dataset::load("synthetic:0").unwrap();
    let (tm, um) = (d.join("t.safetensors"), d.join("u.safetensors"));
    train_teacher(&data, "mlp:784-64-10", 1, &tm);
    train_teacher(&data, "mlp:784-48-10", 2, &um);
    // Each scenario's `u` port is held until the test ends, for `u`'s restart on it.
    let mut reserved = Vec::new();
    let mut free_port = || {
        let r = reserve_port();
        let addr = r.addr.to_string();
        reserved.push(r);
        addr
    };
    // Runs scenario `name`: fresh teachers (t twice, u once, u on `u_listen`), a coordinator, a
    // worker; `chaos` acts a quarter into the run and returns what it must wait for at the end.
    let mut run = |name: &str, policy: TeacherPolicy, chaos: &mut Chaos| -> serde_json::Value {
        let u_listen = free_port();
        let log = |who: &str| format!("{name}-{who}.log");
        let (t1, t1u) = teacher(d, &tm, "t", "127.0.0.1:0", &log("t1"));
        let (t2, t2u) = teacher(d, &tm, "t", "127.0.0.1:0", &log("t2"));
        let (u1, u1u) = teacher(d, &um, "u", &u_listen, &log("u1"));
        let members = vec![
            static_member("t", &[&t1u, &t2u]),
            static_member("u", &[&u1u]),
        ];
        let cfg = config(d, name, members, |c| c.teacher_policy = policy);
        let (c, addr) = coordinator(d, &cfg, "127.0.0.1:0", &log("coordinator"));
        let mut w = worker(d, &addr, &format!("{name}-worker"), RECONNECT);
        let mut teachers = vec![t1, t2, u1];
        chaos(&addr, &mut teachers, &mut w, &u_listen);
        let st = wait_with_deadline(w, Duration::from_secs(300), "the worker");
        assert!(st.success(), "{name}: {}", logs(d));
        assert!(
            wait_with_deadline(c, Duration::from_secs(60), "the coordinator").success(),
            "{name}: {}",
            logs(d)
        );
        for mut t in teachers {
            let _ = t.kill();
            let _ = t.wait();
        }
        let r = read_report(&d.join(name));
        assert_eq!(
            u(&r, "batches_trained"),
            u(&r, "batches_expected"),
            "{name}: {r}"
        );
        r
    };

    let calm = run("calm", TeacherPolicy::Wait, &mut |_, _, _, _| {});
    let e0 = u(&calm, "student_test_errors");
    assert!(
        e0 < 2000 * 3 / 10,
        "the uninterrupted student did not learn: {calm}"
    );
    let close = |r: &serde_json::Value, what: &str| {
        let e = u(r, "student_test_errors");
        assert!(
            e <= e0 * 5 / 4 + EXTRA_ERRORS,
            "{what}: {e} test errors; uninterrupted: {e0}"
        );
        eprintln!("{what}: {e} test errors (uninterrupted {e0})");
    };

    // (a) One replica of `t` dies: its requests go to the other.
    let a = run(
        "replica",
        TeacherPolicy::Wait,
        &mut |addr, teachers, _, _| {
            let at = a_quarter_in(addr);
            teachers[1].kill().unwrap();
            let _ = teachers[1].wait();
            not_too_late(&at, "(a)");
        },
    );
    assert!(u(member(&a, "t"), "failures") >= 1, "(a): {a}");
    // The failed requests were retried on the surviving replica, which answered the most.
    assert!(u(&a, "retries") >= 1, "(a): {a}");
    let shares: Vec<u64> = member(&a, "t")["answered_by"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(shares.len(), 2, "(a): {a}");
    assert_eq!(u(&a, "degraded_batches"), 0);
    close(&a, "(a) one replica killed");

    // (e) One replica of `t` hangs (SIGSTOP, its socket still open): a request to it outlives
    // the member's hedge delay, a copy goes to the other replica, and that copy wins. Counted
    // in the report the coordinator writes.
    let e = run("hung", TeacherPolicy::Wait, &mut |addr, teachers, _, _| {
        let at = a_quarter_in(addr);
        signal(teachers[1].id(), "-STOP");
        not_too_late(&at, "(e)");
    });
    let t = member(&e, "t");
    assert!(u(t, "hedged_requests") >= 1, "(e): {e}");
    assert!(u(t, "hedge_wins") >= 1, "(e): {e}");
    assert!(u(t, "hedge_wins") <= u(t, "hedged_requests"), "(e): {e}");
    assert_eq!(u(&e, "degraded_batches"), 0);
    close(&e, "(e) one replica of t hung");

    // (b) `u`'s only replica dies under `wait`; the run waits, then resumes when it is back.
    let b = run(
        "wait",
        TeacherPolicy::Wait,
        &mut |addr, teachers, _, u_listen| {
            let at = a_quarter_in(addr);
            teachers[2].kill().unwrap();
            let _ = teachers[2].wait();
            not_too_late(&at, "(b)");
            wait_until(Duration::from_secs(60), "member u seen down", || {
                let st = run_status(addr)?;
                (st.members.iter().find(|m| m.member == "u")?.failures >= 1).then_some(())
            });
            let (back, _) = teacher(d, &um, "u", u_listen, "wait-u-again.log");
            teachers[2] = back;
        },
    );
    assert!(u(member(&b, "u"), "failures") >= 1, "(b): {b}");
    assert_eq!(
        u(&b, "degraded_batches"),
        0,
        "(b) waits, never degrades: {b}"
    );
    close(
        &b,
        "(b) every replica of u killed under wait, one restarted",
    );

    // (c) The same under `degrade`, never restarted: batches combine `t` alone.
    let c = run(
        "degrade",
        TeacherPolicy::Degrade,
        &mut |addr, teachers, _, _| {
            let at = a_quarter_in(addr);
            teachers[2].kill().unwrap();
            let _ = teachers[2].wait();
            not_too_late(&at, "(c)");
        },
    );
    assert!(u(&c, "degraded_batches") > 0, "(c): {c}");
    close(&c, "(c) every replica of u killed under degrade");

    // (d) The worker dies and is started again on its work dir.
    let dd = run("worker", TeacherPolicy::Wait, &mut |addr, _, w, _| {
        let at = a_quarter_in(addr);
        w.kill().unwrap();
        let _ = w.wait();
        not_too_late(&at, "(d)");
        *w = worker(d, addr, "worker-worker", RECONNECT);
    });
    assert!(u(&dd, "requeued_batches") > 0, "(d): {dd}");
    close(&dd, "(d) worker killed and restarted");
}
