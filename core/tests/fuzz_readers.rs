//! Property tests ("fuzzing" inside `cargo test`) of every reader of `distill-core` that takes
//! bytes from the network or from disk: the top-k soft-target decoder and the dense one, the IDX
//! files (raw and gzip, gzip bombs included), the safetensors data set, and checkpoints (their
//! bytes, their files and PyTorch imports). Inputs are arbitrary bytes and valid inputs with
//! corruptions (truncations, flipped bytes, huge declared sizes, zero dimensions, NaN/inf). No
//! input may panic or allocate what it declares rather than what it holds: every property
//! checks the process's peak virtual memory (see [`vm_guard`]) and the regression tests measure
//! the peak resident memory around one call (see [`within_memory`]).
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's variable) when it is set, else a
//! default sized so that this file runs in seconds in a debug build, e.g.
//! `PROPTEST_CASES=20000 cargo test -p distill-core --test fuzz_readers` for a longer run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use distill_core::checkpoint::{self, Checkpoint};
use distill_core::data::idx::{self, FILES, IMAGES_MAGIC, LABELS_MAGIC};
use distill_core::data::{Dataset, Features, safetensors_file};
use distill_core::soft_targets::{self, Encoding, Targets};
use distill_core::spec::{Arch, ModelSpec};
use distill_core::topk::{self, IndexWidth, SparseTargets, TopKFormat, ValueDtype};
use proptest::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use distill_testkit::fuzz::{cases as config, vm_guard, within_memory};

/// One corruption of a byte string.
#[derive(Debug, Clone)]
enum ByteFault {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Overwrites 4 (big-endian u32, as in IDX headers) or 8 (little-endian u64, as in
    /// safetensors headers) bytes with a huge or extreme value.
    Big32(usize, u32),
    Big64(usize, u64),
}

fn huge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(1 << 31),
        (0..32u32).prop_map(|s| 1 << s),
        any::<u32>()
    ]
}

fn huge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        (0..64u32).prop_map(|s| 1 << s),
        any::<u64>()
    ]
}

fn byte_fault() -> impl Strategy<Value = ByteFault> {
    let at = any::<usize>();
    prop_oneof![
        4 => (at, 1..=255u8).prop_map(|(i, x)| ByteFault::Flip(i, x)),
        2 => at.prop_map(ByteFault::Truncate),
        1 => (at, proptest::collection::vec(any::<u8>(), 1..12)).prop_map(|(i, b)| ByteFault::Insert(i, b)),
        1 => (at, 1..8usize).prop_map(|(i, n)| ByteFault::Remove(i, n)),
        1 => (at, huge_u32()).prop_map(|(i, v)| ByteFault::Big32(i, v)),
        1 => (at, huge_u64()).prop_map(|(i, v)| ByteFault::Big64(i, v)),
    ]
}

fn apply(b: &mut Vec<u8>, f: &ByteFault) {
    let pos = |i: &usize, n: usize| i % (n + 1);
    let put = |b: &mut Vec<u8>, i: &usize, v: &[u8]| {
        if b.len() >= v.len() {
            let at = i % (b.len() - v.len() + 1);
            b[at..at + v.len()].copy_from_slice(v);
        }
    };
    match f {
        ByteFault::Flip(i, x) => {
            if !b.is_empty() {
                let n = b.len();
                b[i % n] ^= x;
            }
        }
        ByteFault::Truncate(i) => b.truncate(pos(i, b.len())),
        ByteFault::Insert(i, x) => {
            let p = pos(i, b.len());
            b.splice(p..p, x.iter().copied());
        }
        ByteFault::Remove(i, n) => {
            let p = pos(i, b.len());
            let end = (p + n).min(b.len());
            b.drain(p..end);
        }
        ByteFault::Big32(i, v) => put(b, i, &v.to_be_bytes()),
        ByteFault::Big64(i, v) => put(b, i, &v.to_le_bytes()),
    }
}

fn faults() -> impl Strategy<Value = Vec<ByteFault>> {
    proptest::collection::vec(byte_fault(), 0..3)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Top-k soft targets (network: `TrainBatch.topk_targets`).
// ---------------------------------------------------------------------------------------------

/// A format as it may arrive: any C (0, small, the u16/u32 boundaries, 2^32 and past it), any k
/// (0, within, C, past C, huge), either index width and value dtype — valid or not.
fn any_format() -> impl Strategy<Value = TopKFormat> {
    let classes = prop_oneof![
        6 => 0..12usize,
        1 => prop_oneof![Just(65_536usize), Just(65_537), Just(1 << 32), Just((1 << 32) + 1), Just(usize::MAX)],
        1 => any::<usize>(),
    ];
    (classes, prop_oneof![4 => 0..14usize, 1 => any::<usize>(), 1 => Just(usize::MAX), 1 => Just(1 << 32)], any::<bool>(), any::<bool>(), any::<bool>())
        .prop_map(|(classes, k, k_is_c, wide, bf16)| TopKFormat {
            classes,
            k: if k_is_c { classes } else { k },
            index: if wide { IndexWidth::U32 } else { IndexWidth::U16 },
            value: if bf16 { ValueDtype::Bf16 } else { ValueDtype::F16 },
        })
}

fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0..5usize, 1 => Just(usize::MAX), 1 => any::<usize>(), 1 => Just(1 << 40)]
}

/// What every successful decode satisfies: the format was valid, the bytes were exactly
/// `rows · bytes_per_sample`, every row holds k distinct classes below C with probabilities in
/// [0, 1] and a rest mass in [0, 1] that together sum to 1, and a finite negative entropy ≤ 0.
fn check_sparse(t: &SparseTargets, bytes: &[u8], rows: usize, f: &TopKFormat) {
    assert!(f.validate().is_ok());
    assert_eq!(Some(bytes.len()), rows.checked_mul(f.bytes_per_sample()));
    let k = f.k;
    assert_eq!((t.rows(), t.classes(), t.k()), (rows, f.classes, k));
    assert_eq!(t.indices().len(), rows * k);
    assert_eq!(t.probs().len(), rows * k);
    assert_eq!(t.rest_mass().len(), rows);
    for r in 0..rows {
        let idx = &t.indices()[r * k..(r + 1) * k];
        let mut sorted = idx.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), k, "duplicate class in row {r}");
        assert!(idx.iter().all(|&i| (i as usize) < f.classes));
        let p = &t.probs()[r * k..(r + 1) * k];
        assert!(p.iter().all(|p| (0.0..=1.0).contains(p)), "{p:?}");
        let rest = t.rest_mass()[r];
        assert!((0.0..=1.0).contains(&rest), "{rest}");
        let sum: f64 = p.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(rest);
        assert!((sum - 1.0).abs() < 1e-4, "row {r} sums to {sum}");
        let u = t.rest_per_class()[r];
        assert!(u.is_finite() && u >= 0.0);
        let e = t.neg_entropy()[r];
        assert!(e.is_finite() && e <= 1e-5, "neg entropy {e}");
    }
}

fn check_decode(bytes: &[u8], rows: usize, f: &TopKFormat) {
    match topk::decode(bytes, rows, f) {
        Ok(t) => {
            check_sparse(&t, bytes, rows, f);
            // The dense form is rows × C by contract; build it where that is small.
            if rows.saturating_mul(f.classes) <= 1 << 16 {
                let dense = topk::decode_dense(bytes, rows, f).unwrap();
                assert_eq!(dense, t.to_dense());
                assert_eq!(dense.len(), rows * f.classes);
                for row in dense.chunks(f.classes.max(1)) {
                    assert!(row.iter().all(|p| p.is_finite() && *p >= 0.0));
                    let s: f64 = row.iter().map(|&v| f64::from(v)).sum();
                    assert!((s - 1.0).abs() < 1e-4, "{s}");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(topk::decode_dense(bytes, rows, f).is_err());
        }
    }
}

/// Tempered logits for encoding: mostly moderate, some large, some −inf (probability 0).
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![8 => -20.0f32..20.0, 1 => -1e5f32..1e5, 1 => Just(f32::NEG_INFINITY)]
}

/// A valid format of small C, rows of logits with at least one finite value per row, and the
/// encoding.
fn valid_encoding() -> impl Strategy<Value = (TopKFormat, usize, Vec<f32>, Vec<u8>)> {
    (1..12usize, 0..4usize, any::<bool>())
        .prop_flat_map(|(c, rows, bf16)| {
            let value = if bf16 {
                ValueDtype::Bf16
            } else {
                ValueDtype::F16
            };
            (
                (1..=c).prop_map(move |k| TopKFormat::with_value_dtype(c, k, value).unwrap()),
                Just(rows),
                proptest::collection::vec(logit(), rows * c),
                proptest::collection::vec(-5.0f32..5.0, rows),
            )
        })
        .prop_map(|(f, rows, mut x, fin)| {
            // One finite logit per row, so every row encodes.
            for (r, v) in fin.into_iter().enumerate() {
                x[r * f.classes] = v;
            }
            let bytes = topk::encode(&x, rows, &f).unwrap();
            (f, rows, x, bytes)
        })
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes, rows and formats (valid or not): `decode`/`decode_dense` never panic and
    /// an accepted input satisfies every invariant.
    #[test]
    fn topk_decode_arbitrary(
        f in any_format(),
        rows in rows(),
        bytes in proptest::collection::vec(any::<u8>(), 0..160),
    ) {
        check_decode(&bytes, rows, &f);
        // Bytes of exactly the declared size, when that is small, so the row checks run.
        if let Some(n) = f.validate().ok().and_then(|()| rows.checked_mul(f.bytes_per_sample())).filter(|&n| n <= 4096) {
            let exact: Vec<u8> = bytes.iter().copied().cycle().take(n).collect();
            if exact.len() == n {
                check_decode(&exact, rows, &f);
            }
        }
        vm_guard();
    }

    /// Encode → decode keeps the k largest logits in canonical order (ties by class) and the
    /// rest's mass; corrupting the encoding (flipped bytes, NaN/inf/positive rest, truncation,
    /// another row count) never panics.
    #[test]
    fn topk_round_trip_and_corrupted(
        (f, rows, x, bytes) in valid_encoding(),
        faults in faults(),
        other_rows in rows(),
    ) {
        let t = topk::decode(&bytes, rows, &f).unwrap();
        check_sparse(&t, &bytes, rows, &f);
        let (c, k) = (f.classes, f.k);
        for r in 0..rows {
            let row = &x[r * c..(r + 1) * c];
            let mut order: Vec<usize> = (0..c).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let kept: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            prop_assert_eq!(&t.indices()[r * k..(r + 1) * k], kept.as_slice());
        }
        prop_assert_eq!(topk::encode(&x, rows, &f).unwrap(), bytes.clone(), "encoding is canonical");
        let mut bad = bytes.clone();
        for fault in &faults {
            apply(&mut bad, fault);
        }
        check_decode(&bad, rows, &f);
        check_decode(&bytes, other_rows, &f);
        // The rest field of each row set to NaN, ±inf, 0 or positive.
        for v in [f32::NAN, f32::INFINITY, 0.0, 1.0, -0.0] {
            let mut b = bytes.clone();
            for r in 0..rows {
                let at = r * f.bytes_per_sample();
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            let ok = topk::decode(&b, rows, &f).is_ok();
            prop_assert!(!ok || rows == 0, "rest {v} accepted");
        }
        vm_guard();
    }

    /// Dense and top-k soft targets through `soft_targets::decode` (what a worker calls):
    /// arbitrary bytes, rows, classes and encodings.
    #[test]
    fn soft_targets_decode_arbitrary(
        rows in rows(),
        classes in prop_oneof![5 => 0..12usize, 1 => any::<usize>(), 1 => Just(usize::MAX)],
        enc in prop_oneof![Just(Encoding::F32), Just(Encoding::F16), Just(Encoding::Bf16), (0..14usize).prop_map(Encoding::TopK), any::<usize>().prop_map(Encoding::TopK)],
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        probs in proptest::collection::vec(0.0f32..1.0, 0..48),
    ) {
        let check = |bytes: &[u8]| match soft_targets::decode(bytes, rows, classes, enc) {
            Ok(Targets::Dense(p)) => {
                assert_eq!(Some(p.len()), rows.checked_mul(classes));
                for row in p.chunks(classes.max(1)) {
                    assert!(row.iter().all(|v| v.is_finite() && *v >= 0.0));
                    let s: f32 = row.iter().sum();
                    assert!((s - 1.0).abs() <= soft_targets::ROW_SUM_TOLERANCE + 1e-6);
                }
            }
            Ok(Targets::TopK(t)) => {
                let f = enc.topk_format(classes).unwrap().unwrap();
                check_sparse(&t, bytes, rows, &f);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        };
        check(&bytes);
        // Normalised rows, encoded, so that valid inputs are decoded too.
        if rows <= 4 && (1..=12).contains(&classes) && probs.len() >= rows * classes {
            let mut p = probs[..rows * classes].to_vec();
            for row in p.chunks_mut(classes) {
                let s: f32 = row.iter().sum::<f32>() + 1e-3;
                row[0] += 1e-3;
                row.iter_mut().for_each(|v| *v /= s);
            }
            if let Ok(b) = soft_targets::encode(&p, rows, classes, enc) {
                check(&b);
                prop_assert!(soft_targets::decode(&b, rows, classes, enc).is_ok());
            }
        }
        vm_guard();
    }
}

/// Regression: `bytes_per_sample` of a format whose k `validate` refuses (a deserialised one, say)
/// overflowed (`attempt to add with overflow`) instead of saturating.
#[test]
fn bytes_per_sample_of_an_invalid_format_does_not_overflow() {
    let f = TopKFormat {
        classes: 0,
        k: usize::MAX / 4,
        index: IndexWidth::U16,
        value: ValueDtype::F16,
    };
    assert!(f.validate().is_err());
    assert_eq!(f.bytes_per_sample(), usize::MAX);
    assert!(topk::decode(&[], 0, &f).is_err());
}

/// Regression: a row whose values are all huge (bf16 holds up to 3·10^38; an encoder writes a
/// maximum of 0) decoded to probabilities summing to ~1 besides the rest's mass: `ln(1 − R)` was
/// added to a value of 3·10^38 before the log-sum was subtracted, and vanished in rounding.
#[test]
fn topk_huge_values_still_decode_to_a_normalised_row() {
    for (value, v) in [
        (ValueDtype::Bf16, half::bf16::MIN.to_le_bytes()),
        (ValueDtype::Bf16, half::bf16::from_f32(5.8e17).to_le_bytes()),
        (ValueDtype::F16, half::f16::MAX.to_le_bytes()),
    ] {
        let f = TopKFormat::with_value_dtype(4, 1, value).unwrap();
        let mut row = (-1.0f32).to_le_bytes().to_vec(); // R = e^-1
        row.extend_from_slice(&2u16.to_le_bytes());
        row.extend_from_slice(&v);
        let t = topk::decode(&row, 1, &f).unwrap();
        let want = 1.0 - (-1.0f64).exp();
        assert!(
            (f64::from(t.probs()[0]) - want).abs() < 1e-6,
            "{value:?}: {:?}",
            t.probs()
        );
        check_sparse(&t, &row, 1, &f);
    }
}

/// Regression: with no rows, `decode` reserved scratch for k values per row anyway, so a format
/// of k = C = 2^32 (valid: 4 + 6k bytes per row fits) made it reserve 48 GiB for an empty input.
#[test]
fn topk_no_rows_with_huge_k_allocates_nothing() {
    let f = TopKFormat::new(1 << 32, 1 << 32).unwrap();
    let t = within_memory(1 << 28, || topk::decode(&[], 0, &f)).unwrap();
    assert_eq!(t.rows(), 0);
    // And a huge row count with no bytes is a length error, not an allocation.
    let e = within_memory(1 << 28, || topk::decode(&[], usize::MAX / 64, &f));
    assert!(e.is_err());
}

// ---------------------------------------------------------------------------------------------
// IDX files (disk: `mnist:DIR`).
// ---------------------------------------------------------------------------------------------

fn idx_images(n: u32, rows: u32, cols: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [IMAGES_MAGIC, n, rows, cols] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(body);
    b
}

fn idx_labels(n: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [LABELS_MAGIC, n] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(body);
    b
}

/// An IDX dimension: mostly small, with zero, powers of two and u32::MAX.
fn idx_dim() -> impl Strategy<Value = u32> {
    prop_oneof![6 => 0..5u32, 2 => huge_u32()]
}

/// Writes `bytes` to `dir/name` (gzipped first when `gz`, then corrupted by `faults`).
fn write_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    gz: bool,
    faults: &[ByteFault],
) -> std::path::PathBuf {
    let (name, mut b) = if gz {
        (format!("{name}.gz"), gzip(bytes))
    } else {
        (name.to_string(), bytes.to_vec())
    };
    for f in faults {
        apply(&mut b, f);
    }
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

proptest! {
    #![proptest_config(config(128))]

    /// Image files with any header (zero sizes, 2^31, u32::MAX, products past 2^64), a body of
    /// about the declared size (or much less when that is huge), raw or gzip, and corruptions of
    /// the file's bytes (before or after compression). An accepted file holds exactly
    /// `n·rows·cols` pixels; an unmodified one of the right size is accepted with its pixels.
    #[test]
    fn idx_images_any_header(
        (n, r, c) in (idx_dim(), idx_dim(), idx_dim()),
        delta in -2i64..3,
        gz in any::<bool>(),
        raw_faults in faults(),
        file_faults in faults(),
        seed in any::<u8>(),
    ) {
        let declared = u128::from(n) * u128::from(r) * u128::from(c);
        let len = (declared.min(300) as i64 + delta).max(0) as usize;
        let body: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let mut bytes = idx_images(n, r, c, &body);
        for f in &raw_faults {
            apply(&mut bytes, f);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), FILES[0], &bytes, gz, &file_faults);
        match idx::read_images(&p) {
            Ok(img) => {
                prop_assert!(img.n > 0 && img.rows > 0 && img.cols > 0);
                prop_assert_eq!(img.pixels.len() as u128, img.n as u128 * img.rows as u128 * img.cols as u128);
                if raw_faults.is_empty() && file_faults.is_empty() {
                    prop_assert_eq!((img.n, img.rows, img.cols), (n as usize, r as usize, c as usize));
                    prop_assert_eq!(img.pixels, body);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(FILES[0]), "{}", msg);
                if raw_faults.is_empty() && file_faults.is_empty() {
                    prop_assert!(declared == 0 || declared != len as u128, "valid file refused: {}", msg);
                }
            }
        }
        vm_guard();
    }

    /// Label files likewise.
    #[test]
    fn idx_labels_any_header(
        n in idx_dim(),
        delta in -2i64..3,
        gz in any::<bool>(),
        raw_faults in faults(),
        file_faults in faults(),
    ) {
        let len = (i64::from(n).min(300) + delta).max(0) as usize;
        let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut bytes = idx_labels(n, &body);
        for f in &raw_faults {
            apply(&mut bytes, f);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), FILES[1], &bytes, gz, &file_faults);
        match idx::read_labels(&p) {
            Ok(l) => {
                prop_assert!(!l.is_empty());
                if raw_faults.is_empty() && file_faults.is_empty() {
                    prop_assert_eq!(l, body);
                }
            }
            Err(e) => {
                if raw_faults.is_empty() && file_faults.is_empty() {
                    prop_assert!(n == 0 || u64::from(n) != len as u64, "valid file refused: {}", e);
                }
            }
        }
        vm_guard();
    }

    /// Arbitrary bytes as IDX files, raw and behind a gzip header.
    #[test]
    fn idx_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64), gz in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bytes.clone();
        if gz {
            b.splice(0..0, [0x1f, 0x8b]);
        }
        let p = dir.path().join("x");
        std::fs::write(&p, &b).unwrap();
        let _ = idx::read_images(&p);
        let _ = idx::read_labels(&p);
        let p = write_file(dir.path(), "y", &bytes, gz, &[]);
        let _ = idx::read_images(&p);
        let _ = idx::read_labels(&p);
        vm_guard();
    }

    /// A whole directory: a valid set (raw or gzip per file) with one file corrupted, or none.
    /// An accepted set is consistent: `[1, rows, cols]` inputs, a label per row, every label
    /// below `classes` (at least 2).
    #[test]
    fn mnist_dir_with_one_broken_file(
        (n_train, n_test, rows, cols) in (1..5u32, 1..4u32, 1..4u32, 1..4u32),
        labels in proptest::collection::vec(0..4u8, 8),
        gz in proptest::collection::vec(any::<bool>(), 4),
        broken in 0..5usize,
        file_faults in proptest::collection::vec(byte_fault(), 1..3),
    ) {
        let px = |n: u32| -> Vec<u8> { (0..n * rows * cols).map(|v| v as u8).collect() };
        let files = [
            idx_images(n_train, rows, cols, &px(n_train)),
            idx_labels(n_train, &labels[..n_train as usize]),
            idx_images(n_test, rows, cols, &px(n_test)),
            idx_labels(n_test, &labels[4..4 + n_test as usize]),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (name, bytes)) in FILES.iter().zip(&files).enumerate() {
            let faults: &[ByteFault] = if i == broken { &file_faults } else { &[] };
            write_file(dir.path(), name, bytes, gz[i], faults);
        }
        match idx::load_mnist_dir(dir.path()) {
            Ok(ds) => {
                check_dataset(&ds);
                prop_assert_eq!(ds.input_shape.len(), 3);
                prop_assert_eq!(ds.input_shape[0], 1);
            }
            Err(e) => {
                // Only a broken file, or test labels outside the training labels' classes.
                let train_classes = labels[..n_train as usize].iter().max().map_or(2, |&m| (m as usize + 1).max(2));
                let test_ok = labels[4..4 + n_test as usize].iter().all(|&l| (l as usize) < train_classes);
                prop_assert!(broken < 4 || !test_ok, "valid set refused: {}", e);
            }
        }
        vm_guard();
    }
}

/// What every loaded data set satisfies.
fn check_dataset(ds: &Dataset) {
    assert!(ds.classes >= 2);
    let row_len: usize = ds.input_shape.iter().product();
    assert!(row_len > 0);
    for split in [&ds.train, &ds.test] {
        assert!(!split.y.is_empty());
        assert_eq!(split.x.num_values(), split.y.len() * row_len);
        assert!(split.y.iter().all(|&l| (l as usize) < ds.classes));
        if let Features::F32(v) = &split.x {
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
}

/// Regression: a gzip bomb, a ~1 MB file that inflates to 1 GiB of zeros behind a header
/// declaring 2^64 − 2^33 + 1 pixels, was decompressed into memory in full before being refused
/// as truncated. Deflate inflates a byte to at most 1032, so the declared size is refused up front.
#[test]
fn gzip_bomb_declaring_huge_sizes_is_refused_before_inflating() {
    let member = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 1 << 20]).unwrap();
        e.finish().unwrap()
    };
    let mut bomb = gzip(&idx_images(u32::MAX, u32::MAX, 1, &[]));
    for _ in 0..1024 {
        bomb.extend_from_slice(&member);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{}.gz", FILES[0]));
    std::fs::write(&p, &bomb).unwrap();
    let e = within_memory(256 << 20, || idx::read_images(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("inflates to at most"), "{e}");
    // The same bomb declaring no more than it holds: read, then refused for its trailing bytes
    // one byte past the 6 it declares.
    let mut small = gzip(&idx_images(1, 2, 3, &[0; 6]));
    small.extend_from_slice(&bomb[bomb.len() - member.len()..]);
    std::fs::write(&p, &small).unwrap();
    let e = within_memory(256 << 20, || idx::read_images(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("trailing garbage"), "{e}");
}

/// Regression: a raw file declaring more than it holds was read to its end before being refused
/// (here a sparse 1 GiB file of zeros: 1 GiB of memory for an error).
#[test]
fn raw_idx_declaring_more_than_the_file_holds_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(FILES[0]);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&idx_images(u32::MAX, u32::MAX, 1, &[]))
        .unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let e = within_memory(256 << 20, || idx::read_images(&p))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("but only {} bytes follow", (1u64 << 30) - 16)),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// safetensors data sets (disk: `safetensors:FILE`).
// ---------------------------------------------------------------------------------------------

/// `(name, dtype, shape, bytes)`.
type T = (String, Dtype, Vec<usize>, Vec<u8>);

fn serialize(tensors: &[T], meta: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, meta).unwrap()
}

const FEATURE_DTYPES: [Dtype; 7] = [
    Dtype::U8,
    Dtype::F32,
    Dtype::F64,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::BOOL,
];
const LABEL_DTYPES: [Dtype; 10] = [
    Dtype::U8,
    Dtype::I8,
    Dtype::U16,
    Dtype::I16,
    Dtype::U32,
    Dtype::I32,
    Dtype::U64,
    Dtype::I64,
    Dtype::F32,
    Dtype::BOOL,
];

fn dtype_size(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// Feature bytes: finite floats in [0, 1] (or bytes for U8), and sometimes a NaN or infinity.
fn feature_bytes(d: Dtype, n: usize, seed: u32, bad: bool) -> Vec<u8> {
    let v = |i: usize| {
        ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 1000.0
    };
    let mut out = Vec::new();
    for i in 0..n {
        let x = if bad && i == n / 2 { f32::NAN } else { v(i) };
        match d {
            Dtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
            Dtype::F64 => out.extend_from_slice(&f64::from(x).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            _ => out.extend(std::iter::repeat_n(
                (i as u8).wrapping_add(seed as u8),
                dtype_size(d),
            )),
        }
    }
    out
}

/// Label bytes of `d` from values (negative and huge ones included), truncated to the dtype.
fn label_bytes(d: Dtype, vals: &[i64]) -> Vec<u8> {
    let w = dtype_size(d);
    vals.iter()
        .flat_map(|v| v.to_le_bytes()[..w].to_vec())
        .collect()
}

/// A data-set file: `x` `[N, ...]`, `y` `[N]`, maybe `x_test`/`y_test`, of any dtypes, with a
/// zero dimension, a wrong label count, NaN features or out-of-range labels now and then.
fn dataset_file() -> impl Strategy<Value = Vec<T>> {
    (
        (0..6usize, proptest::collection::vec(0..4usize, 0..3)),
        proptest::sample::select(FEATURE_DTYPES.to_vec()),
        proptest::sample::select(LABEL_DTYPES.to_vec()),
        proptest::collection::vec(
            prop_oneof![8 => 0..6i64, 1 => any::<i64>(), 1 => Just(-1i64), 1 => Just(1i64 << 32)],
            12,
        ),
        (
            0..4usize,
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            any::<bool>(),
        ),
        0..3i64,
    )
        .prop_map(
            |((n, row), xd, yd, labels, (n_test, test, only_one, seed, nan), extra)| {
                let row_len: usize = row.iter().product();
                let mut shape = vec![n];
                shape.extend(&row);
                let mut t = vec![
                    (
                        "x".to_string(),
                        xd,
                        shape,
                        feature_bytes(xd, n * row_len, seed, nan && seed % 7 == 0),
                    ),
                    // Sometimes one label too many.
                    (
                        "y".to_string(),
                        yd,
                        vec![n + (extra == 2) as usize],
                        label_bytes(yd, &labels[..n + (extra == 2) as usize]),
                    ),
                ];
                if test {
                    let mut ts = vec![n_test];
                    ts.extend(&row);
                    t.push((
                        "x_test".into(),
                        xd,
                        ts,
                        feature_bytes(xd, n_test * row_len, seed ^ 1, false),
                    ));
                    if !only_one {
                        t.push((
                            "y_test".into(),
                            yd,
                            vec![n_test],
                            label_bytes(yd, &labels[6..6 + n_test]),
                        ));
                    }
                }
                t
            },
        )
}

proptest! {
    #![proptest_config(config(192))]

    /// Data-set files of every dtype and shape, serialised then corrupted (flipped bytes, a
    /// truncation, the header length set to anything): `load` never panics, and what it accepts
    /// is a consistent data set.
    #[test]
    fn safetensors_dataset_any(tensors in dataset_file(), faults in faults(), as_text in any::<bool>()) {
        let mut bytes = serialize(&tensors, None);
        for f in &faults {
            apply(&mut bytes, f);
        }
        if as_text {
            bytes = bytes.into_iter().take(40).collect();
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        match safetensors_file::load(&p) {
            Ok(ds) => {
                check_dataset(&ds);
                let x = tensors.iter().find(|t| t.0 == "x").unwrap();
                prop_assert_eq!(&ds.input_shape[..], &x.2[1..]);
                if faults.is_empty() && !as_text {
                    let n_test = tensors.iter().find(|t| t.0 == "x_test").map(|t| t.2[0]);
                    let total = ds.train.y.len() + ds.test.y.len();
                    prop_assert_eq!(total, x.2[0] + n_test.unwrap_or(0));
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        vm_guard();
    }

    /// Arbitrary bytes, and a header length (the first 8 bytes) declaring up to 2^64 bytes.
    #[test]
    fn safetensors_dataset_arbitrary_bytes(
        header_len in prop_oneof![huge_u64(), 0..64u64],
        json in prop_oneof![
            Just(r#"{"x":{"dtype":"U8","shape":[1099511627776,1099511627776],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#.to_string()),
            Just(r#"{"x":{"dtype":"U8","shape":[18446744073709551615,2],"data_offsets":[0,0]}}"#.to_string()),
            Just(r#"{"x":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},"y":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#.to_string()),
            Just(r#"{"x":{"dtype":"U8","shape":[2,2],"data_offsets":[0,18446744073709551615]}}"#.to_string()),
            ".{0,60}",
        ],
        tail in proptest::collection::vec(any::<u8>(), 0..32),
        exact_len in any::<bool>(),
    ) {
        let mut b = Vec::new();
        let len = if exact_len { json.len() as u64 } else { header_len };
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(json.as_bytes());
        b.extend_from_slice(&tail);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        std::fs::write(&p, &b).unwrap();
        if let Ok(ds) = safetensors_file::load(&p) {
            check_dataset(&ds);
        }
        // The same bytes as a checkpoint.
        if let Ok(ck) = Checkpoint::from_bytes(&b) {
            check_checkpoint(&ck);
        }
        vm_guard();
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints (disk, and network: `EvalResult.checkpoint_bytes`).
// ---------------------------------------------------------------------------------------------

/// What every accepted checkpoint satisfies: a valid spec, its parameters in order with their
/// shapes and finite values, and a byte round trip that is the identity.
fn check_checkpoint(ck: &Checkpoint) {
    assert!(ck.spec.validate().is_ok());
    let want = ck.spec.arch.param_shapes();
    assert_eq!(ck.params.len(), want.len());
    for ((n, s, v), (wn, ws)) in ck.params.iter().zip(&want) {
        assert_eq!((n, s), (wn, ws));
        assert_eq!(v.len(), s.iter().product::<usize>());
        assert!(v.iter().all(|x| x.is_finite()));
    }
    let again = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
    assert_eq!(&again, ck);
}

/// Small valid specs: MLPs and conv nets.
fn small_spec() -> impl Strategy<Value = ModelSpec> {
    prop_oneof![
        (
            1..6usize,
            proptest::collection::vec(1..5usize, 0..3),
            2..5usize
        )
            .prop_map(|(input, hidden, classes)| {
                ModelSpec::new(Arch::Mlp {
                    input,
                    hidden,
                    classes,
                })
            }),
        (
            1..3usize,
            proptest::collection::vec(1..3usize, 1..3),
            1..4usize,
            2..4usize
        )
            .prop_map(|(cin, channels, hidden, classes)| {
                ModelSpec::new(Arch::Conv {
                    input: [cin, 4, 4],
                    channels,
                    kernel: 3,
                    hidden,
                    classes,
                })
            }),
    ]
}

fn params_for(spec: &ModelSpec, seed: u32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    spec.arch
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let len: usize = s.iter().product();
            let v = (0..len)
                .map(|i| ((i as u32).wrapping_mul(7).wrapping_add(seed) % 13) as f32 - 6.0)
                .collect();
            (n, s, v)
        })
        .collect()
}

/// Spec JSON as it may appear in a checkpoint's metadata: valid small ones, and ones with huge
/// or zero sizes, 0 to 80 conv layers (64 or more overflow `1 << layers`), even kernels, wrong
/// types, NaN-like dropout.
fn spec_json() -> impl Strategy<Value = String> {
    let big =
        prop_oneof![4 => 0..6u64, 1 => Just(u64::MAX), 1 => (0..64u32).prop_map(|s| 1u64 << s)];
    prop_oneof![
        small_spec().prop_map(|s| serde_json::to_string(&s).unwrap()),
        (proptest::collection::vec(big.clone(), 3), proptest::collection::vec(big.clone(), 0..80), big.clone(), big.clone(), big.clone()).prop_map(
            |(input, channels, kernel, hidden, classes)| format!(
                r#"{{"arch":{{"kind":"conv","input":{input:?},"channels":{channels:?},"kernel":{kernel},"hidden":{hidden},"classes":{classes}}}}}"#
            )
        ),
        (big.clone(), proptest::collection::vec(big.clone(), 0..4), big.clone()).prop_map(|(i, h, c)| format!(
            r#"{{"arch":{{"kind":"mlp","input":{i},"hidden":{h:?},"classes":{c}}},"dropout":0.5}}"#
        )),
        prop_oneof![
            Just(r#"{"arch":{"kind":"mlp","input":2,"hidden":[],"classes":2},"dropout":1e999}"#.to_string()),
            Just(r#"{"arch":{"kind":"mlp","input":2,"hidden":[],"classes":2},"dropout":-0.5}"#.to_string()),
            Just(r#"{"arch":{"kind":"mlp","input":-2,"hidden":[],"classes":2}}"#.to_string()),
            Just(r#"{"arch":{"kind":"mlp","input":2.5,"hidden":[],"classes":2}}"#.to_string()),
            Just(r#"{"arch":{"kind":"rnn"}}"#.to_string()),
        ],
        ".{0,40}",
    ]
}

/// One change to a valid checkpoint's tensors.
#[derive(Debug, Clone)]
enum TensorFault {
    None,
    Drop(usize),
    Rename(usize, String),
    Reshape(usize),
    Dtype(usize, Dtype),
    NonFinite(usize, u8),
    Extra,
}

fn tensor_fault() -> impl Strategy<Value = TensorFault> {
    let i = any::<usize>();
    prop_oneof![
        3 => Just(TensorFault::None),
        1 => i.prop_map(TensorFault::Drop),
        1 => (i, "[a-z0-9.]{0,12}").prop_map(|(a, n)| TensorFault::Rename(a, n)),
        1 => i.prop_map(TensorFault::Reshape),
        1 => (i, proptest::sample::select(vec![Dtype::F16, Dtype::BF16, Dtype::F64, Dtype::I32, Dtype::U8])).prop_map(|(a, d)| TensorFault::Dtype(a, d)),
        1 => (i, 0..3u8).prop_map(|(a, k)| TensorFault::NonFinite(a, k)),
        1 => Just(TensorFault::Extra),
    ]
}

/// A checkpoint's tensors as safetensors entries, with one fault applied.
fn checkpoint_tensors(params: &[(String, Vec<usize>, Vec<f32>)], fault: &TensorFault) -> Vec<T> {
    let mut t: Vec<T> = params
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                Dtype::F32,
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let n = t.len();
    match fault {
        TensorFault::None => {}
        TensorFault::Drop(i) => {
            t.remove(i % n);
        }
        TensorFault::Rename(i, name) => {
            if !t.iter().any(|e| e.0 == *name) {
                t[i % n].0 = name.clone();
            }
        }
        TensorFault::Reshape(i) => {
            let e = &mut t[i % n];
            let len: usize = e.2.iter().product();
            e.2 = vec![len];
            if e.2 == params[i % n].1 {
                e.2 = vec![1, len];
            }
        }
        TensorFault::Dtype(i, d) => {
            let e = &mut t[i % n];
            let len: usize = e.2.iter().product();
            e.1 = *d;
            e.3 = vec![0x3c; len * dtype_size(*d)];
        }
        TensorFault::NonFinite(i, k) => {
            let e = &mut t[i % n];
            let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][*k as usize % 3];
            e.3[..4].copy_from_slice(&v.to_le_bytes());
        }
        TensorFault::Extra => t.push(("stray".into(), Dtype::F32, vec![1], vec![0; 4])),
    }
    t
}

fn checkpoint_meta(spec_json: &str, format: &str, version: &str) -> HashMap<String, String> {
    HashMap::from([
        ("distill.format".to_string(), format.to_string()),
        ("distill.format_version".to_string(), version.to_string()),
        ("distill.spec".to_string(), spec_json.to_string()),
        ("distill.step".to_string(), "12".to_string()),
    ])
}

proptest! {
    #![proptest_config(config(192))]

    /// Valid checkpoints round-trip; with a fault in their tensors, their metadata (any spec
    /// JSON, another format or version) or their bytes, `from_bytes` never panics and what it
    /// accepts is a consistent checkpoint. One case in four goes through a file (`read`).
    #[test]
    fn checkpoint_any(
        spec in small_spec(),
        seed in any::<u32>(),
        fault in tensor_fault(),
        other_spec in proptest::option::weighted(0.4, spec_json()),
        format in prop_oneof![8 => Just("distill-checkpoint".to_string()), 1 => ".{0,12}"],
        version in prop_oneof![8 => Just("1".to_string()), 1 => Just("2".to_string()), 1 => Just(String::new())],
        faults in faults(),
        via_file in proptest::bool::weighted(0.25),
    ) {
        let params = params_for(&spec, seed);
        let ck = Checkpoint { spec: spec.clone(), params: params.clone(), extra: BTreeMap::from([("distill.step".to_string(), "12".to_string())]) };
        check_checkpoint(&ck);
        let json = other_spec.clone().unwrap_or_else(|| serde_json::to_string(&spec).unwrap());
        let tensors = checkpoint_tensors(&params, &fault);
        let mut bytes = serialize(&tensors, Some(checkpoint_meta(&json, &format, &version)));
        let clean = other_spec.is_none() && matches!(fault, TensorFault::None) && format == "distill-checkpoint" && version == "1";
        for f in &faults {
            apply(&mut bytes, f);
        }
        let got = if via_file {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.safetensors");
            std::fs::write(&p, &bytes).unwrap();
            Checkpoint::read(&p)
        } else {
            Checkpoint::from_bytes(&bytes)
        };
        match got {
            Ok(got) => {
                check_checkpoint(&got);
                if clean && faults.is_empty() {
                    prop_assert_eq!(got, ck);
                }
            }
            Err(e) => {
                prop_assert!(!(clean && faults.is_empty()), "valid checkpoint refused: {}", e);
            }
        }
        vm_guard();
    }

    /// PyTorch `nn.Sequential` imports: state dicts of the spec's shapes under `[prefix.]INDEX`
    /// keys, with a fault, into any spec (valid, or with huge sizes and too many conv layers).
    #[test]
    fn import_sequential_any(
        spec in small_spec(),
        seed in any::<u32>(),
        fault in tensor_fault(),
        prefix in prop_oneof![Just(String::new()), Just("net.".to_string()), "[a-z.]{0,6}"],
        other_spec in proptest::option::weighted(0.3, spec_json()),
        faults in faults(),
    ) {
        let params = params_for(&spec, seed);
        let renamed: Vec<_> = params
            .iter()
            .enumerate()
            .map(|(i, (_, s, v))| (format!("{prefix}{}.{}", i / 2 * 2, if i % 2 == 0 { "weight" } else { "bias" }), s.clone(), v.clone()))
            .collect();
        let mut bytes = serialize(&checkpoint_tensors(&renamed, &fault), None);
        for f in &faults {
            apply(&mut bytes, f);
        }
        let target = match &other_spec {
            Some(j) => match serde_json::from_str::<ModelSpec>(j) {
                Ok(s) => s,
                Err(_) => spec.clone(),
            },
            None => spec.clone(),
        };
        match checkpoint::import_sequential(&bytes, target.clone()) {
            Ok(ck) => {
                prop_assert_eq!(&ck.spec, &target);
                check_checkpoint(&ck);
            }
            Err(e) => {
                let _ = e.to_string();
                // `[prefix.]INDEX.weight`: a prefix must end in a dot.
                let clean = other_spec.is_none()
                    && matches!(fault, TensorFault::None)
                    && faults.is_empty()
                    && (prefix.is_empty() || prefix.ends_with('.'));
                prop_assert!(!clean, "valid import refused: {}", e);
            }
        }
        vm_guard();
    }
}

proptest! {
    #![proptest_config(config(192))]

    /// Optimizer state files (what a worker resumes from, through `safetensors_io`): valid ones
    /// with corrupted bytes, and arbitrary ones; what `from_bytes` accepts round-trips.
    #[test]
    fn optim_state_any(
        step in any::<u64>(),
        bufs in proptest::collection::vec((proptest::collection::vec(0..4usize, 0..3), any::<u32>()), 0..4),
        faults in faults(),
    ) {
        let buffers: Vec<(String, Vec<usize>, Vec<f32>)> = bufs
            .iter()
            .enumerate()
            .map(|(i, (s, seed))| {
                let len: usize = s.iter().product();
                (format!("fc{i}.weight.momentum"), s.clone(), (0..len).map(|j| (j as u32 ^ seed) as f32).collect())
            })
            .collect();
        let st = distill_core::optim::OptimState { config: distill_core::optim::OptimConfig::default(), step, buffers };
        let mut bytes = st.to_bytes().unwrap();
        prop_assert_eq!(&distill_core::optim::OptimState::from_bytes(&bytes).unwrap(), &st);
        for f in &faults {
            apply(&mut bytes, f);
        }
        if let Ok(got) = distill_core::optim::OptimState::from_bytes(&bytes) {
            // Values compared as bits: a flipped one may be NaN, which equals nothing.
            let again = distill_core::optim::OptimState::from_bytes(&got.to_bytes().unwrap()).unwrap();
            let bits = |s: &distill_core::optim::OptimState| -> Vec<(String, Vec<usize>, Vec<u32>)> {
                s.buffers.iter().map(|(n, sh, v)| (n.clone(), sh.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
            };
            prop_assert_eq!((&again.config, again.step), (&got.config, got.step));
            prop_assert_eq!(bits(&again), bits(&got));
        }
        vm_guard();
    }
}

/// Regression: a checkpoint whose spec has 64 conv layers made `from_bytes` panic (`1 << 64`
/// overflows in the spec's validation) on bytes a worker sends (`EvalResult.checkpoint_bytes`);
/// and a conv spec whose flattened width overflows panicked in `import_sequential`.
#[test]
fn checkpoint_spec_with_too_many_conv_layers_is_an_error() {
    for layers in [63usize, 64, 65, 200] {
        let json = format!(
            r#"{{"arch":{{"kind":"conv","input":[1,28,28],"channels":{:?},"kernel":5,"hidden":8,"classes":10}}}}"#,
            vec![1; layers]
        );
        let bytes = serialize(
            &[("x".into(), Dtype::F32, vec![1], vec![0; 4])],
            Some(checkpoint_meta(&json, "distill-checkpoint", "1")),
        );
        let e = Checkpoint::from_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("conv"), "{layers}: {e}");
        let spec: ModelSpec = serde_json::from_str(&json).unwrap();
        assert!(checkpoint::import_sequential(&bytes, spec).is_err());
    }
    let spec = ModelSpec::new(Arch::Conv {
        input: [1, 1 << 40, 1 << 40],
        channels: vec![1 << 40],
        kernel: 3,
        hidden: 2,
        classes: 2,
    });
    let e = checkpoint::import_sequential(&serialize(&[], None), spec.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("too many or too large"), "{e}");
    // That spec passes validation, so `from_bytes` overflowed on it too (in `param_shapes`).
    let json = serde_json::to_string(&spec).unwrap();
    let bytes = serialize(&[], Some(checkpoint_meta(&json, "distill-checkpoint", "1")));
    let e = Checkpoint::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("too many or too large"), "{e}");
}

/// Regression: `import_sequential` accepted NaN and infinite weights, making a checkpoint that
/// `Checkpoint::read` then refuses.
#[test]
fn import_refuses_non_finite_weights() {
    let spec = ModelSpec::new(Arch::Mlp {
        input: 2,
        hidden: vec![],
        classes: 2,
    });
    let mut params = params_for(&spec, 1);
    params[0].2[1] = f32::NAN;
    let renamed: Vec<_> = params
        .iter()
        .enumerate()
        .map(|(i, (_, s, v))| {
            (
                format!("0.{}", if i == 0 { "weight" } else { "bias" }),
                s.clone(),
                v.clone(),
            )
        })
        .collect();
    let bytes = serialize(&checkpoint_tensors(&renamed, &TensorFault::None), None);
    let e = checkpoint::import_sequential(&bytes, spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite value at element 1"), "{e}");
}

/// A training-state file (`distill train --resume FILE`) whose spec has 64 conv layers used to
/// panic in `Trainer::resume` (`Arch::param_shapes` on an unvalidated spec: `1usize << 64`); it
/// is an error now.
#[test]
fn known_panic_train_state_with_64_conv_layers() {
    let spec = format!(
        r#"{{"arch":{{"kind":"conv","input":[1,28,28],"channels":{:?},"kernel":5,"hidden":8,"classes":10}}}}"#,
        vec![1; 64]
    );
    let state = r#"{"epoch":0,"batch":0,"step":0,"loss_sum":0.0,"correct":0,"samples":0,"train_seconds":0.0,"step_seconds":0.0,"history":[]}"#;
    let meta = HashMap::from([
        (
            "distill.format".to_string(),
            "distill-train-state".to_string(),
        ),
        ("distill.format_version".to_string(), "1".to_string()),
        ("distill.spec".to_string(), spec),
        ("distill.train.config".to_string(), "{}".to_string()),
        ("distill.train.state".to_string(), state.to_string()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.safetensors");
    std::fs::write(&p, serialize(&[], Some(meta))).unwrap();
    let r = distill_core::train::Trainer::resume(&p, &candle_core::Device::Cpu);
    assert!(r.is_err());
}
