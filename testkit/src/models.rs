//! Checkpoints for tests: random weights (the mechanics under test need no trained model) and
//! small trained teachers (where the student must learn something).

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use distill_core::data::Dataset;
use distill_core::optim::OptimConfig;
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{CrossEntropy, TrainConfig, Trainer};

/// A checkpoint of `arch` with the random initial weights of `seed` (no training).
pub fn random_checkpoint(arch: &str, seed: u64) -> Checkpoint {
    let spec = ModelSpec::new(Arch::parse(arch).unwrap());
    let m = distill_core::model::TrainableModel::init(spec.clone(), seed, &Device::Cpu).unwrap();
    Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap()
}

/// Trains `arch` on `data` for two epochs (AdamW, lr 1e-3) and saves it at `path`.
pub fn train_teacher(data: &Dataset, arch: &str, seed: u64, path: &Path) {
    let cfg = TrainConfig {
        epochs: 2,
        seed,
        optim: OptimConfig::adamw(1e-3, 0.0),
        eval_every_epoch: false,
        ..Default::default()
    };
    let mut t = Trainer::new(
        ModelSpec::new(Arch::parse(arch).unwrap()),
        cfg,
        &Device::Cpu,
    )
    .unwrap();
    t.run(data, &mut CrossEntropy, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    t.checkpoint().unwrap().save(path).unwrap();
}
