//! Teacher-server throughput against the same model's in-process forward pass, measured in one
//! run on loopback: `cargo bench -p teacher-server --bench throughput`.
//!
//! Env: `DISTILL_BENCH_ARCH` (default mlp:784-1200-1200-10), `DISTILL_BENCH_SECS` per figure
//! (default 4), `DISTILL_BENCH_DEPTH` requests kept in flight by the client (default 16, about what a
//! coordinator with `prefetch = 8` and two workers keeps in flight).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::model::TrainableModel;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::DType;
use teacher_server::bench::{in_process, served};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
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
