//! The Open Inference Protocol on both sides, over real loopback sockets: our teacher server
//! answering OIP clients exactly as it answers `Infer` (and refusing bad `ModelInfer`s with the
//! right status while it keeps serving), and the coordinator teaching from an OIP member —
//! here our own teacher server's OIP endpoint, so the same weights can be asked both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::time::Duration;

use coordinator::RunConfig;
use coordinator::config::{MemberConfig, MemberProtocol, OutputHolds};
use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, InferRequest};
use distill_proto::pb_oip::grpc_inference_service_client::GrpcInferenceServiceClient;
use distill_proto::pb_oip::infer_parameter::ParameterChoice;
use distill_proto::pb_oip::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use distill_proto::pb_oip::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest, ServerReadyRequest,
};
use distill_proto::{DType, HostTensor};
use distill_testkit::random_checkpoint;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// Deadline of every await here.
const DEADLINE: Duration = Duration::from_secs(120);
const ARCH: &str = "mlp:784-16-10";
const ROWS: usize = 100;

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    distill_testkit::within(DEADLINE, what, f).await
}

/// A teacher server for `ck` as member `member`; its URL.
async fn teacher(ck: &Checkpoint, member: &str, stop: &CancellationToken) -> String {
    let opts = teacher_server::ServeOptions {
        member: member.into(),
        ..Default::default()
    };
    distill_testkit::serve_teacher(ck, &opts, stop).await.1
}

async fn oip_client(url: &str) -> GrpcInferenceServiceClient<Channel> {
    within(
        "OIP connect",
        GrpcInferenceServiceClient::connect(url.to_string()),
    )
    .await
    .unwrap()
}

/// `ROWS` rows of pseudo-random pixels.
fn pixels() -> Vec<u8> {
    (0..ROWS * 784)
        .map(|i| ((i * 7919 + 13) % 256) as u8)
        .collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn input(datatype: &str, shape: &[i64], contents: Option<InferTensorContents>) -> InferInputTensor {
    InferInputTensor {
        name: "input".into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: HashMap::new(),
        contents,
    }
}

fn temperature(t: f64) -> HashMap<String, InferParameter> {
    HashMap::from([(
        "temperature".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::DoubleParam(t)),
        },
    )])
}

/// A raw-contents request for member `m` at T = `t`.
fn raw_request(m: &str, t: f64, x: HostTensor) -> ModelInferRequest {
    let (inp, raw) = distill_proto::oip::encode_input("input", &x);
    ModelInferRequest {
        model_name: m.into(),
        parameters: temperature(t),
        inputs: vec![inp],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// The f32 values of output `name`.
fn output(resp: &ModelInferResponse, name: &str) -> Vec<f32> {
    let (shape, v) = distill_proto::oip::decode_output_f32(resp, name).unwrap();
    assert_eq!(shape, [ROWS, 10], "output {name}");
    v
}

/// What `distill.v1.Teacher/Infer` answers for `x` at T.
async fn native(url: &str, x: HostTensor, t: f32) -> Vec<f32> {
    let mut c = within("connect", TeacherClient::connect(url.to_string()))
        .await
        .unwrap();
    let r = within(
        "Infer",
        c.infer(InferRequest {
            request_id: 1,
            inputs: Some(x.into()),
            temperature: t,
            output_dtype: pb::DType::DtypeF32 as i32,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    HostTensor::try_from(r.logits.unwrap())
        .unwrap()
        .to_f32_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_teacher_server_answers_oip_clients_as_it_answers_infer() {
    let stop = CancellationToken::new();
    let ck = random_checkpoint(ARCH, 3);
    let url = teacher(&ck, "big", &stop).await;
    let mut c = oip_client(&url).await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .get_ref()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .get_ref()
            .ready
    );
    let version = ck.digest()[..16].to_string();
    for (name, v, ready) in [
        ("big", "", true),
        ("big", version.as_str(), true),
        ("small", "", false),
        ("big", "7", false),
    ] {
        let r = c
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: v.into(),
            })
            .await
            .unwrap();
        assert_eq!(r.get_ref().ready, ready, "ModelReady {name} {v:?}");
    }
    let meta = c
        .model_metadata(ModelMetadataRequest {
            name: "big".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, std::slice::from_ref(&version));
    assert_eq!(meta.inputs.len(), 1);
    assert_eq!(
        (
            meta.inputs[0].name.as_str(),
            meta.inputs[0].datatype.as_str()
        ),
        ("input", "FP32")
    );
    assert_eq!(meta.inputs[0].shape, [-1, 784]);
    let outs: Vec<(&str, &[i64])> = meta
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(
        outs,
        [
            ("logits", &[-1i64, 10][..]),
            ("probabilities", &[-1, 10][..]),
            ("log_probabilities", &[-1, 10][..])
        ]
    );

    let px = pixels();
    let as_f32 = distill_core::data::pixels_to_f32(&px);
    let t = 2.5;
    let want = native(
        &url,
        HostTensor::from_f32(vec![ROWS, 784], &as_f32).unwrap(),
        t,
    )
    .await;
    // Raw FP32: every output, at T from the request parameter.
    let raw = c
        .model_infer(raw_request(
            "big",
            f64::from(t),
            HostTensor::from_f32(vec![ROWS, 784], &as_f32).unwrap(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raw.model_version, version);
    assert_eq!(
        output(&raw, "logits"),
        want,
        "raw FP32 logits are Infer's, bit for bit"
    );
    let p = output(&raw, "probabilities");
    let lp = output(&raw, "log_probabilities");
    for (r, row) in p.chunks(10).enumerate() {
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
            "row {r}: {row:?}"
        );
    }
    for (i, ((&p, &lp), &z)) in p.iter().zip(&lp).zip(&want).enumerate() {
        assert!((p.ln() - lp).abs() < 1e-4, "{i}: ln {p} vs {lp}");
        // log p differs from z/T by the row's log-sum-exp only.
        let row = i / 10;
        let lse = want[row * 10..row * 10 + 10]
            .iter()
            .map(|v| (v - z).exp())
            .sum::<f32>()
            .ln();
        assert!((lp + lse).abs() < 1e-4, "{i}");
    }
    // Typed FP32 contents, the model's own input shape, one output asked for.
    let typed = ModelInferRequest {
        model_name: "big".into(),
        parameters: temperature(f64::from(t)),
        inputs: vec![input(
            "FP32",
            &[ROWS as i64, 1, 28, 28],
            Some(InferTensorContents {
                fp32_contents: as_f32.clone(),
                ..Default::default()
            }),
        )],
        outputs: vec![InferRequestedOutputTensor {
            name: "logits".into(),
            parameters: HashMap::new(),
        }],
        ..Default::default()
    };
    let typed = c.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(typed.outputs.len(), 1, "only the output asked for");
    assert_eq!(output(&typed, "logits"), want);
    // UINT8 pixels, typed: scaled as Infer scales U8 inputs.
    let u8s = ModelInferRequest {
        model_name: "big".into(),
        parameters: temperature(f64::from(t)),
        inputs: vec![input(
            "UINT8",
            &[ROWS as i64, 784],
            Some(InferTensorContents {
                uint_contents: px.iter().map(|&b| u32::from(b)).collect(),
                ..Default::default()
            }),
        )],
        ..Default::default()
    };
    let u8s = c.model_infer(u8s).await.unwrap().into_inner();
    let want_u8 = native(
        &url,
        HostTensor::new(vec![ROWS, 784], DType::U8, px.clone()).unwrap(),
        t,
    )
    .await;
    assert_eq!(output(&u8s, "logits"), want_u8);
    assert_eq!(want_u8, want, "U8 and F32 pixels are the same rows");
    // BF16, raw: as Infer answers BF16 inputs.
    let bf = HostTensor::from_f32_as(vec![ROWS, 784], &as_f32, DType::BF16).unwrap();
    let got = c
        .model_infer(raw_request("big", f64::from(t), bf.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output(&got, "logits"), native(&url, bf, t).await);
    // No temperature parameter: T = 1.
    let mut plain = raw_request(
        "big",
        1.0,
        HostTensor::from_f32(vec![ROWS, 784], &as_f32).unwrap(),
    );
    plain.parameters.clear();
    let plain = c.model_infer(plain).await.unwrap().into_inner();
    let z1 = native(
        &url,
        HostTensor::from_f32(vec![ROWS, 784], &as_f32).unwrap(),
        1.0,
    )
    .await;
    assert_eq!(output(&plain, "logits"), z1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_model_infer_requests_get_the_right_status_and_the_server_keeps_serving() {
    let stop = CancellationToken::new();
    let ck = random_checkpoint(ARCH, 4);
    let url = teacher(&ck, "big", &stop).await;
    let mut c = oip_client(&url).await;
    let good = || {
        raw_request(
            "big",
            2.0,
            HostTensor::from_f32(vec![2, 784], &[0.5; 2 * 784]).unwrap(),
        )
    };
    let mut nan = vec![0.5f32; 2 * 784];
    nan[790] = f32::NAN;
    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            ModelInferRequest {
                model_name: "small".into(),
                ..good()
            },
            Code::NotFound,
            "no model `small`",
        ),
        (
            "unknown version",
            ModelInferRequest {
                model_version: "v9".into(),
                ..good()
            },
            Code::NotFound,
            "no version `v9`",
        ),
        (
            "no input",
            ModelInferRequest {
                inputs: vec![],
                raw_input_contents: vec![],
                ..good()
            },
            Code::InvalidArgument,
            "0 inputs",
        ),
        (
            "two inputs",
            {
                let mut r = good();
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
                r
            },
            Code::InvalidArgument,
            "2 inputs",
        ),
        (
            "wrong input name",
            {
                let mut r = good();
                r.inputs[0].name = "pixels".into();
                r
            },
            Code::InvalidArgument,
            "input `pixels`",
        ),
        (
            "unknown datatype",
            {
                let mut r = good();
                r.inputs[0].datatype = "FP8".into();
                r
            },
            Code::InvalidArgument,
            "datatype `FP8`",
        ),
        (
            "INT64",
            {
                let mut r = good();
                r.inputs[0].datatype = "INT64".into();
                r.raw_input_contents[0] = vec![0u8; 2 * 784 * 8].into();
                r
            },
            Code::InvalidArgument,
            "INT64",
        ),
        (
            "short raw contents",
            {
                let mut r = good();
                r.raw_input_contents[0] = vec![0u8; 17].into();
                r
            },
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "negative dimension",
            {
                let mut r = good();
                r.inputs[0].shape = vec![-2, 784];
                r
            },
            Code::InvalidArgument,
            "negative",
        ),
        (
            "overflowing shape",
            {
                let mut r = good();
                r.inputs[0].shape = vec![i64::MAX, i64::MAX];
                r
            },
            Code::InvalidArgument,
            "too large",
        ),
        (
            "wrong row length",
            {
                let mut r = good();
                r.inputs[0].shape = vec![4, 392];
                r
            },
            Code::InvalidArgument,
            "784 values per row",
        ),
        (
            "NaN",
            raw_request(
                "big",
                2.0,
                HostTensor::from_f32(vec![2, 784], &nan).unwrap(),
            ),
            Code::InvalidArgument,
            "non-finite value at row 1, column 6",
        ),
        (
            "zero temperature",
            raw_request(
                "big",
                0.0,
                HostTensor::from_f32(vec![2, 784], &[0.5; 2 * 784]).unwrap(),
            ),
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "temperature not a number",
            {
                let mut r = good();
                r.parameters.insert(
                    "temperature".into(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam("hot".into())),
                    },
                );
                r
            },
            Code::InvalidArgument,
            "not a number",
        ),
        (
            "unknown output",
            {
                let mut r = good();
                r.outputs = vec![InferRequestedOutputTensor {
                    name: "scores".into(),
                    parameters: HashMap::new(),
                }];
                r
            },
            Code::InvalidArgument,
            "no output `scores`",
        ),
        (
            "typed FP16",
            ModelInferRequest {
                inputs: vec![input(
                    "FP16",
                    &[2, 784],
                    Some(InferTensorContents::default()),
                )],
                raw_input_contents: vec![],
                ..good()
            },
            Code::InvalidArgument,
            "only as raw",
        ),
        (
            "typed count",
            ModelInferRequest {
                inputs: vec![input(
                    "FP32",
                    &[2, 784],
                    Some(InferTensorContents {
                        fp32_contents: vec![0.0; 5],
                        ..Default::default()
                    }),
                )],
                raw_input_contents: vec![],
                ..good()
            },
            Code::InvalidArgument,
            "holds 5 values",
        ),
        (
            "UINT8 out of range",
            ModelInferRequest {
                inputs: vec![input(
                    "UINT8",
                    &[1, 784],
                    Some(InferTensorContents {
                        uint_contents: vec![256; 784],
                        ..Default::default()
                    }),
                )],
                raw_input_contents: vec![],
                ..good()
            },
            Code::InvalidArgument,
            "256 is not a UINT8",
        ),
        (
            "raw and typed",
            {
                let mut r = good();
                r.inputs[0].contents = Some(InferTensorContents::default());
                r
            },
            Code::InvalidArgument,
            "both raw and typed",
        ),
        (
            "no contents",
            ModelInferRequest {
                inputs: vec![input("FP32", &[2, 784], None)],
                raw_input_contents: vec![],
                ..good()
            },
            Code::InvalidArgument,
            "no contents",
        ),
        (
            "too many rows",
            raw_request(
                "big",
                1.0,
                HostTensor::from_f32(vec![1025, 784], &vec![0.0; 1025 * 784]).unwrap(),
            ),
            Code::InvalidArgument,
            "1 to 1024 rows",
        ),
    ];
    for (what, req, code, msg) in cases {
        let err = within(what, c.model_infer(req)).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(msg),
            "{what}: `{}` lacks `{msg}`",
            err.message()
        );
        // Still serving, on the same connection.
        let ok = within(what, c.model_infer(good()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.outputs.len(), 3, "{what}");
    }
    let err = c
        .model_metadata(ModelMetadataRequest {
            name: "small".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    stop.cancel();
}

/// The small test run over `members`, with `epochs` epochs and one worker's worth of batches.
fn run_config(dir: &std::path::Path, members: Vec<MemberConfig>) -> RunConfig {
    let mut cfg = distill_testkit::small_run(dir.join("run"));
    cfg.members = members;
    cfg.epochs = 1;
    cfg.seed = 7;
    cfg.validate().unwrap();
    cfg
}

/// Member `name` at `url` over OIP, model `name`, its output `output_name` holding `holds`.
fn oip_member(name: &str, url: &str, output_name: &str, holds: OutputHolds) -> MemberConfig {
    MemberConfig {
        protocol: MemberProtocol::Oip,
        model_name: Some(name.into()),
        output_name: Some(output_name.into()),
        output: Some(holds),
        ..distill_testkit::static_member(name, &[url])
    }
}

/// The batches' dense f32 soft targets, by batch index.
fn soft_targets(batches: &[pb::TrainBatch]) -> HashMap<u32, Vec<f32>> {
    batches
        .iter()
        .map(|b| {
            (
                b.index,
                floats(&b.soft_targets.as_ref().expect("dense f32").data),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oip_member_gives_the_soft_targets_of_the_same_model_asked_natively() {
    let stop = CancellationToken::new();
    let a = teacher(&random_checkpoint(ARCH, 1), "a", &stop).await;
    let b = teacher(&random_checkpoint(ARCH, 2), "b", &stop).await;
    let dir = tempfile::tempdir().unwrap();
    const N: usize = 6;
    let collect = |members: Vec<MemberConfig>, sub: &str| {
        let cfg = run_config(&dir.path().join(sub), members);
        async move {
            let run = within("prepare", coordinator::prepare(cfg)).await.unwrap();
            soft_targets(&distill_testkit::collect_batches(run, N, DEADLINE).await)
        }
    };
    let native = collect(
        vec![
            distill_testkit::static_member("a", &[&a]),
            distill_testkit::static_member("b", &[&b]),
        ],
        "native",
    )
    .await;
    assert_eq!(native.len(), N);
    let with_oip = collect(
        vec![
            distill_testkit::static_member("a", &[&a]),
            oip_member("b", &b, "logits", OutputHolds::Logits),
        ],
        "oip",
    )
    .await;
    // z from the server at T = 1, divided by T here: the native member's z/T, bit for bit.
    assert_eq!(with_oip, native, "soft targets with b over OIP");
    for (output_name, holds) in [
        ("probabilities", OutputHolds::Probabilities),
        ("log_probabilities", OutputHolds::LogProbabilities),
    ] {
        let got = collect(
            vec![
                distill_testkit::static_member("a", &[&a]),
                oip_member("b", &b, output_name, holds),
            ],
            output_name,
        )
        .await;
        assert_eq!(got.len(), N);
        for (i, want) in &native {
            let got = &got[i];
            let worst = got
                .iter()
                .zip(want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{output_name}: batch {i} differs by {worst}");
        }
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_an_oip_member_trains_the_same_student_as_with_both_native() {
    let stop = CancellationToken::new();
    let a = teacher(&random_checkpoint(ARCH, 1), "a", &stop).await;
    let b = teacher(&random_checkpoint(ARCH, 2), "b", &stop).await;
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for (sub, second) in [
        ("native", distill_testkit::static_member("b", &[&b])),
        ("oip", oip_member("b", &b, "logits", OutputHolds::Logits)),
    ] {
        let d = dir.path().join(sub);
        let cfg = run_config(&d, vec![distill_testkit::static_member("a", &[&a]), second]);
        let run_stop = CancellationToken::new();
        let (addr, served) = distill_testkit::serve_run(cfg, &run_stop).await;
        let worker = distill_testkit::spawn_worker(addr, &d, &run_stop);
        let report = within("the run", served)
            .await
            .unwrap()
            .unwrap()
            .expect("completed");
        within("the worker", worker).await.unwrap().unwrap();
        reports.push(report);
    }
    let (n, o) = (&reports[0], &reports[1]);
    assert_eq!(o.batches_trained, n.batches_trained);
    assert_eq!(
        o.student_test_errors, n.student_test_errors,
        "the same student"
    );
    assert_eq!(o.ensemble_test_errors, n.ensemble_test_errors);
    let errors = |r: &coordinator::RunReport| format!("{:?}", r.teachers);
    assert_eq!(errors(o), errors(n), "each teacher's test errors");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_metadata_that_does_not_fit_is_refused_at_start_naming_member_and_field() {
    let stop = CancellationToken::new();
    let good = teacher(&random_checkpoint(ARCH, 1), "m", &stop).await;
    let five = teacher(&random_checkpoint("mlp:784-16-5", 1), "m", &stop).await;
    let narrow = teacher(&random_checkpoint("mlp:100-16-10", 1), "m", &stop).await;
    let dir = tempfile::tempdir().unwrap();
    let base = |url: &str| oip_member("m", url, "logits", OutputHolds::Logits);
    let cases: Vec<(MemberConfig, &str)> = vec![
        (
            MemberConfig {
                model_name: Some("other".into()),
                ..base(&good)
            },
            "`model_name`",
        ),
        (
            MemberConfig {
                model_version: Some("v0".into()),
                ..base(&good)
            },
            "`model_version`",
        ),
        (
            MemberConfig {
                input_name: Some("pixels".into()),
                ..base(&good)
            },
            "`input_name`",
        ),
        (
            MemberConfig {
                input_datatype: Some("UINT8".into()),
                ..base(&good)
            },
            "`input_datatype`",
        ),
        (
            MemberConfig {
                output_name: Some("scores".into()),
                ..base(&good)
            },
            "`output_name`",
        ),
        (base(&five), "class count"),
        (base(&narrow), "input shape"),
    ];
    for (i, (member, field)) in cases.into_iter().enumerate() {
        let cfg = run_config(&dir.path().join(i.to_string()), vec![member]);
        let err = match within("prepare", coordinator::prepare(cfg)).await {
            Ok(_) => panic!("case {i} ({field}) started"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("member `m`") && err.contains(field),
            "case {i}: {err}"
        );
    }
    // The config itself: an OIP member needs a model name; a read-write cache needs a version
    // or an identity; OIP keys on a native member are refused.
    let cfg = |member: MemberConfig, cache: bool| {
        let mut c = distill_testkit::small_run(dir.path().join("c"));
        c.members = vec![member];
        if cache {
            c.cache = Some(
                serde_json::from_value(serde_json::json!({ "dir": dir.path().join("cache") }))
                    .unwrap(),
            );
        }
        c.validate().map(|_| ()).map_err(|e| e.to_string())
    };
    let err = cfg(
        MemberConfig {
            model_name: None,
            ..base(&good)
        },
        false,
    )
    .unwrap_err();
    assert!(err.contains("members[0].model_name"), "{err}");
    let err = cfg(base(&good), true).unwrap_err();
    assert!(
        err.contains("members[0].identity")
            && err.contains("neither `model_version` nor `identity`"),
        "{err}"
    );
    cfg(
        MemberConfig {
            identity: Some("prod-2026-11".into()),
            ..base(&good)
        },
        true,
    )
    .unwrap();
    cfg(
        MemberConfig {
            model_version: Some("3".into()),
            ..base(&good)
        },
        true,
    )
    .unwrap();
    let err = cfg(
        MemberConfig {
            model_name: Some("m".into()),
            ..distill_testkit::static_member("m", &[&good])
        },
        false,
    )
    .unwrap_err();
    assert!(
        err.contains("members[0].model_name") && err.contains("only an OIP member"),
        "{err}"
    );
    stop.cancel();
}

/// Replicas, the cache and top-k work for an OIP member as for a native one. Member `b` has two
/// OIP replicas, one of them down (a port that refuses connections), a read-write cache keyed
/// by the operator's `identity`, and top-3 soft targets: two epochs ask the live replica for
/// every row exactly once (epoch 2 comes from the cache); a second run with the same identity
/// asks nothing; one with another identity (a replaced production model) misses the cache and
/// asks for every row again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oip_member_fails_over_and_is_cached_under_its_identity_with_top_k_targets() {
    let stop = CancellationToken::new();
    let opts = teacher_server::ServeOptions {
        member: "b".into(),
        ..Default::default()
    };
    let (service, b) =
        distill_testkit::serve_teacher(&random_checkpoint(ARCH, 2), &opts, &stop).await;
    let rows = || {
        service
            .stats()
            .rows
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let down = distill_testkit::reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    const BATCH: usize = 1000;
    const PER_EPOCH: usize = 12; // synthetic:0 has 12,000 training rows
    let run = |sub: &str, identity: &str, epochs: u32| {
        let mut member = oip_member("b", &b, "logits", OutputHolds::Logits);
        member.endpoints = vec![format!("http://{}", down.addr), b.clone()];
        member.identity = Some(identity.into());
        let mut cfg = run_config(&dir.path().join(sub), vec![member]);
        cfg.batch_size = BATCH;
        cfg.epochs = epochs;
        cfg.sync.every = 0; // the hand-driven worker takes part in no averaging round
        cfg.soft_targets = "topk:3".parse().unwrap();
        // Without hedges every row is asked exactly once, so the counts below are exact.
        cfg.membership.hedge = false;
        cfg.cache = Some(serde_json::from_value(serde_json::json!({ "dir": cache })).unwrap());
        cfg.validate().unwrap();
        async move {
            let run = within("prepare", coordinator::prepare(cfg)).await.unwrap();
            let mut batches =
                distill_testkit::collect_batches(run, PER_EPOCH * epochs as usize, DEADLINE).await;
            batches.sort_by_key(|b| (b.epoch, b.index));
            batches
        }
    };
    let top3 = |b: &pb::TrainBatch| {
        assert!(b.soft_targets.is_none(), "batch {}: dense targets", b.index);
        let t = b.topk_targets.clone().expect("top-k targets");
        assert_eq!((t.k, t.classes), (3, 10), "batch {}", b.index);
        t.data
    };

    let filled = run("fill", "model-v1", 2).await;
    assert_eq!(filled.len(), 2 * PER_EPOCH);
    let (first, second) = filled.split_at(PER_EPOCH);
    assert!(
        first.iter().all(|b| !b.cached),
        "epoch 1 came from the cache"
    );
    assert!(second.iter().all(|b| b.cached), "epoch 2 asked the teacher");
    for b in second {
        top3(b);
    }
    // Each run also has the teacher score the test split (its own test errors), as far as
    // it got before the run was stopped: up to `test` rows more than the training rows.
    let test = distill_core::data::Dataset::load("synthetic:0")
        .unwrap()
        .test
        .len() as u64;
    let train = (PER_EPOCH * BATCH) as u64;
    let asked = |since: u64| rows() - since;
    let fill = asked(0);
    assert!(
        (train..=train + test).contains(&fill),
        "{fill} rows asked in two epochs of {train}"
    );

    let again = run("again", "model-v1", 1).await;
    assert!(
        again.iter().all(|b| b.cached),
        "same identity missed the cache"
    );
    // The same seed draws the same batches: what the cache gave back is what was stored.
    for (x, y) in first.iter().zip(&again) {
        assert!(
            top3(x) == top3(y),
            "batch {}: cached top-k differs",
            x.index
        );
    }
    let before = fill;
    let cached = asked(before);
    assert!(cached <= test, "a cached run asked for {cached} rows");

    let replaced = run("replaced", "model-v2", 1).await;
    assert!(
        replaced.iter().all(|b| !b.cached),
        "another identity hit the first one's cache"
    );
    let new = asked(before + cached);
    assert!(
        (train..=train + test).contains(&new),
        "{new} rows asked under the new identity"
    );
    stop.cancel();
}
