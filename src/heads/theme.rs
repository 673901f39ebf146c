//! The theme head: a small MLP from a pooled, L2-normalised encoder vector to one logit per
//! theme, with the JSON card that travels beside its weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::error::{Error, Result};
use crate::themes::Theme;

/// File name of the theme head's weights.
pub const THEME_HEAD_WEIGHTS: &str = "themes.safetensors";
/// File name of the theme head's card.
pub const THEME_HEAD_CARD: &str = "themes.json";

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
    /// Width of the input vectors (the encoder's hidden size).
    pub input_size: usize,
    /// Width of the hidden layer; 0 for a plain linear head.
    pub hidden_size: usize,
    /// Probability above which each theme (in `labels` order) is reported, tuned on dev.
    pub thresholds: Vec<f32>,
    /// The encoder the head was trained on.
    pub encoder: String,
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
                message: format!("labels {:?} do not match the themes {:?}", card.labels, Theme::ALL),
            });
        }
        if card.thresholds.len() != card.labels.len() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("{} thresholds for {} labels", card.thresholds.len(), card.labels.len()),
            });
        }
        Ok(card)
    }
}

/// A pooled vector → theme logits.
#[derive(Debug, Clone)]
pub struct ThemeHead {
    hidden: Option<Linear>,
    output: Linear,
}

impl ThemeHead {
    /// Builds the head under `vb` (`hidden`, `output`), for training (a `VarMap`) or
    /// inference (safetensors).
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen.
    pub fn load(vb: VarBuilder<'_>, input_size: usize, hidden_size: usize) -> Result<Self> {
        let labels = Theme::ALL.len();
        let (hidden, output) = if hidden_size == 0 {
            (None, candle_nn::linear(input_size, labels, vb.pp("output"))?)
        } else {
            (
                Some(candle_nn::linear(input_size, hidden_size, vb.pp("hidden"))?),
                candle_nn::linear(hidden_size, labels, vb.pp("output"))?,
            )
        };
        Ok(ThemeHead { hidden, output })
    }

    /// Loads `themes.safetensors` and `themes.json` from `folder`.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] if a file is missing, [`Error::Config`] for a bad card, a
    /// tensor error for weights that do not match the card.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<(Self, ThemeCard)> {
        let card_path = folder.join(THEME_HEAD_CARD);
        let weights_path = folder.join(THEME_HEAD_WEIGHTS);
        for p in [&card_path, &weights_path] {
            if !p.is_file() {
                return Err(Error::ModelFolder {
                    path: folder.to_path_buf(),
                    message: format!(
                        "no `{}`: train the theme head with `cargo run --release --example train_themes`",
                        p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                    ),
                });
            }
        }
        let card = ThemeCard::read(&card_path)?;
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, device)?;
        let head = ThemeHead::load(vb, card.input_size, card.hidden_size).map_err(|e| Error::Tensor {
            name: weights_path.display().to_string(),
            message: format!("does not match its card: {e}"),
        })?;
        Ok((head, card))
    }

    /// Logits `[rows, 4]` for pooled vectors `[rows, input]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.hidden {
            Some(h) => h.forward(x)?.gelu_erf()?,
            None => x.clone(),
        };
        Ok(self.output.forward(&x)?)
    }

    /// Probabilities (sigmoid of the logits) for host vectors, row-major `[rows, input]`.
    pub fn probabilities(&self, rows: &[f32], input_size: usize, device: &Device) -> Result<Vec<[f32; 4]>> {
        let n = rows.len() / input_size.max(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        let x = Tensor::from_slice(rows, (n, input_size), device)?;
        let p: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&self.forward(&x)?)?.to_vec2()?;
        Ok(p.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
    }
}
