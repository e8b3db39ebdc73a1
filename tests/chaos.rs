//! Chaos (issue 6), with real processes on loopback killed with SIGKILL mid-run.
//!
//! - `teacher_and_worker_failures`: one run per scenario against an uninterrupted run of the same
//!   config and seed (members `t`, two replicas, and `u`, one replica): (a) one replica of `t`
//!   killed; (b) `u`'s only replica killed under `wait`, then started again on the same port;
//!   (c) the same under `degrade`, never restarted; (d) the student worker killed and started
//!   again on its work dir. Every kill lands between 25% and 75% of the run. Each run completes
//!   with every batch trained, counts what happened (failures, retries, degraded batches,
//!   requeued batches), and its student is within the tolerance below of the uninterrupted one.
//! - `killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run`: the coordinator is
//!   killed while the run is between 25% and 75% trained and started again on the same run
//!   directory and port; the worker joins again by itself, the run resumes from the stored state
//!   (`resumes = 1`) and completes with every batch trained, and the student is as good as an
//!   uninterrupted run's with the same seed (tolerance below).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Proc, Procs, coordinator, count as u, distill, logs, read_report, reserve_port, run_status,
    start, train_teacher, trained_teacher, wait_until, wait_with_deadline, worker,
};
use distill_core::data::Dataset;

/// Workers keep trying to reach a restarted coordinator for this long.
const RECONNECT: &[&str] = &["--connect-timeout-s", "60"];

/// Test errors (of 2000) the resumed student may have beyond 1.25 × the uninterrupted one's.
const EXTRA_ERRORS: u64 = 40;

fn config(d: &Path, name: &str, teacher: &str) -> std::path::PathBuf {
    config_with(
        d,
        name,
        &format!("[[members]]\nname = \"t\"\nendpoints = [\"{teacher}\"]\n"),
        "",
    )
}

/// A run config with these `[[members]]` and extra top-level keys.
fn config_with(d: &Path, name: &str, members: &str, top: &str) -> std::path::PathBuf {
    let cfg = d.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
data = "synthetic:0"
run_dir = "{name}"
epochs = 4
batch_size = 64
seed = 5
temperature = 4.0
alpha = 0.7
prefetch = 4
lease_timeout_secs = 30.0
teacher_timeout_secs = 5.0
{top}
[sync]
every = 5
round_timeout_secs = 10.0
state_every_secs = 0.0
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.002
{members}
"#
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs = Procs(Vec::new());
    let teacher = trained_teacher(&mut procs, d);

    // The uninterrupted run.
    let cfg = config(d, "calm", &teacher);
    let (c, calm_addr) = coordinator(&mut procs, d, &cfg, "127.0.0.1:0", "calm-coordinator.log");
    let w = worker(d, &calm_addr, "calm-worker", RECONNECT);
    let st = wait_with_deadline(w, Duration::from_secs(300), "the calm worker");
    assert!(st.success(), "{}", logs(d));
    assert!(wait_with_deadline(c, Duration::from_secs(60), "the calm coordinator").success());
    let calm = read_report(&d.join("calm"));

    // The same run, with the coordinator killed mid-run and started again on the same port.
    // Held until the test ends: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();
    let cfg = config(d, "chaos", &teacher);
    let (mut c1, _) = coordinator(&mut procs, d, &cfg, &listen, "chaos-coordinator-1.log");
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
    let (c2, _) = coordinator(&mut procs, d, &cfg, &listen, "chaos-coordinator-2.log");
    let st = wait_with_deadline(w, Duration::from_secs(300), "the chaos worker");
    assert!(st.success(), "{}", logs(d));
    assert!(
        wait_with_deadline(c2, Duration::from_secs(60), "the restarted coordinator").success(),
        "{}",
        logs(d)
    );
    let chaos = read_report(&d.join("chaos"));
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
    eprintln!("test errors: uninterrupted {e0}, coordinator killed and resumed {e1}");
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
    let cfg = config(d, "plain", &teacher);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("every = 5\n", "every = 0\n")).unwrap();
    // Held until the test ends: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();
    let (mut c1, _) = coordinator(&mut procs, d, &cfg, &listen, "plain-coordinator-1.log");
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
    let (c2, _) = coordinator(&mut procs, d, &cfg, &listen, "plain-coordinator-2.log");
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

/// What a scenario does a quarter into its run: (processes, coordinator address, the teacher
/// processes t1, t2, u1, the worker, u1's listen address).
type Chaos<'a> = dyn FnMut(&mut Procs, &str, &mut Vec<Proc>, &mut Proc, &str) + 'a;

/// A teacher server process of `model` for `member` on `listen`; returns it and its URL.
fn teacher(
    procs: &mut Procs,
    d: &Path,
    model: &Path,
    member: &str,
    listen: &str,
    log: &str,
) -> (Proc, String) {
    let mut cmd = distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(model)
        .args(["--listen", listen, "--member", member]);
    let addr = start(procs, cmd, &d.join(log));
    (procs.0.pop().unwrap(), format!("http://{addr}"))
}

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

fn member<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["member"] == name))
        .unwrap_or_else(|| panic!("member {name}: {report}"))
}

#[test]
fn teacher_and_worker_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = Dataset::load("synthetic:0").unwrap();
    let (tm, um) = (d.join("t.safetensors"), d.join("u.safetensors"));
    train_teacher(&data, "mlp:784-64-10", 1, &tm);
    train_teacher(&data, "mlp:784-48-10", 2, &um);
    let mut procs = Procs(Vec::new());
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
    let mut run = |name: &str, top: &str, chaos: &mut Chaos| -> serde_json::Value {
        let u_listen = free_port();
        let (t1, t1u) = teacher(
            &mut procs,
            d,
            &tm,
            "t",
            "127.0.0.1:0",
            &format!("{name}-t1.log"),
        );
        let (t2, t2u) = teacher(
            &mut procs,
            d,
            &tm,
            "t",
            "127.0.0.1:0",
            &format!("{name}-t2.log"),
        );
        let (u1, u1u) = teacher(
            &mut procs,
            d,
            &um,
            "u",
            &u_listen,
            &format!("{name}-u1.log"),
        );
        let members = format!(
            "[[members]]\nname = \"t\"\nendpoints = [\"{t1u}\", \"{t2u}\"]\n[[members]]\nname = \"u\"\nendpoints = [\"{u1u}\"]\n"
        );
        let cfg = config_with(d, name, &members, top);
        let (c, addr) = coordinator(
            &mut procs,
            d,
            &cfg,
            "127.0.0.1:0",
            &format!("{name}-coordinator.log"),
        );
        let mut w = worker(d, &addr, &format!("{name}-worker"), RECONNECT);
        let mut teachers = vec![t1, t2, u1];
        chaos(&mut procs, &addr, &mut teachers, &mut w, &u_listen);
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

    let calm = run("calm", "", &mut |_, _, _, _, _| {});
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
    let a = run("replica", "", &mut |_, addr, teachers, _, _| {
        let at = a_quarter_in(addr);
        teachers[1].kill().unwrap();
        let _ = teachers[1].wait();
        not_too_late(&at, "(a)");
    });
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

    // (b) `u`'s only replica dies under `wait`; the run waits, then resumes when it is back.
    let b = run("wait", "", &mut |procs, addr, teachers, _, u_listen| {
        let at = a_quarter_in(addr);
        teachers[2].kill().unwrap();
        let _ = teachers[2].wait();
        not_too_late(&at, "(b)");
        wait_until(Duration::from_secs(60), "member u seen down", || {
            let st = run_status(addr)?;
            (st.members.iter().find(|m| m.member == "u")?.failures >= 1).then_some(())
        });
        let (back, _) = teacher(procs, d, &um, "u", u_listen, "wait-u-again.log");
        teachers[2] = back;
    });
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
        "teacher_policy = \"degrade\"",
        &mut |_, addr, teachers, _, _| {
            let at = a_quarter_in(addr);
            teachers[2].kill().unwrap();
            let _ = teachers[2].wait();
            not_too_late(&at, "(c)");
        },
    );
    assert!(u(&c, "degraded_batches") > 0, "(c): {c}");
    close(&c, "(c) every replica of u killed under degrade");

    // (d) The worker dies and is started again on its work dir.
    let dd = run("worker", "", &mut |_, addr, _, w, _| {
        let at = a_quarter_in(addr);
        w.kill().unwrap();
        let _ = w.wait();
        not_too_late(&at, "(d)");
        *w = worker(d, addr, "worker-worker", RECONNECT);
    });
    assert!(u(&dd, "requeued_batches") > 0, "(d): {dd}");
    close(&dd, "(d) worker killed and restarted");
}
