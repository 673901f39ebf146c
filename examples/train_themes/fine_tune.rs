//! `--fine-tune-layers K`: trains the encoder's top `K` layers for themes, with an MLP over
//! the pooled window vectors, before the head itself is trained.
//!
//! The theme head reads two blocks per window: the mean and max of the last layer, and of the
//! mean of layers 3–10, which the NER head reads too. Tuning only layers above the layer mean
//! leaves the NER head's inputs bit for bit as they were, so themes and NER still share one
//! pass and the NER head needs no retraining (its card is re-stamped with the new layers'
//! sha256, which the analyzer checks).
//!
//! The frozen lower layers run once per text (on the chosen CPU path, as at inference); their
//! output rows and each window's pooled layer-mean block are cached per text under
//! `target/themescan-cache/`. Training then runs only the top `K` layers (candle, f32,
//! differentiable kernels), pools each window as the analyzer does (normalised mean and max),
//! averages a text's windows into its article vector (the vector the head is trained on) and
//! fits a fresh MLP with the texts' labels. Only the training split is used, so the dev figures
//! of the head trained afterwards stay honest; the cross-validated choices inside the training
//! split see texts the layers were tuned on and are optimistic.
//!
//! Each epoch ends with a checkpoint (layers and MLP); the same command run again goes on from
//! the last finished epoch (the optimiser's moments start again).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use sha2::{Digest, Sha256};
use themescan::encoder::layers::attention_bias;
use themescan::encoder::trainable::TrainableLayers;
use themescan::heads::theme::Pooling;
use themescan::heads::{ThemeHead, ENCODER_LAYERS};
use themescan::train::{macro_f1, theme_metrics};
use themescan::weights::Checkpoint;
use themescan::{CpuPath, Embedder, ModelSource, Theme};

use super::text_cache::TextCache;
use super::{bce_with_logits, seeded_init, Rng};

/// What a fine-tuning run needs besides the data.
pub struct FineTuneSettings {
    pub layers: usize,
    pub epochs: usize,
    pub lr: f64,
    pub encoder_lr: f64,
    pub batch_texts: usize,
    pub hidden: usize,
    pub seed: u64,
    pub threads: usize,
    pub cpu_path: CpuPath,
    /// The layer mean the head pools (count, 1-based last layer), as `layer_mean_for` gives it.
    pub layer_mean: (usize, usize),
}

/// One window's rows in [`LowerStates::rows`] and its pooled layer-mean block.
struct LowerWindow {
    start: usize,
    tokens: usize,
    layer_mean: Vec<f32>,
}

/// The lower layers' output for every text: `[tokens, hidden]` rows, windows per text.
struct LowerStates {
    hidden: usize,
    rows: Vec<f32>,
    texts: Vec<Vec<LowerWindow>>,
}

/// Runs every text through the frozen lower layers, from the cache where it is there. A cache
/// file is: window count, each window's token count, each window's pooled layer-mean block
/// (`2·hidden`), then the rows (all little-endian f32).
fn lower_states(embedder: &Embedder, texts: &[&str], cache: &Path) -> Result<LowerStates> {
    let h = embedder.hidden_size();
    let cache = TextCache::open(cache.to_path_buf())?;
    let missing = cache.missing(texts);
    let started = std::time::Instant::now();
    for (c, chunk) in missing.chunks(16).enumerate() {
        for (original, text) in chunk.iter().zip(embedder.token_states(chunk)?) {
            let mut out = vec![text.windows.len() as f32];
            out.extend(text.windows.iter().map(|w| w.ids.len() as f32));
            for w in &text.windows {
                let mean = w
                    .layer_mean
                    .as_ref()
                    .context("the lower embedder makes a layer mean")?;
                Pooling::MeanMax.pool(mean.outer_iter(), None, h, &mut out);
            }
            for w in &text.windows {
                out.extend(w.hidden.iter());
            }
            cache.write(original, &out)?;
        }
        if c % 8 == 7 || (c + 1) * 16 >= missing.len() {
            eprintln!(
                "lower layers: {}/{} new texts, {:.0}s",
                ((c + 1) * 16).min(missing.len()),
                missing.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let mut states = LowerStates {
        hidden: h,
        rows: Vec::new(),
        texts: Vec::with_capacity(texts.len()),
    };
    for text in texts {
        let (v, path) = cache.read(text)?;
        let n = *v.first().context("empty cache file")? as usize;
        let tokens: Vec<usize> = v[1..1 + n].iter().map(|&t| t as usize).collect();
        let mut at = 1 + n;
        let mut windows = Vec::with_capacity(n);
        for &t in &tokens {
            windows.push(LowerWindow {
                start: 0,
                tokens: t,
                layer_mean: v[at..at + 2 * h].to_vec(),
            });
            at += 2 * h;
        }
        anyhow::ensure!(
            v.len() - at == tokens.iter().sum::<usize>() * h,
            "{} does not hold the rows its header names: delete it",
            path.display()
        );
        for w in &mut windows {
            w.start = states.rows.len() / h;
            states.rows.extend_from_slice(&v[at..at + w.tokens * h]);
            at += w.tokens * h;
        }
        states.texts.push(windows);
    }
    Ok(states)
}

/// L2-normalises each row of `[rows, h]`.
fn normalise_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Article vectors `[texts, 4·hidden]` of `batch` through the top layers: each window pooled as
/// the analyzer pools it (normalised mean and max of the last layer, then the cached layer-mean
/// block), a text's windows averaged.
fn article_vectors(
    top: &TrainableLayers,
    states: &LowerStates,
    batch: &[usize],
    train: bool,
) -> Result<Tensor> {
    let h = states.hidden;
    let windows: Vec<&LowerWindow> = batch.iter().flat_map(|&t| &states.texts[t]).collect();
    let len = windows.iter().map(|w| w.tokens).max().unwrap_or(1);
    let mut x = vec![0f32; windows.len() * len * h];
    let mut mask = vec![0f32; windows.len() * len];
    let mut block = Vec::with_capacity(windows.len() * 2 * h);
    for (b, w) in windows.iter().enumerate() {
        x[b * len * h..(b * len + w.tokens) * h]
            .copy_from_slice(&states.rows[w.start * h..(w.start + w.tokens) * h]);
        mask[b * len..b * len + w.tokens].fill(1.0);
        block.extend_from_slice(&w.layer_mean);
    }
    let dev = Device::Cpu;
    let mut x = Tensor::from_vec(x, (windows.len(), len, h), &dev)?;
    let mask = Tensor::from_vec(mask, (windows.len(), len), &dev)?;
    let bias = attention_bias(&mask, DType::F32)?;
    for layer in top.layers() {
        x = if train {
            layer.forward_differentiable(&x, &bias)?
        } else {
            layer.forward(&x, &bias)?
        };
    }
    let block = Tensor::from_vec(block, (windows.len(), 2 * h), &dev)?;
    let pooled = pool_windows(&x, &mask, &block)?;
    let counts: Vec<usize> = batch.iter().map(|&t| states.texts[t].len()).collect();
    average_windows(&pooled, &counts)
}

/// Window vectors `[windows, 4·hidden]` from the last layer's states `[windows, len, hidden]`
/// (`mask`: 1 for a token, 0 for padding), as [`Pooling::MeanMaxWithLayerMean`] pools them:
/// the normalised mean and max of the tokens, then the window's layer-mean block.
fn pool_windows(x: &Tensor, mask: &Tensor, layer_mean_block: &Tensor) -> Result<Tensor> {
    let keep = mask.unsqueeze(2)?;
    let sum = x.broadcast_mul(&keep)?.sum(1)?;
    // Padding gets a large negative before the max, so only the window's tokens count.
    let max = x.broadcast_add(&((keep - 1.0)? * 1e9)?)?.max(1)?;
    Ok(Tensor::cat(
        &[
            normalise_rows(&sum)?,
            normalise_rows(&max)?,
            layer_mean_block.clone(),
        ],
        1,
    )?)
}

/// Each text's article vector: the mean of its windows' vectors (`counts[t]` consecutive rows
/// of `windows` per text), as a `[texts, windows]` averaging matrix times the windows.
fn average_windows(windows: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let total: usize = counts.iter().sum();
    let mut average = vec![0f32; counts.len() * total];
    let mut at = 0;
    for (t, &n) in counts.iter().enumerate() {
        average[t * total + at..t * total + at + n].fill(1.0 / n as f32);
        at += n;
    }
    let average = Tensor::from_vec(average, (counts.len(), total), windows.device())?;
    Ok(average.matmul(windows)?)
}

/// Macro-F1 of `head` on `texts` at 0.5, and with each theme's threshold set on these texts
/// (an upper bound, printed only to follow training).
fn score(
    top: &TrainableLayers,
    head: &ThemeHead,
    states: &LowerStates,
    texts: &[usize],
    gold: &[Vec<bool>],
) -> Result<(f64, f64)> {
    let mut probs: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(16) {
        let x = article_vectors(top, states, chunk, false)?;
        let p = candle_nn::ops::sigmoid(&head.forward(&x)?)?;
        probs.extend(p.to_vec2::<f32>()?);
    }
    let gold: Vec<Vec<bool>> = texts.iter().map(|&i| gold[i].clone()).collect();
    let themes = Theme::BUILT_IN.to_vec();
    let at_half: Vec<Vec<bool>> = probs
        .iter()
        .map(|p| p.iter().map(|&v| v >= 0.5).collect())
        .collect();
    let half = macro_f1(&theme_metrics(&themes, &gold, &at_half));
    let thresholds: Vec<f32> = (0..themes.len())
        .map(|k| {
            let s: Vec<f32> = probs.iter().map(|p| p[k]).collect();
            let g: Vec<bool> = gold.iter().map(|g| g[k]).collect();
            themescan::train::best_threshold(&s, &g)
        })
        .collect();
    let tuned: Vec<Vec<bool>> = probs
        .iter()
        .map(|p| p.iter().zip(&thresholds).map(|(&v, &t)| v >= t).collect())
        .collect();
    Ok((half, macro_f1(&theme_metrics(&themes, &gold, &tuned))))
}

/// Tunes the top layers on the `train` texts and writes them, in f16, as
/// [`ENCODER_LAYERS`] in `out`. `dev` texts are scored after each epoch, to follow training.
#[allow(clippy::too_many_arguments)]
pub fn run(
    s: &FineTuneSettings,
    texts: &[&str],
    gold: &[Vec<bool>],
    weights: &[f32],
    train: &[usize],
    dev: &[usize],
    out: &Path,
) -> Result<PathBuf> {
    let files = ModelSource::Default.resolve()?;
    let checkpoint = Checkpoint::load(&files, &Device::Cpu, DType::F32)?;
    let layers_total = checkpoint.config().num_hidden_layers;
    let top = TrainableLayers::top(checkpoint, s.layers).context("--fine-tune-layers")?;
    let first = top.first();
    let (count, end) = s.layer_mean;
    anyhow::ensure!(
        end <= first,
        "the layer mean the heads read ends at layer {end}, inside the {} layers to tune: \
         tune at most {} layers",
        s.layers,
        layers_total - end
    );
    let lower = Embedder::builder()
        .model(ModelSource::Default)
        .threads(s.threads)
        .cpu_path(s.cpu_path)
        .keep_layers(first)
        .layer_mean(count)
        .layer_mean_ending_at(end)
        .build()?;
    eprintln!("lower layers (1–{first}): {}", lower.describe_compute());
    let cache = PathBuf::from("target/themescan-cache").join(format!(
        "theme-lower{first}-layers{count}-end{end}-{:?}",
        s.cpu_path.resolve()
    ));
    let states = lower_states(&lower, texts, &cache)?;
    let h = states.hidden;
    let tokens: usize = train
        .iter()
        .flat_map(|&t| states.texts[t].iter().map(|w| w.tokens))
        .sum();
    eprintln!(
        "fine-tuning layers {}–{layers_total}: {} training texts, {tokens} tokens per epoch",
        first + 1,
        train.len()
    );

    let varmap = VarMap::new();
    let head = ThemeHead::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        4 * h,
        s.hidden,
        1,
        gold[0].len(),
    )?;
    seeded_init(&varmap, s.seed)?;
    let head_vars: Vec<(String, Var)> = {
        let data = varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };

    // A checkpoint per finished epoch, named by everything that shapes the run.
    let key = format!(
        "layers {} epochs {} lr {} encoder_lr {} batch {} hidden {} seed {} cpu {:?} texts {} \
         tokens {tokens} data {:x}",
        s.layers,
        s.epochs,
        s.lr,
        s.encoder_lr,
        s.batch_texts,
        s.hidden,
        s.seed,
        s.cpu_path.resolve(),
        train.len(),
        Sha256::digest(
            train
                .iter()
                .flat_map(|&i| texts[i].bytes().chain(gold[i].iter().map(|&b| b as u8)))
                .collect::<Vec<u8>>()
        ),
    );
    let fingerprint = format!("{:x}", Sha256::digest(key.as_bytes()))[..16].to_string();
    let checkpoint_of = |epoch: usize| {
        PathBuf::from("target/themescan-cache").join(format!(
            "theme-fine-tune-{fingerprint}-epoch{epoch}.safetensors"
        ))
    };
    let mut start_epoch = 0;
    for epoch in (1..=s.epochs).rev() {
        let path = checkpoint_of(epoch);
        if path.is_file() {
            let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
            for (name, var) in top.vars().iter().chain(&head_vars) {
                var.set(
                    saved
                        .get(name)
                        .with_context(|| format!("{name} in checkpoint"))?,
                )?;
            }
            eprintln!("resuming after epoch {epoch} from {}", path.display());
            start_epoch = epoch;
            break;
        }
    }

    let params = |lr| ParamsAdamW {
        lr,
        weight_decay: 1e-2,
        ..Default::default()
    };
    let mut head_opt = AdamW::new(
        head_vars.iter().map(|(_, v)| v.clone()).collect(),
        params(s.lr),
    )?;
    let mut encoder_opt = AdamW::new(
        top.vars().iter().map(|(_, v)| v.clone()).collect(),
        params(s.encoder_lr),
    )?;
    let batch_size = s.batch_texts.max(1);
    let batches_per_epoch = train.len().div_ceil(batch_size);
    let total_steps = (batches_per_epoch * s.epochs).max(1);
    let warmup = total_steps / 20 + 1;
    let started = std::time::Instant::now();
    for epoch in start_epoch..s.epochs {
        // The epoch's order depends only on the seed and the epoch, so a resumed run sees the
        // batches an uninterrupted one would have.
        let mut rng = Rng(s.seed.wrapping_add(1 + epoch as u64).max(1));
        let mut order: Vec<usize> = train.to_vec();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        // Similar lengths in a batch waste little on padding.
        let tokens_of = |t: usize| states.texts[t].iter().map(|w| w.tokens).max().unwrap_or(0);
        for block in order.chunks_mut(batch_size * 32) {
            block.sort_by_key(|&t| tokens_of(t));
        }
        let mut batches: Vec<&[usize]> = order.chunks(batch_size).collect();
        for i in (1..batches.len()).rev() {
            batches.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let (mut total, mut seen) = (0f64, 0usize);
        for (done, batch) in batches.iter().enumerate() {
            let step = epoch * batches_per_epoch + done;
            let scale = if step < warmup {
                (step + 1) as f64 / warmup as f64
            } else {
                let p = (step - warmup) as f64 / (total_steps - warmup).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            };
            head_opt.set_learning_rate(s.lr * scale);
            encoder_opt.set_learning_rate(s.encoder_lr * scale);
            let x = article_vectors(&top, &states, batch, true)?;
            let logits = head.forward(&x)?;
            let y: Vec<f32> = batch
                .iter()
                .flat_map(|&t| gold[t].iter().map(|&b| b as u8 as f32))
                .collect();
            let y = Tensor::from_vec(y, logits.dims(), &Device::Cpu)?;
            let w: Vec<f32> = batch.iter().map(|&t| weights[t]).collect();
            let w = Tensor::from_vec(w, (batch.len(), 1), &Device::Cpu)?;
            let loss = bce_with_logits(&logits, &y, &w)?;
            let grads = loss.backward()?;
            head_opt.step(&grads)?;
            encoder_opt.step(&grads)?;
            total += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            seen += batch.len();
            if done % 20 == 19 {
                eprintln!(
                    "epoch {epoch}: batch {}/{batches_per_epoch}, train loss {:.4}, {:.0}s",
                    done + 1,
                    total / seen as f64,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let mut saved = top.tensors(DType::F32)?;
        for (name, var) in &head_vars {
            saved.insert(name.clone(), var.as_tensor().clone());
        }
        let path = checkpoint_of(epoch + 1);
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&saved, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        let (half, tuned) = score(&top, &head, &states, dev, gold)?;
        eprintln!(
            "epoch {epoch}: train loss {:.4}; dev macro-F1 of the tuning MLP {half:.4} at 0.5, \
             {tuned:.4} with thresholds set on dev ({:.0}s); checkpoint {}",
            total / seen.max(1) as f64,
            started.elapsed().as_secs_f64(),
            path.display()
        );
    }
    std::fs::create_dir_all(out)?;
    let file = out.join(ENCODER_LAYERS);
    top.save_f16(&file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use themescan::heads::theme::mean_row;

    /// Pooling in training must be the analyzer's: padding must not leak into the mean or max.
    #[test]
    fn training_pooling_matches_the_analyzers() {
        let (h, len) = (8, 5);
        let tokens = [5usize, 3];
        let mut rng = Rng(7);
        let value = |rng: &mut Rng| rng.next_f32() * 4.0 - 2.0;
        let mut x = vec![0f32; 2 * len * h];
        let mut mask = vec![0f32; 2 * len];
        let mut layer_mean = Vec::new();
        let mut expected = Vec::new();
        for (w, &n) in tokens.iter().enumerate() {
            // Padding rows hold large values that would win a max if they counted.
            for v in &mut x[w * len * h..(w + 1) * len * h] {
                *v = 50.0;
            }
            for v in &mut x[w * len * h..(w * len + n) * h] {
                *v = value(&mut rng);
            }
            mask[w * len..w * len + n].fill(1.0);
            let last =
                ndarray::Array2::from_shape_vec((n, h), x[w * len * h..(w * len + n) * h].to_vec())
                    .unwrap();
            let middle = ndarray::Array2::from_shape_fn((n, h), |_| value(&mut rng));
            Pooling::MeanMax.pool(middle.outer_iter(), None, h, &mut layer_mean);
            Pooling::MeanMaxWithLayerMean.pool(
                last.outer_iter(),
                Some(middle.outer_iter()),
                h,
                &mut expected,
            );
        }
        let dev = Device::Cpu;
        let pooled = pool_windows(
            &Tensor::from_vec(x, (2, len, h), &dev).unwrap(),
            &Tensor::from_vec(mask, (2, len), &dev).unwrap(),
            &Tensor::from_vec(layer_mean, (2, 2 * h), &dev).unwrap(),
        )
        .unwrap();
        let got: Vec<f32> = pooled.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "{g} against {e}");
        }

        // Two texts: the first of one window, the second of both windows.
        let windows = Tensor::cat(&[&pooled, &pooled], 0).unwrap();
        let articles = average_windows(&windows.narrow(0, 1, 3).unwrap(), &[1, 2])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let both = mean_row(&expected, 4 * h);
        for (article, want) in articles.iter().zip([&expected[4 * h..], &both[..]]) {
            for (g, e) in article.iter().zip(want) {
                assert!((g - e).abs() < 1e-5, "{g} against {e}");
            }
        }
    }
}
