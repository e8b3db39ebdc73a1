//! Property tests ("fuzzing" inside `cargo test`) of every path of this crate that takes bytes
//! from the network: the wire tensor and its conversion to a [`HostTensor`], parameter chunks
//! and their assembly, and `prost` decoding of arbitrary or corrupted bytes into every message,
//! followed by those conversions. No input may panic, and none may make the receiver allocate
//! more than its input justifies: a header or shape declaring 2^60 elements is an error, never an
//! attempt (each property also checks the process's peak virtual memory, see `distill_testkit::fuzz::vm_guard`).
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's variable) when it is set, else a
//! default sized so that this file runs in a few seconds in a debug build, e.g.
//! `PROPTEST_CASES=20000 cargo test -p distill-proto --test fuzz` for a longer run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use bytes::Bytes;
use distill_proto::params::{self, Param, ParamAssembler};
use distill_proto::{DType, Error, HostTensor, MAX_ELEMENTS, pb};
use proptest::prelude::*;
use prost::Message;

use distill_testkit::fuzz::{cases as config, vm_guard};

const ALL_DTYPES: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::U8, DType::I64];

fn dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(ALL_DTYPES.to_vec())
}

/// Wire dtype numbers: the valid ones, 0 (unspecified) and anything else.
fn wire_dtype() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..=6i32, 1 => any::<i32>(), 1 => Just(i32::MIN), 1 => Just(-1)]
}

/// A dimension: mostly small, with zeros, powers of two around the element limit and the
/// extremes of u64.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..6u64,
        1 => Just(0u64),
        1 => (0..64u32).prop_map(|s| 1u64 << s),
        1 => (1..64u32).prop_map(|s| (1u64 << s) - 1),
        1 => prop_oneof![Just(MAX_ELEMENTS), Just(MAX_ELEMENTS + 1), Just(u64::MAX), Just(u64::MAX / 2 + 1)],
        1 => any::<u64>(),
    ]
}

fn shape() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(dim(), 0..6)
}

/// Bytes per element of a wire dtype number, if valid.
fn size_of(dtype: i32) -> Option<u64> {
    DType::try_from(dtype).ok().map(|d| d.size() as u64)
}

/// The element count of `shape` as the crate defines it (exact, in u128), or None past the
/// limit: every nonzero dimension's product must be at most [`MAX_ELEMENTS`].
fn model_numel(shape: &[u64]) -> Option<u64> {
    let mut nonzero: u128 = 1;
    for &d in shape.iter().filter(|&&d| d != 0) {
        nonzero = nonzero.saturating_mul(u128::from(d));
        if nonzero > u128::from(MAX_ELEMENTS) {
            return None;
        }
    }
    Some(if shape.contains(&0) {
        0
    } else {
        nonzero as u64
    })
}

/// Every invariant of a tensor received from the wire: `try_from` agrees with the model above,
/// and an accepted tensor has consistent sizes, decodes to exactly `numel` values and converts
/// back to the same message.
fn check_wire_tensor(t: &pb::Tensor) {
    let got = HostTensor::try_from(t.clone());
    let want_numel = model_numel(&t.shape);
    match (&got, size_of(t.dtype), want_numel) {
        (Err(Error::BadDType(d)), None, _) => assert_eq!(*d, t.dtype),
        (Err(Error::TooLarge { .. }), Some(_), None) => {}
        (Err(Error::BadLength { expected, got, .. }), Some(s), Some(n)) => {
            assert_eq!(*expected, n * s);
            assert_eq!(*got, t.data.len() as u64);
            assert_ne!(expected, got);
        }
        (Ok(h), Some(s), Some(n)) => {
            assert_eq!(n * s, t.data.len() as u64);
            check_host_tensor(h);
            assert_eq!(h.numel() as u64, n);
            assert_eq!(pb::Tensor::from(h.clone()), *t, "round trip");
        }
        (r, s, n) => panic!("{t:?}: got {r:?} with element size {s:?} and numel {n:?}"),
    }
    if let Err(e) = got {
        let _ = e.to_string();
    }
}

/// Invariants of any constructed host tensor.
fn check_host_tensor(h: &HostTensor) {
    let n = h.numel();
    assert_eq!(h.data().len(), n * h.dtype().size());
    let v = h.to_f32_vec();
    assert_eq!(v.len(), n);
    let want = if h.dtype().is_float() {
        v.iter().position(|x| !x.is_finite())
    } else {
        None
    };
    assert_eq!(h.first_non_finite(), want);
}

/// A valid wire tensor of small dimensions, for corrupting.
fn small_tensor() -> impl Strategy<Value = pb::Tensor> {
    (proptest::collection::vec(0..5u64, 0..4), 1..=5i32).prop_flat_map(|(shape, dtype)| {
        let len = (shape.iter().product::<u64>() * size_of(dtype).unwrap_or(1)) as usize;
        proptest::collection::vec(any::<u8>(), len).prop_map(move |data| pb::Tensor {
            shape: shape.clone(),
            dtype,
            data: Bytes::from(data),
        })
    })
}

/// One corruption of a wire tensor.
#[derive(Debug, Clone)]
enum TensorFault {
    None,
    Truncate(usize),
    Extend(Vec<u8>),
    SetDim(usize, u64),
    PushDim(u64),
    PopDim,
    SetDtype(i32),
}

fn tensor_fault() -> impl Strategy<Value = TensorFault> {
    prop_oneof![
        Just(TensorFault::None),
        any::<usize>().prop_map(TensorFault::Truncate),
        proptest::collection::vec(any::<u8>(), 1..9).prop_map(TensorFault::Extend),
        (any::<usize>(), dim()).prop_map(|(i, d)| TensorFault::SetDim(i, d)),
        dim().prop_map(TensorFault::PushDim),
        Just(TensorFault::PopDim),
        wire_dtype().prop_map(TensorFault::SetDtype),
    ]
}

fn corrupt_tensor(t: &mut pb::Tensor, f: &TensorFault) {
    match f {
        TensorFault::None => {}
        TensorFault::Truncate(n) => {
            let keep = n % (t.data.len() + 1);
            t.data = t.data.slice(..keep);
        }
        TensorFault::Extend(b) => t.data = [t.data.as_ref(), b].concat().into(),
        TensorFault::SetDim(i, d) => {
            if !t.shape.is_empty() {
                let i = i % t.shape.len();
                t.shape[i] = *d;
            }
        }
        TensorFault::PushDim(d) => t.shape.push(*d),
        TensorFault::PopDim => {
            t.shape.pop();
        }
        TensorFault::SetDtype(d) => t.dtype = *d,
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary shapes, dtypes and data: `try_from` never panics and agrees with the model.
    #[test]
    fn wire_tensor_arbitrary(
        shape in shape(),
        dtype in wire_dtype(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        check_wire_tensor(&pb::Tensor { shape, dtype, data: Bytes::from(data) });
        vm_guard();
    }

    /// Valid tensors with one corruption (truncated or extended data, a dimension set to
    /// anything, a dimension added or removed, another dtype).
    #[test]
    fn wire_tensor_corrupted(t in small_tensor(), faults in proptest::collection::vec(tensor_fault(), 1..4)) {
        check_wire_tensor(&t);
        prop_assert!(HostTensor::try_from(t.clone()).is_ok(), "valid tensor refused: {:?}", t);
        let mut bad = t;
        for f in &faults {
            corrupt_tensor(&mut bad, f);
        }
        check_wire_tensor(&bad);
        vm_guard();
    }

    /// `HostTensor::new` with arbitrary shapes (as usize) and data.
    #[test]
    fn host_tensor_new_arbitrary(
        shape in shape(),
        dtype in dtype(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let ushape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        match HostTensor::new(ushape.clone(), dtype, data.clone()) {
            Ok(h) => {
                check_host_tensor(&h);
                prop_assert_eq!(h.shape(), ushape.as_slice());
                prop_assert_eq!(h.numel() * dtype.size(), data.len());
                let back = HostTensor::try_from(pb::Tensor::from(h.clone())).unwrap();
                prop_assert_eq!(back, h);
            }
            Err(e) => {
                let _ = e.to_string();
                prop_assert!(matches!(e, Error::BadLength { .. } | Error::TooLarge { .. }), "{e:?}");
                match model_numel(&shape) {
                    None => prop_assert!(matches!(e, Error::TooLarge { .. }), "{e:?}"),
                    Some(n) => prop_assert_ne!(n * dtype.size() as u64, data.len() as u64),
                }
            }
        }
        vm_guard();
    }

    /// f32 values (NaN, ±inf, subnormals included) encoded in every dtype: the float dtypes
    /// round like `half` and decode back, `first_non_finite` finds the first NaN or infinity
    /// (after rounding: 1e6 is finite in f32 but infinite in f16), and the integer dtypes are
    /// refused.
    #[test]
    fn float_encoding_round_trips(values in proptest::collection::vec(proptest::num::f32::ANY, 0..40), dtype in dtype()) {
        let n = values.len();
        match HostTensor::from_f32_as(vec![n], &values, dtype) {
            Err(e) => prop_assert_eq!(e, Error::NotFloat(dtype)),
            Ok(h) => {
                prop_assert!(dtype.is_float());
                check_host_tensor(&h);
                let rounded: Vec<f32> = match dtype {
                    DType::F32 => values.clone(),
                    DType::F16 => values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                    _ => values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
                };
                let got = h.to_f32_vec();
                for (a, b) in got.iter().zip(&rounded) {
                    prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{a} vs {b}");
                }
                prop_assert_eq!(h.first_non_finite(), rounded.iter().position(|v| !v.is_finite()));
            }
        }
    }

    /// `DType` from any wire number: exactly 1..=5 are accepted, and they round-trip.
    #[test]
    fn dtype_numbers(v in any::<i32>()) {
        match DType::try_from(v) {
            Ok(d) => {
                prop_assert!((1..=5).contains(&v));
                prop_assert_eq!(pb::DType::from(d) as i32, v);
            }
            Err(e) => {
                prop_assert!(!(1..=5).contains(&v));
                prop_assert_eq!(e, Error::BadDType(v));
            }
        }
    }
}

#[test]
fn dtype_small_numbers_exhaustive() {
    for v in -300..300 {
        let r = DType::try_from(v);
        assert_eq!(r.is_ok(), (1..=5).contains(&v), "{v}");
    }
}

// ---------------------------------------------------------------------------------------------
// Parameter chunks.
// ---------------------------------------------------------------------------------------------

/// A parameter set like a small model's: distinct names, shapes with 0 to 3 dimensions of 0 to 4
/// (zero-size parameters included), finite values.
fn param_set() -> impl Strategy<Value = Vec<Param>> {
    proptest::collection::vec(proptest::collection::vec(0..5usize, 0..4), 1..5).prop_flat_map(
        |shapes| {
            let vals: Vec<_> = shapes
                .iter()
                .map(|s| {
                    proptest::collection::vec(
                        prop_oneof![4 => -4.0f32..4.0, 1 => proptest::num::f32::NORMAL],
                        s.iter().product::<usize>(),
                    )
                })
                .collect();
            (Just(shapes), vals).prop_map(|(shapes, vals)| {
                shapes
                    .into_iter()
                    .zip(vals)
                    .enumerate()
                    .map(|(i, (s, v))| (format!("layer{i}.weight"), s, v))
                    .collect()
            })
        },
    )
}

fn chunk_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0..40usize, 1 => Just(usize::MAX), 1 => any::<usize>()]
}

fn expected_of(p: &[Param]) -> Vec<(String, Vec<usize>)> {
    p.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect()
}

/// Feeds `chunks` in order and finishes; the first error stops.
fn assemble(
    expected: Vec<(String, Vec<usize>)>,
    chunks: impl IntoIterator<Item = pb::ParamChunk>,
) -> Result<Vec<Param>, Error> {
    let mut a = ParamAssembler::new(expected);
    for c in chunks {
        a.add(c)?;
    }
    a.finish()
}

/// What any successful assembly must satisfy: every expected parameter, in order, with its
/// shape and exactly its element count of finite values.
fn check_assembled(expected: &[(String, Vec<usize>)], got: &[Param]) {
    assert_eq!(got.len(), expected.len());
    for ((n, s, v), (en, es)) in got.iter().zip(expected) {
        assert_eq!((n, s), (en, es));
        assert_eq!(v.len(), es.iter().product::<usize>());
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

/// One corruption of a chunk stream.
#[derive(Debug, Clone)]
enum ChunkFault {
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Name(usize, String),
    Offset(usize, u64),
    Shape(usize, Vec<u64>),
    NoValues(usize),
    Values(usize, pb::Tensor),
    Tensor(usize, TensorFault),
    NonFinite(usize, usize, u8),
    Extra(pb::ParamChunk),
}

impl ChunkFault {
    /// Whether the fault leaves the values alone (so a stream it leaves valid assembles to the
    /// original parameters).
    fn structural(&self) -> bool {
        matches!(
            self,
            ChunkFault::Drop(_)
                | ChunkFault::Duplicate(_)
                | ChunkFault::Swap(..)
                | ChunkFault::Name(..)
                | ChunkFault::Offset(..)
                | ChunkFault::Shape(..)
                | ChunkFault::NoValues(_)
        )
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..6usize).prop_map(|i| format!("layer{i}.weight")),
        Just(String::new()),
        ".{0,12}",
    ]
}

fn arbitrary_chunk() -> impl Strategy<Value = pb::ParamChunk> {
    (
        name(),
        shape(),
        prop_oneof![3 => 0..20u64, 1 => any::<u64>()],
        proptest::option::weighted(
            0.9,
            prop_oneof![
                small_tensor(),
                (
                    shape(),
                    wire_dtype(),
                    proptest::collection::vec(any::<u8>(), 0..32)
                )
                    .prop_map(|(shape, dtype, d)| pb::Tensor {
                        shape,
                        dtype,
                        data: d.into()
                    })
            ],
        ),
    )
        .prop_map(|(name, shape, offset, values)| pb::ParamChunk {
            name,
            shape,
            offset,
            values,
        })
}

fn chunk_fault() -> impl Strategy<Value = ChunkFault> {
    let i = any::<usize>();
    prop_oneof![
        i.prop_map(ChunkFault::Drop),
        i.prop_map(ChunkFault::Duplicate),
        (i, i).prop_map(|(a, b)| ChunkFault::Swap(a, b)),
        (i, name()).prop_map(|(a, n)| ChunkFault::Name(a, n)),
        (i, prop_oneof![0..20u64, any::<u64>()]).prop_map(|(a, o)| ChunkFault::Offset(a, o)),
        (i, shape()).prop_map(|(a, s)| ChunkFault::Shape(a, s)),
        i.prop_map(ChunkFault::NoValues),
        (i, small_tensor()).prop_map(|(a, t)| ChunkFault::Values(a, t)),
        (i, tensor_fault()).prop_map(|(a, f)| ChunkFault::Tensor(a, f)),
        (i, i, 0..3u8).prop_map(|(a, j, k)| ChunkFault::NonFinite(a, j, k)),
        arbitrary_chunk().prop_map(ChunkFault::Extra),
    ]
}

fn apply_fault(chunks: &mut Vec<pb::ParamChunk>, f: &ChunkFault) {
    let n = chunks.len();
    if n == 0 {
        if let ChunkFault::Extra(c) = f {
            chunks.push(c.clone());
        }
        return;
    }
    match f {
        ChunkFault::Drop(i) => {
            chunks.remove(i % n);
        }
        ChunkFault::Duplicate(i) => chunks.insert(i % n, chunks[i % n].clone()),
        ChunkFault::Swap(a, b) => chunks.swap(a % n, b % n),
        ChunkFault::Name(i, s) => chunks[i % n].name = s.clone(),
        ChunkFault::Offset(i, o) => chunks[i % n].offset = *o,
        ChunkFault::Shape(i, s) => chunks[i % n].shape = s.clone(),
        ChunkFault::NoValues(i) => chunks[i % n].values = None,
        ChunkFault::Values(i, t) => chunks[i % n].values = Some(t.clone()),
        ChunkFault::Tensor(i, tf) => {
            if let Some(t) = chunks[i % n].values.as_mut() {
                corrupt_tensor(t, tf);
            }
        }
        ChunkFault::NonFinite(i, j, k) => {
            if let Some(t) = chunks[i % n].values.as_mut() {
                let mut d = t.data.to_vec();
                let w = size_of(t.dtype).unwrap_or(1) as usize;
                if d.len() >= w {
                    let at = (j % (d.len() / w)) * w;
                    let bad: Vec<u8> = match (DType::try_from(t.dtype), k) {
                        (Ok(DType::F32), 0) => f32::NAN.to_le_bytes().to_vec(),
                        (Ok(DType::F32), 1) => f32::INFINITY.to_le_bytes().to_vec(),
                        (Ok(DType::F32), _) => f32::NEG_INFINITY.to_le_bytes().to_vec(),
                        (Ok(DType::F16), 0) => half::f16::NAN.to_le_bytes().to_vec(),
                        (Ok(DType::F16), _) => half::f16::INFINITY.to_le_bytes().to_vec(),
                        (Ok(DType::BF16), 0) => half::bf16::NAN.to_le_bytes().to_vec(),
                        (Ok(DType::BF16), _) => half::bf16::NEG_INFINITY.to_le_bytes().to_vec(),
                        _ => vec![0xff; w],
                    };
                    d[at..at + w].copy_from_slice(&bad);
                    t.data = d.into();
                }
            }
        }
        ChunkFault::Extra(c) => chunks.insert(0, c.clone()),
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Chunking then assembling is the identity in f32, and rounds like `half` in f16/bf16 (an
    /// f32 that rounds to infinity is refused, as any non-finite value is); every group stays
    /// within its byte budget (at least one element).
    #[test]
    fn chunks_round_trip(p in param_set(), dtype in dtype(), chunk_bytes in chunk_bytes()) {
        let groups = match params::to_chunk_groups(&p, dtype, chunk_bytes) {
            Ok(g) => g,
            Err(e) => {
                prop_assert!(!dtype.is_float(), "{e}");
                return Ok(());
            }
        };
        prop_assert!(dtype.is_float());
        let per = (chunk_bytes / dtype.size()).max(1);
        for g in &groups {
            let n: usize = g.iter().map(|c| c.values.as_ref().unwrap().shape[0] as usize).sum();
            prop_assert!(n <= per);
        }
        let total: usize = p.iter().map(|(_, _, v)| v.len()).sum();
        prop_assert_eq!(params::value_bytes(&groups), (total * dtype.size()) as u64);
        let rounded: Vec<Param> = p
            .iter()
            .map(|(n, s, v)| {
                let r = params::encode_values(v, dtype).unwrap().to_f32_vec();
                (n.clone(), s.clone(), r)
            })
            .collect();
        let finite = rounded.iter().all(|(_, _, v)| v.iter().all(|x| x.is_finite()));
        match assemble(expected_of(&p), groups.into_iter().flatten()) {
            Ok(got) => {
                prop_assert!(finite);
                check_assembled(&expected_of(&p), &got);
                prop_assert_eq!(&got, &rounded);
                if dtype == DType::F32 {
                    prop_assert_eq!(&got, &p);
                }
            }
            Err(e) => prop_assert!(!finite && e.to_string().contains("not finite"), "{e}"),
        }
    }

    /// A valid chunk stream with a few corruptions (dropped, duplicated, swapped chunks, wrong
    /// names, offsets, shapes, missing or corrupted values, NaN/inf, a stray chunk): never a
    /// panic; a stream that still assembles gives the full parameter set, and exactly the
    /// original one if only the stream's structure was touched.
    #[test]
    fn chunks_corrupted(
        p in param_set(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        chunk_bytes in 0..24usize,
        faults in proptest::collection::vec(chunk_fault(), 1..4),
    ) {
        // Values exact in every float dtype, so only the faults decide.
        let p: Vec<Param> = p
            .into_iter()
            .map(|(n, s, v)| (n, s, v.iter().map(|x| x.round().clamp(-4.0, 4.0)).collect()))
            .collect();
        let mut chunks: Vec<_> = params::to_chunk_groups(&p, dtype, chunk_bytes)
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        for f in &faults {
            apply_fault(&mut chunks, f);
        }
        let expected = expected_of(&p);
        if let Ok(got) = assemble(expected.clone(), chunks) {
            check_assembled(&expected, &got);
            if faults.iter().all(ChunkFault::structural) {
                prop_assert_eq!(got, p);
            }
        }
        vm_guard();
    }

    /// Entirely arbitrary chunks (names, shapes, offsets up to u64::MAX, any tensor or none)
    /// against a small expected set.
    #[test]
    fn chunks_arbitrary(p in param_set(), chunks in proptest::collection::vec(arbitrary_chunk(), 0..8)) {
        let expected = expected_of(&p);
        let mut a = ParamAssembler::new(expected.clone());
        for c in chunks {
            if let Err(e) = a.add(c) {
                let _ = e.to_string();
            }
        }
        if let Ok(got) = a.finish() {
            check_assembled(&expected, &got);
        }
        vm_guard();
    }

    /// An assembler for any expected shapes, however large their declared product (the shapes
    /// are the receiver's own model, but a product that overflows must be an error, not a
    /// panic), fed a chunk for the first parameter.
    #[test]
    fn assembler_any_expected_shape(
        shapes in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![0..5usize, Just(usize::MAX), Just(1usize << 32), Just(1usize << 62)], 0..4),
            0..4,
        ),
        first in arbitrary_chunk(),
    ) {
        let expected: Vec<(String, Vec<usize>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("layer{i}.weight"), s.clone()))
            .collect();
        // The assembler reserves each parameter's values up front: a shape of 2^32 valid
        // elements is a model that big, not an input, so such shapes are made to overflow.
        let expected: Vec<(String, Vec<usize>)> = expected
            .into_iter()
            .map(|(n, mut s)| {
                if s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n > 1 << 16) {
                    s.push(usize::MAX);
                }
                (n, s)
            })
            .collect();
        let mut a = ParamAssembler::new(expected.clone());
        let _ = a.add(first);
        if let Ok(got) = a.finish() {
            check_assembled(&expected, &got);
        }
        vm_guard();
    }
}

/// Regression: an expected shape whose element count overflows usize panicked
/// (`attempt to multiply with overflow`) in `ParamAssembler::new` and in `add`.
#[test]
fn assembler_overflowing_expected_shape_is_an_error() {
    let expected = vec![("w".to_string(), vec![usize::MAX, 2])];
    let mut a = ParamAssembler::new(expected.clone());
    let chunk = pb::ParamChunk {
        name: "w".into(),
        shape: vec![u64::MAX, 2],
        offset: 0,
        values: Some(params::encode_values(&[1.0], DType::F32).unwrap().into()),
    };
    let e = a.add(chunk).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    let e = ParamAssembler::new(expected).finish().unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Whole messages: prost decoding of arbitrary bytes, then every conversion.
// ---------------------------------------------------------------------------------------------

fn check_opt_tensor(t: &Option<pb::Tensor>) {
    if let Some(t) = t {
        check_wire_tensor(t);
    }
}

fn check_dtype_number(v: i32) {
    assert_eq!(DType::try_from(v).is_ok(), (1..=5).contains(&v));
}

/// Chunks as a receiver takes them: an assembler expecting the chunks' own names and shapes
/// (when their element count is small), fed every chunk.
fn check_chunks(chunks: &[pb::ParamChunk]) {
    for c in chunks {
        check_opt_tensor(&c.values);
    }
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    for c in chunks {
        if model_numel(&c.shape).is_none_or(|n| n > 1 << 12)
            || expected.iter().any(|(n, _)| *n == c.name)
        {
            continue;
        }
        expected.push((
            c.name.clone(),
            c.shape.iter().map(|&d| d as usize).collect(),
        ));
    }
    let mut a = ParamAssembler::new(expected.clone());
    for c in chunks {
        if a.add(c.clone()).is_err() {
            break;
        }
    }
    if let Ok(got) = a.finish() {
        check_assembled(&expected, &got);
    }
}

fn check_worker_message(m: &pb::WorkerMessage) {
    use pb::worker_message::Kind;
    match &m.kind {
        Some(Kind::Sync(s)) => check_chunks(&s.chunks),
        Some(Kind::Eval(e)) => {
            let _ = (
                e.errors,
                e.total,
                e.checkpoint.len(),
                e.checkpoint_bytes.len(),
            );
        }
        Some(Kind::Hello(_) | Kind::Credits(_) | Kind::Ack(_)) | None => {}
    }
}

fn check_train_batch(b: &pb::TrainBatch) {
    check_opt_tensor(&b.inputs);
    check_opt_tensor(&b.labels);
    check_opt_tensor(&b.soft_targets);
    if let Some(t) = &b.topk_targets {
        check_dtype_number(t.value_dtype);
    }
}

fn check_coordinator_message(m: &pb::CoordinatorMessage) {
    use pb::coordinator_message::Kind;
    match &m.kind {
        Some(Kind::Train(b)) => check_train_batch(b),
        Some(Kind::Eval(b)) => {
            check_opt_tensor(&b.inputs);
            check_opt_tensor(&b.labels);
        }
        Some(Kind::Params(p)) => check_chunks(&p.chunks),
        Some(Kind::Done(_) | Kind::SyncNow(_)) | None => {}
    }
}

/// Decodes `bytes` as every message of the protocol, runs the conversions on what decodes, and
/// checks that re-encoding a decoded message decodes to the same message.
fn decode_everything(bytes: &[u8]) {
    // Compared as bytes: a decoded float field may be NaN, which no message equals.
    fn round_trip<M: Message + Default>(m: &M) {
        let bytes = m.encode_to_vec();
        let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
        assert_eq!(again.encode_to_vec(), bytes);
    }
    macro_rules! each {
        ($($t:ty => $check:expr),* $(,)?) => {$(
            if let Ok(m) = <$t>::decode(Bytes::copy_from_slice(bytes)) {
                #[allow(clippy::redundant_closure_call)]
                ($check)(&m);
                round_trip(&m);
            }
        )*};
    }
    each! {
        pb::Tensor => check_wire_tensor,
        pb::ParamChunk => |c: &pb::ParamChunk| check_chunks(std::slice::from_ref(c)),
        pb::JoinRequest => |_: &pb::JoinRequest| {},
        pb::JoinResponse => |r: &pb::JoinResponse| {
            if let Some(s) = &r.sync { check_dtype_number(s.dtype) }
            let _ = model_numel(&r.input_shape);
        },
        pb::WorkerMessage => check_worker_message,
        pb::CoordinatorMessage => check_coordinator_message,
        pb::SyncUp => |s: &pb::SyncUp| check_chunks(&s.chunks),
        pb::SyncDown => |s: &pb::SyncDown| check_chunks(&s.chunks),
        pb::TrainBatch => check_train_batch,
        pb::EvalBatch => |b: &pb::EvalBatch| { check_opt_tensor(&b.inputs); check_opt_tensor(&b.labels) },
        pb::TopKTargets => |t: &pb::TopKTargets| check_dtype_number(t.value_dtype),
        pb::RunStatusRequest => |_: &pb::RunStatusRequest| {},
        pb::RunStatusResponse => |_: &pb::RunStatusResponse| {},
        pb::DescribeRequest => |_: &pb::DescribeRequest| {},
        pb::DescribeResponse => |d: &pb::DescribeResponse| {
            for &v in &d.input_dtypes { check_dtype_number(v) }
        },
        pb::InferRequest => |r: &pb::InferRequest| { check_opt_tensor(&r.inputs); check_dtype_number(r.output_dtype) },
        pb::InferResponse => |r: &pb::InferResponse| check_opt_tensor(&r.logits),
        pb::InferStreamResponse => |r: &pb::InferStreamResponse| {
            if let Some(pb::infer_stream_response::Result::Response(r)) = &r.result {
                check_opt_tensor(&r.logits)
            }
        },
        pb::RegisterRequest => |_: &pb::RegisterRequest| {},
        pb::RegisterResponse => |_: &pb::RegisterResponse| {},
        pb::HeartbeatRequest => |_: &pb::HeartbeatRequest| {},
        pb::HeartbeatResponse => |_: &pb::HeartbeatResponse| {},
        pb::DeregisterRequest => |_: &pb::DeregisterRequest| {},
        pb::DeregisterResponse => |_: &pb::DeregisterResponse| {},
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Valid messages of the kinds that carry tensors and chunks, encoded, for corrupting.
fn chunk_list() -> impl Strategy<Value = Vec<pb::ParamChunk>> {
    (param_set(), 0..24usize).prop_map(|(p, cb)| {
        params::to_chunk_groups(&p, DType::F32, cb)
            .unwrap()
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    })
}

fn valid_message_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            small_tensor(),
            small_tensor(),
            small_tensor(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(x, y, s, k, topk)| pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Train(pb::TrainBatch {
                    lease_id: 7,
                    epoch: 1,
                    index: 2,
                    inputs: Some(x),
                    labels: Some(y),
                    soft_targets: Some(s),
                    temperature: 4.0,
                    members: vec!["a".into()],
                    topk_targets: Some(pb::TopKTargets {
                        k,
                        classes: 10,
                        value_dtype: 2,
                        data: topk
                    }),
                    encoding: "f32".into(),
                    cached: false,
                })),
            }
            .encode_to_vec()),
        chunk_list().prop_map(|chunks| pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Sync(pb::SyncUp {
                base_version: 3,
                samples: 100,
                chunks,
                last: true,
                r#final: false,
                gradients: false,
            })),
        }
        .encode_to_vec()),
        chunk_list().prop_map(|chunks| pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Params(pb::SyncDown {
                version: 4,
                chunks,
                last: true,
                unchanged: false,
                contributors: 2,
            })),
        }
        .encode_to_vec()),
        (small_tensor(), wire_dtype()).prop_map(|(t, d)| pb::InferRequest {
            request_id: 9,
            inputs: Some(t),
            temperature: 2.0,
            output_dtype: d,
            ..Default::default()
        }
        .encode_to_vec()),
    ]
}

/// One corruption of an encoded message.
#[derive(Debug, Clone)]
enum ByteFault {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// A length-delimited field at this position declaring this many bytes.
    HugeLength(usize, u32, u64),
}

fn byte_fault() -> impl Strategy<Value = ByteFault> {
    let at = any::<usize>();
    prop_oneof![
        3 => (at, 1..=255u8).prop_map(|(i, x)| ByteFault::Flip(i, x)),
        1 => at.prop_map(ByteFault::Truncate),
        1 => (at, proptest::collection::vec(any::<u8>(), 1..12)).prop_map(|(i, b)| ByteFault::Insert(i, b)),
        1 => (at, 1..8usize).prop_map(|(i, n)| ByteFault::Remove(i, n)),
        1 => (at, 1..20u32, prop_oneof![Just(u64::MAX), (20..64u32).prop_map(|s| 1u64 << s), any::<u64>()])
            .prop_map(|(i, f, l)| ByteFault::HugeLength(i, f, l)),
    ]
}

fn apply_byte_fault(b: &mut Vec<u8>, f: &ByteFault) {
    let at = |i: &usize, n: usize| i % (n + 1);
    match f {
        ByteFault::Flip(i, x) => {
            if !b.is_empty() {
                let n = b.len();
                b[i % n] ^= x;
            }
        }
        ByteFault::Truncate(i) => b.truncate(at(i, b.len())),
        ByteFault::Insert(i, x) => {
            let p = at(i, b.len());
            b.splice(p..p, x.iter().copied());
        }
        ByteFault::Remove(i, n) => {
            let p = at(i, b.len());
            let end = (p + n).min(b.len());
            b.drain(p..end);
        }
        ByteFault::HugeLength(i, field, len) => {
            let p = at(i, b.len());
            let mut h = Vec::new();
            varint(u64::from(field << 3 | 2), &mut h);
            varint(*len, &mut h);
            b.splice(p..p, h);
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes decoded as every message.
    #[test]
    fn decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
        vm_guard();
    }

    /// Valid messages with corrupted bytes: flipped, truncated, inserted, removed, and
    /// length-delimited fields declaring up to 2^64 bytes.
    #[test]
    fn decode_corrupted_messages(
        bytes in valid_message_bytes(),
        faults in proptest::collection::vec(byte_fault(), 0..4),
    ) {
        let mut b = bytes;
        for f in &faults {
            apply_byte_fault(&mut b, f);
        }
        decode_everything(&b);
        vm_guard();
    }

    /// A field (known or not, any message) declaring more bytes than follow is an error, never
    /// an allocation of the declared size: here 2^20 to 2^64 bytes after a few real ones.
    #[test]
    fn declared_length_past_the_end_is_refused(
        field in 1..32u32,
        len in prop_oneof![(20..64u32).prop_map(|s| 1u64 << s), Just(u64::MAX), (1u64 << 20)..],
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut b = Vec::new();
        varint(u64::from(field << 3 | 2), &mut b);
        varint(len, &mut b);
        b.extend_from_slice(&tail);
        prop_assert!(pb::Tensor::decode(b.as_slice()).is_err());
        prop_assert!(pb::WorkerMessage::decode(b.as_slice()).is_err());
        prop_assert!(pb::CoordinatorMessage::decode(b.as_slice()).is_err());
        prop_assert!(pb::InferRequest::decode(b.as_slice()).is_err());
        prop_assert!(pb::SyncUp::decode(b.as_slice()).is_err());
        prop_assert!(pb::RegisterRequest::decode(b.as_slice()).is_err());
        vm_guard();
    }
}

/// A tensor message whose packed shape declares 2^40 × 2^40 elements and whose data field
/// declares 2^62 bytes: refused as too large (shape) or by the decoder (data length), with
/// nothing allocated for either.
#[test]
fn huge_declared_sizes_in_a_tensor_message() {
    let t = pb::Tensor {
        shape: vec![1 << 40, 1 << 40],
        dtype: pb::DType::DtypeF32 as i32,
        data: Bytes::new(),
    };
    let e = HostTensor::try_from(pb::Tensor::decode(t.encode_to_vec().as_slice()).unwrap());
    assert!(matches!(e, Err(Error::TooLarge { .. })), "{e:?}");
    let mut b = t.encode_to_vec();
    b.push(3 << 3 | 2);
    varint(1 << 62, &mut b);
    b.extend_from_slice(&[0; 16]);
    assert!(pb::Tensor::decode(b.as_slice()).is_err());
    vm_guard();
}
