//! The `teacher-server` binary as a real process: prints its address, serves, exits 0 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::model::TrainableModel;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::HostTensor;
use distill_proto::pb::InferRequest;
use distill_proto::pb::teacher_client::TeacherClient;

#[tokio::test]
async fn binary_prints_its_address_serves_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let spec = ModelSpec::new(Arch::parse("mlp:784-16-10").unwrap());
    let m = TrainableModel::init(spec.clone(), 1, &Device::Cpu).unwrap();
    let ck = Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap();
    ck.save(&path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_teacher-server"))
        .arg("--model")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--member", "m1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first line, read on a helper thread so a server that never prints fails the test.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(out.read_line(&mut line).map(|_| line));
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(read) => read.unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("no `listening on` line within 60 s");
        }
    };
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"));
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);

    let mut client = TeacherClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = InferRequest {
        request_id: 3,
        inputs: Some(
            HostTensor::from_f32(vec![1, 784], &[0.5; 784])
                .unwrap()
                .into(),
        ),
        temperature: 2.0,
        output_dtype: 0,
    };
    let r = client.infer(req).await.unwrap().into_inner();
    assert_eq!(r.model_id, ck.model_id());

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The exit, waited for on a helper thread with a deadline.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the server did not exit within 60 s of SIGTERM");
        }
    };
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

#[test]
fn binary_names_a_bad_model_file_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_teacher-server"))
        .arg("--model")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.safetensors"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_teacher-server"))
        .arg("--model")
        .arg(&path)
        .args(["--device", "cuda:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0"), "{err}");
}
