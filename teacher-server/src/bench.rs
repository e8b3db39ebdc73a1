//! Throughput measurements of a teacher server against the same model's in-process forward
//! pass, on loopback (used by `cargo bench -p teacher-server --bench throughput` and by
//! `distill bench`).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use distill_core::checkpoint::Checkpoint;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{InferRequest, infer_stream_response};
use distill_proto::{DType, HostTensor};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::{ServeOptions, build_service, serve};

/// A failure of the measuring client (not of the server under test).
fn client_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Client(format!("{what}: {e}"))
}

/// Rows per second of the in-process forward pass at `batch` rows, for `secs` seconds (input
/// tensor built, forward, logits copied out: the server's work without gRPC).
pub fn in_process(ck: &Checkpoint, batch: usize, secs: f64) -> Result<f64> {
    let m = ck.to_model(&Device::Cpu)?;
    let width = ck.spec.arch.input_size();
    let x: Vec<f32> = (0..batch * width)
        .map(|i| distill_core::data::pixel_to_f32((i % 255) as u8))
        .collect();
    let run = || -> distill_core::Result<()> {
        // Same work as the server: build the input tensor, forward, copy the logits out.
        let xt = Tensor::from_slice(&x, (batch, width), &Device::Cpu)?;
        let _ = m.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(())
    };
    run()?;
    let start = Instant::now();
    let mut rows = 0;
    while start.elapsed().as_secs_f64() < secs {
        run()?;
        rows += batch;
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}

/// Rows per second through a teacher server on loopback: one client keeps `depth` requests
/// of `batch` rows (inputs as `dtype`: F32 or U8) in flight on `InferStream` for `secs` seconds.
pub async fn served(
    ck: &Checkpoint,
    batch: usize,
    secs: f64,
    depth: usize,
    dtype: DType,
) -> Result<f64> {
    let server = Served::start(ck, batch).await?;
    let opts = &server.opts;
    let mut client = TeacherClient::connect(server.url.clone())
        .await?
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let input = inputs(batch, ck.spec.arch.input_size(), dtype)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<InferRequest>(depth);
    let mut replies = client
        .infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| client_err("InferStream", e))?
        .into_inner();
    let make = |id: u64| InferRequest {
        request_id: id,
        inputs: Some(input.clone().into()),
        temperature: 4.0,
        output_dtype: 0,
        ..Default::default()
    };
    // Warm up, then keep `depth` requests in flight until the time is up.
    let mut next_id = 0u64;
    for _ in 0..depth {
        tx.send(make(next_id))
            .await
            .map_err(|e| client_err("sending a request", e))?;
        next_id += 1;
    }
    let mut done = 0u64;
    let mut start = Instant::now();
    let mut counted = 0u64;
    let deadline = Duration::from_secs_f64(secs);
    while let Some(msg) = replies.next().await {
        match msg.map_err(|e| client_err("InferStream reply", e))?.result {
            Some(infer_stream_response::Result::Response(_)) => {}
            other => return Err(client_err("InferStream reply", format!("{other:?}"))),
        }
        done += 1;
        if done == depth as u64 {
            start = Instant::now(); // the first `depth` replies were the warm-up
        } else if done > depth as u64 {
            counted += 1;
        }
        if start.elapsed() < deadline || done <= depth as u64 {
            tx.send(make(next_id))
                .await
                .map_err(|e| client_err("sending a request", e))?;
            next_id += 1;
        } else if done == next_id {
            break;
        }
    }
    let rate = (counted as usize * batch) as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    server.stop().await?;
    Ok(rate)
}

/// Rows per second through a teacher server's Open Inference Protocol endpoint on loopback:
/// `depth` unary `ModelInfer` calls of `batch` rows (inputs as `dtype`: F32 or U8, raw
/// contents; the `logits` output at T = 4) kept in flight on one connection for `secs`
/// seconds. (OIP has no request stream in its core protocol, so concurrency is what keeps
/// the server's batcher fed, as for any OIP client.)
pub async fn served_oip(
    ck: &Checkpoint,
    batch: usize,
    secs: f64,
    depth: usize,
    dtype: DType,
) -> Result<f64> {
    use distill_proto::pb_oip::grpc_inference_service_client::GrpcInferenceServiceClient;
    use distill_proto::pb_oip::model_infer_request::InferRequestedOutputTensor;
    use distill_proto::pb_oip::{InferParameter, ModelInferRequest, infer_parameter};

    let server = Served::start(ck, batch).await?;
    let max = server.opts.max_message_bytes;
    let client = GrpcInferenceServiceClient::connect(server.url.clone())
        .await?
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (tensor, raw) = distill_proto::oip::encode_input(
        "input",
        &inputs(batch, ck.spec.arch.input_size(), dtype)?,
    );
    let request = ModelInferRequest {
        model_name: server.member.clone(),
        inputs: vec![tensor],
        outputs: vec![InferRequestedOutputTensor {
            name: "logits".into(),
            parameters: Default::default(),
        }],
        raw_input_contents: vec![raw],
        parameters: [(
            "temperature".to_string(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::DoubleParam(4.0)),
            },
        )]
        .into(),
        ..Default::default()
    };
    let deadline = Duration::from_secs_f64(secs);
    let warm = std::sync::Arc::new(tokio::sync::Barrier::new(depth.max(1)));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..depth.max(1) {
        let (mut client, request, warm) = (client.clone(), request.clone(), warm.clone());
        callers.spawn(async move {
            // Warm up, then count until the time is up.
            infer_once(&mut client, &request).await?;
            warm.wait().await;
            let start = Instant::now();
            let mut calls = 0usize;
            while start.elapsed() < deadline {
                infer_once(&mut client, &request).await?;
                calls += 1;
            }
            Ok::<_, Error>((calls, start.elapsed().as_secs_f64()))
        });
    }
    let (mut calls, mut secs) = (0usize, 0f64);
    while let Some(r) = callers.join_next().await {
        let (c, s) = r.map_err(|e| client_err("a caller task", e))??;
        calls += c;
        secs = secs.max(s);
    }
    server.stop().await?;
    Ok((calls * batch) as f64 / secs)
}

/// One `ModelInfer` call that must come back with its logits.
async fn infer_once(
    client: &mut distill_proto::pb_oip::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    request: &distill_proto::pb_oip::ModelInferRequest,
) -> Result<()> {
    let reply = client
        .model_infer(request.clone())
        .await
        .map_err(|e| client_err("ModelInfer", e))?;
    if reply.get_ref().raw_output_contents.len() != 1 {
        return Err(client_err("ModelInfer", "the reply holds no logits"));
    }
    Ok(())
}

/// A teacher server on loopback for one measurement.
struct Served {
    opts: ServeOptions,
    url: String,
    member: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Served {
    /// Serves `ck` on a fresh loopback port, batching up to `batch` rows (at least 1,024).
    async fn start(ck: &Checkpoint, batch: usize) -> Result<Self> {
        let opts = ServeOptions {
            max_batch: batch.max(1024),
            ..Default::default()
        };
        let service = build_service(ck, &Device::Cpu, &opts)?;
        let member = service.info().member.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| client_err("binding 127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| client_err("the listener's address", e))?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            service,
            listener,
            opts.max_message_bytes,
            shutdown.clone(),
        ));
        Ok(Self {
            opts,
            url: format!("http://{addr}"),
            member,
            shutdown,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task
            .await
            .map_err(|e| client_err("the server task", e))?
    }
}

/// `batch` rows of `width` made-up pixels, as U8 or as their f32 values.
fn inputs(batch: usize, width: usize, dtype: DType) -> Result<HostTensor> {
    let pixels = (0..batch * width).map(|i| (i % 255) as u8);
    match dtype {
        DType::U8 => HostTensor::new(vec![batch, width], DType::U8, pixels.collect::<Vec<_>>()),
        _ => HostTensor::from_f32(
            vec![batch, width],
            &pixels
                .map(distill_core::data::pixel_to_f32)
                .collect::<Vec<_>>(),
        ),
    }
    .map_err(|e| client_err("inputs", e))
}
