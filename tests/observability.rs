//! What operators watch, on real processes:
//! - `--log-format json` (or `DISTILL_LOG_FORMAT=json`): every line a role writes to stderr is
//!   one JSON object with the timestamp, level, target and the event's fields, for log
//!   collectors; a batch's events carry the `batch` span's fields on the coordinator and on
//!   the worker that trained it.
//! - `--metrics-listen`: each role serves its Prometheus series, and they move during a run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::{Procs, small_run, static_member, wait_until, write_config};
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
    // Right after `listening on`: the signal handlers are installed before that line.
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

/// The parsed JSON lines of the log file `path` (empty while it has none).
fn json_file(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line being written may be incomplete: only whole lines count.
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    if whole.is_empty() {
        return Vec::new();
    }
    json_lines(whole, &path.display().to_string())
}

/// The address in a role's `metrics on http://ADDR/metrics` log line, once it is written.
fn metrics_addr(log: &Path) -> String {
    wait_until(Duration::from_secs(60), "a `metrics on` log line", || {
        json_file(log).iter().find_map(|v| {
            let m = v["fields"]["message"].as_str()?;
            m.starts_with("metrics on ")
                .then(|| v["fields"]["addr"].as_str().map(str::to_string))?
        })
    })
}

/// `GET /metrics` from `addr`: the body, or None when nothing answers (the role has exited).
fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(body.to_string())
}

/// The sum of every sample of series `name` (all label sets); None when it is absent.
fn value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        if metric == name {
            *found.get_or_insert(0.0) += v.parse::<f64>().unwrap();
        }
    }
    found
}

/// Scrapes `addr` until series `name` exceeds `above`; returns that scrape.
fn scrape_until_above(addr: &str, name: &str, above: f64) -> String {
    let limit = Duration::from_secs(120);
    let end = std::time::Instant::now() + limit;
    loop {
        let t = scrape(addr);
        if let Some(t) = t
            .as_ref()
            .filter(|t| value(t, name).is_some_and(|v| v > above))
        {
            return t.clone();
        }
        assert!(
            std::time::Instant::now() < end,
            "{name} > {above} at {addr}: not within {limit:?}; the last scrape: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_run_logs_batch_spans_as_json_and_its_metrics_move() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = distill_core::data::Dataset::load("synthetic:0").unwrap();
    common::train_teacher(&data, "mlp:784-64-10", 1, &d.join("t.safetensors"));
    let json = |c: &mut std::process::Command| {
        c.env("DISTILL_LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                "info,coordinator::driver::batch=debug,student_worker::trainer=debug",
            )
            .args(["--metrics-listen", "127.0.0.1:0"]);
    };

    let mut procs = Procs(Vec::new());
    let mut cmd = common::distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(d.join("t.safetensors"))
        // Slow enough that the run lasts several scrapes.
        .args(["--listen", "127.0.0.1:0", "--member", "t"])
        .args(["--simulate-latency-ms", "15"]);
    json(&mut cmd);
    let teacher = format!(
        "http://{}",
        common::start(&mut procs, cmd, &d.join("teacher.log"))
    );
    let teacher_metrics = metrics_addr(&d.join("teacher.log"));
    let before = scrape(&teacher_metrics).unwrap();
    assert_eq!(
        value(&before, "distill_teacher_requests_total"),
        None,
        "{before}"
    );

    let mut cfg = small_run("run");
    cfg.epochs = 2;
    cfg.members = vec![static_member("t", &[&teacher])];
    let cfg = write_config(d, "run", &cfg);
    let mut cmd = common::distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"]);
    json(&mut cmd);
    let (coordinator, coord) = common::spawn_server(cmd, &d.join("coordinator.log"));
    let coord_metrics = metrics_addr(&d.join("coordinator.log"));
    let mut cmd = common::distill();
    cmd.arg("student-worker")
        .args(["--coordinator", &format!("http://{coord}")])
        .args(["--worker-id", "w1", "--work-dir"])
        .arg(d.join("w1"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.join("w1.log")).unwrap());
    json(&mut cmd);
    let worker: common::Proc = cmd.spawn().unwrap().into();
    let worker_metrics = metrics_addr(&d.join("w1.log"));

    // During the run: each role's series grow from one scrape to a later one.
    let early = scrape_until_above(
        &coord_metrics,
        "distill_coordinator_batches_acked_total",
        0.0,
    );
    let acked = value(&early, "distill_coordinator_batches_acked_total").unwrap();
    let later = scrape_until_above(
        &coord_metrics,
        "distill_coordinator_batches_acked_total",
        acked,
    );
    for name in [
        "distill_coordinator_batches_leased_total",
        "distill_coordinator_member_request_seconds_count",
        "distill_coordinator_member_requests_total",
    ] {
        let (a, b) = (value(&early, name), value(&later, name));
        assert!(a.is_some() && b > a, "{name}: {a:?} then {b:?}\n{later}");
    }
    for name in [
        "distill_coordinator_replicas",
        "distill_coordinator_member_failures_total",
        "distill_coordinator_hedges_total",
        "distill_coordinator_batches_requeued_total",
        "distill_coordinator_degraded_batches_total",
        "distill_coordinator_rounds_total",
        "distill_coordinator_student_wait_seconds_total",
        "distill_coordinator_prefetch_depth",
    ] {
        assert!(value(&later, name).is_some(), "no {name} in\n{later}");
    }
    assert_eq!(value(&later, "distill_coordinator_replicas"), Some(1.0));
    let w1 = scrape_until_above(&worker_metrics, "distill_worker_samples_total", 0.0);
    let samples = value(&w1, "distill_worker_samples_total").unwrap();
    let w2 = scrape_until_above(&worker_metrics, "distill_worker_samples_total", samples);
    for name in [
        "distill_worker_batches_total",
        "distill_worker_step_seconds_count",
    ] {
        let (a, b) = (value(&w1, name), value(&w2, name));
        assert!(a.is_some() && b > a, "{name}: {a:?} then {b:?}\n{w2}");
    }
    for name in ["distill_worker_loss", "distill_worker_wait_seconds_total"] {
        assert!(value(&w2, name).is_some(), "no {name} in\n{w2}");
    }
    common::finish(d, coordinator, vec![worker], Duration::from_secs(300));

    let after = scrape(&teacher_metrics).unwrap();
    let requests = value(&after, "distill_teacher_requests_total").unwrap();
    // At least one request per batch: two epochs of 12,000 rows in batches of 64.
    assert!(requests >= 2.0 * 188.0, "{after}");
    assert!(
        value(&after, "distill_teacher_rows_total").unwrap() >= 24_000.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "distill_teacher_request_seconds_count"),
        value(&after, "distill_teacher_requests_total"),
        "every request was answered: {after}"
    );
    assert!(
        value(&after, "distill_teacher_batch_rows_count").unwrap() >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, "distill_teacher_queue_depth").is_some(),
        "{after}"
    );

    // The logs: every line JSON, and a batch followed by its lease from the coordinator's
    // `batch` span to the worker's.
    let leases = |log: &str, message: &str| -> BTreeSet<u64> {
        let lines = json_file(&d.join(log));
        let mut out = BTreeSet::new();
        for v in lines.iter().filter(|v| v["fields"]["message"] == message) {
            let span = &v["span"];
            assert_eq!(span["name"], "batch", "{log}: {v}");
            assert!(span["epoch"].is_u64(), "{log}: {v}");
            out.insert(span["lease"].as_u64().unwrap());
        }
        out
    };
    let prepared = leases("coordinator.log", "batch prepared");
    let trained = leases("w1.log", "trained");
    assert!(!trained.is_empty());
    assert!(
        trained.is_subset(&prepared),
        "leases trained but never prepared: {:?}",
        trained.difference(&prepared).collect::<Vec<_>>()
    );
    let coordinator_log = json_file(&d.join("coordinator.log"));
    let one = coordinator_log
        .iter()
        .find(|v| v["fields"]["message"] == "batch prepared")
        .unwrap();
    assert!(one["span"]["index"].is_u64(), "{one}");
    assert!(one["fields"]["rows"].is_u64(), "{one}");
}

/// The total of `distill_teacher_requests_total` at a teacher's metrics endpoint (0 before
/// its first request).
fn teacher_requests(metrics: &str) -> f64 {
    let text = scrape(metrics).expect("the teacher's metrics endpoint answers");
    value(&text, "distill_teacher_requests_total").unwrap_or(0.0)
}

/// Writes `text` to `path` as a whole (what a reader sees is the old file or the new one).
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn replicas_behind_a_dns_name_join_and_leave_as_its_addresses_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = distill_core::data::Dataset::load("synthetic:0").unwrap();
    common::train_teacher(&data, "mlp:784-64-10", 1, &d.join("t.safetensors"));
    // One port on three loopback addresses, as a headless Service's pods share theirs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut procs = Procs(Vec::new());
    let mut metrics = Vec::new();
    for host in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let log = d.join(format!("teacher-{host}.log"));
        let mut cmd = common::distill();
        cmd.env("DISTILL_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .arg("teacher-server")
            .arg("--model")
            .arg(d.join("t.safetensors"))
            .args(["--listen", &format!("{host}:{port}"), "--member", "t"])
            .args([
                "--simulate-latency-ms",
                "20",
                "--metrics-listen",
                "127.0.0.1:0",
            ]);
        common::start(&mut procs, cmd, &log);
        metrics.push(metrics_addr(&log));
    }
    let hosts = d.join("hosts");
    replace_file(&hosts, "127.0.0.2 teachers.test\n127.0.0.3 teachers.test\n");

    let mut cfg = small_run("run");
    cfg.epochs = 8;
    cfg.members = vec![static_member(
        "t",
        &[&format!("dns://teachers.test:{port}")],
    )];
    cfg.membership.dns_hosts_file = Some(hosts.clone());
    cfg.membership.dns_refresh_secs = 0.2;
    let cfg = write_config(d, "run", &cfg);
    let (coordinator, coord) = common::coordinator(d, &cfg, "127.0.0.1:0", "coordinator.log");
    let worker = common::worker(d, &coord, "w1", &[]);

    // The name's two addresses both serve; the third is not asked.
    for m in &metrics[..2] {
        wait_until(Duration::from_secs(120), "both replicas answer", || {
            (teacher_requests(m) > 0.0).then_some(())
        });
    }
    assert_eq!(teacher_requests(&metrics[2]), 0.0);

    // The name moves from .2 to .4: .4 joins, .2 leaves and is asked nothing more.
    replace_file(&hosts, "127.0.0.3 teachers.test\n127.0.0.4 teachers.test\n");
    wait_until(Duration::from_secs(120), "the new replica answers", || {
        (teacher_requests(&metrics[2]) > 0.0).then_some(())
    });
    // A request sent to .2 before the change may still be answered (the counter moves on
    // completion): sample .2 only once it holds nothing in flight and .4 has answered more.
    let joined_at = teacher_requests(&metrics[2]);
    wait_until(Duration::from_secs(120), "the old replica drains", || {
        let drained =
            scrape(&metrics[0]).and_then(|t| value(&t, "distill_teacher_queue_depth")) == Some(0.0);
        (drained && teacher_requests(&metrics[2]) >= joined_at + 5.0).then_some(())
    });
    let left_at = teacher_requests(&metrics[0]);
    let joined_at = teacher_requests(&metrics[2]);
    wait_until(
        Duration::from_secs(120),
        "the new replica keeps answering",
        || (teacher_requests(&metrics[2]) >= joined_at + 20.0).then_some(()),
    );
    assert_eq!(
        teacher_requests(&metrics[0]),
        left_at,
        "the replica that left the name was asked again"
    );
    assert!(
        common::run_status(&coord).is_some_and(|s| !s.done),
        "the run outlasted the changes (raise its epochs if this fails)"
    );
    common::finish(d, coordinator, vec![worker], Duration::from_secs(300));

    let report = common::read_report(&d.join("run"));
    let by = report["members"][0]["answered_by"].as_object().unwrap();
    let mut who: Vec<&String> = by.keys().collect();
    who.sort();
    let want: Vec<String> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|h| format!("http://{h}:{port}"))
        .collect();
    assert_eq!(who, want.iter().collect::<Vec<_>>(), "{report}");
}
