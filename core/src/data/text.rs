//! Text corpora for language-model training: reading documents, packing their tokens into
//! fixed-length windows, and a small binary cache of token ids.
//!
//! # Source
//!
//! `text:PATH` ([`parse_source`]) names a UTF-8 file (one document) or a directory, whose
//! `*.txt` files (not its subdirectories) are the documents, in byte order of their names — an
//! order that does not depend on the file system ([`read_documents`]).
//!
//! # Packing
//!
//! [`pack`] concatenates the documents' tokens, each followed by `eos`, into one stream, so a
//! model sees where documents end and no token is padding. The stream is cut into windows of
//! `seq_len + 1` tokens **with stride `seq_len`**: consecutive windows share one boundary token
//! (the last target of window `k` is the first input of window `k + 1`). So every token but the
//! first is a target exactly once, and none is wasted; the tokens after the last full window are
//! dropped ([`Packed::dropped_tokens`]). Windows cross document boundaries, as in GPT-style
//! packing.
//!
//! The **validation** windows are the last `ceil(fraction × windows)` ones, contiguous at the
//! end. That depends on nothing but the data (no seed), and unlike every-n-th windows it keeps
//! validation text out of the training documents: only the one document straddling the split
//! point is seen by both, and the two sides share only the boundary token (a training target and
//! the validation's first input, never a validation target). The corpus should therefore not be
//! ordered by topic if validation is to be representative.
//!
//! [`Packed`] keeps the stream flat (one allocation) and hands out windows as slices.
//!
//! # Token files
//!
//! [`write_tokens`] / [`read_tokens`]: the magic bytes [`TOKENS_MAGIC`] (which include a format
//! version), a `u32` little-endian count, then that many `u32` little-endian ids. A file shorter
//! or longer than its count says is refused, naming the file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The prefix of a `text:PATH` source string.
pub const SOURCE_PREFIX: &str = "text:";
/// First bytes of a token file: a name and format version 1.
pub const TOKENS_MAGIC: &[u8; 8] = b"DSTLTOK1";
const HEADER_LEN: usize = TOKENS_MAGIC.len() + 4;

/// The path of a `text:PATH` source string.
pub fn parse_source(source: &str) -> Result<PathBuf> {
    match source.strip_prefix(SOURCE_PREFIX) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(Error::DataSource {
            source_str: source.to_owned(),
            msg: "expected `text:PATH` with PATH a UTF-8 file or a directory of *.txt files".into(),
        }),
    }
}

/// The documents at `path`: the file itself, or each `*.txt` file of the directory, sorted by
/// name. Invalid UTF-8 and a directory without `*.txt` files are errors.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let p = entry.map_err(|e| Error::io(path, e))?.path();
            if p.extension().is_some_and(|x| x == "txt") && p.is_file() {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(Error::data(path, "directory has no *.txt files"));
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
            String::from_utf8(bytes).map_err(|e| {
                let at = e.utf8_error().valid_up_to();
                Error::data(f, format!("not UTF-8 (invalid byte at offset {at})"))
            })
        })
        .collect()
}

/// A token stream cut into windows of `seq_len + 1` tokens with stride `seq_len` (see the module
/// docs). Windows `0..train` are training windows, the rest validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    seq_len: usize,
    /// Exactly `windows × seq_len + 1` tokens.
    tokens: Vec<u32>,
    train: usize,
    validation: usize,
    dropped: usize,
}

impl Packed {
    /// Tokens of input (and of targets) per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of windows, training and validation.
    pub fn num_windows(&self) -> usize {
        self.train + self.validation
    }

    /// The indices of the training windows (`0..train`).
    pub fn train_windows(&self) -> Range<usize> {
        0..self.train
    }

    /// The indices of the validation windows (the last ones).
    pub fn validation_windows(&self) -> Range<usize> {
        self.train..self.num_windows()
    }

    /// Tokens at the end of the stream that are in no window (fewer than `seq_len`).
    pub fn dropped_tokens(&self) -> usize {
        self.dropped
    }

    /// Window `i`: `seq_len + 1` tokens, inputs `[..seq_len]`, next-token targets `[1..]`.
    pub fn window(&self, i: usize) -> Option<&[u32]> {
        if i >= self.num_windows() {
            return None;
        }
        // `i < windows`, and `windows × seq_len + 1` tokens exist, so this cannot overflow.
        let start = i * self.seq_len;
        Some(&self.tokens[start..start + self.seq_len + 1])
    }

    /// Windows `idx` as row-major `[B, seq_len]` inputs and `[B, seq_len]` targets.
    pub fn batch(&self, idx: &[usize]) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut inputs = Vec::with_capacity(idx.len() * self.seq_len);
        let mut targets = Vec::with_capacity(idx.len() * self.seq_len);
        for &i in idx {
            let w = self.window(i).ok_or_else(|| {
                Error::Input(format!("window {i} out of range ({})", self.num_windows()))
            })?;
            inputs.extend_from_slice(&w[..self.seq_len]);
            targets.extend_from_slice(&w[1..]);
        }
        Ok((inputs, targets))
    }
}

/// Packs documents' tokens (see the module docs). Every id, `eos` included, must be below
/// `vocab_size`; `seq_len ≥ 1`; `validation_fraction` in [0, 1), and there must be at least one
/// training window after the validation ones are taken.
pub fn pack(
    documents_tokens: &[Vec<u32>],
    eos: u32,
    vocab_size: usize,
    seq_len: usize,
    validation_fraction: f64,
) -> Result<Packed> {
    if seq_len < 1 {
        return Err(Error::Config("sequence length must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(Error::Config(format!(
            "validation fraction {validation_fraction} is not in [0, 1)"
        )));
    }
    let in_vocab = |id: u32| usize::try_from(id).is_ok_and(|id| id < vocab_size);
    if !in_vocab(eos) {
        return Err(Error::Input(format!(
            "end-of-sequence id {eos} is not below the vocabulary size {vocab_size}"
        )));
    }
    let overflow = || Error::Input("corpus has more tokens than fit in memory".into());
    let total = documents_tokens
        .iter()
        .try_fold(0usize, |n, d| n.checked_add(d.len())?.checked_add(1))
        .ok_or_else(overflow)?;
    let windows = total.saturating_sub(1) / seq_len;
    let validation = if validation_fraction > 0.0 {
        // `as` saturates; the product is at most `windows`, plus rounding.
        ((validation_fraction * windows as f64).ceil() as usize).min(windows)
    } else {
        0
    };
    if windows <= validation {
        return Err(Error::Input(format!(
            "{total} tokens make {windows} windows of {} (seq_len {seq_len} + 1, stride \
             {seq_len}); {validation} would be validation, leaving none to train on",
            seq_len + 1
        )));
    }
    let keep = windows * seq_len + 1;
    let mut tokens = Vec::with_capacity(keep);
    for (d, doc) in documents_tokens.iter().enumerate() {
        if let Some(bad) = doc.iter().find(|&&id| !in_vocab(id)) {
            return Err(Error::Input(format!(
                "document {d} has token id {bad}, not below the vocabulary size {vocab_size}"
            )));
        }
        tokens.extend_from_slice(doc);
        tokens.push(eos);
    }
    tokens.truncate(keep);
    Ok(Packed {
        seq_len,
        tokens,
        train: windows - validation,
        validation,
        dropped: total - keep,
    })
}

/// The order of `n` windows in `epoch`: [`super::shuffled_indices`], deterministic in
/// `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    super::shuffled_indices(n, seed, epoch)
}

/// Writes `ids` as a token file (atomically; see the module docs).
pub fn write_tokens(path: &Path, ids: &[u32]) -> Result<()> {
    let count = u32::try_from(ids.len())
        .map_err(|_| Error::data(path, format!("{} tokens do not fit a u32 count", ids.len())))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + 4 * ids.len());
    bytes.extend_from_slice(TOKENS_MAGIC);
    bytes.extend_from_slice(&count.to_le_bytes());
    for id in ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    crate::fsutil::atomic_write(path, &bytes)
}

/// Reads a token file written by [`write_tokens`].
pub fn read_tokens(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(Error::data(path, "too short for a token file header"));
    };
    if magic != TOKENS_MAGIC {
        return Err(Error::data(path, "not a token file (bad magic bytes)"));
    }
    let Some((count, body)) = rest.split_first_chunk::<4>() else {
        return Err(Error::data(path, "truncated token file header"));
    };
    let count = u32::from_le_bytes(*count);
    // A u32 count times 4 fits in u64 everywhere.
    let want = u64::from(count) * 4;
    let have = body.len() as u64;
    if have != want {
        let what = if have < want {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(Error::data(
            path,
            format!(
                "token file {what}: header says {count} ids ({want} bytes), {have} bytes follow"
            ),
        ));
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_windows_share_one_boundary_token() {
        // 3 + 1 + 4 + 1 = 9 tokens; seq_len 2 → (9 - 1) / 2 = 4 windows, nothing dropped.
        let docs = vec![vec![1, 2, 3], vec![4, 5, 6, 7]];
        let p = pack(&docs, 0, 8, 2, 0.0).unwrap();
        assert_eq!(p.num_windows(), 4);
        assert_eq!(p.dropped_tokens(), 0);
        assert_eq!(p.window(0).unwrap(), &[1, 2, 3]);
        assert_eq!(p.window(1).unwrap(), &[3, 0, 4]);
        assert_eq!(p.window(3).unwrap(), &[6, 7, 0]);
        assert!(p.window(4).is_none());
        let (x, y) = p.batch(&[1, 0]).unwrap();
        assert_eq!(x, vec![3, 0, 1, 2]);
        assert_eq!(y, vec![0, 4, 2, 3]);
        assert!(p.batch(&[4]).is_err());
        // seq_len 3 → 8 / 3 = 2 windows, 2 tokens never a target.
        let p = pack(&docs, 0, 8, 3, 0.0).unwrap();
        assert_eq!((p.num_windows(), p.dropped_tokens()), (2, 2));
        assert_eq!(p.window(1).unwrap(), &[0, 4, 5, 6]);
    }

    #[test]
    fn validation_is_the_deterministic_tail() {
        let docs: Vec<Vec<u32>> = (0..10)
            .map(|d| (0..9).map(|t| d * 10 + t).collect())
            .collect();
        // 100 tokens, seq_len 4 → 24 windows; ceil(0.1 × 24) = 3 validation windows.
        let p = pack(&docs, 99, 100, 4, 0.1).unwrap();
        assert_eq!(p, pack(&docs, 99, 100, 4, 0.1).unwrap());
        assert_eq!(p.train_windows(), 0..21);
        assert_eq!(p.validation_windows(), 21..24);
        // Targets are positions 1 + 4k .. 4 + 4k: the two sides' targets are disjoint and
        // together cover every kept token but the first exactly once.
        let targets = |r: Range<usize>| -> Vec<u32> {
            let (_, y) = p.batch(&r.collect::<Vec<_>>()).unwrap();
            y
        };
        let (train, val) = (targets(p.train_windows()), targets(p.validation_windows()));
        assert_eq!(train.len() + val.len(), 96);
        assert_eq!(val[..4], [85, 86, 87, 88]);
        assert_eq!(train.last(), Some(&84));
        // Any positive fraction gives at least one validation window.
        assert_eq!(
            pack(&docs, 99, 100, 4, 1e-9).unwrap().validation_windows(),
            23..24
        );
    }

    #[test]
    fn pack_refuses_bad_settings() {
        let docs = vec![vec![1, 2, 3]];
        let err = |r: Result<Packed>| r.unwrap_err().to_string();
        assert!(err(pack(&docs, 0, 8, 0, 0.0)).contains("at least 1"));
        for f in [-0.1, 1.0, f64::NAN] {
            assert!(err(pack(&docs, 0, 8, 2, f)).contains("validation fraction"));
        }
        assert!(err(pack(&docs, 0, 8, 4, 0.0)).contains("0 windows"));
        assert!(err(pack(&docs, 0, 8, 2, 0.5)).contains("none to train"));
        assert!(err(pack(&docs, 0, 3, 2, 0.0)).contains("token id 3"));
        assert!(err(pack(&docs, 8, 8, 2, 0.0)).contains("end-of-sequence id 8"));
        assert!(err(pack(&[], 0, 8, 1, 0.0)).contains("0 windows"));
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 1, 0);
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn reads_files_and_sorted_txt_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.txt"), "second").unwrap();
        std::fs::write(dir.path().join("a.txt"), "first").unwrap();
        std::fs::write(dir.path().join("c.md"), "ignored").unwrap();
        assert_eq!(read_documents(dir.path()).unwrap(), vec!["first", "second"]);
        let one = dir.path().join("c.md");
        assert_eq!(read_documents(&one).unwrap(), vec!["ignored"]);
        let p = parse_source(&format!("text:{}", dir.path().display())).unwrap();
        assert_eq!(p, dir.path());
        assert!(parse_source("text:").is_err());
        assert!(parse_source("mnist:x").is_err());
    }

    #[test]
    fn document_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_documents(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no *.txt"), "{e}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"ok\xff").unwrap();
        let e = read_documents(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.txt") && e.contains("offset 2"), "{e}");
        let e = read_documents(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn token_files_round_trip_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.tok");
        let ids = vec![0, 1, 70_000, u32::MAX];
        write_tokens(&path, &ids).unwrap();
        assert_eq!(read_tokens(&path).unwrap(), ids);
        write_tokens(&path, &[]).unwrap();
        assert_eq!(read_tokens(&path).unwrap(), Vec::<u32>::new());

        write_tokens(&path, &ids).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for (cut, what) in [
            (bytes.len() - 1, "truncated"),
            (10, "truncated"),
            (3, "too short"),
        ] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = read_tokens(&path).unwrap_err().to_string();
            assert!(e.contains("corpus.tok") && e.contains(what), "{cut}: {e}");
        }
        let mut long = bytes.clone();
        long.push(0);
        std::fs::write(&path, &long).unwrap();
        assert!(
            read_tokens(&path)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
        let mut bad = bytes;
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        assert!(
            read_tokens(&path)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
    }
}
