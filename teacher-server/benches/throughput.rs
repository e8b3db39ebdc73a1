//! Teacher-server throughput against the same model's in-process forward pass, measured in one
//! run on loopback: `cargo bench -p teacher-server --bench throughput`.
//!
//! Env: `DISTILL_BENCH_ARCH` (default mlp:784-1200-1200-10), `DISTILL_BENCH_SECS` per figure
//! (default 4), `DISTILL_BENCH_DEPTH` requests kept in flight by the client (default 16, about what a
//! coordinator with `prefetch = 8` and two workers keeps in flight).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use distill_core::checkpoint::Checkpoint;
use distill_core::model::TrainableModel;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{InferRequest, infer_stream_response};
use distill_proto::{DType, HostTensor};
use teacher_server::{ServeOptions, build_service, serve};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn in_process(ck: &Checkpoint, batch: usize, secs: f64) -> anyhow::Result<f64> {
    let m = ck.to_model(&Device::Cpu)?;
    let width = ck.spec.arch.input_size();
    let x: Vec<f32> = (0..batch * width)
        .map(|i| (i % 255) as f32 / 255.0)
        .collect();
    let run = || -> anyhow::Result<()> {
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

async fn served(
    ck: &Checkpoint,
    batch: usize,
    secs: f64,
    depth: usize,
    dtype: DType,
) -> anyhow::Result<f64> {
    let opts = ServeOptions {
        max_batch: batch.max(1024),
        ..Default::default()
    };
    let service = build_service(ck, &Device::Cpu, &opts)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
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
        )?,
        _ => HostTensor::from_f32(
            vec![batch, width],
            &(0..batch * width)
                .map(|i| (i % 255) as f32 / 255.0)
                .collect::<Vec<_>>(),
        )?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<InferRequest>(depth);
    let mut replies = client
        .infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
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
        tx.send(make(next_id)).await?;
        next_id += 1;
    }
    let mut done = 0u64;
    let mut start = Instant::now();
    let mut counted = 0u64;
    let deadline = Duration::from_secs_f64(secs);
    while let Some(msg) = replies.next().await {
        match msg?.result {
            Some(infer_stream_response::Result::Response(_)) => {}
            other => anyhow::bail!("bad reply {other:?}"),
        }
        done += 1;
        if done == depth as u64 {
            start = Instant::now(); // the first `depth` replies were the warm-up
        } else if done > depth as u64 {
            counted += 1;
        }
        if start.elapsed() < deadline || done <= depth as u64 {
            tx.send(make(next_id)).await?;
            next_id += 1;
        } else if done == next_id {
            break;
        }
    }
    let rate = (counted as usize * batch) as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    shutdown.cancel();
    task.await??;
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    let arch = env_or("DISTILL_BENCH_ARCH", "mlp:784-1200-1200-10".to_string());
    let secs: f64 = env_or("DISTILL_BENCH_SECS", 4.0);
    let depth: usize = env_or("DISTILL_BENCH_DEPTH", 16);
    let spec = ModelSpec::new(Arch::parse(&arch)?);
    let m = TrainableModel::init(spec.clone(), 0, &Device::Cpu)?;
    let ck = Checkpoint::from_tensors(spec, &m.named_tensors()?)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "teacher throughput, {arch}, {depth} requests in flight, {secs} s per figure, threads: {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    println!(
        "{:>6} {:>16} {:>16} {:>16} {:>10} {:>10}",
        "batch", "in-process/s", "server f32/s", "server u8/s", "f32 ratio", "u8 ratio"
    );
    for batch in [128usize, 1024] {
        let local = in_process(&ck, batch, secs)?;
        let f = rt.block_on(served(&ck, batch, secs, depth, DType::F32))?;
        let u = rt.block_on(served(&ck, batch, secs, depth, DType::U8))?;
        println!(
            "{batch:>6} {local:>16.0} {f:>16.0} {u:>16.0} {:>10.3} {:>10.3}",
            f / local,
            u / local
        );
    }
    Ok(())
}
