//! End to end with real processes on loopback: three teacher servers (member `a` with one
//! replica, member `b` with two), a coordinator and a student worker, each its own process of
//! the built `distill` binary, run a short distillation on the synthetic data set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Procs, distill, start, train_teacher, wait_with_deadline};
use distill_core::data::Dataset;

#[test]
fn three_roles_as_processes_distill_a_student() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("a.safetensors"));
    train_teacher(&data, "mlp:784-48-48-10", 2, &d.join("b.safetensors"));

    let mut procs = Procs(Vec::new());
    let mut endpoints = Vec::new();
    for (i, (member, file)) in [
        ("a", "a.safetensors"),
        ("b", "b.safetensors"),
        ("b", "b.safetensors"),
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = distill();
        cmd.arg("teacher-server")
            .arg("--model")
            .arg(d.join(file))
            .args(["--listen", "127.0.0.1:0", "--member", member]);
        let addr = start(&mut procs, cmd, &d.join(format!("teacher-{i}.log")));
        endpoints.push(format!("http://{addr}"));
    }
    let config = format!(
        r#"
data = "synthetic:0"
run_dir = "run"
epochs = 2
batch_size = 128
seed = 3
temperature = 4.0
alpha = 0.7
prefetch = 4
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.002
[[members]]
name = "a"
endpoints = ["{}"]
[[members]]
name = "b"
endpoints = ["{}", "{}"]
"#,
        endpoints[0], endpoints[1], endpoints[2]
    );
    std::fs::write(d.join("run.toml"), config).unwrap();
    let mut cmd = distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(d.join("run.toml"))
        .args(["--listen", "127.0.0.1:0"]);
    let coord_addr = start(&mut procs, cmd, &d.join("coordinator.log"));
    let coordinator = procs.0.pop().unwrap();

    let worker = distill()
        .arg("student-worker")
        .args(["--coordinator", &format!("http://{coord_addr}")])
        .arg("--work-dir")
        .arg(d.join("worker"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let ws = wait_with_deadline(worker, Duration::from_secs(300), "the student worker");
    let log = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
    assert!(
        ws.success(),
        "worker failed: {ws:?}\n{}\n{}",
        log("worker.log"),
        log("coordinator.log")
    );
    let cs = wait_with_deadline(coordinator, Duration::from_secs(60), "the coordinator");
    assert!(
        cs.success(),
        "coordinator failed: {cs:?}\n{}",
        log("coordinator.log")
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/report.json")).unwrap()).unwrap();
    let n = |k: &str| common::count(&report, k);
    assert_eq!(n("batches_trained"), n("batches_expected"));
    assert_eq!(n("batches_expected"), 2 * 12_000u64.div_ceil(128));
    assert_eq!(n("test_size"), 2000);
    // Chance is 90% errors; the student must have learned.
    assert!(n("student_test_errors") < 2000 * 4 / 10, "{report}");
    let teachers = report["teachers"].as_array().unwrap();
    assert_eq!(teachers.len(), 2);
    // Both members answered every batch: the report counts their requests, and both replicas
    // of `b` took a share of its load.
    for m in report["members"].as_array().unwrap() {
        let requests = m["requests"].as_u64().unwrap();
        assert!(requests >= n("batches_expected"), "{m}");
        let by = m["answered_by"].as_object().unwrap();
        let shares: Vec<u64> = by.values().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(shares.iter().sum::<u64>(), requests, "{m}");
        let replicas = if m["member"] == "b" { 2 } else { 1 };
        assert_eq!(shares.len(), replicas, "{m}");
        assert!(shares.iter().all(|&k| k > 0), "{m}");
    }
    // The final student was kept in the run directory and loads.
    distill_core::checkpoint::Checkpoint::read(&d.join("run/student.safetensors")).unwrap();
    assert!(d.join("run/config.toml").exists());
    assert!(d.join("run/metrics.jsonl").exists());
}
