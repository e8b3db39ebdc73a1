//! `distill eval`: scores a checkpoint on a data set's test split.

use std::path::PathBuf;

use anyhow::Context;
use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_core::device::parse_device;
use distill_core::eval::{EVAL_BATCH, EvalReport, evaluate, logits};
use serde::Serialize;

/// Flags of `distill eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The checkpoint to score (any checkpoint distill writes).
    #[arg(long, env = "DISTILL_MODEL")]
    pub model: PathBuf,
    /// Data source whose test split is scored: `mnist:DIR`, `safetensors:FILE` or
    /// `synthetic[:SEED]`.
    #[arg(long, env = "DISTILL_DATA")]
    pub data: String,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Rows per inference batch.
    #[arg(long, default_value_t = EVAL_BATCH)]
    pub batch: usize,
    /// Device: `cpu` or `cuda:N` (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", env = "DISTILL_DEVICE")]
    pub device: String,
    /// Also write the test split's logits (T = 1) to this file as a NumPy `.npy` array,
    /// f32 `[rows, classes]` (for comparing with other servers and tools).
    #[arg(long, value_name = "FILE.npy")]
    pub logits_out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Output<'a> {
    model: &'a std::path::Path,
    arch: String,
    digest: String,
    data: &'a str,
    #[serde(flatten)]
    report: &'a EvalReport,
}

/// Runs `distill eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let ck = Checkpoint::read(&args.model)?;
    let model = ck.to_model(&device)?;
    let data =
        Dataset::load(&args.data).with_context(|| format!("loading data `{}`", args.data))?;
    if data.test.is_empty() {
        anyhow::bail!("data `{}` has no test split to score", data.source);
    }
    let report = evaluate(&model, &data.test, args.batch).with_context(|| {
        format!(
            "scoring {} ({}) on `{}`",
            args.model.display(),
            ck.spec.arch,
            data.source
        )
    })?;
    if let Some(path) = &args.logits_out {
        let z = logits(&model, &data.test, args.batch)?;
        let t = candle_core::Tensor::from_vec(
            z,
            (data.test.len(), ck.spec.arch.classes()),
            &candle_core::Device::Cpu,
        )?;
        t.write_npy(path)
            .with_context(|| format!("writing the logits to {}", path.display()))?;
    }
    let out = Output {
        model: &args.model,
        arch: ck.spec.arch.to_string(),
        digest: ck.digest(),
        data: &data.source,
        report: &report,
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("model     {} ({})", args.model.display(), out.arch);
        println!("data      {} (test split)", data.source);
        println!(
            "errors    {} / {} (error rate {:.2}%, accuracy {:.2}%)",
            report.errors,
            report.n,
            100.0 * (1.0 - report.accuracy),
            100.0 * report.accuracy
        );
        println!();
        println!("confusion matrix (rows: true class, columns: predicted class)");
        print!("{}", report.table());
    }
    Ok(())
}
