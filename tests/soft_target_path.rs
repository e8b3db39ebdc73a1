//! The coordinator's soft-target path, asserted on the wire: what a worker receives in each
//! `TrainBatch` is compared with the ensemble's soft targets computed here, independently of the
//! coordinator. Each test runs real teacher servers (random-weight checkpoints) and the
//! coordinator in this process over loopback, opens a batch stream by hand and keeps every
//! `TrainBatch`; then, for each batch, it runs the same teacher checkpoints locally on the
//! batch's own input rows (`distill_core` forward, `z / T` in f32 as the teacher server does),
//! combines the members in plain f64 code below (never the coordinator's `combine_host`), encodes
//! per dtype with this file's own rounding and decodes the top-k bytes with this file's own
//! parser.
//!
//! Tolerances: f32 values within [`F32_ULPS`] ulps of the f64 expectation rounded to f32 (both
//! sides combine the same f32 logits in f64; only summation order and the last rounding
//! differ). f16/bf16 exactly equal to this file's round-to-nearest-even of that f32
//! expectation, except where the expectation lies within [`F32_ULPS`] f32 ulps of a rounding
//! boundary, where either neighbour is accepted (counted, and asserted to be rare).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use coordinator::RunConfig;
use distill_core::checkpoint::Checkpoint;
use distill_core::model::Model;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::pb;
use tokio_util::sync::CancellationToken;

/// Teachers and student share this architecture (the data: 784 pixels, 10 classes).
const ARCH: &str = "mlp:784-16-10";
const CLASSES: usize = 10;
/// Distillation temperature of every run here.
const T: f32 = 2.0;
/// `synthetic:5` has 12,000 training rows: 24 batches of 500 per epoch, every one over the 64
/// rows below which the teacher's forward pass would take another matmul path.
const BATCH: usize = 500;
const PER_EPOCH: usize = 24;
/// The f32 tolerance (see the module docs).
const F32_ULPS: u32 = 2;
/// Deadline of every await here.
const DEADLINE: Duration = Duration::from_secs(60);

/// `f` within [`DEADLINE`], or the test fails naming `what`.
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    distill_testkit::within(DEADLINE, what, f).await
}

/// A random-weight teacher checkpoint: `init_params(seed)` with every parameter times `scale`
/// (larger logits, so that the ways of combining members differ clearly).
fn checkpoint(seed: u64, scale: f32) -> Checkpoint {
    let arch = Arch::parse(ARCH).unwrap();
    let mut params = distill_core::model::init_params(&arch, seed);
    for (_, _, v) in &mut params {
        v.iter_mut().for_each(|x| *x *= scale);
    }
    Checkpoint {
        spec: ModelSpec::new(arch),
        params,
        extra: Default::default(),
    }
}

/// A teacher server in this process, on its own loopback listener (port 0, kept by the server).
struct Teacher {
    url: String,
    /// A clone of the served service, for its compute counters.
    svc: teacher_server::TeacherService,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Teacher {
    async fn start(member: &str, ck: &Checkpoint) -> Self {
        let opts = teacher_server::ServeOptions {
            member: member.into(),
            ..Default::default()
        };
        let svc = teacher_server::build_service(ck, &Device::Cpu, &opts).unwrap();
        let listener = within("teacher bind", tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = {
            let (svc, stop) = (svc.clone(), stop.clone());
            tokio::spawn(async move {
                teacher_server::serve(svc, listener, 64 << 20, stop)
                    .await
                    .expect("the teacher served");
            })
        };
        Self {
            url,
            svc,
            stop,
            task,
        }
    }

    /// Rows this teacher has computed (training and the coordinator's test-split evaluation).
    fn rows(&self) -> u64 {
        self.svc
            .stats()
            .rows
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shuts the server down and waits until its listener is closed.
    async fn stop(self) {
        self.stop.cancel();
        within("teacher shutdown", self.task).await.unwrap();
    }
}

/// A run config (through the documented TOML keys): one epoch of 500-row batches, no averaging
/// rounds, `members` as (name, endpoint, weight), `top` extra top-level lines (`combine`,
/// `soft_targets`, …), and a read-write soft-target cache in `cache` if given.
fn config(
    run_dir: &Path,
    members: &[(&str, &str, f32)],
    top: &str,
    cache: Option<&Path>,
) -> RunConfig {
    let mut toml = format!(
        "data = \"synthetic:5\"\nrun_dir = '{}'\nepochs = 1\nbatch_size = {BATCH}\nseed = 1\n\
         temperature = {T:?}\nprefetch = 4\nteacher_timeout_secs = 5.0\n{top}\n\
         [sync]\nevery = 0\n[student]\narch = \"{ARCH}\"\n",
        run_dir.display()
    );
    for (name, endpoint, weight) in members {
        toml += &format!(
            "[[members]]\nname = \"{name}\"\nendpoints = [\"{endpoint}\"]\nweight = {weight:?}\n"
        );
    }
    if let Some(dir) = cache {
        toml += &format!(
            "[cache]\ndir = '{}'\nmode = \"read-write\"\n",
            dir.display()
        );
    }
    RunConfig::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// Serves `cfg` in this process, opens one batch stream by hand and acks the first `n`
/// `TrainBatch`es as they come; then closes the stream, stops the coordinator (which must end
/// as stopped, releasing its soft-target cache) and returns those batches, in order.
async fn collect(cfg: RunConfig, n: usize) -> Vec<pb::TrainBatch> {
    let run = within("prepare", coordinator::prepare(cfg)).await.unwrap();
    collect_run(run, n).await
}

/// [`collect`] for a run already prepared.
async fn collect_run(run: coordinator::Run, n: usize) -> Vec<pb::TrainBatch> {
    distill_testkit::collect_batches(run, n, DEADLINE).await
}

/// Rows of a batch and its input values as the teacher server sees them (u8 pixels / 255).
fn batch_inputs(b: &pb::TrainBatch) -> (usize, Vec<f32>) {
    let t = b.inputs.as_ref().expect("inputs");
    assert_eq!(
        t.dtype,
        pb::DType::DtypeU8 as i32,
        "synthetic data is u8 pixels"
    );
    let rows = t.shape[0] as usize;
    (rows, distill_core::data::pixels_to_f32(&t.data))
}

/// What a teacher replica of `model` answers for the batch's rows at temperature `t`: its
/// logits divided by `t`, in f32 (the teacher server's `z / t`).
fn tempered_logits_at(model: &Model, b: &pb::TrainBatch, t: f32) -> Vec<f32> {
    let (rows, x) = batch_inputs(b);
    let width = x.len() / rows;
    let xt = Tensor::from_vec(x, (rows, width), &Device::Cpu).unwrap();
    let z = model
        .forward(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    z.iter().map(|v| v / t).collect()
}

/// `distill cache fill` of `cfg` in process, plaintext, within the test deadline.
async fn fill(cfg: coordinator::RunConfig, what: &str) -> coordinator::fill::FillReport {
    within(
        what,
        coordinator::fill::fill(
            cfg,
            coordinator::Security::plaintext(),
            CancellationToken::new(),
            |_, _| {},
        ),
    )
    .await
    .unwrap()
}

/// Softmax of one row, in f64, with the maximum subtracted first.
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|z| (z - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// How the members combine (docs/config.md `combine`).
#[derive(Clone, Copy)]
enum Mode {
    /// Weighted mean of the members' tempered probabilities.
    MeanProb,
    /// Softmax of the weighted mean of their tempered logits.
    MeanLogit,
}

/// The ensemble's probabilities (`rows × CLASSES`, f64) from each member's tempered logits and
/// raw weight (renormalised here), computed without the coordinator's code.
fn combine(members: &[(&[f32], f64)], mode: Mode) -> Vec<f64> {
    let total: f64 = members.iter().map(|(_, w)| w).sum();
    let rows = members[0].0.len() / CLASSES;
    let mut out = Vec::with_capacity(rows * CLASSES);
    for r in 0..rows {
        let span = r * CLASSES..(r + 1) * CLASSES;
        let mut acc = [0f64; CLASSES];
        for (z, w) in members {
            let z: Vec<f64> = z[span.clone()].iter().map(|&v| f64::from(v)).collect();
            let term = match mode {
                Mode::MeanProb => softmax(&z),
                Mode::MeanLogit => z,
            };
            for (a, t) in acc.iter_mut().zip(term) {
                *a += w / total * t;
            }
        }
        match mode {
            Mode::MeanProb => out.extend(acc),
            Mode::MeanLogit => out.extend(softmax(&acc)),
        }
    }
    out
}

/// The ensemble's expected probabilities for batch `b`: `members` as (model, raw weight).
fn expected(b: &pb::TrainBatch, members: &[(&Model, f64)], mode: Mode) -> Vec<f64> {
    expected_at(b, members, mode, T)
}

/// [`expected`] at temperature `t`.
fn expected_at(b: &pb::TrainBatch, members: &[(&Model, f64)], mode: Mode, t: f32) -> Vec<f64> {
    let logits: Vec<Vec<f32>> = members
        .iter()
        .map(|(m, _)| tempered_logits_at(m, b, t))
        .collect();
    let with_weights: Vec<(&[f32], f64)> = logits
        .iter()
        .zip(members)
        .map(|(z, (_, w))| (z.as_slice(), *w))
        .collect();
    combine(&with_weights, mode)
}

/// Distance in ulps of two positive finite f32s.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

/// Largest absolute difference of two equal-length vectors.
fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// The batch's dense soft-target tensor, checked to be `rows × CLASSES` of `dtype` and to be the
/// only soft targets on the batch.
fn dense<'a>(b: &'a pb::TrainBatch, dtype: pb::DType, encoding: &str) -> &'a [u8] {
    assert_eq!(b.encoding, encoding, "batch {}: encoding field", b.index);
    assert!(
        b.topk_targets.is_none(),
        "batch {}: top-k field too",
        b.index
    );
    let t = b.soft_targets.as_ref().expect("dense soft targets");
    assert_eq!(t.dtype, dtype as i32, "batch {}: dtype", b.index);
    let rows = batch_inputs(b).0;
    assert_eq!(t.shape, [rows as u64, CLASSES as u64]);
    let width = if dtype == pb::DType::DtypeF32 { 4 } else { 2 };
    assert_eq!(t.data.len(), rows * CLASSES * width);
    &t.data
}

/// The batch's f32 soft targets.
fn dense_f32(b: &pb::TrainBatch) -> Vec<f32> {
    assert_eq!(b.temperature, T);
    dense_f32_any_t(b)
}

/// The batch's f32 soft targets, at whatever temperature the batch says.
fn dense_f32_any_t(b: &pb::TrainBatch) -> Vec<f32> {
    dense(b, pb::DType::DtypeF32, "f32")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Asserts `got` is `want` within [`F32_ULPS`] ulps, element by element.
fn assert_f32_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w = w as f32;
        assert!(
            ulps(g, w) <= F32_ULPS,
            "{what}: row {} class {}: got {g:e}, expected {w:e} ({} ulps apart)",
            i / CLASSES,
            i % CLASSES,
            ulps(g, w)
        );
    }
}

/// Round-to-nearest-even of `v` at bit `shift` (`shift` ≥ 1): `v >> shift`, rounded.
fn round_shift(v: u32, shift: u32) -> u32 {
    let (q, rem, half) = (v >> shift, v & ((1 << shift) - 1), 1 << (shift - 1));
    if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    }
}

/// IEEE binary16 bits of a finite f32, round to nearest even (subnormals and overflow to ∞
/// included).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    let e = exp - 127 + 15; // the f16 biased exponent
    let magnitude = if e >= 31 {
        0x7c00
    } else if e >= 1 {
        // A carry out of the significand moves into the exponent (up to ∞), as it should.
        ((e as u32) << 10) + round_shift(man, 13)
    } else if e >= -10 {
        // f16 subnormal: the 24-bit significand in units of 2^-24.
        round_shift(man | 0x80_0000, (14 - e) as u32)
    } else {
        0 // below half the smallest subnormal
    };
    sign | magnitude.min(0x7c00) as u16
}

/// The value of f16 bits (finite).
fn f16_value(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = (i32::from((h >> 10) & 0x1f), f64::from(h & 0x3ff));
    sign * match exp {
        0 => man * 2f64.powi(-24),
        e => (1024.0 + man) * 2f64.powi(e - 25),
    }
}

/// bfloat16 bits of a finite f32, round to nearest even.
fn bf16_bits(x: f32) -> u16 {
    round_shift(x.to_bits(), 16) as u16
}

/// A 2-byte float format of the wire.
#[derive(Clone, Copy, Debug)]
enum Half {
    F16,
    Bf16,
}

impl Half {
    fn bits(self, x: f32) -> u16 {
        match self {
            Half::F16 => f16_bits(x),
            Half::Bf16 => bf16_bits(x),
        }
    }
}

/// Asserts each 2-byte element of `got` is the rounding of the f32 expectation (see the module
/// docs); returns how many expectations lay so close to a rounding boundary that either
/// neighbour was accepted.
fn assert_half_exact(got: &[u8], want: &[f64], fmt: Half, what: &str) -> usize {
    assert_eq!(got.len(), 2 * want.len(), "{what}: length");
    let mut ambiguous = 0;
    for (i, (g, &w)) in got.chunks_exact(2).zip(want).enumerate() {
        let g = u16::from_le_bytes([g[0], g[1]]);
        let w = w as f32;
        assert!(w > 0.0, "{what}: a probability of 0 in the expectation");
        let lo = fmt.bits(f32::from_bits(w.to_bits() - F32_ULPS));
        let hi = fmt.bits(f32::from_bits(w.to_bits() + F32_ULPS));
        if lo != hi {
            ambiguous += 1;
        }
        assert!(
            g == lo || g == hi,
            "{what}: row {} class {}: got {fmt:?} bits {g:#06x}, expected {:#06x} (the rounding \
             of {w:e})",
            i / CLASSES,
            i % CLASSES,
            fmt.bits(w)
        );
    }
    ambiguous
}

/// Asserts the batch's top-k soft targets (the wire format of `TopKTargets`: per row ln(rest
/// mass) as f32, k u16 class indices, k f16 values `ln p_j − ln p_max`) against the expected
/// dense probabilities `want`, decoded by hand.
fn assert_topk(b: &pb::TrainBatch, want: &[f64], k: usize) {
    let what = format!("batch {}", b.index);
    assert_eq!(b.encoding, format!("topk:{k}"), "{what}: encoding field");
    assert!(
        b.soft_targets.is_none(),
        "{what}: dense soft targets on a top-k run: {:?}",
        b.soft_targets.as_ref().map(|t| (t.dtype, t.data.len()))
    );
    let t = b.topk_targets.as_ref().expect("top-k soft targets");
    assert_eq!(
        (t.k as usize, t.classes as usize, t.value_dtype),
        (k, CLASSES, pb::DType::DtypeF16 as i32),
        "{what}: top-k metadata"
    );
    let rows = batch_inputs(b).0;
    let row_bytes = 4 + k * (2 + 2);
    assert_eq!(
        t.data.len(),
        rows * row_bytes,
        "{what}: {k} entries per row"
    );
    for (r, row) in t.data.chunks_exact(row_bytes).enumerate() {
        let p = &want[r * CLASSES..(r + 1) * CLASSES];
        let rest = f32::from_le_bytes(row[..4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes([row[o], row[o + 1]]);
        let idx: Vec<usize> = (0..k).map(|j| usize::from(u16_at(4 + 2 * j))).collect();
        let values: Vec<u16> = (0..k).map(|j| u16_at(4 + 2 * k + 2 * j)).collect();
        // The k most probable classes, most probable first (a near tie may come either way).
        let mut order: Vec<usize> = (0..CLASSES).collect();
        order.sort_by(|&a, &c| p[c].total_cmp(&p[a]).then(a.cmp(&c)));
        for (j, (&g, &e)) in idx.iter().zip(&order).enumerate() {
            assert!(g < CLASSES, "{what} row {r}: class {g}");
            assert!(
                g == e || (p[g] - p[e]).abs() <= 1e-6 * p[e],
                "{what} row {r}: kept class {j} is {g} (p = {}), expected {e} (p = {}); row {p:?}",
                p[g],
                p[e]
            );
        }
        let mut distinct = idx.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            k,
            "{what} row {r}: repeated classes {idx:?}"
        );
        // Values: the f16 of ln(p_j / p_max), within 1e-6 of it before the rounding (the
        // coordinator takes ln of f32 probabilities).
        let p_max = p[idx[0]];
        for (j, (&i, &v)) in idx.iter().zip(&values).enumerate() {
            let d = (p[i] / p_max).ln();
            let lo = f16_value(f16_bits((d - 1e-6) as f32));
            let hi = f16_value(f16_bits((d + 1e-6) as f32));
            let got = f16_value(v);
            assert!(
                lo <= got && got <= hi,
                "{what} row {r}: value {j} (class {i}) is {got}, expected the f16 of {d}"
            );
        }
        // The rest's log-mass.
        let kept: f64 = idx.iter().map(|&i| p[i]).sum();
        let total: f64 = p.iter().sum();
        let want_rest = ((total - kept) / total).ln();
        assert!(
            (f64::from(rest) - want_rest).abs() <= 2e-6,
            "{what} row {r}: ln(rest mass) is {rest}, expected {want_rest}"
        );
    }
}

/// The batches came in order (epoch, index), each of 500 rows, naming `members` as the ones
/// combined and flagged `cached` (or not).
fn assert_batches(batches: &[pb::TrainBatch], members: &[&str], cached: bool) {
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(
            (b.epoch as usize, b.index as usize),
            (i / PER_EPOCH, i % PER_EPOCH)
        );
        assert_eq!(b.members, members, "batch {i}: members");
        assert_eq!(b.cached, cached, "batch {i}: cached flag");
        assert_eq!(batch_inputs(b).0, BATCH);
    }
}

/// This file's own rounding, pinned on known bit patterns (ties to even, f16 subnormals and
/// overflow), so the comparisons above do not rest on an unchecked converter.
#[test]
fn own_rounding_matches_known_bit_patterns() {
    let f16_cases = [
        (1.0f32, 0x3c00u16),
        (0.25, 0x3400),
        (1.0 / 3.0, 0x3555),
        (1.0 + 2f32.powi(-11), 0x3c00),       // a tie: to even
        (1.0 + 3.0 * 2f32.powi(-11), 0x3c02), // a tie: to even
        (2f32.powi(-24), 0x0001),             // the smallest subnormal
        (2f32.powi(-25), 0x0000),             // half of it: a tie, to even (0)
        (1.5 * 2f32.powi(-25), 0x0001),
        (6.1e-5, 0x03ff), // the largest subnormal
        (65504.0, 0x7bff),
        (65520.0, 0x7c00), // rounds up past the largest finite
        (-2.0, 0xc000),
    ];
    for (x, bits) in f16_cases {
        assert_eq!(f16_bits(x), bits, "f16 of {x:e}");
    }
    for bits in [0x0001u16, 0x03ff, 0x0400, 0x3555, 0x7bff, 0xc000] {
        assert_eq!(
            f16_bits(f16_value(bits) as f32),
            bits,
            "{bits:#06x} round trip"
        );
    }
    assert_eq!(f16_value(0x3555), 0.333251953125);
    let bf16_cases = [
        (1.0f32, 0x3f80u16),
        (1.0 / 3.0, 0x3eab),
        (f32::from_bits(0x3f80_8000), 0x3f80), // a tie: to even
        (f32::from_bits(0x3f81_8000), 0x3f82), // a tie: to even
        (f32::from_bits(0x3f80_8001), 0x3f81),
    ];
    for (x, bits) in bf16_cases {
        assert_eq!(bf16_bits(x), bits, "bf16 of {x:e}");
    }
}

/// Two teachers of clearly different opinions: `a` and `b`.
fn two_teachers() -> (Checkpoint, Checkpoint) {
    (checkpoint(11, 4.0), checkpoint(12, 4.0))
}

/// (a) Member weights 3 and 1 under the default `mean-prob`: every f32 soft target is the 3:1
/// weighted mean of the members' tempered probabilities; not the 1:1 mean, nor 1:3.
#[tokio::test]
async fn member_weights_reach_the_worker_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (cka, ckb) = two_teachers();
    let (ta, tb) = (
        Teacher::start("a", &cka).await,
        Teacher::start("b", &ckb).await,
    );
    let cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "",
        None,
    );
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], false);
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    for b in &batches {
        let got = dense_f32(b);
        let want = expected(b, &[(&ma, 3.0), (&mb, 1.0)], Mode::MeanProb);
        assert_f32_close(&got, &want, &format!("batch {} (weights 3:1)", b.index));
        // The weights are visible: 1:1 or 1:3 would be far outside the tolerance.
        for (other, w) in [("1:1", [1.0, 1.0]), ("1:3", [1.0, 3.0])] {
            let alt = expected(b, &[(&ma, w[0]), (&mb, w[1])], Mode::MeanProb);
            let d = max_diff(&got, &alt);
            assert!(
                d > 1e-3,
                "batch {}: weights {other} are only {d} away",
                b.index
            );
        }
    }
    ta.stop().await;
    tb.stop().await;
}

/// (b) `combine = "mean-logit"`: the softmax of the 3:1 weighted mean of the tempered logits (a
/// normalised geometric mean), clearly not the mean of the probabilities.
#[tokio::test]
async fn mean_logit_is_the_softmax_of_the_weighted_mean_of_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (cka, ckb) = two_teachers();
    let (ta, tb) = (
        Teacher::start("a", &cka).await,
        Teacher::start("b", &ckb).await,
    );
    let cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "combine = \"mean-logit\"",
        None,
    );
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], false);
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    for b in &batches {
        let got = dense_f32(b);
        let members = [(&ma, 3.0), (&mb, 1.0)];
        let want = expected(b, &members, Mode::MeanLogit);
        assert_f32_close(&got, &want, &format!("batch {} (mean-logit)", b.index));
        let d = max_diff(&got, &expected(b, &members, Mode::MeanProb));
        assert!(d > 1e-3, "batch {}: mean-prob is only {d} away", b.index);
    }
    ta.stop().await;
    tb.stop().await;
}

/// (c) A dense 2-byte encoding on the wire: the batch says so, carries 2 bytes per class, and
/// every element is exactly the rounding of the f32 expectation (module docs).
async fn half_soft_targets_are_the_rounded_ensemble(fmt: Half) {
    let (name, dtype) = match fmt {
        Half::F16 => ("f16", pb::DType::DtypeF16),
        Half::Bf16 => ("bf16", pb::DType::DtypeBf16),
    };
    let dir = tempfile::tempdir().unwrap();
    let (cka, ckb) = two_teachers();
    let (ta, tb) = (
        Teacher::start("a", &cka).await,
        Teacher::start("b", &ckb).await,
    );
    let cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        &format!("soft_target_dtype = \"{name}\""),
        None,
    );
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], false);
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    let (mut ambiguous, mut elements) = (0, 0);
    for b in &batches {
        let want = expected(b, &[(&ma, 3.0), (&mb, 1.0)], Mode::MeanProb);
        let got = dense(b, dtype, name);
        ambiguous += assert_half_exact(got, &want, fmt, &format!("batch {} ({name})", b.index));
        elements += want.len();
    }
    // Only expectations within a few f32 ulps of a rounding boundary may go either way.
    assert!(
        ambiguous * 200 < elements,
        "{name}: {ambiguous} of {elements} elements were near a rounding boundary"
    );
    ta.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn f16_soft_targets_are_the_rounded_ensemble() {
    half_soft_targets_are_the_rounded_ensemble(Half::F16).await;
}

#[tokio::test]
async fn bf16_soft_targets_are_the_rounded_ensemble() {
    half_soft_targets_are_the_rounded_ensemble(Half::Bf16).await;
}

/// (d) `soft_targets = "topk:3"`: the wire carries the top-k encoding (3 entries per row:
/// 16 bytes, not 40 of dense f32), with the right classes, values and rest mass.
#[tokio::test]
async fn top_k_soft_targets_travel_in_the_top_k_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let (cka, ckb) = two_teachers();
    let (ta, tb) = (
        Teacher::start("a", &cka).await,
        Teacher::start("b", &ckb).await,
    );
    let cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "soft_targets = \"topk:3\"",
        None,
    );
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], false);
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    for b in &batches {
        let want = expected(b, &[(&ma, 3.0), (&mb, 1.0)], Mode::MeanProb);
        assert_topk(b, &want, 3);
    }
    ta.stop().await;
    tb.stop().await;
}

/// Rows held by every key of the soft-target cache in `dir`, opened read-only (the coordinator
/// that wrote it has stopped).
fn cached_rows(dir: &Path) -> Vec<u64> {
    let cache = coordinator::cache::SoftTargetCache::open_read_only(dir).unwrap();
    cache.keys().unwrap().iter().map(|k| k.rows).collect()
}

/// (e) Under `degrade`, each member that answered is recorded and one that did not is not:
/// member `b` answers `Describe` at start and then goes down; every batch of the epoch is `a`'s
/// alone and not flagged cached, and only `a`'s record fills. A second run with `b` back asks
/// `b` alone (a's rows come from its record) and gets the full ensemble; a third then hits.
#[tokio::test]
async fn a_degraded_batch_records_the_members_that_answered() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (cka, ckb) = two_teachers();
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    let ta = Teacher::start("a", &cka).await;

    // Run 1: b is up for the start-up check, then down for every batch.
    let tb = Teacher::start("b", &ckb).await;
    let cfg = config(
        &dir.path().join("run1"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "teacher_policy = \"degrade\"",
        Some(&cache),
    );
    let run = within("prepare", coordinator::prepare(cfg)).await.unwrap();
    tb.stop().await;
    let batches = collect_run(run, PER_EPOCH).await;
    assert_batches(&batches, &["a"], false);
    for b in &batches {
        let got = dense_f32(b);
        let want = expected(b, &[(&ma, 3.0)], Mode::MeanProb);
        assert_f32_close(&got, &want, &format!("degraded batch {}", b.index));
    }
    assert_eq!(
        cached_rows(&cache),
        [(PER_EPOCH * BATCH) as u64],
        "a's record alone"
    );

    // Run 2: b is back (a new replica of the same checkpoint): b is asked, a is not.
    let tb = Teacher::start("b", &ckb).await;
    let cfg = config(
        &dir.path().join("run2"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "teacher_policy = \"degrade\"",
        Some(&cache),
    );
    let (a_before, b_before) = (ta.rows(), tb.rows());
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], false);
    assert!(
        tb.rows() - b_before >= (PER_EPOCH * BATCH) as u64,
        "member b was asked for {} rows",
        tb.rows() - b_before
    );
    // At most the coordinator's 2,000-row test-split check reached a.
    assert!(
        ta.rows() - a_before <= 2000,
        "member a was asked for {} rows",
        ta.rows() - a_before
    );
    let mut full = Vec::new();
    for b in &batches {
        let got = dense_f32(b);
        let want = expected(b, &[(&ma, 3.0), (&mb, 1.0)], Mode::MeanProb);
        assert_f32_close(
            &got,
            &want,
            &format!("batch {} after the degraded run", b.index),
        );
        full.push(b.soft_targets.clone());
    }
    assert_eq!(cached_rows(&cache), [(PER_EPOCH * BATCH) as u64; 2]);

    // Run 3: both records now hit, with run 2's bytes.
    let cfg = config(
        &dir.path().join("run3"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "teacher_policy = \"degrade\"",
        Some(&cache),
    );
    let batches = collect(cfg, PER_EPOCH).await;
    assert_batches(&batches, &["a", "b"], true);
    for (b, f) in batches.iter().zip(&full) {
        assert_eq!(&b.soft_targets, f, "batch {}: the cached bytes", b.index);
    }
    ta.stop().await;
    tb.stop().await;
}

/// An offline config over `cache`: the members named with their weights and no endpoint, at
/// temperature `t`, with `top` extra lines.
fn offline(run_dir: &Path, cache: &Path, members: &[(&str, f32)], t: f32, top: &str) -> RunConfig {
    let mut toml = format!(
        "data = \"synthetic:5\"\nrun_dir = '{}'\nepochs = 1\nbatch_size = {BATCH}\nseed = 1\n\
         temperature = {t:?}\nprefetch = 4\n{top}\n[sync]\nevery = 0\n[student]\narch = \"{ARCH}\"\n\
         [cache]\ndir = '{}'\nmode = \"offline\"\n",
        run_dir.display(),
        cache.display()
    );
    for (name, weight) in members {
        toml += &format!("[[members]]\nname = \"{name}\"\nendpoints = []\nweight = {weight:?}\n");
    }
    RunConfig::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// The acceptance of the member records: `distill cache fill`'s pass at T = 2 (weights 3:1,
/// `mean-prob`) serves runs at other temperatures, another combination, other weights and a
/// subset of the members, each batch equal to the targets computed here from the teachers'
/// own checkpoints at that T (to f32 rounding), while the teachers, still serving, compute
/// nothing more.
#[tokio::test]
async fn a_filled_cache_serves_any_temperature_combination_and_weights_without_the_teachers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (cka, ckb) = two_teachers();
    let (ma, mb) = (
        cka.to_model(&Device::Cpu).unwrap(),
        ckb.to_model(&Device::Cpu).unwrap(),
    );
    let (ta, tb) = (
        Teacher::start("a", &cka).await,
        Teacher::start("b", &ckb).await,
    );
    let cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 3.0), ("b", &tb.url, 1.0)],
        "",
        Some(&cache),
    );
    let report = fill(cfg.clone(), "fill").await;
    assert_eq!(
        (report.batches, report.asked_batches),
        (PER_EPOCH as u64, PER_EPOCH as u64)
    );
    assert!(coordinator::fill::is_complete(&report), "{report:?}");
    // A second fill asks nothing.
    let again = fill(cfg, "fill again").await;
    assert_eq!(again.asked_batches, 0);
    let (ra, rb) = (ta.rows(), tb.rows());

    // (label, members and weights, T, soft-target encoding, combination)
    type Case<'a> = (&'a str, &'a [(&'a str, f32)], f32, &'a str, Mode);
    let cases: [Case; 4] = [
        ("t5", &[("a", 3.0), ("b", 1.0)], 5.0, "", Mode::MeanProb),
        ("t0.5", &[("a", 3.0), ("b", 1.0)], 0.5, "", Mode::MeanProb),
        (
            "logit-weights",
            &[("a", 1.0), ("b", 2.0)],
            20.0,
            "combine = \"mean-logit\"",
            Mode::MeanLogit,
        ),
        ("b-alone", &[("b", 1.0)], 4.0, "", Mode::MeanProb),
    ];
    for (name, members, t, top, mode) in cases {
        let cfg = offline(&dir.path().join(name), &cache, members, t, top);
        let batches = collect(cfg, PER_EPOCH).await;
        let names: Vec<&str> = members.iter().map(|(n, _)| *n).collect();
        assert_batches(&batches, &names, true);
        for b in &batches {
            assert_eq!(b.temperature, t);
            let models: Vec<(&Model, f64)> = members
                .iter()
                .map(|(n, w)| (if *n == "a" { &ma } else { &mb }, f64::from(*w)))
                .collect();
            let want = expected_at(b, &models, mode, t);
            let got = dense_f32_any_t(b);
            let d = max_diff(&got, &want);
            assert!(
                d <= 1e-5,
                "{name}: batch {}: {d} from the teachers' targets",
                b.index
            );
            // Not vacuous: the targets at the fill's T are elsewhere.
            if t != T {
                let other = expected_at(b, &models, mode, T);
                assert!(max_diff(&got, &other) > 1e-3, "{name}: batch {}", b.index);
            }
        }
    }
    assert_eq!((ta.rows(), tb.rows()), (ra, rb), "a teacher was asked");
    ta.stop().await;
    tb.stop().await;
}

/// Top-k member records (`[cache] record = "top-k:3"`): at the fill's T the three kept classes
/// carry their exact probabilities; at another T every row is within the documented bound of
/// the exact targets (total variation at most the larger of the exact and the served mass
/// outside the kept classes).
#[tokio::test]
async fn top_k_records_serve_other_temperatures_within_the_stated_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (cka, _) = two_teachers();
    let ma = cka.to_model(&Device::Cpu).unwrap();
    let ta = Teacher::start("a", &cka).await;
    let mut cfg = config(
        &dir.path().join("run"),
        &[("a", &ta.url, 1.0)],
        "",
        Some(&cache),
    );
    if let Some(c) = cfg.cache.as_mut() {
        c.record = Some("top-k:3".parse().unwrap());
    }
    let report = fill(cfg, "fill").await;
    assert!(coordinator::fill::is_complete(&report), "{report:?}");
    let rows_before = ta.rows();
    let mut worst = 0f64;
    for t in [T, 1.0, 8.0] {
        let mut cfg = offline(
            &dir.path().join(format!("t{t}")),
            &cache,
            &[("a", 1.0)],
            t,
            "",
        );
        if let Some(c) = cfg.cache.as_mut() {
            c.record = Some("top-k:3".parse().unwrap());
        }
        let batches = collect(cfg, PER_EPOCH).await;
        for b in &batches {
            let want = expected_at(b, &[(&ma, 1.0)], Mode::MeanProb, t);
            let got = dense_f32_any_t(b);
            for (r, (g, w)) in got.chunks(CLASSES).zip(want.chunks(CLASSES)).enumerate() {
                let mut order: Vec<usize> = (0..CLASSES).collect();
                order.sort_by(|&i, &j| w[j].total_cmp(&w[i]));
                let rest = |d: &dyn Fn(usize) -> f64| order[3..].iter().map(|&i| d(i)).sum::<f64>();
                let bound = rest(&|i| w[i]).max(rest(&|i| f64::from(g[i])));
                let tv: f64 = g
                    .iter()
                    .zip(w)
                    .map(|(a, e)| (f64::from(*a) - e).abs())
                    .sum::<f64>()
                    / 2.0;
                assert!(
                    tv <= bound + 1e-5,
                    "T={t} batch {} row {r}: TV {tv} > {bound}",
                    b.index
                );
                worst = worst.max(tv);
                if t == T {
                    for &i in &order[..3] {
                        assert!((f64::from(g[i]) - w[i]).abs() < 1e-5, "T_c: kept class {i}");
                    }
                }
            }
        }
    }
    assert!(
        worst > 0.0,
        "top-3 of 10 classes lost nothing: the test is vacuous"
    );
    assert_eq!(ta.rows(), rows_before, "the teacher was asked");
    ta.stop().await;
}

/// (f) A member whose weights digest changed misses the cache: run 1 fills the cache from
/// teacher `t`; run 2 serves member `t` from another checkpoint (same name, same weight) and
/// must ask it and get its new targets; run 3, with the first checkpoint again, hits.
#[tokio::test]
async fn a_changed_weights_digest_misses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (old, new) = two_teachers();
    let (m_old, m_new) = (
        old.to_model(&Device::Cpu).unwrap(),
        new.to_model(&Device::Cpu).unwrap(),
    );
    let run = |name: &str, url: &str| {
        config(&dir.path().join(name), &[("t", url, 1.0)], "", Some(&cache))
    };

    let t = Teacher::start("t", &old).await;
    let batches = collect(run("run1", &t.url), PER_EPOCH).await;
    assert_batches(&batches, &["t"], false);
    let first: Vec<_> = batches.iter().map(|b| b.soft_targets.clone()).collect();
    t.stop().await;
    assert_eq!(cached_rows(&cache), [(PER_EPOCH * BATCH) as u64]);

    // Re-trained: another checkpoint under the same member name.
    let t = Teacher::start("t", &new).await;
    let batches = collect(run("run2", &t.url), PER_EPOCH).await;
    assert_batches(&batches, &["t"], false);
    assert!(
        t.rows() >= (PER_EPOCH * BATCH) as u64,
        "the new teacher was asked for {} rows",
        t.rows()
    );
    for b in &batches {
        let got = dense_f32(b);
        let want = expected(b, &[(&m_new, 1.0)], Mode::MeanProb);
        assert_f32_close(&got, &want, &format!("batch {} (new weights)", b.index));
        let d = max_diff(&got, &expected(b, &[(&m_old, 1.0)], Mode::MeanProb));
        assert!(
            d > 1e-3,
            "batch {}: the old targets are only {d} away",
            b.index
        );
    }
    t.stop().await;

    // The first checkpoint again: its rows are still there, and hit.
    let t = Teacher::start("t", &old).await;
    let batches = collect(run("run3", &t.url), PER_EPOCH).await;
    assert_batches(&batches, &["t"], true);
    for (b, f) in batches.iter().zip(&first) {
        assert_eq!(&b.soft_targets, f, "batch {}: run 1's bytes", b.index);
    }
    // No training request reached it (only the coordinator's 2,000-row test-split check).
    assert!(
        t.rows() <= 2000,
        "the teacher was asked for {} rows",
        t.rows()
    );
    t.stop().await;
}
