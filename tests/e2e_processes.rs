//! End to end with real processes on loopback: three teacher servers (member `a` with one
//! replica, member `b` with two), a coordinator and a student worker, each its own process of
//! the built `distill` binary, run a short distillation on the synthetic data set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{Procs, finish, read_report, small_run, static_member, train_teacher, write_config};
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
        let log = format!("teacher-{i}.log");
        let (p, url) = common::teacher(d, &d.join(file), member, "127.0.0.1:0", &log);
        procs.0.push(p);
        endpoints.push(url);
    }
    let mut cfg = small_run("run");
    cfg.epochs = 2;
    cfg.batch_size = 128;
    cfg.seed = 3;
    cfg.members = vec![
        static_member("a", &[&endpoints[0]]),
        static_member("b", &[&endpoints[1], &endpoints[2]]),
    ];
    let cfg = write_config(d, "run", &cfg);
    let (coordinator, coord_addr) = common::coordinator(d, &cfg, "127.0.0.1:0", "coordinator.log");
    let worker = common::worker(d, &coord_addr, "worker", &[]);
    finish(d, coordinator, vec![worker], Duration::from_secs(300));

    let report = read_report(&d.join("run"));
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
