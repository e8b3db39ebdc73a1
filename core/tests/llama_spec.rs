//! A llama as a student spec (`llama:LAYERS-HIDDEN-VOCAB`): its parameter names and shapes are
//! the model's own, its seeded initialisation is `lm::init_tensors`', and the spec's model
//! scores windows of L + 1 tokens as one row of logits per position, equal to the llama's own
//! forward over the first L tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use distill_core::llama::{Llama, LlamaConfig};
use distill_core::model::{TrainableModel, init_params};
use distill_core::spec::{Arch, ModelSpec};

#[test]
fn the_llama_spec_parses_prints_and_validates() {
    let a = Arch::parse("llama:2-32-50").unwrap();
    assert_eq!(a, Arch::Llama(LlamaConfig::small(2, 32, 50)));
    assert_eq!(a.to_string(), "llama:2-32-50");
    assert_eq!(Arch::parse(&a.to_string()).unwrap(), a);
    assert_eq!(a.classes(), 50);
    assert!(a.llama().is_some());
    // The spec travels as JSON (the settings a worker gets): the whole config goes with it.
    let spec = ModelSpec::new(a.clone());
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
    // 4 heads do not divide 10; three sizes are needed; the vocabulary needs 2 tokens.
    for (s, want) in [
        ("llama:1-10-50", "multiple"),
        ("llama:2-32", "LAYERS-HIDDEN-VOCAB"),
        ("llama:1-32-1", "vocabulary"),
    ] {
        let e = Arch::parse(s).unwrap_err().to_string();
        assert!(e.contains(want), "{s}: {e}");
    }
}

#[test]
fn parameter_shapes_and_initialisation_are_the_llama_s_own() {
    let cfg = LlamaConfig::small(2, 32, 50);
    let arch = Arch::Llama(cfg.clone());
    let reference = distill_core::lm::init_tensors(&cfg, 9, &Device::Cpu).unwrap();
    let shapes = arch.param_shapes();
    assert_eq!(shapes.len(), reference.len());
    for (name, shape) in &shapes {
        assert_eq!(reference[name].dims(), shape.as_slice(), "{name}");
    }
    for (name, shape, values) in init_params(&arch, 9) {
        let want: Vec<f32> = reference[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values, want, "{name} {shape:?}");
    }
    // Untied: an output layer of its own.
    let untied = LlamaConfig {
        tie_word_embeddings: false,
        ..cfg
    };
    assert!(
        untied
            .param_shapes()
            .iter()
            .any(|(n, s)| n == "lm_head.weight" && s == &vec![50, 32])
    );
}

#[test]
fn the_spec_s_model_scores_every_position_of_a_window() {
    let cfg = LlamaConfig::small(2, 32, 50);
    let spec = ModelSpec::new(Arch::Llama(cfg.clone()));
    let m = TrainableModel::init(spec, 4, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
    let llama = Llama::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap();
    // Two windows of 7 tokens (as f32, the way a worker holds them): 6 positions each.
    let ids: Vec<u32> = (0..14).map(|i| (i * 7 + 3) % 50).collect();
    let x = Tensor::from_vec(
        ids.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (2, 7),
        &Device::Cpu,
    )
    .unwrap();
    let got = m.model.forward(&x).unwrap();
    assert_eq!(got.dims(), &[12, 50]);
    let inputs = Tensor::from_vec(ids, (2, 7), &Device::Cpu)
        .unwrap()
        .narrow(1, 0, 6)
        .unwrap();
    let want = llama.forward(&inputs).unwrap().reshape((12, 50)).unwrap();
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
    // A window of one token has no target.
    let one = Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap();
    let e = m.model.forward(&one).unwrap_err().to_string();
    assert!(e.contains("at least 2"), "{e}");
}

#[test]
fn a_student_starts_from_a_subset_of_a_model_s_layers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::small(3, 32, 50);
    let tensors = distill_core::lm::init_tensors(&cfg, 2, &Device::Cpu).unwrap();
    let path = dir.path().join("teacher");
    distill_core::lm::save_hf(&path, &cfg, &tensors, None).unwrap();

    let (sub, got) = distill_core::lm::read_parts(&path, Some(&[2, 0]), &Device::Cpu).unwrap();
    assert_eq!(sub.num_hidden_layers, 2);
    assert_eq!(
        distill_core::lm::read_config(&path, Some(&[2, 0])).unwrap(),
        sub
    );
    // Layer 2 became layer 0 and layer 0 layer 1; the rest is the model's.
    let same = |a: &str, b: &str| {
        let d = (&got[a] - &tensors[b])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{a} vs {b}");
    };
    same(
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
    );
    same(
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    );
    same("model.embed_tokens.weight", "model.embed_tokens.weight");
    assert!(!got.contains_key("model.layers.2.mlp.up_proj.weight"));
    assert_eq!(got.len(), sub.param_shapes().len());

    // The settings of such a student read the same tensors, in the spec's order; a digest
    // that is not theirs is refused, naming the file.
    let digest = distill_core::lm::weights_digest(&got).unwrap();
    let mut settings = distill_core::settings::StudentSettings {
        spec: ModelSpec::new(Arch::Llama(sub)),
        optim: Default::default(),
        temperature: 1.0,
        alpha: 0.5,
        epochs: 1,
        batch_size: 4,
        seed: 0,
        checkpoint_every: 0,
        precision: Default::default(),
        init: Some(distill_core::settings::StudentInit {
            path: path.clone(),
            layers: Some(vec![2, 0]),
            digest,
        }),
    };
    let params = distill_core::model::initial_params(&settings).unwrap();
    let (name, _, v) = &params[0];
    let want: Vec<f32> = got[name].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(v, &want, "{name}");
    settings.init.as_mut().unwrap().digest = "0".repeat(64);
    let e = distill_core::model::initial_params(&settings)
        .unwrap_err()
        .to_string();
    assert!(e.contains("differs") && e.contains("teacher"), "{e}");

    // Out of range and repeated layers are refused.
    for (layers, want) in [
        (&[3][..], "layer 3"),
        (&[1, 1][..], "twice"),
        (&[][..], "empty"),
    ] {
        let e = distill_core::lm::read_config(&path, Some(layers))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{layers:?}: {e}");
    }
}
