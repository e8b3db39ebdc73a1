//! `distill demo --lm`, run as a user runs it (the real binary; its teacher server on
//! loopback, the coordinator and a student worker in-process): the student distilled from the
//! teacher's top-k rows has a lower validation perplexity and a higher top-1 agreement than the
//! same student on the next tokens alone, the epochs after the first are answered by the
//! soft-target cache, and the three models it saves load with the tokenizer they were trained
//! with.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{distill, wait_with_deadline};
use distill_core::lm::LanguageModel;

#[test]
fn the_lm_demo_distils_a_student_that_beats_hard_labels_and_saves_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo-lm");
    let mut cmd = distill();
    cmd.arg("demo")
        .arg("--lm")
        .arg("--out")
        .arg(&out)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout.txt")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.txt")).unwrap());
    let status = wait_with_deadline(
        cmd.spawn().unwrap(),
        Duration::from_secs(600),
        "distill demo --lm",
    );
    let stdout = std::fs::read_to_string(dir.path().join("stdout.txt")).unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap();
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "log lines at the default level:\n{stderr}"
    );
    assert!(
        stdout.contains("distilled / baseline perplexity"),
        "{stdout}"
    );

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lm-report.json")).unwrap())
            .unwrap();
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert!(
        f("teacher_perplexity") < f("baseline_perplexity"),
        "the teacher is better than a student: {r}"
    );
    assert!(
        f("distilled_perplexity") < 0.95 * f("baseline_perplexity"),
        "distillation beats hard labels by 5% or more: {r}"
    );
    assert!(
        f("distilled_agreement") > f("baseline_agreement") + 0.1,
        "{r}"
    );
    let per_epoch: Vec<u64> = r["teacher_requests_per_epoch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(per_epoch.len() >= 3 && per_epoch[0] > 0, "{r}");
    // The second epoch's first batches are prepared while the first epoch's last rows are
    // still being asked (up to the prefetch of 8); from then on the cache answers.
    assert!(per_epoch[1] <= 8, "{r}");
    assert!(
        per_epoch[2..].iter().all(|&n| n == 0),
        "the rows of the first epoch are reused: {r}"
    );
    // k = 64 over 218 words: 4 + 64 × (2 + 2) bytes per position.
    assert_eq!(f("bytes_per_token"), 260.0, "{r}");

    let teacher = LanguageModel::load(&out.join("teacher"), &candle_core::Device::Cpu).unwrap();
    assert!(!teacher.tokenizer_digest.is_empty());
    for student in ["student", "baseline-student"] {
        let s = LanguageModel::load(&out.join(student), &candle_core::Device::Cpu).unwrap();
        assert_eq!(s.tokenizer_digest, teacher.tokenizer_digest, "{student}");
        assert_ne!(s.digest, teacher.digest, "{student}");
    }
}
