//! Registered teachers as real processes (`teacher-server --register`), against a real
//! coordinator process that is killed and started again.
//!
//! `registered_teachers_expire_when_killed_and_register_again_with_a_restarted_coordinator`: member
//! `b` has no static endpoint, so the run can train only on replicas that registered. Two teacher
//! processes register as `b`; one is killed with SIGKILL, and the coordinator's own lease ticker
//! removes it when its lease runs out (no heartbeat, no deregistration). Then the coordinator is
//! killed mid-run and started again on the same port, knowing nobody: the surviving teacher
//! registers with it by itself, the worker joins again, and the run resumes and completes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Proc, Procs, distill, logs, read_report, reserve_port, resumable_run, run_status, start,
    static_member, train_teacher, wait_until, wait_with_deadline, worker, write_config,
};
use distill_core::data::Dataset;

/// The registered replicas' lease: short, so that the killed one expires soon.
const LEASE_TTL_SECS: f64 = 2.0;

fn config(d: &Path) -> std::path::PathBuf {
    let mut cfg = resumable_run("run");
    cfg.epochs = 4;
    cfg.seed = 5;
    cfg.membership.lease_ttl_secs = LEASE_TTL_SECS;
    cfg.membership.heartbeat_secs = 0.3;
    cfg.members = vec![static_member("b", &[])];
    write_config(d, "run", &cfg)
}

fn coordinator(d: &Path, listen: &str, log: &str) -> Proc {
    common::coordinator(d, &config(d), listen, log).0
}

/// Starts a teacher server of member `b` that registers with the coordinator at `coordinator`;
/// returns its address (the process is the last in `procs`).
fn registered_teacher(procs: &mut Procs, d: &Path, coordinator: &str, log: &str) -> String {
    let mut cmd = distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(d.join("teacher.safetensors"))
        .args(["--listen", "127.0.0.1:0", "--member", "b"])
        .args(["--register", &format!("http://{coordinator}")]);
    start(procs, cmd, &d.join(log))
}

#[test]
fn registered_teachers_expire_when_killed_and_register_again_with_a_restarted_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("teacher.safetensors"));
    let mut procs = Procs(Vec::new());
    // Held until the end: nothing else can take the port between the kill and the restart.
    let port = reserve_port();
    let listen = port.addr.to_string();

    let mut c1 = coordinator(d, &listen, "coordinator-1.log");
    let survivor = registered_teacher(&mut procs, d, &listen, "teacher-1.log");
    let victim = registered_teacher(&mut procs, d, &listen, "teacher-2.log");
    let victim_proc = procs.0.len() - 1;
    let w = worker(d, &listen, "w", &["--connect-timeout-s", "60"]);
    procs.0.push(w);
    let w_proc = procs.0.len() - 1;

    // Batches train: only the registered replicas can have served them.
    wait_until(
        Duration::from_secs(120),
        "training on registered replicas",
        || {
            let st = run_status(&listen)?;
            (st.batches_trained * 10 >= st.batches_expected).then_some(())
        },
    );

    // SIGKILL one teacher: no deregistration; the lease ticker removes it at the TTL.
    procs.0[victim_proc].kill().unwrap();
    let _ = procs.0[victim_proc].wait();
    let c1_log = d.join("coordinator-1.log");
    wait_until(
        Duration::from_secs(60),
        "the killed replica's lease expiring",
        || {
            let log = std::fs::read_to_string(&c1_log).ok()?;
            log.lines()
                .any(|l| {
                    l.contains("teacher replica removed")
                        && l.contains("reason=Expired")
                        && l.contains(&victim)
                })
                .then_some(())
        },
    );
    let before_kill = run_status(&listen).expect("the first coordinator answers");
    assert!(
        before_kill.batches_trained * 10 < before_kill.batches_expected * 7,
        "the coordinator kill would come too late: {} of {}",
        before_kill.batches_trained,
        before_kill.batches_expected
    );

    // SIGKILL the coordinator and start it again on the same port: it knows no replica until
    // the surviving teacher registers again by itself.
    c1.kill().unwrap();
    let _ = c1.wait();
    let c2 = coordinator(d, &listen, "coordinator-2.log");
    let w = procs.0.remove(w_proc);
    let st = wait_with_deadline(w, Duration::from_secs(300), "the student worker");
    assert!(st.success(), "worker: {st:?}\n{}", logs(d));
    let st = wait_with_deadline(c2, Duration::from_secs(60), "the second coordinator");
    assert!(st.success(), "coordinator: {st:?}\n{}", logs(d));

    let r = read_report(&d.join("run"));
    let n = |k: &str| common::count(&r, k);
    assert_eq!(n("resumes"), 1, "{r}");
    assert_eq!(n("batches_trained"), n("batches_expected"), "{r}");
    assert_eq!(n("degraded_batches"), 0, "{r}");
    // After the restart only the survivor answered (the report covers the second coordinator).
    let b = &r["members"][0];
    let by = b["answered_by"].as_object().unwrap();
    let addresses: Vec<&String> = by.keys().collect();
    assert_eq!(addresses.len(), 1, "{b}");
    assert!(
        addresses[0].contains(&survivor),
        "{b} (survivor {survivor})"
    );
    assert!(by.values().all(|v| v.as_u64().unwrap() > 0), "{b}");
    assert!(n("student_test_errors") < 2000 * 3 / 10, "{r}");
}
