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
    let opts = ServeOptions {
        max_batch: batch.max(1024),
        ..Default::default()
    };
    let service = build_service(ck, &Device::Cpu, &opts)?;
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
    let mut client = TeacherClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let width = ck.spec.arch.input_size();
    let input = match dtype {
        DType::U8 => HostTensor::new(
            vec![batch, width],
            DType::U8,
            (0..batch * width)
                .map(|i| (i % 255) as u8)
                .collect::<Vec<_>>(),
        )
        .map_err(|e| client_err("inputs", e))?,
        _ => HostTensor::from_f32(
            vec![batch, width],
            &(0..batch * width)
                .map(|i| distill_core::data::pixel_to_f32((i % 255) as u8))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| client_err("inputs", e))?,
    };
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
    shutdown.cancel();
    task.await.map_err(|e| client_err("the server task", e))??;
    Ok(rate)
}
