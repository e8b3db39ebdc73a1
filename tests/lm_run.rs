//! A language-model run through the whole system over real loopback sockets: a small llama
//! teacher trained here on the toy grammar and served by a teacher server, a coordinator on
//! `grammar:0` asking it for top-k rows at every position of each window, and a student
//! worker training a smaller llama on them. The distilled student's validation perplexity
//! (scored by the coordinator) must fall below that of the same student trained on the same
//! windows with the next tokens alone (alpha 0), and a misconfigured run is refused at start
//! with a message naming the key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use candle_core::Device;
use coordinator::config::{LmConfig, RunConfig};
use distill_core::data::tokens::{TokenOptions, grammar_tokenizer, load_grammar};
use distill_core::llama::LlamaConfig;
use distill_core::lm::{LanguageModel, init_tensors};
use distill_core::lm_train::{LmStudent, TokenObjective};
use distill_core::optim::OptimConfig;
use distill_core::token_kd::Divergence;
use tokio_util::sync::CancellationToken;

const SEQ_LEN: usize = 16;

fn adamw() -> OptimConfig {
    OptimConfig {
        kind: distill_core::optim::OptimKind::AdamW,
        lr: 0.004,
        ..OptimConfig::default()
    }
}

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    distill_testkit::within(Duration::from_secs(300), what, f).await
}

/// A 2-layer teacher trained for two epochs on 3000 sentences of the grammar (a corpus whose
/// first 400 sentences are the run's data).
fn teacher() -> LanguageModel {
    let opts = TokenOptions {
        seq_len: SEQ_LEN,
        sentences: 3000,
        validation_fraction: 0.0,
        ..TokenOptions::default()
    };
    let data = load_grammar(0, &opts).unwrap();
    let cfg = LlamaConfig::small(2, 48, data.classes);
    let optim = adamw();
    let init = init_tensors(&cfg, 11, &Device::Cpu).unwrap();
    let mut t = LmStudent::new(&cfg, init, optim, &Device::Cpu).unwrap();
    let objective = TokenObjective {
        temperature: 1.0,
        alpha: 0.0,
        divergence: Divergence::ForwardKl,
    };
    let n = data.train.len();
    for epoch in 0..2 {
        let order = distill_core::data::shuffled_indices(n, 3, epoch);
        for b in order.chunks(32) {
            let w = data.train.rows_tokens(b).unwrap();
            t.step(&w, b.len(), None, &objective, 0.004).unwrap();
        }
    }
    LanguageModel::from_tensors(
        cfg,
        t.tensors().unwrap(),
        Some(grammar_tokenizer().unwrap()),
        &Device::Cpu,
    )
    .unwrap()
}

/// The run: `grammar:0` (400 sentences) in windows of 16, one member at `url`, a 1-layer
/// student of width 32, three epochs at T = 1, top-32 rows.
fn run_config(dir: &std::path::Path, url: &str, alpha: f64) -> RunConfig {
    let vocab = distill_core::data::grammar::vocabulary().len();
    let mut cfg = distill_testkit::small_run(dir.to_path_buf());
    cfg.data = "grammar:0".into();
    cfg.lm = Some(LmConfig {
        seq_len: SEQ_LEN,
        sentences: 400,
        ..LmConfig::default()
    });
    cfg.student.arch = format!("llama:1-32-{vocab}");
    cfg.soft_targets = "topk:32".parse().unwrap();
    cfg.temperature = 1.0;
    cfg.alpha = alpha;
    cfg.epochs = 3;
    cfg.batch_size = 16;
    cfg.optim = adamw();
    cfg.members = vec![distill_testkit::static_member("t", &[url])];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distilled_language_model_beats_its_baseline_through_coordinator_and_worker() {
    let shutdown = CancellationToken::new();
    let teacher = tokio::task::spawn_blocking(teacher).await.unwrap();
    let url = distill_testkit::serve_sequence_teacher(teacher, &shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for (sub, alpha) in [("distilled", 0.9), ("baseline", 0.0)] {
        let d = dir.path().join(sub);
        let mut cfg = run_config(&d, &url, alpha);
        // The distilled run keeps its windows' rows: the epochs after the first ask nothing.
        if alpha > 0.0 {
            cfg.cache = Some(coordinator::cache::CacheConfig {
                dir: d.join("cache"),
                mode: Default::default(),
                record: None,
            });
        }
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
    let (kd, base) = (&reports[0], &reports[1]);
    let ppl = |r: &coordinator::RunReport| r.student_perplexity.expect("a perplexity");
    eprintln!(
        "distilled: ppl {:.2}, {} / {} top-1 errors, agreement {:?}; baseline: ppl {:.2}, {} \
         errors, agreement {:?}; teacher {:?}",
        ppl(kd),
        kd.student_test_errors,
        kd.test_size,
        kd.student_agreement,
        ppl(base),
        base.student_test_errors,
        base.student_agreement,
        kd.teachers
    );
    // Every training window was trained on, per epoch.
    assert_eq!(kd.batches_trained, kd.batches_expected);
    // With the cache, the teacher was asked for the first epoch's windows (and those of
    // the second epoch's batches prepared before the first's were all kept), never in the
    // third; without it, for every batch.
    let per_epoch = kd.batches_expected / 3;
    assert_eq!(kd.teacher_batches_per_epoch[0], per_epoch, "{kd:?}");
    assert_eq!(
        kd.teacher_batches_per_epoch[2], 0,
        "{:?}",
        kd.teacher_batches_per_epoch
    );
    assert_eq!(
        kd.cached_batches_per_epoch.iter().sum::<u64>()
            + kd.teacher_batches_per_epoch.iter().sum::<u64>(),
        kd.batches_expected
    );
    assert_eq!(base.teacher_batches_per_epoch, vec![per_epoch; 3]);
    assert_eq!(base.batches_trained, kd.batches_trained);
    // Validation positions: windows × L, the same set for both.
    assert_eq!(kd.test_size, base.test_size);
    assert_eq!(kd.test_size % SEQ_LEN as u64, 0);
    // The teacher was asked and scored on the validation positions: better than the students.
    let teacher_errors = kd.teachers[0].test_errors;
    let teacher_ppl = kd.teachers[0]
        .perplexity_from_topk
        .expect("the teacher's perplexity");
    assert!(
        teacher_ppl > 1.0 && teacher_ppl < ppl(kd),
        "{:?}",
        kd.teachers
    );
    assert!(teacher_errors < kd.test_size, "{:?}", kd.teachers);
    assert!(
        teacher_errors < base.student_test_errors,
        "{:?}",
        kd.teachers
    );
    // The point: the soft targets help the student.
    assert!(
        ppl(kd) < 0.97 * ppl(base),
        "distilled perplexity {} is not below the baseline's {}",
        ppl(kd),
        ppl(base)
    );
    assert!(ppl(kd) > 1.0 && ppl(base).is_finite());
    // And the distilled student follows the teacher more often (the teacher's evaluation ran
    // at the start: its top-1 at every validation position).
    let agree = |r: &coordinator::RunReport| r.student_agreement.expect("an agreement");
    assert!(agree(kd) > agree(base), "{} vs {}", agree(kd), agree(base));
    shutdown.cancel();
}

#[test]
fn a_language_model_run_that_does_not_fit_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = "http://127.0.0.1:1";
    let check = |cfg: RunConfig, want: &str| {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e} lacks {want}");
    };
    let mut c = run_config(dir.path(), url, 0.5);
    c.soft_targets = "f32".parse().unwrap();
    check(c, "`soft_targets`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.student.arch = "mlp:784-32-10".into();
    check(c, "`student.arch`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.lm.as_mut().unwrap().seq_len = 0;
    check(c, "`lm.seq_len`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.data = "synthetic:0".into();
    check(c, "`lm`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.members.push(distill_testkit::static_member("u", &[url]));
    check(c, "`members`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.cache = Some(coordinator::cache::CacheConfig {
        dir: dir.path().join("cache"),
        mode: coordinator::cache::CacheMode::Offline,
        record: None,
    });
    check(c, "`cache.mode`");
    // A student that cannot read windows this long.
    let mut c = run_config(dir.path(), url, 0.5);
    c.lm.as_mut().unwrap().seq_len = 4096;
    check(c, "positions");
    // An initialisation takes the init's shape (no arch beside it), from a file that exists.
    let mut c = run_config(dir.path(), url, 0.5);
    c.student.init = Some(dir.path().join("absent"));
    check(c.clone(), "`student.arch`");
    c.student.arch = String::new();
    check(c, "`student.init`");
    let mut c = run_config(dir.path(), url, 0.5);
    c.student.init_layers = Some(vec![0]);
    check(c, "`student.init_layers`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_initialised_from_the_teacher_s_layers_starts_from_them() {
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let vocab = distill_core::data::grammar::vocabulary().len();
    let tcfg = LlamaConfig::small(2, 32, vocab);
    let tensors = init_tensors(&tcfg, 21, &Device::Cpu).unwrap();
    let teacher_dir = dir.path().join("teacher");
    let tok = grammar_tokenizer().unwrap();
    distill_core::lm::save_hf(&teacher_dir, &tcfg, &tensors, Some(&tok)).unwrap();
    let lm = LanguageModel::load(&teacher_dir, &Device::Cpu).unwrap();
    let url = distill_testkit::serve_sequence_teacher(lm, &shutdown).await;

    let d = dir.path().join("run");
    let mut cfg = run_config(&d, &url, 0.5);
    cfg.epochs = 1;
    cfg.student.arch = String::new();
    cfg.student.init = Some(teacher_dir.clone());
    cfg.student.init_layers = Some(vec![1]);
    // A learning rate so small that the trained student is its initial weights to 1e-6.
    cfg.optim.lr = 1e-9;
    let (addr, served) = distill_testkit::serve_run(cfg, &shutdown).await;
    let worker = distill_testkit::spawn_worker(addr, &d, &shutdown);
    let report = within("the run", served)
        .await
        .unwrap()
        .unwrap()
        .expect("completed");
    within("the worker", worker).await.unwrap().unwrap();
    assert_eq!(report.student_arch, format!("llama:1-32-{vocab}"));
    let ck = distill_core::checkpoint::Checkpoint::read(&report.student_checkpoint).unwrap();
    let got = ck.tensors(&Device::Cpu).unwrap();
    let worst = |a: &str, b: &str| {
        (&got[a] - &tensors[b])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(
        worst(
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.1.self_attn.v_proj.weight"
        ) < 1e-5
    );
    assert!(worst("model.embed_tokens.weight", "model.embed_tokens.weight") < 1e-5);
    // Not layer 0's: the subset was taken.
    assert!(
        worst(
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.v_proj.weight"
        ) > 1e-3
    );
    shutdown.cancel();
}
