//! Model architecture specs and their one-string form.
//!
//! | string | network |
//! | --- | --- |
//! | `mlp:784-1200-1200-10` | input 784, ReLU hidden layers 1200 and 1200, 10 classes |
//! | `conv:32-64-256-10` | 1×28×28 input; conv 5×5 (pad 2) → ReLU → max-pool 2, for each of 32 and 64 channels; then a ReLU hidden layer of 256 and 10 classes |
//! | `llama:4-256-49152` | a decoder-only language model of 4 layers of width 256 over a vocabulary of 49,152 ([`LlamaConfig::small`]'s shape); any other llama comes from a `config.json` |
//!
//! In `conv:`, every number but the last two is a conv layer's channel count (at least one), the
//! second-to-last is the width of the fully connected hidden layer and the last is the number of
//! classes. The conv net's input is 1×28×28 (images of the MNIST family); its spatial size must
//! be divisible by 2 once per conv layer.
//!
//! # Parameter names (the safetensors keys of a checkpoint)
//!
//! Weights are laid out exactly as PyTorch's `nn.Linear` / `nn.Conv2d` store them:
//! - MLP: `fc{i}.weight` `[out, in]` and `fc{i}.bias` `[out]` for i = 0..=hidden layers
//!   (the last one is the output layer).
//! - Conv net: `conv{i}.weight` `[out_ch, in_ch, k, k]`, `conv{i}.bias` `[out_ch]`, then
//!   `fc0` (flattened C×H×W features → hidden) and `fc1` (hidden → classes). Flattening is
//!   row-major over (C, H, W), like `torch.flatten(x, 1)`.
//!
//! A PyTorch `nn.Sequential` of the same layers saves keys `"{index}.weight"`; `distill
//! import-torch` renames them in order (see [`crate::checkpoint::import_sequential`]).
//! - Llama: Hugging Face's names (`model.embed_tokens.weight`, `model.layers.{i}.…`,
//!   `model.norm.weight`, `lm_head.weight` unless tied), in name order
//!   ([`LlamaConfig::param_shapes`]).
//!
//! # Language models
//!
//! A llama classifies every position of a window: its input row is a window of `L + 1` token
//! ids ([`crate::data::tokens`]), of which it reads the first `L`, and its logits are
//! `[N·L, vocab]`, one row per position, the targets being the window's last `L` tokens. So
//! the training step, the soft targets (one row per position) and the error count (top-1
//! mismatches over positions) are those of a classifier over positions.

use serde::{Deserialize, Serialize};

use crate::llama::LlamaConfig;
use crate::{Error, Result};

/// Most conv layers an architecture may have (each halves the input's height and width).
pub const MAX_CONV_LAYERS: usize = 16;

/// The layers of a network (no training hyperparameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Arch {
    /// Multi-layer perceptron with ReLU hidden layers.
    Mlp {
        /// Input width (flattened).
        input: usize,
        /// Hidden layer widths (may be empty: logistic regression).
        hidden: Vec<usize>,
        /// Number of classes.
        classes: usize,
    },
    /// Small convolutional net for images.
    Conv {
        /// Input shape `[channels, height, width]`.
        input: [usize; 3],
        /// Output channels of each conv → ReLU → max-pool-2 block.
        channels: Vec<usize>,
        /// Conv kernel size (odd; padding keeps the spatial size).
        kernel: usize,
        /// Width of the fully connected hidden layer.
        hidden: usize,
        /// Number of classes.
        classes: usize,
    },
    /// A decoder-only language model (see the module docs).
    Llama(LlamaConfig),
}

/// Default conv kernel size.
pub const CONV_KERNEL: usize = 5;

impl Arch {
    /// Parses `mlp:784-1200-1200-10` or `conv:32-64-256-10`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::Spec(format!("`{s}`: {msg}"));
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            bad("expected KIND:SIZES, e.g. mlp:784-800-800-10, conv:32-64-256-10 or llama:4-256-49152")
        })?;
        let nums = rest
            .split('-')
            .map(|p| {
                p.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(&format!("`{p}` is not a positive integer")))
            })
            .collect::<Result<Vec<_>>>()?;
        let arch = match kind {
            "mlp" => {
                if nums.len() < 2 {
                    return Err(bad("an MLP needs at least an input size and a class count"));
                }
                Arch::Mlp {
                    input: nums[0],
                    hidden: nums[1..nums.len() - 1].to_vec(),
                    classes: nums[nums.len() - 1],
                }
            }
            "conv" => {
                if nums.len() < 3 {
                    return Err(bad(
                        "a conv net needs conv channels, a hidden width and a class count",
                    ));
                }
                Arch::Conv {
                    input: [1, 28, 28],
                    channels: nums[..nums.len() - 2].to_vec(),
                    kernel: CONV_KERNEL,
                    hidden: nums[nums.len() - 2],
                    classes: nums[nums.len() - 1],
                }
            }
            "llama" => {
                let &[layers, hidden, vocab] = nums.as_slice() else {
                    return Err(bad("a llama is llama:LAYERS-HIDDEN-VOCAB"));
                };
                Arch::Llama(LlamaConfig::small(layers, hidden, vocab))
            }
            other => {
                return Err(bad(&format!(
                    "unknown kind `{other}` (expected mlp, conv or llama)"
                )));
            }
        };
        arch.validate()?;
        Ok(arch)
    }

    /// Checks sizes (used after deserialising a spec from a file, too).
    pub fn validate(&self) -> Result<()> {
        match self {
            Arch::Mlp {
                input,
                hidden,
                classes,
            } => {
                if *input == 0 || *classes < 2 || hidden.contains(&0) {
                    return Err(Error::Spec(format!(
                        "{self}: sizes must be positive and classes >= 2"
                    )));
                }
            }
            Arch::Conv {
                input,
                channels,
                kernel,
                hidden,
                classes,
            } => {
                // Each conv layer halves the height and width: past MAX_CONV_LAYERS no input
                // is divisible, and the shift below would overflow.
                if channels.len() > MAX_CONV_LAYERS {
                    return Err(Error::Spec(format!(
                        "{self}: {} conv layers; at most {MAX_CONV_LAYERS} are supported",
                        channels.len()
                    )));
                }
                let div = 1usize << channels.len();
                let flat = channels
                    .last()
                    .and_then(|&c| c.checked_mul(input[1] / div)?.checked_mul(input[2] / div));
                if flat.is_none() && !channels.is_empty() {
                    return Err(Error::Spec(format!(
                        "{self}: the flattened conv output does not fit in memory"
                    )));
                }
                if channels.is_empty()
                    || channels.contains(&0)
                    || input.contains(&0)
                    || input[1] % div != 0
                    || input[2] % div != 0
                    || kernel % 2 == 0
                    || *hidden == 0
                    || *classes < 2
                {
                    return Err(Error::Spec(format!(
                        "{self}: needs >= 1 conv layer, an odd kernel, positive sizes, classes >= 2, \
                         and input height/width divisible by {div}"
                    )));
                }
            }
            Arch::Llama(cfg) => {
                cfg.validate()
                    .map_err(|e| Error::Spec(format!("{self}: {e}")))?;
                if cfg.vocab_size < 2 {
                    return Err(Error::Spec(format!(
                        "{self}: the vocabulary needs >= 2 tokens"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Shape of one input row, without the batch dimension (empty for a llama: its rows are
    /// windows of any length up to its positions, plus one).
    pub fn input_shape(&self) -> Vec<usize> {
        match self {
            Arch::Mlp { input, .. } => vec![*input],
            Arch::Conv { input, .. } => input.to_vec(),
            Arch::Llama(_) => Vec::new(),
        }
    }

    /// The language model's config, for a llama.
    pub fn llama(&self) -> Option<&LlamaConfig> {
        match self {
            Arch::Llama(c) => Some(c),
            _ => None,
        }
    }

    /// Elements in one input row.
    pub fn input_size(&self) -> usize {
        self.input_shape().iter().product()
    }

    /// Number of classes (logits per row).
    pub fn classes(&self) -> usize {
        match self {
            Arch::Mlp { classes, .. } | Arch::Conv { classes, .. } => *classes,
            Arch::Llama(c) => c.vocab_size,
        }
    }

    /// Every parameter's name and shape, in a fixed order (see the module docs).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, i: usize, fan_in: usize, n: usize| {
            out.push((format!("fc{i}.weight"), vec![n, fan_in]));
            out.push((format!("fc{i}.bias"), vec![n]));
        };
        match self {
            Arch::Mlp {
                input,
                hidden,
                classes,
            } => {
                let mut fan_in = *input;
                for (i, &n) in hidden.iter().chain(std::iter::once(classes)).enumerate() {
                    linear(&mut out, i, fan_in, n);
                    fan_in = n;
                }
            }
            Arch::Conv {
                input,
                channels,
                kernel,
                hidden,
                classes,
            } => {
                let mut cin = input[0];
                for (i, &c) in channels.iter().enumerate() {
                    out.push((format!("conv{i}.weight"), vec![c, cin, *kernel, *kernel]));
                    out.push((format!("conv{i}.bias"), vec![c]));
                    cin = c;
                }
                // Saturating: an unvalidated spec (one read from a file) must not panic here;
                // its shapes then fit no tensor and are refused by the caller.
                let div = u32::try_from(channels.len())
                    .ok()
                    .and_then(|n| 1usize.checked_shl(n))
                    .unwrap_or(usize::MAX);
                let flat = cin
                    .saturating_mul(input[1] / div)
                    .saturating_mul(input[2] / div);
                linear(&mut out, 0, flat, *hidden);
                linear(&mut out, 1, *hidden, *classes);
            }
            Arch::Llama(c) => out = c.param_shapes(),
        }
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |v: Vec<usize>| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("-")
        };
        match self {
            Arch::Mlp {
                input,
                hidden,
                classes,
            } => {
                let mut v = vec![*input];
                v.extend(hidden);
                v.push(*classes);
                write!(f, "mlp:{}", join(v))
            }
            Arch::Conv {
                channels,
                hidden,
                classes,
                ..
            } => {
                let mut v = channels.clone();
                v.push(*hidden);
                v.push(*classes);
                write!(f, "conv:{}", join(v))
            }
            Arch::Llama(c) => write!(
                f,
                "llama:{}-{}-{}",
                c.num_hidden_layers, c.hidden_size, c.vocab_size
            ),
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Arch::parse(s)
    }
}

/// A model: its architecture plus the dropout it trains with (dropout is off at inference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The layers.
    pub arch: Arch,
    /// Dropout probability on every hidden layer's output, in [0, 1).
    #[serde(default)]
    pub dropout: f32,
    /// Dropout probability on the input, in [0, 1).
    #[serde(default)]
    pub input_dropout: f32,
}

impl ModelSpec {
    /// A spec with no dropout.
    pub fn new(arch: Arch) -> Self {
        Self {
            arch,
            dropout: 0.0,
            input_dropout: 0.0,
        }
    }

    /// Checks the architecture and the dropout rates.
    pub fn validate(&self) -> Result<()> {
        self.arch.validate()?;
        for (name, p) in [
            ("dropout", self.dropout),
            ("input_dropout", self.input_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Spec(format!("{name} must be in [0, 1), got {p}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_kinds() {
        for s in [
            "mlp:784-1200-1200-10",
            "mlp:20-3",
            "conv:32-64-256-10",
            "conv:8-16-10",
        ] {
            assert_eq!(Arch::parse(s).unwrap().to_string(), s);
        }
        let a = Arch::parse("mlp:784-800-800-10").unwrap();
        assert_eq!(
            a.num_params(),
            784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
        );
        let c = Arch::parse("conv:32-64-256-10").unwrap();
        let shapes = c.param_shapes();
        assert_eq!(shapes[0], ("conv0.weight".into(), vec![32, 1, 5, 5]));
        assert_eq!(shapes[4], ("fc0.weight".into(), vec![256, 64 * 7 * 7]));
    }

    #[test]
    fn rejects_bad_strings_with_a_reason() {
        for (s, why) in [
            ("mlp", "expected KIND:SIZES"),
            ("mlp:784", "at least an input size"),
            ("mlp:784-x-10", "`x` is not a positive integer"),
            ("mlp:784-0-10", "`0` is not a positive integer"),
            ("rnn:1-2", "unknown kind `rnn`"),
            ("conv:32-10", "needs conv channels"),
            ("conv:8-8-8-8-16-10", "divisible by 16"),
            ("mlp:784-1", "classes >= 2"),
        ] {
            let e = Arch::parse(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn spec_round_trips_through_json_and_checks_dropout() {
        let mut spec = ModelSpec::new(Arch::parse("conv:8-16-10").unwrap());
        spec.dropout = 0.5;
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
        spec.input_dropout = 1.0;
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("input_dropout")
        );
    }
}
