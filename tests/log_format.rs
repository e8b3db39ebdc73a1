//! `--log-format json` (or `DISTILL_LOG_FORMAT=json`): every line a role writes to stderr is
//! one JSON object with the timestamp, level, target and the event's fields, for log
//! collectors. Checked on real processes: a teacher server from start to SIGTERM, and `train`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use serde_json::Value;

/// Every line of `text` parsed as a JSON object with `timestamp`, `level`, `target` and
/// `fields.message`.
fn json_lines(text: &str, what: &str) -> Vec<Value> {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l}"));
            for key in ["timestamp", "level", "target"] {
                assert!(v[key].is_string(), "{what}: no `{key}` in {l}");
            }
            assert!(
                v["fields"]["message"].is_string(),
                "{what}: no message in {l}"
            );
            v
        })
        .collect();
    assert!(!lines.is_empty(), "{what}: no log lines");
    lines
}

/// The first line whose message is `message`.
fn find<'a>(lines: &'a [Value], message: &str, what: &str) -> &'a Value {
    lines
        .iter()
        .find(|v| v["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("{what}: no `{message}` line in {lines:?}"))
}

#[test]
fn every_log_line_is_a_json_object_with_the_events_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // `train --log-format json`: the flag.
    let out = common::output_within(
        common::distill()
            .env("RUST_LOG", "info")
            .args(["train", "--log-format", "json", "--data", "synthetic:0"])
            .args(["--arch", "mlp:784-16-10", "--epochs", "1", "--out"])
            .arg(d.join("t.safetensors")),
        Duration::from_secs(120),
        "distill train",
    );
    assert!(out.status.success(), "{out:?}");
    let train = json_lines(&String::from_utf8_lossy(&out.stderr), "train");
    let training = find(&train, "training", "train");
    assert_eq!(training["fields"]["arch"], "mlp:784-16-10");
    assert_eq!(training["level"], "INFO");

    // A teacher server, from start to a SIGTERM: the environment variable.
    let mut cmd = common::distill();
    cmd.env("RUST_LOG", "info")
        .env("DISTILL_LOG_FORMAT", "json")
        .arg("teacher-server")
        .arg("--model")
        .arg(d.join("t.safetensors"))
        .args(["--listen", "127.0.0.1:0", "--member", "t"]);
    let (mut p, _addr) = common::spawn_server(cmd, &d.join("teacher.log"));
    common::signal(p.id(), "-TERM");
    let st = p.wait_within(Duration::from_secs(60), "the teacher server");
    assert!(st.success(), "{st:?}");
    let log = std::fs::read_to_string(d.join("teacher.log")).unwrap();
    let teacher = json_lines(&log, "teacher-server");
    assert_eq!(
        find(&teacher, "teacher serving", "teacher-server")["fields"]["member"],
        "t"
    );
    find(&teacher, "teacher server stopped", "teacher-server");
}
