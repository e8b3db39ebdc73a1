//! The real teacher server, in-process on 127.0.0.1:0, called over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use bytes::Bytes;
use candle_core::{Device, Tensor};
use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, InferRequest, infer_stream_response};
use distill_proto::{DType, HostTensor};
use distill_testkit::{Deadline, random_checkpoint};
use teacher_server::{ServeOptions, build_service, serve};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const MAX_MSG: usize = 64 << 20;

/// Longest wait for any one await in these tests (each takes well under a second normally).
const DEADLINE: Duration = Duration::from_secs(60);

/// Waits (yielding, with a deadline) until `cond` holds.
#[track_caller]
fn until(what: &str, cond: impl Fn() -> bool) -> impl std::future::Future<Output = ()> {
    distill_testkit::until(DEADLINE, what, cond)
}

struct Running {
    client: TeacherClient<Channel>,
    channel: Channel,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<teacher_server::Result<()>>,
    service: teacher_server::TeacherService,
}

async fn start(ck: &Checkpoint, opts: ServeOptions) -> Running {
    let service = build_service(ck, &Device::Cpu, &opts).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").deadline().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(service.clone(), listener, MAX_MSG, shutdown.clone()));
    // The listener is already bound: connecting needs no wait.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .deadline()
        .await
        .unwrap();
    let client = TeacherClient::new(channel.clone())
        .max_decoding_message_size(MAX_MSG)
        .max_encoding_message_size(MAX_MSG);
    Running {
        client,
        channel,
        shutdown,
        task,
        service,
    }
}

fn inputs(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    // A simple deterministic pattern in [0, 1).
    (0..rows * cols)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32) / 1000.0)
        .collect()
}

fn request(id: u64, x: &[f32], rows: usize, t: f32) -> InferRequest {
    InferRequest {
        request_id: id,
        inputs: Some(
            HostTensor::from_f32(vec![rows, x.len() / rows], x)
                .unwrap()
                .into(),
        ),
        temperature: t,
        output_dtype: 0,
        ..Default::default()
    }
}

fn local_logits(ck: &Checkpoint, x: &[f32], rows: usize, t: f32) -> Vec<f32> {
    let m = ck.to_model(&Device::Cpu).unwrap();
    let xt = Tensor::from_slice(x, (rows, x.len() / rows), &Device::Cpu).unwrap();
    let z = m
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    z.iter().map(|v| v / t).collect()
}

fn logits_of(r: &pb::InferResponse) -> Vec<f32> {
    HostTensor::try_from(r.logits.clone().unwrap())
        .unwrap()
        .to_f32_vec()
}

#[tokio::test]
async fn infer_returns_the_models_logits_over_t_and_describe_tells_the_model() {
    let ck = random_checkpoint("mlp:784-64-32-10", 1);
    let mut s = start(
        &ck,
        ServeOptions {
            member: "alpha".into(),
            ..Default::default()
        },
    )
    .deadline()
    .await;
    let d = s
        .client
        .describe(pb::DescribeRequest {})
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.member, "alpha");
    assert_eq!(d.input_shape, vec![784]);
    assert_eq!(d.num_classes, 10);
    assert_eq!(d.weights_digest, ck.digest());
    assert_eq!(d.model_id, ck.model_id());
    assert_eq!(d.arch, "mlp:784-64-32-10");

    let x = inputs(5, 784, 3);
    for t in [1.0f32, 4.0, 20.0] {
        let r = s
            .client
            .infer(request(7, &x, 5, t))
            .deadline()
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.request_id, 7);
        assert_eq!(r.model_id, ck.model_id());
        let got = logits_of(&r);
        let want = local_logits(&ck, &x, 5, t);
        assert_eq!(got.len(), 50);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "T={t}: max diff {diff}");
    }

    // f16 / bf16 replies carry the same values, rounded.
    for (dt, tol) in [(DType::F16, 1e-2f32), (DType::BF16, 5e-2)] {
        let mut req = request(8, &x, 5, 2.0);
        req.output_dtype = pb::DType::from(dt) as i32;
        let r = s.client.infer(req).deadline().await.unwrap().into_inner();
        let t = HostTensor::try_from(r.logits.unwrap()).unwrap();
        assert_eq!(t.dtype(), dt);
        assert_eq!(t.shape(), &[5, 10]);
        let want = local_logits(&ck, &x, 5, 2.0);
        for (a, b) in t.to_f32_vec().iter().zip(&want) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{dt:?}: {a} vs {b}"
            );
        }
    }

    // U8 pixels are scaled by 1/255 on the server.
    let px: Vec<u8> = (0..2 * 784).map(|i| (i * 7 % 256) as u8).collect();
    let req = InferRequest {
        request_id: 9,
        inputs: Some(
            HostTensor::new(vec![2, 784], DType::U8, px.clone())
                .unwrap()
                .into(),
        ),
        temperature: 1.0,
        output_dtype: 0,
        ..Default::default()
    };
    let got = logits_of(&s.client.infer(req).deadline().await.unwrap().into_inner());
    let xf: Vec<f32> = px.iter().map(|&p| p as f32 / 255.0).collect();
    let want = local_logits(&ck, &xf, 2, 1.0);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-5, "u8 inputs: {diff}");
    s.shutdown.cancel();
    s.task.deadline().await.unwrap().unwrap();
}

#[tokio::test]
async fn batched_and_unbatched_answers_are_identical() {
    for arch in ["mlp:784-64-32-10", "conv:4-8-16-10"] {
        batching_is_invisible(arch).deadline().await;
    }
}

async fn batching_is_invisible(arch: &str) {
    let ck = random_checkpoint(arch, 2);
    // Unbatched: one request at a time, no waiting for company.
    let mut solo = start(
        &ck,
        ServeOptions {
            max_delay: Duration::ZERO,
            ..Default::default()
        },
    )
    .deadline()
    .await;
    // Batched: a long window, so concurrent requests are coalesced, into passes of up to 256
    // rows (more than the 64 at which candle's CPU matmul changes code path).
    let mut batched = start(
        &ck,
        ServeOptions {
            max_delay: Duration::from_millis(200),
            max_batch: 256,
            // A slow pass keeps the compute thread busy while the other requests queue up, so
            // they are coalesced however the scheduler interleaves their arrival.
            simulate_latency: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .deadline()
    .await;

    // 12 requests of 3 to 10 rows (78 in all), each with its own temperature.
    let reqs: Vec<(Vec<f32>, usize, f32)> = (0..12)
        .map(|i| {
            let rows = 3 + i % 8;
            (inputs(rows, 784, i as u64), rows, 1.0 + i as f32)
        })
        .collect();
    let mut want = Vec::new();
    for (i, (x, rows, t)) in reqs.iter().enumerate() {
        want.push(logits_of(
            &solo
                .client
                .infer(request(i as u64, x, *rows, *t))
                .deadline()
                .await
                .unwrap()
                .into_inner(),
        ));
    }
    let calls = reqs.iter().enumerate().map(|(i, (x, rows, t))| {
        let mut c = batched.client.clone();
        let req = request(i as u64, x, *rows, *t);
        async move { c.infer(req).deadline().await.unwrap().into_inner() }
    });
    let got = futures_join_all(calls).deadline().await;
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.request_id, i as u64);
        assert_eq!(logits_of(r), want[i], "request {i}");
    }
    let b = batched_stats(&batched);
    assert!(
        b.0 < 12,
        "requests were coalesced: {} forward passes for 12 requests",
        b.0
    );
    assert_eq!(b.1, reqs.iter().map(|r| r.1 as u64).sum::<u64>());

    // More than 64 rows in one pass: a 70-row request, on either server, gives each row
    // exactly the logits of that row asked alone (a 1-row request). Bit for bit, because
    // the server pads every pass to more than 64 rows, so both take the same matmul path.
    // Every 5th row and the last one are asked alone (15 one-row passes, not 70).
    let big = 70;
    let x = inputs(big, 784, 99);
    let whole = logits_of(
        &solo
            .client
            .infer(request(500, &x, big, 3.0))
            .deadline()
            .await
            .unwrap()
            .into_inner(),
    );
    let whole_batched = logits_of(
        &batched
            .client
            .infer(request(501, &x, big, 3.0))
            .deadline()
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(whole.len(), big * 10);
    assert_eq!(whole_batched, whole, "{arch}: a {big}-row request, batched");
    for r in (0..big).step_by(5).chain([big - 1]) {
        let one = logits_of(
            &solo
                .client
                .infer(request(600 + r as u64, &x[r * 784..(r + 1) * 784], 1, 3.0))
                .deadline()
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(
            one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            whole[r * 10..(r + 1) * 10]
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            "{arch}: row {r} asked alone differs from the same row in a {big}-row request"
        );
    }
    solo.shutdown.cancel();
    batched.shutdown.cancel();
}

fn batched_stats(r: &Running) -> (u64, u64) {
    let s = r.service.stats();
    (
        s.batches.load(std::sync::atomic::Ordering::Relaxed),
        s.rows.load(std::sync::atomic::Ordering::Relaxed),
    )
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.deadline().await.unwrap());
    }
    out
}

#[tokio::test]
async fn infer_stream_pipelines_many_requests_out_of_order() {
    let ck = random_checkpoint("mlp:784-32-10", 3);
    // Every forward pass takes at least 200 ms: requests read while one runs queue up.
    let mut s = start(
        &ck,
        ServeOptions {
            simulate_latency: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .deadline()
    .await;
    let n = 40u64;
    let rows_of = |i: u64| 1 + (i as usize % 3);
    let reqs: Vec<InferRequest> = (0..n)
        .map(|i| {
            request(
                1000 + i,
                &inputs(rows_of(i), 784, i),
                rows_of(i),
                1.0 + (i % 5) as f32,
            )
        })
        .collect();
    let expected: std::collections::HashMap<u64, Vec<f32>> = (0..n)
        .map(|i| {
            let rows = rows_of(i);
            (
                1000 + i,
                local_logits(&ck, &inputs(rows, 784, i), rows, 1.0 + (i % 5) as f32),
            )
        })
        .collect();
    // One bad request in the middle gets an error reply; the stream goes on.
    let mut all = reqs.clone();
    let mut bad = request(5, &inputs(1, 784, 0), 1, 1.0);
    bad.temperature = -1.0;
    all.insert(20, bad);
    let mut stream = s
        .client
        .infer_stream(tokio_stream::iter(all))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    let mut errors = 0;
    while let Some(msg) = tokio_stream::StreamExt::next(&mut stream).deadline().await {
        let msg = msg.unwrap();
        order.push(msg.request_id);
        match msg.result.unwrap() {
            infer_stream_response::Result::Response(r) => {
                assert_eq!(r.request_id, msg.request_id);
                let got = logits_of(&r);
                let want = &expected[&r.request_id];
                let diff = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff <= 1e-6);
                assert!(
                    seen.insert(r.request_id),
                    "duplicate reply {}",
                    r.request_id
                );
            }
            infer_stream_response::Result::Error(e) => {
                assert_eq!(msg.request_id, 5);
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
                assert!(e.message.contains("temperature"), "{}", e.message);
                errors += 1;
            }
        }
    }
    assert_eq!(seen.len(), n as usize);
    assert_eq!(errors, 1);
    // Several requests were in flight at once: 40 requests took fewer than 40 forward passes,
    // so some pass held more than one of them (a server that answers a request before
    // reading the next runs exactly one pass per request).
    let (passes, rows) = batched_stats(&s);
    assert!(
        passes < n,
        "{passes} forward passes for {n} requests: none overlapped"
    );
    assert_eq!(rows, (0..n).map(|i| rows_of(i) as u64).sum::<u64>());
    // Out of order: the bad request, 21st on the stream, is refused without a forward pass,
    // so its error overtakes the replies of requests sent before it (each of which waits for
    // a pass of at least 200 ms); in order, it would be the 21st reply.
    let err_at = order.iter().position(|&id| id == 5).unwrap();
    let overtaken: Vec<u64> = order[err_at + 1..]
        .iter()
        .copied()
        .filter(|id| (1000..1020).contains(id))
        .collect();
    assert!(
        !overtaken.is_empty(),
        "the error reply came back in order (reply {err_at}): {order:?}"
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn every_bad_request_gets_invalid_argument_and_the_server_still_serves() {
    let ck = random_checkpoint("mlp:784-16-10", 4);
    let mut s = start(
        &ck,
        ServeOptions {
            max_batch: 8,
            ..Default::default()
        },
    )
    .deadline()
    .await;
    let good = || request(1, &inputs(2, 784, 1), 2, 1.0);
    let tensor = |shape: Vec<u64>, dtype: pb::DType, data: Vec<u8>| pb::Tensor {
        shape,
        dtype: dtype as i32,
        data: Bytes::from(data),
    };
    let mut nan = inputs(2, 784, 1);
    nan[900] = f32::NAN;
    let cases: Vec<(&str, InferRequest, &str)> = vec![
        (
            "no inputs",
            InferRequest {
                inputs: None,
                ..good()
            },
            "missing `inputs`",
        ),
        (
            "T = 0",
            InferRequest {
                temperature: 0.0,
                ..good()
            },
            "temperature",
        ),
        (
            "T = inf",
            InferRequest {
                temperature: f32::INFINITY,
                ..good()
            },
            "temperature",
        ),
        (
            "T = NaN",
            InferRequest {
                temperature: f32::NAN,
                ..good()
            },
            "temperature",
        ),
        (
            "NaN input",
            request(1, &nan, 2, 1.0),
            "non-finite value at row 1, column 116",
        ),
        (
            "wrong width",
            request(1, &inputs(2, 783, 1), 2, 1.0),
            "784 values per row",
        ),
        (
            "rank 1",
            InferRequest {
                inputs: Some(tensor(vec![784], pb::DType::DtypeF32, vec![0; 784 * 4])),
                ..good()
            },
            "784 values per row",
        ),
        (
            "too many rows",
            request(1, &inputs(9, 784, 1), 9, 1.0),
            "1 to 8 rows",
        ),
        (
            "zero rows",
            InferRequest {
                inputs: Some(tensor(vec![0, 784], pb::DType::DtypeF32, vec![])),
                ..good()
            },
            "1 to 8 rows",
        ),
        (
            "short bytes",
            InferRequest {
                inputs: Some(tensor(vec![1, 784], pb::DType::DtypeF32, vec![0; 100])),
                ..good()
            },
            "needs 3136 bytes, got 100",
        ),
        (
            // No bytes, but the row length 2^124 overflows whoever multiplies it out.
            "zero rows of a huge row",
            InferRequest {
                inputs: Some(tensor(
                    vec![0, 1 << 62, 1 << 62],
                    pb::DType::DtypeU8,
                    vec![],
                )),
                ..good()
            },
            "too large",
        ),
        (
            "dtype unset",
            InferRequest {
                inputs: Some(tensor(
                    vec![1, 784],
                    pb::DType::DtypeUnspecified,
                    vec![0; 3136],
                )),
                ..good()
            },
            "dtype 0",
        ),
        (
            "I64 inputs",
            InferRequest {
                inputs: Some(tensor(vec![1, 784], pb::DType::DtypeI64, vec![0; 784 * 8])),
                ..good()
            },
            "I64",
        ),
        (
            "bad output dtype",
            InferRequest {
                output_dtype: pb::DType::DtypeU8 as i32,
                ..good()
            },
            "output_dtype",
        ),
    ];
    for (name, req, needle) in cases {
        let st = s.client.infer(req).deadline().await.expect_err(name);
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{name}: {st:?}");
        assert!(st.message().contains(needle), "{name}: {}", st.message());
        // ... and a good request right after still succeeds.
        let ok = s.client.infer(good()).deadline().await;
        assert!(ok.is_ok(), "after {name}: {ok:?}");
    }

    // An oversized message is refused by the transport with a clear status, and serving goes on.
    let small = TeacherClient::new(s.channel.clone()).max_encoding_message_size(MAX_MSG * 2);
    let huge = request(
        1,
        &vec![0.5; (MAX_MSG / 4 / 784 + 1) * 784],
        MAX_MSG / 4 / 784 + 1,
        1.0,
    );
    let st = small.clone().infer(huge).deadline().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::OutOfRange, "{st:?}");
    assert!(s.client.infer(good()).deadline().await.is_ok());
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_temperature_so_small_that_logits_overflow_is_refused() {
    let ck = random_checkpoint("mlp:784-16-10", 4);
    let mut s = start(&ck, ServeOptions::default()).deadline().await;
    let x = inputs(2, 784, 3);
    let z = local_logits(&ck, &x, 2, 1.0);
    let zmax = z.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(zmax > 1e-3, "{zmax}");
    // z / T reaches 1e39 > f32::MAX (3.4e38) for the largest logit; T itself is a valid,
    // finite, positive f32 (subnormal), which the request check alone accepts.
    let t = zmax * 1e-39;
    assert!(t > 0.0 && t.is_finite());
    let st = s
        .client
        .infer(request(1, &x, 2, t))
        .deadline()
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(
        st.message()
            .contains(&format!("temperature {t} is too small"))
            && st.message().contains("overflows f32"),
        "{}",
        st.message()
    );
    // Finite in f32 but beyond f16's 65,504: refused when F16 output is asked for, returned
    // (finite) as F32 and BF16.
    let t = zmax / 1e5;
    let mut req = request(2, &x, 2, t);
    req.output_dtype = pb::DType::DtypeF16 as i32;
    let st = s.client.infer(req.clone()).deadline().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("does not fit F16"),
        "{}",
        st.message()
    );
    for dtype in [pb::DType::DtypeF32, pb::DType::DtypeBf16] {
        req.output_dtype = dtype as i32;
        let r = s
            .client
            .infer(req.clone())
            .deadline()
            .await
            .unwrap()
            .into_inner();
        let got = logits_of(&r);
        assert!(got.iter().all(|v| v.is_finite()), "{dtype:?}");
        assert!(got.iter().any(|v| v.abs() > 65_504.0), "{dtype:?}");
    }
    // The server goes on serving ordinary requests.
    assert!(
        s.client
            .infer(request(3, &x, 2, 1.0))
            .deadline()
            .await
            .is_ok()
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn too_many_requests_in_flight_get_resource_exhausted() {
    let ck = random_checkpoint("mlp:784-16-10", 5);
    // A slow forward pass keeps the first request in flight while the second arrives.
    let s = start(
        &ck,
        ServeOptions {
            max_inflight: 1,
            simulate_latency: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .deadline()
    .await;
    let mut c1 = s.client.clone();
    let first = tokio::spawn(async move {
        c1.infer(request(1, &inputs(1, 784, 1), 1, 1.0))
            .deadline()
            .await
    });
    // Wait (with a deadline) until the first request is being computed.
    until("the first request arrives", || {
        batched_stats(&s).0 > 0 || s.service.inflight() > 0
    })
    .await;
    let st = s
        .client
        .clone()
        .infer(request(2, &inputs(1, 784, 2), 1, 1.0))
        .deadline()
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("limit 1"), "{}", st.message());
    assert!(first.deadline().await.unwrap().is_ok());
    assert!(
        s.client
            .clone()
            .infer(request(3, &inputs(1, 784, 3), 1, 1.0))
            .deadline()
            .await
            .is_ok()
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn health_and_reflection_are_served_and_shutdown_drains() {
    let ck = random_checkpoint("mlp:784-16-10", 6);
    let s = start(
        &ck,
        ServeOptions {
            simulate_latency: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .deadline()
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "distill.v1.Teacher".into(),
        })
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        s.channel.clone(),
    );
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut out = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    let first = tokio_stream::StreamExt::next(&mut out)
        .deadline()
        .await
        .unwrap()
        .unwrap();
    let names: Vec<String> = match first.message_response.unwrap() {
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    };
    assert!(
        names.contains(&"distill.v1.Teacher".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // The Open Inference Protocol's service, on the same port (clients such as grpcurl find
    // it by reflection).
    assert!(
        names.contains(&"inference.GRPCInferenceService".to_string()),
        "{names:?}"
    );

    // A request in flight when shutdown starts still gets its answer.
    let mut c = s.client.clone();
    let x = inputs(1, 784, 1);
    let req = request(1, &x, 1, 1.0);
    let pending = tokio::spawn(async move { c.infer(req).deadline().await });
    until("the request reaches the server", || {
        s.service.inflight() > 0
    })
    .await;
    s.shutdown.cancel();
    // Still unanswered after shutdown began (its forward pass takes at least 500 ms): the
    // drain below is exercised, not a request that was done before the signal.
    let in_flight = s.service.inflight();
    assert!(
        in_flight == 1 && !pending.is_finished(),
        "the request was answered before shutdown began ({in_flight} in flight); nothing drained"
    );
    // serve() returns only once that request is answered: in the binary, returning ends the
    // process, and with it any request still being computed.
    s.task.deadline().await.unwrap().unwrap();
    let left = s.service.inflight();
    assert_eq!(
        left, 0,
        "serve() returned with {left} request(s) still unanswered: the shutdown did not drain"
    );
    let r = pending.deadline().await.unwrap();
    let r = r
        .unwrap_or_else(|st| panic!("the in-flight request was dropped by the shutdown: {st:?}"))
        .into_inner();
    let want = local_logits(&ck, &x, 1, 1.0);
    let diff = logits_of(&r)
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-6, "drained answer off by {diff}");
}

/// A client that sends on an `InferStream` and never reads: each reply holds its request's
/// in-flight permit until the stream takes it, so once the client's window is full the server
/// stops reading the stream, closes it at the reply deadline (the client sees
/// RESOURCE_EXHAUSTED when it finally reads), frees the permits and goes on serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_stream_is_cut_off_and_others_are_served() {
    // 1000 classes: one 1024-row reply is 4 MB, more than a client's stream window.
    let ck = random_checkpoint("mlp:4-1000", 3);
    let opts = ServeOptions {
        max_inflight: 2,
        ..Default::default()
    };
    let service = build_service(&ck, &Device::Cpu, &opts)
        .unwrap()
        .with_reply_deadline(Duration::from_millis(300));
    let listener = TcpListener::bind("127.0.0.1:0").deadline().await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(service.clone(), listener, MAX_MSG, shutdown.clone()));
    let connect = || async {
        let ch = Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .deadline()
            .await
            .unwrap();
        TeacherClient::new(ch)
            .max_decoding_message_size(MAX_MSG)
            .max_encoding_message_size(MAX_MSG)
    };

    // The client keeps sending until the server stops reading it. (A fixed burst is not
    // enough: most of a burst can be refused at once as over the in-flight limit, and the few
    // admitted replies may all fit in the connection's buffers, so nothing ever stalls.)
    const SENT: u64 = 2000;
    let x = inputs(1024, 4, 1);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for id in 0..SENT {
            if tx.send(request(id, &x, 1024, 2.0)).await.is_err() {
                return;
            }
        }
        // The sending side stays open: the client is alive, it only never reads.
        tx.closed().await;
    });
    let mut stalled = connect().await;
    let mut replies = stalled
        .infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    // Once a reply has waited out the deadline the stream is closed and its permits come back.
    until("the stream closed as stalled", || {
        service.stalled_streams() == 1
    })
    .await;
    until("the stalled stream's permits released", || {
        service.inflight() == 0
    })
    .await;
    // Meanwhile another client is served.
    let mut other = connect().await;
    let r = other
        .infer(request(7, &inputs(3, 4, 2), 3, 2.0))
        .deadline()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        HostTensor::try_from(r.logits.unwrap()).unwrap().shape(),
        &[3, 1000]
    );
    // Reading now: what was handed over, then the stream's end with the reason.
    let mut got = 0u64;
    let end = loop {
        match replies.message().deadline().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = end.expect("the stream is closed with a status, not left open");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("InferStream closed"),
        "{status:?}"
    );
    assert!(
        got < SENT,
        "all {SENT} replies were computed for a client that never read"
    );
    feeder.abort();
    shutdown.cancel();
}
