//! The theme head: a small MLP from a pooled, L2-normalised encoder vector to one logit per
//! theme, with the JSON card that travels beside its weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::dense::DenseLayer;
use crate::error::{Error, Result};
use crate::themes::Theme;

/// File name of the theme head's weights.
pub const THEME_HEAD_WEIGHTS: &str = "themes.safetensors";
/// File name of the theme head's card.
pub const THEME_HEAD_CARD: &str = "themes.json";

/// How a run of token states becomes the theme head's input vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The L2-normalised mean of the states (e5's own sentence embedding).
    #[default]
    Mean,
    /// The normalised mean followed by the normalised element-wise maximum: the maximum keeps
    /// the strongest single-token signals ("recruit", "offline gehaald") that a mean dilutes.
    MeanMax,
}

impl Pooling {
    /// Width of the pooled vector for states of width `hidden`.
    pub fn output_size(self, hidden: usize) -> usize {
        match self {
            Pooling::Mean => hidden,
            Pooling::MeanMax => 2 * hidden,
        }
    }

    /// Pools `rows` (token states, each `hidden` wide) into `out`.
    pub fn pool<'a>(
        self,
        rows: impl Iterator<Item = ndarray::ArrayView1<'a, f32>> + Clone,
        hidden: usize,
        out: &mut Vec<f32>,
    ) {
        let mut mean = vec![0f32; hidden];
        let mut max = vec![f32::NEG_INFINITY; hidden];
        let mut n = 0usize;
        for row in rows {
            n += 1;
            for ((m, x), v) in mean.iter_mut().zip(max.iter_mut()).zip(row.iter()) {
                *m += v;
                *x = x.max(*v);
            }
        }
        push_normalised(&mean, out);
        if self == Pooling::MeanMax {
            if n == 0 {
                max.fill(0.0);
            }
            push_normalised(&max, out);
        }
    }
}

fn push_normalised(v: &[f32], out: &mut Vec<f32>) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    out.extend(v.iter().map(|x| x / norm));
}

/// Per-theme precision, recall and F1 on a labelled set.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThemeMetrics {
    /// The theme.
    pub theme: Theme,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// Articles that carry the theme.
    pub support: usize,
}

/// What is known about a trained theme head: its labels and sizes, its thresholds, and where
/// and how well it was trained. Stored as `themes.json` beside `themes.safetensors`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThemeCard {
    /// Output order of the head; must equal [`Theme::ALL`].
    pub labels: Vec<Theme>,
    /// Width of the input vectors ([`Pooling::output_size`] of the encoder's hidden size).
    pub input_size: usize,
    /// How token states are pooled into the input vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// Width of the hidden layer; 0 for a plain linear head.
    pub hidden_size: usize,
    /// Members of the ensemble whose logits are averaged (each `m{i}.` in the weights).
    #[serde(default = "one")]
    pub members: usize,
    /// Probability above which each theme (in `labels` order) is reported, tuned on dev.
    pub thresholds: Vec<f32>,
    /// The encoder the head was trained on.
    pub encoder: String,
    /// sha256 of the fine-tuned encoder layers ([`super::ENCODER_LAYERS`]) the head was
    /// trained on; `None`: the shipped encoder as is. The analyzer refuses a mismatch.
    #[serde(default)]
    pub encoder_layers_sha256: Option<String>,
    /// sha256 of the training data files, in name order.
    pub training_data_sha256: String,
    /// Training examples and dev examples used.
    pub examples: usize,
    /// Dev examples (held out by story).
    pub dev_examples: usize,
    /// Random seed of training.
    pub seed: u64,
    /// Epochs of training.
    pub epochs: usize,
    /// Dev metrics per theme at the tuned thresholds.
    pub dev_metrics: Vec<ThemeMetrics>,
    /// Dev macro-F1 at the tuned thresholds.
    pub dev_macro_f1: f64,
    /// Dev macro-F1 per language.
    pub dev_macro_f1_by_language: std::collections::BTreeMap<String, f64>,
}

fn one() -> usize {
    1
}

impl ThemeCard {
    /// Reads and checks a card.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Config`] if it cannot be read, or if its labels or thresholds
    /// do not match the four themes.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let card: ThemeCard = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("line {} column {}: {e}", e.line(), e.column()),
        })?;
        if card.labels != Theme::ALL {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "labels {:?} do not match the themes {:?}",
                    card.labels,
                    Theme::ALL
                ),
            });
        }
        if card.thresholds.len() != card.labels.len() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "{} thresholds for {} labels",
                    card.thresholds.len(),
                    card.labels.len()
                ),
            });
        }
        Ok(card)
    }
}

/// One MLP (or linear layer) from a pooled vector to theme logits.
#[derive(Debug, Clone)]
struct Member {
    hidden: Option<Linear>,
    output: Linear,
}

impl Member {
    fn load(vb: VarBuilder<'_>, input_size: usize, hidden_size: usize) -> Result<Self> {
        let labels = Theme::ALL.len();
        Ok(if hidden_size == 0 {
            Member {
                hidden: None,
                output: candle_nn::linear(input_size, labels, vb.pp("output"))?,
            }
        } else {
            Member {
                hidden: Some(candle_nn::linear(input_size, hidden_size, vb.pp("hidden"))?),
                output: candle_nn::linear(hidden_size, labels, vb.pp("output"))?,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.hidden {
            Some(h) => h.forward(x)?.gelu_erf()?,
            None => x.clone(),
        };
        Ok(self.output.forward(&x)?)
    }
}

/// A pooled vector → theme logits: the mean of the logits of an ensemble of small MLPs, each
/// trained from another seed on another sample of the data (smoother, steadier scores than one).
#[derive(Debug, Clone)]
pub struct ThemeHead {
    members: Vec<Member>,
    /// The members as host dense layers, for heads loaded for the CPU (see [`super::dense`]).
    host: Option<Vec<(Option<DenseLayer>, DenseLayer)>>,
}

impl ThemeHead {
    /// Builds a head of `members` MLPs under `vb` (`m0.hidden`, `m0.output`, `m1.…`), for
    /// training (a `VarMap`) or inference (safetensors).
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen.
    pub fn load(
        vb: VarBuilder<'_>,
        input_size: usize,
        hidden_size: usize,
        members: usize,
    ) -> Result<Self> {
        let members = (0..members.max(1))
            .map(|i| Member::load(vb.pp(format!("m{i}")), input_size, hidden_size))
            .collect::<Result<Vec<_>>>()?;
        Ok(ThemeHead {
            members,
            host: None,
        })
    }

    /// The head made of member `i` alone, sharing its weights (for training members one by one).
    pub fn member(&self, i: usize) -> Option<ThemeHead> {
        self.members.get(i).map(|m| ThemeHead {
            members: vec![m.clone()],
            host: None,
        })
    }

    /// Loads `themes.safetensors` and `themes.json` from `folder`.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] if a file is missing, [`Error::Config`] for a bad card, a
    /// tensor error for weights that do not match the card.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<(Self, ThemeCard)> {
        let (card_path, weights_path) =
            super::head_files(folder, THEME_HEAD_CARD, THEME_HEAD_WEIGHTS, "train_themes")?;
        let card = ThemeCard::read(&card_path)?;
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, device)?;
        let mut head = ThemeHead::load(vb, card.input_size, card.hidden_size, card.members)
            .map_err(|e| Error::Tensor {
                name: weights_path.display().to_string(),
                message: format!("does not match its card: {e}"),
            })?;
        if device.is_cpu() {
            head.host = Some(
                head.members
                    .iter()
                    .map(|m| {
                        Ok((
                            m.hidden.as_ref().map(DenseLayer::from_linear).transpose()?,
                            DenseLayer::from_linear(&m.output)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            );
        }
        Ok((head, card))
    }

    /// Logits `[rows, 4]` for pooled vectors `[rows, input]`: the members' mean.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut sum = self.members[0].forward(x)?;
        for m in &self.members[1..] {
            sum = (sum + m.forward(x)?)?;
        }
        Ok((sum / self.members.len() as f64)?)
    }

    /// Probabilities (sigmoid of the logits) for host vectors, row-major `[rows, input]`.
    pub fn probabilities(
        &self,
        rows: &[f32],
        input_size: usize,
        device: &Device,
    ) -> Result<Vec<[f32; 4]>> {
        let n = rows.len() / input_size.max(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(host) = &self.host {
            let mut sum = vec![0f32; n * Theme::ALL.len()];
            for (hidden, output) in host {
                let logits = match hidden {
                    Some(h) => output.forward(&h.forward_gelu(rows)),
                    None => output.forward(rows),
                };
                for (s, l) in sum.iter_mut().zip(&logits) {
                    *s += l;
                }
            }
            let members = host.len() as f32;
            return Ok(sum
                .chunks_exact(Theme::ALL.len())
                .map(|r| std::array::from_fn(|k| 1.0 / (1.0 + (-r[k] / members).exp())))
                .collect());
        }
        let x = Tensor::from_slice(rows, (n, input_size), device)?;
        let p: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&self.forward(&x)?)?.to_vec2()?;
        Ok(p.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
    }
}
