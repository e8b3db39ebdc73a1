//! The `distill` binary and devices: `--device cuda:0` in a build without CUDA is a clear error
//! naming the device (not a panic), `gpu-smoke` says CUDA is unavailable and its CPU-vs-CPU
//! self-test passes, and `train --precision bf16` trains. No GPU, network or ../shared needed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Longest any one `distill` command here may run (the slowest, gpu-smoke's self-test, takes
/// seconds).
const DEADLINE: Duration = Duration::from_secs(300);

/// Runs `distill ARGS` in `cwd` to completion, or panics (killing it) after [`DEADLINE`].
fn distill(args: &[&str], cwd: &Path) -> Output {
    common::output_within(
        Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "warn")
            .env("RAYON_NUM_THREADS", "2"),
        DEADLINE,
        &format!("`distill {}`", args.join(" ")),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A failed run: non-zero exit, the device named on stderr, no panic.
fn assert_device_error(out: &Output, what: &str) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{what}: exit 0\n{err}");
    assert_eq!(out.status.code(), Some(1), "{what}: exit code\n{err}");
    assert!(!err.contains("panicked"), "{what}: panicked\n{err}");
    assert!(err.contains("`cuda:0`"), "{what}: device not named\n{err}");
    #[cfg(not(feature = "cuda"))]
    assert!(
        err.contains("built without the `cuda` feature"),
        "{what}: reason not given\n{err}"
    );
    err
}

#[test]
fn model_commands_on_cuda_fail_clearly_without_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let out = distill(
        &[
            "train",
            "--data",
            "synthetic",
            "--arch",
            "mlp:784-16-10",
            "--epochs",
            "1",
            "--out",
            "m.safetensors",
            "--device",
            "cuda:0",
        ],
        dir.path(),
    );
    assert_device_error(&out, "train");
    assert!(!dir.path().join("m.safetensors").exists());

    let out = distill(
        &[
            "eval",
            "--model",
            "missing.safetensors",
            "--data",
            "synthetic",
            "--device",
            "cuda:0",
        ],
        dir.path(),
    );
    assert_device_error(&out, "eval");

    let out = distill(
        &[
            "teacher-server",
            "--model",
            "missing.safetensors",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cuda:0",
        ],
        dir.path(),
    );
    assert_device_error(&out, "teacher-server");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_smoke_says_cuda_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let out = distill(&["gpu-smoke"], dir.path());
    let err = assert_device_error(&out, "gpu-smoke");
    assert!(err.contains("CUDA is unavailable"), "{err}");
    assert!(
        err.contains("--device cpu"),
        "the self-test is not mentioned\n{err}"
    );
}

/// The whole command, CPU against CPU, at toy sizes: every check passes and the figures land
/// in gpu-smoke.json.
#[test]
fn gpu_smoke_cpu_self_test_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = distill(
        &[
            "gpu-smoke",
            "--device",
            "cpu",
            "--out",
            "smoke",
            "--teacher",
            "mlp:784-32-10",
            "--conv",
            "conv:2-4-8-10",
            "--student",
            "mlp:784-16-10",
            "--epochs",
            "2",
            "--batch",
            "256",
            "--bench-arch",
            "mlp:784-32-10",
            "--bench-batch",
            "64",
            "--bench-seconds",
            "0.1",
        ],
        dir.path(),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CPU-vs-CPU self-test"), "{stdout}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("smoke/gpu-smoke.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["checks_failed"], serde_json::json!([]), "{report}");
    let curve = report["loss_curves"]["cpu"].as_array().unwrap();
    assert_eq!(curve.len(), 2, "{report}");
    assert_eq!(report["loss_curves"]["device"].as_array().unwrap().len(), 2);
    for row in report["logits"].as_array().unwrap() {
        assert_eq!(row["ok"], true, "{row}");
    }
    let bench = report["throughput"]["in_process"].as_array().unwrap();
    assert_eq!(bench.len(), 2, "f32 and bf16 rows: {report}");
    assert!(bench[1]["cpu_samples_per_s"].as_f64().unwrap() > 0.0);
}

/// `--precision bf16`: the loss falls, the model scores well, the report says bf16 and the
/// checkpoint is the usual f32 one.
#[test]
fn train_with_bf16_precision() {
    let dir = tempfile::tempdir().unwrap();
    let out = distill(
        &[
            "train",
            "--data",
            "synthetic",
            "--arch",
            "mlp:784-32-10",
            "--optimizer",
            "adamw",
            "--epochs",
            "2",
            "--eval-final-only",
            "--precision",
            "bf16",
            "--out",
            "m.safetensors",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("m.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["precision"], "bf16");
    let epochs = report["epochs"].as_array().unwrap();
    let loss = |i: usize| epochs[i]["loss"].as_f64().unwrap();
    assert!(loss(1) < loss(0), "loss {} -> {}", loss(0), loss(1));
    assert!(report["test_accuracy"].as_f64().unwrap() > 0.5, "{report}");

    // The checkpoint is plain f32: every tensor the architecture has, by name and shape, of
    // dtype F32 (bf16 is only the arithmetic, never what is saved).
    let bytes = std::fs::read(dir.path().join("m.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut saved: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(
                t.dtype(),
                safetensors::Dtype::F32,
                "checkpoint tensor `{name}` after bf16 training"
            );
            (name, t.shape().to_vec())
        })
        .collect();
    saved.sort();
    let mut want = distill_core::spec::Arch::parse("mlp:784-32-10")
        .unwrap()
        .param_shapes();
    want.sort();
    assert_eq!(saved, want, "the checkpoint's tensors");

    // `eval` scores that checkpoint: its JSON and its table agree, and the error count is
    // consistent and in range (close to the training run's own score, which was computed in
    // bf16).
    let out = distill(
        &[
            "eval",
            "--model",
            "m.safetensors",
            "--data",
            "synthetic",
            "--json",
            "--logits-out",
            "z.npy",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let ev: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("eval --json printed no JSON object ({e}): {stdout}"));
    let n = ev["n"].as_u64().unwrap_or_else(|| panic!("no `n`: {ev}"));
    let errors = ev["errors"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `errors`: {ev}"));
    let accuracy = ev["accuracy"].as_f64().unwrap();
    assert_eq!(n, report["test_n"].as_u64().unwrap(), "{ev}");
    assert!(n > 0 && errors <= n, "{errors} errors of {n}");
    assert!(
        (accuracy - (n - errors) as f64 / n as f64).abs() < 1e-12,
        "{ev}"
    );
    assert!(accuracy > 0.5, "eval accuracy {accuracy}: {ev}");
    let trained_errors = report["test_errors"].as_u64().unwrap();
    assert!(
        errors.abs_diff(trained_errors) <= n / 20,
        "eval counts {errors} errors, training reported {trained_errors} (of {n})"
    );
    assert_eq!(ev["digest"], report["digest"], "eval scored another file");
    assert_eq!(ev["arch"], "mlp:784-32-10");
    // `--logits-out`: the test split's logits, one row per test row, whose arg-max errs
    // exactly as often as eval counted.
    let z = candle_core::Tensor::read_npy(dir.path().join("z.npy")).unwrap();
    assert_eq!(z.dims(), [n as usize, 10], "logits file shape");
    let pred = z
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let test = distill_core::data::Dataset::load("synthetic").unwrap().test;
    let wrong = pred.iter().zip(&test.y).filter(|(p, y)| p != y).count();
    assert_eq!(
        wrong as u64, errors,
        "arg-max of the written logits vs eval's count"
    );

    let out = distill(
        &["eval", "--model", "m.safetensors", "--data", "synthetic"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("errors"))
        .unwrap_or_else(|| panic!("no `errors` line: {stdout}"));
    let mut it = line.split_whitespace();
    let printed: (u64, &str, u64) = (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap(),
        it.next().unwrap().parse().unwrap(),
    );
    assert_eq!(printed, (errors, "/", n), "the table's errors line: {line}");

    let out = distill(
        &[
            "train",
            "--data",
            "synthetic",
            "--arch",
            "mlp:784-32-10",
            "--precision",
            "fp8",
            "--out",
            "n.safetensors",
        ],
        dir.path(),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("fp8"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
