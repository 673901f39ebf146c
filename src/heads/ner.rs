//! The NER head: a token state → scores for the BIO tags ([`Tag::COUNT`] of them), with the
//! JSON card that travels beside its weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::entities::{EntityLabel, Tag};
use crate::error::{Error, Result};

/// File name of the NER head's weights.
pub const NER_HEAD_WEIGHTS: &str = "ner.safetensors";
/// File name of the NER head's card.
pub const NER_HEAD_CARD: &str = "ner.json";

/// Dev scores of the NER head for one language.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NerDevScore {
    /// ISO 639-1 code.
    pub lang: String,
    /// Sentences scored.
    pub sentences: usize,
    /// Entity-level micro F1 (exact span and type).
    pub f1: f64,
    /// Per type F1.
    pub f1_by_label: std::collections::BTreeMap<EntityLabel, f64>,
}

/// What is known about a trained NER head.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NerCard {
    /// Tags in output order (`O`, `B-PER`, `I-PER`, ...).
    pub tags: Vec<String>,
    /// Width of the token states.
    pub input_size: usize,
    /// Hidden width of the MLP; 0 for a linear head.
    pub hidden_size: usize,
    /// The encoder it was trained on.
    pub encoder: String,
    /// Training data: files and sentences used.
    pub training_data: Vec<String>,
    /// Which sub-token of a word carries its tag.
    pub word_pooling: String,
    /// Neighbouring words on each side whose states are appended to a word's (0: none).
    #[serde(default)]
    pub context: usize,
    /// Seed and epochs.
    pub seed: u64,
    /// Epochs of training.
    pub epochs: usize,
    /// Dev scores per language.
    pub dev: Vec<NerDevScore>,
}

/// Row-major word features `[words, hidden]` → `[words, (2·context + 1)·hidden]`: each word's
/// state followed by its neighbours' (`-context..=context`, zeros past either end).
pub fn with_context(words: &[f32], hidden: usize, context: usize) -> Vec<f32> {
    if context == 0 {
        return words.to_vec();
    }
    let n = words.len() / hidden.max(1);
    let width = (2 * context + 1) * hidden;
    let mut out = vec![0f32; n * width];
    for i in 0..n {
        for (slot, offset) in (-(context as isize)..=context as isize).enumerate() {
            let j = i as isize + offset;
            if j >= 0 && (j as usize) < n {
                let j = j as usize;
                out[i * width + slot * hidden..i * width + (slot + 1) * hidden]
                    .copy_from_slice(&words[j * hidden..(j + 1) * hidden]);
            }
        }
    }
    out
}

/// Token states `[rows, hidden]` → tag logits `[rows, Tag::COUNT]`.
#[derive(Debug, Clone)]
pub struct NerHead {
    hidden: Option<Linear>,
    output: Linear,
}

impl NerHead {
    /// Builds the head under `vb` (`hidden`, `output`).
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen.
    pub fn load(vb: VarBuilder<'_>, input_size: usize, hidden_size: usize) -> Result<Self> {
        Ok(if hidden_size == 0 {
            NerHead {
                hidden: None,
                output: candle_nn::linear(input_size, Tag::COUNT, vb.pp("output"))?,
            }
        } else {
            NerHead {
                hidden: Some(candle_nn::linear(input_size, hidden_size, vb.pp("hidden"))?),
                output: candle_nn::linear(hidden_size, Tag::COUNT, vb.pp("output"))?,
            }
        })
    }

    /// Loads `ner.safetensors` and `ner.json` from `folder`.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] if a file is missing, [`Error::Config`] for a bad card.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<(Self, NerCard)> {
        let card_path = folder.join(NER_HEAD_CARD);
        let weights_path = folder.join(NER_HEAD_WEIGHTS);
        for p in [&card_path, &weights_path] {
            if !p.is_file() {
                return Err(Error::ModelFolder {
                    path: folder.to_path_buf(),
                    message: format!(
                        "no `{}`: train the NER head with `cargo run --release --example train_ner`",
                        p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                    ),
                });
            }
        }
        let text = std::fs::read_to_string(&card_path).map_err(|e| Error::io(&card_path, e))?;
        let card: NerCard = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: card_path.clone(),
            message: format!("line {} column {}: {e}", e.line(), e.column()),
        })?;
        let expected: Vec<String> = (0..Tag::COUNT)
            .map(|i| Tag::from_index(i).expect("in range").to_string())
            .collect();
        if card.tags != expected {
            return Err(Error::Config {
                path: card_path,
                message: format!("tags {:?} do not match {:?}", card.tags, expected),
            });
        }
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, device)?;
        let head = NerHead::load(vb, card.input_size, card.hidden_size)?;
        Ok((head, card))
    }

    /// Tag logits for token states `[rows, input]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.hidden {
            Some(h) => h.forward(x)?.gelu_erf()?,
            None => x.clone(),
        };
        Ok(self.output.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::with_context;

    #[test]
    fn context_appends_neighbours_with_zero_padding() {
        let words = [1.0, 2.0, 3.0]; // three words of width 1
        assert_eq!(
            with_context(&words, 1, 1),
            vec![0.0, 1.0, 2.0, 1.0, 2.0, 3.0, 2.0, 3.0, 0.0]
        );
        assert_eq!(with_context(&words, 1, 0), words.to_vec());
    }
}
