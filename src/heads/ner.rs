//! The NER head: a token state → scores for the BIO tags ([`Tag::COUNT`] of them), with the
//! JSON card that travels beside its weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::crf::Transitions;
use super::dense::DenseLayer;
pub use super::scaling::InputScaling;
use crate::embedder::{TokenSource, WordPooling};
use crate::encoder::int8::gemm::Kernel;
use crate::encoder::int8::ops;
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
    /// Heads of the word-attention layer after the mixing layers ([`WordAttention`]); 0: none.
    #[serde(default)]
    pub attention_heads: usize,
    /// Words on each side that a word attends to ([`WordAttention`]).
    #[serde(default)]
    pub attention_span: usize,
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
    /// Whether tags are decoded by BIO-constrained Viterbi ([`crate::entities::decode_bio`], or
    /// [`Transitions::viterbi`] with `crf`) rather than per-word argmax followed by
    /// [`crate::entities::repair_bio`].
    pub viterbi: bool,
    /// Whether each word's row ends with its [`word_shape`] (after the encoder's state).
    #[serde(default)]
    pub word_shape: bool,
    /// Whether the head has learned tag transitions (`crf.start`, `crf.transitions`; see
    /// [`super::crf`]) trained with it end to end.
    #[serde(default)]
    pub crf: bool,
    /// Added to every entity tag's score (`B-*`, `I-*`) before decoding: above 0 the head
    /// marks more words as entities, below 0 fewer. `train_ner` chooses it on dev, where it
    /// trades precision for recall, and keeps it only if a bias chosen on one half of dev
    /// pays on the other; 0 leaves the network's scores as trained.
    #[serde(default)]
    pub entity_bias: f32,
    /// Networks whose tag scores are averaged: an ensemble of heads trained alike with
    /// different seeds (`train_ner --combine`). Member 0's tensors have the plain names,
    /// member `k`'s the prefix `m{k}.`; learned transitions are averaged too, so the decoder
    /// reads the mean of the members' potentials. Cards without it: 1.
    #[serde(default = "one_member")]
    pub members: usize,
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

fn one_member() -> usize {
    1
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

/// Width of [`word_shape`].
pub const WORD_SHAPE_WIDTH: usize = 14;

/// How a word is written, as 0/1 features: capitalisation (first letter, all capitals, a
/// capital inside, none), digits, punctuation, inner joiners (`-`, `'`, `.`), script (Latin,
/// Cyrillic, Arabic, other), a single character, sentence-final punctuation.
///
/// The encoder sees a word as sub-tokens whose states carry its spelling only indirectly; a
/// name's capital letter, the all-capitals of an acronym or the digits of a date are cheap and
/// strong cues that the head otherwise has to dig out of 384 dimensions.
///
/// ```
/// use themescan::heads::ner::word_shape;
/// let nato = word_shape("NATO");
/// assert_eq!((nato[0], nato[1], nato[8]), (1.0, 1.0, 1.0)); // capital, all capitals, Latin
/// assert_eq!(word_shape("2024")[5], 1.0); // all digits
/// ```
pub fn word_shape(word: &str) -> [f32; WORD_SHAPE_WIDTH] {
    let mut f = [0f32; WORD_SHAPE_WIDTH];
    let chars: Vec<char> = word.chars().collect();
    let Some(&first) = chars.first() else {
        return f;
    };
    let letters: Vec<char> = chars
        .iter()
        .copied()
        .filter(|c| c.is_alphabetic())
        .collect();
    let upper = letters.iter().filter(|c| c.is_uppercase()).count();
    let cased = letters
        .iter()
        .filter(|c| c.is_uppercase() || c.is_lowercase())
        .count();
    let on = |b: bool| if b { 1.0 } else { 0.0 };
    f[0] = on(first.is_uppercase());
    f[1] = on(upper >= 2 && upper == cased);
    f[2] = on(upper > 0 && upper < cased && chars[1..].iter().any(|c| c.is_uppercase()));
    f[3] = on(cased > 0 && upper == 0);
    f[4] = on(chars.iter().any(|c| c.is_numeric()));
    f[5] = on(chars.iter().all(|c| c.is_numeric()));
    f[6] = on(chars.iter().all(|c| !c.is_alphanumeric()));
    f[7] = on(chars.len() > 2
        && chars[1..chars.len() - 1]
            .iter()
            .any(|c| matches!(c, '-' | '\'' | '’' | '.')));
    let script = |c: char| match c as u32 {
        0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F | 0x1E00..=0x1EFF => 8,
        0x400..=0x52F => 9,
        0x600..=0x6FF | 0x750..=0x77F | 0x8A0..=0x8FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => 10,
        _ => 11,
    };
    for &c in &letters {
        f[script(c)] = 1.0;
    }
    f[12] = on(chars.len() == 1);
    f[13] = on(chars
        .iter()
        .all(|c| matches!(c, '.' | '!' | '?' | '…' | '؟' | '。')));
    f
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

/// The shape of a [`NerNet`], as the head's card records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NerNetConfig {
    /// Width of a joined word row.
    pub input_size: usize,
    /// Width of the dense layer and everything after it.
    pub hidden_size: usize,
    /// Dilation of each word-mixing layer; empty: none.
    pub dilations: Vec<usize>,
    /// Heads of the word-attention layer; 0: no attention layer.
    pub attention_heads: usize,
    /// Words on each side that a word attends to.
    pub attention_span: usize,
}

impl NerCard {
    /// The shape of the head's network.
    pub fn net_config(&self) -> NerNetConfig {
        NerNetConfig {
            input_size: self.input_size,
            hidden_size: self.hidden_size,
            dilations: self.dilations.clone(),
            attention_heads: self.attention_heads,
            attention_span: self.attention_span,
        }
    }
}

/// Additive attention bias `[batch, 1, len, len]`: 0 where query `i` may read key `j`
/// (`|i − j| ≤ span` and `j` inside its sequence), a large negative number elsewhere.
fn attention_bias(lengths: &[usize], len: usize, span: usize, device: &Device) -> Result<Tensor> {
    let mut bias = Vec::with_capacity(lengths.len() * len * len);
    for &n in lengths {
        for i in 0..len {
            bias.extend((0..len).map(|j| {
                if j < n && i.abs_diff(j) <= span {
                    0f32
                } else {
                    -1e9
                }
            }));
        }
    }
    Ok(Tensor::from_vec(
        bias,
        (lengths.len(), 1, len, len),
        device,
    )?)
}

const LAYER_NORM_EPS: f32 = 1e-5;

/// Multi-head self-attention over the words of a run, each word reading the words within
/// `span` of it: `x` `[batch, len, hidden]` → the update `[batch, len, hidden]` that
/// [`NerNet`] adds to `x`.
///
/// The mixing layers see a dozen words either side; this layer lets a name's mention read its
/// other mentions further away (a surname after the full name, an acronym after the
/// organisation), all in a few batched matrix products. The span bounds what a word reads,
/// so a long article costs linear time and sees what a training run (`pack_words`) saw.
#[derive(Debug, Clone)]
pub struct WordAttention {
    norm_weight: Tensor,
    norm_bias: Tensor,
    qkv: Linear,
    output: Linear,
    heads: usize,
    span: usize,
}

impl WordAttention {
    /// Builds the layer under `vb` (`norm.weight`, `norm.bias`, `qkv`, `output`).
    ///
    /// # Errors
    /// [`Error::Setting`] if `hidden` is not a multiple of `heads`; a tensor error if a
    /// weight is missing or misshapen.
    pub fn load(vb: VarBuilder<'_>, hidden: usize, heads: usize, span: usize) -> Result<Self> {
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(Error::Setting(format!(
                "word attention: width {hidden} does not split into {heads} heads"
            )));
        }
        Ok(WordAttention {
            norm_weight: vb.get_with_hints(hidden, "norm.weight", candle_nn::Init::Const(1.0))?,
            norm_bias: vb.get_with_hints(hidden, "norm.bias", candle_nn::Init::Const(0.0))?,
            qkv: candle_nn::linear(hidden, 3 * hidden, vb.pp("qkv"))?,
            output: candle_nn::linear(hidden, hidden, vb.pp("output"))?,
            heads,
            span,
        })
    }

    /// The update for a padded batch whose real lengths are `lengths`.
    ///
    /// # Errors
    /// A tensor error on a shape mismatch.
    pub fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (batch, len, hidden) = x.dims3()?;
        let head_width = hidden / self.heads;
        // The fused layer norm has no backward pass.
        let a =
            candle_nn::ops::layer_norm_slow(x, &self.norm_weight, &self.norm_bias, LAYER_NORM_EPS)?;
        // [batch, len, 3, heads, head_width] → three [batch, heads, len, head_width].
        let qkv = self
            .qkv
            .forward(&a)?
            .reshape((batch, len, 3, self.heads, head_width))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? / (head_width as f64).sqrt())?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&attention_bias(
            lengths,
            len,
            self.span,
            x.device(),
        )?)?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let read = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, len, hidden))?;
        Ok(self.output.forward(&read)?)
    }
}

/// The network of the head: joined word rows `[batch, len, input]` → a dense layer → residual
/// layers that each mix a word with its neighbours at a growing distance (dilations 1, 2, 4...,
/// so a few layers see a dozen words either side) → optionally a residual [`WordAttention`]
/// layer → tag logits `[batch, len, Tag::COUNT]`.
///
/// The encoder's states are already contextual; these layers add what a per-word classifier
/// lacks: agreement between neighbouring tags (an entity's words are tagged together). A BiLSTM
/// does the same but costs hundreds of small sequential ops per sentence, too slow to train
/// on two cores.
#[derive(Debug, Clone)]
pub struct NerNet {
    hidden: Linear,
    mixers: Vec<(Linear, usize)>,
    attention: Option<WordAttention>,
    output: Linear,
}

impl NerNet {
    /// Builds the network under `vb` (`hidden`, `mix.{i}`, `attention`, `output`).
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen; [`Error::Setting`] for attention
    /// heads that do not divide the width.
    pub fn load(vb: VarBuilder<'_>, config: &NerNetConfig) -> Result<Self> {
        let hidden_size = config.hidden_size;
        let mixers = config
            .dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                Ok((
                    candle_nn::linear(3 * hidden_size, hidden_size, vb.pp(format!("mix.{i}")))?,
                    d.max(1),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let attention = match config.attention_heads {
            0 => None,
            heads => Some(WordAttention::load(
                vb.pp("attention"),
                hidden_size,
                heads,
                config.attention_span,
            )?),
        };
        Ok(NerNet {
            hidden: candle_nn::linear(config.input_size, hidden_size, vb.pp("hidden"))?,
            mixers,
            attention,
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
        if !self.mixers.is_empty() || self.attention.is_some() {
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
            if let Some(attention) = &self.attention {
                let mut update = attention.forward(&x, lengths)?;
                if dropout > 0.0 {
                    update = candle_nn::ops::dropout(&update, dropout)?;
                }
                x = (x + update)?.broadcast_mul(&mask)?;
            }
        }
        if dropout > 0.0 {
            x = candle_nn::ops::dropout(&x, dropout)?;
        }
        Ok(self.output.forward(&x)?)
    }
}

/// The NER head: word feature rows → BIO tags. Standardises each word's row, appends its
/// [`word_shape`] if the head was trained with one, joins its neighbours' ([`with_context`]),
/// scores the tags with [`NerNet`] and decodes a valid BIO sequence (with learned
/// [`Transitions`] if it has them).
#[derive(Debug, Clone)]
pub struct NerHead {
    /// One network, or several whose tag scores are averaged ([`NerCard::members`]).
    members: Vec<NerMember>,
    context: usize,
    viterbi: bool,
    word_shape: bool,
    transitions: Option<Transitions>,
    /// Added to every entity tag's score before decoding ([`NerCard::entity_bias`]).
    entity_bias: f32,
    device: Device,
}

/// One network of a [`NerHead`]: its input scaling and layers.
#[derive(Debug, Clone)]
struct NerMember {
    scaling: InputScaling,
    net: NerNet,
    /// The same network on the host, for heads loaded for the CPU (see [`super::dense`]).
    host: Option<HostNerNet>,
}

impl NerMember {
    /// Tag scores `[words][Tag::COUNT]` for the word states `[words, state width]` (scaled
    /// here), each followed by its word's shape where `shapes` is given, joined with
    /// `context` neighbours on each side.
    fn scores(
        &self,
        word_rows: &[f32],
        shapes: Option<&[[f32; WORD_SHAPE_WIDTH]]>,
        context: usize,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.scaling.mean.len();
        let n = word_rows.len() / h.max(1);
        let mut rows = word_rows.to_vec();
        self.scaling.apply(&mut rows);
        if let Some(shapes) = shapes {
            let mut shaped = Vec::with_capacity(n * (h + WORD_SHAPE_WIDTH));
            for (row, shape) in rows.chunks_exact(h).zip(shapes) {
                shaped.extend_from_slice(row);
                shaped.extend_from_slice(shape);
            }
            rows = shaped;
        }
        let row_width = rows.len() / n;
        let joined = with_context(&rows, row_width, context);
        let width = joined.len() / n;
        Ok(if let Some(host) = &self.host {
            host.forward(&joined, n)
                .chunks_exact(Tag::COUNT)
                .map(<[f32]>::to_vec)
                .collect()
        } else {
            let x = Tensor::from_vec(joined, (1, n, width), device)?;
            self.net.forward(&x, &[n], 0.0)?.squeeze(0)?.to_vec2()?
        })
    }
}

/// [`NerNet`]'s layers as host dense layers.
#[derive(Debug, Clone)]
struct HostNerNet {
    hidden: DenseLayer,
    mixers: Vec<(DenseLayer, usize)>,
    attention: Option<HostWordAttention>,
    output: DenseLayer,
}

/// [`WordAttention`] on the host.
#[derive(Debug, Clone)]
struct HostWordAttention {
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    qkv: DenseLayer,
    output: DenseLayer,
    heads: usize,
    span: usize,
}

impl HostWordAttention {
    fn from_layer(layer: &WordAttention) -> Result<Self> {
        Ok(HostWordAttention {
            norm_weight: layer.norm_weight.to_vec1()?,
            norm_bias: layer.norm_bias.to_vec1()?,
            qkv: DenseLayer::from_linear(&layer.qkv)?,
            output: DenseLayer::from_linear(&layer.output)?,
            heads: layer.heads,
            span: layer.span,
        })
    }

    /// [`WordAttention::forward`] for one sequence `[words, width]`, reading only the keys
    /// within the span (linear in the words, not quadratic).
    fn forward(&self, x: &[f32], words: usize) -> Vec<f32> {
        let width = self.norm_weight.len();
        let kernel = Kernel::detect();
        let mut a = x.to_vec();
        for row in a.chunks_exact_mut(width) {
            ops::layer_norm(
                kernel,
                row,
                &self.norm_weight,
                &self.norm_bias,
                LAYER_NORM_EPS,
            );
        }
        let qkv = self.qkv.forward(&a);
        let head_width = width / self.heads;
        let scale = 1.0 / (head_width as f32).sqrt();
        let mut read = vec![0f32; words * width];
        let mut weights = Vec::with_capacity(2 * self.span + 1);
        for i in 0..words {
            let (from, to) = (i.saturating_sub(self.span), (i + self.span + 1).min(words));
            for head in 0..self.heads {
                let at = head * head_width;
                let q = &qkv[i * 3 * width + at..i * 3 * width + at + head_width];
                weights.clear();
                weights.extend((from..to).map(|j| {
                    let k =
                        &qkv[j * 3 * width + width + at..j * 3 * width + width + at + head_width];
                    q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                }));
                ops::softmax_row(kernel, &mut weights);
                let out = &mut read[i * width + at..i * width + at + head_width];
                for (j, w) in (from..to).zip(&weights) {
                    let v = &qkv[j * 3 * width + 2 * width + at
                        ..j * 3 * width + 2 * width + at + head_width];
                    for (o, v) in out.iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
        }
        self.output.forward(&read)
    }
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
            attention: net
                .attention
                .as_ref()
                .map(HostWordAttention::from_layer)
                .transpose()?,
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
        if let Some(attention) = &self.attention {
            let update = attention.forward(&h, words);
            for (h, u) in h.iter_mut().zip(&update) {
                *h += u;
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
    /// Assembles a head from its parts: no word shape, no learned transitions (see
    /// [`NerHead::with_word_shape`] and [`NerHead::with_transitions`]).
    pub fn new(
        scaling: InputScaling,
        net: NerNet,
        context: usize,
        viterbi: bool,
        device: &Device,
    ) -> Self {
        NerHead {
            members: vec![NerMember {
                scaling,
                net,
                host: None,
            }],
            context,
            viterbi,
            word_shape: false,
            transitions: None,
            entity_bias: 0.0,
            device: device.clone(),
        }
    }

    /// The head with each word's row followed by its [`word_shape`].
    pub fn with_word_shape(mut self, word_shape: bool) -> Self {
        self.word_shape = word_shape;
        self
    }

    /// The head with learned tag transitions, used for decoding and per-word confidence.
    pub fn with_transitions(mut self, transitions: Option<Transitions>) -> Self {
        self.transitions = transitions;
        self
    }

    /// The head with `bias` added to every entity tag's score before decoding (see
    /// [`NerCard::entity_bias`]).
    pub fn with_entity_bias(mut self, bias: f32) -> Self {
        self.entity_bias = bias;
        self
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
        let row_width = card.input_size / (2 * card.context + 1);
        let shape_width = if card.word_shape { WORD_SHAPE_WIDTH } else { 0 };
        if row_width * (2 * card.context + 1) != card.input_size || row_width <= shape_width {
            return Err(Error::Config {
                path: card_path,
                message: format!(
                    "input_size {} is not a multiple of the {} joined words{}",
                    card.input_size,
                    2 * card.context + 1,
                    if card.word_shape {
                        " with a word-shape channel"
                    } else {
                        ""
                    }
                ),
            });
        }
        let state_width = row_width - shape_width;
        if card.members == 0 {
            return Err(Error::Config {
                path: card_path,
                message: "members is 0: a head needs at least one network".into(),
            });
        }
        let data = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(data, DType::F32, device)?;
        let mut members = Vec::with_capacity(card.members);
        let mut start = vec![0f32; Tag::COUNT];
        let mut moves = vec![0f32; Tag::COUNT * Tag::COUNT];
        for k in 0..card.members {
            let vb = if k == 0 {
                vb.clone()
            } else {
                vb.pp(format!("m{k}"))
            };
            let scaling = InputScaling {
                mean: vb.get(state_width, "input.mean")?.to_vec1()?,
                inv_std: vb.get(state_width, "input.inv_std")?.to_vec1()?,
            };
            if card.crf {
                // The decoder reads the mean of the members' potentials: transitions are
                // averaged as the emissions are.
                let s: Vec<f32> = vb.get(Tag::COUNT, "crf.start")?.to_vec1()?;
                let t: Vec<f32> = vb
                    .get((Tag::COUNT, Tag::COUNT), "crf.transitions")?
                    .flatten_all()?
                    .to_vec1()?;
                start.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
                moves.iter_mut().zip(&t).for_each(|(a, b)| *a += b);
            }
            let net = NerNet::load(vb, &card.net_config())?;
            let host = if device.is_cpu() {
                Some(HostNerNet::from_net(&net)?)
            } else {
                None
            };
            members.push(NerMember { scaling, net, host });
        }
        let k = card.members as f32;
        let transitions = card.crf.then(|| {
            start.iter_mut().for_each(|v| *v /= k);
            moves.iter_mut().for_each(|v| *v /= k);
            Transitions::new(&start, &moves)
        });
        let head = NerHead {
            members,
            context: card.context,
            viterbi: card.viterbi,
            word_shape: card.word_shape,
            transitions,
            entity_bias: card.entity_bias,
            device: device.clone(),
        };
        Ok((head, card))
    }

    /// Runs the network's wide layers (the first dense layer, the mixers and the attention's
    /// projections) with int8 products from now on, on a head loaded for the CPU; the output
    /// layer stays f32. With the 512-wide head, full analysis went from 0.71× to 0.89× the
    /// encoder-only throughput (`benches/analysis.rs`, 2 threads, VNNI).
    pub fn use_int8(&mut self, kernel: Kernel) {
        for host in self.members.iter_mut().filter_map(|m| m.host.as_mut()) {
            host.hidden.use_int8(kernel);
            for (layer, _) in &mut host.mixers {
                layer.use_int8(kernel);
            }
            if let Some(attention) = &mut host.attention {
                attention.qkv.use_int8(kernel);
                attention.output.use_int8(kernel);
            }
        }
    }

    /// Width of one word's encoder state (what the caller passes per word).
    pub fn word_width(&self) -> usize {
        self.members[0].scaling.mean.len()
    }

    /// Per-word tag scores `[words][Tag::COUNT]` as the network gives them (before the entity
    /// bias and normalisation), for the row-major word states `[words, word_width]` of one
    /// run of text and the words themselves. [`NerHead::tag_scores`] decodes them; scoring once
    /// and decoding with several biases is how `train_ner` chooses the bias.
    ///
    /// # Errors
    /// As [`NerHead::log_probs`].
    pub fn network_scores<S: AsRef<str>>(
        &self,
        word_rows: &[f32],
        words: &[S],
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.word_width();
        let n = word_rows.len() / h.max(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        let shapes: Option<Vec<[f32; WORD_SHAPE_WIDTH]>> = if self.word_shape {
            if words.len() != n {
                return Err(Error::Setting(format!(
                    "the NER head reads the words' shapes: {} words given for {n} word states",
                    words.len()
                )));
            }
            Some(words.iter().map(|w| word_shape(w.as_ref())).collect())
        } else {
            None
        };
        let score =
            |m: &NerMember| m.scores(word_rows, shapes.as_deref(), self.context, &self.device);
        let mut emissions = score(&self.members[0])?;
        if self.members.len() > 1 {
            for member in &self.members[1..] {
                for (row, other) in emissions.iter_mut().zip(score(member)?) {
                    row.iter_mut().zip(other).for_each(|(a, b)| *a += b);
                }
            }
            let k = self.members.len() as f32;
            for row in &mut emissions {
                row.iter_mut().for_each(|v| *v /= k);
            }
        }
        Ok(emissions)
    }

    /// [`NerHead::network_scores`] with the entity bias added: what decoding reads.
    fn emissions<S: AsRef<str>>(&self, word_rows: &[f32], words: &[S]) -> Result<Vec<Vec<f32>>> {
        let mut scores = self.network_scores(word_rows, words)?;
        self.add_entity_bias(&mut scores);
        Ok(scores)
    }

    fn add_entity_bias(&self, scores: &mut [Vec<f32>]) {
        if self.entity_bias != 0.0 {
            // Index 0 is `O`; every other tag begins or continues an entity.
            for row in scores {
                for score in &mut row[1..] {
                    *score += self.entity_bias;
                }
            }
        }
    }

    /// Per-word log-probabilities of the tags, `[words][Tag::COUNT]`, for the row-major word
    /// states `[words, word_width]` of one run of text and its words (read only by a head
    /// with a word-shape channel): with learned transitions, the marginals over valid paths;
    /// otherwise each word's softmax.
    ///
    /// # Errors
    /// A tensor error; [`Error::Setting`] if the head reads word shapes and `words` does not
    /// match the rows.
    pub fn log_probs<S: AsRef<str>>(
        &self,
        word_rows: &[f32],
        words: &[S],
    ) -> Result<Vec<Vec<f32>>> {
        let emissions = self.emissions(word_rows, words)?;
        Ok(self.normalise(&emissions))
    }

    fn normalise(&self, emissions: &[Vec<f32>]) -> Vec<Vec<f32>> {
        if let Some(t) = &self.transitions {
            return t.log_marginals(emissions);
        }
        emissions
            .iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
                row.iter().map(|v| v - log_sum).collect()
            })
            .collect()
    }

    /// Tags and per-word confidence (probability of the chosen tag) for one run of words,
    /// decoded as the head's card says.
    ///
    /// # Errors
    /// As [`NerHead::log_probs`].
    pub fn tag<S: AsRef<str>>(
        &self,
        word_rows: &[f32],
        words: &[S],
    ) -> Result<(Vec<Tag>, Vec<f32>)> {
        self.tag_with(word_rows, words, self.viterbi)
    }

    /// As [`NerHead::tag`], choosing the decoder: the best valid path (`viterbi`, with the
    /// learned transitions if any) or per-word argmax then [`repair_bio`].
    ///
    /// # Errors
    /// As [`NerHead::log_probs`].
    pub fn tag_with<S: AsRef<str>>(
        &self,
        word_rows: &[f32],
        words: &[S],
        viterbi: bool,
    ) -> Result<(Vec<Tag>, Vec<f32>)> {
        Ok(self.tag_scores(self.network_scores(word_rows, words)?, viterbi))
    }

    /// Tags only, as [`NerHead::tag_scores`] decodes them, without the per-word confidence
    /// (which costs a forward-backward pass with learned transitions).
    pub fn decode_scores(&self, mut emissions: Vec<Vec<f32>>, viterbi: bool) -> Vec<Tag> {
        self.add_entity_bias(&mut emissions);
        match (&self.transitions, viterbi) {
            (Some(t), true) => t.viterbi(&emissions),
            _ => decode(&self.normalise(&emissions), viterbi),
        }
    }

    /// Tags and per-word confidence, as [`NerHead::tag_with`], from scores that
    /// [`NerHead::network_scores`] gave (this head's entity bias is added here).
    pub fn tag_scores(&self, mut emissions: Vec<Vec<f32>>, viterbi: bool) -> (Vec<Tag>, Vec<f32>) {
        self.add_entity_bias(&mut emissions);
        let log_probs = self.normalise(&emissions);
        let tags = match (&self.transitions, viterbi) {
            (Some(t), true) => t.viterbi(&emissions),
            _ => decode(&log_probs, viterbi),
        };
        let scores = tags
            .iter()
            .zip(&log_probs)
            .map(|(t, lp)| lp[t.index()].exp())
            .collect();
        (tags, scores)
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
    use super::{with_context, word_shape, HostNerNet, NerNet, NerNetConfig};
    use crate::entities::Tag;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    /// A randomly initialised network with mixers and span-3 attention, and the variables
    /// that hold its weights.
    fn random_varmap_and_net() -> (VarMap, NerNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let config = NerNetConfig {
            input_size: 6,
            hidden_size: 8,
            dilations: vec![1, 2],
            attention_heads: 2,
            attention_span: 3,
        };
        let net = NerNet::load(vb, &config).unwrap();
        (varmap, net)
    }

    fn random_net() -> NerNet {
        random_varmap_and_net().1
    }

    fn rows(words: usize, seed: f32) -> Vec<f32> {
        (0..words * 6)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 2.0)
            .collect()
    }

    #[test]
    fn attention_net_on_host_matches_batched_tensors_and_ignores_padding() {
        let net = random_net();
        let host = HostNerNet::from_net(&net).unwrap();
        let (long, short) = (12, 7);
        let a = rows(long, 0.0);
        let mut b = rows(short, 1.0);
        let single = host.forward(&b, short);
        b.extend(std::iter::repeat_n(5.0, (long - short) * 6)); // padding must not leak in
        let mut batch = a.clone();
        batch.extend(&b);
        let x = Tensor::from_vec(batch, (2, long, 6), &Device::Cpu).unwrap();
        let logits: Vec<Vec<Vec<f32>>> = net
            .forward(&x, &[long, short], 0.0)
            .unwrap()
            .to_vec3()
            .unwrap();
        let want_a: Vec<f32> = logits[0].concat();
        let want_b: Vec<f32> = logits[1][..short].concat();
        for (got, want) in [(host.forward(&a, long), want_a), (single, want_b)] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
    }

    /// A head over 6-wide states with no input scaling, ten words and their states.
    fn ten_word_head() -> (super::NerHead, Vec<String>, Vec<f32>) {
        let scaling = super::InputScaling {
            mean: vec![0.0; 6],
            inv_std: vec![1.0; 6],
        };
        let head = super::NerHead::new(scaling, random_net(), 0, true, &Device::Cpu);
        let words = (0..10).map(|i| format!("w{i}")).collect();
        (head, words, rows(10, 0.5))
    }

    #[test]
    fn entity_bias_moves_words_between_o_and_entities() {
        let (head, words, x) = ten_word_head();
        let entity_words = |bias: f32| {
            let head = head.clone().with_entity_bias(bias);
            let (tags, _) = head.tag(&x, &words).unwrap();
            tags.iter().filter(|t| **t != Tag::O).count()
        };
        assert_eq!(entity_words(-1e3), 0);
        assert_eq!(entity_words(1e3), 10);
        assert!(entity_words(-1.0) <= entity_words(0.0));
        assert!(entity_words(0.0) <= entity_words(1.0));
    }

    #[test]
    fn scoring_once_and_decoding_with_a_bias_matches_tagging_with_it() {
        let (head, words, x) = ten_word_head();
        let scores = head.network_scores(&x, &words).unwrap();
        for bias in [-2.0, 0.0, 1.5] {
            let biased = head.clone().with_entity_bias(bias);
            let tagged = biased.tag(&x, &words).unwrap();
            assert_eq!(biased.tag_scores(scores.clone(), true), tagged);
            assert_eq!(biased.decode_scores(scores.clone(), true), tagged.0);
        }
    }

    /// Writes a head folder whose card has `members` networks: `nets[k]`'s tensors under
    /// member `k`'s names, unscaled inputs.
    fn head_folder(nets: &[&VarMap]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = std::collections::HashMap::new();
        for (k, varmap) in nets.iter().enumerate() {
            let prefix = if k == 0 {
                String::new()
            } else {
                format!("m{k}.")
            };
            for (name, var) in varmap.data().lock().unwrap().iter() {
                tensors.insert(format!("{prefix}{name}"), var.as_tensor().clone());
            }
            tensors.insert(
                format!("{prefix}input.mean"),
                Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
            );
            tensors.insert(
                format!("{prefix}input.inv_std"),
                Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
            );
        }
        candle_core::safetensors::save(&tensors, dir.path().join(super::NER_HEAD_WEIGHTS)).unwrap();
        let tags: Vec<String> = (0..Tag::COUNT)
            .map(|i| Tag::from_index(i).unwrap().to_string())
            .collect();
        let card = serde_json::json!({
            "tags": tags, "input_size": 6, "hidden_size": 8, "dilations": [1, 2],
            "attention_heads": 2, "attention_span": 3, "encoder": "test",
            "training_data": [], "token_source": "layer_mean", "layers": 8,
            "word_pooling": "mean", "context": 0, "pack_words": 200, "viterbi": true,
            "members": nets.len(), "seed": 1, "epochs": 1, "dev": []
        });
        std::fs::write(dir.path().join(super::NER_HEAD_CARD), card.to_string()).unwrap();
        dir
    }

    #[test]
    fn an_ensemble_scores_words_by_the_mean_of_its_networks() {
        let (a, b) = (random_varmap_and_net().0, random_varmap_and_net().0);
        let load = |nets: &[&VarMap]| {
            let dir = head_folder(nets);
            super::NerHead::from_folder(dir.path(), &Device::Cpu).unwrap()
        };
        let words: Vec<String> = (0..9).map(|i| format!("w{i}")).collect();
        let x = rows(9, 0.25);
        let (one, card) = load(&[&a]);
        assert_eq!(card.members, 1);
        let (two, card) = load(&[&a, &b]);
        assert_eq!(card.members, 2);
        let (sa, sb) = (
            one.network_scores(&x, &words).unwrap(),
            load(&[&b]).0.network_scores(&x, &words).unwrap(),
        );
        assert_ne!(sa, sb);
        for ((got, ra), rb) in two
            .network_scores(&x, &words)
            .unwrap()
            .iter()
            .zip(&sa)
            .zip(&sb)
        {
            for ((g, a), b) in got.iter().zip(ra).zip(rb) {
                assert!(
                    (g - (a + b) / 2.0).abs() < 1e-5,
                    "{g} vs mean of {a} and {b}"
                );
            }
        }
        // The same network twice tags as it does alone.
        let (twice, _) = load(&[&a, &a]);
        assert_eq!(twice.tag(&x, &words).unwrap(), one.tag(&x, &words).unwrap());
    }

    #[test]
    fn attention_reads_only_within_its_span() {
        let net = random_net();
        let host = HostNerNet::from_net(&net).unwrap();
        let words = 40;
        let a = rows(words, 0.0);
        let mut b = a.clone();
        for v in &mut b[39 * 6..] {
            *v += 3.0; // change the last word only
        }
        let (la, lb) = (host.forward(&a, words), host.forward(&b, words));
        let width = la.len() / words;
        // Mixers reach 1 + 2 words, attention 3 more: word 39 cannot reach word 39 − 7.
        assert_eq!(la[..32 * width], lb[..32 * width]);
        assert_ne!(la[38 * width..], lb[38 * width..]);
    }

    #[test]
    fn word_shape_reads_case_digits_punctuation_and_script() {
        let on = |w: &str| -> Vec<usize> {
            word_shape(w)
                .iter()
                .enumerate()
                .filter(|(_, &v)| v == 1.0)
                .map(|(i, _)| i)
                .collect()
        };
        assert_eq!(on("Amsterdam"), vec![0, 8]);
        assert_eq!(on("amsterdam"), vec![3, 8]);
        assert_eq!(on("McDonald"), vec![0, 2, 8]);
        assert_eq!(on("Москва"), vec![0, 9]);
        assert_eq!(on("داعش"), vec![10]);
        assert_eq!(on("U.S."), vec![0, 1, 7, 8]);
        assert_eq!(on("1990"), vec![4, 5]);
        assert_eq!(on("."), vec![6, 12, 13]);
        assert_eq!(on("«"), vec![6, 12]);
        assert_eq!(on("हिंदी"), vec![11]);
        assert!(on("").is_empty());
    }

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
