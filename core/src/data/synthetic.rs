//! `synthetic[:SEED]`: a deterministic, generated image classification set — the embedded
//! default for `distill demo` and for tests.
//!
//! 28×28×1 images stored as `u8` (so the same 8-bit pipeline as MNIST is exercised), 10
//! classes, [`DEFAULT_TRAIN`] training and [`DEFAULT_TEST`] test rows, generated in a fraction of
//! a second. It is built so that distillation has something to transfer: a big network does
//! clearly better than a small one, and the classes have a similarity structure that a good
//! teacher's soft targets reveal but the hard labels do not.
//!
//! # How it is generated
//!
//! Everything is drawn from ChaCha8 seeded with `SEED`: stream 0 draws the *structure*, stream 1
//! the training rows, stream 2 the test rows. Only `+ − × ÷`, `sqrt` and rounding are used on
//! floats (no `sin`/`cos`, whose results vary across libm versions), so a seed gives the same
//! bytes on every platform. Coordinates are in pixels, pixel `(x, y)` having its centre at
//! `(x + ½, y + ½)`.
//!
//! **Structure.** A *stroke* is a line segment with a centre, a length and a direction (drawn as
//! a uniform `u` in [-1, 1] → direction `((1−u²), 2u) / (1+u²)`, covering every orientation).
//! - The 10 classes form 5 **pairs** `{2g, 2g+1}`. Each pair `g` has a *base shape* of
//!   [`BASE_STROKES`] strokes (centres uniform in [7, 21]², lengths in [6, 14]).
//! - Each class has [`MODES`] **modes** (the class is multi-modal). Mode `(c, m)` is the base
//!   shape of `c`'s pair with every endpoint moved by a fixed offset uniform in
//!   ±[`MODE_DEFORM`] px, plus one short *mark* stroke (length in [4, 7], centre uniform in
//!   [6, 22]²) that belongs to that mode alone.
//!
//! So the two classes of a pair share their bulk and differ only in which marks appear: a
//! teacher's second choice is usually the pair partner, and a faint mark makes an image
//! genuinely ambiguous.
//!
//! **Rows.** Row `i` has label `i mod 10` (balanced classes) and a uniformly drawn mode; then, in
//! this order of draws:
//! 1. a global similarity transform about the centre (14, 14): rotation with half-angle tangent
//!    uniform in ±[`ROTATE`] (about ±10°), scale uniform in [0.9, 1.1], shift uniform in
//!    ±[`SHIFT`] px in x and y — a label-independent nuisance;
//! 2. a stroke half-width uniform in [0.6, 1.2] px for the whole image;
//! 3. for each base stroke, then the mark: both endpoints moved by uniform ±[`JITTER`] px, an
//!    intensity uniform in [0.6, 1] (base strokes) or [[`MARK_MIN`], 1] (the mark);
//! 4. with probability [`P_DISTRACTOR`], a *distractor* stroke drawn like a mark but anywhere in
//!    [4, 24]², intensity in [0.3, 0.9], independent of the label;
//! 5. rendering: each stroke paints `intensity × clamp(half_width + ½ − d, 0, 1)` where `d` is a
//!    pixel centre's distance to the (transformed) segment; overlapping strokes take the maximum;
//! 6. noise: each pixel gets uniform ±[`NOISE`] (16-bit draws, four per `u64`), is clamped to
//!    [0, 1] and stored as `round(255 · v)`.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, Features, Split};

/// Training rows of `synthetic`.
pub const DEFAULT_TRAIN: usize = 12_000;
/// Test rows of `synthetic`.
pub const DEFAULT_TEST: usize = 2_000;
/// Number of classes.
pub const CLASSES: usize = 10;
/// Image side (images are `[1, SIDE, SIDE]`).
pub const SIDE: usize = 28;
/// Strokes in each pair's base shape.
pub const BASE_STROKES: usize = 3;
/// Modes per class.
pub const MODES: usize = 3;
/// Largest per-mode endpoint offset of the base shape, px.
pub const MODE_DEFORM: f32 = 2.0;
/// Largest tangent of half the rotation angle.
pub const ROTATE: f32 = 0.0875;
/// Largest shift, px.
pub const SHIFT: f32 = 3.0;
/// Largest per-image endpoint jitter, px.
pub const JITTER: f32 = 0.8;
/// Smallest mark intensity.
pub const MARK_MIN: f32 = 0.35;
/// Probability of a distractor stroke.
pub const P_DISTRACTOR: f64 = 0.5;
/// Largest additive pixel noise.
pub const NOISE: f32 = 0.08;

const CENTRE: f32 = SIDE as f32 / 2.0;

#[derive(Clone, Copy)]
struct Stroke {
    a: [f32; 2],
    b: [f32; 2],
}

fn uni(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    // 24 random bits → [0, 1), so the value is exact and platform-independent.
    let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
    lo + (hi - lo) * u
}

/// A stroke with centre uniform in `[lo, hi]²`, length in `len`, any orientation.
fn random_stroke(rng: &mut ChaCha8Rng, lo: f32, hi: f32, len: (f32, f32)) -> Stroke {
    let cx = uni(rng, lo, hi);
    let cy = uni(rng, lo, hi);
    let l = uni(rng, len.0, len.1);
    let u = uni(rng, -1.0, 1.0);
    let (dx, dy) = ((1.0 - u * u) / (1.0 + u * u), 2.0 * u / (1.0 + u * u));
    let h = l / 2.0;
    Stroke {
        a: [cx - h * dx, cy - h * dy],
        b: [cx + h * dx, cy + h * dy],
    }
}

struct Mode {
    base: [Stroke; BASE_STROKES],
    mark: Stroke,
}

fn structure(seed: u64) -> Vec<[Mode; MODES]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0);
    let bases: Vec<[Stroke; BASE_STROKES]> = (0..CLASSES / 2)
        .map(|_| std::array::from_fn(|_| random_stroke(&mut rng, 7.0, 21.0, (6.0, 14.0))))
        .collect();
    (0..CLASSES)
        .map(|c| {
            std::array::from_fn(|_| {
                let base = bases[c / 2].map(|s| {
                    let mut d = || uni(&mut rng, -MODE_DEFORM, MODE_DEFORM);
                    Stroke {
                        a: [s.a[0] + d(), s.a[1] + d()],
                        b: [s.b[0] + d(), s.b[1] + d()],
                    }
                });
                let mark = random_stroke(&mut rng, 6.0, 22.0, (4.0, 7.0));
                Mode { base, mark }
            })
        })
        .collect()
}

/// Paints a stroke of half-width `hw` and `intensity` into `img` (max-composite).
fn paint(img: &mut [f32; SIDE * SIDE], s: Stroke, hw: f32, intensity: f32) {
    let reach = hw + 1.0;
    let lo = |a: f32, b: f32| (a.min(b) - reach).floor().clamp(0.0, SIDE as f32) as usize;
    let hi = |a: f32, b: f32| (a.max(b) + reach).ceil().clamp(0.0, SIDE as f32) as usize;
    let (x0, x1) = (lo(s.a[0], s.b[0]), hi(s.a[0], s.b[0]));
    let (y0, y1) = (lo(s.a[1], s.b[1]), hi(s.a[1], s.b[1]));
    let ab = [s.b[0] - s.a[0], s.b[1] - s.a[1]];
    let ab2 = ab[0] * ab[0] + ab[1] * ab[1];
    for y in y0..y1 {
        for x in x0..x1 {
            let p = [x as f32 + 0.5 - s.a[0], y as f32 + 0.5 - s.a[1]];
            let t = if ab2 > 1e-6 {
                ((p[0] * ab[0] + p[1] * ab[1]) / ab2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (ex, ey) = (p[0] - t * ab[0], p[1] - t * ab[1]);
            let d = (ex * ex + ey * ey).sqrt();
            let v = intensity * (hw + 0.5 - d).clamp(0.0, 1.0);
            let px = &mut img[y * SIDE + x];
            if v > *px {
                *px = v;
            }
        }
    }
}

/// Generates `n` rows from `rng` into `x` (u8 pixels) and their labels.
fn rows(modes: &[[Mode; MODES]], rng: &mut ChaCha8Rng, n: usize) -> Split {
    let mut x = Vec::with_capacity(n * SIDE * SIDE);
    let mut y = Vec::with_capacity(n);
    let mut img = [0f32; SIDE * SIDE];
    for i in 0..n {
        let c = i % CLASSES;
        let mode = &modes[c][rng.random_range(0..MODES)];
        // 1. similarity transform p ↦ C + s·R(p − C) + t.
        let u = uni(rng, -ROTATE, ROTATE);
        let scale = uni(rng, 0.9, 1.1);
        let (cos, sin) = (
            scale * (1.0 - u * u) / (1.0 + u * u),
            scale * 2.0 * u / (1.0 + u * u),
        );
        let (tx, ty) = (uni(rng, -SHIFT, SHIFT), uni(rng, -SHIFT, SHIFT));
        let map = |p: [f32; 2]| {
            let (qx, qy) = (p[0] - CENTRE, p[1] - CENTRE);
            [
                CENTRE + cos * qx - sin * qy + tx,
                CENTRE + sin * qx + cos * qy + ty,
            ]
        };
        // 2. stroke width.
        let hw = uni(rng, 0.6, 1.2);
        img.fill(0.0);
        // 3. strokes with endpoint jitter and intensity.
        let strokes = mode
            .base
            .iter()
            .map(|s| (s, 0.6))
            .chain([(&mode.mark, MARK_MIN)]);
        for (s, min_intensity) in strokes {
            let mut j = || uni(rng, -JITTER, JITTER);
            let a = map([s.a[0] + j(), s.a[1] + j()]);
            let b = map([s.b[0] + j(), s.b[1] + j()]);
            let intensity = uni(rng, min_intensity, 1.0);
            paint(&mut img, Stroke { a, b }, hw, intensity);
        }
        // 4. distractor.
        if rng.random_bool(P_DISTRACTOR) {
            let s = random_stroke(rng, 4.0, 24.0, (4.0, 7.0));
            let intensity = uni(rng, 0.3, 0.9);
            paint(&mut img, s, hw, intensity);
        }
        // 6. noise and quantisation.
        for chunk in img.chunks_mut(4) {
            let bits = rng.next_u64();
            for (k, v) in chunk.iter_mut().enumerate() {
                let r = ((bits >> (16 * k)) & 0xffff) as f32 * (1.0 / 65535.0);
                let noisy = (*v + NOISE * (2.0 * r - 1.0)).clamp(0.0, 1.0);
                x.push((noisy * 255.0).round() as u8);
            }
        }
        y.push(c as u32);
    }
    Split {
        x: Features::U8(x),
        y,
    }
}

/// Generates the set for `seed` with `n_train` / `n_test` rows (see the module docs).
pub fn generate(seed: u64, n_train: usize, n_test: usize) -> Dataset {
    let modes = structure(seed);
    let mut train_rng = ChaCha8Rng::seed_from_u64(seed);
    train_rng.set_stream(1);
    let mut test_rng = ChaCha8Rng::seed_from_u64(seed);
    test_rng.set_stream(2);
    Dataset {
        source: format!("synthetic:{seed}"),
        input_shape: vec![1, SIDE, SIDE],
        classes: CLASSES,
        train: rows(&modes, &mut train_rng, n_train),
        test: rows(&modes, &mut test_rng, n_test),
        tokens: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataSource;

    fn bytes(s: &Split) -> &[u8] {
        match &s.x {
            Features::U8(v) => v,
            Features::F32(_) | Features::Tokens(_) => panic!("synthetic rows are u8"),
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = generate(3, 200, 50);
        let b = generate(3, 200, 50);
        let c = generate(4, 200, 50);
        assert_eq!(a, b);
        assert_ne!(bytes(&a.train), bytes(&c.train));
        assert_ne!(bytes(&a.test), bytes(&c.test));
        // Train and test are different draws.
        assert_ne!(bytes(&a.train)[..50 * 784], bytes(&a.test)[..]);
        // A longer set starts with the shorter one (rows are drawn in order).
        let long = generate(3, 300, 50);
        assert_eq!(bytes(&long.train)[..200 * 784], bytes(&a.train)[..]);
        assert_eq!(long.test, a.test);
    }

    #[test]
    fn default_set_has_the_documented_shape() {
        let ds = DataSource::Synthetic { seed: 0 }.load().unwrap();
        assert_eq!(ds.source, "synthetic:0");
        assert_eq!(ds.input_shape, vec![1, 28, 28]);
        assert_eq!(ds.classes, 10);
        assert_eq!(
            (ds.train.len(), ds.test.len()),
            (DEFAULT_TRAIN, DEFAULT_TEST)
        );
        assert_eq!(ds.train.row_len(), 784);
        let mut counts = [0usize; 10];
        for &l in &ds.train.y {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [DEFAULT_TRAIN / 10; 10]);
        // Images have ink and background: strokes near 255, most pixels near 0.
        let px = bytes(&ds.train);
        let ink = px.iter().filter(|&&v| v > 128).count() as f64 / px.len() as f64;
        assert!((0.03..0.3).contains(&ink), "ink fraction {ink}");
        assert!(px.contains(&255));
    }

    #[test]
    fn pairs_resemble_each_other_more_than_other_classes() {
        // Mean image per class; a pair's means are closer than different pairs' means.
        let ds = generate(0, 2000, 0);
        let x = ds.train.rows_f32(&(0..2000).collect::<Vec<_>>());
        let mut mean = vec![vec![0f64; 784]; 10];
        for (i, row) in x.chunks(784).enumerate() {
            for (m, &v) in mean[ds.train.y[i] as usize].iter_mut().zip(row) {
                *m += f64::from(v) / 200.0;
            }
        }
        let dist = |a: usize, b: usize| -> f64 {
            mean[a]
                .iter()
                .zip(&mean[b])
                .map(|(p, q)| (p - q).powi(2))
                .sum()
        };
        for g in 0..5 {
            let within = dist(2 * g, 2 * g + 1);
            for other in 0..10 {
                if other / 2 != g {
                    assert!(within < dist(2 * g, other), "pair {g} vs class {other}");
                }
            }
        }
    }

    /// Trains a big and a small model on `synthetic` and prints test errors (the experiment
    /// behind the module docs' claims). Run with
    /// `cargo test -p distill-core --release synthetic_gap -- --ignored --nocapture`;
    /// `DISTILL_GAP_ARCHS` (comma-separated) and `DISTILL_GAP_EPOCHS` override the defaults.
    #[test]
    #[ignore = "an experiment that takes about a minute"]
    fn synthetic_gap() {
        use candle_core::{D, DType, Device};
        use candle_nn::Optimizer;

        use crate::model::TrainableModel;
        use crate::spec::{Arch, ModelSpec};

        let dev = Device::Cpu;
        let t0 = std::time::Instant::now();
        let ds = generate(0, DEFAULT_TRAIN, DEFAULT_TEST);
        eprintln!("generated in {:.2}s", t0.elapsed().as_secs_f64());
        let archs = std::env::var("DISTILL_GAP_ARCHS")
            .unwrap_or_else(|_| "mlp:784-512-512-10,mlp:784-32-10".into());
        let epochs: u64 = std::env::var("DISTILL_GAP_EPOCHS")
            .ok()
            .and_then(|e| e.parse().ok())
            .unwrap_or(10);
        let test_idx: Vec<usize> = (0..ds.test.len()).collect();
        let (tx, ty) = ds
            .test
            .batch(&ds.input_shape, &test_idx, &dev, None)
            .unwrap();
        for arch in archs.split(',') {
            let t0 = std::time::Instant::now();
            let spec = ModelSpec::new(Arch::parse(arch).unwrap());
            let m = TrainableModel::init(spec, 1, &dev).unwrap();
            let vars = m.varmap.all_vars();
            let mut opt = candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: 1e-3,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )
            .unwrap();
            let err = |x: &candle_core::Tensor, y: &candle_core::Tensor| -> f64 {
                let pred = m.model.forward(x).unwrap().argmax(D::Minus1).unwrap();
                let right = pred.eq(y).unwrap().to_dtype(DType::F32).unwrap();
                1.0 - f64::from(right.mean_all().unwrap().to_scalar::<f32>().unwrap())
            };
            for epoch in 0..epochs {
                let order = crate::data::shuffled_indices(ds.train.len(), 7, epoch);
                for idx in order.chunks(128) {
                    let (x, y) = ds.train.batch(&ds.input_shape, idx, &dev, None).unwrap();
                    let logits = m.model.forward(&x).unwrap();
                    let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
                    opt.backward_step(&loss).unwrap();
                }
                eprintln!(
                    "{arch} epoch {} test error {:.2}% ({:.1}s)",
                    epoch + 1,
                    100.0 * err(&tx, &ty),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
    }
}
