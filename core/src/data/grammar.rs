//! A seeded toy language, so the language-model demo and tests need no third-party text.
//!
//! [`corpus`] writes sentences of a small probabilistic grammar, one per line, every token
//! (punctuation included) separated by single spaces, so a whitespace word-level tokenizer over
//! [`vocabulary`] covers it exactly (see [`crate::tokenizer::word_level`]):
//!
//! ```text
//! sentence := clause ( "," "and" clause ){0,2} "."
//! clause   := np(n, mod) vp(n, mod) [pp]
//! np(n, m) := det(n) adj{0,2} noun(n) [ if m: pp | "that" vp(n, no-mod) ]
//! pp       := prep np(any, no-mod)
//! vp(n, m) := verb_t(n) np(any, m) | verb_i(n) [adv]
//! ```
//!
//! `n` is grammatical number, drawn per noun phrase. What a model has to learn beyond word
//! frequencies:
//! - **agreement**: a verb takes its subject's number, also across a prepositional phrase or a
//!   relative clause whose own noun has the other number ("the dog near the cats *sees*");
//! - determiner–noun number ("these dogs", never "this dogs"; "the" and possessives go with both);
//! - "a" before a consonant, "an" before a vowel (of the next word, adjective or noun; every word
//!   here is pronounced as spelt for this rule);
//! - word order and bounded nesting (a relative clause or prepositional phrase inside a noun
//!   phrase does not nest further).
//!
//! Each word class is a fixed list and no word is in two classes. Every choice is drawn from
//! ChaCha8 seeded with the seed through the Lemire draw [`super::shuffled_indices`] uses, not
//! `rand`'s samplers, so a seed gives the same text on every platform and `rand` version.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::below;

/// The end-of-sequence token (id 0 of [`vocabulary`]); never in the generated text itself.
pub const EOS: &str = "<eos>";
/// The unknown-word token (id 1 of [`vocabulary`]); never in the generated text itself.
pub const UNK: &str = "<unk>";

/// Singular determiners; "a" is written "an" before a vowel.
const DET_SG: &[&str] = &["a", "this", "every", "each", "one"];
const AN: &str = "an";
const DET_PL: &[&str] = &[
    "these", "those", "some", "many", "several", "two", "three", "few",
];
/// Determiners of either number.
const DET_ANY: &[&str] = &["the", "my", "your", "our", "his", "her"];
/// (singular, plural).
const NOUNS: &[(&str, &str)] = &[
    ("dog", "dogs"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("mouse", "mice"),
    ("goose", "geese"),
    ("fox", "foxes"),
    ("wolf", "wolves"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("king", "kings"),
    ("queen", "queens"),
    ("baker", "bakers"),
    ("girl", "girls"),
    ("boy", "boys"),
    ("doctor", "doctors"),
    ("student", "students"),
    ("friend", "friends"),
    ("robot", "robots"),
    ("owl", "owls"),
    ("eagle", "eagles"),
    ("elephant", "elephants"),
    ("ant", "ants"),
    ("apple", "apples"),
    ("egg", "eggs"),
    ("island", "islands"),
    ("engine", "engines"),
    ("house", "houses"),
    ("tree", "trees"),
    ("river", "rivers"),
    ("box", "boxes"),
    ("book", "books"),
    ("garden", "gardens"),
    ("city", "cities"),
    ("table", "tables"),
    ("stone", "stones"),
    ("bridge", "bridges"),
];
/// Transitive verbs (singular, plural).
const VERBS_T: &[(&str, &str)] = &[
    ("sees", "see"),
    ("chases", "chase"),
    ("likes", "like"),
    ("finds", "find"),
    ("follows", "follow"),
    ("watches", "watch"),
    ("helps", "help"),
    ("carries", "carry"),
    ("knows", "know"),
    ("loves", "love"),
    ("fears", "fear"),
    ("visits", "visit"),
    ("paints", "paint"),
    ("builds", "build"),
    ("feeds", "feed"),
    ("pushes", "push"),
    ("catches", "catch"),
    ("remembers", "remember"),
    ("admires", "admire"),
    ("greets", "greet"),
];
/// Intransitive verbs (singular, plural).
const VERBS_I: &[(&str, &str)] = &[
    ("sleeps", "sleep"),
    ("runs", "run"),
    ("sings", "sing"),
    ("laughs", "laugh"),
    ("waits", "wait"),
    ("swims", "swim"),
    ("jumps", "jump"),
    ("smiles", "smile"),
    ("falls", "fall"),
    ("dances", "dance"),
    ("cries", "cry"),
    ("works", "work"),
];
const ADJ: &[&str] = &[
    "big", "small", "old", "young", "happy", "sad", "red", "green", "blue", "quiet", "loud",
    "tall", "short", "brave", "clever", "lazy", "angry", "empty", "orange", "ugly", "gentle",
    "heavy", "bright", "dark", "tiny", "ancient", "elegant", "icy",
];
const ADV: &[&str] = &[
    "quickly", "slowly", "quietly", "loudly", "often", "rarely", "again", "happily", "alone",
    "today",
];
const PREP: &[&str] = &[
    "near", "behind", "under", "above", "beside", "with", "without", "inside", "across", "beyond",
];
const THAT: &str = "that";
const AND: &str = "and";
const COMMA: &str = ",";
const PERIOD: &str = ".";

// Probabilities, per mille.
const P_PLURAL: u64 = 400;
const P_DET_ANY: u64 = 350;
const P_FIRST_ADJ: u64 = 350;
const P_SECOND_ADJ: u64 = 150;
/// A modifiable noun phrase gets a prepositional phrase with this chance, else a relative clause
/// with [`P_REL`].
const P_NP_PP: u64 = 200;
const P_REL: u64 = 150;
const P_TRANSITIVE: u64 = 600;
const P_ADV: u64 = 300;
const P_CLAUSE_PP: u64 = 150;
const P_COORD: u64 = 150;
const MAX_COORD: usize = 2;

/// Every token the language has: [`EOS`], [`UNK`], then each word class in turn; no repeats.
pub fn vocabulary() -> Vec<&'static str> {
    let pairs = |v: &'static [(&'static str, &'static str)]| v.iter().flat_map(|&(s, p)| [s, p]);
    [EOS, UNK]
        .into_iter()
        .chain(DET_SG.iter().copied())
        .chain([AN])
        .chain(DET_PL.iter().copied())
        .chain(DET_ANY.iter().copied())
        .chain(pairs(NOUNS))
        .chain(pairs(VERBS_T))
        .chain(pairs(VERBS_I))
        .chain(ADJ.iter().copied())
        .chain(ADV.iter().copied())
        .chain(PREP.iter().copied())
        .chain([THAT, AND, COMMA, PERIOD])
        .collect()
}

/// `sentences` sentences of the language from `seed`, each on its own line (ending in `\n`).
pub fn corpus(seed: u64, sentences: usize) -> String {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        out: Vec::new(),
    };
    let mut text = String::new();
    for _ in 0..sentences {
        g.out.clear();
        g.sentence();
        text.push_str(&g.out.join(" "));
        text.push('\n');
    }
    text
}

fn starts_with_vowel(w: &str) -> bool {
    w.starts_with(['a', 'e', 'i', 'o', 'u'])
}

struct Gen {
    rng: ChaCha8Rng,
    out: Vec<&'static str>,
}

impl Gen {
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        // Word lists are short constants: the casts are exact.
        xs[below(&mut self.rng, xs.len() as u64) as usize]
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        below(&mut self.rng, 1000) < per_mille
    }

    fn form(&mut self, xs: &[(&'static str, &'static str)], plural: bool) -> &'static str {
        let (sg, pl) = self.pick(xs);
        if plural { pl } else { sg }
    }

    fn sentence(&mut self) {
        self.clause();
        for _ in 0..MAX_COORD {
            if !self.chance(P_COORD) {
                break;
            }
            self.out.extend([COMMA, AND]);
            self.clause();
        }
        self.out.push(PERIOD);
    }

    fn clause(&mut self) {
        let plural = self.chance(P_PLURAL);
        self.noun_phrase(plural, true);
        self.verb_phrase(plural, true);
        if self.chance(P_CLAUSE_PP) {
            self.prep_phrase();
        }
    }

    fn noun_phrase(&mut self, plural: bool, modifiers: bool) {
        let det = if self.chance(P_DET_ANY) {
            self.pick(DET_ANY)
        } else if plural {
            self.pick(DET_PL)
        } else {
            self.pick(DET_SG)
        };
        let at = self.out.len();
        self.out.push(det);
        if self.chance(P_FIRST_ADJ) {
            let a = self.pick(ADJ);
            self.out.push(a);
            if self.chance(P_SECOND_ADJ) {
                let a = self.pick(ADJ);
                self.out.push(a);
            }
        }
        let noun = self.form(NOUNS, plural);
        self.out.push(noun);
        if det == "a" && starts_with_vowel(self.out[at + 1]) {
            self.out[at] = AN;
        }
        if modifiers {
            if self.chance(P_NP_PP) {
                self.prep_phrase();
            } else if self.chance(P_REL) {
                self.out.push(THAT);
                self.verb_phrase(plural, false);
            }
        }
    }

    fn prep_phrase(&mut self) {
        let p = self.pick(PREP);
        self.out.push(p);
        let plural = self.chance(P_PLURAL);
        self.noun_phrase(plural, false);
    }

    fn verb_phrase(&mut self, plural: bool, modifiers: bool) {
        if self.chance(P_TRANSITIVE) {
            let v = self.form(VERBS_T, plural);
            self.out.push(v);
            let object_plural = self.chance(P_PLURAL);
            self.noun_phrase(object_plural, modifiers);
        } else {
            let v = self.form(VERBS_I, plural);
            self.out.push(v);
            if self.chance(P_ADV) {
                let a = self.pick(ADV);
                self.out.push(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A recognizer of the grammar that checks every agreement rule independently of the
    /// generator; `attracted` counts main verbs right after a noun of the other number.
    struct Parser<'a> {
        toks: Vec<&'a str>,
        i: usize,
        attracted: usize,
    }

    fn number(xs: &[(&str, &str)], w: &str) -> Option<bool> {
        xs.iter().find_map(|&(s, p)| {
            if w == s {
                Some(false)
            } else if w == p {
                Some(true)
            } else {
                None
            }
        })
    }

    impl<'a> Parser<'a> {
        fn peek(&self) -> &'a str {
            self.toks.get(self.i).copied().unwrap_or("")
        }
        fn next(&mut self) -> &'a str {
            let w = self.peek();
            self.i += 1;
            w
        }
        fn sentence(&mut self) -> Result<(), String> {
            self.clause()?;
            while self.peek() == COMMA {
                self.i += 1;
                if self.next() != AND {
                    return Err("`,` without `and`".into());
                }
                self.clause()?;
            }
            match (self.next(), self.i == self.toks.len()) {
                (PERIOD, true) => Ok(()),
                (w, _) => Err(format!("expected a final `.`, got `{w}`")),
            }
        }
        fn clause(&mut self) -> Result<(), String> {
            let plural = self.np(true)?;
            if number(NOUNS, self.toks[self.i - 1]) == Some(!plural) {
                self.attracted += 1;
            }
            self.vp(plural, true)?;
            if PREP.contains(&self.peek()) {
                self.pp()?;
            }
            Ok(())
        }
        fn np(&mut self, modifiers: bool) -> Result<bool, String> {
            let det = self.next();
            let det_plural = if DET_ANY.contains(&det) {
                None
            } else if DET_SG.contains(&det) || det == AN {
                Some(false)
            } else if DET_PL.contains(&det) {
                Some(true)
            } else {
                return Err(format!("`{det}` is not a determiner"));
            };
            if (det == "a" || det == AN) && starts_with_vowel(self.peek()) != (det == AN) {
                return Err(format!("`{det} {}`", self.peek()));
            }
            while ADJ.contains(&self.peek()) {
                self.i += 1;
            }
            let noun = self.next();
            let plural = number(NOUNS, noun).ok_or(format!("`{noun}` is not a noun"))?;
            if det_plural.is_some_and(|d| d != plural) {
                return Err(format!("`{det} ... {noun}` disagree"));
            }
            if modifiers {
                if PREP.contains(&self.peek()) {
                    self.pp()?;
                } else if self.peek() == THAT {
                    self.i += 1;
                    self.vp(plural, false)?;
                }
            }
            Ok(plural)
        }
        fn pp(&mut self) -> Result<(), String> {
            self.i += 1;
            self.np(false).map(drop)
        }
        fn vp(&mut self, plural: bool, modifiers: bool) -> Result<(), String> {
            let v = self.next();
            if let Some(p) = number(VERBS_T, v) {
                if p != plural {
                    return Err(format!("transitive `{v}` disagrees with its subject"));
                }
                self.np(modifiers).map(drop)
            } else if let Some(p) = number(VERBS_I, v) {
                if p != plural {
                    return Err(format!("intransitive `{v}` disagrees with its subject"));
                }
                if ADV.contains(&self.peek()) {
                    self.i += 1;
                }
                Ok(())
            } else {
                Err(format!("`{v}` is not a verb"))
            }
        }
    }

    #[test]
    fn corpus_is_deterministic_per_seed() {
        let a = corpus(7, 50);
        assert_eq!(a, corpus(7, 50));
        assert_ne!(a, corpus(8, 50));
        assert_eq!(a.lines().count(), 50);
        assert!(a.ends_with(" .\n"));
        // A longer corpus starts with the shorter one.
        assert!(corpus(7, 80).starts_with(&a));
    }

    #[test]
    fn vocabulary_is_unique_and_covers_the_corpus() {
        let v = vocabulary();
        assert!((100..=300).contains(&v.len()), "{}", v.len());
        assert_eq!(&v[..2], &[EOS, UNK]);
        let set: HashSet<&str> = v.iter().copied().collect();
        assert_eq!(set.len(), v.len(), "a word is in two classes");
        let text = corpus(3, 2000);
        let used: HashSet<&str> = text.split_whitespace().collect();
        assert!(used.is_subset(&set));
        assert!(!used.contains(EOS) && !used.contains(UNK));
        // Nearly every word is used (none is dead weight in the vocabulary).
        assert!(
            used.len() + 2 >= v.len() - 5,
            "{} of {}",
            used.len(),
            v.len()
        );
    }

    #[test]
    fn every_sentence_parses_with_agreement() {
        let text = corpus(11, 3000);
        let mut attracted = 0;
        for line in text.lines() {
            let mut p = Parser {
                toks: line.split(' ').collect(),
                i: 0,
                attracted: 0,
            };
            p.sentence().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            attracted += p.attracted;
        }
        // Agreement across an intervening noun of the other number does occur.
        assert!(attracted > 50, "{attracted}");
    }

    #[test]
    fn parser_rejects_disagreement() {
        for bad in [
            "the dog see a cat .",
            "the dogs near the cat sees a cat .",
            "this dogs run .",
            "a owl runs .",
            "an dog runs .",
        ] {
            let mut p = Parser {
                toks: bad.split(' ').collect(),
                i: 0,
                attracted: 0,
            };
            assert!(p.sentence().is_err(), "{bad}");
        }
    }
}
