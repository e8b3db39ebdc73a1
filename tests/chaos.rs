//! Chaos (issue 6), with real processes on loopback killed with SIGKILL mid-run.
//!
//! - `killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run`: the coordinator is
//!   killed while the run is between 25% and 75% trained and started again on the same run
//!   directory and port; the worker joins again by itself, the run resumes from the stored state
//!   (`resumes = 1`) and completes with every batch trained, and the student is as good as an
//!   uninterrupted run's with the same seed (tolerance below).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{
    Procs, distill, read_report, run_status, start, train_teacher, wait_until, wait_with_deadline,
};
use distill_core::data::Dataset;

/// Test errors (of 2000) the resumed student may have beyond 1.25 × the uninterrupted one's.
const EXTRA_ERRORS: u64 = 40;

fn config(d: &Path, name: &str, teacher: &str) -> std::path::PathBuf {
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
[sync]
every = 5
round_timeout_secs = 10.0
state_every_secs = 0.0
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.002
[[members]]
name = "t"
endpoints = ["{teacher}"]
"#
        ),
    )
    .unwrap();
    cfg
}

/// Starts a coordinator; returns it and the address it listens on.
fn coordinator(
    procs: &mut Procs,
    d: &Path,
    cfg: &Path,
    listen: &str,
    log: &str,
) -> (Child, String) {
    let mut cmd = distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(cfg)
        .args(["--listen", listen]);
    let addr = start(procs, cmd, &d.join(log));
    (procs.0.pop().unwrap(), addr)
}

fn worker(d: &Path, addr: &str, id: &str) -> Child {
    distill()
        .arg("student-worker")
        .args(["--coordinator", &format!("http://{addr}")])
        .args(["--worker-id", id, "--connect-timeout-s", "60"])
        .arg("--work-dir")
        .arg(d.join(id))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join(format!("{id}.log"))).unwrap())
        .spawn()
        .unwrap()
}

fn logs(d: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out += &format!(
                "--- {}\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
    out
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"))
}

#[test]
fn killing_the_coordinator_mid_epoch_and_restarting_it_resumes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("teacher.safetensors"));
    let mut procs = Procs(Vec::new());
    let mut cmd = distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(d.join("teacher.safetensors"))
        .args(["--listen", "127.0.0.1:0", "--member", "t"]);
    let teacher = format!("http://{}", start(&mut procs, cmd, &d.join("teacher.log")));

    // The uninterrupted run.
    let cfg = config(d, "calm", &teacher);
    let (c, calm_addr) = coordinator(&mut procs, d, &cfg, "127.0.0.1:0", "calm-coordinator.log");
    let w = worker(d, &calm_addr, "calm-worker");
    let st = wait_with_deadline(w, Duration::from_secs(300), "the calm worker");
    assert!(st.success(), "{}", logs(d));
    assert!(wait_with_deadline(c, Duration::from_secs(60), "the calm coordinator").success());
    let calm = read_report(&d.join("calm"));

    // The same run, with the coordinator killed mid-run and started again on the same port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let listen = port.to_string();
    let cfg = config(d, "chaos", &teacher);
    let (mut c1, _) = coordinator(&mut procs, d, &cfg, &listen, "chaos-coordinator-1.log");
    let w = worker(d, &listen, "chaos-worker");
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
