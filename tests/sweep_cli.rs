//! `distill cache fill` then `distill sweep`, as a user runs them: real processes of the built
//! binary, a real teacher server that is killed before the sweep starts (so the sweep can only
//! have trained from the cache), and the files the sweep promises.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{output_within, setup, small_run, static_member, write_config};

const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn a_filled_cache_sweeps_a_grid_with_the_teachers_gone_and_resumes() {
    let mut s = setup();
    let d = s.dir.path();
    let mut cfg = small_run("run");
    cfg.epochs = 1;
    cfg.batch_size = 256;
    cfg.members = vec![static_member("t", &[&s.teacher])];
    cfg.cache = Some(coordinator::cache::CacheConfig {
        dir: "cache".into(),
        mode: coordinator::cache::CacheMode::ReadWrite,
        record: None,
    });
    let cfg_file = write_config(d, "run", &cfg);

    // One teacher pass over the training split, then none on a second fill.
    let fill = |what: &str| {
        let out = output_within(
            common::distill()
                .args(["cache", "fill", "--config"])
                .arg(&cfg_file),
            LIMIT,
            what,
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{what}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let batches = 12_000u64.div_ceil(256);
    let first = fill("the first fill");
    assert!(
        first.starts_with(&format!(
            "{batches} of {batches} batches asked the teachers"
        )),
        "{first}"
    );
    let second = fill("the second fill");
    assert!(
        second.starts_with(&format!("0 of {batches} batches asked the teachers")),
        "{second}"
    );
    let list = output_within(
        common::distill()
            .args(["cache", "list"])
            .arg(d.join("cache")),
        LIMIT,
        "cache list",
    );
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("12000"), "{list}");

    // The teacher is gone: whatever the sweep trains comes from the records.
    s.procs.0.clear();
    let sweep = || {
        output_within(
            common::distill()
                .args(["sweep", "--config"])
                .arg(&cfg_file)
                .args([
                    "--temperatures",
                    "2,8",
                    "--alphas",
                    "0.7",
                    "--parallel",
                    "2",
                ])
                .arg("--out")
                .arg(d.join("sweep")),
            LIMIT,
            "the sweep",
        )
    };
    let out = sweep();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("sweep/sweep.json")).unwrap()).unwrap();
    let results = results.as_array().unwrap();
    let labels: Vec<&str> = results
        .iter()
        .map(|o| o["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["baseline", "t2-a0.7", "t8-a0.7"]);
    for o in results {
        assert_eq!(o["teacher_batches"], 0, "{o}");
        assert_eq!(o["test_size"], 2000, "{o}");
        // Chance is 1800 errors; every configuration learned something.
        assert!(o["test_errors"].as_u64().unwrap() < 1200, "{o}");
        assert!(o["seconds"].as_f64().unwrap() > 0.0, "{o}");
    }
    let table = std::fs::read_to_string(d.join("sweep/table.md")).unwrap();
    assert!(
        table.contains("| 2 |") && table.contains("| 8 |"),
        "{table}"
    );
    assert!(
        table.contains("Batches that asked a teacher during the sweep: 0"),
        "{table}"
    );
    let page = std::fs::read_to_string(d.join("sweep/sweep.html")).unwrap();
    assert!(page.contains("t8-a0.7"), "{page}");
    // The best distilled student is kept, with the config that trained it.
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("sweep/best/outcome.json")).unwrap()).unwrap();
    let fewest = results[1..]
        .iter()
        .map(|o| o["test_errors"].as_u64().unwrap())
        .min()
        .unwrap();
    assert_eq!(best["test_errors"].as_u64().unwrap(), fewest);
    distill_core::checkpoint::Checkpoint::read(&d.join("sweep/best/student.safetensors")).unwrap();
    let best_cfg = coordinator::RunConfig::from_file(&d.join("sweep/best/config.toml")).unwrap();
    assert_eq!(best_cfg.temperature, best["temperature"].as_f64().unwrap());

    // Run again: every configuration is read back, none trained.
    let again = sweep();
    let stdout = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.status.success(), "{stdout}");
    assert_eq!(stdout.matches("(done earlier)").count(), 3, "{stdout}");
}
