//! `--fine-tune-layers K`: trains the encoder's top `K` layers together with the head.
//!
//! The frozen lower layers run once: each training run goes through the first `L − K` layers
//! (on the chosen CPU path, as at inference) and its token states are cached under
//! `target/themescan-cache/`. Training then runs only the top `K` layers (candle, f32,
//! differentiable kernels) and the head over those cached states, reading each word at its
//! first sub-token. Corpora without a MISC class get the frozen path's partial labels (the
//! loss is over {O, B-MISC, I-MISC} where their `O` leaves MISC open). The trained layers are
//! written in f16 as `encoder-layers.safetensors` beside the head; dev is scored through the
//! whole inference path with them laid over the model, so the figures are what
//! `evaluate ner` measures.
//!
//! A full-scale run takes hours on a few cores, so it checkpoints (`resume.rs`) every
//! `--checkpoint-minutes` and at each epoch's end: run the same command again and it goes on
//! from the last checkpoint, at the same batch of the same epoch order (`--fresh` starts
//! over). The checkpoint is named by a hash of the run's settings and data, so another run
//! never picks it up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sha2::{Digest, Sha256};
use themescan::encoder::layers::attention_bias;
use themescan::encoder::trainable::TrainableLayers;
use themescan::entities::Tag;
use themescan::heads::ner::{InputScaling, NerHead, NerNet};
use themescan::heads::ENCODER_LAYERS;
use themescan::weights::Checkpoint;
use themescan::{Embedder, ModelSource, TokenSource, WordPooling};

use super::resume::{self, AdamW};
use super::{head_tensors, Args, Rng, Split};

/// One run's cached lower-layer states: `[tokens, hidden]` rows from `start` in the flat
/// buffer, each word's first sub-token row within the run (`None` for a word with no token),
/// the gold tags, and per word whether its `O` leaves MISC open (partial labels).
struct RunStates {
    start: usize,
    tokens: usize,
    first: Vec<Option<u32>>,
    tags: Vec<u32>,
    misc_open: Vec<bool>,
}

/// Cached states of all training runs.
struct LowerStates {
    hidden: usize,
    rows: Vec<f32>,
    runs: Vec<RunStates>,
}

/// A split's lower-layer states as cached: `[tokens, hidden]` rows of the kept runs in order,
/// tokens per kept run, each word's first sub-token row (`u32::MAX`: none), kept run indices.
struct Cached {
    rows: Vec<f32>,
    tokens: Vec<u32>,
    first: Vec<u32>,
    kept: Vec<u32>,
}

/// Encodes `split`'s runs through the embedder (the lower layers). A run longer than one
/// window is left out rather than cut.
fn encode_lower(embedder: &Embedder, split: &Split) -> Result<Cached> {
    let started = std::time::Instant::now();
    let mut out = Cached {
        rows: Vec::new(),
        tokens: Vec::new(),
        first: Vec::new(),
        kept: Vec::new(),
    };
    for (c, chunk) in split.runs.chunks(16).enumerate() {
        let words = split.run_words(chunk);
        let texts: Vec<String> = words.iter().map(|w| w.join(" ")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let states = embedder.token_states(&refs)?;
        for (i, (w, state)) in words.iter().zip(&states).enumerate() {
            let [window] = state.windows.as_slice() else {
                continue;
            };
            out.first.extend(
                state
                    .word_rows(w)
                    .into_iter()
                    .map(|found| found.map_or(u32::MAX, |(_, rows)| rows[0] as u32)),
            );
            out.rows.extend(window.hidden.iter());
            out.tokens.push(window.ids.len() as u32);
            out.kept.push((c * 16 + i) as u32);
        }
        eprint!(
            "\r  {} {}/{} runs, {:.0}s",
            split.lang,
            ((c + 1) * 16).min(split.runs.len()),
            split.runs.len(),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    Ok(out)
}

/// Adds `split`'s runs through the lower layers to `into`, from `cache` or encoded (and then
/// cached).
fn lower_states(
    embedder: &Embedder,
    split: &Split,
    cache: &Path,
    partial_misc: bool,
    into: &mut LowerStates,
) -> Result<()> {
    let h = into.hidden;
    let cached = match candle_core::safetensors::load(cache, &Device::Cpu) {
        Ok(t) => {
            let get = |n: &str| t.get(n).cloned().with_context(|| format!("{n} in cache"));
            Cached {
                rows: get("rows")?.flatten_all()?.to_vec1::<f32>()?,
                tokens: get("tokens")?.to_vec1::<u32>()?,
                first: get("first")?.to_vec1::<u32>()?,
                kept: get("kept")?.to_vec1::<u32>()?,
            }
        }
        Err(_) => {
            let c = encode_lower(embedder, split)?;
            let total: usize = c.tokens.iter().map(|&n| n as usize).sum();
            let mut tensors = HashMap::new();
            tensors.insert(
                "rows".to_string(),
                Tensor::from_slice(&c.rows, (total, h), &Device::Cpu)?,
            );
            for (name, v) in [
                ("tokens", &c.tokens),
                ("first", &c.first),
                ("kept", &c.kept),
            ] {
                tensors.insert(name.to_string(), Tensor::new(v.as_slice(), &Device::Cpu)?);
            }
            std::fs::create_dir_all(cache.parent().context("cache has a parent")?)?;
            candle_core::safetensors::save(&tensors, cache)?;
            c
        }
    };
    let misc_from = super::data::misc_unknown_from(split, partial_misc);
    let mut runs = Vec::with_capacity(cached.kept.len());
    let (mut at, mut word) = (0, 0);
    for (&k, &n) in cached.kept.iter().zip(&cached.tokens) {
        let sentences = split.runs[k as usize].clone();
        let tags: Vec<u32> = split.sentences[sentences.clone()]
            .iter()
            .flat_map(|s| s.tags.iter().map(|t| t.index() as u32))
            .collect();
        let misc_open: Vec<bool> =
            super::data::misc_open_words(split, sentences, misc_from).collect();
        let first = cached.first[word..word + tags.len()]
            .iter()
            .map(|&i| (i != u32::MAX).then_some(i))
            .collect();
        word += tags.len();
        runs.push(RunStates {
            start: at,
            tokens: n as usize,
            first,
            tags,
            misc_open,
        });
        at += n as usize;
    }
    let rows = cached.rows;
    let offset = into.rows.len() / h;
    into.rows.extend(rows);
    into.runs.extend(runs.into_iter().map(|mut r| {
        r.start += offset;
        r
    }));
    Ok(())
}

/// A padded minibatch of runs through the top layers, read at each word's first sub-token:
/// `[runs, words, hidden]` and the word counts.
fn forward_words(
    top: &TrainableLayers,
    states: &LowerStates,
    batch: &[usize],
    train: bool,
) -> Result<(Tensor, Vec<usize>)> {
    let h = states.hidden;
    let runs: Vec<&RunStates> = batch.iter().map(|&r| &states.runs[r]).collect();
    let len = runs.iter().map(|r| r.tokens).max().unwrap_or(0);
    let words = runs.iter().map(|r| r.tags.len()).max().unwrap_or(0);
    let mut x = vec![0f32; runs.len() * len * h];
    let mut mask = vec![0f32; runs.len() * len];
    let pad_row = (runs.len() * len) as u32;
    let mut pick = Vec::with_capacity(runs.len() * words);
    for (b, r) in runs.iter().enumerate() {
        x[b * len * h..(b * len + r.tokens) * h]
            .copy_from_slice(&states.rows[r.start * h..(r.start + r.tokens) * h]);
        mask[b * len..b * len + r.tokens].fill(1.0);
        for t in 0..words {
            pick.push(match r.first.get(t) {
                Some(Some(row)) => (b * len) as u32 + row,
                _ => pad_row,
            });
        }
    }
    let dev = Device::Cpu;
    let mut x = Tensor::from_vec(x, (runs.len(), len, h), &dev)?;
    let mask = Tensor::from_vec(mask, (runs.len(), len), &dev)?;
    let bias = attention_bias(&mask, DType::F32)?;
    for layer in top.layers() {
        x = if train {
            layer.forward_differentiable(&x, &bias)?
        } else {
            layer.forward(&x, &bias)?
        };
    }
    let flat = Tensor::cat(
        &[
            &x.reshape((runs.len() * len, h))?,
            &Tensor::zeros((1, h), DType::F32, &dev)?,
        ],
        0,
    )?;
    let pick = Tensor::from_vec(pick, runs.len() * words, &dev)?;
    let out = flat
        .index_select(&pick, 0)?
        .reshape((runs.len(), words, h))?;
    Ok((out, runs.iter().map(|r| r.tags.len()).collect()))
}

/// Weight decay of both optimisers.
const WEIGHT_DECAY: f64 = 1e-4;

/// Names a run by everything that shapes its training, so that a checkpoint is only resumed
/// by the same run over the same data.
fn run_fingerprint(args: &Args, states: &LowerStates, words: usize, tokens: usize) -> String {
    let key = format!(
        "layers {} epochs {} lr {} encoder_lr {} batch {} seed {} hidden {} dilations {:?} \
         attention {} {} dropout {} partial_misc {} cpu {:?} runs {} words {words} tokens {tokens}",
        args.fine_tune_layers,
        args.epochs,
        args.lr,
        args.encoder_lr,
        args.batch_runs,
        args.seed,
        args.hidden,
        args.dilations,
        args.attention_heads,
        args.attention_span,
        args.dropout,
        !args.no_partial_misc,
        args.cpu_path.resolve(),
        states.runs.len(),
    );
    format!("{:x}", Sha256::digest(key.as_bytes()))[..16].to_string()
}

/// What fine-tuning leaves for scoring and the card.
pub struct FineTuned {
    pub head: NerHead,
    pub tensors: HashMap<String, Tensor>,
    pub layers_file: PathBuf,
    pub first_tuned_layer: usize,
}

pub fn train(args: &Args, train: &[Split]) -> Result<FineTuned> {
    let k = args.fine_tune_layers;
    let files = ModelSource::Default.resolve()?;
    let checkpoint = Checkpoint::load(&files, &Device::Cpu, DType::F32)?;
    let top = TrainableLayers::top(checkpoint, k).context("--fine-tune-layers")?;
    let lower = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .cpu_path(args.cpu_path)
        .keep_layers(top.first())
        .build()?;
    eprintln!("lower layers: {}", lower.describe_compute());
    let h = lower.hidden_size();
    let mut states = LowerStates {
        hidden: h,
        rows: Vec::new(),
        runs: Vec::new(),
    };
    for split in train {
        let cache = PathBuf::from("target/themescan-cache").join(format!(
            "ner-lower{}-{}-w{}-p{}-{:?}.safetensors",
            top.first(),
            split.lang,
            split.words(),
            args.pack_words,
            lower.cpu_path()
        ));
        lower_states(&lower, split, &cache, !args.no_partial_misc, &mut states)?;
    }
    if states.runs.is_empty() {
        bail!("no training run fits in one window");
    }
    let tokens: usize = states.runs.iter().map(|r| r.tokens).sum();
    let words: usize = states.runs.iter().map(|r| r.tags.len()).sum();
    eprintln!(
        "{} runs, {words} words, {tokens} tokens through {k} trainable layers",
        states.runs.len()
    );

    // Standardise with the untuned layers' statistics, fixed for the rest of training.
    let mut sample = Vec::new();
    let probe: Vec<usize> = (0..states.runs.len())
        .step_by(states.runs.len() / 200 + 1)
        .collect();
    for chunk in probe.chunks(8) {
        let (x, lengths) = forward_words(&top, &states, chunk, false)?;
        for (b, &n) in lengths.iter().enumerate() {
            sample.extend(x.get(b)?.narrow(0, 0, n)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    let scaling = InputScaling::fit(&sample, h);
    let mean = Tensor::new(scaling.mean.as_slice(), &Device::Cpu)?;
    let inv_std = Tensor::new(scaling.inv_std.as_slice(), &Device::Cpu)?;

    let varmap = VarMap::new();
    let net = NerNet::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &args.net_config(h),
    )?;
    let mut head_opt = AdamW::new(
        varmap
            .data()
            .lock()
            .expect("no other thread holds the varmap")
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        args.lr,
        WEIGHT_DECAY,
    )?;
    let mut encoder_opt = AdamW::new(top.vars().to_vec(), args.encoder_lr, WEIGHT_DECAY)?;

    // A run started again with the same settings and data goes on from its checkpoint.
    let checkpoint = PathBuf::from("target/themescan-cache").join(format!(
        "ner-fine-tune-{}.safetensors",
        run_fingerprint(args, &states, words, tokens)
    ));
    let mut rng = Rng(args.seed.max(1));
    let mut resumed = None;
    if checkpoint.is_file() && !args.fresh {
        let progress = resume::load(
            &checkpoint,
            &mut [("head", &mut head_opt), ("encoder", &mut encoder_opt)],
        )?;
        eprintln!(
            "resuming from {} at epoch {}, batch {} (step {}); --fresh starts over",
            checkpoint.display(),
            progress.epoch,
            progress.batches_done,
            progress.step
        );
        rng = Rng(progress.epoch_rng);
        resumed = Some(progress);
    }

    // Batches of similar length (sorted in shuffled blocks) waste little on padding.
    let batches_per_epoch = states.runs.len().div_ceil(args.batch_runs.max(1));
    let total_steps = (batches_per_epoch * args.epochs).max(1);
    let warmup = total_steps / 20 + 1;
    let started = std::time::Instant::now();
    let mut saved_at = std::time::Instant::now();
    let mut step = resumed.map_or(0, |p| p.step);
    for epoch in resumed.map_or(0, |p| p.epoch)..args.epochs {
        let epoch_rng = rng.0;
        let mut order: Vec<usize> = (0..states.runs.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for block in order.chunks_mut(args.batch_runs.max(1) * 32) {
            block.sort_by_key(|&r| states.runs[r].tokens);
        }
        let mut batches: Vec<&[usize]> = order.chunks(args.batch_runs.max(1)).collect();
        for i in (1..batches.len()).rev() {
            batches.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let skip = match resumed.take() {
            Some(p) if p.epoch == epoch => p.batches_done,
            _ => 0,
        };
        let (mut total, mut seen) = (0f64, 0usize);
        for (done, batch) in batches.iter().enumerate().skip(skip) {
            let scale = if step < warmup {
                (step + 1) as f64 / warmup as f64
            } else {
                let p = (step - warmup) as f64 / (total_steps - warmup).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            };
            head_opt.lr = args.lr * scale;
            encoder_opt.lr = args.encoder_lr * scale;
            let (x, lengths) = forward_words(&top, &states, batch, true)?;
            let x = x.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
            let width = x.dim(1)?;
            let logits = net
                .forward(&x, &lengths, args.dropout)?
                .reshape((batch.len() * width, Tag::COUNT))?;
            let mut real = Vec::new();
            let mut gold = Vec::new();
            let mut misc_open = Vec::new();
            for (b, &r) in batch.iter().enumerate() {
                let run = &states.runs[r];
                for (t, &tag) in run.tags.iter().enumerate() {
                    real.push((b * width + t) as u32);
                    gold.push(tag);
                }
                misc_open.extend_from_slice(&run.misc_open);
            }
            let n = real.len();
            // Cross-entropy over each word's allowed tags (its gold tag, or O/B-MISC/I-MISC
            // where its corpus has no MISC class): `-log Σ p(allowed)`.
            let allowed = Tensor::from_vec(
                super::data::allowed_masks(&gold, &misc_open),
                (n, Tag::COUNT),
                &Device::Cpu,
            )?;
            let loss = super::partial_label_loss(
                &logits.index_select(&Tensor::from_vec(real, n, &Device::Cpu)?, 0)?,
                &allowed,
                n,
            )?;
            let grads = loss.backward()?;
            head_opt.step(&grads)?;
            encoder_opt.step(&grads)?;
            total += loss.to_scalar::<f32>()? as f64 * n as f64;
            seen += n;
            step += 1;
            if step % 10 == 0 {
                eprint!(
                    "\repoch {epoch}: step {step}/{total_steps}, train loss {:.4}, {:.0}s",
                    total / seen as f64,
                    started.elapsed().as_secs_f64()
                );
            }
            let epoch_done = done + 1 == batches.len();
            if epoch_done || saved_at.elapsed().as_secs_f64() >= args.checkpoint_minutes * 60.0 {
                let progress = if epoch_done {
                    resume::Progress {
                        step,
                        epoch: epoch + 1,
                        batches_done: 0,
                        epoch_rng: rng.0,
                    }
                } else {
                    resume::Progress {
                        step,
                        epoch,
                        batches_done: done + 1,
                        epoch_rng,
                    }
                };
                resume::save(
                    &checkpoint,
                    &[("head", &head_opt), ("encoder", &encoder_opt)],
                    progress,
                )?;
                saved_at = std::time::Instant::now();
            }
        }
        eprintln!(
            "\repoch {epoch}: train loss {:.4} ({:.0}s), checkpoint {}",
            total / seen.max(1) as f64,
            started.elapsed().as_secs_f64(),
            checkpoint.display()
        );
    }

    std::fs::create_dir_all(&args.out)?;
    let layers_file = args.out.join(ENCODER_LAYERS);
    top.save_f16(&layers_file)?;
    let tensors = head_tensors(&varmap, &scaling)?;
    Ok(FineTuned {
        head: NerHead::new(scaling, net, 0, false, &Device::Cpu),
        tensors,
        layers_file,
        first_tuned_layer: top.first(),
    })
}

/// The word features the head reads when the top layers are fine-tuned.
pub const KIND: (TokenSource, WordPooling) = (TokenSource::LastLayer, WordPooling::First);
