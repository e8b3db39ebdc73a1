//! The `teacher-server` binary as a real process: prints its address, serves, says NOT_SERVING
//! on its health service when told to stop (SIGTERM or SIGINT), and exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::{Command, Output};
use std::time::Duration;

use distill_proto::HostTensor;
use distill_proto::pb::InferRequest;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_testkit::{Deadline, random_checkpoint, signal, spawn_server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for a server process to start, answer or exit.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion within [`DEADLINE`] (killed if it overruns).
fn output_within(cmd: &mut Command, what: &str) -> Output {
    distill_testkit::output_within(cmd, DEADLINE, what)
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
/// representable) values, which must give bit-identical logits, then sends `signal_name` and
/// expects NOT_SERVING on a health watch opened before, then a clean exit.
async fn serve_then_signal(signal_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let ck = random_checkpoint("mlp:784-16-10", 1);
    ck.save(&path).unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_teacher-server"));
    cmd.arg("--model")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--member", "m1"]);
    let (mut child, addr) = spawn_server(cmd, &dir.path().join("server.log"));
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
            ..Default::default()
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

    // Health is watched from before the signal: the server must say NOT_SERVING (so load
    // balancers and the coordinator's prober stop sending) before it goes away.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .deadline()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "distill.v1.Teacher".into(),
        })
        .deadline()
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().deadline().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    signal(child.id(), signal_name);
    let next = watch
        .message()
        .deadline()
        .await
        .unwrap_or_else(|e| panic!("the health stream broke without NOT_SERVING: {e}"))
        .unwrap_or_else(|| panic!("the health stream ended without NOT_SERVING"));
    assert_eq!(
        next.status,
        ServingStatus::NotServing as i32,
        "after {signal_name}"
    );
    let status = child.wait_within(DEADLINE, "the server after the signal");
    assert!(
        status.success(),
        "exit status after kill {signal_name}: {status:?}"
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
