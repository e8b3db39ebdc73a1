//! A data set in one safetensors file.
//!
//! | tensor | shape | dtype |
//! | --- | --- | --- |
//! | `x` | `[N, ...]` (rank ≥ 2) | U8, or F32 / F64 / F16 / BF16 |
//! | `y` | `[N]` | any integer dtype (U8 … I64), values ≥ 0 |
//! | `x_test`, `y_test` (optional, both or neither) | `[M, ...]` (same row shape as `x`), `[M]` | as above |
//!
//! `input_shape` is `x`'s shape without the first dimension. U8 features stay 8-bit (read as
//! `v / 255`); float features are converted to f32 and used as they are (expected in [0, 1], not
//! rescaled), and a NaN or infinity is an error. `classes` is the largest label of `y` + 1 (at
//! least 2); a test label outside that range is an error.
//!
//! **Without `x_test`/`y_test`**, the last ⌊N/6⌋ rows of `x`/`y` (at least one) are held out as
//! the test split and the first rows are the training split — deterministic, the same
//! train/test ratio as MNIST (60,000 / 10,000). Shuffle the file's rows beforehand if its order
//! is not random.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{Dataset, Features, Split, classes_from_labels};
use crate::{Error, Result};

/// Fraction of the rows held out as the test split when the file has none: `N / HOLDOUT_DIV`.
pub const HOLDOUT_DIV: usize = 6;

/// Loads `path` (see the module docs).
pub fn load(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::data(path, format!("not a valid safetensors file: {e}")))?;
    let names = st.names();
    let has = |n: &str| names.contains(&n);
    for required in ["x", "y"] {
        if !has(required) {
            return Err(Error::data(
                path,
                format!("no tensor `{required}` (the file has: {})", list(&names)),
            ));
        }
    }
    let (shape, x) = features(path, &st, "x")?;
    let y = labels(path, &st, "y")?;
    let n = shape[0];
    if y.len() != n {
        return Err(Error::data(
            path,
            format!("tensor `y` has {} labels but `x` has {n} rows", y.len()),
        ));
    }
    let input_shape = shape[1..].to_vec();
    let classes =
        classes_from_labels(&y).map_err(|m| Error::data(path, format!("tensor `y`: {m}")))?;
    let (train, test) = match (has("x_test"), has("y_test")) {
        (true, true) => {
            let (tshape, tx) = features(path, &st, "x_test")?;
            if tshape[1..] != shape[1..] {
                return Err(Error::data(
                    path,
                    format!(
                        "tensor `x_test` has rows of shape {:?} but `x` has {:?}",
                        &tshape[1..],
                        &shape[1..]
                    ),
                ));
            }
            let ty = labels(path, &st, "y_test")?;
            if ty.len() != tshape[0] {
                return Err(Error::data(
                    path,
                    format!(
                        "tensor `y_test` has {} labels but `x_test` has {} rows",
                        ty.len(),
                        tshape[0]
                    ),
                ));
            }
            (Split { x, y }, Split { x: tx, y: ty })
        }
        (false, false) => hold_out(path, x, y, n)?,
        (has_x, _) => {
            let (there, missing) = if has_x {
                ("x_test", "y_test")
            } else {
                ("y_test", "x_test")
            };
            return Err(Error::data(
                path,
                format!("tensor `{there}` without `{missing}`: give both or neither"),
            ));
        }
    };
    if let Some((i, &l)) = test
        .y
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= classes)
    {
        return Err(Error::data(
            path,
            format!(
                "tensor `y_test`: label {l} at index {i} is out of range: `y` defines {classes} \
                 classes (0..={})",
                classes - 1
            ),
        ));
    }
    Ok(Dataset {
        source: format!("safetensors:{}", path.display()),
        input_shape,
        classes,
        train,
        test,
        tokens: None,
    })
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return "no tensors".into();
    }
    let mut v = names.to_vec();
    v.sort_unstable();
    v.join(", ")
}

/// Splits off the last ⌊n/6⌋ rows (at least one) as the test split.
fn hold_out(path: &Path, x: Features, mut y: Vec<u32>, n: usize) -> Result<(Split, Split)> {
    if n < 2 {
        return Err(Error::data(
            path,
            format!(
                "only {n} row(s) in `x` and no `x_test`/`y_test`: need at least 2 to hold out a \
                 test split"
            ),
        ));
    }
    let n_test = (n / HOLDOUT_DIV).max(1);
    let n_train = n - n_test;
    let row_len = x.num_values() / n;
    let at = n_train * row_len;
    let (x, tx) = match x {
        Features::U8(mut v) => {
            let t = v.split_off(at);
            (Features::U8(v), Features::U8(t))
        }
        Features::F32(mut v) => {
            let t = v.split_off(at);
            (Features::F32(v), Features::F32(t))
        }
        Features::Tokens(mut v) => {
            let t = v.split_off(at);
            (Features::Tokens(v), Features::Tokens(t))
        }
    };
    let ty = y.split_off(n_train);
    tracing::info!(
        file = %path.display(),
        train = n_train,
        test = n_test,
        "no x_test/y_test: holding out the last rows as the test split"
    );
    Ok((Split { x, y }, Split { x: tx, y: ty }))
}

fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    b.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// Reads feature tensor `name`: its shape (rank ≥ 2, no zero sizes) and values.
fn features(path: &Path, st: &SafeTensors, name: &str) -> Result<(Vec<usize>, Features)> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::data(path, format!("tensor `{name}`: {e}")))?;
    let shape = t.shape().to_vec();
    if shape.len() < 2 || shape.contains(&0) {
        return Err(Error::data(
            path,
            format!(
                "tensor `{name}` has shape {shape:?}; expected [N, ...] with rank >= 2 and no \
                 zero sizes"
            ),
        ));
    }
    let b = t.data();
    let floats: Vec<f32> = match t.dtype() {
        Dtype::U8 => return Ok((shape, Features::U8(b.to_vec()))),
        Dtype::F32 => chunks::<4>(b).map(f32::from_le_bytes).collect(),
        Dtype::F64 => chunks::<8>(b)
            .map(|c| f64::from_le_bytes(c) as f32)
            .collect(),
        Dtype::F16 => chunks::<2>(b)
            .map(|c| half::f16::from_le_bytes(c).to_f32())
            .collect(),
        Dtype::BF16 => chunks::<2>(b)
            .map(|c| half::bf16::from_le_bytes(c).to_f32())
            .collect(),
        other => {
            return Err(Error::data(
                path,
                format!(
                    "tensor `{name}` has dtype {other:?}; expected U8 or a float dtype (F32, F64, \
                     F16, BF16)"
                ),
            ));
        }
    };
    let row_len: usize = shape[1..].iter().product();
    if let Some(i) = floats.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(
            path,
            format!(
                "tensor `{name}` has a non-finite value ({}) at row {}, element {}",
                floats[i],
                i / row_len,
                i % row_len
            ),
        ));
    }
    Ok((shape, Features::F32(floats)))
}

/// Reads label tensor `name`: rank 1, integer dtype, each value in 0..=u32::MAX.
fn labels(path: &Path, st: &SafeTensors, name: &str) -> Result<Vec<u32>> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::data(path, format!("tensor `{name}`: {e}")))?;
    if t.shape().len() != 1 {
        return Err(Error::data(
            path,
            format!(
                "tensor `{name}` has shape {:?}; expected [N] (one label per row)",
                t.shape()
            ),
        ));
    }
    let b = t.data();
    let wide: Vec<i128> = match t.dtype() {
        Dtype::U8 => b.iter().map(|&v| v.into()).collect(),
        Dtype::I8 => b.iter().map(|&v| (v as i8).into()).collect(),
        Dtype::U16 => chunks::<2>(b)
            .map(|c| u16::from_le_bytes(c).into())
            .collect(),
        Dtype::I16 => chunks::<2>(b)
            .map(|c| i16::from_le_bytes(c).into())
            .collect(),
        Dtype::U32 => chunks::<4>(b)
            .map(|c| u32::from_le_bytes(c).into())
            .collect(),
        Dtype::I32 => chunks::<4>(b)
            .map(|c| i32::from_le_bytes(c).into())
            .collect(),
        Dtype::U64 => chunks::<8>(b)
            .map(|c| u64::from_le_bytes(c).into())
            .collect(),
        Dtype::I64 => chunks::<8>(b)
            .map(|c| i64::from_le_bytes(c).into())
            .collect(),
        other => {
            return Err(Error::data(
                path,
                format!(
                    "tensor `{name}` has dtype {other:?}; expected an integer dtype (U8 … I64)"
                ),
            ));
        }
    };
    wide.iter()
        .enumerate()
        .map(|(i, &v)| {
            u32::try_from(v).map_err(|_| {
                Error::data(
                    path,
                    format!("tensor `{name}`: label {v} at index {i} is not in 0..=4294967295"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use safetensors::tensor::TensorView;

    use super::*;

    /// `(name, dtype, shape, bytes)`.
    type T = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    fn write(dir: &Path, tensors: &[T]) -> std::path::PathBuf {
        let views: HashMap<String, TensorView> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join("d.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn reads_u8_features_with_a_test_split() {
        let dir = tempfile::tempdir().unwrap();
        let x: Vec<u8> = (0..4 * 2 * 3).map(|v| v as u8).collect();
        let p = write(
            dir.path(),
            &[
                ("x", Dtype::U8, vec![4, 2, 3], x),
                ("y", Dtype::I64, vec![4], i64s(&[0, 4, 1, 2])),
                ("x_test", Dtype::U8, vec![1, 2, 3], vec![9; 6]),
                ("y_test", Dtype::U16, vec![1], vec![3, 0]),
            ],
        );
        let ds = Dataset::load(&format!("safetensors:{}", p.display())).unwrap();
        assert_eq!(ds.input_shape, vec![2, 3]);
        assert_eq!(ds.classes, 5);
        assert_eq!(ds.train.y, vec![0, 4, 1, 2]);
        assert_eq!(ds.test.y, vec![3]);
        assert_eq!(
            ds.train.rows_u8(&[3]).unwrap(),
            vec![18, 19, 20, 21, 22, 23]
        );
        assert_eq!(ds.test.rows_u8(&[0]).unwrap(), vec![9; 6]);
        assert_eq!(ds.source, format!("safetensors:{}", p.display()));
    }

    #[test]
    fn float_features_without_a_test_split_hold_out_the_last_sixth() {
        let dir = tempfile::tempdir().unwrap();
        let n = 13; // 13 / 6 = 2 held out
        let x: Vec<f32> = (0..n * 2).map(|v| v as f32 / 100.0).collect();
        let y: Vec<u8> = (0..n).map(|v| (v % 3) as u8).collect();
        let p = write(
            dir.path(),
            &[
                ("x", Dtype::F32, vec![n, 2], f32s(&x)),
                ("y", Dtype::U8, vec![n], y),
            ],
        );
        let ds = load(&p).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (11, 2));
        assert_eq!(ds.test.y, vec![2, 0]); // rows 11 and 12
        assert_eq!(ds.test.rows_f32(&[1]), vec![0.24, 0.25]);
        assert_eq!(ds.train.rows_f32(&[0]), vec![0.0, 0.01]);
        assert_eq!(ds.train.rows_u8(&[0]), None);
        assert_eq!(ds.input_shape, vec![2]);
        // Tiny sets still hold out one row.
        let p = write(
            dir.path(),
            &[
                (
                    "x",
                    Dtype::F64,
                    vec![2, 1],
                    [0.5f64, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                (
                    "y",
                    Dtype::I32,
                    vec![2],
                    [1i32, 0].iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            ],
        );
        let ds = load(&p).unwrap();
        assert_eq!((ds.train.y.clone(), ds.test.y.clone()), (vec![1], vec![0]));
        assert_eq!(ds.test.rows_f32(&[0]), vec![1.0]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let x4 = || ("x", Dtype::F32, vec![4, 2], f32s(&[0.0; 8]));
        let y4 = || ("y", Dtype::I64, vec![4], i64s(&[0, 1, 0, 1]));
        let cases: Vec<(Vec<T>, &str)> = vec![
            (vec![x4()], "no tensor `y` (the file has: x)"),
            (vec![y4()], "no tensor `x`"),
            (
                vec![x4(), ("y", Dtype::I64, vec![3], i64s(&[0, 1, 0]))],
                "tensor `y` has 3 labels but `x` has 4 rows",
            ),
            (
                vec![("x", Dtype::F32, vec![4], f32s(&[0.0; 4])), y4()],
                "tensor `x` has shape [4]",
            ),
            (
                vec![x4(), ("y", Dtype::I64, vec![4, 1], i64s(&[0, 1, 0, 1]))],
                "tensor `y` has shape [4, 1]",
            ),
            (
                vec![("x", Dtype::I32, vec![4, 2], vec![0; 32]), y4()],
                "tensor `x` has dtype I32",
            ),
            (
                vec![x4(), ("y", Dtype::F32, vec![4], f32s(&[0.0; 4]))],
                "tensor `y` has dtype F32",
            ),
            (
                vec![x4(), ("y", Dtype::I64, vec![4], i64s(&[0, -1, 0, 1]))],
                "tensor `y`: label -1 at index 1",
            ),
            (
                // Within u32 but beyond any class count: a 2^32-way head otherwise.
                vec![
                    x4(),
                    ("y", Dtype::I64, vec![4], i64s(&[0, 1, 4_294_967_295, 1])),
                ],
                "tensor `y`: label 4294967295 at index 2 is out of range: at most 16777216 classes",
            ),
            (
                vec![
                    (
                        "x",
                        Dtype::F32,
                        vec![4, 2],
                        f32s(&[0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0]),
                    ),
                    y4(),
                ],
                "tensor `x` has a non-finite value (NaN) at row 1, element 1",
            ),
            (
                vec![
                    x4(),
                    y4(),
                    ("x_test", Dtype::F32, vec![1, 2], f32s(&[0.0; 2])),
                ],
                "tensor `x_test` without `y_test`",
            ),
            (
                vec![
                    x4(),
                    y4(),
                    ("x_test", Dtype::F32, vec![1, 3], f32s(&[0.0; 3])),
                    ("y_test", Dtype::I64, vec![1], i64s(&[0])),
                ],
                "tensor `x_test` has rows of shape [3] but `x` has [2]",
            ),
            (
                vec![
                    x4(),
                    y4(),
                    ("x_test", Dtype::F32, vec![1, 2], f32s(&[0.0; 2])),
                    ("y_test", Dtype::I64, vec![2], i64s(&[0, 1])),
                ],
                "tensor `y_test` has 2 labels but `x_test` has 1 rows",
            ),
            (
                vec![
                    x4(),
                    y4(),
                    ("x_test", Dtype::F32, vec![1, 2], f32s(&[0.0; 2])),
                    ("y_test", Dtype::I64, vec![1], i64s(&[2])),
                ],
                "tensor `y_test`: label 2 at index 0 is out of range",
            ),
            (
                vec![
                    ("x", Dtype::F32, vec![1, 2], f32s(&[0.0; 2])),
                    ("y", Dtype::I64, vec![1], i64s(&[0])),
                ],
                "need at least 2",
            ),
        ];
        for (tensors, why) in cases {
            let p = write(dir.path(), &tensors);
            let e = load(&p).unwrap_err().to_string();
            assert!(e.contains(why), "expected `{why}` in: {e}");
            assert!(e.contains("d.safetensors"), "{e}");
        }
        let p = dir.path().join("d.safetensors");
        std::fs::write(&p, b"\x10\0\0\0\0\0\0\0{not json}     ").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("d.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        let e = load(&dir.path().join("missing.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
    }
}
