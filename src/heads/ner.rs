//! The NER head: a token state → scores for the BIO tags ([`Tag::COUNT`] of them), with the
//! JSON card that travels beside its weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::dense::DenseLayer;
use crate::embedder::{TokenSource, WordPooling};
use crate::entities::{decode_bio, repair_bio, EntityLabel, Tag};
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
    /// Width of the dense layer.
    pub hidden_size: usize,
    /// Dilation of each word-mixing layer ([`NerNet`]); empty: none.
    #[serde(default)]
    pub dilations: Vec<usize>,
    /// The encoder it was trained on.
    pub encoder: String,
    /// sha256 of the encoder layers fine-tuned with this head ([`super::ENCODER_LAYERS`]);
    /// `None`: the shipped encoder, frozen. The analyzer refuses a mismatch.
    #[serde(default)]
    pub encoder_layers_sha256: Option<String>,
    /// Training data: files and sentences used.
    pub training_data: Vec<String>,
    /// Which token states the head reads.
    pub token_source: TokenSource,
    /// For [`TokenSource::LayerMean`]: how many layers are averaged.
    pub layers: usize,
    /// For [`TokenSource::LayerMean`]: the averaged layers end at this layer (1-based);
    /// `None`: at the last.
    #[serde(default)]
    pub layers_end: Option<usize>,
    /// How a word's sub-token states become its feature row.
    pub word_pooling: WordPooling,
    /// Neighbouring words on each side whose states are appended to a word's (0: none).
    pub context: usize,
    /// Words per run of consecutive sentences when tagging pre-split sentences
    /// ([`crate::Analyzer::tag_words`]), as in training.
    pub pack_words: usize,
    /// Whether tags are decoded by BIO-constrained Viterbi ([`crate::entities::decode_bio`])
    /// rather than per-word argmax followed by [`crate::entities::repair_bio`].
    pub viterbi: bool,
    /// Seed and epochs.
    pub seed: u64,
    /// Epochs of training.
    pub epochs: usize,
    /// Dev scores per language.
    pub dev: Vec<NerDevScore>,
    /// Dev scores on lower-cased copies of some languages' dev sets (case robustness); not
    /// used to choose anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dev_lowercased: Vec<NerDevScore>,
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

/// Per-feature standardisation of word rows, fitted on the training rows. The encoder's states
/// have a few dimensions hundreds of times larger than the rest; without this the MLP spends
/// its first epochs learning to ignore them.
#[derive(Debug, Clone, PartialEq)]
pub struct InputScaling {
    /// Mean per feature.
    pub mean: Vec<f32>,
    /// 1 / standard deviation per feature (0 for a constant feature).
    pub inv_std: Vec<f32>,
}

impl InputScaling {
    /// Mean and spread of each of `width` features over row-major `rows`.
    pub fn fit(rows: &[f32], width: usize) -> Self {
        let n = (rows.len() / width.max(1)).max(1) as f64;
        let mut sum = vec![0f64; width];
        let mut sq = vec![0f64; width];
        for row in rows.chunks_exact(width) {
            for ((s, q), &v) in sum.iter_mut().zip(&mut sq).zip(row) {
                *s += v as f64;
                *q += (v as f64) * (v as f64);
            }
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let inv_std = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| {
                let var = (q / n - (s / n) * (s / n)).max(0.0);
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    0.0
                }
            })
            .collect();
        InputScaling { mean, inv_std }
    }

    /// Standardises row-major `rows` in place.
    pub fn apply(&self, rows: &mut [f32]) {
        for row in rows.chunks_exact_mut(self.mean.len().max(1)) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = (*v - m) * s;
            }
        }
    }

    /// The scaling as tensors named `input.mean` and `input.inv_std`, for saving beside the MLP.
    ///
    /// # Errors
    /// A tensor error.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (
                "input.mean".into(),
                Tensor::from_slice(&self.mean, self.mean.len(), &Device::Cpu)?,
            ),
            (
                "input.inv_std".into(),
                Tensor::from_slice(&self.inv_std, self.inv_std.len(), &Device::Cpu)?,
            ),
        ])
    }
}

/// Each word's row joined by the rows `dilation` words before and after it (zeros past either
/// end): `[batch, len, width]` → `[batch, len, 3·width]`.
fn join_neighbours(x: &Tensor, dilation: usize) -> Result<Tensor> {
    let (batch, len, width) = x.dims3()?;
    let d = dilation.min(len);
    let zeros = Tensor::zeros((batch, d, width), x.dtype(), x.device())?;
    let before = Tensor::cat(&[&zeros, &x.narrow(1, 0, len - d)?], 1)?;
    let after = Tensor::cat(&[&x.narrow(1, d, len - d)?, &zeros], 1)?;
    Ok(Tensor::cat(&[&before, x, &after], 2)?)
}

/// The network of the head: joined word rows `[batch, len, input]` → a dense layer → residual
/// layers that each mix a word with its neighbours at a growing distance (dilations 1, 2, 4...,
/// so a few layers see a dozen words either side) → tag logits `[batch, len, Tag::COUNT]`.
///
/// The encoder's states are already contextual; these layers add what a per-word classifier
/// lacks: agreement between neighbouring tags (an entity's words are tagged together). A BiLSTM
/// does the same but costs hundreds of small sequential ops per sentence, too slow to train
/// on two cores.
#[derive(Debug, Clone)]
pub struct NerNet {
    hidden: Linear,
    mixers: Vec<(Linear, usize)>,
    output: Linear,
}

impl NerNet {
    /// Builds the network under `vb` (`hidden`, `mix.{i}`, `output`), one mixing layer per
    /// entry of `dilations`.
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen.
    pub fn load(
        vb: VarBuilder<'_>,
        input_size: usize,
        hidden_size: usize,
        dilations: &[usize],
    ) -> Result<Self> {
        let mixers = dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                Ok((
                    candle_nn::linear(3 * hidden_size, hidden_size, vb.pp(format!("mix.{i}")))?,
                    d.max(1),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NerNet {
            hidden: candle_nn::linear(input_size, hidden_size, vb.pp("hidden"))?,
            mixers,
            output: candle_nn::linear(hidden_size, Tag::COUNT, vb.pp("output"))?,
        })
    }

    /// Tag logits for a padded batch of word sequences `[batch, len, input]` whose real
    /// lengths are `lengths` (padding at the end); `dropout` > 0 only in training.
    ///
    /// # Errors
    /// A tensor error on a shape mismatch.
    pub fn forward(&self, x: &Tensor, lengths: &[usize], dropout: f32) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let mut x = self.hidden.forward(x)?.gelu_erf()?;
        if !self.mixers.is_empty() {
            // Padding must look like the zeros past the end of a sequence at inference.
            let mask: Vec<f32> = lengths
                .iter()
                .flat_map(|&n| (0..len).map(move |t| if t < n { 1.0 } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (batch, len, 1), x.device())?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&mask)?;
            for (layer, dilation) in &self.mixers {
                let input = if dropout > 0.0 {
                    candle_nn::ops::dropout(&x, dropout)?
                } else {
                    x.clone()
                };
                let mixed = layer
                    .forward(&join_neighbours(&input, *dilation)?)?
                    .gelu_erf()?;
                x = (x + mixed)?.broadcast_mul(&mask)?;
            }
        }
        if dropout > 0.0 {
            x = candle_nn::ops::dropout(&x, dropout)?;
        }
        Ok(self.output.forward(&x)?)
    }
}

/// The NER head: word feature rows → BIO tags. Standardises each word's row, joins its
/// neighbours' ([`with_context`]), scores the tags with a small MLP and decodes a valid BIO
/// sequence.
#[derive(Debug, Clone)]
pub struct NerHead {
    scaling: InputScaling,
    net: NerNet,
    /// The same network on the host, for heads loaded for the CPU (see [`super::dense`]).
    host: Option<HostNerNet>,
    context: usize,
    viterbi: bool,
    device: Device,
}

/// [`NerNet`]'s layers as host dense layers.
#[derive(Debug, Clone)]
struct HostNerNet {
    hidden: DenseLayer,
    mixers: Vec<(DenseLayer, usize)>,
    output: DenseLayer,
}

impl HostNerNet {
    fn from_net(net: &NerNet) -> Result<Self> {
        Ok(HostNerNet {
            hidden: DenseLayer::from_linear(&net.hidden)?,
            mixers: net
                .mixers
                .iter()
                .map(|(l, d)| Ok((DenseLayer::from_linear(l)?, *d)))
                .collect::<Result<_>>()?,
            output: DenseLayer::from_linear(&net.output)?,
        })
    }

    /// Tag logits `[words, Tag::COUNT]` for one run's joined rows `[words, input]`: the same
    /// computation as [`NerNet::forward`] on a batch of one without dropout.
    fn forward(&self, x: &[f32], words: usize) -> Vec<f32> {
        let mut h = self.hidden.forward_gelu(x);
        let width = self.hidden.outputs();
        for (layer, dilation) in &self.mixers {
            let joined = join_neighbours_host(&h, words, width, *dilation);
            let mixed = layer.forward_gelu(&joined);
            for (h, m) in h.iter_mut().zip(&mixed) {
                *h += m;
            }
        }
        self.output.forward(&h)
    }
}

/// Host form of [`join_neighbours`] for one sequence: each row becomes `[x[t − d], x[t], x[t + d]]`
/// with zeros past either end.
fn join_neighbours_host(x: &[f32], words: usize, width: usize, dilation: usize) -> Vec<f32> {
    let mut out = vec![0f32; words * 3 * width];
    for (t, row) in out.chunks_exact_mut(3 * width).enumerate() {
        if t >= dilation {
            row[..width].copy_from_slice(&x[(t - dilation) * width..(t - dilation + 1) * width]);
        }
        row[width..2 * width].copy_from_slice(&x[t * width..(t + 1) * width]);
        if t + dilation < words {
            row[2 * width..]
                .copy_from_slice(&x[(t + dilation) * width..(t + dilation + 1) * width]);
        }
    }
    out
}

impl NerHead {
    /// Assembles a head from its parts.
    pub fn new(
        scaling: InputScaling,
        net: NerNet,
        context: usize,
        viterbi: bool,
        device: &Device,
    ) -> Self {
        NerHead {
            scaling,
            net,
            host: None,
            context,
            viterbi,
            device: device.clone(),
        }
    }

    /// Loads `ner.safetensors` and `ner.json` from `folder`.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] if a file is missing, [`Error::Config`] for a bad card, a tensor
    /// error for missing or misshapen weights.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<(Self, NerCard)> {
        let (card_path, weights_path) =
            super::head_files(folder, NER_HEAD_CARD, NER_HEAD_WEIGHTS, "train_ner")?;
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
        let word_width = card.input_size / (2 * card.context + 1);
        if word_width * (2 * card.context + 1) != card.input_size {
            return Err(Error::Config {
                path: card_path,
                message: format!(
                    "input_size {} is not a multiple of the {} joined words",
                    card.input_size,
                    2 * card.context + 1
                ),
            });
        }
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, device)?;
        let scaling = InputScaling {
            mean: vb.get(word_width, "input.mean")?.to_vec1()?,
            inv_std: vb.get(word_width, "input.inv_std")?.to_vec1()?,
        };
        let net = NerNet::load(vb, card.input_size, card.hidden_size, &card.dilations)?;
        let mut head = NerHead::new(scaling, net, card.context, card.viterbi, device);
        if device.is_cpu() {
            head.host = Some(HostNerNet::from_net(&head.net)?);
        }
        Ok((head, card))
    }

    /// Width of one word's feature row (before neighbours are joined).
    pub fn word_width(&self) -> usize {
        self.scaling.mean.len()
    }

    /// Per-word log-probabilities of the tags, `[words][Tag::COUNT]`, for the row-major word
    /// rows `[words, word_width]` of one run of text.
    ///
    /// # Errors
    /// A tensor error.
    pub fn log_probs(&self, word_rows: &[f32]) -> Result<Vec<Vec<f32>>> {
        let words = word_rows.len() / self.word_width().max(1);
        if words == 0 {
            return Ok(Vec::new());
        }
        let mut rows = word_rows.to_vec();
        self.scaling.apply(&mut rows);
        let joined = with_context(&rows, self.word_width(), self.context);
        let width = joined.len() / words;
        if let Some(host) = &self.host {
            let logits = host.forward(&joined, words);
            return Ok(logits
                .chunks_exact(Tag::COUNT)
                .map(|row| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
                    row.iter().map(|v| v - log_sum).collect()
                })
                .collect());
        }
        let x = Tensor::from_vec(joined, (1, words, width), &self.device)?;
        let logits = self.net.forward(&x, &[words], 0.0)?.squeeze(0)?;
        Ok(candle_nn::ops::log_softmax(&logits, 1)?.to_vec2()?)
    }

    /// Tags and per-word confidence (probability of the chosen tag) for one run of words.
    ///
    /// # Errors
    /// A tensor error.
    pub fn tag(&self, word_rows: &[f32]) -> Result<(Vec<Tag>, Vec<f32>)> {
        let log_probs = self.log_probs(word_rows)?;
        let tags = decode(&log_probs, self.viterbi);
        let scores = tags
            .iter()
            .zip(&log_probs)
            .map(|(t, lp)| lp[t.index()].exp())
            .collect();
        Ok((tags, scores))
    }
}

/// BIO tags from per-word log-probabilities: constrained Viterbi, or argmax then repair.
pub fn decode(log_probs: &[Vec<f32>], viterbi: bool) -> Vec<Tag> {
    if viterbi {
        return decode_bio(log_probs);
    }
    let mut tags: Vec<Tag> = log_probs
        .iter()
        .map(|p| {
            let best = (0..Tag::COUNT)
                .max_by(|&a, &b| p[a].total_cmp(&p[b]))
                .expect("Tag::COUNT > 0");
            Tag::from_index(best).expect("in range")
        })
        .collect();
    repair_bio(&mut tags);
    tags
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
