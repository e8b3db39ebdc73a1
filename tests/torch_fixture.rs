//! Weights trained by PyTorch (tests/fixtures, made by scripts/torch-fixture.py) imported with
//! `distill import-torch` and served by the real teacher server give PyTorch's logits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use distill_proto::HostTensor;
use distill_proto::pb::InferRequest;
use distill_proto::pb::teacher_client::TeacherClient;
use safetensors::SafeTensors;
use teacher_server::{ServeOptions, build_service, serve};
use tokio_util::sync::CancellationToken;

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

#[tokio::test]
async fn pytorch_trained_mlp_gives_the_same_logits_when_served() {
    common::within(
        TEST_DEADLINE,
        "pytorch_trained_mlp_gives_the_same_logits_when_served",
        async move {
            let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("torch.safetensors");
            let status = Command::new(env!("CARGO_BIN_EXE_distill"))
                .args([
                    "import-torch",
                    "--arch",
                    "mlp:784-32-16-10",
                    "--dropout",
                    "0.5",
                    "--input-dropout",
                    "0.2",
                    "--in",
                ])
                .arg(fixtures.join("torch_mlp.safetensors"))
                .arg("--out")
                .arg(&out)
                .status()
                .unwrap();
            assert!(status.success());

            let io = std::fs::read(fixtures.join("torch_mlp_io.safetensors")).unwrap();
            let io = SafeTensors::deserialize(&io).unwrap();
            let (xshape, x) = f32s(&io, "x");
            let ck = distill_core::checkpoint::Checkpoint::read(&out).unwrap();
            assert_eq!(ck.spec.dropout, 0.5);
            let service = build_service(&ck, &Device::Cpu, &ServeOptions::default()).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(service, listener, 64 << 20, shutdown.clone()));
            let mut client = TeacherClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            for (t, key) in [(1.0f32, "logits"), (4.0, "logits_t4")] {
                let req = InferRequest {
                    request_id: 1,
                    inputs: Some(HostTensor::from_f32(xshape.clone(), &x).unwrap().into()),
                    temperature: t,
                    output_dtype: 0,
                };
                let got = HostTensor::try_from(
                    client
                        .infer(req)
                        .await
                        .unwrap()
                        .into_inner()
                        .logits
                        .unwrap(),
                )
                .unwrap();
                let (shape, want) = f32s(&io, key);
                assert_eq!(got.shape(), shape.as_slice());
                let diff = got
                    .to_f32_vec()
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff <= 1e-5, "T={t}: max |distill - torch| = {diff}");
            }
            // An unconverted PyTorch file is refused with a pointer to the converter.
            let e =
                distill_core::checkpoint::Checkpoint::read(&fixtures.join("torch_mlp.safetensors"))
                    .unwrap_err();
            assert!(e.to_string().contains("import-torch"), "{e}");
            shutdown.cancel();
            task.await.unwrap().unwrap();
        },
    )
    .await
}
