//! Token data sets: a corpus packed into windows ([`super::text`]) as a [`Dataset`] whose rows
//! are the windows, so the coordinator leases, shuffles and caches them as it does images.
//!
//! A row is one window of `seq_len + 1` token ids ([`Features::Tokens`]): the first `seq_len`
//! are the inputs a teacher scores, the last `seq_len` the next-token targets. So
//! `input_shape = [seq_len + 1]` and `classes` is the vocabulary size. The training split is
//! the packing's training windows, the test split its validation windows (the tail of the
//! corpus; see [`super::text`]). Labels (`Split::y`) carry nothing for token rows and are 0:
//! each position's label is the window's next token.
//!
//! Two sources:
//! - `text:PATH` with a tokenizer (a `tokenizer.json`, or a `.gguf` file whose metadata holds
//!   one): the corpus of [`super::text::read_documents`];
//! - `grammar` or `grammar:SEED`: [`super::grammar`]'s toy language with its word-level
//!   tokenizer, [`TokenOptions::sentences`] sentences (no file needed).

use std::path::{Path, PathBuf};

use super::{Dataset, Features, Split, grammar, text};
use crate::{Error, Result};

/// How a token source becomes windows.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOptions {
    /// Input tokens per window.
    pub seq_len: usize,
    /// The tokenizer of a `text:` source: a `tokenizer.json` or a `.gguf` file.
    pub tokenizer: Option<PathBuf>,
    /// Share of the windows kept for validation (the last ones), in [0, 1).
    pub validation_fraction: f64,
    /// Sentences of a `grammar` source.
    pub sentences: usize,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self {
            seq_len: 32,
            tokenizer: None,
            validation_fraction: 0.1,
            sentences: 8000,
        }
    }
}

/// What a token data set's rows are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Input tokens per window (rows hold one more).
    pub seq_len: usize,
    /// The tokenizer's digest ([`crate::tokenizer::digest`]): teachers must report the same.
    pub tokenizer_digest: String,
    /// The end-of-sequence id that separates documents.
    pub eos: u32,
    /// Tokens after the last full window, in no row.
    pub dropped_tokens: usize,
}

/// The tokenizer at `path`: a `.gguf` file's embedded one, else a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let file = crate::gguf::GgufFile::open(path)?;
        crate::tokenizer::from_gguf_metadata(file.metadata())
            .map_err(|e| Error::data(path, format!("its tokenizer: {e}")))
    } else {
        crate::tokenizer::from_file(path)
    }
}

/// The end-of-sequence id of `tok`: the first of `</s>`, `<|endoftext|>`, `<|im_end|>`,
/// `<eos>` it knows.
fn eos_of(tok: &tokenizers::Tokenizer) -> Option<u32> {
    ["<|endoftext|>", "</s>", "<|im_end|>", grammar::EOS]
        .iter()
        .find_map(|t| tok.token_to_id(t))
}

/// `text:PATH` tokenized with `opts.tokenizer` and packed.
pub fn load_text(path: &Path, opts: &TokenOptions) -> Result<Dataset> {
    let source = format!("{}{}", text::SOURCE_PREFIX, path.display());
    let tok_path = opts.tokenizer.as_deref().ok_or_else(|| Error::DataSource {
        source_str: source.clone(),
        msg: "a text source needs a tokenizer (`[lm] tokenizer`: a tokenizer.json or a .gguf \
              file)"
            .into(),
    })?;
    let tok = load_tokenizer(tok_path)?;
    let eos = eos_of(&tok).ok_or_else(|| {
        Error::data(
            tok_path,
            "the tokenizer has no end-of-sequence token (<|endoftext|>, </s>, <|im_end|>, <eos>)",
        )
    })?;
    let docs = text::read_documents(path)?
        .iter()
        .map(|d| crate::tokenizer::encode(&tok, d))
        .collect::<Result<Vec<_>>>()?;
    windows(source, &tok, eos, &docs, opts)
}

/// The toy language of `seed` with its word-level tokenizer, packed.
pub fn load_grammar(seed: u64, opts: &TokenOptions) -> Result<Dataset> {
    let source = format!("grammar:{seed}");
    if opts.tokenizer.is_some() {
        return Err(Error::DataSource {
            source_str: source,
            msg: "the grammar has its own word-level tokenizer; leave `[lm] tokenizer` out".into(),
        });
    }
    let tok = grammar_tokenizer()?;
    let eos = tok
        .token_to_id(grammar::EOS)
        .ok_or_else(|| Error::Input("the grammar's tokenizer lacks its <eos>".into()))?;
    let docs = grammar::corpus(seed, opts.sentences)
        .lines()
        .map(|l| crate::tokenizer::encode(&tok, l))
        .collect::<Result<Vec<_>>>()?;
    windows(source, &tok, eos, &docs, opts)
}

/// The word-level tokenizer of [`grammar::vocabulary`].
pub fn grammar_tokenizer() -> Result<tokenizers::Tokenizer> {
    crate::tokenizer::word_level(&grammar::vocabulary(), grammar::UNK)
}

fn windows(
    source: String,
    tok: &tokenizers::Tokenizer,
    eos: u32,
    docs: &[Vec<u32>],
    opts: &TokenOptions,
) -> Result<Dataset> {
    let vocab = tok.get_vocab_size(true);
    let packed =
        text::pack(docs, eos, vocab, opts.seq_len, opts.validation_fraction).map_err(|e| {
            Error::DataSource {
                source_str: source.clone(),
                msg: e.to_string(),
            }
        })?;
    let split = |range: std::ops::Range<usize>| -> Result<Split> {
        let n = range.len();
        let mut x = Vec::with_capacity(n * (opts.seq_len + 1));
        for i in range {
            let w = packed
                .window(i)
                .ok_or_else(|| Error::Input(format!("window {i} is missing")))?;
            x.extend_from_slice(w);
        }
        Ok(Split {
            x: Features::Tokens(x),
            y: vec![0; n],
        })
    };
    Ok(Dataset {
        source,
        input_shape: vec![opts.seq_len + 1],
        classes: vocab,
        train: split(packed.train_windows())?,
        test: split(packed.validation_windows())?,
        tokens: Some(TokenInfo {
            seq_len: opts.seq_len,
            tokenizer_digest: crate::tokenizer::digest(tok)?,
            eos,
            dropped_tokens: packed.dropped_tokens(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> TokenOptions {
        TokenOptions {
            seq_len: 8,
            sentences: 200,
            ..TokenOptions::default()
        }
    }

    #[test]
    fn grammar_rows_are_overlapping_windows_with_validation_at_the_end() {
        let ds = load_grammar(3, &small()).unwrap();
        let info = ds.tokens.clone().unwrap();
        assert_eq!(ds.input_shape, vec![9]);
        assert_eq!(ds.classes, grammar::vocabulary().len());
        assert_eq!(ds.train.row_len(), 9);
        let n = ds.train.len() + ds.test.len();
        // ceil(0.1 × windows) validation windows.
        assert_eq!(ds.test.len(), (n as f64 * 0.1).ceil() as usize);
        let rows = ds.train.rows_tokens(&[0, 1]).unwrap();
        // Stride seq_len: window 1 starts where window 0's targets end.
        assert_eq!(rows[8], rows[9]);
        assert!(rows.iter().all(|&t| (t as usize) < ds.classes));
        // The last training window's final token is the first validation window's first.
        let last = ds.train.rows_tokens(&[ds.train.len() - 1]).unwrap();
        let first = ds.test.rows_tokens(&[0]).unwrap();
        assert_eq!(last[8], first[0]);
        assert_eq!(info.eos, 0);
        assert_eq!(info.seq_len, 8);
        // Same seed, same rows; another seed, other rows.
        assert_eq!(load_grammar(3, &small()).unwrap(), ds);
        assert_ne!(load_grammar(4, &small()).unwrap().train, ds.train);
        // Token rows are not pixels.
        assert_eq!(ds.train.rows_u8(&[0]), None);
        let e = ds
            .train
            .batch(&[9], &[0], &candle_core::Device::Cpu, None)
            .unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
    }

    #[test]
    fn text_needs_a_tokenizer_and_reads_one_from_json() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("a.txt");
        std::fs::write(&corpus, grammar::corpus(1, 100)).unwrap();
        let e = load_text(&corpus, &small()).unwrap_err().to_string();
        assert!(e.contains("needs a tokenizer"), "{e}");
        let tok_path = dir.path().join("tokenizer.json");
        grammar_tokenizer().unwrap().save(&tok_path, false).unwrap();
        let opts = TokenOptions {
            tokenizer: Some(tok_path.clone()),
            ..small()
        };
        let ds = load_text(&corpus, &opts).unwrap();
        assert!(ds.source.starts_with("text:"));
        assert_eq!(
            ds.tokens.unwrap().tokenizer_digest,
            crate::tokenizer::digest(&grammar_tokenizer().unwrap()).unwrap()
        );
        // A tokenizer for the grammar is a mistake, said as such.
        let e = load_grammar(0, &opts).unwrap_err().to_string();
        assert!(e.contains("own word-level tokenizer"), "{e}");
        // A corpus too short for one training window names the source.
        std::fs::write(&corpus, "the dog").unwrap();
        let e = load_text(&corpus, &opts).unwrap_err().to_string();
        assert!(e.contains("text:") && e.contains("windows"), "{e}");
    }
}
