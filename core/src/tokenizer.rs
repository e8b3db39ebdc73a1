//! Tokenizers: a thin layer over Hugging Face's [`tokenizers::Tokenizer`], so every role turns
//! text into the same token ids.
//!
//! Three ways to get one:
//! - [`from_file`]: a Hugging Face `tokenizer.json`, used as it is.
//! - [`from_gguf_metadata`]: rebuilt from the vocabulary a GGUF model file carries
//!   (`tokenizer.ggml.*`). Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported, and
//!   the pipeline is SmolLM2's: no normalizer; pre-tokenizer `Sequence[Digits(individual),
//!   ByteLevel(add_prefix_space = false, use_regex = true)]`; a byte-level decoder; no
//!   post-processor, so nothing (no BOS) is ever added. GGUF does not record the pipeline, only a
//!   name for it (`tokenizer.ggml.pre`), so a file naming another one is accepted with a warning:
//!   its ids are still consistent between roles, but may split text differently from the
//!   tokenizer the model was trained with.
//! - [`word_level`]: one id per whitespace-separated word, for the toy language of
//!   [`crate::data::grammar`].
//!
//! [`encode`] never adds special tokens; [`decode`] keeps them (an end-of-sequence token is
//! shown, not dropped) and refuses ids the tokenizer does not know — the underlying library
//! would silently skip them.
//!
//! [`digest`] fingerprints a tokenizer (SHA-256 of its JSON serialisation, whose vocabulary,
//! merges and added tokens are written in id/rank order), so a teacher and a student can check
//! they tokenize alike. It covers the whole pipeline, so two tokenizers compare equal only when
//! built the same way: a tokenizer rebuilt from a GGUF and the original `tokenizer.json` of the
//! same model generally differ (e.g. the latter's post-processor).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, PreTokenizerWrapper};

pub use tokenizers::Tokenizer;

use crate::{Error, Result};

/// GGUF key of the vocabulary (array of strings, id = position).
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// GGUF key of the BPE merges (array of `"left right"` strings, in rank order).
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// GGUF key of the token types (array of i32, one per token).
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// GGUF key of the tokenizer model name.
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// GGUF key of the pre-tokenizer name.
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// GGUF key of the end-of-sequence token id.
pub const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// llama.cpp's token type of control tokens (`<|endoftext|>`, `<|im_start|>`, ...).
const TYPE_CONTROL: i32 = 3;
/// llama.cpp's token type of user-defined tokens: matched verbatim, but not special.
const TYPE_USER_DEFINED: i32 = 4;

/// Loads a Hugging Face `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Tokenizer::from_str(&json)
        .map_err(|e| Error::data(path, format!("not a Hugging Face tokenizer.json: {e}")))
}

fn gguf_err(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("GGUF tokenizer metadata `{key}`: {msg}"))
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| gguf_err(key, "missing"))
}

fn strings<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    let arr = get(md, key)?
        .to_vec()
        .map_err(|_| gguf_err(key, "not an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(gguf_err(
                key,
                format!("element {i} is not a string: {other:?}"),
            )),
        })
        .collect()
}

/// Builds the byte-level BPE tokenizer a GGUF model's metadata describes (see the module docs).
///
/// Token `i` of `tokenizer.ggml.tokens` gets id `i`; tokens of type 3 (control) become special
/// added tokens, so their text is matched whole before pre-tokenization; type 4 (user-defined)
/// become non-special added tokens. Duplicate tokens are refused (a map from text to id cannot
/// hold both ids).
pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    match get(md, KEY_MODEL)? {
        Value::String(m) if m == "gpt2" => {}
        Value::String(m) => {
            return Err(gguf_err(
                KEY_MODEL,
                format!("tokenizer model `{m}` is not supported (only `gpt2`, byte-level BPE)"),
            ));
        }
        other => return Err(gguf_err(KEY_MODEL, format!("not a string: {other:?}"))),
    }
    if let Some(Value::String(pre)) = md.get(KEY_PRE)
        && pre != "smollm"
    {
        tracing::warn!(
            "GGUF pre-tokenizer `{pre}` is rebuilt as SmolLM2's (digits split, GPT-2 regex); \
             text may split differently from the model's own tokenizer"
        );
    }
    let tokens = strings(md, KEY_TOKENS)?;
    let types: Vec<i32> = get(md, KEY_TOKEN_TYPE)?
        .to_vec()
        .map_err(|_| gguf_err(KEY_TOKEN_TYPE, "not an array"))?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.to_i32()
                .map_err(|_| gguf_err(KEY_TOKEN_TYPE, format!("element {i} is not an i32")))
        })
        .collect::<Result<_>>()?;
    if types.len() != tokens.len() {
        return Err(gguf_err(
            KEY_TOKEN_TYPE,
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(|_| gguf_err(KEY_TOKENS, "more than 2^32 tokens"))?;
        if let Some(prev) = vocab.insert((*t).to_owned(), id) {
            return Err(gguf_err(
                KEY_TOKENS,
                format!("token {t:?} appears twice (ids {prev} and {id})"),
            ));
        }
    }
    let merges = strings(md, KEY_MERGES)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => Err(gguf_err(
                KEY_MERGES,
                format!("merge {i} {m:?} is not two tokens separated by a space"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| gguf_err(KEY_MERGES, e))?;

    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ])));
    // The same type undoes the byte-to-unicode map (its options only matter when splitting).
    tok.with_decoder(Some(byte_level));
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == ty)
            .map(|(s, _)| AddedToken::from(*s, special))
            .collect()
    };
    tok.add_special_tokens(added(TYPE_CONTROL, true))
        .map_err(|e| gguf_err(KEY_TOKEN_TYPE, e))?;
    tok.add_tokens(added(TYPE_USER_DEFINED, false))
        .map_err(|e| gguf_err(KEY_TOKEN_TYPE, e))?;
    Ok(tok)
}

/// The end-of-sequence id a GGUF declares (`tokenizer.ggml.eos_token_id`), if any.
pub fn eos_id(md: &HashMap<String, Value>) -> Option<u32> {
    md.get(KEY_EOS)?.to_u32().ok()
}

/// Lowercase hex SHA-256 of the tokenizer's compact JSON serialisation (see the module docs).
pub fn digest(tok: &Tokenizer) -> Result<String> {
    let json = tok
        .to_string(false)
        .map_err(|e| Error::Input(format!("cannot serialise tokenizer: {e}")))?;
    Ok(Sha256::digest(json.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A word-level tokenizer: word `i` of `words` gets id `i`, and `unk` (appended if absent)
/// stands for every other word.
///
/// Text is split on whitespace only (`WhitespaceSplit`, not `Whitespace`, which would also cut
/// `<eos>` into `<`, `eos`, `>`); the toy language writes punctuation as separate words. There is
/// no decoder: the library then joins the tokens with single spaces, which is exactly the inverse
/// of the splitting for single-spaced text. Words must be non-empty, unique and free of
/// whitespace.
pub fn word_level(words: &[&str], unk: &str) -> Result<Tokenizer> {
    let absent = (!words.contains(&unk)).then_some(unk);
    let mut vocab = Vocab::default();
    for w in words.iter().copied().chain(absent) {
        if w.is_empty() || w.chars().any(char::is_whitespace) {
            return Err(Error::Input(format!(
                "word-level vocabulary entry {w:?} is empty or contains whitespace"
            )));
        }
        let id = u32::try_from(vocab.len())
            .map_err(|_| Error::Input("word-level vocabulary over 2^32 words".into()))?;
        if vocab.insert(w.to_owned(), id).is_some() {
            return Err(Error::Input(format!(
                "word-level vocabulary lists {w:?} twice"
            )));
        }
    }
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token(unk.to_owned())
        .build()
        .map_err(|e| Error::Input(format!("word-level tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    Ok(tok)
}

/// The ids of `text`, without any added special tokens.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| Error::Input(format!("cannot tokenize: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// The text of `ids`, special tokens included. An id the tokenizer does not know is an error.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    if let Some(bad) = ids.iter().find(|&&id| tok.id_to_token(id).is_none()) {
        return Err(Error::Input(format!(
            "token id {bad} is not in the tokenizer's vocabulary of {}",
            tok.get_vocab_size(true)
        )));
    }
    tok.decode(ids, false)
        .map_err(|e| Error::Input(format!("cannot decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the others are
    /// shifted to U+0100 onwards in byte order.
    fn byte_symbols() -> Vec<String> {
        let mut n = 0;
        (0u32..256)
            .map(|b| {
                let keep = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
                let c = if keep {
                    b
                } else {
                    n += 1;
                    255 + n
                };
                char::from_u32(c).unwrap().to_string()
            })
            .collect()
    }

    /// 256 byte tokens, then merged tokens, then two control tokens.
    fn metadata(extra: &[&str]) -> HashMap<String, Value> {
        let merges = ["h e", "l l", "he ll", "Ġ w", "1 2"];
        let mut tokens = byte_symbols();
        tokens.extend(["he", "ll", "hell", "Ġw", "12"].map(String::from));
        tokens.extend(extra.iter().map(|s| s.to_string()));
        let mut types = vec![Value::I32(1); tokens.len()];
        for t in ["<|endoftext|>", "<|im_start|>"] {
            tokens.push(t.into());
            types.push(Value::I32(TYPE_CONTROL));
        }
        let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        HashMap::from([
            (KEY_MODEL.to_string(), Value::String("gpt2".into())),
            (KEY_TOKENS.to_string(), strs(tokens)),
            (
                KEY_MERGES.to_string(),
                strs(merges.map(String::from).to_vec()),
            ),
            (KEY_TOKEN_TYPE.to_string(), Value::Array(types)),
            (KEY_EOS.to_string(), Value::U32(261)),
        ])
    }

    fn gguf_tok() -> Tokenizer {
        from_gguf_metadata(&metadata(&[])).unwrap()
    }

    #[test]
    fn gguf_bpe_round_trips_and_merges() {
        let tok = gguf_tok();
        let text = "hello world 12345\n\tthe end! <>~\u{e9}";
        let ids = encode(&tok, text).unwrap();
        assert_eq!(decode(&tok, &ids).unwrap(), text);
        // "hello" → "hell" + "o"; " world" → "Ġw" + bytes.
        assert_eq!(ids[0], tok.token_to_id("hell").unwrap());
        assert!(ids.contains(&tok.token_to_id("Ġw").unwrap()));
        assert_eq!(eos_id(&metadata(&[])), Some(261));
    }

    #[test]
    fn gguf_digits_are_split_individually() {
        let tok = gguf_tok();
        let ids = encode(&tok, "12").unwrap();
        // The merge "1 2" exists, but digits are pre-tokenized one by one.
        let one = tok.token_to_id("1").unwrap();
        let two = tok.token_to_id("2").unwrap();
        assert_eq!(ids, vec![one, two]);
    }

    #[test]
    fn gguf_control_tokens_are_single_ids() {
        let tok = gguf_tok();
        let eot = tok.token_to_id("<|endoftext|>").unwrap();
        assert_eq!(eot, 261);
        let ids = encode(&tok, "a<|endoftext|>b").unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], eot);
        assert_eq!(decode(&tok, &ids).unwrap(), "a<|endoftext|>b");
        assert!(
            decode(&tok, &[263])
                .unwrap_err()
                .to_string()
                .contains("263")
        );
    }

    #[test]
    fn digest_is_stable_and_vocabulary_sensitive() {
        let a = digest(&gguf_tok()).unwrap();
        assert_eq!(a.len(), 64);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(a, digest(&gguf_tok()).unwrap());
        let other = from_gguf_metadata(&metadata(&["xyz"])).unwrap();
        assert_ne!(a, digest(&other).unwrap());
    }

    #[test]
    fn gguf_errors_name_the_key() {
        for key in [KEY_TOKENS, KEY_MERGES, KEY_TOKEN_TYPE, KEY_MODEL] {
            let mut md = metadata(&[]);
            md.remove(key);
            let e = from_gguf_metadata(&md).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("missing"), "{e}");
        }
        let mut md = metadata(&[]);
        md.insert(KEY_MODEL.into(), Value::String("llama".into()));
        let e = from_gguf_metadata(&md).unwrap_err().to_string();
        assert!(e.contains(KEY_MODEL) && e.contains("llama"), "{e}");
        let mut md = metadata(&[]);
        md.insert(
            KEY_MERGES.into(),
            Value::Array(vec![Value::String("hx".into())]),
        );
        let e = from_gguf_metadata(&md).unwrap_err().to_string();
        assert!(e.contains(KEY_MERGES), "{e}");
        // A duplicate token.
        let e = from_gguf_metadata(&metadata(&["he"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn from_file_reads_a_saved_tokenizer_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = gguf_tok();
        tok.save(&path, false).unwrap();
        let back = from_file(&path).unwrap();
        assert_eq!(digest(&back).unwrap(), digest(&tok).unwrap());
        std::fs::write(&path, "{}").unwrap();
        let e = from_file(&path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn word_level_round_trips() {
        let tok = word_level(&["<eos>", "the", "dog", "runs", "."], "<unk>").unwrap();
        let ids = encode(&tok, "the dog runs . <eos>").unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 0]);
        assert_eq!(decode(&tok, &ids).unwrap(), "the dog runs . <eos>");
        assert_eq!(encode(&tok, "the cat").unwrap(), vec![1, 5]);
        assert_eq!(tok.get_vocab_size(true), 6);
        // `unk` already listed keeps its position.
        let tok = word_level(&["a", "<unk>", "b"], "<unk>").unwrap();
        assert_eq!(encode(&tok, "b zzz").unwrap(), vec![2, 1]);
        assert_eq!(tok.get_vocab_size(true), 3);
        assert!(word_level(&["a", "a"], "<unk>").is_err());
        assert!(word_level(&["a b"], "<unk>").is_err());
    }
}
