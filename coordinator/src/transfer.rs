//! The run's data: the transfer set the student is distilled on and the split it is scored on.
//!
//! By default both come from `data`: its train split is the transfer set and its test split the
//! evaluation. Hinton et al. distil on a *transfer set* that need not be the teachers' training
//! data, so `[transfer]` may name another source, the other split, a range of rows, or declare
//! the rows unlabelled; `[eval]` likewise picks the evaluation split:
//!
//! ```toml
//! data = "mnist:/data/mnist"            # the teachers' data set: row shape and classes
//! [transfer]
//! source = "mnist:/data/fashion-mnist"  # default: `data`
//! split = "train"                       # `train` (default) or `test`
//! rows = [0, 20000]                     # rows [start, end) of that split; default all
//! labels = false                        # unlabelled: only soft targets (needs alpha = 1)
//! [eval]
//! source = "mnist:/data/mnist"          # default: `data`
//! split = "test"                        # default `test`
//! ```
//!
//! Every source must have `data`'s row shape, and labels below its class count. Unlabelled rows
//! travel with label 0, which the loss never reads (alpha = 1 gives the hard term no weight).
//! The run's data description (reports, the cache key) names the selections, so a cache filled
//! from one transfer set is never read for another.

use std::collections::BTreeMap;

use distill_core::data::{Dataset, Features, Split};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which split of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

/// A selection of rows: `[transfer]` or `[eval]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Data source (default: the run's `data`).
    #[serde(default)]
    pub source: Option<String>,
    /// The split (default: `train` for the transfer set, `test` for the evaluation).
    #[serde(default)]
    pub split: Option<SplitName>,
    /// Rows `[start, end)` of the split (default: all).
    #[serde(default)]
    pub rows: Option<[usize; 2]>,
    /// Whether the rows' labels are used (transfer only; false needs `alpha = 1`).
    #[serde(default = "yes")]
    pub labels: bool,
}

fn yes() -> bool {
    true
}

impl Selection {
    fn describe(&self, data: &str, default: SplitName) -> String {
        let split = match self.split.unwrap_or(default) {
            SplitName::Train => "train",
            SplitName::Test => "test",
        };
        let mut s = format!("{}#{split}", self.source.as_deref().unwrap_or(data));
        if let Some([a, b]) = self.rows {
            s.push_str(&format!("[{a}..{b}]"));
        }
        if !self.labels {
            s.push_str(",unlabelled");
        }
        s
    }
}

/// Loads `data` and the sources the selections name (each once), and assembles the run's data
/// set: `train` is the transfer set, `test` the evaluation split.
pub fn assemble(
    data: &str,
    transfer: Option<&Selection>,
    eval: Option<&Selection>,
) -> Result<Dataset> {
    let mut loaded: BTreeMap<String, Dataset> = BTreeMap::new();
    let base = Dataset::load(data)?;
    if transfer.is_none() && eval.is_none() {
        return Ok(base);
    }
    for sel in [transfer, eval].into_iter().flatten() {
        if let Some(s) = &sel.source
            && s != data
            && !loaded.contains_key(s)
        {
            loaded.insert(s.clone(), Dataset::load(s)?);
        }
    }
    // An absent selection is the whole split of `data`, labelled.
    let whole = Selection {
        source: None,
        split: None,
        rows: None,
        labels: true,
    };
    let pick = |sel: Option<&Selection>, default: SplitName, key: &str| -> Result<Split> {
        let sel = sel.unwrap_or(&whole);
        let ds = match &sel.source {
            Some(s) if s != data => loaded
                .get(s)
                .ok_or_else(|| Error::Internal(format!("`{key}.source` {s} was not loaded")))?,
            _ => &base,
        };
        if ds.input_shape != base.input_shape {
            return Err(Error::Config(format!(
                "`{key}.source`: {} has rows of shape {:?}, but `data` ({}) has {:?}",
                ds.source, ds.input_shape, base.source, base.input_shape
            )));
        }
        let split = match sel.split.unwrap_or(default) {
            SplitName::Train => &ds.train,
            SplitName::Test => &ds.test,
        };
        let n = split.len();
        let (start, end) = match sel.rows {
            None => (0, n),
            Some([a, b]) if a < b && b <= n => (a, b),
            Some([a, b]) => {
                return Err(Error::Config(format!(
                    "`{key}.rows`: [{a}, {b}] is not a non-empty range within the split's {n} rows"
                )));
            }
        };
        if end == start {
            return Err(Error::Config(format!(
                "`{key}`: the selected split of {} has no rows",
                ds.source
            )));
        }
        let idx: Vec<usize> = (start..end).collect();
        let x = match &split.x {
            Features::U8(_) => Features::U8(split.rows_u8(&idx).unwrap_or_default()),
            Features::F32(_) => Features::F32(split.rows_f32(&idx)),
            Features::Tokens(_) => Features::Tokens(split.rows_tokens(&idx).unwrap_or_default()),
        };
        let y = if sel.labels {
            let y = split.labels(&idx);
            if let Some((i, l)) = y
                .iter()
                .enumerate()
                .find(|(_, l)| **l as usize >= base.classes)
            {
                return Err(Error::Config(format!(
                    "`{key}`: row {} of {} has label {l}, but `data` ({}) has {} classes",
                    start + i,
                    ds.source,
                    base.source,
                    base.classes
                )));
            }
            y
        } else {
            vec![0; idx.len()]
        };
        Ok(Split { x, y })
    };
    let train = pick(transfer, SplitName::Train, "transfer")?;
    let test = pick(eval, SplitName::Test, "eval")?;
    let default_sel = |split| Selection {
        source: None,
        split: Some(split),
        rows: None,
        labels: true,
    };
    let source = format!(
        "{data} transfer={} eval={}",
        transfer
            .cloned()
            .unwrap_or_else(|| default_sel(SplitName::Train))
            .describe(data, SplitName::Train),
        eval.cloned()
            .unwrap_or_else(|| default_sel(SplitName::Test))
            .describe(data, SplitName::Test),
    );
    Ok(Dataset {
        source,
        input_shape: base.input_shape,
        classes: base.classes,
        train,
        test,
        tokens: base.tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(source: Option<&str>, split: Option<SplitName>, rows: Option<[usize; 2]>) -> Selection {
        Selection {
            source: source.map(String::from),
            split,
            rows,
            labels: true,
        }
    }

    #[test]
    fn without_selections_the_run_has_its_data_as_it_is() {
        let a = assemble("synthetic:3", None, None).expect("data");
        assert_eq!(a, Dataset::load("synthetic:3").expect("load"));
    }

    #[test]
    fn a_transfer_set_from_another_source_and_split_with_a_range_of_rows() {
        let base = Dataset::load("synthetic:1").expect("base");
        let other = Dataset::load("synthetic:2").expect("other");
        let t = sel(Some("synthetic:2"), Some(SplitName::Test), Some([10, 110]));
        let e = sel(None, Some(SplitName::Train), Some([0, 50]));
        let d = assemble("synthetic:1", Some(&t), Some(&e)).expect("assembled");
        assert_eq!(d.train.len(), 100);
        let idx: Vec<usize> = (10..110).collect();
        assert_eq!(d.train.rows_f32(&[0]), other.test.rows_f32(&[10]));
        assert_eq!(
            d.train.labels(&(0..100).collect::<Vec<_>>()),
            other.test.labels(&idx)
        );
        assert_eq!(d.test.len(), 50);
        assert_eq!(d.test.rows_f32(&[49]), base.train.rows_f32(&[49]));
        assert_eq!(
            d.source,
            "synthetic:1 transfer=synthetic:2#test[10..110] eval=synthetic:1#train[0..50]"
        );
    }

    #[test]
    fn unlabelled_rows_carry_no_labels_and_the_description_says_so() {
        let t = Selection {
            labels: false,
            ..sel(None, None, Some([0, 20]))
        };
        let d = assemble("synthetic", Some(&t), None).expect("assembled");
        assert!(d.train.y.iter().all(|&y| y == 0));
        assert!(
            d.source.contains("#train[0..20],unlabelled"),
            "{}",
            d.source
        );
    }

    #[test]
    fn selections_that_do_not_fit_are_errors_naming_the_key() {
        for (rows, want) in [([5, 5], "transfer.rows"), ([0, 1_000_000], "transfer.rows")] {
            let e = assemble("synthetic", Some(&sel(None, None, Some(rows))), None)
                .expect_err("bad range");
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = assemble(
            "synthetic",
            None,
            Some(&sel(Some("mnist:/nowhere"), None, None)),
        )
        .expect_err("missing source");
        assert!(e.to_string().contains("/nowhere"), "{e}");
    }
}
