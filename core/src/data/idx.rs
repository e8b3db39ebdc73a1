//! The IDX files of the MNIST family (MNIST, Fashion-MNIST, KMNIST, …).
//!
//! A directory holds four files, each raw or gzip-compressed (the name plus `.gz`; when both
//! exist the raw file is read):
//!
//! | file | magic | header (big-endian u32s) | data |
//! | --- | --- | --- | --- |
//! | `train-images-idx3-ubyte` | 2051 | magic, n, rows, cols | n·rows·cols pixels, u8 |
//! | `train-labels-idx1-ubyte` | 2049 | magic, n | n labels, u8 |
//! | `t10k-images-idx3-ubyte` | 2051 | same | same |
//! | `t10k-labels-idx1-ubyte` | 2049 | same | same |
//!
//! Every check names the file it failed on: the magic number, a truncated header or body,
//! bytes after the data, zero sizes, images and labels of one split differing in count, test
//! images of another size than the training images, and test labels outside the classes the
//! training labels define (`classes` = largest training label + 1, at least 2). A file whose
//! content starts with the gzip magic is decompressed whatever its name; a `.gz` file that is not
//! valid gzip is an error.
//!
//! The data set's `input_shape` is `[1, rows, cols]`; pixels stay `u8`.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Dataset, Features, Split, classes_from_labels};
use crate::{Error, Result};

/// Magic number of an `idx3-ubyte` image file.
pub const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an `idx1-ubyte` label file.
pub const LABELS_MAGIC: u32 = 2049;

/// File names of the training images and labels, and the test images and labels.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// The contents of one image file.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    /// Number of images.
    pub n: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `n × rows × cols` pixels, row-major.
    pub pixels: Vec<u8>,
}

/// Loads the four files of `dir` (see the module docs).
pub fn load_mnist_dir(dir: &Path) -> Result<Dataset> {
    let [tr_img, tr_lab, te_img, te_lab] = FILES.map(|name| find(dir, name));
    let (tr_img, tr_lab, te_img, te_lab) = (tr_img?, tr_lab?, te_img?, te_lab?);
    let train_x = read_images(&tr_img)?;
    let train_y = read_labels(&tr_lab)?;
    let test_x = read_images(&te_img)?;
    let test_y = read_labels(&te_lab)?;
    for (img, lab, ip, lp) in [
        (&train_x, &train_y, &tr_img, &tr_lab),
        (&test_x, &test_y, &te_img, &te_lab),
    ] {
        if img.n != lab.len() {
            return Err(Error::data(
                lp,
                format!(
                    "count mismatch: {} labels but {} has {} images",
                    lab.len(),
                    ip.display(),
                    img.n
                ),
            ));
        }
    }
    if (test_x.rows, test_x.cols) != (train_x.rows, train_x.cols) {
        return Err(Error::data(
            &te_img,
            format!(
                "images are {}×{} but the training images ({}) are {}×{}",
                test_x.rows,
                test_x.cols,
                tr_img.display(),
                train_x.rows,
                train_x.cols
            ),
        ));
    }
    let train_y: Vec<u32> = train_y.into_iter().map(u32::from).collect();
    let test_y: Vec<u32> = test_y.into_iter().map(u32::from).collect();
    let classes = classes_from_labels(&train_y).map_err(|m| Error::data(&tr_lab, m))?;
    if let Some((i, &l)) = test_y
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= classes)
    {
        return Err(Error::data(
            &te_lab,
            format!(
                "label {l} at index {i} is out of range: the training labels ({}) define {classes} \
                 classes (0..={})",
                tr_lab.display(),
                classes - 1
            ),
        ));
    }
    Ok(Dataset {
        source: format!("mnist:{}", dir.display()),
        input_shape: vec![1, train_x.rows, train_x.cols],
        classes,
        train: Split {
            x: Features::U8(train_x.pixels),
            y: train_y,
        },
        test: Split {
            x: Features::U8(test_x.pixels),
            y: test_y,
        },
        tokens: None,
    })
}

/// `dir/name` if it exists, else `dir/name.gz`, else an error naming both.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if raw.is_file() {
        Ok(raw)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(Error::data(
            &raw,
            format!(
                "missing: neither {} nor {} exists",
                raw.display(),
                gz.display()
            ),
        ))
    }
}

/// Where an IDX file's bytes come from: the file itself, or a gzip stream over it.
enum Source {
    Raw,
    Gzip,
}

/// The most bytes deflate can inflate one compressed byte to (RFC 1951: a 258-byte match coded in
/// two bits), so a gzip file of `n` bytes never yields more than `n · GZIP_MAX_RATIO` bytes.
const GZIP_MAX_RATIO: u64 = 1032;

/// An opened IDX file: where its bytes come from, the stream, and the most bytes that stream can
/// yield when that is known (a regular file: its length raw, [`GZIP_MAX_RATIO`] times it
/// gzipped), so that a header declaring more is refused before anything is read.
struct Opened<R> {
    source: Source,
    stream: R,
    max_len: Option<u64>,
}

/// Opens `path`, gunzipping when its content starts with the gzip magic 1f 8b (whatever its
/// name). Nothing is read beyond the first two bytes here: the caller reads only as much as the
/// header says, and refuses a header declaring more than the file can hold, so a small file
/// cannot inflate into unbounded memory.
fn open(path: &Path) -> Result<Opened<Box<dyn Read>>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut f, &mut magic).map_err(|e| Error::io(path, e))?;
    let stream = std::io::Cursor::new(magic[..got].to_vec()).chain(f);
    let named_gz = path.extension().is_some_and(|e| e == "gz");
    if magic[..got] == [0x1f, 0x8b] {
        let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(stream));
        Ok(Opened {
            source: Source::Gzip,
            stream: Box::new(gz),
            max_len: file_len.map(|n| n.saturating_mul(GZIP_MAX_RATIO)),
        })
    } else if named_gz {
        Err(Error::data(
            path,
            "not gzip: the name ends in .gz but the file does not start with the gzip magic 1f 8b",
        ))
    } else {
        Ok(Opened {
            source: Source::Raw,
            stream: Box::new(stream),
            max_len: file_len,
        })
    }
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_error(path: &Path, source: &Source, e: std::io::Error) -> Error {
    match source {
        Source::Gzip => Error::data(path, format!("bad gzip stream (corrupt or truncated): {e}")),
        Source::Raw => Error::io(path, e),
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks magic and header length; returns the header's dimensions.
fn header(path: &Path, b: &[u8], magic: u32, ndim: usize, what: &str) -> Result<Vec<usize>> {
    let len = 4 * (1 + ndim);
    if b.len() < 4 {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes, too short for the IDX magic number",
                b.len()
            ),
        ));
    }
    let got = be_u32(b, 0);
    if got != magic {
        return Err(Error::data(
            path,
            format!("bad magic number {got} (0x{got:08x}): expected {magic} for {what}"),
        ));
    }
    if b.len() < len {
        return Err(Error::data(
            path,
            format!(
                "truncated header: {} bytes, expected {len} (magic and {ndim} sizes)",
                b.len()
            ),
        ));
    }
    Ok((0..ndim).map(|d| be_u32(b, 4 + 4 * d) as usize).collect())
}

/// What one IDX file holds: its header's sizes and its body.
struct Idx {
    dims: Vec<usize>,
    body: Vec<u8>,
}

/// Reads an IDX file of `ndim` sizes from `r`: the header, then exactly the body the header
/// declares (`body_len(dims)` bytes, with `says` describing it in errors). At most one byte past
/// the declared body is read, so a short gzip file that inflates to far more than its header says
/// is refused after that byte, not decompressed into memory; and a body larger than the file can
/// hold (raw: what follows the header; gzip: [`GZIP_MAX_RATIO`] times the file) is refused before
/// any of it is read, so a header declaring terabytes is not believed up to the end of a bomb.
fn read_idx(
    path: &Path,
    opened: Opened<impl Read>,
    (magic, ndim, what): (u32, usize, &str),
    body_len: impl Fn(&[usize]) -> Result<(u64, String)>,
) -> Result<Idx> {
    let Opened {
        source,
        stream: mut r,
        max_len,
    } = opened;
    let mut hdr = vec![0u8; 4 * (1 + ndim)];
    let got = read_up_to(&mut r, &mut hdr).map_err(|e| read_error(path, &source, e))?;
    let dims = header(path, &hdr[..got], magic, ndim, what)?;
    let (want, says) = body_len(&dims)?;
    if let Some(max) = max_len.map(|m| m.saturating_sub(hdr.len() as u64))
        && want > max
    {
        return Err(Error::data(
            path,
            match source {
                Source::Raw => format!(
                    "truncated: header says {says} ({want} bytes) but only {max} bytes follow"
                ),
                Source::Gzip => format!(
                    "truncated: header says {says} ({want} bytes) but a gzip file of this size \
                     inflates to at most {max} bytes after the header"
                ),
            },
        ));
    }
    let mut body = Vec::new();
    r.take(want.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|e| read_error(path, &source, e))?;
    let have = body.len() as u64;
    if have < want {
        return Err(Error::data(
            path,
            format!("truncated: header says {says} ({want} bytes) but only {have} bytes follow"),
        ));
    }
    if have > want {
        let inflated = match source {
            Source::Gzip => " (decompressed)",
            Source::Raw => "",
        };
        return Err(Error::data(
            path,
            format!(
                "trailing garbage: header says {says} ({want} bytes) but more bytes follow{inflated}"
            ),
        ));
    }
    Ok(Idx { dims, body })
}

/// Reads an `idx3-ubyte` image file (raw or gzip).
pub fn read_images(path: &Path) -> Result<IdxImages> {
    images_from(path, open(path)?)
}

fn images_from(path: &Path, src: Opened<impl Read>) -> Result<IdxImages> {
    let body_len = |d: &[usize]| {
        let (n, rows, cols) = (d[0], d[1], d[2]);
        if n == 0 || rows == 0 || cols == 0 {
            return Err(Error::data(
                path,
                format!("empty: header says {n} images of {rows}×{cols}"),
            ));
        }
        let says = format!("{n} images of {rows}×{cols}");
        // Each size is a u32, so the product of three may pass 2^64.
        let want = (n as u64)
            .checked_mul(rows as u64)
            .and_then(|p| p.checked_mul(cols as u64))
            .filter(|&p| usize::try_from(p).is_ok())
            .ok_or_else(|| {
                Error::data(
                    path,
                    format!("too large: header says {says}, more pixels than memory can address"),
                )
            })?;
        Ok((want, says))
    };
    let Idx { dims, body } = read_idx(
        path,
        src,
        (IMAGES_MAGIC, 3, "an idx3-ubyte image file"),
        body_len,
    )?;
    Ok(IdxImages {
        n: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels: body,
    })
}

/// Reads an `idx1-ubyte` label file (raw or gzip).
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let body_len = |d: &[usize]| {
        let n = d[0];
        if n == 0 {
            return Err(Error::data(path, "empty: header says 0 labels"));
        }
        Ok((n as u64, format!("{n} labels")))
    };
    let src = open(path)?;
    let idx = read_idx(
        path,
        src,
        (LABELS_MAGIC, 1, "an idx1-ubyte label file"),
        body_len,
    )?;
    Ok(idx.body)
}

/// Writers of IDX files for tests (here and in other modules' tests).
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;
    use std::path::Path;

    /// An image file's bytes: header for `n` images of `rows`×`cols`, then `pixels`.
    pub fn images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [super::IMAGES_MAGIC, n, rows, cols] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(pixels);
        b
    }

    /// A label file's bytes.
    pub fn labels(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [super::LABELS_MAGIC, labels.len() as u32] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(labels);
        b
    }

    pub fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Writes a valid 4-file set: 6 train and 3 test images of 2×3, labels 0..=2;
    /// gzipped when `gz`.
    pub fn write_set(dir: &Path, gz: bool) {
        let tr: Vec<u8> = (0..6 * 6).map(|v| v as u8).collect();
        let te: Vec<u8> = (0..3 * 6).map(|v| 200 + v as u8).collect();
        let files = [
            images(6, 2, 3, &tr),
            labels(&[0, 1, 2, 2, 1, 0]),
            images(3, 2, 3, &te),
            labels(&[2, 0, 1]),
        ];
        for (name, bytes) in super::FILES.iter().zip(files) {
            let (name, bytes) = if gz {
                (format!("{name}.gz"), gzip(&bytes))
            } else {
                (name.to_string(), bytes)
            };
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn err_of(dir: &Path) -> String {
        load_mnist_dir(dir).unwrap_err().to_string()
    }

    #[test]
    fn reads_raw_and_gzip_sets() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_set(dir.path(), gz);
            let ds = load_mnist_dir(dir.path()).unwrap();
            assert_eq!(ds.input_shape, vec![1, 2, 3]);
            assert_eq!(ds.classes, 3);
            assert_eq!(ds.train.len(), 6);
            assert_eq!(ds.test.len(), 3);
            assert_eq!(ds.train.y, vec![0, 1, 2, 2, 1, 0]);
            assert_eq!(ds.test.y, vec![2, 0, 1]);
            assert_eq!(ds.train.rows_u8(&[1]).unwrap(), vec![6, 7, 8, 9, 10, 11]);
            assert_eq!(
                ds.test.rows_u8(&[2]).unwrap(),
                vec![212, 213, 214, 215, 216, 217]
            );
            // Through the source string, too.
            let src = format!("mnist:{}", dir.path().display());
            let ds2 = Dataset::load(&src).unwrap();
            assert_eq!(ds2.source, src);
            assert_eq!(ds2.train, ds.train);
        }
    }

    #[test]
    fn one_label_is_still_two_classes() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), false);
        std::fs::write(dir.path().join(FILES[1]), labels(&[0; 6])).unwrap();
        std::fs::write(dir.path().join(FILES[3]), labels(&[0; 3])).unwrap();
        assert_eq!(load_mnist_dir(dir.path()).unwrap().classes, 2);
    }

    /// Breaks one file of a valid raw set and checks the error names it and says `why`.
    fn broken(file: usize, bytes: Vec<u8>, why: &str) {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), false);
        std::fs::write(dir.path().join(FILES[file]), bytes).unwrap();
        let e = err_of(dir.path());
        assert!(
            e.contains(FILES[file]),
            "{why}: error does not name the file: {e}"
        );
        assert!(e.contains(why), "expected `{why}` in: {e}");
    }

    #[test]
    fn every_broken_file_is_an_error_naming_it() {
        let px = vec![0u8; 36];
        let mut bad_magic = images(6, 2, 3, &px);
        bad_magic[3] = 0x01; // 2049: a label file where images belong
        broken(0, bad_magic, "bad magic number 2049");
        broken(1, images(6, 1, 1, &[0; 6]), "bad magic number 2051");
        broken(
            0,
            images(6, 2, 3, &px[..35]),
            "truncated: header says 6 images of 2×3 (36 bytes) but only 35 bytes follow",
        );
        broken(
            0,
            images(6, 2, 3, &px)[..10].to_vec(),
            "truncated header: 10 bytes",
        );
        broken(0, vec![0, 0], "truncated: 2 bytes");
        broken(
            0,
            [images(6, 2, 3, &px), vec![9]].concat(),
            "trailing garbage: header says 6 images of 2×3 (36 bytes) but more bytes follow",
        );
        broken(
            3,
            labels(&[0, 1])[..9].to_vec(),
            "truncated: header says 2 labels (2 bytes) but only 1 bytes follow",
        );
        broken(0, images(0, 2, 3, &[]), "empty");
        broken(1, labels(&[0, 1, 2]), "count mismatch: 3 labels but");
        broken(3, labels(&[0, 1, 2, 0]), "count mismatch: 4 labels");
        broken(
            2,
            images(3, 3, 2, &[0; 18]),
            "images are 3×2 but the training images",
        );
        broken(3, labels(&[0, 3, 1]), "label 3 at index 1 is out of range");
    }

    #[test]
    fn missing_files_and_bad_gzip_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), true);
        std::fs::remove_file(dir.path().join(format!("{}.gz", FILES[2]))).unwrap();
        let e = err_of(dir.path());
        assert!(e.contains("missing: neither"), "{e}");
        assert!(e.contains(&format!("{}.gz", FILES[2])), "{e}");
        assert!(e.contains(&format!("{} nor", FILES[2])), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), true);
        let name = format!("{}.gz", FILES[0]);
        let good = std::fs::read(dir.path().join(&name)).unwrap();
        // A gzip stream cut short.
        std::fs::write(dir.path().join(&name), &good[..good.len() / 2]).unwrap();
        let e = err_of(dir.path());
        assert!(e.contains(&name) && e.contains("bad gzip stream"), "{e}");
        // Not gzip at all.
        std::fs::write(dir.path().join(&name), b"hello").unwrap();
        let e = err_of(dir.path());
        assert!(e.contains(&name) && e.contains("not gzip"), "{e}");
        // Gzip with its body corrupted (the CRC or the deflate stream catches it).
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 8] {
            *b ^= 0x5a;
        }
        std::fs::write(dir.path().join(&name), &bad).unwrap();
        let e = err_of(dir.path());
        assert!(e.contains(&name), "{e}");
    }

    #[test]
    fn gzip_that_inflates_past_its_header_is_refused_without_reading_it_all() {
        // A lazily generated gzip stream of 1 TiB: header for one 2×3 image, then zeros. Reading
        // it whole (as before) would never finish; the reader must stop one byte past the body.
        let raw =
            std::io::Cursor::new(images(1, 2, 3, &[0; 6])).chain(std::io::repeat(0).take(1 << 40));
        let gz = flate2::read::GzEncoder::new(raw, flate2::Compression::fast());
        let stream = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(gz));
        let path = Path::new("bomb-images-idx3-ubyte.gz");
        let opened = Opened {
            source: Source::Gzip,
            stream,
            max_len: None,
        };
        let e = images_from(path, opened).unwrap_err().to_string();
        assert!(e.contains("bomb-images-idx3-ubyte.gz"), "{e}");
        assert!(
            e.contains("trailing garbage: header says 1 images of 2×3 (6 bytes) but more bytes follow (decompressed)"),
            "{e}"
        );
        // The same through a real file: 16 MiB of zeros after the header.
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), true);
        let name = format!("{}.gz", FILES[0]);
        let body = [images(6, 2, 3, &[0; 36]), vec![0; 16 << 20]].concat();
        std::fs::write(dir.path().join(&name), gzip(&body)).unwrap();
        let e = err_of(dir.path());
        assert!(
            e.contains(&name) && e.contains("more bytes follow (decompressed)"),
            "{e}"
        );
    }

    #[test]
    fn image_sizes_whose_product_overflows_are_an_error() {
        // 2^32-1 cubed is about 2^96: the product wraps in u64 without a check.
        let b = images(u32::MAX, u32::MAX, u32::MAX, &[0; 8]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILES[0]);
        std::fs::write(&path, b).unwrap();
        let e = read_images(&path).unwrap_err().to_string();
        assert!(e.contains(FILES[0]), "{e}");
        assert!(
            e.contains("too large: header says 4294967295 images of 4294967295×4294967295"),
            "{e}"
        );
        // 2^31 · 2^31 · 2^31 = 2^93 wraps to exactly 0 in u64: unchecked, an empty body passed.
        let b = images(1 << 31, 1 << 31, 1 << 31, &[]);
        std::fs::write(&path, b).unwrap();
        let e = read_images(&path).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = err_of(&dir.path().join("nope"));
        assert!(e.contains("missing") && e.contains(FILES[0]), "{e}");
    }
}
