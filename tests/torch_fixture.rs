//! Weights trained by PyTorch (tests/fixtures, made by scripts/torch-fixture.py) imported with
//! `distill import-torch` and served by the real teacher server give PyTorch's logits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
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

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `distill import-torch --arch ARCH FLAGS --in tests/fixtures/MODEL --out OUT` as a
/// process and reads the checkpoint it wrote.
fn import_torch(model: &str, arch: &str, flags: &[&str], out: &Path) -> Checkpoint {
    let status = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["import-torch", "--arch", arch])
        .args(flags)
        .arg("--in")
        .arg(fixtures().join(model))
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "import-torch {arch} {model}: {status}");
    Checkpoint::read(out).unwrap()
}

/// Serves `ck` in-process with the real teacher server and checks that the logits it serves
/// for the fixture `io`'s `x` at T = 1 and T = 4 are its `logits` and `logits_t4` within `tol`.
async fn assert_serves_the_fixture_logits(ck: &Checkpoint, io: &str, tol: f32) {
    let io = std::fs::read(fixtures().join(io)).unwrap();
    let io = SafeTensors::deserialize(&io).unwrap();
    let (xshape, x) = f32s(&io, "x");
    let service = build_service(ck, &Device::Cpu, &ServeOptions::default()).unwrap();
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
            ..Default::default()
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
        assert!(diff <= tol, "T={t}: max |distill - torch| = {diff}");
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn pytorch_trained_mlp_gives_the_same_logits_when_served() {
    common::within(
        TEST_DEADLINE,
        "pytorch_trained_mlp_gives_the_same_logits_when_served",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let ck = import_torch(
                "torch_mlp.safetensors",
                "mlp:784-32-16-10",
                &["--dropout", "0.5", "--input-dropout", "0.2"],
                &dir.path().join("torch.safetensors"),
            );
            assert_eq!(ck.spec.dropout, 0.5);
            assert_serves_the_fixture_logits(&ck, "torch_mlp_io.safetensors", 1e-5).await;
            // An unconverted PyTorch file is refused with a pointer to the converter.
            let e = Checkpoint::read(&fixtures().join("torch_mlp.safetensors")).unwrap_err();
            assert!(e.to_string().contains("import-torch"), "{e}");
        },
    )
    .await
}

/// The conv net `conv:4-8-16-10` as PyTorch's `nn.Sequential(Conv2d(1,4,5,padding=2), ReLU,
/// MaxPool2d(2), Conv2d(4,8,5,padding=2), ReLU, MaxPool2d(2), Flatten, Linear(392,16), ReLU,
/// Linear(16,10))`: keys 0, 3, 7 and 9 become conv0, conv1, fc0 and fc1, and the inputs are
/// sent as `[8, 1, 28, 28]` images. Flattening in any order but PyTorch's (C, H, W) would be
/// off by about 12 (see tests/fixtures/README.md).
#[tokio::test]
async fn pytorch_trained_conv_net_gives_the_same_logits_when_served() {
    common::within(
        TEST_DEADLINE,
        "pytorch_trained_conv_net_gives_the_same_logits_when_served",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let ck = import_torch(
                "torch_conv.safetensors",
                "conv:4-8-16-10",
                &[],
                &dir.path().join("torch.safetensors"),
            );
            let names: Vec<_> = ck.params.iter().map(|p| p.0.as_str()).collect();
            assert_eq!(
                names,
                [
                    "conv0.weight",
                    "conv0.bias",
                    "conv1.weight",
                    "conv1.bias",
                    "fc0.weight",
                    "fc0.bias",
                    "fc1.weight",
                    "fc1.bias",
                ]
            );
            assert_serves_the_fixture_logits(&ck, "torch_conv_io.safetensors", 1e-4).await;
        },
    )
    .await
}
