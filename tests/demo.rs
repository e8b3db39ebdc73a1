//! The headline: `distill demo`, run as a user runs it (the real binary, its teacher servers,
//! coordinator and worker on loopback), distils a student that beats the same student trained
//! on hard labels alone, leaves the run directory README.md promises, and prints its table and
//! nothing else (no log lines at the default level).
//!
//! The setting is the demo's own (both default teachers, T = 2, alpha = 0.5, 20 student epochs)
//! with the teachers trained 5 epochs instead of 8 to keep the test short; measured here: the
//! distilled student 163-ish test errors against the baseline's 187.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{distill, wait_with_deadline};

/// The distilled student must beat the baseline by at least this many test errors of 2,000
/// (about half the margin measured with this setting).
const MARGIN: u64 = 10;

#[test]
fn the_demo_distils_a_student_that_beats_the_baseline_and_keeps_its_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut cmd = distill();
    cmd.arg("demo")
        .arg("--out")
        .arg(&out)
        .args(["--teacher-epochs", "5"])
        // As a new user runs it: no RUST_LOG.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout.txt")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.txt")).unwrap());
    // Killed at the deadline by `wait_with_deadline`.
    let status = wait_with_deadline(
        cmd.spawn().unwrap(),
        Duration::from_secs(900),
        "distill demo",
    );
    let stdout = std::fs::read_to_string(dir.path().join("stdout.txt")).unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap();
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");

    // The files it promises.
    for f in [
        "teacher-a.safetensors",
        "teacher-b.safetensors",
        "baseline-student.safetensors",
        "student.safetensors",
        "config.toml",
        "metrics.jsonl",
        "evals.jsonl",
        "baseline.jsonl",
        "report.json",
        "report.html",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    for f in [
        "teacher-a.safetensors",
        "baseline-student.safetensors",
        "student.safetensors",
    ] {
        distill_core::checkpoint::Checkpoint::read(&out.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let epochs = metrics
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    assert!(epochs >= 20, "{epochs} lines in metrics.jsonl:\n{metrics}");

    // The headline: distilled beats the baseline, and the table says what the report says.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let n = |k: &str| common::count(&report, k);
    let (distilled, baseline) = (n("student_test_errors"), n("baseline_student_test_errors"));
    assert_eq!(n("test_size"), 2000);
    assert_eq!(n("batches_trained"), n("batches_expected"));
    assert!(
        distilled + MARGIN <= baseline,
        "distilled {distilled} vs baseline {baseline} test errors (margin {MARGIN})\n{stdout}"
    );
    let row = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{stdout}"));
        line.split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad row `{line}`"))
    };
    // The page: every epoch of the distilled student (scored on the average that closed it)
    // and of the baseline, drawn as lines; the table's figures; the report's path printed.
    for f in ["evals.jsonl", "baseline.jsonl"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert_eq!(text.lines().count(), 20, "{f}:\n{text}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let figure = |caption: &str| -> &str {
        html.split("<figure>")
            .find(|f| f.contains(caption))
            .unwrap_or_else(|| panic!("no `{caption}` figure in report.html"))
    };
    // A marker per point: 20 epochs of each.
    assert_eq!(
        figure("Test errors per epoch").matches("<circle").count(),
        40
    );
    assert_eq!(
        figure("Training loss per epoch").matches("<circle").count(),
        40
    );
    assert_eq!(
        figure("Training samples per second")
            .matches("<circle")
            .count(),
        20
    );
    assert!(html.contains(&format!("<td>{distilled}</td>")), "{html}");
    assert!(html.contains(&format!("<td>{baseline}</td>")));
    assert!(
        stdout.contains(&format!("report: {}", out.join("report.html").display())),
        "{stdout}"
    );
    // `distill report` draws it again, and compares runs on one page.
    std::fs::remove_file(out.join("report.html")).unwrap();
    let again = distill().arg("report").arg(&out).output().unwrap();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        out.join("report.html").display().to_string()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("report.html")).unwrap(),
        html
    );
    let compare = dir.path().join("compare.html");
    let both = distill()
        .arg("report")
        .args([&out, &out])
        .arg("--out")
        .arg(&compare)
        .output()
        .unwrap();
    assert!(both.status.success(), "{both:?}");
    let page = std::fs::read_to_string(&compare).unwrap();
    assert!(page.contains("2 runs compared"));
    let missing = distill()
        .arg("report")
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("nowhere") && err.contains("not a directory"),
        "{err}"
    );
    assert_eq!(row("distilled student"), distilled, "{stdout}");
    assert_eq!(row("baseline student"), baseline, "{stdout}");
    // Quiet by default: progress bars (drawn only on a terminal, so none here) and the table,
    // not a wall of log lines. What it prints: the run directory, a line per teacher and one
    // for the baseline, the table (title, header, 2 teachers, ensemble, baseline, distilled),
    // the throughput and sync lines, the report's path and the total time, with 2 blank lines.
    assert_eq!(stderr.lines().count(), 0, "stderr:\n{stderr}");
    assert!(
        stdout.lines().count() <= 17,
        "{} stdout lines:\n{stdout}",
        stdout.lines().count()
    );
}
