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
    /// [`Pooling::MeanMax`] of the last layer's states, then of the per-token mean of the
    /// middle layers (the states the NER head reads, made in the same encoder pass). The top
    /// layers of e5 are shaped for sentence similarity; the middle ones keep more of what
    /// each word is and who does what (cross-validated: macro-F1 0.911 → 0.930).
    MeanMaxWithLayerMean,
}

impl Pooling {
    /// Width of the pooled vector for states of width `hidden`.
    pub fn output_size(self, hidden: usize) -> usize {
        match self {
            Pooling::Mean => hidden,
            Pooling::MeanMax => 2 * hidden,
            Pooling::MeanMaxWithLayerMean => 4 * hidden,
        }
    }

    /// Whether it reads the layer-mean states as well as the last layer's.
    pub fn needs_layer_mean(self) -> bool {
        self == Pooling::MeanMaxWithLayerMean
    }

    /// Pools `last` (last-layer token states, each `hidden` wide) and, for
    /// [`Pooling::MeanMaxWithLayerMean`], `layer_mean` (the same tokens' layer-mean states)
    /// into `out`.
    ///
    /// # Panics
    /// If the pooling needs layer-mean states and `layer_mean` is `None`: the analyzer and the
    /// training example build the encoder with them whenever the card asks.
    pub fn pool<'a, I>(self, last: I, layer_mean: Option<I>, hidden: usize, out: &mut Vec<f32>)
    where
        I: Iterator<Item = ndarray::ArrayView1<'a, f32>>,
    {
        match self {
            Pooling::Mean => mean_max(last, hidden, false, out),
            Pooling::MeanMax => mean_max(last, hidden, true, out),
            Pooling::MeanMaxWithLayerMean => {
                mean_max(last, hidden, true, out);
                let layer_mean = layer_mean.expect("layer-mean states for this pooling");
                mean_max(layer_mean, hidden, true, out);
            }
        }
    }
}

/// Pushes the normalised mean of `rows` and, with `with_max`, their normalised element-wise
/// maximum (zeros for no rows).
fn mean_max<'a>(
    rows: impl Iterator<Item = ndarray::ArrayView1<'a, f32>>,
    hidden: usize,
    with_max: bool,
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
    if with_max {
        if n == 0 {
            max.fill(0.0);
        }
        push_normalised(&max, out);
    }
}

fn push_normalised(v: &[f32], out: &mut Vec<f32>) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    out.extend(v.iter().map(|x| x / norm));
}

/// How an article's scores come from its windows (an article longer than one window has
/// several; segments of a huge text add more), or from its sentences.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The mean of the two best windows' probabilities per theme (the rule of heads whose card
    /// does not name one).
    #[default]
    TopTwoMean,
    /// The head scores the mean of the windows' pooled vectors: the article vector it was
    /// trained on.
    MeanVector,
    /// The best window's probability per theme.
    Max,
    /// The head scores every sentence, pooled as a window is, and an article's logit per theme
    /// is the smooth maximum of its sentences' logits ([`log_mean_exp`] at
    /// [`SENTENCE_SHARPNESS`]). A head with this rule is trained through it
    /// (multiple-instance learning: labels on articles, instances the sentences), so one
    /// sentence that carries a theme can carry the article, and the head's sentence scores
    /// are the evidence it went by.
    Sentences,
}

/// Sharpness `r` of the sentence rule's smooth maximum, `(1/r)·ln(mean(e^(r·l)))`: at 2 an
/// article of 30 sentences whose best sentence's logit stands 3 above the rest scores about
/// 1.3 below that sentence (the mean would be 0.1 above the rest, the maximum the sentence).
pub const SENTENCE_SHARPNESS: f32 = 2.0;

/// The smooth maximum `(1/r)·ln(mean(e^(r·x)))` of `values`, computed without overflow;
/// `None` when there are none. It lies between the mean (r → 0) and the maximum (r → ∞).
///
/// ```
/// use themescan::heads::theme::log_mean_exp;
/// let one = log_mean_exp([1.5].into_iter(), 2.0).unwrap();
/// assert!((one - 1.5).abs() < 1e-6);
/// let two = log_mean_exp([0.0, 4.0].into_iter(), 2.0).unwrap();
/// assert!(two > 2.0 && two < 4.0);
/// assert_eq!(log_mean_exp(std::iter::empty(), 2.0), None);
/// ```
pub fn log_mean_exp(values: impl Iterator<Item = f32> + Clone, sharpness: f32) -> Option<f32> {
    let max = values.clone().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let (sum, n) = values.fold((0f32, 0usize), |(s, n), v| {
        (s + (sharpness * (v - max)).exp(), n + 1)
    });
    Some(max + (sum / n as f32).ln() / sharpness)
}

impl Aggregation {
    /// The window rules, among which training chooses by cross-validation ([`Aggregation::Sentences`]
    /// is a head of its own, asked for by name).
    pub const ALL: [Aggregation; 3] = [
        Aggregation::TopTwoMean,
        Aggregation::MeanVector,
        Aggregation::Max,
    ];

    /// Combines per-window probabilities for the rules that work on them; `None` for
    /// [`Aggregation::MeanVector`], which needs the pooled vectors instead, and for
    /// [`Aggregation::Sentences`], which needs the sentences' logits.
    /// Every row of `window_probs` has one probability per theme.
    pub fn combine(self, window_probs: &[Vec<f32>]) -> Option<Vec<f32>> {
        let themes = window_probs.first().map_or(0, Vec::len);
        let column = |k: usize| window_probs.iter().map(move |p| p[k]);
        match self {
            Aggregation::TopTwoMean => Some((0..themes).map(|k| top_two_mean(column(k))).collect()),
            Aggregation::Max => Some(
                (0..themes)
                    .map(|k| column(k).fold(0f32, f32::max))
                    .collect(),
            ),
            Aggregation::MeanVector | Aggregation::Sentences => None,
        }
    }
}

/// Article probabilities by [`Aggregation::Sentences`] from its sentences' logits (one row of
/// `labels` per sentence): per theme, the sigmoid of their smooth maximum; zeros when there
/// are no sentences.
pub fn sentence_article_probabilities(sentence_logits: &[Vec<f32>], labels: usize) -> Vec<f32> {
    (0..labels)
        .map(|k| {
            log_mean_exp(sentence_logits.iter().map(|r| r[k]), SENTENCE_SHARPNESS)
                .map_or(0.0, sigmoid)
        })
        .collect()
}

/// Each row of `rows` (row-major, `width` wide, one per sentence in text order) followed by
/// the mean of the rows within `radius` of it (itself included): the input rows of a sentence
/// head whose card sets [`ThemeCard::sentence_context`]. A radius at least the number of rows
/// joins every row with the mean of all of them.
///
/// ```
/// use themescan::heads::theme::join_context;
/// let rows = [1.0, 2.0, 3.0, 6.0, 5.0, 10.0];
/// let all = join_context(&rows, 2, 9);
/// assert_eq!(all[..4], [1.0, 2.0, 3.0, 6.0]);
/// let near = join_context(&rows, 2, 1);
/// // The first row's neighbourhood is rows 0 and 1; the middle row's is all three.
/// assert_eq!(near[..4], [1.0, 2.0, 2.0, 4.0]);
/// assert_eq!(near[4..8], [3.0, 6.0, 3.0, 6.0]);
/// ```
pub fn join_context(rows: &[f32], width: usize, radius: usize) -> Vec<f32> {
    let width = width.max(1);
    let n = rows.len() / width;
    // Prefix sums per feature, so every neighbourhood's mean is one subtraction.
    let mut prefix = vec![0f64; (n + 1) * width];
    for (i, row) in rows.chunks_exact(width).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            prefix[(i + 1) * width + j] = prefix[i * width + j] + v as f64;
        }
    }
    let mut joined = Vec::with_capacity(n * width * 2);
    for (i, row) in rows.chunks_exact(width).enumerate() {
        let (lo, hi) = (
            i.saturating_sub(radius),
            i.saturating_add(radius).saturating_add(1).min(n),
        );
        joined.extend_from_slice(row);
        joined.extend((0..width).map(|j| {
            ((prefix[hi * width + j] - prefix[lo * width + j]) / (hi - lo) as f64) as f32
        }));
    }
    joined
}

/// The logistic function: a logit's probability.
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Mean of the two largest values (the value itself when there is one; 0 when none).
pub fn top_two_mean(values: impl Iterator<Item = f32>) -> f32 {
    let (mut first, mut second, mut n) = (f32::NEG_INFINITY, f32::NEG_INFINITY, 0);
    for v in values {
        n += 1;
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    match n {
        0 => 0.0,
        1 => first,
        _ => (first + second) / 2.0,
    }
}

/// The mean of `rows` (each `width` wide, row-major): the article vector of
/// [`Aggregation::MeanVector`] (not re-normalised, as in training).
pub fn mean_row(rows: &[f32], width: usize) -> Vec<f32> {
    let n = rows.len() / width.max(1);
    let mut mean = vec![0f32; width];
    for row in rows.chunks_exact(width.max(1)) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f32);
    mean
}

/// Platt scaling of one theme's score: `sigmoid(slope · logit(p) + intercept)`, fitted on
/// cross-validated predictions so that a score of 0.8 is right about 80% of the time.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Platt {
    /// Multiplies the logit.
    pub slope: f32,
    /// Added to the scaled logit.
    pub intercept: f32,
}

impl Platt {
    /// The identity map.
    pub const IDENTITY: Platt = Platt {
        slope: 1.0,
        intercept: 0.0,
    };

    /// The calibrated probability of a raw probability `p`.
    pub fn apply(self, p: f32) -> f32 {
        let p = p.clamp(1e-7, 1.0 - 1e-7);
        let logit = (p / (1.0 - p)).ln();
        1.0 / (1.0 + (-(self.slope * logit + self.intercept)).exp())
    }
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
    /// The themes, in the head's output order ([`Theme::BUILT_IN`] for the built-in head).
    pub labels: Vec<Theme>,
    /// The theme set's name, for sets made from a theme-set file (`None` for the built-in
    /// head).
    #[serde(default)]
    pub set_name: Option<String>,
    /// How each theme of a set made from a theme-set file was scored and from what (`None`
    /// for the built-in head, which the rest of the card describes).
    #[serde(default)]
    pub theme_set: Option<Vec<ThemeSetEntry>>,
    /// Width of the input vectors ([`Pooling::output_size`] of the encoder's hidden size).
    pub input_size: usize,
    /// How token states are pooled into the input vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// For [`Pooling::MeanMaxWithLayerMean`]: how many layers the per-token layer mean
    /// averages and the last of them (1-based; `None`: the last layer), as `layers` and
    /// `layers_end` in the NER card. They must match the NER head's when the folder has one:
    /// the encoder makes one layer mean per pass.
    #[serde(default)]
    pub layer_mean: Option<(usize, Option<usize>)>,
    /// Width of the hidden layer; 0 for a plain linear head.
    pub hidden_size: usize,
    /// Members of the ensemble whose logits are averaged (each `m{i}.` in the weights).
    #[serde(default = "one")]
    pub members: usize,
    /// Calibrated score at or above which each theme (in `labels` order) is reported, tuned on
    /// cross-validated predictions inside the training split.
    pub thresholds: Vec<f32>,
    /// How an article's score comes from its windows, or from its sentences
    /// ([`Aggregation::Sentences`]).
    #[serde(default)]
    pub aggregation: Aggregation,
    /// For [`Aggregation::Sentences`]: each sentence's pooled row is joined by the mean of the
    /// rows of the sentences within this many sentences of it ([`join_context`]), so a
    /// sentence is scored in the light of the text around it (a court report's sentence on the
    /// material members swapped reads differently from a recruiter's pitch); `input_size` is
    /// then twice the pooled width. `None`: the sentence alone (heads trained before it
    /// existed).
    #[serde(default)]
    pub sentence_context: Option<usize>,
    /// Per-theme calibration of article scores (in `labels` order); empty: none.
    #[serde(default)]
    pub calibration: Vec<Platt>,
    /// The neighbour vote blended into the raw article scores before calibration
    /// ([`super::neighbours`]); `None`: the MLP alone (no index file in the folder).
    #[serde(default)]
    pub neighbours: Option<super::neighbours::NeighbourSettings>,
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
    /// Dev metrics per theme at the tuned thresholds (for a custom set: cross-validated on
    /// its own examples, for the themes with enough of them).
    pub dev_metrics: Vec<ThemeMetrics>,
    /// Dev macro-F1 at the tuned thresholds.
    pub dev_macro_f1: f64,
    /// Dev macro-F1 per language.
    pub dev_macro_f1_by_language: std::collections::BTreeMap<String, f64>,
    /// Expected calibration error of the dev scores (10 equal-width bins over every
    /// article-theme pair); `None` for heads trained before it was measured.
    #[serde(default)]
    pub dev_expected_calibration_error: Option<f64>,
}

fn one() -> usize {
    1
}

/// How one theme of a custom set is scored (a row of the set's linear head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThemeSetMode {
    /// From the theme's descriptions alone: similarity to their embedding, standardised
    /// against the background news.
    ZeroShot,
    /// Trained on the theme's examples, starting from and held near the zero-shot row.
    FewShot,
}

/// What a custom set's card records about one theme.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThemeSetEntry {
    /// The theme.
    pub theme: Theme,
    /// How it is scored.
    pub mode: ThemeSetMode,
    /// Its descriptions, as given.
    pub descriptions: Vec<String>,
    /// Positive examples it was trained on.
    pub positives: usize,
    /// Negative examples it was trained on (the background news not counted).
    pub negatives: usize,
}

impl ThemeCard {
    /// The width of the rows the head reads, for an encoder of `hidden` units: the pooled
    /// width, doubled for a head with [`ThemeCard::sentence_context`].
    pub fn expected_input_size(&self, hidden: usize) -> usize {
        let pooled = self.pooling.output_size(hidden);
        match self.sentence_context {
            Some(_) => 2 * pooled,
            None => pooled,
        }
    }

    /// Calibrated article scores from raw head probabilities.
    pub fn calibrate(&self, probs: Vec<f32>) -> Vec<f32> {
        if self.calibration.is_empty() {
            return probs;
        }
        probs
            .iter()
            .zip(&self.calibration)
            .map(|(&p, c)| c.apply(p))
            .collect()
    }

    /// Reads and checks a card.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Config`] if it cannot be read, if it has no labels or the same
    /// label twice, or if its thresholds or calibrations do not match its labels.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let card: ThemeCard = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("line {} column {}: {e}", e.line(), e.column()),
        })?;
        let unique: std::collections::BTreeSet<&Theme> = card.labels.iter().collect();
        if card.labels.is_empty() || unique.len() != card.labels.len() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "labels must be one or more distinct themes, found {:?}",
                    card.labels
                ),
            });
        }
        if card.pooling.needs_layer_mean() != card.layer_mean.is_some() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "pooling {:?} and layer_mean {:?} do not go together",
                    card.pooling, card.layer_mean
                ),
            });
        }
        if card.sentence_context.is_some() && card.aggregation != Aggregation::Sentences {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "sentence_context is for sentence heads, but aggregation is {:?}",
                    card.aggregation
                ),
            });
        }
        if !card.calibration.is_empty() && card.calibration.len() != card.labels.len() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "{} calibrations for {} labels",
                    card.calibration.len(),
                    card.labels.len()
                ),
            });
        }
        if card.neighbours.is_some() && card.aggregation == Aggregation::Sentences {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: "a head that scores sentences has no neighbour vote (its index holds \
                          windows): remove `neighbours`"
                    .into(),
            });
        }
        if let Some(n) = card.neighbours {
            if n.k == 0 || n.dims == 0 || !(0.0..=1.0).contains(&n.weight) {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "neighbours needs k and dims above 0 and a weight from 0 to 1, found {n:?}"
                    ),
                });
            }
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
    fn load(
        vb: VarBuilder<'_>,
        input_size: usize,
        hidden_size: usize,
        labels: usize,
    ) -> Result<Self> {
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
    labels: usize,
    /// The members as host dense layers, for heads loaded for the CPU (see [`super::dense`]).
    host: Option<Vec<(Option<DenseLayer>, DenseLayer)>>,
}

impl ThemeHead {
    /// Builds a head of `members` MLPs with `labels` outputs under `vb` (`m0.hidden`,
    /// `m0.output`, `m1.…`), for training (a `VarMap`) or inference (safetensors).
    ///
    /// # Errors
    /// A tensor error if a weight is missing or misshapen.
    pub fn load(
        vb: VarBuilder<'_>,
        input_size: usize,
        hidden_size: usize,
        members: usize,
        labels: usize,
    ) -> Result<Self> {
        let members = (0..members.max(1))
            .map(|i| Member::load(vb.pp(format!("m{i}")), input_size, hidden_size, labels))
            .collect::<Result<Vec<_>>>()?;
        Ok(ThemeHead {
            members,
            labels,
            host: None,
        })
    }

    /// Outputs (themes) of the head.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// The head made of member `i` alone, sharing its weights (for training members one by one).
    pub fn member(&self, i: usize) -> Option<ThemeHead> {
        self.members.get(i).map(|m| ThemeHead {
            members: vec![m.clone()],
            labels: self.labels,
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
        let mut head = ThemeHead::load(
            vb,
            card.input_size,
            card.hidden_size,
            card.members,
            card.labels.len(),
        )
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

    /// Logits `[rows, labels]` for pooled vectors `[rows, input]`: the members' mean.
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
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = self.logits(rows, input_size, device)?;
        for row in &mut out {
            for l in row.iter_mut() {
                *l = sigmoid(*l);
            }
        }
        Ok(out)
    }

    /// Logits (the members' mean) for host vectors, row-major `[rows, input]`.
    pub fn logits(
        &self,
        rows: &[f32],
        input_size: usize,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let n = rows.len() / input_size.max(1);
        let reads = self.members[0].hidden.as_ref().map_or_else(
            || self.members[0].output.weight().dim(1),
            |h| h.weight().dim(1),
        )?;
        if n * input_size != rows.len() || input_size != reads {
            return Err(Error::Setting(format!(
                "the theme head reads rows of {reads} values; got {} values as rows of {input_size}",
                rows.len()
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(host) = &self.host {
            let mut sum = vec![0f32; n * self.labels];
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
                .chunks_exact(self.labels)
                .map(|r| r.iter().map(|l| l / members).collect())
                .collect());
        }
        let x = Tensor::from_slice(rows, (n, input_size), device)?;
        Ok(self.forward(&x)?.to_vec2()?)
    }

    /// Article probabilities by [`Aggregation::Sentences`]: per theme, the sigmoid of the
    /// smooth maximum of the sentences' logits (`sentence_rows` row-major `[sentences,
    /// input]`; for a card with [`ThemeCard::sentence_context`], the pooled rows passed
    /// through [`join_context`]); zeros for an article without sentences.
    pub fn sentence_article_probabilities(
        &self,
        sentence_rows: &[f32],
        input_size: usize,
        device: &Device,
    ) -> Result<Vec<f32>> {
        let logits = self.logits(sentence_rows, input_size, device)?;
        Ok(sentence_article_probabilities(&logits, self.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::{mean_row, top_two_mean, Aggregation, Platt, ThemeCard};

    /// The shipped card with `edit` applied, read back through [`ThemeCard::read`].
    fn read_edited_card(edit: impl Fn(&mut serde_json::Value)) -> crate::Result<ThemeCard> {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/models/heads/themes.json");
        let mut card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
        edit(&mut card);
        let dir = std::env::temp_dir().join(format!("themescan-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.json", content_hash(&card)));
        std::fs::write(&path, card.to_string()).unwrap();
        let read = ThemeCard::read(&path);
        std::fs::remove_file(&path).unwrap();
        read
    }

    fn content_hash(card: &serde_json::Value) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        card.to_string().hash(&mut h);
        h.finish()
    }

    #[test]
    fn sentence_context_doubles_the_input_and_is_only_for_sentence_heads() {
        // A card written before the field existed has no key for it.
        let plain = read_edited_card(|c| {
            c.as_object_mut().unwrap().remove("sentence_context");
        })
        .unwrap();
        assert_eq!(
            plain.sentence_context, None,
            "cards before it default to none"
        );
        let pooled = plain.pooling.output_size(384);
        assert_eq!(plain.expected_input_size(384), pooled);
        let context = read_edited_card(|c| c["sentence_context"] = 5.into()).unwrap();
        assert_eq!(context.sentence_context, Some(5));
        assert_eq!(context.expected_input_size(384), 2 * pooled);
        let window = read_edited_card(|c| {
            c["sentence_context"] = 5.into();
            c["aggregation"] = "top_two_mean".into();
        });
        let message = window.unwrap_err().to_string();
        assert!(message.contains("sentence_context"), "{message}");
    }

    #[test]
    fn top_two_mean_rule() {
        assert_eq!(top_two_mean([0.9].into_iter()), 0.9);
        assert_eq!(top_two_mean([0.1, 0.9, 0.5].into_iter()), 0.7);
        assert_eq!(top_two_mean([0.2, 0.2].into_iter()), 0.2);
        assert_eq!(top_two_mean(std::iter::empty()), 0.0);
    }

    #[test]
    fn window_rules_combine_per_theme() {
        let windows = [
            vec![0.1, 0.9, 0.5, 0.0],
            vec![0.3, 0.5, 0.1, 0.0],
            vec![0.2, 0.1, 0.1, 0.0],
        ];
        assert_eq!(
            Aggregation::Max.combine(&windows),
            Some(vec![0.3, 0.9, 0.5, 0.0])
        );
        // Any number of themes.
        assert_eq!(
            Aggregation::Max.combine(&[vec![0.2], vec![0.7]]),
            Some(vec![0.7])
        );
        let top2 = Aggregation::TopTwoMean.combine(&windows).unwrap();
        assert!((top2[0] - 0.25).abs() < 1e-6 && (top2[1] - 0.7).abs() < 1e-6);
        assert_eq!(Aggregation::MeanVector.combine(&windows), None);
        assert_eq!(mean_row(&[1.0, 2.0, 3.0, 6.0], 2), vec![2.0, 4.0]);
    }

    #[test]
    fn platt_identity_and_monotone() {
        for p in [0.01f32, 0.3, 0.5, 0.9] {
            assert!((Platt::IDENTITY.apply(p) - p).abs() < 1e-5);
        }
        let sharpen = Platt {
            slope: 2.0,
            intercept: -0.5,
        };
        let mapped: Vec<f32> = [0.1f32, 0.4, 0.6, 0.95].map(|p| sharpen.apply(p)).to_vec();
        assert!(mapped.windows(2).all(|w| w[0] < w[1]), "{mapped:?}");
        assert!(sharpen.apply(0.5) < 0.5);
    }
}
