//! The `teacher-server` binary as a real process: prints its address, serves, exits 0 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::model::TrainableModel;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::HostTensor;
use distill_proto::pb::InferRequest;
use distill_proto::pb::teacher_client::TeacherClient;

/// Longest wait for a server process to start, answer or exit.
const DEADLINE: Duration = Duration::from_secs(60);

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test
/// leaves no server behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl KillOnDrop {
    /// The exit status, or a panic (and, through the drop, a kill) after `limit`.
    fn wait_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "{what}: no exit within {limit:?}");
            // Polling an exit (std has no wait with a timeout), not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `cmd` to completion with a deadline (killed if it overruns); stdout and stderr
/// collected on helper threads so a full pipe cannot stall it.
fn output_within(cmd: &mut Command, what: &str) -> Output {
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Each pipe is read to its end on a helper thread (a full pipe cannot stall the child);
    // the bytes come back over a channel, so even a pipe held open by a leftover grandchild
    // cannot block the test.
    let collect = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        rx
    };
    let out = collect(Box::new(child.0.stdout.take().unwrap()));
    let err = collect(Box::new(child.0.stderr.take().unwrap()));
    let status = child.wait_within(DEADLINE, what);
    Output {
        status,
        stdout: out
            .recv_timeout(DEADLINE)
            .expect("stdout not closed within the deadline"),
        stderr: err
            .recv_timeout(DEADLINE)
            .expect("stderr not closed within the deadline"),
    }
}

#[tokio::test]
async fn binary_prints_its_address_serves_and_exits_cleanly_on_sigterm() {
    serve_then_signal("-TERM").await;
}

#[tokio::test]
async fn binary_takes_f16_and_bf16_inputs_and_exits_cleanly_on_sigint() {
    serve_then_signal("-INT").await;
}

/// Starts the binary, asks it with f32, f16 and bf16 inputs of the same (exactly
/// representable) values, which must give bit-identical logits, then sends `signal` and expects
/// a clean exit.
async fn serve_then_signal(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let spec = ModelSpec::new(Arch::parse("mlp:784-16-10").unwrap());
    let m = TrainableModel::init(spec.clone(), 1, &Device::Cpu).unwrap();
    let ck = Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap();
    ck.save(&path).unwrap();

    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_teacher-server"))
            .arg("--model")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0", "--member", "m1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The first line, read on a helper thread so a server that never prints fails the test
    // (and is killed by the guard).
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(out.read_line(&mut line).map(|_| line));
    });
    let line = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("no `listening on` line within {DEADLINE:?}"))
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"));
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);

    let mut client =
        tokio::time::timeout(DEADLINE, TeacherClient::connect(format!("http://{addr}")))
            .await
            .expect("connecting to the server: no answer within the deadline")
            .unwrap();
    // Multiples of 1/16 in [0, 1): exact in f16 and bf16 alike.
    let x: Vec<f32> = (0..2 * 784).map(|i| (i % 16) as f32 / 16.0).collect();
    let mut answers = Vec::new();
    for (id, dtype) in [
        (3, distill_proto::DType::F32),
        (4, distill_proto::DType::F16),
        (5, distill_proto::DType::BF16),
    ] {
        let req = InferRequest {
            request_id: id,
            inputs: Some(
                HostTensor::from_f32_as(vec![2, 784], &x, dtype)
                    .unwrap()
                    .into(),
            ),
            temperature: 2.0,
            output_dtype: 0,
        };
        let r = tokio::time::timeout(DEADLINE, client.infer(req))
            .await
            .expect("Infer: no answer within the deadline")
            .unwrap()
            .into_inner();
        assert_eq!(r.model_id, ck.model_id());
        assert_eq!(r.request_id, id);
        let logits = HostTensor::try_from(r.logits.expect("logits")).unwrap();
        assert_eq!(logits.shape(), &[2, 10]);
        answers.push((dtype, logits.to_f32_vec()));
    }
    for (dtype, a) in &answers[1..] {
        assert_eq!(
            a, &answers[0].1,
            "{dtype:?} inputs gave other logits than f32 inputs"
        );
    }

    let killed = output_within(
        Command::new("kill").args([signal, &child.0.id().to_string()]),
        "kill",
    );
    assert!(killed.status.success());
    let status = child.wait_within(DEADLINE, "the server after the signal");
    assert!(
        status.success(),
        "exit status after kill {signal}: {status:?}"
    );
}

#[test]
fn binary_names_a_bad_model_file_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_teacher-server"))
            .arg("--model")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"]),
        "teacher-server with a junk model",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.safetensors"), "{err}");
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_teacher-server"))
            .arg("--model")
            .arg(&path)
            .args(["--device", "cuda:0"]),
        "teacher-server on cuda:0",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0"), "{err}");
}
