//! Data sets: where the coordinator's examples come from, and how rows become batches.
//!
//! A source is named by one string ([`DataSource`]):
//!
//! | string | data |
//! | --- | --- |
//! | `mnist:DIR` | the four IDX files of the MNIST family in `DIR`, raw or `.gz` (see [`idx`]) |
//! | `safetensors:FILE` | tensors `x`, `y` and optionally `x_test`, `y_test` (see [`safetensors_file`]) |
//! | `synthetic` or `synthetic:SEED` | a deterministic generated image set, seed 0 by default (see [`synthetic`]) |
//! | `text:PATH` | a UTF-8 corpus, tokenized and packed into windows (see [`tokens`]) |
//! | `grammar` or `grammar:SEED` | the toy language of [`grammar`], packed into windows (see [`tokens`]) |
//!
//! # Values
//!
//! Features are stored as loaded: 8-bit pixels stay `u8` ([`Features::U8`]) so they can go on the
//! wire as bytes; float features stay `f32`. Whenever rows are turned into floats
//! ([`Split::batch`], [`Split::rows_f32`]), a `u8` value `v` becomes exactly `v as f32 / 255.0`, in
//! [0, 1]. There is no other normalisation (no mean subtraction, no standardisation); float
//! features are passed through unchanged.
//!
//! # Order
//!
//! [`shuffled_indices`] gives each epoch's order from `(seed, epoch)` with ChaCha8 and an explicit
//! Fisher–Yates shuffle, so the order is the same on every platform and every `rand` version.

pub mod grammar;
pub mod idx;
pub mod safetensors_file;
pub mod synthetic;
pub mod text;
pub mod tokens;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Feature storage, row-major, n rows × row_len values.
#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    /// 8-bit values; `v` means `v / 255`.
    U8(Vec<u8>),
    /// Float values, used as they are.
    F32(Vec<f32>),
    /// Token ids: each row is one window of a token data set (see [`tokens`]).
    Tokens(Vec<u32>),
}

impl Features {
    /// Number of stored values (rows × row length).
    pub fn num_values(&self) -> usize {
        match self {
            Features::U8(v) => v.len(),
            Features::F32(v) => v.len(),
            Features::Tokens(v) => v.len(),
        }
    }
}

/// One split (train or test): features and a label per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The rows, `len() × row_len()` values.
    pub x: Features,
    /// The class of each row.
    pub y: Vec<u32>,
}

/// `U8_TO_F32[v] == v as f32 / 255.0`, so conversion is a table look-up with exactly that result.
/// Every role scales pixels through [`pixel_to_f32`] so a teacher and a student see bit-identical
/// inputs (`v * (1.0 / 255.0)` differs from `v / 255.0` by one ulp for 126 of the 256 values).
static U8_TO_F32: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32 / 255.0;
        i += 1;
    }
    t
};

/// The f32 value of an 8-bit feature: exactly `v as f32 / 255.0`, in [0, 1].
pub fn pixel_to_f32(v: u8) -> f32 {
    U8_TO_F32[usize::from(v)]
}

/// [`pixel_to_f32`] of every byte, in order.
pub fn pixels_to_f32(v: &[u8]) -> Vec<f32> {
    v.iter().map(|&b| pixel_to_f32(b)).collect()
}

impl Split {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Values per row (0 for an empty split).
    pub fn row_len(&self) -> usize {
        self.x.num_values().checked_div(self.len()).unwrap_or(0)
    }

    /// Gathers rows `idx` into a f32 tensor `[B, ...input_shape]` with values in [0, 1] (u8 / 255;
    /// float features unchanged), plus labels `[B]` u32, on `device`.
    ///
    /// `input_shape` must have `row_len()` elements. If `jitter` is `Some((k, rng))`, each image is
    /// shifted by a random integer offset in [-k, k] in each of x and y (drawn from `rng`, x
    /// first), filling the uncovered pixels with 0 — the translation augmentation Hinton et al.
    /// trained their MNIST teacher with. Jitter needs an image shape `[C, H, W]`; with any other
    /// shape it is an [`Error::Input`] (not silently ignored), so a caller that asked for
    /// augmentation never trains without it by mistake.
    ///
    /// # Shapes
    /// `idx`: `B` row indices (each `< len()`) → (`[B, ...input_shape]` f32, `[B]` u32).
    pub fn batch(
        &self,
        input_shape: &[usize],
        idx: &[usize],
        device: &Device,
        jitter: Option<(usize, &mut ChaCha8Rng)>,
    ) -> Result<(Tensor, Tensor)> {
        let row_len = self.row_len();
        let want: usize = input_shape.iter().product();
        if input_shape.is_empty() || want != row_len || row_len == 0 {
            return Err(Error::Input(format!(
                "batch shape {input_shape:?} ({want} values) does not fit rows of {row_len} values"
            )));
        }
        self.check_indices(idx)?;
        if let Features::Tokens(_) = &self.x {
            return Err(Error::Input(
                "token windows are not image rows: batch them with `rows_tokens`".into(),
            ));
        }
        // One zeroed buffer, filled in place and moved into the tensor: the only allocation
        // besides the labels (the zeros are also jitter's fill value).
        let mut x = vec![0f32; idx.len() * row_len];
        match jitter {
            None => match &self.x {
                Features::U8(v) => gather(v, row_len, idx, &mut x, pixel_to_f32),
                Features::F32(v) => gather(v, row_len, idx, &mut x, |f| f),
                Features::Tokens(_) => {}
            },
            Some((k, rng)) => {
                let &[c, h, w] = input_shape else {
                    return Err(Error::Input(format!(
                        "jitter needs an image shape [C, H, W], got {input_shape:?}"
                    )));
                };
                let img = Image { c, h, w };
                match &self.x {
                    Features::U8(v) => gather_shifted(v, img, k, rng, idx, &mut x, pixel_to_f32),
                    Features::F32(v) => gather_shifted(v, img, k, rng, idx, &mut x, |f| f),
                    Features::Tokens(_) => {}
                }
            }
        }
        let y: Vec<u32> = idx.iter().map(|&i| self.y[i]).collect();
        let mut shape = Vec::with_capacity(input_shape.len() + 1);
        shape.push(idx.len());
        shape.extend_from_slice(input_shape);
        let x = Tensor::from_vec(x, shape, device)?;
        let y = Tensor::from_vec(y, idx.len(), device)?;
        Ok((x, y))
    }

    /// The raw 8-bit rows for `idx` (concatenated) when the features are U8, else None (the
    /// coordinator sends u8 on the wire when it can).
    ///
    /// # Panics
    /// If an index is `>= len()`, like slice indexing (indices come from the caller's own
    /// order, never from outside input).
    pub fn rows_u8(&self, idx: &[usize]) -> Option<Vec<u8>> {
        let Features::U8(v) = &self.x else {
            return None;
        };
        Some(concat_rows(v, self.row_len(), idx))
    }

    /// The token rows for `idx` (concatenated) when the features are tokens, else None.
    ///
    /// # Panics
    /// If an index is `>= len()`, like slice indexing.
    pub fn rows_tokens(&self, idx: &[usize]) -> Option<Vec<u32>> {
        let Features::Tokens(v) = &self.x else {
            return None;
        };
        Some(concat_rows(v, self.row_len(), idx))
    }

    /// Rows `idx` as f32 in [0, 1] (u8 / 255; float features unchanged), concatenated. Token
    /// ids come out as their values (exact below 2^24), for code that only copies rows.
    ///
    /// # Panics
    /// If an index is `>= len()`, like slice indexing.
    pub fn rows_f32(&self, idx: &[usize]) -> Vec<f32> {
        let row_len = self.row_len();
        let mut out = Vec::with_capacity(idx.len() * row_len);
        for &i in idx {
            let r = i * row_len..(i + 1) * row_len;
            match &self.x {
                Features::U8(v) => out.extend(v[r].iter().map(|&b| pixel_to_f32(b))),
                Features::F32(v) => out.extend_from_slice(&v[r]),
                Features::Tokens(v) => out.extend(v[r].iter().map(|&t| t as f32)),
            }
        }
        out
    }

    /// The labels of rows `idx`.
    ///
    /// # Panics
    /// If an index is `>= len()`, like slice indexing.
    pub fn labels(&self, idx: &[usize]) -> Vec<u32> {
        idx.iter().map(|&i| self.y[i]).collect()
    }

    fn check_indices(&self, idx: &[usize]) -> Result<()> {
        let n = self.len();
        match idx.iter().position(|&i| i >= n) {
            Some(p) => Err(Error::Input(format!(
                "row index {} (position {p} of the batch) is out of range: the split has {n} rows",
                idx[p]
            ))),
            None => Ok(()),
        }
    }
}

/// Rows `idx` of `src` (rows of `row_len` values), concatenated. Panics on an index out of
/// range, like slice indexing.
fn concat_rows<T: Copy>(src: &[T], row_len: usize, idx: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(idx.len() * row_len);
    for &i in idx {
        out.extend_from_slice(&src[i * row_len..(i + 1) * row_len]);
    }
    out
}

fn gather<T: Copy>(
    src: &[T],
    row_len: usize,
    idx: &[usize],
    out: &mut [f32],
    conv: impl Fn(T) -> f32,
) {
    for (o, &i) in out.chunks_exact_mut(row_len).zip(idx) {
        for (d, &s) in o.iter_mut().zip(&src[i * row_len..(i + 1) * row_len]) {
            *d = conv(s);
        }
    }
}

#[derive(Clone, Copy)]
struct Image {
    c: usize,
    h: usize,
    w: usize,
}

/// Copies each row shifted by a random (dx, dy) in [-k, k]²: `out[y][x] = src[y - dy][x - dx]`,
/// leaving the pixels shifted in from outside at 0 (`out` must be zeroed).
fn gather_shifted<T: Copy>(
    src: &[T],
    img: Image,
    k: usize,
    rng: &mut ChaCha8Rng,
    idx: &[usize],
    out: &mut [f32],
    conv: impl Fn(T) -> f32,
) {
    let Image { c, h, w } = img;
    let row_len = c * h * w;
    let k = k as i64;
    for (o, &i) in out.chunks_exact_mut(row_len).zip(idx) {
        let dx = rng.random_range(-k..=k);
        let dy = rng.random_range(-k..=k);
        let s = &src[i * row_len..(i + 1) * row_len];
        // Destination columns [x0, x1) read source columns [x0 - dx, x1 - dx).
        let x0 = dx.clamp(0, w as i64) as usize;
        let x1 = (w as i64 + dx).clamp(0, w as i64) as usize;
        if x0 >= x1 {
            continue;
        }
        let sx0 = (x0 as i64 - dx) as usize;
        for ch in 0..c {
            let plane = ch * h * w;
            for y in 0..h {
                let sy = y as i64 - dy;
                if sy < 0 || sy >= h as i64 {
                    continue;
                }
                let srow = plane + sy as usize * w + sx0;
                let drow = plane + y * w;
                for (d, &v) in o[drow + x0..drow + x1]
                    .iter_mut()
                    .zip(&s[srow..srow + (x1 - x0)])
                {
                    *d = conv(v);
                }
            }
        }
    }
}

/// A data set: train and test splits of the same row shape and classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The canonical source string it was loaded from (the [`DataSource`]'s `Display` form).
    pub source: String,
    /// Shape of one row, e.g. `[1, 28, 28]`.
    pub input_shape: Vec<usize>,
    /// Number of classes; every label is `< classes`.
    pub classes: usize,
    /// Training rows.
    pub train: Split,
    /// Test rows.
    pub test: Split,
    /// For a token data set (rows are windows), what they are; None for examples.
    pub tokens: Option<tokens::TokenInfo>,
}

impl Dataset {
    /// Loads from a source string: "mnist:DIR", "safetensors:FILE", "synthetic" or
    /// "synthetic:SEED".
    pub fn load(source: &str) -> Result<Dataset> {
        source.parse::<DataSource>()?.load()
    }

    /// Values per row (the product of `input_shape`).
    pub fn row_len(&self) -> usize {
        self.input_shape.iter().product()
    }
}

/// A parsed source string, with FromStr + Display (round-trips).
///
/// Paths are printed with [`std::path::Path::display`], so a path that is not valid UTF-8 does
/// not round-trip exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// A directory holding the four MNIST-family IDX files.
    Mnist(PathBuf),
    /// A safetensors file with `x`, `y` (and optionally `x_test`, `y_test`).
    Safetensors(PathBuf),
    /// The generated data set of [`synthetic`].
    Synthetic {
        /// Seed of the generator.
        seed: u64,
    },
    /// A text corpus (a file, or a directory of `*.txt` files), tokenized into windows.
    Text(PathBuf),
    /// The toy language of [`grammar`], tokenized into windows.
    Grammar {
        /// Seed of the generator.
        seed: u64,
    },
}

impl DataSource {
    /// Reads or generates the data set (a token source with the default [`tokens::TokenOptions`]).
    pub fn load(&self) -> Result<Dataset> {
        self.load_with(&tokens::TokenOptions::default())
    }

    /// Reads or generates the data set; `opts` say how a token source becomes windows (image
    /// sources ignore them).
    pub fn load_with(&self, opts: &tokens::TokenOptions) -> Result<Dataset> {
        let t0 = std::time::Instant::now();
        let ds = match self {
            DataSource::Text(path) => tokens::load_text(path, opts)?,
            DataSource::Grammar { seed } => tokens::load_grammar(*seed, opts)?,
            DataSource::Mnist(dir) => idx::load_mnist_dir(dir)?,
            DataSource::Safetensors(file) => safetensors_file::load(file)?,
            DataSource::Synthetic { seed } => {
                synthetic::generate(*seed, synthetic::DEFAULT_TRAIN, synthetic::DEFAULT_TEST)
            }
        };
        let ds = Dataset {
            source: self.to_string(),
            ..ds
        };
        tracing::info!(
            source = %ds.source,
            train = ds.train.len(),
            test = ds.test.len(),
            classes = ds.classes,
            input_shape = ?ds.input_shape,
            secs = t0.elapsed().as_secs_f64(),
            "loaded data set"
        );
        Ok(ds)
    }
}

impl FromStr for DataSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::DataSource {
            source_str: s.to_string(),
            msg: msg.to_string(),
        };
        let expected =
            "expected mnist:DIR, safetensors:FILE, synthetic[:SEED], text:PATH or grammar[:SEED]";
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        match (kind, rest) {
            ("synthetic", None) => Ok(DataSource::Synthetic { seed: 0 }),
            ("grammar", None) => Ok(DataSource::Grammar { seed: 0 }),
            ("grammar", Some(r)) => r
                .parse::<u64>()
                .map(|seed| DataSource::Grammar { seed })
                .map_err(|_| bad(&format!("seed `{r}` is not an unsigned integer"))),
            ("text", Some(p)) if !p.is_empty() => Ok(DataSource::Text(PathBuf::from(p))),
            ("text", _) => Err(bad(
                "`text:` needs a path: a UTF-8 file or a directory of *.txt files",
            )),
            ("synthetic", Some(r)) => r
                .parse::<u64>()
                .map(|seed| DataSource::Synthetic { seed })
                .map_err(|_| bad(&format!("seed `{r}` is not an unsigned integer"))),
            ("mnist" | "safetensors", None | Some("")) => {
                Err(bad(&format!("`{kind}:` needs a path after the colon")))
            }
            ("mnist", Some(p)) => Ok(DataSource::Mnist(PathBuf::from(p))),
            ("safetensors", Some(p)) => Ok(DataSource::Safetensors(PathBuf::from(p))),
            (other, _) => Err(bad(&format!("unknown kind `{other}`: {expected}"))),
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Mnist(p) => write!(f, "mnist:{}", p.display()),
            DataSource::Safetensors(p) => write!(f, "safetensors:{}", p.display()),
            DataSource::Synthetic { seed } => write!(f, "synthetic:{seed}"),
            DataSource::Text(p) => write!(f, "text:{}", p.display()),
            DataSource::Grammar { seed } => write!(f, "grammar:{seed}"),
        }
    }
}

/// Seeded permutation of 0..n for (seed, epoch): same inputs → same order, different epoch →
/// different order. This is the one epoch order of distill: a local run and a coordinated run
/// with the same seed visit the rows in the same order.
///
/// ChaCha8 seeded with `seed`, on stream `epoch`, drives a Fisher–Yates shuffle whose bounded
/// draws are Lemire's multiply-and-reject ([`below`]) — written out here rather than taken from
/// `rand`'s `shuffle`, so the order depends only on ChaCha8 (stable across platforms and crate
/// versions).
pub fn shuffled_indices(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // `i + 1 <= n <= usize::MAX` fits in a u64 and the draw is `<= i`, so both casts are exact.
        let j = below(&mut rng, i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// A uniform integer in `0..n` (`n > 0`) by Lemire's multiply-and-reject method: exactly
/// uniform, no modulo bias, usually one draw.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        // 2^64 mod n: the low products below it are the draws that would bias the result.
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// The most classes a data set may define (2^24). A label at or above it is far beyond any
/// classifier head this system trains (a 2^24-way head of one hidden unit already holds 16M
/// weights), so it means a corrupt file, not a large task.
pub const MAX_CLASSES: usize = 1 << 24;

/// Largest label + 1, at least 2 (a classifier needs two classes); a label of
/// [`MAX_CLASSES`] or more is an error message naming it and its index.
pub(crate) fn classes_from_labels(y: &[u32]) -> std::result::Result<usize, String> {
    if let Some((i, &l)) = y
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= MAX_CLASSES)
    {
        return Err(format!(
            "label {l} at index {i} is out of range: at most {MAX_CLASSES} classes (labels 0..={})",
            MAX_CLASSES - 1
        ));
    }
    Ok(y.iter().max().map_or(0, |&m| m as usize + 1).max(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shuffled_indices(10, 0, 0)`, from `reference_order` below.
    const PINNED_10_0_0: [usize; 10] = [6, 1, 8, 3, 2, 9, 0, 5, 4, 7];

    fn split_u8() -> Split {
        // 3 images of 1×2×3, pixel value = 10·row + column + 100·image.
        let mut x = Vec::new();
        for i in 0..3u8 {
            for r in 0..2u8 {
                for c in 0..3u8 {
                    x.push(100 * i + 10 * r + c);
                }
            }
        }
        Split {
            x: Features::U8(x),
            y: vec![7, 8, 9],
        }
    }

    #[test]
    fn source_strings_round_trip_and_bad_ones_say_why() {
        for s in [
            "mnist:/data/mnist",
            "safetensors:rel/x.safetensors",
            "synthetic:0",
            "synthetic:18446744073709551615",
            "mnist:C:\\data",
        ] {
            let src: DataSource = s.parse().unwrap();
            assert_eq!(src.to_string(), s);
            assert_eq!(src.to_string().parse::<DataSource>().unwrap(), src);
        }
        assert_eq!(
            "synthetic".parse::<DataSource>().unwrap(),
            DataSource::Synthetic { seed: 0 }
        );
        assert_eq!(
            "mnist:a:b".parse::<DataSource>().unwrap(),
            DataSource::Mnist(PathBuf::from("a:b"))
        );
        for (s, why) in [
            ("mnist", "needs a path"),
            ("safetensors:", "needs a path"),
            ("synthetic:x", "seed `x`"),
            ("synthetic:-1", "seed `-1`"),
            ("csv:foo", "unknown kind `csv`"),
            ("", "unknown kind ``"),
        ] {
            let e = s.parse::<DataSource>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&format!("`{s}`")), "{s}: {e}");
        }
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled_indices(1000, 5, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled_indices(1000, 5, 0));
        assert_ne!(a, shuffled_indices(1000, 5, 1));
        assert_ne!(a, shuffled_indices(1000, 6, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert!(shuffled_indices(0, 1, 1).is_empty());
        assert_eq!(shuffled_indices(1, 1, 1), vec![0]);
        // Every position gets every value about equally often (a biased shuffle would not).
        let mut first = [0usize; 4];
        for epoch in 0..4000 {
            first[shuffled_indices(4, 9, epoch)[0]] += 1;
        }
        assert!(first.iter().all(|&c| (850..1150).contains(&c)), "{first:?}");
    }

    /// The order the coordinator's ledger draws, written out independently of [`below`]: the
    /// classic formulation of Lemire's method (reject while `low < 2^64 mod n`, checked on every
    /// draw), so a change to the shared draw in either place shows here.
    fn reference_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let bound = i as u128 + 1;
            let threshold = (u128::from(u64::MAX) + 1 - bound) % bound;
            let j = loop {
                let m = u128::from(rng.next_u64()) * bound;
                if (m & u128::from(u64::MAX)) >= threshold {
                    break (m >> 64) as usize;
                }
            };
            v.swap(i, j);
        }
        v
    }

    #[test]
    fn shuffle_matches_the_lemire_reference_and_pinned_values() {
        for (n, seed, epoch) in [
            (10, 0, 0),
            (1000, 5, 0),
            (1000, 5, 3),
            (7, 42, 9),
            (60_000, 1, 2),
        ] {
            assert_eq!(
                shuffled_indices(n, seed, epoch),
                reference_order(n, seed, epoch),
                "n {n} seed {seed} epoch {epoch}"
            );
        }
        // Pinned from `reference_order` so the order cannot drift with it either.
        assert_eq!(shuffled_indices(10, 0, 0), PINNED_10_0_0);
    }

    #[test]
    fn pixels_scale_by_division() {
        for v in 0..=255u8 {
            assert_eq!(
                pixel_to_f32(v).to_bits(),
                (f32::from(v) / 255.0).to_bits(),
                "{v}"
            );
        }
        assert_eq!(pixels_to_f32(&[0, 255, 1]), vec![0.0, 1.0, 1.0 / 255.0]);
    }

    #[test]
    fn batches_gather_rows_scaled_to_unit_range() {
        let s = split_u8();
        assert_eq!((s.len(), s.row_len(), s.is_empty()), (3, 6, false));
        let (x, y) = s.batch(&[1, 2, 3], &[2, 0], &Device::Cpu, None).unwrap();
        assert_eq!(x.dims(), &[2, 1, 2, 3]);
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![9, 7]);
        let got = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = [200u8, 201, 202, 210, 211, 212, 0, 1, 2, 10, 11, 12]
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect();
        assert_eq!(got, want);
        assert_eq!(s.rows_f32(&[2, 0]), want);
        assert_eq!(s.rows_u8(&[1]).unwrap(), vec![100, 101, 102, 110, 111, 112]);
        assert_eq!(s.labels(&[1, 1]), vec![8, 8]);
        // The same rows, flattened for an MLP.
        let (x, _) = s.batch(&[6], &[2, 0], &Device::Cpu, None).unwrap();
        assert_eq!(x.dims(), &[2, 6]);
        // Float features pass through unchanged and have no u8 form.
        let f = Split {
            x: Features::F32(vec![0.5, -2.0, 3.0, 4.0]),
            y: vec![0, 1],
        };
        assert_eq!(f.rows_u8(&[0]), None);
        assert_eq!(f.rows_f32(&[1, 0]), vec![3.0, 4.0, 0.5, -2.0]);
        let (x, _) = f.batch(&[2], &[1], &Device::Cpu, None).unwrap();
        assert_eq!(x.to_vec2::<f32>().unwrap(), vec![vec![3.0, 4.0]]);
        assert_eq!(U8_TO_F32[255], 1.0);
        assert_eq!(U8_TO_F32[0], 0.0);
    }

    #[test]
    fn bad_batches_are_errors() {
        let s = split_u8();
        let dev = Device::Cpu;
        let e = s.batch(&[1, 2, 3], &[0, 3], &dev, None).unwrap_err();
        assert!(e.to_string().contains("row index 3"), "{e}");
        let e = s.batch(&[1, 2, 2], &[0], &dev, None).unwrap_err();
        assert!(e.to_string().contains("does not fit rows of 6"), "{e}");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let e = s.batch(&[6], &[0], &dev, Some((1, &mut rng))).unwrap_err();
        assert!(e.to_string().contains("jitter needs an image shape"), "{e}");
        let (x, y) = s.batch(&[1, 2, 3], &[], &dev, None).unwrap();
        assert_eq!((x.dims(), y.dims()), (&[0, 1, 2, 3][..], &[0][..]));
    }

    /// Reference: the shifted image built pixel by pixel.
    fn shifted(img: &[f32], c: usize, h: usize, w: usize, dx: i64, dy: i64) -> Vec<f32> {
        let mut out = vec![0.0; c * h * w];
        for ch in 0..c {
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let (sx, sy) = (x - dx, y - dy);
                    if (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy) {
                        out[ch * h * w + (y as usize) * w + x as usize] =
                            img[ch * h * w + (sy as usize) * w + sx as usize];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn jitter_shifts_each_image_by_a_seeded_offset_and_fills_with_zero() {
        let (c, h, w) = (2, 4, 5);
        let x: Vec<u8> = (0..3 * c * h * w).map(|v| (v % 250 + 1) as u8).collect();
        let s = Split {
            x: Features::U8(x),
            y: vec![0, 1, 2],
        };
        let idx = [2, 0, 1, 2, 2, 2, 1, 0];
        let k = 2;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (xb, _) = s
            .batch(&[c, h, w], &idx, &Device::Cpu, Some((k, &mut rng)))
            .unwrap();
        let got = xb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Replay the offsets: x then y per image, from the same seed.
        let mut replay = ChaCha8Rng::seed_from_u64(11);
        let mut seen_shift = false;
        for (b, &i) in idx.iter().enumerate() {
            let dx = replay.random_range(-(k as i64)..=k as i64);
            let dy = replay.random_range(-(k as i64)..=k as i64);
            seen_shift |= dx != 0 || dy != 0;
            let want = shifted(&s.rows_f32(&[i]), c, h, w, dx, dy);
            assert_eq!(
                &got[b * c * h * w..(b + 1) * c * h * w],
                &want[..],
                "image {b}"
            );
        }
        assert!(seen_shift);
        // k = 0 is the identity; a shift past the border leaves zeros.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (x0, _) = s
            .batch(&[c, h, w], &[1], &Device::Cpu, Some((0, &mut rng)))
            .unwrap();
        assert_eq!(
            x0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            s.rows_f32(&[1])
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (xf, _) = s
            .batch(&[c, h, w], &[1; 50], &Device::Cpu, Some((9, &mut rng)))
            .unwrap();
        let v = xf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.chunks(c * h * w).any(|img| img.iter().all(|&p| p == 0.0)));
    }
}
